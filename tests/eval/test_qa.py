"""Knowledge QA scoring (pkmlm/eval/qa.py, evaluate.py --qa): against greedy decoding and per-item forwards,
through the CLI's table, JSON and CSV, and under two processes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pkmlm.data import facts as F
from pkmlm.eval.evaluation import EvaluationError, evaluate_checkpoint, load_trained
from pkmlm.eval.qa import encode_qa, load_qa, score_qa
from pkmlm.eval.sampling import generate

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa")
    F.write_corpus(root, 6, seed=0, qa_test_fraction=1.0)
    return root / "qa_test.jsonl"


def greedy(model, prompt, n):
    return generate(model, prompt, max_new_tokens=n, window=model.max_seq_len, seeds=[0], temperature=0)[0]


def test_scores_equal_greedy_decoding_and_per_item_log_likelihood(text_run, qa_file):
    _, run_dir = text_run
    trained = load_trained(run_dir)
    model, max_len = trained.model, trained.config.model.max_seq_len
    items = encode_qa(load_qa(qa_file), trained.codec, max_len)
    # Half the items get the model's own greedy continuation as their answer: exactly those are right.
    items = [(p, greedy(model, p, len(a)) if i % 2 else a, attr) for i, (p, a, attr) in enumerate(items)]
    expected_right = [greedy(model, p, len(a)) == a for p, a, _ in items]
    assert sum(expected_right) >= len(items) // 2
    logprobs = []
    with torch.no_grad():
        for p, a, _ in items:
            seq = torch.tensor([p + a])
            logp = model(seq[:, :-1]).log_softmax(-1)[0, len(p) - 1:]
            logprobs.append(logp.gather(-1, torch.tensor(a).unsqueeze(-1)).sum().item())
    for batch_size in (1, 5, 64):
        scores = score_qa(model, items, batch_size=batch_size)
        assert scores["qa_count"] == len(items) == 36
        assert scores["qa_acc"] == pytest.approx(sum(expected_right) / len(items))
        assert scores["qa_logprob"] == pytest.approx(sum(logprobs) / len(items), rel=1e-5)
        for attr in F.ATTRIBUTES:
            mine = [r for r, (_, _, a) in zip(expected_right, items) if a == attr]
            assert scores[f"qa_acc/{attr}"] == pytest.approx(sum(mine) / len(mine))


def test_prompts_are_cut_from_the_left_never_the_answer(text_run, qa_file):
    trained = load_trained(text_run[1])
    long = [{"prompt": "the " * 100 + "end", "answer": "March 3, 1954"}]
    (prompt, answer, _), = encode_qa(long, trained.codec, 20)
    assert len(prompt) + len(answer) - 1 == 20 and prompt[-1] == trained.codec.encode("end")[-1]
    assert answer == encode_qa(long, trained.codec, 1000)[0][1]


def _cli(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_columns_and_two_processes_match_one(text_run, qa_file, tmp_path):
    _, run_dir = text_run
    one = evaluate_checkpoint(run_dir, splits=["valid"], batch_size=3, qa=qa_file)
    proc = _cli("evaluate.py", str(run_dir), "--qa", str(qa_file), "--batch-size", "3", "--json",
                str(tmp_path / "one.json"), "--csv", str(tmp_path / "one.csv"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = proc.stdout.splitlines()[0]
    assert "| qa_acc | qa_logprob |" in header
    row = json.loads((tmp_path / "one.json").read_text())[0]
    assert row["qa_logprob"] == pytest.approx(one["qa_logprob"], rel=1e-9) and row["qa_acc"] == one["qa_acc"]
    with open(tmp_path / "one.csv") as f:
        assert float(next(csv.DictReader(f))["qa_logprob"]) == pytest.approx(one["qa_logprob"])
    proc = _cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "evaluate.py", str(run_dir),
                "--qa", str(qa_file), "--batch-size", "3", "--json", str(tmp_path / "two.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())[0]
    assert two["qa_count"] == one["qa_count"] and two["qa_acc"] == one["qa_acc"]
    assert two["qa_logprob"] == pytest.approx(one["qa_logprob"], rel=1e-6)


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"), ("", "no question"), ("{}\n", "line 1"), ('{"question": "Q?", "answer": ""}\n', "line 1"),
    ("not json\n", "line 1")])
def test_bad_qa_files_are_evaluation_errors(content, message, text_run, tmp_path):
    path = tmp_path / "qa.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(EvaluationError, match=message):
        evaluate_checkpoint(text_run[1], splits=["valid"], qa=path)


def test_cli_bad_qa_file_exit_2(text_run, tmp_path):
    proc = _cli("evaluate.py", str(text_run[1]), "--qa", str(tmp_path / "missing.jsonl"))
    assert proc.returncode == 2 and proc.stderr.startswith("error: --qa") and "Traceback" not in proc.stderr
