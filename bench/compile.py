"""Training speed eager vs torch.compile (train.compile): tokens/s of full training steps, and the compile time.

    python bench/compile.py [--configs configs/tiny_pkm.yaml configs/12L_pkm.yaml] [--steps 10] [--rounds 3]
                            [--batch-size B] [--bptt T]

Per config: the model at the config's size (dropout as configured, vocabulary 8,000, float32), its optimizers
(Adam + RowAdam, as train.py builds them), and random token batches of the config's data.batch_size x bptt, or
--batch-size x --bptt (12L_pkm's 2048 x 256 takes minutes a step on a small CPU).
A training step is forward, cross-entropy, backward, optimizer step, zero_grad. The compiled model
(pkmlm.memory.compile_model, as train.compile does; the same parameters and optimizers as the eager one) is
compiled first, with inductor's caches off (a cold compile, every graph traced): its first two steps (compile
time) are timed apart. Then `--rounds` rounds alternate eager and compiled, `--steps` steps each, so a change
in the machine's load hits both alike; tokens/s is each mode's total tokens / total time. Prints the command, the
load average before and after, and one markdown row per config.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import torch
import torch.nn.functional as F

from pkmlm.config import load_config
from pkmlm.memory import compile_model
from pkmlm.memory.kernels import available as kernels_available, retain_freed_memory
from pkmlm.models.transformer import TransformerLM
from pkmlm.training.optim import make_optimizers

VOCAB = 8000


def make_step(model, config, batch: int, bptt: int):
    """step(forward): one training step of `model` through `forward` (the model itself, or its compiled version:
    the same parameters and optimizers, so that a 12L_pkm model is held once)."""
    t = config.train
    optim = make_optimizers(model, lr=t.lr, value_lr=t.value_lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    gen = torch.Generator().manual_seed(0)

    def step(forward):
        x = torch.randint(0, VOCAB, (batch, bptt + 1), generator=gen)
        loss = F.cross_entropy(forward(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        optim.step(scaler)
        optim.zero_grad()

    return step


def timed(fn, forward, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn(forward)
    return time.perf_counter() - start


def bench(path: str, steps: int, rounds: int, batch: int | None = None, bptt: int | None = None) -> str:
    config = load_config(path)
    batch, bptt = batch or config.data.batch_size, bptt or config.data.bptt
    if bptt > config.model.max_seq_len:
        raise SystemExit(f"compile.py: --bptt {bptt} exceeds {path}'s model.max_seq_len={config.model.max_seq_len}")
    torch.manual_seed(0)
    model = TransformerLM(config, VOCAB).train()
    step = make_step(model, config, batch, bptt)
    compiled = compile_model(model)
    compile_s = timed(step, compiled, 1)  # traces, compiles forward and backward
    compile_s += timed(step, compiled, 1)  # a possible recompile (e.g. optimizer state now present)
    step(model)  # warm-up
    seconds = {"eager": 0.0, "compiled": 0.0}
    for _ in range(rounds):
        seconds["eager"] += timed(step, model, steps)
        seconds["compiled"] += timed(step, compiled, steps)
    tokens = rounds * steps * batch * bptt
    eager_tps, compiled_tps = tokens / seconds["eager"], tokens / seconds["compiled"]
    return (f"| {os.path.basename(path)} | {batch}x{bptt} | {eager_tps:,.0f} | "
            f"{compiled_tps:,.0f} | {compiled_tps / eager_tps:.2f}x | {compile_s:.0f} s |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["configs/tiny_pkm.yaml"])
    parser.add_argument("--steps", type=int, default=10, help="steps per mode per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: the config's)")
    parser.add_argument("--bptt", type=int, default=None, help="tokens per sequence (default: the config's)")
    args = parser.parse_args(argv)
    for name in ("steps", "rounds", "batch_size", "bptt"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    retain_freed_memory()
    torch.compiler.config.force_disable_caches = True  # compile time = a cold compile
    print("command: python " + " ".join(shlex.quote(a) for a in sys.argv))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, compiled CPU kernels: "
          f"{'yes' if kernels_available() else 'no'}, load average before: {os.getloadavg()[0]:.2f}")
    print("| config | batch | eager tokens/s | compiled tokens/s | speed-up | compile time |")
    print("|---|---|---|---|---|---|")
    for path in args.configs:
        print(bench(path, args.steps, args.rounds, args.batch_size, args.bptt), flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
