"""Progress of one long stage, readable on a terminal and in a log file.

On a terminal: a tqdm bar. Otherwise (Slurm --output file, nohup, CI): one plain line every `every`
seconds and a last one at `close()`, e.g.

    [moses] 120.5/300.0 MB (40%), 0.52 MB/s, 3m52s elapsed, ETA 5m46s, docs=51200

so progress survives in files that a carriage-return bar would turn into one unreadable line.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

from tqdm import tqdm

MODES = ("auto", "bar", "lines", "off")
_SCALE = {"B": (1e6, "MB"), "doc": (1.0, "docs"), "step": (1.0, "steps"), "task": (1.0, "tasks")}


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Counts work done in one stage. `unit`: "B" (shown as MB), "doc", "step", "task" or any noun.

    mode: "auto" (bar on a TTY, lines otherwise; env PKMLM_PROGRESS overrides), "bar", "lines",
    "off". `every`: seconds between plain lines. Use as a context manager or call `close()`.
    """

    def __init__(self, stage: str, *, total: float | None = None, unit: str = "B", mode: str = "auto",
                 every: float = 30.0, file: TextIO | None = None):
        if mode == "auto":
            mode = os.environ.get("PKMLM_PROGRESS", "auto")
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.file = file or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.file, "isatty", lambda: False)() else "lines"
        self.stage, self.total, self.unit, self.mode, self.every = stage, total, unit, mode, every
        self.done = 0.0
        self.stats: dict = {}
        self.start = self._last = time.monotonic()
        self._bar = None
        if mode == "bar":
            self._bar = tqdm(total=total, desc=stage, unit=unit, unit_scale=unit == "B",
                             dynamic_ncols=True, file=self.file)

    def update(self, n: float = 1, **stats) -> None:
        """Add `n` to the work done; `stats` (e.g. docs=51200, loss=3.2) are shown beside it."""
        self.set(self.done + n, **stats)

    def set(self, done: float, **stats) -> None:
        """Set the work done so far (for counts gathered from elsewhere, e.g. other processes)."""
        delta, self.done = done - self.done, done
        self.stats.update(stats)
        if self._bar is not None:
            if stats:
                self._bar.set_postfix(self._stats_text(), refresh=False)
            self._bar.update(delta)
        elif self.mode == "lines" and time.monotonic() - self._last >= self.every:
            self._print()

    def line(self, final: bool = False) -> str:
        """The plain progress line for the current state."""
        elapsed = time.monotonic() - self.start
        scale, name = _SCALE.get(self.unit, (1.0, self.unit))
        fmt = (lambda v: f"{v / scale:.1f}") if scale != 1.0 else (lambda v: f"{v:.0f}")
        parts = [f"{fmt(self.done)}/{fmt(self.total)} {name} ({100 * self.done / self.total:.0f}%)"
                 if self.total else f"{fmt(self.done)} {name}"]
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts.append(f"{rate / scale:.2f} {name}/s" if scale != 1.0 else f"{rate:.1f} {name}/s")
        parts.append(f"{_duration(elapsed)} elapsed")
        if not final and self.total and rate > 0 and self.done < self.total:
            parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
        if self.stats:
            parts.append(self._stats_text())
        return f"[{self.stage}] " + ", ".join(parts) + (" (done)" if final else "")

    def _stats_text(self) -> str:
        return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in self.stats.items())

    def _print(self, final: bool = False) -> None:
        print(self.line(final), file=self.file, flush=True)
        self._last = time.monotonic()

    def write(self, text: str) -> None:
        """A message line that does not break the bar."""
        if self._bar is not None:
            self._bar.write(text, file=self.file)
        elif self.mode != "off":
            print(text, file=self.file, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "lines":
            self._print(final=True)
        self.mode = "off"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
