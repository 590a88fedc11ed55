import os
import pickle
import random

import numpy as np
import pytest
import torch

from pkmlm import checkpoint as ckpt


def _state(step, **extra):
    state = {"format": 1, "config": {"train": {"max_steps": 10}}, "model": {"w": torch.randn(3, 4)},
             "optimizers": {"dense": {"state": {}, "param_groups": []}}, "step": step,
             "rng": ckpt.rng_state(torch.device("cpu")), "data": {"epoch": 0, "position": 7}, "vocab_hash": "abc"}
    state.update(extra)
    return state


def test_save_load_roundtrip_and_keep_last_n(tmp_path):
    saved = {}
    for step in (5, 10, 15, 20):
        saved[step] = _state(step)
        path = ckpt.save_checkpoint(saved[step], tmp_path, keep=2)
        assert path == ckpt.checkpoint_path(tmp_path, step)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000015.pt", "step_0000020.pt"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000020.pt"
    # No temporary files left behind.
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_0000015.pt", "step_0000020.pt"]
    loaded = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert torch.equal(loaded["model"]["w"], saved[20]["model"]["w"])
    assert loaded["data"] == {"epoch": 0, "position": 7}


def test_latest_checkpoint_sorts_by_step_and_ignores_other_files(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path) is None
    for step in (9, 100, 12):
        ckpt.save_checkpoint(_state(step), tmp_path, keep=10)
    (tmp_path / "checkpoints" / "notes.txt").write_text("x")
    (tmp_path / "checkpoints" / ".step_0000200.pt.tmp.1").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000100.pt"


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(_state(1), tmp_path, keep=3)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(_state(2), tmp_path, keep=3)
    assert os.listdir(tmp_path / "checkpoints") == ["step_0000001.pt"]
    assert ckpt.load_checkpoint(tmp_path / "checkpoints" / "step_0000001.pt")["step"] == 1


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_load_refuses_arbitrary_pickles_and_garbage(tmp_path):
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"format": 1, "payload": Evil()}, f, protocol=2)
    with pytest.raises(ckpt.CheckpointError, match="cannot read checkpoint"):
        ckpt.load_checkpoint(evil)
    truncated = tmp_path / "trunc.pt"
    torch.save(_state(3), truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match="cannot read checkpoint"):
        ckpt.load_checkpoint(truncated)
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        ckpt.load_checkpoint(tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(ckpt.CheckpointError, match="not a pkmlm checkpoint"):
        ckpt.load_checkpoint(other)
    incomplete = tmp_path / "incomplete.pt"
    state = _state(4)
    del state["rng"]
    torch.save(state, incomplete)
    with pytest.raises(ckpt.CheckpointError, match="lacks"):
        ckpt.load_checkpoint(incomplete)


def test_save_rejects_incomplete_state(tmp_path):
    state = _state(1)
    del state["vocab_hash"]
    with pytest.raises(ValueError, match="vocab_hash"):
        ckpt.save_checkpoint(state, tmp_path, keep=1)


def test_check_resumable_allows_run_length_and_intervals_only():
    saved = {"model": {"d_model": 64}, "train": {"max_steps": 10, "lr": 1e-3, "out_dir": "a", "eval_every": 5}}
    ok = {"model": {"d_model": 64}, "train": {"max_steps": 50, "lr": 1e-3, "out_dir": "b", "eval_every": 7}}
    ckpt.check_resumable(saved, ok)
    bad = {"model": {"d_model": 32}, "train": {"max_steps": 10, "lr": 2e-3, "out_dir": "a", "eval_every": 5}}
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.check_resumable(saved, bad, "run/checkpoints/step_0000010.pt")
    message = str(err.value)
    assert "model.d_model: 64 in checkpoint, 32 now" in message
    assert "train.lr" in message and "step_0000010.pt" in message


def test_check_vocab():
    ckpt.check_vocab("abc", "abc")
    with pytest.raises(ckpt.CheckpointError, match="data.dir"):
        ckpt.check_vocab("abc", "def")


def test_rng_state_roundtrip_through_file(tmp_path):
    device = torch.device("cpu")
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    state = ckpt.rng_state(device)
    first = (torch.rand(3), random.random(), np.random.rand())
    torch.save(state, tmp_path / "rng.pt")
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), device)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]
