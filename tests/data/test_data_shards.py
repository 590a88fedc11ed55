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


def _edit_manifest(tmp_path, edit):
    path = tmp_path / "train" / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(vocab_size="10"), "'vocab_size' must be an integer, got '10'"),
    (lambda m: m.update(num_tokens=True), "'num_tokens' must be an integer, got True"),
    (lambda m: m.pop("vocab_hash"), "lacks vocab_hash"),
    (lambda m: m.update(shards={"file": "x"}), "'shards' must be a list"),
    (lambda m: m["shards"].__setitem__(1, "shard_00001.bin"), r"shards\[1\] must be a JSON object"),
    (lambda m: m["shards"][2].pop("sha256"), r"shards\[2\] lacks sha256"),
    (lambda m: m["shards"][0].update(num_tokens=-4), r"shards\[0\]: 'num_tokens' is negative"),
    (lambda m: m["shards"][0].update(file=7), r"shards\[0\]: 'file' must be a string"),
    (lambda m: m.update(eos_id=10), r"eos_id 10 is outside the vocabulary \[0, 10\)"),
    (lambda m: m.update(vocab_size=0, dtype="uint16"), "vocab_size is 0"),
    (lambda m: m.clear() or m.update(format=2), "lacks dtype, vocab_size"),
    (lambda m: m.update(format=1), "format 1, written by an older pkmlm"),
    (lambda m: m.update(newline_id=10), r"newline_id 10 must be null or an id inside the vocabulary"),
])
def test_manifest_schema_is_checked(tmp_path, edit, message):
    write(tmp_path)
    _edit_manifest(tmp_path, edit)
    with pytest.raises(DataError, match=message):
        open_split(tmp_path / "train")


def test_manifest_that_is_not_an_object(tmp_path):
    write(tmp_path)
    (tmp_path / "train" / "manifest.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="must be a JSON object, got list"):
        open_split(tmp_path / "train")


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/outside.bin", "sub/shard.bin", "..", ".", "",
                                  "..\\outside.bin"])
def test_shard_files_must_be_plain_names_inside_the_split(tmp_path, name):
    write(tmp_path)
    # A file of the right size outside the split: a manifest naming it must still be refused.
    (tmp_path / "outside.bin").write_bytes(b"\0\0" * 4)
    _edit_manifest(tmp_path, lambda m: m["shards"][0].update(file=name))
    with pytest.raises(DataError, match="not a plain file name inside"):
        open_split(tmp_path / "train")


def test_ids_outside_the_vocabulary_are_caught_on_read_and_by_verify(tmp_path):
    write(tmp_path)
    shard = tmp_path / "train" / "shard_00002.bin"
    bad = np.array([1, 2, 11, 3], dtype=np.uint16)  # 11 >= vocab_size 10
    shard.write_bytes(bad.tobytes())
    corpus = open_split(tmp_path / "train")  # sizes are right: opening is cheap and does not read the data
    assert corpus.read(0, 10).tolist() == STREAM[:10]  # shards 0-1 and the first ids of shard 2 are fine
    with pytest.raises(DataError, match=r"shard_00002.bin: token id 11 at position 2 is outside the vocabulary"):
        corpus.read(6, 6)
    _edit_manifest(tmp_path, lambda m: m["shards"][2].update(sha256=__import__("hashlib").sha256(
        bad.tobytes()).hexdigest()))
    with pytest.raises(DataError, match="shard_00002.bin: token id 11"):
        open_split(tmp_path / "train", verify_checksums=True)


def test_empty_split_is_refused_where_tokens_are_needed(tmp_path):
    write(tmp_path, docs=[])
    corpus = open_split(tmp_path / "train")
    assert corpus.num_tokens == 0
    with pytest.raises(DataError, match="holds no tokens, and validation needs some"):
        open_split(tmp_path / "train", require_tokens="validation")
