"""Throughput of each data-pipeline stage on the BBC News corpus (MB/s of raw text).

    .venv/bin/python bench/data_pipeline.py [--out /tmp/pkmlm_bench_data] [--workers N]

Runs `prepare` once per BPE backend (fastbpe only when installed), then reads training batches
from the prepared split. Prints a Markdown table for docs/benchmarks.md.
"""

import argparse
import os
import platform
import tempfile
import time

from pkmlm.data import DataError
from pkmlm.data.bpe import fast_binary
from pkmlm.data.prepare import prepare
from pkmlm.data.shards import open_split
from pkmlm.data.stream import TrainStream, eval_batches


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "pkmlm_bench_data"))
    parser.add_argument("--workers", type=int, default=None, help="Moses processes (default: all cores)")
    args = parser.parse_args()
    backends = ["sentencepiece"]
    try:
        fast_binary()
        backends.append("fastbpe")
    except DataError:
        print("fastbpe skipped: run scripts/install_fastbpe.sh")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Moses workers: {args.workers or os.cpu_count()}\n")
    print("| backend | MB | read + Moses MB/s | learn BPE MB/s | encode + binarize MB/s | total s | tokens |")
    print("|---|---|---|---|---|---|---|")
    for backend in backends:
        out = os.path.join(args.out, backend)
        start = time.perf_counter()
        r = prepare(out, corpus="bbc_news", bpe=backend, workers=args.workers, progress=False)
        total = time.perf_counter() - start
        mb = r["raw_bytes"] / 1e6
        s = r["seconds"]
        tokens = sum(split["num_tokens"] for split in r["splits"].values())
        print(f"| {backend} | {mb:.2f} | {mb / s['read_tokenize']:.2f} | {mb / s['learn_bpe']:.1f} | "
              f"{mb / s['encode_binarize']:.1f} | {total:.1f} | {tokens} |")

    train = open_split(os.path.join(args.out, "sentencepiece", "train"), verify_checksums=True)
    stream = TrainStream(train, batch_size=32, bptt=256)
    start, steps = time.perf_counter(), 200
    for _ in range(steps):
        next(stream)
    seconds = time.perf_counter() - start
    print(f"\nTrainStream (32, 257): {steps / seconds:.0f} batches/s, "
          f"{steps * 32 * 256 / seconds / 1e6:.2f} M tokens/s")
    valid = open_split(os.path.join(args.out, "sentencepiece", "valid"))
    start = time.perf_counter()
    n = sum(y.ne(-100).sum().item() for _, y in eval_batches(valid, batch_size=32, bptt=256))
    print(f"eval_batches: {n / (time.perf_counter() - start) / 1e6:.2f} M tokens/s over {n} tokens")


if __name__ == "__main__":
    main()
