import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pkmlm import checkpoint as ckpt


def _state(step, **extra):
    state = {"format": 1, "config": {"train": {"max_steps": 10}}, "model": {"w": torch.randn(3, 4)},
             "optimizers": {"dense": {"state": {}, "param_groups": []}}, "step": step,
             "rng": {"ranks": [ckpt.rng_state(torch.device("cpu"))]}, "data": {"epoch": 0, "position": 7},
             "vocab_hash": "abc"}
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
    with pytest.raises(ckpt.CheckpointError, match="cannot write checkpoint .*step_0000002.pt: disk full"):
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


def test_check_resumable_allows_run_length_intervals_and_steering_only():
    saved = {"model": {"d_model": 64}, "train": {"max_steps": 10, "lr": 1e-3, "out_dir": "a", "eval_every": 5,
                                                 "weight_decay": 0.0, "grad_clip": 1.0}}
    ok = {"model": {"d_model": 64}, "train": {"max_steps": 50, "lr": 1e-3, "out_dir": "b", "eval_every": 7,
                                              "weight_decay": 0.0, "grad_clip": 1.0}}
    assert ckpt.check_resumable(saved, ok) == []
    # What the divergence message advises is allowed, and reported for the log.
    steer = {**ok, "train": {**ok["train"], "lr": 5e-4, "grad_clip": 0.5}}
    assert ckpt.check_resumable(saved, steer) == ["train.grad_clip: 1.0 -> 0.5", "train.lr: 0.001 -> 0.0005"]
    bad = {"model": {"d_model": 32}, "train": {**saved["train"], "weight_decay": 0.1, "lr": 2e-3}}
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.check_resumable(saved, bad, "run/checkpoints/step_0000010.pt")
    message = str(err.value)
    assert "model.d_model: 64 in checkpoint, 32 now" in message
    assert "train.weight_decay" in message and "train.lr:" not in message and "step_0000010.pt" in message


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


def _broken(key, value):
    def edit(state):
        node = state
        *parents, last = key
        for k in parents:
            node = node[k]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return edit


_DELETE = object()


@pytest.mark.parametrize("key, value, message", [
    (("model",), [torch.zeros(1)], "'model' is a list, not a dict"),
    (("model", "w"), [1, 2], "model entry 'w' is a list, not a tensor"),
    (("step",), "12", "'step' is a str, not a int"),
    (("step",), True, "'step' is a bool, not a int"),
    (("step",), -1, "'step' is -1"),
    (("config",), None, "'config' is a NoneType, not a dict"),
    (("optimizers",), [], "'optimizers' is a list"),
    (("vocab_hash",), 7, "'vocab_hash' is a int"),
    (("rng", "ranks"), _DELETE, "'rng' lacks a non-empty list 'ranks'"),
    (("rng", "ranks"), [], "'rng' lacks a non-empty list 'ranks'"),
    (("rng", "ranks", 0, "python"), _DELETE, "rng state of rank 0: no 'python' generator"),
    (("rng", "ranks", 0, "torch"), torch.zeros(3), "rng state of rank 0: 'torch' is not a byte tensor"),
    (("rng", "ranks", 0, "numpy"), [1, 2], "rng state of rank 0: 'numpy' is not"),
    (("scaler",), "x", "'scaler' is a str, not a dict or None"),
    (("best",), {"step": 3}, "'best' must hold an integer step and a float valid_loss"),
])
def test_load_refuses_damaged_structure(tmp_path, key, value, message):
    state = _state(5, scaler=None, best={"step": 5, "valid_loss": 1.5})
    _broken(key, value)(state)
    path = tmp_path / "crafted.pt"
    torch.save(state, path)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_checkpoint(path)
    assert "damaged or not written by pkmlm" in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    for step in (10, 20, 30):
        ckpt.save_checkpoint(_state(step), tmp_path, keep=3)
    ckpt.save_checkpoint(_state(15), tmp_path, keep=1)  # older than the rest: still kept
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000015.pt", "step_0000030.pt"]


