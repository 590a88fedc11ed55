"""Memories larger than RAM: a memory layer's training step with its value table in RAM or in
memory-mapped files (`memory.values_file`, pkmlm/memory/values_file.py).

    python bench/values_file.py --n-keys 1024                          # table and Adam state in RAM
    python bench/values_file.py --n-keys 2048 --values-file /disk/v    # in files there (deleted after)
    python bench/values_file.py --n-keys 2048 --values-file /disk/v --cache-gb 8 --checkpoint-every 5

Layer 1024 -> 1024 with n_keys**2 slots of 1024-dim values (n_keys 1024: 1.07B value parameters; 2048:
4.3B), heads 4, knn 32, k_dim 512, query BatchNorm; batch 4 x 256 tokens; RowAdam on the values
(through the write-back cache, as train.py does), AdamW on the rest. Prints the set-up time (building
and initialising the table, or creating the files and, when they fit --cache-gb, reading them into RAM), the first step, the median of the later steps
(a step that spilled the cache is counted with its spill), the checkpoint write-backs (`--checkpoint-every`,
and one at the end: journal, copy into the files, fsync), the peak resident memory (VmHWM) and the
resident anonymous / file-backed memory at the end. File-backed pages are the kernel's to evict
(written back if dirty); anonymous ones are not.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from pkmlm.memory import values_file as vfile
from pkmlm.memory.kernels import retain_freed_memory, simd_path
from pkmlm.memory import ProductKeyMemory, make_value_table
from pkmlm.training.optim import make_optimizers

DIM, HEADS, KNN, K_DIM, BATCH, SEQ = 1024, 4, 32, 512, 4, 256


def status_gb(*keys: str) -> list[float]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return [int(fields[k].split()[0]) / 2**20 for k in keys]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-keys", type=int, default=1024)
    parser.add_argument("--values-file", type=Path, help="keep the table in files at this path (default: RAM)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--keep", action="store_true", help="keep the values files afterwards")
    parser.add_argument("--cache-gb", type=float, help="memory.values_file_cache_gb (default: half the RAM)")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="write back as a checkpoint does, every N "
                        "steps (0: at the end only)")
    args = parser.parse_args()
    retain_freed_memory()
    torch.manual_seed(0)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    if args.values_file is None:
        layer = ProductKeyMemory(DIM, DIM, n_keys=args.n_keys, heads=HEADS, knn=KNN, k_dim=K_DIM)
    else:
        table = make_value_table(args.n_keys, DIM, device="meta")
        layer = ProductKeyMemory(DIM, DIM, n_keys=args.n_keys, heads=HEADS, knn=KNN, k_dim=K_DIM, values=table)
        vf = vfile.attach(layer, args.values_file, writable=True, seed=0, cache_gb=args.cache_gb)
        vf.restore(vf.journal_step())  # fresh files: 0; kept ones (--keep): where the last run left them
    setup = time.perf_counter() - start
    opts = make_optimizers(layer, lr=1e-4, value_lr=1e-3)
    values = sum(p.numel() for p in layer.value_parameters())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, top-k {simd_path()}, 1-min load {load:.2f}; "
          f"{args.n_keys**2:,} slots x {DIM} = {values / 1e9:.2f}B value parameters, "
          f"{'files at ' + str(args.values_file) if args.values_file else 'in RAM'}; set-up {setup:.1f} s", flush=True)
    times, saves = [], []

    def checkpoint(step):  # what the trainer's _save does with the files
        t0 = time.perf_counter()
        vf.sync()
        vf.checkpoint(step)
        saves.append(time.perf_counter() - t0)
        print(f"  checkpoint write-back after step {step}: {saves[-1]:.2f} s", flush=True)

    for step in range(args.steps):
        x = torch.randn(BATCH, SEQ, DIM)
        t0 = time.perf_counter()
        opts.zero_grad()
        layer(x).pow(2).mean().backward()
        opts.step()
        times.append(time.perf_counter() - t0)
        print(f"step {step + 1}: {times[-1]:.2f} s, peak RSS {status_gb('VmHWM')[0]:.1f} GB, anonymous "
              f"{status_gb('RssAnon')[0]:.1f} GB", flush=True)
        if args.values_file is not None and args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
            checkpoint(step + 1)
    if args.values_file is not None and not (args.checkpoint_every and args.steps % args.checkpoint_every == 0):
        checkpoint(args.steps)
    hwm, anon, file_backed = status_gb("VmHWM", "RssAnon", "RssFile")
    later = statistics.median(times[1:])
    amortized = f", amortized with the checkpoints {(sum(times[1:]) + sum(saves)) / (len(times) - 1):.2f} s" \
        if saves else ""
    print(f"first step {times[0]:.2f} s, later steps median {later:.2f} s{amortized}, checkpoint write-backs "
          f"{' '.join(f'{s:.1f}' for s in saves) or '-'} s, peak RSS {hwm:.1f} GB (now: anonymous {anon:.1f} GB, "
          f"file-backed {file_backed:.1f} GB), 1-min load {os.getloadavg()[0]:.2f}", flush=True)
    if args.values_file is not None and not args.keep:
        for p in args.values_file.parent.glob(args.values_file.name + "*"):
            p.unlink()


if __name__ == "__main__":
    main()
