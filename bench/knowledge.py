"""Knowledge capacity: how many facts a dense model and the same model with a memory store, at equal active
parameters per token, steps and tokens (issue 24, item 3; after Allen-Zhu & Li, "Physics of Language Models 3.3").

    python bench/knowledge.py --people 100,400 --steps 300 --out runs/knowledge --report docs/knowledge_small.md

For each N in --people: N fictional people (python -m pkmlm.data.facts, 5 biographies each, the qa_train half's
QA pairs in the text), prepared with its own sentencepiece vocabulary; then two models trained on it with
train.py settings that differ only in the memory:

    dense   2 layers, width 64, FFN x4
    memory  the same plus a product-key memory in parallel to block 1's FFN (64^2 slots, 2 heads x 8 reads, k_dim 16):
            active parameters per token within 5 % of dense (the table reports both), 262k more in its table

Each row: QA exact match (pkmlm/eval/qa.py) on the people whose QA pairs were in the training text
(`acc_seen`: memorised and retrievable by the question form) and on the held-out half (`acc_heldout`: facts
seen only in biographies, asked in a form never seen with them: knowledge extraction); facts recalled (all
6N questions answered exactly), bits of knowledge (sum over recalled facts of log2 of their attribute's
number of values, the attribute entropy of Allen-Zhu & Li; a count of what is recalled exactly, not their
loss-based lower bound), bits per parameter (total and active), training and inference tokens/s; and the mean
log-likelihood of the right answer (nats, `logprob_*`), which moves long before exact matches appear.
A finished run is not trained again (delete its folder to retrain): rerunning re-evaluates.
Each row prints the command that makes it alone. CPU scale: see docs/quality.md for what remains for a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pkmlm.config import Config  # noqa: E402
from pkmlm.data import facts as F  # noqa: E402
from pkmlm.data.prepare import MergeSettings, prepare  # noqa: E402
from pkmlm.eval.evaluation import evaluate_checkpoint, load_trained  # noqa: E402
from pkmlm.eval.qa import encode_qa, load_qa, score_qa  # noqa: E402
from pkmlm.training.trainer import train  # noqa: E402

MODELS = {
    "dense": {"memory": {"positions": []}},
    "memory": {"memory": {"positions": ["1:parallel"], "n_keys": 64, "heads": 2, "knn": 8, "k_dim": 16}},
}


def base_config(data_dir: Path, out_dir: Path, steps: int, lr: float, batch: int = 16, bptt: int = 64) -> dict:
    """The shared model and training settings (a dense 2-layer width-64 model)."""
    return {"model": {"n_layers": 2, "d_model": 64, "n_heads": 4, "dropout": 0.0, "max_seq_len": bptt},
            "memory": {"positions": []},
            "data": {"dir": str(data_dir), "batch_size": batch, "bptt": bptt},
            "train": {"out_dir": str(out_dir), "max_steps": steps, "lr": lr, "value_lr": 10 * lr,
                      "warmup_steps": max(1, steps // 20), "log_every": max(1, steps // 5), "eval_every": steps,
                      "eval_batches": 4, "checkpoint_every": steps, "device": "cpu", "seed": 0}}


def make_facts(out: Path, people: int, *, seed: int = 0, first: int = 0, bios: int = 5, qa_test_fraction: float = 0.5,
               mix: str | None = None, tokenizer: Path | None = None, vocab: int = 1000) -> Path:
    """Generate (once) and prepare (once) a facts corpus under ``out``; returns the prepared data dir."""
    src, data = out / "src", out / "data"
    if not (src / "facts.json").is_file():
        F.write_corpus(src, people, seed=seed, first=first, bios=bios, qa_test_fraction=qa_test_fraction, mix=mix)
    if not (data / "train").is_dir():
        held_out = str(max(2, people * bios // 100))  # 1 % of the biographies, at least 2 documents
        prepare(data, inputs=[src / "text"], split="blank-line",
                settings=MergeSettings(vocab_size=vocab, tokenizer=str(tokenizer) if tokenizer else None,
                                       valid=held_out, test=held_out), workers=1, progress="off")
    return data


def qa_scores(run_dir: Path, qa_file: Path, data_dir: Path | None = None) -> dict:
    """qa_acc etc. of the run's newest checkpoint on ``qa_file``, per record too (for recalled facts)."""
    trained = load_trained(run_dir, data_dir=data_dir)
    items = encode_qa(load_qa(qa_file), trained.codec, trained.config.model.max_seq_len)
    return score_qa(trained.model, items, batch_size=64)


