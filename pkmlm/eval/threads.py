"""How many CPU threads a small, repeated forward should use, measured rather than guessed.

One-token decoding steps are tiny: splitting them over every core costs more in wake-ups and barriers than
it saves, and on a machine shared with other jobs torch's default (all cores) collapses. The best count
depends on the CPU, the model and the load at the time, so `ThreadTuner` times the first steps with each
candidate count in turn (round-robin, so a change of load hits every candidate alike) and keeps the
fastest. Prompt encoding and other large forwards keep torch's default.

    tuner = ThreadTuner()                       # candidates 1, 2, 4, ... up to torch.get_num_threads()
    for step in ...:
        with tuner.step():
            logits = model(token, cache)
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


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` inside the block, restored after it."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != before:
            torch.set_num_threads(before)


class ThreadTuner:
    """Picks the thread count of repeated small forwards by timing ``trials`` steps at each candidate.

    threads: a fixed count (no measuring), or 0 to measure. The median of each candidate's trials decides
    (one slow step, e.g. a page fault, does not); ties go to fewer threads.
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

    @contextmanager
    def step(self) -> Iterator[None]:
        """Run one step with the chosen count, or with the next candidate while measuring."""
        if self.chosen is not None:
            with torch_threads(self.chosen):
                yield
            return
        n = self.candidates[self._next % len(self.candidates)]
        self._next += 1
        with torch_threads(n):
            start = self.clock()
            yield
            self.times[n].append(self.clock() - start)
        if all(len(t) >= self.trials for t in self.times.values()):
            self.chosen = min(self.candidates, key=lambda c: (statistics.median(self.times[c]), c))
