"""memory.values_file: the value table and its RowAdam state in memory-mapped files (pkmlm/memory/values_file.py)."""

import hashlib
import os

import pytest
import torch

from pkmlm import checkpoint as ckpt
from pkmlm.checkpoint import list_checkpoints, load_checkpoint
from pkmlm.config import Config, ConfigError
from pkmlm.eval.evaluation import load_model
from pkmlm.memory.values_file import ValuesFile, ValuesFileError
from pkmlm.training.trainer import train

VOCAB = 64


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, learnable_corpus):
    return learnable_corpus(tmp_path_factory.mktemp("data"), vocab=VOCAB, seed=0)


def config(data_dir, out_dir, values_file, **train_settings):
    return Config.from_dict({
        "model": {"n_layers": 2, "d_model": 32, "n_heads": 2, "dropout": 0.1, "max_seq_len": 16},
        "memory": {"positions": ["1:parallel"], "n_keys": 16, "heads": 2, "knn": 4, "k_dim": 16,
                   "values_file": str(values_file)},
        "data": {"dir": str(data_dir), "batch_size": 8, "bptt": 16},
        "train": {"out_dir": str(out_dir), "max_steps": 6, "lr": 1e-2, "warmup_steps": 2, "eval_every": 3,
                  "eval_batches": 2, "checkpoint_every": 3, "device": "cpu", **train_settings},
    })


def digest(path):
    return hashlib.sha1(open(path, "rb").read()).hexdigest()


def test_resume_is_bitwise_exact_and_checkpoints_hold_no_table(data_dir, tmp_path):
    whole = train(config(data_dir, tmp_path / "whole", tmp_path / "whole.values"))
    first = train(config(data_dir, tmp_path / "cut", tmp_path / "cut.values", max_steps=3))
    rest = train(config(data_dir, tmp_path / "cut", tmp_path / "cut.values"), resume="latest")
    assert {**first.losses, **rest.losses} == whole.losses
    assert whole.losses[6] < whole.losses[1] - 0.2  # it learns
    for (name, a), b in zip(whole.model.state_dict().items(), rest.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert digest(tmp_path / "whole.values") == digest(tmp_path / "cut.values")
    assert digest(tmp_path / "whole.values.adam") == digest(tmp_path / "cut.values.adam")
    state = load_checkpoint(list_checkpoints(tmp_path / "cut")[-1])
    assert not any("values.weight" in k for k in state["model"])
    assert all(not s for s in state["optimizers"]["values"]["state"].values())  # moments stay in the file
    assert state["values_file"]["path"] == str(tmp_path / "cut.values")


def test_crash_between_checkpoints_is_rolled_back_on_resume(data_dir, tmp_path, monkeypatch):
    whole = train(config(data_dir, tmp_path / "whole", tmp_path / "whole.values"))
    train(config(data_dir, tmp_path / "run", tmp_path / "run.values", max_steps=3))
    at_step_3 = digest(tmp_path / "run.values")
    real_save = ckpt.save_checkpoint

    def crash(state, *args, **kwargs):  # the process dies before step 5's checkpoint is written
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ckpt, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        train(config(data_dir, tmp_path / "run", tmp_path / "run.values", max_steps=5, checkpoint_every=100),
              resume="latest")
    assert digest(tmp_path / "run.values") != at_step_3  # steps 4 and 5 changed the table in place
    # Evaluation maps the files read-only and sees the table of checkpoint 3, changing nothing on disk.
    files = {p: digest(p) for p in tmp_path.glob("run.values*")}
    path = list_checkpoints(tmp_path / "run")[-1]
    model = load_model(load_checkpoint(path), path, torch.device("cpu"))
    table = next(m for _, m in model.memories()).values.weight
    assert hashlib.sha1(table.detach().numpy().tobytes()).hexdigest() == at_step_3  # the journal undone in RAM
    reference = ValuesFile(tmp_path / "whole.values", table.shape[0], table.shape[1], writable=False)
    assert {p: digest(p) for p in tmp_path.glob("run.values*")} == files
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    rest = train(config(data_dir, tmp_path / "run", tmp_path / "run.values"), resume="latest")
    assert rest.losses == {s: l for s, l in whole.losses.items() if s > 3}  # bitwise, as if never crashed
    assert digest(tmp_path / "run.values") == digest(tmp_path / "whole.values")
    assert not torch.equal(table, reference.weight)  # the whole run moved on from step 3


def test_moments_file_is_allocated_zero_and_never_written_until_used(tmp_path):
    vf = ValuesFile(tmp_path / "v", 1 << 14, 256, writable=True, seed=0)
    adam = tmp_path / "v.adam"
    assert adam.stat().st_size == (1 << 14) * 2 * 256 * 4
    assert vf.moments.count_nonzero() == 0 and vf.step.count_nonzero() == 0
    assert vf.weight.std().item() == pytest.approx(256**-0.5, rel=0.02)
    again = ValuesFile(tmp_path / "v", 1 << 14, 256, writable=False)
    assert torch.equal(again.weight, vf.weight) and again.uid == vf.uid
    with pytest.raises(ValuesFileError, match=r"holds a \(16384, 256\) table, this model needs \(16384, 128\)"):
        ValuesFile(tmp_path / "v", 1 << 14, 128, writable=True)


def test_bad_locations_are_clear_errors(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(ValuesFileError, match="file, not a directory"):
        ValuesFile(blocked / "v", 64, 8, writable=True)
    with pytest.raises(ValuesFileError, match="is a directory: name a file in it"):  # not IsADirectoryError
        ValuesFile(tmp_path, 64, 8, writable=True)
    with pytest.raises(ValuesFileError, match="is a directory: name a file in it"):
        ValuesFile(tmp_path, 64, 8, writable=False)
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    if not os.access(tmp_path / "ro", os.W_OK):  # root writes anywhere
        with pytest.raises(ValuesFileError, match="cannot write in"):
            ValuesFile(tmp_path / "ro" / "v", 64, 8, writable=True)
    import shutil
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**6, 10**6, 1000))
    with pytest.raises(ValuesFileError, match="GiB on disk"):
        ValuesFile(tmp_path / "v", 1 << 12, 64, writable=True)
    with pytest.raises(ValuesFileError, match="no table there"):
        ValuesFile(tmp_path / "absent", 64, 8, writable=False)


def test_config_checks(data_dir, tmp_path):
    def build(**memory):
        c = config(data_dir, tmp_path, tmp_path / "v").to_dict()
        c["memory"].update(memory)
        return Config.from_dict(c)

    with pytest.raises(ConfigError, match="needs exactly one value table, the model has 2"):
        build(positions=["0:parallel", "1:parallel"])
    assert build(positions=["0:parallel", "1:parallel"], share_values=True).memory.values_file
    with pytest.raises(ConfigError, match="reinit_every"):
        build(reinit_every=10)
    with pytest.raises(ConfigError, match="empty"):
        build(values_file=" ")
    with pytest.raises(ConfigError, match="cannot be combined with memory.shard_values"):
        build(shard_values=True)
    with pytest.raises(ConfigError, match="cannot be combined with memory.value_init=zero"):
        build(value_init="zero")
    c = config(data_dir, tmp_path, tmp_path / "v").to_dict()
    c["train"]["keep_best"] = True
    with pytest.raises(ConfigError, match="cannot be combined with train.keep_best"):
        Config.from_dict(c)
    c = build()
    with pytest.raises(ConfigError, match="one CPU process"):
        c.validate_runtime(world_size=2)
    with pytest.raises(ConfigError, match="one CPU process"):
        c.validate_runtime(device_type="cuda")
