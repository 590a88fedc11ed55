"""pkmlm checkpoints as an lm-eval (EleutherAI lm-evaluation-harness 0.4) model, on local task files, offline.

    python -m pkmlm.eval.harness runs/facts_pkm --tasks pkmlm_facts_qa,pkmlm_facts_qa_ll \\
        --qa data/facts_src/qa_test.jsonl [--limit 200] [--json results.json]
    python -m pkmlm.eval.harness runs/tiny_pkm --tasks pkmlm_cloze,pkmlm_text_ppl --split test --docs 200

Tasks ship as YAML in pkmlm/eval/tasks/ (any other lm-eval task YAML directory: --include-path DIR):
    pkmlm_facts_qa      generate_until: greedy answer to a facts question, exact match (--qa FILE)
    pkmlm_facts_qa_ll   loglikelihood: the answer is the greedy continuation (acc), its perplexity (--qa FILE)
    pkmlm_cloze         loglikelihood: the last word of the first line (6+ words) of a prepared split's documents
    pkmlm_text_ppl      loglikelihood_rolling: word/byte perplexity and bits per byte of the split's documents
The cloze and text files are written from DATA_DIR/<--split> (documents decoded with the run's tokenizer)
under --work-dir, and each task's data file is set to the file it needs, so nothing is downloaded.

The model (``PkmlmLM``; lm-eval's registry name "pkmlm") encodes text with the run's own codec (Moses + BPE,
pkmlm/eval/textcodec.py): a continuation's ids are those of context + continuation after the context's (the
continuation alone when the context's ids are not a prefix). ``loglikelihood`` is pkmlm.eval.qa's
continuation scoring; ``loglikelihood_rolling`` scores disjoint windows of max_seq_len tokens (each predicted
once, the first from an end-of-document id, lm-eval's rolling-window helpers); ``generate_until`` decodes
greedily (temperature 0, pkmlm.eval.sampling) and cuts the text at the first stop string. One process.
lm-eval is an optional extra (``pip install -e .[lmeval]``), imported only here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from pkmlm import cli
from pkmlm.cli import UserError
from pkmlm.data.shards import open_split
from pkmlm.eval.evaluation import load_trained
from pkmlm.eval.qa import continuation_scores, load_qa
from pkmlm.eval.sampling import generate
from pkmlm.eval.textcodec import TextCodec
from pkmlm.fileio import write_text_atomic

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
SHIPPED = ("pkmlm_facts_qa", "pkmlm_facts_qa_ll", "pkmlm_cloze", "pkmlm_text_ppl")


class HarnessError(UserError):
    """Bad harness input: lm-eval missing, an unknown task, a task without its data file."""


def _lm_base():
    try:
        from lm_eval.api.model import LM
    except ImportError:
        raise HarnessError("the lm-eval adapter needs lm-eval: pip install -e .[lmeval]") from None
    return LM


def make_lm(path: str | Path, *, data_dir: str | Path | None = None, batch_size: int = 16,
            device: str = "cpu"):
    """An lm-eval ``LM`` for the checkpoint (or run directory) ``path``; see the module docstring."""
    LM = _lm_base()

    class PkmlmLM(LM):
        def __init__(self):
            super().__init__()
            trained = load_trained(path, data_dir=data_dir, device=torch.device(device))
            self.model, self.codec = trained.model, trained.codec
            self.max_len = trained.config.model.max_seq_len
            self.precision = trained.config.train.precision
            self.batch = batch_size

        def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            ctx = [self.codec.eos_id] + self.codec.encode(context)
            whole = [self.codec.eos_id] + self.codec.encode(context + continuation)
            cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else self.codec.encode(continuation)
            cont = cont[-self.max_len:]
            return ctx[max(0, len(ctx) + len(cont) - 1 - self.max_len):], cont

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            pairs = [self._pair(*r.args) for r in requests]
            return continuation_scores(self.model, pairs, batch_size=self.batch, precision=self.precision)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            out = []
            for r in requests:
                ids = self.codec.encode(r.args[0])
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    token_list=ids, prefix_token=self.codec.eos_id, max_seq_len=self.max_len, context_len=1)]
                scores = continuation_scores(self.model, windows, batch_size=self.batch, precision=self.precision)
                out.append(sum(lp for lp, _ in scores))
            return out

        def generate_until(self, requests, disable_tqdm: bool = False):
            out = []
            for r in requests:
                context, options = r.args
                until = options.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                prompt = ([self.codec.eos_id] + self.codec.encode(context))[-self.max_len:]
                new = generate(self.model, prompt, max_new_tokens=int(options.get("max_gen_toks", 32)),
                               window=self.max_len, seeds=[0], temperature=0, stop_id=self.codec.eos_id,
                               precision=self.precision)[0]
                text = self.codec.decode(new)
                cut = min([text.find(s) for s in until if s and s in text], default=len(text))
                out.append(text[:cut])
            return out

    return PkmlmLM()


def split_documents(data_dir: str | Path, split: str, codec: TextCodec, limit: int) -> list[str]:
    """The first ``limit`` documents of DATA_DIR/split as text (decoded with ``codec``)."""
    corpus = open_split(Path(data_dir) / split, expected_vocab_hash=codec.tokenizer.vocab_hash,
                        require_tokens="the harness")
    ids = corpus.read(0, corpus.num_tokens)
    ends = np.flatnonzero(ids == corpus.eos_id)
    docs, start = [], 0
    for end in list(ends) + [len(ids)]:
        if end > start:
            docs.append(codec.decode(ids[start:end].tolist()))
        start = end + 1
        if len(docs) == limit:
            break
    return docs


def cloze_records(documents: list[str], min_words: int = 6) -> list[dict]:
    """{"context", "target"} per document: its first line of at least ``min_words`` words (a title is skipped)
    without its last word, and that word (end punctuation dropped); documents without such a line are skipped."""
    out = []
    for doc in documents:
        lines = (line.rstrip(" .!?\"'").split() for line in doc.split("\n"))
        words = next((w for w in lines if len(w) >= min_words), None)
        if words is not None:
            out.append({"context": " ".join(words[:-1]), "target": words[-1]})
    return out


def task_configs(tasks: list[str], files: dict[str, Path], include_path: str | None) -> list[dict]:
    """Each task's YAML as a dict, its data file set to ``files[task]`` when given."""
    dirs = [TASKS_DIR] + ([Path(include_path)] if include_path else [])
    out = []
    for name in tasks:
        found = next((d / f"{name}.yaml" for d in dirs if (d / f"{name}.yaml").is_file()), None)
        if found is None:
            raise HarnessError(f"unknown task {name!r}: the shipped ones are {', '.join(SHIPPED)}; others need "
                               "--include-path DIR holding NAME.yaml")
        config = yaml.safe_load(found.read_text())
        if name in files:
            config["dataset_kwargs"] = {"data_files": {config.get("test_split", "test"): str(files[name])}}
        out.append(config)
    return out


