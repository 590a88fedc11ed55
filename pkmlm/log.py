"""Run output on rank 0: a tqdm progress bar, messages, TensorBoard scalars, histograms and text. Other ranks
stay silent."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm


class RunLogger:
    """Progress bar over optimizer steps plus TensorBoard scalars in ``OUT_DIR/tensorboard``.

    With ``enabled=False`` (ranks other than 0) every method is a no-op, so callers need no rank checks.
    """

    def __init__(self, out_dir: str | os.PathLike, *, enabled: bool, total_steps: int, initial_step: int = 0):
        self.enabled = enabled
        self.bar = tqdm(total=total_steps, initial=initial_step, disable=not enabled, unit="step",
                        dynamic_ncols=True, file=sys.stderr)
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # imported here: slow, and rank 0 only

            # purge_step drops events a preempted run logged after its last checkpoint, so curves stay single.
            self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=initial_step or None)

    def step(self, **postfix: float) -> None:
        """Advance the bar by one optimizer step, showing ``postfix`` (loss, ppl, lr, tok/s)."""
        if self.enabled:
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self.bar.update(1)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def histograms(self, step: int, values: dict[str, "torch.Tensor"]) -> None:
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
        """A line above the progress bar."""
        if self.enabled:
            self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()
