"""Sampling speed on the CPU: one-token steps with 1 thread, torch's default, and the measured choice.

    python bench/sampling.py                                   # tiny_pkm fp32 and 12L_pkm bf16, 1 and 4 samples
    python bench/sampling.py --configs configs/tiny_pkm.yaml --samples 1 --rounds 5

Models are built from their configs with random weights (speed does not depend on training) and a
16,000-token vocabulary; every sample runs to --new-tokens (no end-of-document stop). Each round runs the
three thread settings one after another, so load changes hit all three alike; the table gives the median
tokens/s over the rounds and the count the measured setting chose each round. Prints the command, torch's
default thread count and the 1-minute load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from pkmlm.config import load_config
from pkmlm.eval.sampling import generate
from pkmlm.eval.threads import ThreadTuner
from pkmlm.memory.kernels import available as load_kernels, retain_freed_memory
from pkmlm.models.transformer import TransformerLM

VOCAB = 16_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["configs/tiny_pkm.yaml", "configs/12L_pkm.yaml"])
    parser.add_argument("--precisions", nargs="+", default=None,
                        help="one per config (default: fp32 for tiny configs, bf16 for the others)")
    parser.add_argument("--samples", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    precisions = args.precisions or ["fp32" if "tiny" in c else "bf16" for c in args.configs]
    default = torch.get_num_threads()
    print(f"$ python {' '.join(sys.argv)}")
    print(f"torch {torch.__version__}, default {default} threads, {os.cpu_count()} CPUs, "
          f"1-min load {os.getloadavg()[0]:.2f}, compiled kernels: {load_kernels()}")
    print("\n| config | precision | samples | 1 thread tok/s | default tok/s | measured tok/s | measured chose |")
    print("|---|---|---:|---:|---:|---:|---|")
    for path, precision in zip(args.configs, precisions):
        config = load_config(path, [])
        torch.manual_seed(0)
        model = TransformerLM(config, VOCAB).eval()
        window = config.data.bptt
        prompt = torch.randint(3, VOCAB, (args.prompt_tokens,)).tolist()
        for n in args.samples:
            speeds = {"1": [], "default": [], "measured": []}
            chose = []
            for _ in range(args.rounds):
                for name, threads in (("1", 1), ("default", default), ("measured", 0)):
                    tuner = ThreadTuner(threads)
                    start = time.perf_counter()
                    out = generate(model, prompt, max_new_tokens=args.new_tokens, window=window,
                                   seeds=list(range(n)), precision=precision, threads=tuner)
                    speeds[name].append(sum(map(len, out)) / (time.perf_counter() - start))
                    if name == "measured":
                        chose.append(tuner.chosen)
            med = {k: statistics.median(v) for k, v in speeds.items()}
            print(f"| {os.path.basename(path)} | {precision} | {n} | {med['1']:.1f} | {med['default']:.1f} | "
                  f"{med['measured']:.1f} | {', '.join(map(str, chose))} |", flush=True)


if __name__ == "__main__":
    retain_freed_memory()
    main()