def run(path: str | Path, tasks: list[str], *, qa: str | Path | None = None, data_dir: str | None = None,
        split: str = "test", docs: int = 200, work_dir: str | Path = ".harness", limit: int | None = None,
        batch_size: int = 16, device: str = "cpu", include_path: str | None = None) -> dict:
    """lm-eval's ``simple_evaluate`` of checkpoint ``path`` on ``tasks``; returns {task: {metric: value}}."""
    _lm_base()
    lm = make_lm(path, data_dir=data_dir, batch_size=batch_size, device=device)
    work = Path(work_dir)
    files: dict[str, Path] = {}
    if {"pkmlm_facts_qa", "pkmlm_facts_qa_ll"} & set(tasks):
        if qa is None:
            raise HarnessError("the facts QA tasks need --qa FILE.jsonl (python -m pkmlm.data.facts writes one)")
        load_qa(qa)  # checked here, one clear line, rather than deep inside lm-eval
        files["pkmlm_facts_qa"] = files["pkmlm_facts_qa_ll"] = Path(qa).resolve()
    if {"pkmlm_cloze", "pkmlm_text_ppl"} & set(tasks):
        root = data_dir or load_trained_data_dir(path)
        documents = split_documents(root, split, lm.codec, docs)
        cloze = cloze_records(documents)
        if "pkmlm_cloze" in tasks and not cloze:
            raise HarnessError(f"{root}/{split} has no document line of 6 words or more for the cloze task")
        files["pkmlm_cloze"], files["pkmlm_text_ppl"] = work / "cloze.jsonl", work / "documents.jsonl"
        write_text_atomic(files["pkmlm_cloze"], "".join(json.dumps(r) + "\n" for r in cloze))
        write_text_atomic(files["pkmlm_text_ppl"], "".join(json.dumps({"text": d}) + "\n" for d in documents))
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(model=lm, tasks=task_configs(tasks, files, include_path), limit=limit,
                              task_manager=TaskManager(include_path=str(TASKS_DIR)), bootstrap_iters=0,
                              log_samples=False, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    return {task: {k.split(",")[0]: v for k, v in metrics.items() if k not in ("alias", "name") and "_stderr" not in k}
            for task, metrics in results["results"].items()}


def load_trained_data_dir(path) -> Path:
    """The data directory saved in the checkpoint's config."""
    from pkmlm.eval.evaluation import find_checkpoint
    from pkmlm import checkpoint as ckpt

    return Path(ckpt.load_checkpoint(find_checkpoint(path))["config"]["data"]["dir"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pkmlm.eval.harness", description=__doc__.split("\n")[0])
    parser.add_argument("path", metavar="CHECKPOINT_OR_RUN_DIR")
    parser.add_argument("--tasks", required=True, help=f"comma-separated, e.g. {','.join(SHIPPED)}")
    parser.add_argument("--qa", help="QA .jsonl for the facts tasks (python -m pkmlm.data.facts: qa_test.jsonl)")
    parser.add_argument("--data-dir", help="prepared data directory (default: the checkpoint's data.dir)")
    parser.add_argument("--split", default="test", help="split of the cloze and text tasks")
    parser.add_argument("--docs", type=int, default=200, help="documents of --split the cloze and text tasks read")
    parser.add_argument("--work-dir", default=".harness", help="where the cloze and text task files are written")
    parser.add_argument("--limit", type=int, help="at most this many examples per task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--include-path", help="a directory of further lm-eval task YAML files")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    return cli.run(lambda: _evaluate(args))


def _evaluate(args) -> None:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise HarnessError("--tasks is empty: e.g. --tasks pkmlm_cloze")
    if args.docs < 1:
        raise HarnessError(f"--docs must be >= 1, got {args.docs}")
    results = run(args.path, tasks, qa=args.qa, data_dir=args.data_dir, split=args.split, docs=args.docs,
                  work_dir=args.work_dir, limit=args.limit, batch_size=args.batch_size, device=args.device,
                  include_path=args.include_path)
    for task, metrics in results.items():
        print(f"{task}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in metrics.items()))
    if args.json:
        write_text_atomic(args.json, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
