"""Binarized token splits: flat `.bin` arrays readable with `numpy.memmap`, plus a manifest.

A split directory holds `manifest.json` and `shard_00000.bin`, `shard_00001.bin`, ... Documents are
stored one after another, each followed by `eos_id`, so the split is one contiguous token stream;
line breaks inside a document are `newline_id` tokens (format 2; format 1 had none).
Writing goes to a temporary directory that replaces the split only once every shard and the
manifest are on disk: an interrupted run never leaves a split that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from pkmlm.cli import file_in_the_way
from pkmlm.data import DataError

FORMAT = 2  # 2: documents keep their line breaks (newline_id); 1: lines were run together
MANIFEST = "manifest.json"
DEFAULT_MAX_SHARD_TOKENS = 1 << 26  # 128 MiB per shard at uint16: few files, none too large to copy


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits in 16 bits, else uint32 (halves disk and page-cache use)."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class _ShardWriter:
    """Appends token arrays to numbered shards of at most `max_tokens`, hashing as it goes."""

    def __init__(self, directory: Path, dtype: np.dtype, max_tokens: int):
        self.directory, self.dtype, self.max_tokens = directory, dtype, max_tokens
        self.shards: list[dict] = []
        self._file = None

    def _open_next(self) -> None:
        self._close()
        name = f"shard_{len(self.shards):05d}.bin"
        self._file = open(self.directory / name, "wb")
        self._sha = hashlib.sha256()
        self.shards.append({"file": name, "num_tokens": 0, "sha256": ""})

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._file is None or self.shards[-1]["num_tokens"] == self.max_tokens:
                self._open_next()
            room = self.max_tokens - self.shards[-1]["num_tokens"]
            chunk, tokens = tokens[:room], tokens[room:]
            data = chunk.tobytes()
            self._file.write(data)
            self._sha.update(data)
            self.shards[-1]["num_tokens"] += len(chunk)

    def _close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            self.shards[-1]["sha256"] = self._sha.hexdigest()

    def close(self) -> list[dict]:
        self._close()
        return self.shards


def write_split(split_dir, documents: Iterable[Sequence[int]], *, vocab_size: int, vocab_hash: str,
                eos_id: int, newline_id: int | None = None,
                max_shard_tokens: int = DEFAULT_MAX_SHARD_TOKENS) -> dict:
    """Write `documents` (each a sequence of token ids, eos not included) as a binarized split.

    Each document is followed by `eos_id`; `newline_id` (the tokenizer's line-break id, None when the
    ids have none) is recorded. Streams: only one document is in memory at a time.
    Replaces an existing split atomically. Returns the manifest that was written.
    """
    if vocab_size < 1:
        raise DataError(f"vocab_size must be positive, got {vocab_size}")
    if not 0 <= eos_id < vocab_size:
        raise DataError(f"eos_id {eos_id} is outside the vocabulary [0, {vocab_size})")
    if max_shard_tokens < 1:
        raise DataError(f"max_shard_tokens must be positive, got {max_shard_tokens}")
    split_dir = Path(split_dir)
    split_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = split_dir.with_name(f".{split_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    dtype = token_dtype(vocab_size)
    try:
        writer = _ShardWriter(tmp, dtype, max_shard_tokens)
        num_documents = 0
        for doc in documents:
            ids = np.asarray(doc, dtype=np.int64)
            if ids.ndim != 1:
                raise DataError(f"document {num_documents} is not a flat sequence of token ids")
            if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
                raise DataError(f"document {num_documents} has token ids outside [0, {vocab_size})")
            writer.write(np.append(ids, eos_id).astype(dtype))
            num_documents += 1
        shards = writer.close()
        manifest = {"format": FORMAT, "dtype": dtype.name, "vocab_size": vocab_size,
                    "vocab_hash": vocab_hash, "eos_id": eos_id, "newline_id": newline_id,
                    "num_tokens": sum(s["num_tokens"] for s in shards),
                    "num_documents": num_documents, "shards": shards}
        _fsync_write(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        # Swap in the finished split; the old one (if any) is removed only after the rename.
        old = split_dir.with_name(f".{split_dir.name}.old-{os.getpid()}")
        if split_dir.exists():
            os.replace(split_dir, old)
        os.replace(tmp, split_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            sha.update(block)
    return sha.hexdigest()


class TokenCorpus:
    """One split as a single token stream over memory-mapped shards; nothing is read up front.

    Every `read` checks the ids it returns against `vocab_size` (one max over tokens it has just copied:
    far cheaper than scanning whole shards at start, and no id escapes it), so a corrupt or foreign shard
    is a DataError naming the file, never an index error (or a device-side assert) inside the model.
    """

    def __init__(self, split_dir: Path, manifest: dict):
        self.split_dir = split_dir
        self.vocab_size: int = manifest["vocab_size"]
        self.vocab_hash: str = manifest["vocab_hash"]
        self.eos_id: int = manifest["eos_id"]
        self.newline_id: int | None = manifest["newline_id"]
        self.num_tokens: int = manifest["num_tokens"]
        self.num_documents: int = manifest["num_documents"]
        self.dtype = np.dtype(manifest["dtype"])
        self._shards = [np.memmap(split_dir / s["file"], dtype=self.dtype, mode="r")
                        for s in manifest["shards"]]
        self._files = [split_dir / s["file"] for s in manifest["shards"]]
        # _starts[i] = position of shard i's first token in the stream.
        self._starts = np.cumsum([0] + [len(s) for s in self._shards])

    def check_ids(self, shard: int, tokens: np.ndarray | None = None, offset: int = 0) -> None:
        """DataError unless every id of ``tokens`` (default: the whole shard, read blockwise), found at
        ``offset`` in ``shard``, is < vocab_size."""
        if tokens is None:
            for start in range(0, len(self._shards[shard]), 1 << 24):
                self.check_ids(shard, self._shards[shard][start:start + (1 << 24)], start)
            return
        if len(tokens) and tokens.max() >= self.vocab_size:
            where = int(np.argmax(tokens >= self.vocab_size))
            raise DataError(f"{self._files[shard]}: token id {int(tokens[where])} at position {offset + where} "
                            f"is outside the vocabulary [0, {self.vocab_size}) (corrupt or foreign shard): "
                            f"prepare the split again")

    def __len__(self) -> int:
        return self.num_tokens

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream as int64 `(length,)`, across shard boundaries."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"read({start}, {length}) outside a split of {self.num_tokens} tokens")
        out = np.empty(length, dtype=np.int64)
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        done = 0
        while done < length:
            offset = start + done - self._starts[shard]
            chunk = self._shards[shard][offset:offset + length - done]
            out[done:done + len(chunk)] = chunk
            self.check_ids(shard, out[done:done + len(chunk)], offset)
            done += len(chunk)
            shard += 1
        return out


# What a manifest must hold, and of which type (bool is not an int here). Checked on every open.
MANIFEST_SCHEMA = {"format": int, "dtype": str, "vocab_size": int, "vocab_hash": str, "eos_id": int,
                   "num_tokens": int, "num_documents": int, "shards": list}
SHARD_SCHEMA = {"file": str, "num_tokens": int, "sha256": str}


def _check_fields(entry, schema: dict, where: str) -> None:
    if not isinstance(entry, dict):
        raise DataError(f"{where} must be a JSON object, got {type(entry).__name__}: prepare the data again")
    missing = [k for k in schema if k not in entry]
    if missing:
        raise DataError(f"{where} lacks {', '.join(missing)}: prepare the data again")
    for key, kind in schema.items():
        value = entry[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise DataError(f"{where}: '{key}' must be {_KIND_NAMES[kind]}, got {value!r}: prepare the data again")
        if kind is int and value < 0:
            raise DataError(f"{where}: '{key}' is negative ({value}): prepare the data again")


_KIND_NAMES = {int: "an integer", str: "a string", list: "a list"}


def _shard_file(split_dir: Path, name: str, where: str) -> Path:
    """The shard ``name`` as a file directly inside ``split_dir``; a manifest never names a path elsewhere."""
    plain = name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name
    file = Path(os.path.abspath(split_dir / name)) if plain else None
    if file is None or file.parent != Path(os.path.abspath(split_dir)):
        raise DataError(f"{where}: shard file {name!r} is not a plain file name inside {split_dir} "
                        f"(a manifest may not point elsewhere): prepare the data again")
    return file


def _check_manifest(manifest, path: Path) -> None:
    """Schema and value checks of a manifest read from ``path``; DataError naming the entry at fault."""
    if isinstance(manifest, dict) and isinstance(manifest.get("format"), int) and manifest["format"] < FORMAT:
        raise DataError(f"{path} has format {manifest['format']}, written by an older pkmlm whose "
                        f"documents lost their line breaks; this code reads format {FORMAT}: "
                        f"prepare the data again (python -m pkmlm.data.prepare --out {path.parent.parent} ...)")
    if isinstance(manifest, dict) and manifest.get("format") != FORMAT and "format" in manifest:
        raise DataError(f"{path} has format {manifest.get('format')!r}; this code reads format {FORMAT}: "
                        f"prepare the data again")
    _check_fields(manifest, MANIFEST_SCHEMA, str(path))
    vocab_size = manifest["vocab_size"]
    if vocab_size < 1:
        raise DataError(f"{path}: vocab_size is {vocab_size}: prepare the data again")
    if manifest["dtype"] != token_dtype(vocab_size).name:
        raise DataError(f"{path}: dtype {manifest['dtype']} does not match vocab_size "
                        f"{vocab_size}: prepare the data again")
    if not manifest["eos_id"] < vocab_size:
        raise DataError(f"{path}: eos_id {manifest['eos_id']} is outside the vocabulary [0, {vocab_size}): "
                        f"prepare the data again")
    newline = manifest.get("newline_id", "missing")
    if newline is not None and not (isinstance(newline, int) and not isinstance(newline, bool)
                                    and 0 <= newline < vocab_size):
        raise DataError(f"{path}: newline_id {newline!r} must be null or an id inside the vocabulary "
                        f"[0, {vocab_size}): prepare the data again")
    for i, shard in enumerate(manifest["shards"]):
        _check_fields(shard, SHARD_SCHEMA, f"{path}: shards[{i}]")


def open_split(split_dir, *, expected_vocab_hash: str | None = None,
               verify_checksums: bool = False, require_tokens: str | None = None) -> TokenCorpus:
    """Open a split written by `write_split`, checking its manifest, shard sizes and vocabulary.

    Checked here: the manifest's schema (keys and types), that shard files are plain names inside
    `split_dir`, `eos_id` inside the vocabulary, shard sizes. Token ids are checked against `vocab_size`
    by every read (see `TokenCorpus`).
    `expected_vocab_hash`: the model's vocabulary hash; a different one is an error (the ids would
    mean other tokens). `verify_checksums`: also hash every shard and check all its ids (reads the whole
    split once). `require_tokens`: what needs this split (e.g. "validation"); an empty split is then an error.
    """
    split_dir = Path(split_dir)
    path = split_dir / MANIFEST
    blocker = file_in_the_way(split_dir)
    if blocker is not None:
        raise DataError(f"{blocker} is a file, not a directory: give the prepared data directory "
                        f"(the --out of python -m pkmlm.data.prepare)")
    if not path.is_file():
        raise DataError(f"{path} not found: prepare the data first "
                        f"(python -m pkmlm.data.prepare --out {split_dir.parent} ...)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not a readable manifest ({e}): prepare the data again") from e
    _check_manifest(manifest, path)
    if expected_vocab_hash is not None and manifest["vocab_hash"] != expected_vocab_hash:
        raise DataError(f"{path}: vocabulary hash {manifest['vocab_hash']} differs from the model's "
                        f"{expected_vocab_hash}: the data was tokenized with another vocabulary; "
                        f"use the data directory the model was trained on, or re-prepare it")
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for i, shard in enumerate(manifest["shards"]):
        file = _shard_file(split_dir, shard["file"], f"{path}: shards[{i}]")
        expected = shard["num_tokens"] * itemsize
        size = file.stat().st_size if file.is_file() else None
        if size != expected:
            found = "missing" if size is None else f"{size} bytes"
            raise DataError(f"{file} is {found}, the manifest says {expected} bytes "
                            f"(truncated or incomplete copy): copy or prepare the split again")
        if verify_checksums and _sha256(file) != shard["sha256"]:
            raise DataError(f"{file}: sha256 differs from the manifest (corrupted): "
                            f"copy or prepare the split again")
    if sum(s["num_tokens"] for s in manifest["shards"]) != manifest["num_tokens"]:
        raise DataError(f"{path}: shard token counts do not add up to num_tokens: prepare again")
    if require_tokens and manifest["num_tokens"] == 0:
        raise DataError(f"{split_dir} holds no tokens, and {require_tokens} needs some: prepare the data "
                        f"with documents held out for it (e.g. --valid 0.05 --test 0.05)")
    corpus = TokenCorpus(split_dir, manifest)
    if verify_checksums:  # the shards were just read anyway: check every id now, not only when read
        for shard in range(len(manifest["shards"])):
            corpus.check_ids(shard)
    return corpus
