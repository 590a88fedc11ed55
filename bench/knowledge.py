"""Knowledge capacity: how many facts a dense model and the same model with a memory store, at equal active
parameters per token, steps and tokens (issue 24, item 3; after Allen-Zhu & Li, "Physics of Language Models 3.3").

    python bench/knowledge.py --people 200,1000,4000 --models dense,memory --steps 1500 --out runs/knowledge \
        --report runs/knowledge.md --plot docs/knowledge_capacity.png
    python bench/knowledge.py --people 200 --models memory,deep --layers 1 --width 256 --steps 1500   # the pair

For each N in --people: N fictional people (python -m pkmlm.data.facts with RECIPE below: one biography each,
the qa_train half's QA pairs in the text 10 times in shuffled orders), prepared with its own sentencepiece
vocabulary; then each model of --models trained on it with train.py settings that differ only in the model:

    dense   L layers (--layers, default 2), width --width (default 64), FFN x4
    memory  the same plus a product-key memory in parallel to the last block's FFN (64^2 slots, 2 heads x 8
            reads, k_dim 16): at width 64 active parameters per token within 5 % of dense (the table reports
            both), 262k more in its table
    deep    dense with 2L layers: the pair of the paper's headline is memory at L layers against deep

Each row: QA exact match (pkmlm/eval/qa.py) on the people whose QA pairs were in the training text
(`acc_seen`: memorised and retrievable by the question form) and on the held-out half (`acc_heldout`: facts
seen only in biographies, asked in a form never seen with them: knowledge extraction); facts recalled (all
6N questions answered exactly); bits of knowledge counted with the attribute entropy of Allen-Zhu & Li two ways:
`bits` (sum over exactly recalled facts of log2 of their attribute's number of values) and `bits_loss` (their
loss-based lower bound, `knowledge_bits`), per parameter (total and active); training tokens/s (wall clock of
the whole run, start-up and its one evaluation included) and inference tokens/s (timed forwards); and the mean
log-likelihood of the right answer (nats, `logprob_*`), which moves long before exact matches appear.
A finished run is not trained again (delete its folder to retrain): rerunning re-evaluates.
Each row prints the command that makes it alone. Results and what they mean: docs/quality.md, "Knowledge".
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pkmlm.config import Config  # noqa: E402
from pkmlm.data import facts as F  # noqa: E402
from pkmlm.data.prepare import MergeSettings, prepare  # noqa: E402
from pkmlm.eval.evaluation import evaluate_checkpoint, load_trained  # noqa: E402
from pkmlm.data.shards import open_split  # noqa: E402
from pkmlm.eval.qa import continuation_scores, encode_qa, load_qa, score_qa  # noqa: E402
from pkmlm.training.trainer import train  # noqa: E402

RECIPE = {"bios": 1, "qa_repeats": 10, "vocab": 1000, "batch": 16, "bptt": 64, "lr": 1e-2, "value_lr_mult": 10.0}
"""The training recipe that makes a width-64 model memorise facts on a CPU in minutes (docs/quality.md,
"Knowledge"): one biography per person (the QA text of the seen half beside it), a vocabulary learned on the
facts text, the seen half's QA pairs written 10 times in shuffled orders (pkmlm.data.facts --qa-repeats:
without it a model learns them only in the context where they always occur), short windows, a high lr whose warmup is a quarter of the steps (the inverse-sqrt decay after it
then stays within 2x of the peak), value tables at 10x."""


def model_sections(name: str, layers: int, width: int) -> dict:
    """Config sections that make model ``name`` at ``layers`` layers and width ``width``:

    dense    ``layers`` layers, FFN x4
    memory   the same plus a 64^2-slot memory (2 heads x 8 reads, k_dim 16) beside the last block's FFN
    deep     dense with 2 x ``layers`` layers (the paper's pair: memory at L layers against 2L layers)"""
    model = {"n_layers": 2 * layers if name == "deep" else layers, "d_model": width, "n_heads": max(1, width // 16)}
    memory = {"positions": [f"{layers - 1}:parallel"], "n_keys": 64, "heads": 2, "knn": 8, "k_dim": 16} \
        if name == "memory" else {"positions": []}
    return {"model": model, "memory": memory}


MODELS = ("dense", "memory", "deep")


def base_config(data_dir: Path, out_dir: Path, steps: int, lr: float, batch: int = 16, bptt: int = 64,
                warmup: int | None = None, value_lr_mult: float = 10.0) -> dict:
    """The shared model and training settings (a dense 2-layer width-64 model; ``model_sections`` changes it).
    warmup: steps of linear warmup before the inverse-sqrt decay (default steps // 20)."""
    return {"model": {"n_layers": 2, "d_model": 64, "n_heads": 4, "dropout": 0.0, "max_seq_len": bptt},
            "memory": {"positions": []},
            "data": {"dir": str(data_dir), "batch_size": batch, "bptt": bptt},
            "train": {"out_dir": str(out_dir), "max_steps": steps, "lr": lr, "value_lr": value_lr_mult * lr,
                      "warmup_steps": max(1, steps // 20) if warmup is None else warmup,
                      "log_every": max(1, steps // 5), "eval_every": steps,
                      "eval_batches": 4, "checkpoint_every": steps, "device": "cpu", "seed": 0}}


def make_facts(out: Path, people: int, *, seed: int = 0, first: int = 0, bios: int = 5, qa_test_fraction: float = 0.5,
               mix: str | None = None, tokenizer: Path | None = None, vocab: int = 1000, qa_repeats: int = 1) -> Path:
    """Generate (once) and prepare (once) a facts corpus under ``out``; returns the prepared data dir."""
    src, data = out / "src", out / "data"
    if not (src / "facts.json").is_file():
        F.write_corpus(src, people, seed=seed, first=first, bios=bios, qa_test_fraction=qa_test_fraction, mix=mix,
                        qa_repeats=qa_repeats)
    if not (data / "train").is_dir():
        held_out = str(max(2, people * bios // 100))  # 1 % of the biographies, at least 2 documents
        prepare(data, inputs=[src / "text"], split="blank-line",
                settings=MergeSettings(vocab_size=vocab, tokenizer=str(tokenizer) if tokenizer else None,
                                       valid=held_out, test=held_out), workers=1, progress="off")
    return data


def qa_scores(run_dir: Path, qa_file: Path, data_dir: Path | None = None) -> dict:
    """qa_acc, qa_logprob (pkmlm/eval/qa.py) of the run's newest checkpoint on ``qa_file``, plus per attribute
    "count/{a}" and "logprob/{a}" (mean answer log-likelihood, nats) for the loss-based bits."""
    trained = load_trained(run_dir, data_dir=data_dir)
    items = encode_qa(load_qa(qa_file), trained.codec, trained.config.model.max_seq_len)
    scores = score_qa(trained.model, items, batch_size=64)
    per_item = continuation_scores(trained.model, [(p, a) for p, a, _ in items], batch_size=64)
    for attr in F.ATTRIBUTES:
        logprobs = [lp for (_, _, a), (lp, _) in zip(items, per_item) if a == attr]
        scores[f"count/{attr}"] = len(logprobs)
        scores[f"logprob/{attr}"] = sum(logprobs) / len(logprobs) if logprobs else 0.0
    return scores


def knowledge_bits(scores: list[dict]) -> tuple[float, float]:
    """(exact bits, loss bits) over QA score dicts of ``qa_scores``. Exact: sum over answered facts of log2 of
    their attribute's number of values. Loss (Allen-Zhu & Li 3.3's lower bound): per attribute, facts x
    max(0, log2 K - mean cross-entropy of the answer in bits), K its number of values; it counts knowledge
    that is not yet an exact answer (a model that narrows a birth year to two candidates stores log2 K - 1 bits)."""
    bits = F.attribute_bits()
    exact = loss = 0.0
    for s in scores:
        for a in F.ATTRIBUTES:
            n = s.get(f"count/{a}", 0)
            exact += bits[a] * s.get(f"qa_acc/{a}", 0.0) * n
            loss += n * max(0.0, bits[a] + s.get(f"logprob/{a}", 0.0) / math.log(2))
    return exact, loss


@torch.no_grad()
def inference_tokens_per_s(run_dir: Path, data_dir: Path, *, batch: int = 16, repeats: int = 5) -> float:
    """Forward tokens/s of the run's model on ``batch`` windows of its train split (eval mode, no grad): the
    median of ``repeats`` timed forwards after one untimed one."""
    trained = load_trained(run_dir)
    bptt = trained.config.data.bptt
    corpus = open_split(data_dir / "train")
    x = torch.from_numpy(corpus.read(0, batch * bptt).astype(np.int64)).view(batch, bptt)
    trained.model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        trained.model(x)
        times.append(time.perf_counter() - start)
    return batch * bptt / sorted(times)[len(times) // 2]


def run_model(name: str, data: Path, out: Path, args) -> dict:
    config = base_config(data, out, args.steps, args.lr, args.batch, args.bptt, args.warmup, args.value_lr_mult)
    for section, values in model_sections(name, args.layers, args.width).items():
        config[section] = {**config[section], **values}
    timing = out / "train_seconds.json"  # kept, so that a re-evaluation still reports the training speed
    if not (out / "checkpoints").is_dir():
        start = time.perf_counter()
        train(Config.from_dict(config))
        timing.write_text(json.dumps(time.perf_counter() - start))
    seconds = json.loads(timing.read_text()) if timing.is_file() else math.nan
    return {"config": config, "train_seconds": seconds}


def command(people: int, name: str, args) -> str:
    """The command line that makes (or re-evaluates) one row."""
    return (f"python bench/knowledge.py --people {people} --models {name} --layers {args.layers} --width {args.width} "
            f"--steps {args.steps} --lr {args.lr:g} --warmup {args.warmup} --bios {args.bios} --qa-repeats {args.qa_repeats} "
            f"--out {args.out}")


def bench(people: int, models: list[str], args) -> list[dict]:
    root = args.out / f"n{people}_b{args.bios}_r{args.qa_repeats}"
    data = make_facts(root, people, bios=args.bios, vocab=args.vocab, qa_repeats=args.qa_repeats)
    src = root / "src"
    rows = []
    for name in models:
        run_dir = root / f"{name}_l{args.layers}_w{args.width}_s{args.steps}_lr{args.lr:g}"
        made = run_model(name, data, run_dir, args)
        evaluated = evaluate_checkpoint(run_dir, splits=["valid"])
        seen, heldout = qa_scores(run_dir, src / "qa_train.jsonl"), qa_scores(run_dir, src / "qa_test.jsonl")
        recalled = seen["qa_acc"] * seen["qa_count"] + heldout["qa_acc"] * heldout["qa_count"]
        exact, loss = knowledge_bits([seen, heldout])
        tokens = args.steps * args.batch * args.bptt
        rows.append({
            "people": people, "model": name, "layers": args.layers, "width": args.width, "steps": args.steps,
            "tokens": tokens, "epochs": tokens / len(open_split(data / "train")),
            "params_total": evaluated["params_total"], "params_active": evaluated["params_active"],
            "acc_seen": seen["qa_acc"], "acc_heldout": heldout["qa_acc"],
            "logprob_seen": seen["qa_logprob"], "logprob_heldout": heldout["qa_logprob"],
            "facts_recalled": round(recalled), "facts": 6 * people, "bits": exact, "bits_loss": loss,
            "bits_per_param": exact / evaluated["params_total"], "bits_loss_per_param": loss / evaluated["params_total"],
            "bits_loss_per_active": loss / evaluated["params_active"], "valid_ppl": evaluated["valid_ppl"],
            "train_tok_s": tokens / made["train_seconds"], "infer_tok_s": inference_tokens_per_s(run_dir, data),
            "command": command(people, name, args), "config": str(run_dir / "config.yaml")})
    return rows


def table(rows: list[dict]) -> str:
    cols = ["people", "model", "layers", "width", "steps", "epochs", "params_total", "params_active", "acc_seen",
            "acc_heldout", "logprob_seen", "logprob_heldout", "facts_recalled", "bits", "bits_loss",
            "bits_loss_per_param", "bits_loss_per_active", "valid_ppl", "train_tok_s", "infer_tok_s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r[c]
            cells.append(f"{v:.1%}" if c.startswith("acc") else f"{v:,.0f}" if c.startswith(("bits", "train", "infer"))
                         and v >= 10 else f"{v:.3g}" if isinstance(v, float) else
                         f"{v:,}" if isinstance(v, int) and c.startswith("params") else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy on the seen people and loss-based bits against N, one line per model and step count (needs
    matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: pip install matplotlib", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    def key(r):  # a row's "budget" (e.g. "10 passes", steps growing with N) joins rows of different steps
        return r["model"], r["layers"], r["width"], r.get("budget") or f"{r['steps']:,} steps"
    for line in dict.fromkeys(map(key, rows)):
        points = sorted((r for r in rows if key(r) == line), key=lambda r: r["people"])
        label = f"{line[0]} (L={line[1]}, d={line[2]}), {line[3]}"
        axes[0].plot([r["people"] for r in points], [r["acc_seen"] for r in points], "o-", label=label)
        axes[1].plot([r["people"] for r in points], [r["bits_loss"] for r in points], "o-", label=label)
    for ax, name in zip(axes, ["accuracy, seen people (exact answer)", "bits of knowledge (loss-based)"]):
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(sorted({r["people"] for r in rows}), [f"{n:,}" for n in sorted({r["people"] for r in rows})])
        ax.set_xlabel("people N")
        ax.set_ylabel(name)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--people", default="200,1000,4000", help="comma-separated N")
    parser.add_argument("--models", default="dense,memory", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--layers", type=int, default=2, help="layers L (deep: 2L)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=RECIPE["lr"])
    parser.add_argument("--warmup", type=int, help="warmup steps (default: steps // 4)")
    parser.add_argument("--bios", type=int, default=RECIPE["bios"], help="biographies per person")
    parser.add_argument("--qa-repeats", type=int, default=RECIPE["qa_repeats"],
                        help="times the seen half's QA pairs are written, each in a new order")
    parser.add_argument("--out", type=Path, default=Path("runs/knowledge"))
    parser.add_argument("--report", type=Path, help="also write the table (markdown) and commands here")
    parser.add_argument("--plot", type=Path, help="accuracy and bits against N (needs matplotlib)")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown or args.layers < 1 or args.width < 16 or args.steps < 1 or args.qa_repeats < 1:
        print(f"error: --models takes {', '.join(MODELS)} (got {args.models}); --layers >= 1, --width >= 16, "
              "--steps >= 1, --qa-repeats >= 1", file=sys.stderr)
        return 2
    args.warmup = max(1, args.steps // 4) if args.warmup is None else args.warmup
    args.vocab, args.batch, args.bptt, args.value_lr_mult = (RECIPE[k] for k in ("vocab", "batch", "bptt",
                                                                                 "value_lr_mult"))
    rows = []
    for n in (int(x) for x in args.people.split(",")):
        rows += bench(n, models, args)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    text = table(rows) + "\n\nCommands (one per row; each run's resolved config is its run dir's config.yaml):\n\n" + \
        "\n".join(f"    {r['command']}" for r in rows) + "\n"
    print(text)
    if args.report:
        args.report.write_text(text)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
