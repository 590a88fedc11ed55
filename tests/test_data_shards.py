"""Binarized splits: round trip across shards, dtype choice, manifest and integrity errors."""

import json

import numpy as np
import pytest

from pkmlm.data import DataError
from pkmlm.data.shards import open_split, write_split

DOCS = [[5, 6, 7], [], [8, 9], [1, 2, 3, 4, 5, 6, 7]]
STREAM = [5, 6, 7, 0, 0, 8, 9, 0, 1, 2, 3, 4, 5, 6, 7, 0]  # each document followed by eos=0


def write(tmp_path, docs=DOCS, vocab_size=10, **kw):
    kw.setdefault("max_shard_tokens", 4)
    return write_split(tmp_path / "train", docs, vocab_size=vocab_size, vocab_hash="abc", eos_id=0, **kw)


def test_round_trip_across_shard_boundaries(tmp_path):
    manifest = write(tmp_path)
    assert [s["num_tokens"] for s in manifest["shards"]] == [4, 4, 4, 4]
    corpus = open_split(tmp_path / "train", expected_vocab_hash="abc", verify_checksums=True)
    assert (corpus.num_tokens, corpus.num_documents, corpus.dtype) == (16, 4, np.uint16)
    assert corpus.read(0, 16).tolist() == STREAM
    for start in range(16):
        for length in range(17 - start):
            assert corpus.read(start, length).tolist() == STREAM[start:start + length]
    with pytest.raises(IndexError):
        corpus.read(10, 7)


def test_uint32_for_large_vocabularies(tmp_path):
    write(tmp_path, docs=[[70_000, 1], [65_535]], vocab_size=70_001)
    corpus = open_split(tmp_path / "train")
    assert corpus.dtype == np.uint32
    assert corpus.read(0, 5).tolist() == [70_000, 1, 0, 65_535, 0]
    write(tmp_path, docs=[[65_535]], vocab_size=65_536)
    assert open_split(tmp_path / "train").dtype == np.uint16


def test_rejects_ids_outside_vocabulary_and_keeps_old_split(tmp_path):
    write(tmp_path)
    with pytest.raises(DataError, match="outside"):
        write(tmp_path, docs=[[1, 2], [3, 10]])
    assert open_split(tmp_path / "train").read(0, 16).tolist() == STREAM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]  # no temporary left behind


def test_vocab_hash_mismatch(tmp_path):
    write(tmp_path)
    with pytest.raises(DataError, match="vocabulary hash"):
        open_split(tmp_path / "train", expected_vocab_hash="other")


def test_truncated_missing_and_corrupted_shards(tmp_path):
    write(tmp_path)
    shard = tmp_path / "train" / "shard_00001.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(DataError, match="shard_00001.bin is 6 bytes.*truncated"):
        open_split(tmp_path / "train")
    shard.unlink()
    with pytest.raises(DataError, match="missing"):
        open_split(tmp_path / "train")
    shard.write_bytes(data[::-1])  # right size, wrong content: only checksums catch it
    open_split(tmp_path / "train")
    with pytest.raises(DataError, match="sha256"):
        open_split(tmp_path / "train", verify_checksums=True)


def test_missing_or_bad_manifest(tmp_path):
    with pytest.raises(DataError, match="prepare the data"):
        open_split(tmp_path / "train")
    write(tmp_path)
    path = tmp_path / "train" / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["newline_id"] is None and manifest["format"] == 2
    path.write_text(json.dumps({**manifest, "format": 1}))
    with pytest.raises(DataError, match="format 1, written by an older pkmlm.*prepare the data again"):
        open_split(tmp_path / "train")
    path.write_text(json.dumps({**manifest, "format": 99}))
    with pytest.raises(DataError, match="format 99"):
        open_split(tmp_path / "train")
    path.write_text("{not json")
    with pytest.raises(DataError, match="not a readable manifest"):
        open_split(tmp_path / "train")
