"""pkmlm.progress: plain lines for log files, a bar on terminals."""

import io

import pytest

from pkmlm.progress import Progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    with Progress("moses", total=4e6, unit="B", every=0.0, file=out) as bar:
        bar.update(1e6, docs=10)
        bar.update(1e6, docs=20)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in out.getvalue()
    assert lines[0].startswith("[moses] 1.0/4.0 MB (25%), ") and "MB/s" in lines[0]
    assert "elapsed" in lines[0] and "ETA" in lines[0] and lines[0].endswith("docs=10")
    assert lines[-1].startswith("[moses] 2.0/4.0 MB (50%)") and lines[-1].endswith("docs=20 (done)")
    assert "ETA" not in lines[-1]


def test_lines_are_rate_limited_and_total_is_optional():
    out = io.StringIO()
    bar = Progress("train", unit="step", every=3600.0, file=out)
    for _ in range(100):
        bar.update(1, loss=3.25)
    assert out.getvalue() == ""  # nothing before `every` seconds
    bar.close()
    assert out.getvalue().startswith("[train] 100 steps, ") and "loss=3.25 (done)" in out.getvalue()


def test_bar_on_a_terminal_and_modes(monkeypatch):
    out = Terminal()
    with Progress("encode", total=10, unit="doc", file=out) as bar:
        bar.update(10)
    assert "\r" in out.getvalue() and "encode" in out.getvalue()
    monkeypatch.setenv("PKMLM_PROGRESS", "lines")
    out = Terminal()
    with Progress("encode", total=10, unit="doc", every=0.0, file=out) as bar:
        bar.update(5)
    assert out.getvalue().startswith("[encode] 5/10 docs (50%)")
    out = io.StringIO()
    with Progress("x", mode="off", file=out) as bar:
        bar.update(5)
    assert out.getvalue() == ""
    with pytest.raises(ValueError, match="progress mode"):
        Progress("x", mode="loud")
