"""How many CPU threads a small, repeated forward should use, measured rather than guessed.

One-token decoding steps are tiny: splitting them over every core costs more in wake-ups and barriers than
it saves, and on a machine shared with other jobs torch's default (all cores) collapses. The best count
depends on the CPU, the model and the load at the time, so `ThreadTuner` times the first steps with each
candidate count in turn and keeps the fastest. Changing torch's thread count costs time itself, so each
candidate runs a block of consecutive steps (the first, just after the switch, untimed) and the chosen count
is set once and kept until `restore()`. Prompt encoding and other large forwards keep torch's default.

    tuner = ThreadTuner()                       # candidates 1, 2, 4, ... up to torch.get_num_threads()
    try:
        for step in ...:
            with tuner.step():
                logits = model(token, cache)
    finally:
        tuner.restore()                         # torch's own count again
    tuner.chosen                                # the count it settled on (None while still measuring)
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch


def candidate_counts(most: int) -> list[int]:
    """1, 2, 4, ... below ``most``, then ``most`` itself: [1] for one thread."""
    counts, n = [], 1
    while n < most:
        counts.append(n)
        n *= 2
    return counts + [max(1, most)]


class ThreadTuner:
    """Picks the thread count of repeated small forwards by timing ``trials`` steps at each candidate.

    threads: a fixed count (no measuring), or 0 to measure. Each candidate runs ``trials`` + 1 consecutive
    steps, the first untimed (the switch's own cost); the median of the timed ones decides (one slow step,
    e.g. a page fault, does not); ties go to fewer threads.
    """

    def __init__(self, threads: int = 0, *, trials: int = 3, most: int | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        if threads < 0:
            raise ValueError(f"threads must be >= 0 (0: measure), got {threads}")
        self.candidates = candidate_counts(most or torch.get_num_threads())
        self.trials, self.clock = trials, clock
        self.chosen: int | None = threads or (self.candidates[0] if len(self.candidates) == 1 else None)
        self.times: dict[int, list[float]] = {n: [] for n in self.candidates}
        self._next = 0
        self._saved: int | None = None  # torch's count before the first change

    @contextmanager
    def step(self) -> Iterator[None]:
        """Run one step with the chosen count, or with the candidate being measured."""
        if self.chosen is not None:
            self._use(self.chosen)
            yield
            return
        block = self.trials + 1
        n, timed = self.candidates[self._next // block], self._next % block != 0
        self._next += 1
        self._use(n)
        if timed:
            start = self.clock()
            yield
            self.times[n].append(self.clock() - start)
        else:
            yield
        if self._next == block * len(self.candidates):
            self.chosen = min(self.candidates, key=lambda c: (statistics.median(self.times[c]), c))
            self._use(self.chosen)

    def restore(self) -> None:
        """torch's thread count as it was before the first step."""
        if self._saved is not None:
            torch.set_num_threads(self._saved)
            self._saved = None

    def _use(self, n: int) -> None:
        current = torch.get_num_threads()
        if n != current:
            if self._saved is None:
                self._saved = current
            torch.set_num_threads(n)
