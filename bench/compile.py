"""Training speed eager vs torch.compile (train.compile): tokens/s of full training steps, and the compile time.

    python bench/compile.py [--configs configs/tiny_pkm.yaml configs/12L_pkm.yaml] [--steps 10] [--rounds 3]

Per config: the model at the config's size (dropout as configured, vocabulary 8,000), its optimizers
(Adam + RowAdam, as train.py builds them), and random token batches of the config's data.batch_size x bptt.
A training step is forward, cross-entropy, backward, optimizer step, zero_grad. The compiled model
(pkmlm.memory.compile_model, as train.compile does) is compiled first: its first step (compile time) is
timed apart. Then `--rounds` rounds alternate eager and compiled, `--steps` steps each, so a change in the
machine's load hits both alike; tokens/s is each mode's total tokens / total time. Prints the command, the
load average before and after, and one markdown row per config.
"""

from __future__ import annotations

import argparse
import copy
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


def make_step(model, forward, config):
    t = config.train
    optim = make_optimizers(model, lr=t.lr, value_lr=t.value_lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    gen = torch.Generator().manual_seed(0)
    batch, bptt = config.data.batch_size, config.data.bptt

    def step():
        x = torch.randint(0, VOCAB, (batch, bptt + 1), generator=gen)
        loss = F.cross_entropy(forward(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        optim.step(scaler)
        optim.zero_grad()

    return step


def timed(fn, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return time.perf_counter() - start


def bench(path: str, steps: int, rounds: int) -> str:
    config = load_config(path)
    torch.manual_seed(0)
    eager = TransformerLM(config, VOCAB)
    compiled = copy.deepcopy(eager)
    eager.train(), compiled.train()
    run_eager = make_step(eager, eager, config)
    run_compiled = make_step(compiled, compile_model(compiled), config)
    compile_s = timed(run_compiled, 1)  # traces, compiles forward and backward
    compile_s += timed(run_compiled, 1)  # a possible recompile (e.g. optimizer state now present)
    run_eager()  # warm-up
    seconds = {"eager": 0.0, "compiled": 0.0}
    for _ in range(rounds):
        seconds["eager"] += timed(run_eager, steps)
        seconds["compiled"] += timed(run_compiled, steps)
    tokens = rounds * steps * config.data.batch_size * config.data.bptt
    eager_tps, compiled_tps = tokens / seconds["eager"], tokens / seconds["compiled"]
    return (f"| {os.path.basename(path)} | {config.data.batch_size}x{config.data.bptt} | {eager_tps:,.0f} | "
            f"{compiled_tps:,.0f} | {compiled_tps / eager_tps:.2f}x | {compile_s:.0f} s |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["configs/tiny_pkm.yaml"])
    parser.add_argument("--steps", type=int, default=10, help="steps per mode per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    retain_freed_memory()
    print("command: python " + " ".join(shlex.quote(a) for a in sys.argv))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, compiled CPU kernels: "
          f"{'yes' if kernels_available() else 'no'}, load average before: {os.getloadavg()[0]:.2f}")
    print("| config | batch | eager tokens/s | compiled tokens/s | speed-up | compile time |")
    print("|---|---|---|---|---|---|")
    for path in args.configs:
        print(bench(path, args.steps, args.rounds), flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