def run_model(name: str, data: Path, out: Path, steps: int, lr: float) -> dict:
    config = base_config(data, out, steps, lr)
    for section, values in MODELS[name].items():
        config[section] = {**config[section], **values}
    timing = out / "train_seconds.json"  # kept, so that a re-evaluation still reports the training speed
    if not (out / "checkpoints").is_dir():
        start = time.perf_counter()
        train(Config.from_dict(config))
        timing.write_text(json.dumps(time.perf_counter() - start))
    seconds = json.loads(timing.read_text()) if timing.is_file() else math.nan
    return {"config": config, "train_seconds": seconds}


def bench(people: int, models: list[str], steps: int, lr: float, out: Path) -> list[dict]:
    root = out / f"n{people}"
    data = make_facts(root, people)
    src = root / "src"
    bits = F.attribute_bits()
    rows = []
    for name in models:
        run_dir = root / name
        made = run_model(name, data, run_dir, steps, lr)
        evaluated = evaluate_checkpoint(run_dir, splits=["valid"])
        seen, heldout = qa_scores(run_dir, src / "qa_train.jsonl"), qa_scores(run_dir, src / "qa_test.jsonl")
        recalled = seen["qa_acc"] * seen["qa_count"] + heldout["qa_acc"] * heldout["qa_count"]
        stored = sum(bits[a] * (seen.get(f"qa_acc/{a}", 0) * seen["qa_count"] / 6
                                + heldout.get(f"qa_acc/{a}", 0) * heldout["qa_count"] / 6) for a in F.ATTRIBUTES)
        tokens = steps * made["config"]["data"]["batch_size"] * made["config"]["data"]["bptt"]
        rows.append({
            "people": people, "model": name, "steps": steps, "params_total": evaluated["params_total"],
            "params_active": evaluated["params_active"], "acc_seen": seen["qa_acc"], "acc_heldout": heldout["qa_acc"],
            "logprob_seen": seen["qa_logprob"], "logprob_heldout": heldout["qa_logprob"],
            "facts_recalled": round(recalled), "facts": 6 * people, "bits": stored,
            "bits_per_param": stored / evaluated["params_total"], "bits_per_active": stored / evaluated["params_active"],
            "valid_ppl": evaluated["valid_ppl"],
            "train_tok_s": tokens / made["train_seconds"],
            "infer_tok_s": evaluated["tokens_per_s"],
            "command": f"python bench/knowledge.py --people {people} --models {name} --steps {steps} --lr {lr} "
                       f"--out {out}", "config": str(run_dir / "config.yaml")})
    return rows


def table(rows: list[dict]) -> str:
    cols = ["people", "model", "steps", "params_total", "params_active", "acc_seen", "acc_heldout",
            "logprob_seen", "logprob_heldout", "facts_recalled", "bits", "bits_per_param", "bits_per_active", "valid_ppl", "train_tok_s", "infer_tok_s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r[c]
            cells.append(f"{v:.1%}" if c.startswith("acc") else f"{v:.3g}" if isinstance(v, float) else
                         f"{v:,}" if isinstance(v, int) and c.startswith("params") else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--people", default="100,400", help="comma-separated N")
    parser.add_argument("--models", default="dense,memory")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=Path("runs/knowledge"))
    parser.add_argument("--report", type=Path, help="also write the table (markdown) and commands here")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        print(f"error: unknown model(s) {unknown}: use {', '.join(MODELS)}", file=sys.stderr)
        return 2
    rows = []
    for n in (int(x) for x in args.people.split(",")):
        rows += bench(n, models, args.steps, args.lr, args.out)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    text = table(rows) + "\n\nCommands (one per row; each run's resolved config is its run dir's config.yaml):\n\n" + \
        "\n".join(f"    {r['command']}" for r in rows) + "\n"
    print(text)
    if args.report:
        args.report.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
