"""Fixtures shared by several test files."""

import itertools

import pytest

from pkmlm.config import Config
from pkmlm.data.corpora import bbc_news
from pkmlm.data.prepare import prepare
from pkmlm.trainer import train

TEXT_RUN_BPTT = 16


def text_run_config(data_dir, out_dir, **train_overrides) -> dict:
    """A tiny memory model (memory after block 0 and replacing block 1's FFN) on real text."""
    return {
        "model": {"n_layers": 2, "d_model": 32, "n_heads": 2, "dropout": 0.1, "max_seq_len": 2 * TEXT_RUN_BPTT},
        "memory": {"positions": ["0:after", "1:replace"], "n_keys": 8, "heads": 2, "knn": 4, "k_dim": 16},
        "data": {"dir": str(data_dir), "batch_size": 8, "bptt": TEXT_RUN_BPTT},
        "train": {"out_dir": str(out_dir), "max_steps": 20, "lr": 3e-3, "value_lr": 1e-2, "warmup_steps": 5,
                  "log_every": 10, "eval_every": 10, "eval_batches": 4, "checkpoint_every": 100,
                  "device": "cpu", **train_overrides},
    }


@pytest.fixture(scope="session")
def text_run(tmp_path_factory):
    """A run trained for 20 steps on 40 BBC articles prepared with sentencepiece: (data dir, run dir)."""
    root = tmp_path_factory.mktemp("text_run")
    inputs = root / "in"
    inputs.mkdir()
    for i, doc in enumerate(itertools.islice(bbc_news(), 40)):
        (inputs / f"{i:03d}.txt").write_text(doc.text)
    prepare(root / "data", inputs=[inputs], vocab_size=400, valid="4", test="2", workers=1, progress=False)
    train(Config.from_dict(text_run_config(root / "data", root / "run")))
    return root / "data", root / "run"
