"""Fixtures shared by the test files, and the `slow` marker (`make test-fast` skips those tests)."""

from __future__ import annotations

import itertools
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest

from pkmlm.config import Config
from pkmlm.data.corpora import bbc_news
from pkmlm.data.prepare import MergeSettings, prepare
from pkmlm.data.shards import write_split
from pkmlm.training.trainer import train

# Every multi-process run the tests start (they inherit the environment) checks that its ranks enter each collective
# together, so code that one rank runs alone fails at once, naming where each rank is, instead of hanging
# (pkmlm/distributed.py: entering_collective).
os.environ.setdefault("PKMLM_COLLECTIVE_CHECK", "1")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a process group's master)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_random_corpus(root: Path, splits: dict[str, tuple[int, int]], *, vocab: int, vocab_hash: str,
                        eos_id: int, low: int = 2, seed: int = 0) -> Path:
    """Splits of random-token documents under ``root`` (one ``write_split`` each, in ``splits``' order).

    splits: {name: (documents, tokens per document)}; token ids are drawn from [low, vocab) by one generator
    seeded with ``seed``, so a file's corpus is the same on every run. Returns ``root``.
    """
    rng = np.random.default_rng(seed)
    for split, (docs, length) in splits.items():
        write_split(Path(root) / split, [rng.integers(low, vocab, size=length).tolist() for _ in range(docs)],
                    vocab_size=vocab, vocab_hash=vocab_hash, eos_id=eos_id)
    return Path(root)


def write_learnable_corpus(root: Path, *, vocab: int, seed: int) -> Path:
    """A train (160 documents) and valid (20) split with something to learn: each 50-token document counts up by
    3 from a random start, modulo the vocabulary (ids 1..vocab-1; eos 0). Returns ``root``."""
    rng = np.random.default_rng(seed)
    for split, docs in (("train", 160), ("valid", 20)):
        write_split(Path(root) / split, [((rng.integers(1, vocab) + 3 * np.arange(50)) % (vocab - 1) + 1).tolist()
                                         for _ in range(docs)], vocab_size=vocab, vocab_hash="test-vocab", eos_id=0)
    return Path(root)


@pytest.fixture(scope="session")
def learnable_corpus():
    """The ``write_learnable_corpus`` factory: ``learnable_corpus(root, vocab=..., seed=...)``."""
    return write_learnable_corpus


@pytest.fixture(scope="session")
def random_corpus():
    """The ``write_random_corpus`` factory: ``random_corpus(root, {"train": (docs, length)}, vocab=..., ...)``."""
    return write_random_corpus


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
def text_data(tmp_path_factory):
    """40 BBC articles prepared with sentencepiece (vocabulary 400; 4 valid, 2 test articles): the data directory,
    tokenizer included, as a user's ``prepare`` leaves it."""
    root = tmp_path_factory.mktemp("text_data")
    inputs = root / "in"
    inputs.mkdir()
    for i, doc in enumerate(itertools.islice(bbc_news(), 40)):
        (inputs / f"{i:03d}.txt").write_text(doc.text)
    prepare(root / "data", inputs=[inputs], settings=MergeSettings(vocab_size=400, valid="4", test="2"), workers=1,
            progress="off")
    return root / "data"


@pytest.fixture(scope="session")
def text_run(text_data, tmp_path_factory):
    """A run trained for 20 steps on ``text_data``: (data dir, run dir)."""
    run = tmp_path_factory.mktemp("text_run") / "run"
    train(Config.from_dict(text_run_config(text_data, run)))
    return text_data, run


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs of several seconds or more (make test-fast skips them)")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped with the reason without one; "
                                       "scripts/gpu_check.sh runs them)")


HF_TEXTS = ["The minister said the plan would work.\nShares rose.", "Shares in the company fell 5% on Monday.",
            "The government said no to the plan."]


def make_hf_tokenizer(directory, vocab_size=300, specials=("<|endoftext|>",), config=None):
    """A byte-level BPE (the `tokenizers` library) trained on HF_TEXTS, saved as directory/tokenizer.json
    (+ tokenizer_config.json from ``config``): a pretrained model's tokenizer without a download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(HF_TEXTS * 20, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    if config:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def assert_causal(model, idx, vocab_size, position=7):
    """Changing token ``position`` of ``idx`` (B, T) leaves ``model``'s logits before it unchanged and changes
    those from it on."""
    import torch

    changed = idx.clone()
    changed[:, position] = (changed[:, position] + 1) % vocab_size
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :position], b[:, :position], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, position:], b[:, position:])
