"""Why does a memory read only part of its slots? A diagnosis of trained runs' memories on held-out text.

For each run (its newest checkpoint) and each memory, on the tokens of one split:

- usage: fraction of slots read at least once (any head), and how it grows with the tokens read;
- random: the usage that as many reads spread uniformly at random would reach, 1 - exp(-reads / slots);
- live sub-keys: fraction of sub-keys (per head and half) that were in some top-knn;
- reachable: fraction of slots whose two sub-keys are both live for some head, the most the product
  structure lets the queries reach;
- independent halves: the usage that as many reads would reach if each head drew its two sub-keys
  independently from their observed frequencies, 1 - exp(-sum_h reads_h p1_h[i] p2_h[j]) averaged over slots.
  Below `random`: skewed sub-key frequencies cost usage; `usage` below it: the two halves' choices are
  correlated (queries pair the same sub-keys again and again).

    python bench/usage.py runs/r/tiny_pkm runs/r/tiny_pkm_reinit --report docs/usage.md --plot docs/usage.png
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from pkmlm import checkpoint as ckpt
from pkmlm.data.shards import open_split
from pkmlm.data.stream import eval_batches
from pkmlm.eval.evaluation import find_checkpoint, load_model


def diagnose(run: Path, split: str, max_tokens: int) -> dict[str, dict]:
    path = find_checkpoint(run)
    state = ckpt.load_checkpoint(path)
    model = load_model(state, path, torch.device("cpu"))
    config = model.config
    corpus = open_split(Path(config.data.dir) / split, expected_vocab_hash=state["vocab_hash"])
    memories = model.memories()
    for _, m in memories:
        m.track_usage(True)
        m.reset_usage()
    curve: dict[str, list[tuple[int, float]]] = {name: [] for name, _ in memories}
    tokens = 0
    with torch.no_grad():
        for inputs, targets in eval_batches(corpus, batch_size=config.data.batch_size, bptt=config.data.bptt):
            model(inputs)
            tokens += int((targets != -100).sum())
            for name, m in memories:
                curve[name].append((tokens, (m.usage_counts.sum(0) > 0).double().mean().item()))
            if max_tokens and tokens >= max_tokens:
                break
    out = {}
    for name, m in memories:
        hist = m.usage()
        slots = m.n_keys**2
        live = hist["subkey_counts"] > 0  # (heads, 2, n_keys)
        reachable = (live[:, 0, :, None] & live[:, 1, None, :]).flatten(1).any(0)  # (slots,)
        usage = (hist["counts"].sum(0) > 0).double().mean().item()
        reads = hist["counts"].sum().item()
        p = hist["subkey_counts"] / hist["subkey_counts"].sum(-1, keepdim=True).clamp_min(1)  # (heads, 2, n_keys)
        rate = (hist["counts"].sum(1)[:, None, None] * p[:, 0, :, None] * p[:, 1, None, :]).sum(0)
        independent = (1 - torch.exp(-rate)).mean().item()
        out[name] = {"run": run.name, "step": state["step"], "tokens": tokens, "slots": slots,
                     "usage": usage, "random": 1 - math.exp(-reads / slots), "independent": independent,
                     "live_subkeys": live.double().mean().item(), "reachable": reachable.double().mean().item(),
                     "curve": curve[name]}
        m.track_usage(False)
    return out


def report(results: list[dict], split: str) -> str:
    lines = [f"| run | step | memory | {split} tokens | usage | uniform-random reads would reach "
             "| independent halves would reach | live sub-keys | reachable slots |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for by_memory in results:
        for name, r in by_memory.items():
            lines.append(f"| {r['run']} | {r['step']} | {name} | {r['tokens']:,} | {r['usage']:.1%} "
                         f"| {r['random']:.1%} | {r['independent']:.1%} | {r['live_subkeys']:.1%} "
                         f"| {r['reachable']:.1%} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[bench]')", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for by_memory in results:
        for name, r in by_memory.items():
            xs, ys = zip(*r["curve"])
            ax.plot([x / 1e3 for x in xs], ys, label=f"{r['run']} {name}")
    ax.set_xlabel("held-out tokens read (thousands)")
    ax.set_ylabel("fraction of slots read")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (their newest checkpoint is read)")
    parser.add_argument("--split", default="valid")
    parser.add_argument("--max-tokens", type=int, default=0, help="stop after this many tokens (0: the whole split)")
    parser.add_argument("--report", type=Path, help="write the markdown table here (default: print it)")
    parser.add_argument("--plot", type=Path, help="PNG of usage against tokens read")
    args = parser.parse_args(argv)
    for run in args.runs:
        if not run.is_dir() or ckpt.latest_checkpoint(run) is None:
            parser.error(f"{run} is not a run directory with a checkpoint")
    results = [diagnose(run, args.split, args.max_tokens) for run in args.runs]
    text = report(results, args.split)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text)
    print(text)
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
