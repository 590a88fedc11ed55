"""The command lines' one error path: bad input becomes one line on stderr and exit status 2.

Every command line (train.py, evaluate.py, generate.py, `python -m pkmlm.inspect`, `python -m
pkmlm.data.prepare`) runs its body through `run`. Every error class of the project that means "the input, the
config, the data, a checkpoint or the environment is wrong" derives from `UserError` (ConfigError, DataError,
CheckpointError, KernelsError, DistributedError, ...; tests/test_cli.py checks that none is missing), so a new
error class is reported the same way in every command without touching them. Anything else is a bug and keeps
its traceback.

This module imports nothing of pkmlm (level 0 in tests/test_architecture.py): the error classes of every level
derive from `UserError`, and `python -m pkmlm.data.prepare` (level 2) uses `run` too.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

USAGE_EXIT_CODE = 2  # bad input: one line on stderr, as argparse does for bad flags


class UserError(Exception):
    """Bad input, config, data, checkpoint or environment: reported as one `error:` line, exit status 2."""


def one_line(error: BaseException) -> str:
    """The first non-empty line of ``error``'s message (its class name when it has none)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def run(body: Callable[[], int | None]) -> int:
    """Call ``body()``; return its exit status (None: 0), or print a `UserError` as one line and return 2."""
    try:
        return body() or 0
    except UserError as e:
        # One write of the whole line: ranks of a torchrun job share stderr, and print's separate write of the
        # newline let two ranks' errors run into one line.
        sys.stderr.write(f"error: {one_line(e)}\n")
        sys.stderr.flush()
        return USAGE_EXIT_CODE


def utf8_text(data: bytes, source: str) -> str:
    """``data`` decoded as UTF-8, or a `UserError` naming ``source`` and the first bad byte's offset.

    Text a user gives (a prompt on stdin, --text, a file) goes to a tokenizer only through this, so an invalid
    byte is one clear line instead of an error from inside the tokenizer.
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{source} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}): "
                        "convert it to UTF-8 first, e.g. with iconv") from None


def check_text(text: str, source: str) -> str:
    """``text`` when it holds no lone surrogates (what Python makes of invalid bytes in argv), else a
    `UserError` as for `utf8_text`."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start].encode("utf-8", "surrogateescape")
        raise UserError(f"{source} is not valid UTF-8 (byte 0x{bad[0]:02x} at character {e.start}): "
                        "convert it to UTF-8 first, e.g. with iconv") from None
    return text


# ---- paths a user gives: the right kind, or one line saying what is wrong ------------------------------------

def check_file(path, what: str) -> Path:
    """``path`` as a Path when it is an existing file; else a `UserError` naming ``what`` (e.g. "--config")."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory, not a file: give the file's path")
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist: give the path of an existing file")
    return path


def check_dir(path, what: str) -> Path:
    """``path`` as a Path when it is an existing directory; else a `UserError` naming ``what``."""
    path = Path(path)
    if path.is_file():
        raise UserError(f"{what} {path} is a file, not a directory: give the directory's path")
    if not path.is_dir():
        raise UserError(f"{what} {path} does not exist: give the path of an existing directory")
    return path


def check_output_file(path, what: str) -> Path:
    """``path`` as a Path when a file may be written there (it is not a directory, no parent is a file)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory: give a file name, e.g. {path / ('out' + (path.suffix or ''))}")
    blocker = file_in_the_way(path.parent)
    if blocker is not None:
        raise UserError(f"{what} {path}: {blocker} is a file, not a directory: give another path")
    return path


def check_output_dir(path, what: str) -> Path:
    """``path`` as a Path when it is a directory or can be one (neither it nor a parent is a file)."""
    path = Path(path)
    blocker = file_in_the_way(path)
    if blocker == path:
        raise UserError(f"{what} {path} is a file, not a directory: give a directory path")
    if blocker is not None:
        raise UserError(f"{what} {path}: {blocker} is a file, not a directory: give another path")
    return path


def file_in_the_way(directory) -> Path | None:
    """The file at ``directory`` or at one of its parents, where a directory is expected; None if none is."""
    for p in (Path(directory), *Path(directory).parents):
        if p.exists():
            return None if p.is_dir() else p
    return None
