"""Run output on rank 0: progress, messages, TensorBoard scalars, histograms and text. Other ranks stay silent.

Progress is a tqdm bar on a terminal; off a terminal (a Slurm --output file, nohup, CI) it is one plain line
per logged step, because a carriage-return bar turns a whole run into one multi-kilobyte log line.
"""

from __future__ import annotations

import math
import os
import sys
import time

from torch import Tensor
from tqdm import tqdm


class RunLogger:
    """Progress bar over optimizer steps plus TensorBoard scalars in ``OUT_DIR/tensorboard``.

    With ``enabled=False`` (ranks other than 0) every method is a no-op, so callers need no rank checks.
    """

    def __init__(self, out_dir: str | os.PathLike, *, enabled: bool, total_steps: int, initial_step: int = 0,
                 plain: bool | None = None):
        """plain: progress as plain lines instead of a bar (default: when stderr is not a terminal)."""
        self.enabled = enabled
        self.plain = (not sys.stderr.isatty()) if plain is None else plain
        self.total, self.done, self.first = total_steps, initial_step, initial_step
        self.start = time.perf_counter()
        self.bar = tqdm(total=total_steps, initial=initial_step, disable=not enabled or self.plain, unit="step",
                        dynamic_ncols=True, file=sys.stderr)
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # imported here: slow, and rank 0 only

            # purge_step drops events a preempted run logged after its last checkpoint, so curves stay single.
            self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=initial_step or None)

    def step(self, **postfix: float) -> None:
        """Count one optimizer step; with ``postfix`` (loss, ppl, lr, tok/s: a logged step) show it on the bar,
        or off a terminal print it as one line with elapsed time and ETA."""
        if not self.enabled:
            return
        self.done += 1
        if not self.plain:
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self.bar.update(1)
        elif postfix:
            elapsed = time.perf_counter() - self.start
            rate = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else math.inf
            fields = " | ".join(f"{k} {v:.4g}" for k, v in postfix.items())
            print(f"step {self.done}/{self.total} | {fields} | elapsed {format_duration(elapsed)} | "
                  f"ETA {format_duration(eta)}", file=sys.stderr, flush=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def histograms(self, step: int, values: dict[str, Tensor]) -> None:
        """One TensorBoard histogram per tag of the tensor's values (e.g. read counts of every slot)."""
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_histogram(tag, value.detach().float().cpu(), step)

    def texts(self, step: int, values: dict[str, str]) -> None:
        """TensorBoard text, shown verbatim (TensorBoard renders markdown: each line is indented as code)."""
        if self.writer is not None:
            for tag, text in values.items():
                self.writer.add_text(tag, "\n".join("    " + line for line in text.split("\n")), step)

    def message(self, text: str) -> None:
        """A line above the progress bar (a plain line off a terminal)."""
        if self.enabled:
            if self.plain:
                print(text, file=sys.stderr, flush=True)
            else:
                self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()


def format_duration(seconds: float) -> str:
    """4213.2 -> '1h10m13s', 62 -> '1m02s', 5.3 -> '5s'; '?' when unknown (inf/nan)."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"