def test_best_is_never_listed_or_pruned_and_abandoned_folders_are_ignored(tmp_path):
    ckpt.save_best(_state(5, best={"step": 5, "valid_loss": 2.0}), tmp_path)
    for step in (10, 20, 30):
        ckpt.save_checkpoint(_state(step), tmp_path, keep=1)
    (tmp_path / "checkpoints" / "abandoned-20250101-000000").mkdir()
    ckpt.save_checkpoint(_state(99), tmp_path / "checkpoints" / "abandoned-20250101-000000" / "x", keep=1)
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000030.pt"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000030.pt"]
    assert ckpt.best_path(tmp_path).is_file() and ckpt.checkpoint_step(ckpt.best_path(tmp_path)) == 5


def test_abandon_newer_moves_the_abandoned_lineage_aside(tmp_path):
    for step in (10, 20, 30):
        ckpt.save_checkpoint(_state(step), tmp_path, keep=5)
    ckpt.save_best(_state(25, best={"step": 25, "valid_loss": 2.0}), tmp_path)
    folder, moved = ckpt.abandon_newer(tmp_path, 20, best_step=10)
    assert folder.parent == tmp_path / "checkpoints" and folder.name.startswith("abandoned-")
    assert sorted(p.name for p in moved) == ["best.pt", "step_0000030.pt"] and all(p.is_file() for p in moved)
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000020.pt" and not ckpt.best_path(tmp_path).exists()
    assert ckpt.load_checkpoint(folder / "step_0000030.pt")["step"] == 30  # moved, not deleted
    # best.pt of the resumed lineage (the step its checkpoint names) stays; a second set-aside gets its own folder.
    ckpt.save_best(_state(10, best={"step": 10, "valid_loss": 2.0}), tmp_path)
    assert ckpt.abandon_newer(tmp_path, 20, best_step=10) == (None, [])
    again, moved = ckpt.abandon_newer(tmp_path, 10, best_step=None)  # a checkpoint that knows no best.pt
    assert again != folder and sorted(p.name for p in moved) == ["best.pt", "step_0000020.pt"]


def test_stale_temporaries_of_killed_writes_are_removed_and_nothing_else(tmp_path, monkeypatch):
    directory = tmp_path / "checkpoints"
    ckpt.save_checkpoint(_state(1), tmp_path, keep=3)
    # The name atomic_open really uses while a checkpoint is being written:
    seen = []
    original = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: (seen.extend(os.listdir(directory)), original(obj, f)))
    ckpt.save_checkpoint(_state(2), tmp_path, keep=3)
    ckpt.save_best(_state(2), tmp_path)
    temporaries = sorted({n for n in seen if n.startswith(".")})
    assert len(temporaries) == 2 and all(ckpt._TEMPORARY.match(n) for n in temporaries)
    for name in temporaries + [".notes.tmp.1", "step_0000003.pt.tmp.1", ".step_0000003.pt.tmp.x", "mine.tmp"]:
        (directory / name).write_bytes(b"partial")
    removed = ckpt.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == temporaries
    assert sorted(os.listdir(directory)) == [".notes.tmp.1", ".step_0000003.pt.tmp.x", "best.pt", "mine.tmp",
                                             "step_0000001.pt", "step_0000002.pt", "step_0000003.pt.tmp.1"]


def test_where_a_run_executes_may_change_on_resume():
    """`make demo` trains with train.device=cpu; the README's resume command leaves the config's auto."""
    saved = {"train": {"device": "cpu", "max_steps": 300, "lr": 1e-3}}
    assert ckpt.check_resumable(saved, {"train": {"device": "auto", "max_steps": 320, "lr": 1e-3}}) == []
    assert ckpt.check_resumable(saved, {"train": {"device": "cuda", "max_steps": 300, "lr": 1e-3}}) == []


def test_readme_lists_exactly_the_config_keys_that_may_change_on_resume():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- resume-changes -->(.*?)<!-- /resume-changes -->", readme, re.S)
    assert block, "README.md lost its <!-- resume-changes --> block"
    free, steering = block.group(1).split("steering", 1)
    keys = lambda text: set(re.findall(r"`([a-z_]+\.[a-z_]+)`", text))  # noqa: E731
    assert keys(free) == ckpt.RESUMABLE_CHANGES
    assert keys(steering) == ckpt.STEERING_CHANGES
