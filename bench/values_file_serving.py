"""Serving a memory larger than RAM: tokens/s of evaluation and sampling with the value table mapped
from `memory.values_file` (copy-on-write, never loaded, as evaluate.py and generate.py map it), cold
(its pages evicted from the page cache) and warm, against the same table in RAM.

    python bench/values_file_serving.py --values-file /disk/v                  # 1.07B table (1024^2 x 1024)
    python bench/values_file_serving.py --values-file /disk/v --n-keys 2048    # 4.29B

Model: configs/tiny_pkm.yaml (4 layers, d_model 256, one memory, heads 4, knn 32) with n_keys**2 slots of
1024-dim values, random weights (speed does not depend on training), a 16,000-token vocabulary, fp32.
"evaluate": forward passes over batches of 16 x 128 tokens (evaluate.py's batch), tokens/s over --batches.
"generate": pkmlm.eval.sampling.generate (generate.py's function, its measured thread count) from a
16-token prompt, --new-tokens per sample, 1 sample. "cold": posix_fadvise(DONTNEED) on the table file
before each measurement (the files must not be dirty: they are fsynced first); the read-only mapping
uses MADV_RANDOM, so each cold row is one 4 KB read. "warm": measured again right after, same inputs
(the rows they read are now in the page cache). "RAM": the table allocated and initialised in memory.
Each round runs files cold, files warm, RAM; the table prints every round. Files are deleted afterwards
unless --keep.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch

from pkmlm.config import load_config
from pkmlm.eval.sampling import generate
from pkmlm.memory import values_file as vfile
from pkmlm.memory.kernels import retain_freed_memory
from pkmlm.models.transformer import TransformerLM

VOCAB, DIM, BATCH, SEQ = 16_000, 1024, 16, 128


def build(args, values_file: Path | None) -> TransformerLM:
    overrides = [f"memory.n_keys={args.n_keys}", f"memory.v_dim={DIM}"]
    if values_file is not None:
        overrides.append(f"memory.values_file={values_file}")
    config = load_config("configs/tiny_pkm.yaml", overrides)
    torch.manual_seed(0)
    model = TransformerLM(config, VOCAB)
    if values_file is not None:
        vfile.attach(model, values_file, writable=False)  # what pkmlm.eval.evaluation.load_model does
    return model.eval()


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache (clean pages only; no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@torch.no_grad()
def measure(model, args, inputs, prompt) -> tuple[float, float]:
    start = time.perf_counter()
    for x in inputs:
        model(x)
    evaluate = len(inputs) * BATCH * SEQ / (time.perf_counter() - start)
    start = time.perf_counter()
    out = generate(model, prompt, max_new_tokens=args.new_tokens, window=SEQ, seeds=[0])
    return evaluate, sum(map(len, out)) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--values-file", type=Path, required=True, help="where to create the table's files")
    parser.add_argument("--n-keys", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-ram", action="store_true", help="no in-RAM rows (a table larger than RAM)")
    parser.add_argument("--keep", action="store_true", help="keep the values files afterwards")
    args = parser.parse_args()
    print(f"$ python {' '.join(sys.argv)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, 1-min load {os.getloadavg()[0]:.2f}; "
          f"{args.n_keys**2:,} slots x {DIM} = {args.n_keys**2 * DIM / 1e9:.2f}B value parameters")
    if not (args.values_file.parent / (args.values_file.name + ".json")).exists():
        start = time.perf_counter()
        rows = args.n_keys**2
        vf = vfile.ValuesFile(args.values_file, rows, DIM, writable=True, seed=0)
        vf.restore(0)
        del vf
        print(f"created the files in {time.perf_counter() - start:.1f} s", flush=True)
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randint(3, VOCAB, (BATCH, SEQ), generator=gen) for _ in range(args.batches)]
    prompt = torch.randint(3, VOCAB, (16,), generator=gen).tolist()
    small = argparse.Namespace(**{**vars(args), "n_keys": 64})
    measure(build(small, None), args, inputs[:1], prompt)  # one-time costs (kernels, allocator), untimed
    print("\n| round | table | evaluate tok/s | generate tok/s | 1-min load |\n|---|---|---:|---:|---:|")
    try:
        for r in range(args.rounds):
            model = build(args, args.values_file)
            evict(args.values_file)
            for name in ("files, cold", "files, warm"):
                ev, gen_speed = measure(model, args, inputs, prompt)
                print(f"| {r + 1} | {name} | {ev:.0f} | {gen_speed:.1f} | {os.getloadavg()[0]:.2f} |", flush=True)
            del model
            gc.collect()  # the mapping must be gone: pages mapped anywhere are not evicted
            if not args.skip_ram:
                model = build(args, None)
                measure(model, args, inputs[:1], prompt[:4])  # first touch of the fresh table's pages, untimed
                ev, gen_speed = measure(model, args, inputs, prompt)
                print(f"| {r + 1} | RAM | {ev:.0f} | {gen_speed:.1f} | {os.getloadavg()[0]:.2f} |", flush=True)
                del model
                gc.collect()
    finally:
        if not args.keep:
            for p in args.values_file.parent.glob(args.values_file.name + "*"):
                p.unlink()


if __name__ == "__main__":
    retain_freed_memory()
    main()
