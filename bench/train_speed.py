"""Training speed of a config: tokens/s, peak GPU memory and seconds in the memory layers, eager and compiled.

    python bench/train_speed.py configs/12L_pkm.yaml --steps 100 [--warmup 10] [--compile off|on|both]
        [key.sub=value ...]           # e.g. data.batch_size=64 train.precision=bf16 train.device=cuda

The run trains on a synthetic corpus of random tokens (``--vocab`` ids, written once to a temporary folder):
speed does not depend on what the tokens say. Timing covers steps ``--warmup``+1 .. ``--steps`` (the first steps
allocate, autotune and compile); the memory layers' forward and backward are timed inside those steps with
hooks (CUDA events on a GPU), which the compiled mode cannot host, so there that column shows '-'. No checkpoint
is written (the trainer's save is patched out).
``--compile on|both`` needs the ``train.compile`` key (pkmlm.config.TrainConfig); without it the compiled row
is skipped with a message. Prints one markdown row per mode and the command that made them.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pkmlm.config import ConfigError, TrainConfig, load_config
from pkmlm.data.shards import write_split
from pkmlm.memory import ProductKeyMemory
from pkmlm.training import trainer as T


def synthetic_corpus(root: Path, vocab: int, tokens: int) -> Path:
    """train (``tokens`` random ids in 1000-token documents) and valid (20,000) splits under ``root``."""
    rng = np.random.default_rng(0)
    for split, count in (("train", tokens), ("valid", 20_000)):
        docs = (rng.integers(1, vocab, size=1000).tolist() for _ in range(max(1, count // 1000)))
        write_split(root / split, docs, vocab_size=vocab, vocab_hash=f"random-{vocab}", eos_id=0)
    return root


class StepClock:
    """Patches the trainer's step to time steps warmup+1 .. last, and hooks the memories to time their forward
    and backward during those steps (``memory_hooks``)."""

    def __init__(self, warmup: int, steps: int, device: torch.device, memory_hooks: bool):
        self.warmup, self.steps, self.device, self.memory_hooks = warmup, steps, device, memory_hooks
        self.start = self.end = None
        self.timing = False
        self.spans: list[tuple] = []  # (start, end) events or perf_counter pairs
        self.open: dict[int, object] = {}

    def _now(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def install(self):
        original = T.Trainer._train_step
        clock = self

        def step(trainer, ddp_model, stop_signal):
            if trainer.step == clock.warmup:
                if clock.memory_hooks and not clock.spans and not clock.open:
                    clock.hook(trainer.model)
                clock._sync()
                clock.start, clock.timing = time.perf_counter(), True
            out = original(trainer, ddp_model, stop_signal)
            if trainer.step == clock.steps:
                clock._sync()
                clock.end, clock.timing = time.perf_counter(), False
            return out

        T.Trainer._train_step = step
        return self

    def hook(self, model: torch.nn.Module) -> None:
        for module in model.modules():
            if isinstance(module, ProductKeyMemory):
                module.register_forward_pre_hook(lambda m, args: self._begin(("f", id(m))))
                module.register_forward_hook(lambda m, args, out: self._finish(("f", id(m))))
                module.register_full_backward_pre_hook(lambda m, grad: self._begin(("b", id(m))))
                module.register_full_backward_hook(lambda m, gi, go: self._finish(("b", id(m))))

    def _begin(self, key):
        if self.timing:
            self.open[key] = self._now()

    def _finish(self, key):
        if self.timing and key in self.open:
            self.spans.append((self.open.pop(key), self._now()))

    def memory_seconds(self) -> float:
        self._sync()
        if self.device.type == "cuda":
            return sum(a.elapsed_time(b) for a, b in self.spans) / 1000
        return sum(b - a for a, b in self.spans)


def run(config_path: str, overrides: list[str], *, data: Path, out: Path, steps: int, warmup: int,
        compiled: bool) -> dict:
    """Train ``steps`` steps; {"tokens_s", "peak_gib", "memory_s", "step_s", "first_s"}."""
    extra = [f"data.dir={data}", f"train.out_dir={out}", f"train.max_steps={steps}", "train.eval_every=1000000000",
             "train.checkpoint_every=1000000000", "train.eval_batches=1", f"train.log_every={max(1, steps // 4)}",
             "train.keep_checkpoints=1"] + (["train.compile=true"] if compiled else [])
    config = load_config(config_path, [*overrides, *extra])
    device = torch.device("cuda" if config.train.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    original, save = T.Trainer._train_step, T.Trainer._save
    clock = StepClock(warmup, steps, device, memory_hooks=not compiled).install()
    T.Trainer._save = lambda self, **kw: None  # a 12L_pkm checkpoint is ~4 GB of disk writes that nobody reads here
    began = time.perf_counter()
    try:
        T.train(config)
    finally:
        T.Trainer._train_step, T.Trainer._save = original, save
    seconds = clock.end - clock.start
    tokens = (steps - warmup) * config.data.batch_size * config.data.bptt
    return {"tokens_s": tokens / seconds, "step_s": seconds / (steps - warmup),
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "memory_s": None if compiled else clock.memory_seconds(), "timed_s": seconds,
            "first_s": clock.start - began}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="key.sub=value, as for train.py")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the timing")
    parser.add_argument("--compile", default="both", choices=("off", "on", "both"))
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary of the synthetic corpus")
    args = parser.parse_intermixed_args(argv)
    if not 0 <= args.warmup < args.steps:
        parser.error("--warmup must be in [0, --steps)")
    has_compile = "compile" in {f.name for f in dataclasses.fields(TrainConfig)}
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    print("command: python " + " ".join(shlex.quote(a) for a in sys.argv), flush=True)
    print("| config | mode | timed steps | tokens/step | tokens/s | ms/step | peak GPU GiB | memory layers s "
          "(share) | set-up + warm-up s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    with tempfile.TemporaryDirectory(prefix="pkmlm_speed_") as tmp:
        tmp = Path(tmp)
        try:
            probe = load_config(args.config, args.overrides)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        tokens = args.steps * probe.data.batch_size * (probe.data.bptt + 1) + 20_000
        data = synthetic_corpus(tmp / "data", args.vocab, min(tokens, 50_000_000))
        for compiled in modes:
            mode = "compiled" if compiled else "eager"
            if compiled and not has_compile:
                print(f"| {args.config} | compiled | - | - | - | - | - | - | - |  [skip] this pkmlm has no "
                      "train.compile", flush=True)
                continue
            r = run(args.config, args.overrides, data=data, out=tmp / mode, steps=args.steps, warmup=args.warmup,
                    compiled=compiled)
            peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
            memory = f"{r['memory_s']:.2f} ({r['memory_s'] / r['timed_s']:.0%})" if r["memory_s"] is not None \
                else "-"
            tokens_per_step = probe.data.batch_size * probe.data.bptt
            print(f"| {args.config} | {mode} | {args.steps - args.warmup} | {tokens_per_step:,} "
                  f"| {r['tokens_s']:,.0f} | {1000 * r['step_s']:.1f} | {peak} | {memory} | {r['first_s']:.1f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
