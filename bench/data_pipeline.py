"""Data preparation at scale: MB/s per core per stage and peak memory, on generated corpora.

    .venv/bin/python bench/data_pipeline.py                       # 100 MB x 2 workers, 300 MB x 1 and 2
    .venv/bin/python bench/data_pipeline.py --runs 5:1 5:2        # a quick check
    .venv/bin/python bench/data_pipeline.py --runs 100:2 --bpe fastbpe

A corpus of SIZE MB of unique documents is generated from the BBC News articles: their sentences,
reshuffled into new documents of 3-10 paragraphs, written as .jsonl.gz files (the form news dumps
ship in). Each run (SIZE:WORKERS) prepares it with `python -m pkmlm.data.prepare` in a child process
while this process samples the resident memory of that process tree every 0.2 s. Prints a Markdown
table for docs/benchmarks.md (also appended as JSON lines to OUT/results.jsonl), then times batch
reading from the last prepared train split.
"""

import argparse
import gzip
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pkmlm.data.corpora import bbc_news
from pkmlm.data.shards import open_split
from pkmlm.data.stream import TrainStream, eval_batches


def sentences() -> list[str]:
    out = []
    for doc in bbc_news():
        for paragraph in doc.text.split("\n")[1:]:  # line 0 is the headline
            out.extend(s for s in re.split(r"(?<=[.!?])\s+", paragraph) if len(s) > 20)
    return sorted(set(out))


def generate(directory: Path, megabytes: float, *, files: int = 48, seed: int = 0) -> dict:
    """SIZE MB (uncompressed) of new documents in `files` .jsonl.gz files; reused when present."""
    stamp = directory.with_name(directory.name + ".json")  # beside the corpus, not read as input
    if stamp.is_file():
        return json.loads(stamp.read_text())
    directory.mkdir(parents=True, exist_ok=True)
    pool, rng = sentences(), random.Random(seed)
    target, total, docs = megabytes * 1e6, 0, 0
    for index in range(files):
        with gzip.open(directory / f"part-{index:04d}.jsonl.gz", "wt", encoding="utf-8",
                       compresslevel=1) as f:
            while total < target * (index + 1) / files:
                text = "\n\n".join(" ".join(rng.choices(pool, k=rng.randint(1, 4)))
                                   for _ in range(rng.randint(3, 10)))
                f.write(json.dumps({"text": text, "id": docs}) + "\n")
                total += len(text.encode())
                docs += 1
    info = {"megabytes": total / 1e6, "documents": docs, "files": files, "sentences": len(pool)}
    stamp.write_text(json.dumps(info))
    return info


def tree_rss(pid: int) -> tuple[int, int]:
    """(sum, max) resident bytes of `pid` and all its descendants, from /proc."""
    total = largest = 0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
        total, largest = total + rss, max(largest, rss)
    return total, largest


def run(corpus: Path, out: Path, workers: int, args) -> dict:
    cmd = [sys.executable, "-m", "pkmlm.data.prepare", "--input", str(corpus), "--out", str(out),
           "--workers", str(workers), "--bpe", args.bpe, "--vocab-size", str(args.vocab_size),
           "--bpe-sample-bytes", str(int(args.bpe_sample_mb * 1e6)), "--valid", "0.01", "--test", "0.01"]
    log = open(out.with_suffix(".log"), "w")
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    peak_sum = peak_max = 0
    while child.poll() is None:
        total, largest = tree_rss(child.pid)
        peak_sum, peak_max = max(peak_sum, total), max(peak_max, largest)
        time.sleep(0.2)
    seconds = time.perf_counter() - start
    if child.returncode:
        sys.exit(f"prepare failed (status {child.returncode}): see {log.name}")
    report = json.loads((out / "prepare_report.json").read_text())
    return {"report": report, "seconds": seconds, "peak_rss_sum": peak_sum, "peak_rss_max": peak_max}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "pkmlm_bench_data"))
    parser.add_argument("--runs", nargs="+", default=["100:2", "300:1", "300:2"], metavar="MB:WORKERS",
                        help="corpus size in MB and worker processes of each run, in order")
    parser.add_argument("--bpe", default="sentencepiece", choices=("sentencepiece", "fastbpe"))
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--bpe-sample-mb", type=float, default=20.0,
                        help="--bpe-sample-bytes of prepare, in MB (bounded: not the corpus size)")
    args = parser.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f} at start\n", flush=True)
    print("| corpus MB | docs | workers | Moses MB/s per core | dedup + split s | learn BPE s (sample MB) "
          "| encode + binarize MB/s | total s | peak RSS largest process MB | peak RSS all processes MB |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    last = None
    for spec in args.runs:
        size, workers = spec.split(":")
        corpus = root / f"corpus_{size}mb"
        info = generate(corpus, float(size))
        out = root / f"prepared_{size}mb_{workers}w"
        subprocess.run(["rm", "-rf", str(out)], check=True)  # a fresh run, not a resumed one
        r = run(corpus, out, int(workers), args)
        rep, s = r["report"], r["report"]["seconds"]
        raw, text = rep["raw_bytes"] / 1e6, rep["text_bytes"] / 1e6
        row = (f"| {raw:.0f} | {rep['documents']} | {workers} | {raw / s['moses'] / int(workers):.3f} | "
               f"{s['dedup_split']:.1f} | {s['learn_bpe']:.0f} ({rep['bpe_sample_bytes'] / 1e6:.0f}) | "
               f"{text / s['encode_binarize']:.2f} | {r['seconds']:.0f} | {r['peak_rss_max'] / 2**20:.0f} | "
               f"{r['peak_rss_sum'] / 2**20:.0f} |")
        print(row, flush=True)
        with open(root / "results.jsonl", "a") as f:
            f.write(json.dumps({"run": spec, "corpus": info, **r}) + "\n")
        last = out

    train = open_split(last / "train", verify_checksums=True)
    stream = TrainStream(train, batch_size=32, bptt=256)
    start, steps = time.perf_counter(), 200
    for _ in range(steps):
        next(stream)
    seconds = time.perf_counter() - start
    print(f"\nTrainStream (32, 257): {steps / seconds:.0f} batches/s, "
          f"{steps * 32 * 256 / seconds / 1e6:.2f} M tokens/s")
    valid = open_split(last / "valid")
    start = time.perf_counter()
    n = sum(y.ne(-100).sum().item() for _, y in eval_batches(valid, batch_size=32, bptt=256))
    print(f"eval_batches: {n / (time.perf_counter() - start) / 1e6:.2f} M tokens/s over {n} tokens")


if __name__ == "__main__":
    main()
