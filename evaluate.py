"""Evaluate trained models: perplexity per split, inference speed, memory usage; one table row per model.

    python evaluate.py runs/tiny_pkm runs/tiny --split valid,test [--json out.json] [--csv out.csv]
    python evaluate.py runs/*/checkpoints/step_0001000.pt --per-head --batch-size 32 --data-dir data/bbc_news
    python evaluate.py runs/facts_pkm --qa data/facts_src/qa_test.jsonl        (adds qa_acc, qa_logprob)
    torchrun --nproc_per_node=8 evaluate.py runs/12L_pkm          (each rank evaluates its part of every split)

Each argument is a checkpoint file or a run directory (its newest checkpoint); a shell glob (runs/*) gathers
several runs into one table. Columns and JSON keys: docs/evaluation.md.
Exit status: 0 done, 2 bad input (one line on stderr, no file written).
"""

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path

from pkmlm import cli
from pkmlm.distributed import (collective_errors, destroy_process_group, detect_env, init_process_group,
                               resolve_device)
from pkmlm.eval.evaluation import EvaluationError, evaluate_checkpoint
from pkmlm.fileio import write_text_atomic
from pkmlm.memory.kernels import enabled as kernels_enabled, retain_freed_memory
from pkmlm.memory.triton_kernels import mode as triton_mode

# Markdown columns per memory (the JSON and CSV have every metric).
MEMORY_COLUMNS = ("usage", "kl_counts", "kl_weights", "gini_weights", "slots_50", "slots_90", "slots_99")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", metavar="CHECKPOINT_OR_RUN_DIR")
    parser.add_argument("--split", default="valid", help="comma-separated splits, e.g. valid,test (default valid); "
                                                          "memory metrics are measured on the first")
    parser.add_argument("--json", type=Path, help="also write the rows as a JSON list to this file")
    parser.add_argument("--csv", type=Path, help="also write the rows as CSV to this file")
    parser.add_argument("--per-head", action="store_true", help="add memory metrics for every head")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="sequences per forward on each process (0, the default: the training loop's)")
    parser.add_argument("--data-dir", help="prepared data directory (default: the data.dir saved in the checkpoint)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--qa", type=Path, metavar="FILE.jsonl",
                        help="also score these questions (python -m pkmlm.data.facts writes qa_test.jsonl): "
                             "exact-match accuracy of the greedy answer (qa_acc) and its log-likelihood (qa_logprob)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the model with torch.compile (pays on long splits; tokens/s includes compiling)")
    args = parser.parse_args(argv)
    return cli.run(lambda: _run(args))


def _run(args) -> int:
    splits = [s.strip() for s in args.split.split(",") if s.strip()]
    env = detect_env()
    kernels_enabled()  # a bad PKMLM_CPU_KERNELS (or PKMLM_TRITON) is reported before any work
    triton_mode()
    if not splits:
        raise EvaluationError("--split is empty: give split names, e.g. --split valid,test")
    for flag, out in (("--json", args.json), ("--csv", args.csv)):
        if out is not None:  # found now, not after every model was evaluated
            cli.check_output_file(out, flag)
    device = resolve_device(args.device, env)
    init_process_group(env, device)
    try:
        with collective_errors():
            rows = [evaluate_checkpoint(p, splits=splits, data_dir=args.data_dir, batch_size=args.batch_size,
                                        per_head=args.per_head, device=device, qa=args.qa,
                                        compile=args.compile) for p in args.paths]
    finally:
        destroy_process_group()
    if not env.is_main:
        return 0
    print(markdown_table(rows, splits))
    if args.json:
        write_text_atomic(args.json, json.dumps(rows, indent=2) + "\n")
    if args.csv:
        write_text_atomic(args.csv, csv_text(rows))
    return 0


def markdown_table(rows: list[dict], splits: list[str]) -> str:
    memories = sorted({k.rsplit("/", 1)[0] for r in rows for k in r if k.endswith("/usage") and "/head" not in k})
    columns = ["name", "step", "params_total", "params_memory_values", "params_active"]
    columns += [f"{s}_{m}" for s in splits for m in ("ppl", "acc")] + ["tokens_per_s"]
    columns += [c for c in ("qa_acc", "qa_logprob") if any(c in r for r in rows)]
    columns += [f"{m}/{c}" for m in memories for c in MEMORY_COLUMNS]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c), c) for c in columns) + " |")
    return "\n".join(lines)


def _cell(value, column: str) -> str:
    if value is None:
        return ""
    if column.endswith("/usage") or column.endswith("_acc"):
        return f"{value:.1%}"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}" if "kl" in column or "gini" in column else f"{value:.2f}"
    return f"{value:,}" if isinstance(value, int) and column.startswith("params") else str(value)


def csv_text(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))  # union of keys, first-seen order
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()



if __name__ == "__main__":
    retain_freed_memory()  # CPU speed: see pkmlm.memory.kernels
    sys.exit(main())
