"""Continual learning: teach new facts by full fine-tuning, LoRA, memory-only or sparse memory (slots)
fine-tuning at matched steps, and measure what is learned and what is forgotten (issue 24, item 5; after Lin et
al. 2025, "Continual Learning via Sparse Memory Finetuning").

    python bench/continual.py --people-a 100 --people-b 50 --pretrain-steps 1500 --steps 200 \\
        --lrs 3e-3,1e-2,3e-2 --top-slots 64,512 --out runs/continual --plot docs/continual_learning.png

1. Set A (people 0..A-1) mixed with BBC news (--mix of the characters) and set B (people A..A+B-1) are generated
   (python -m pkmlm.data.facts with bench/knowledge.py's RECIPE: one biography, every person's QA pairs in the
   text 10 times in shuffled orders: the facts to learn are asked the way they were taught) and prepared with
   one tokenizer; BBC alone is prepared with it too (its test split: BBC
   perplexity; its train split: the background of the slots TF-IDF).
2. A memory model (bench/knowledge.py's "memory": 2 layers, width 64, a 64^2-slot memory beside block 1's FFN)
   is pretrained on A + BBC (--pretrain-lr, warmup a quarter of the steps).
3. From that checkpoint (train.py --init-from), each method is taught B for --steps steps, at each --lrs
   (dense lr; value tables at 10x; constant): full (train.trainable=all), lora (trainable=lora, rank 8),
   memory (trainable=memory), slots (trainable=slots, top_slots=each of --top-slots, background: BBC, or with
   --background a the pretraining data A + BBC).
4. Each run: accuracy and answer log-likelihood (nats) on B (learned), the same on A and BBC test perplexity
   (forgotten), with the pretrained model as the first row. A finished run is not trained again. --plot draws learned against forgotten (accuracy on A), one point per lr.

Every row prints the command that makes it alone. Results: docs/quality.md, "Continual learning".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from knowledge import RECIPE, base_config, make_facts, model_sections, qa_scores  # noqa: E402

from pkmlm.config import Config  # noqa: E402
from pkmlm.data.prepare import MergeSettings, prepare  # noqa: E402
from pkmlm.eval.evaluation import evaluate_checkpoint, find_checkpoint  # noqa: E402
from pkmlm.training.trainer import train  # noqa: E402

METHODS = {
    "full": {"trainable": "all"},
    "lora": {"trainable": "lora", "lora_rank": 8, "lora_alpha": 16.0},
    "memory": {"trainable": "memory"},
    "slots": {"trainable": "slots"},
}


def memory_config(data: Path, out: Path, steps: int, lr: float, warmup: int | None = None) -> dict:
    """bench/knowledge.py's "memory" model (2 layers, width 64, a 64^2-slot memory beside block 1's FFN)."""
    config = base_config(data, out, steps, lr, RECIPE["batch"], RECIPE["bptt"], warmup, RECIPE["value_lr_mult"])
    for section, values in model_sections("memory", 2, 64).items():
        config[section] = {**config[section], **values}
    return config


def setup(out: Path, people_a: int, people_b: int, pretrain_steps: int, lr: float, mix: float) -> dict[str, Path]:
    """Data for A + BBC, B, BBC alone (one tokenizer) and the pretrained model; each made once."""
    a = make_facts(out / "a", people_a, bios=RECIPE["bios"], qa_test_fraction=0.0, mix=f"bbc_news:{mix:g}",
                   vocab=2000, qa_repeats=RECIPE["qa_repeats"])
    b = make_facts(out / "b", people_b, first=people_a, bios=RECIPE["bios"], qa_test_fraction=0.0,
                   tokenizer=a / "tokenizer", qa_repeats=RECIPE["qa_repeats"])
    bbc = out / "bbc/data"
    if not (bbc / "train").is_dir():
        prepare(bbc, corpus="bbc_news", settings=MergeSettings(tokenizer=str(a / "tokenizer"), valid="0.02",
                                                               test="0.05"), workers=1, progress="off")
    pre = out / "pretrained"
    if not (pre / "checkpoints").is_dir():
        train(Config.from_dict(memory_config(a, pre, pretrain_steps, lr, warmup=max(1, pretrain_steps // 4))))
    return {"a": a, "b": b, "bbc": bbc, "pretrained": pre, "qa_a": out / "a/src/qa_train.jsonl",
            "qa_b": out / "b/src/qa_train.jsonl"}


def measure(run_dir: Path, paths: dict[str, Path]) -> dict:
    row = evaluate_checkpoint(run_dir, splits=["test"], data_dir=paths["bbc"])
    b, a = qa_scores(run_dir, paths["qa_b"]), qa_scores(run_dir, paths["qa_a"])
    return {"acc_b": b["qa_acc"], "acc_a": a["qa_acc"], "logprob_b": b["qa_logprob"], "logprob_a": a["qa_logprob"],
            "bbc_ppl": row["test_ppl"]}


def finetune(method: str, lr: float, steps: int, top_slots: int, paths: dict[str, Path], out: Path,
             background: str = "bbc") -> Path:
    """Teach B from the pretrained model; slots rank rows by TF-IDF against ``background`` ("bbc" or "a")."""
    name = f"{method}{top_slots}" + ("" if background == "bbc" else f"_bg{background}") if method == "slots" else method
    run_dir = out / f"{name}_lr{lr:g}"
    if not (run_dir / "checkpoints").is_dir():
        config = memory_config(paths["b"], run_dir, steps, lr)
        config["train"].update(METHODS[method], warmup_steps=0)
        if method == "slots":
            config["train"].update(top_slots=top_slots, background=str(paths[background]),
                                   background_tokens=200_000)
        train(Config.from_dict(config), init_from=find_checkpoint(paths["pretrained"]))
    return run_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--people-a", type=int, default=100)
    parser.add_argument("--people-b", type=int, default=50)
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--pretrain-lr", type=float, default=RECIPE["lr"])
    parser.add_argument("--mix", type=float, default=0.5, help="BBC's share of set A's text (characters)")
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps, the same for every method")
    parser.add_argument("--lrs", default="3e-3,1e-2,3e-2", help="fine-tuning lrs (dense; value tables at 10x)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--top-slots", default="64,512", help="slots: value rows per step and table (comma-separated)")
    parser.add_argument("--background", choices=["bbc", "a"], default="bbc",
                        help="slots: the TF-IDF background, BBC alone or set A + BBC (the pretraining data)")
    parser.add_argument("--out", type=Path, default=Path("runs/continual"))
    parser.add_argument("--report", type=Path)
    parser.add_argument("--plot", type=Path, help="learning-forgetting plot (needs matplotlib)")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    if any(m not in METHODS for m in methods):
        print(f"error: --methods takes {', '.join(METHODS)}", file=sys.stderr)
        return 2
    lrs = [float(x) for x in args.lrs.split(",")]
    top_slots = [int(x) for x in args.top_slots.split(",")]
    common = (f"python bench/continual.py --people-a {args.people_a} --people-b {args.people_b} --pretrain-steps "
              f"{args.pretrain_steps} --pretrain-lr {args.pretrain_lr:g} --mix {args.mix:g} --steps {args.steps} --out {args.out}")
    paths = setup(args.out, args.people_a, args.people_b, args.pretrain_steps, args.pretrain_lr, args.mix)
    rows = [{"method": "pretrained", "lr": None, **measure(paths["pretrained"], paths), "seconds": None,
             "command": f"{common}  (the first row of any method's command)"}]
    for method in methods:
        for top in (top_slots if method == "slots" else [0]):
            for lr in lrs:
                start = time.perf_counter()
                run_dir = finetune(method, lr, args.steps, top, paths, args.out, args.background)
                background = ", background A+BBC" if args.background == "a" else ""
                name = f"slots (top {top}{background})" if method == "slots" else \
                    "lora (rank 8)" if method == "lora" else method
                rows.append({"method": name, "lr": lr, **measure(run_dir, paths), "seconds": time.perf_counter() - start,
                             "command": f"{common} --methods {method} --lrs {lr:g}"
                                        + (f" --top-slots {top}" if method == "slots" else "")
                                        + (" --background a" if method == "slots" and args.background == "a" else "")})
    base = rows[0]
    for r in rows:
        r["forgot_a"] = base["acc_a"] - r["acc_a"]
    lines = ["| method | lr | acc B (learned) | logprob B | acc A | forgot A | logprob A | BBC test ppl |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lr = "" if r["lr"] is None else f"{r['lr']:g}"
        lines.append(f"| {r['method']} | {lr} | {r['acc_b']:.1%} | {r['logprob_b']:.2f} | {r['acc_a']:.1%} | "
                     f"{r['forgot_a']:+.1%} | {r['logprob_a']:.2f} | {r['bbc_ppl']:.1f} |")
    text = "\n".join(lines) + "\n\nCommands (one per row):\n\n" + "\n".join(f"    {r['command']}" for r in rows) + "\n"
    print(text)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    if args.report:
        args.report.write_text(text)
    if args.plot:
        plot(rows, args.plot)
    return 0


def plot(rows: list[dict], path: Path, *, x: str = "forgot_a", y: str = "acc_b",
         xlabel: str = "forgotten: drop in accuracy on set A", ylabel: str = "learned: accuracy on set B") -> None:
    """One line per method (rows after the first, the starting model), a point per lr: ``y`` against ``x``."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: pip install matplotlib", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(5, 4))
    for method in dict.fromkeys(r["method"] for r in rows[1:]):
        points = [r for r in rows if r["method"] == method]
        ax.plot([r[x] for r in points], [r[y] for r in points], "o-", label=method)
        for r in points:
            ax.annotate(f"{r['lr']:g}", (r[x], r[y]), fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
