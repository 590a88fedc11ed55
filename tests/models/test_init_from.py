"""Initialising a memory model from a dense checkpoint: exact copies, the report, clear errors, the CLI hook."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pkmlm.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from pkmlm.config import Config
from pkmlm.models.init_from import InitFromError, init_from_checkpoint
from pkmlm.models.transformer import TransformerLM
from pkmlm.training.trainer import train

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 48


def _config(data_dir, out_dir, positions=(), **model) -> dict:
    return {
        "model": {"n_layers": 2, "d_model": 16, "n_heads": 2, "dropout": 0.0, "max_seq_len": 8, **model},
        "memory": {"positions": list(positions), "n_keys": 8, "heads": 2, "knn": 2, "k_dim": 8},
        "data": {"dir": str(data_dir), "batch_size": 4, "bptt": 8},
        "train": {"out_dir": str(out_dir), "max_steps": 2, "warmup_steps": 1, "eval_every": 2, "eval_batches": 1,
                  "log_every": 1, "device": "cpu"},
    }


@pytest.fixture(scope="module")
def dense(tmp_path_factory, random_corpus):
    """(data dir, checkpoint of a 2-step dense run)."""
    root = tmp_path_factory.mktemp("init_from")
    random_corpus(root / "data", {"train": (20, 30), "valid": (20, 30)}, vocab=VOCAB, vocab_hash="v1", eos_id=1)
    train(Config.from_dict(_config(root / "data", root / "dense")))
    return root / "data", latest_checkpoint(root / "dense")


def _model(data_dir, positions, **model):
    torch.manual_seed(1)
    return TransformerLM(Config.from_dict(_config(data_dir, "unused", positions, **model)), VOCAB)


def test_parallel_memory_copies_every_dense_weight_exactly(dense):
    data_dir, path = dense
    model = _model(data_dir, ["1:parallel"])
    before = {n: t.clone() for n, t in model.state_dict().items()}
    report = init_from_checkpoint(model, path, vocab_hash="v1")
    source = load_checkpoint(path)["model"]
    assert report.ignored == [] and set(report.copied) == set(source)
    assert report.new and all(n.startswith("blocks.1.memory.") for n in report.new)
    state = model.state_dict()
    for name in report.copied:
        assert torch.equal(state[name], source[name]), name
    for name in report.new:  # the memory keeps its own initialisation
        assert torch.equal(state[name], before[name]), name
    assert "copied" in report.summary() and "blocks.1.memory.keys" in report.summary()


def test_replace_memory_reports_the_dropped_ffn_as_ignored(dense):
    data_dir, path = dense
    report = init_from_checkpoint(_model(data_dir, ["1:replace"]), path)
    assert sorted(report.ignored) == ["blocks.1.ffn.fc.bias", "blocks.1.ffn.fc.weight",
                                      "blocks.1.ffn.proj.bias", "blocks.1.ffn.proj.weight"]


def test_shape_mismatch_names_the_parameter(dense):
    data_dir, path = dense
    with pytest.raises(InitFromError, match=r"parameter pos_emb.weight has shape \(8, 16\) there and \(16, 16\)"):
        init_from_checkpoint(_model(data_dir, ["1:parallel"], max_seq_len=16), path)


def test_other_vocabulary_is_refused(dense):
    data_dir, path = dense
    with pytest.raises(CheckpointError, match="vocabulary v1 but the data has v2"):
        init_from_checkpoint(_model(data_dir, ["1:parallel"]), path, vocab_hash="v2")


def _train_cli(config_path, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_",
                                                                      "SLURM_"))}
    env.update(OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "train.py", "--config", str(config_path), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_train_cli_init_from_reports_records_and_refuses_mismatch(dense, tmp_path):
    data_dir, path = dense
    cfg = tmp_path / "mem.yaml"
    cfg.write_text(yaml.safe_dump(_config(data_dir, tmp_path / "mem", ["1:parallel"])))
    proc = _train_cli(cfg, "--init-from", str(path), "train.max_steps=1")
    assert proc.returncode == 0, proc.stderr
    assert f"init from {path}: copied" in proc.stderr and "ignored 0" in proc.stderr
    assert load_checkpoint(latest_checkpoint(tmp_path / "mem"))["init_from"] == str(path)

    proc = _train_cli(cfg, "--init-from", str(path), "model.max_seq_len=16", f"train.out_dir={tmp_path / 'bad'}")
    assert proc.returncode == 2 and "parameter pos_emb.weight" in proc.stderr and "Traceback" not in proc.stderr
    assert latest_checkpoint(tmp_path / "bad") is None
