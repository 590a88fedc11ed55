"""Fixtures shared by the test files, and the `slow` marker (`make test-fast` skips those tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pkmlm.data.shards import write_split


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


@pytest.fixture(scope="session")
def random_corpus():
    """The ``write_random_corpus`` factory: ``random_corpus(root, {"train": (docs, length)}, vocab=..., ...)``."""
    return write_random_corpus


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs of several seconds or more (make test-fast skips them)")
