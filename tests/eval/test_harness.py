"""The lm-eval adapter (pkmlm/eval/harness.py), offline on the shipped task YAML and local files."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pkmlm.data import facts as F
from pkmlm.eval import harness as H
from pkmlm.eval.evaluation import evaluate_checkpoint, load_trained

pytest.importorskip("lm_eval")
ROOT = Path(__file__).resolve().parents[2]


def test_rolling_loglikelihood_equals_direct_forward(text_run):
    _, run_dir = text_run
    lm = H.make_lm(run_dir)
    trained = load_trained(run_dir)
    text = "The minister said the plan"  # shorter than max_seq_len
    ids = trained.codec.encode(text)
    assert len(ids) < trained.config.model.max_seq_len
    with torch.no_grad():
        seq = torch.tensor([[trained.codec.eos_id] + ids])
        logp = trained.model(seq[:, :-1]).log_softmax(-1)[0]
        direct = logp.gather(-1, seq[0, 1:].unsqueeze(-1)).sum().item()
    assert lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])[0] == pytest.approx(direct, rel=1e-5)
    # Longer than the model: windows of max_seq_len, each token predicted once.
    long = " ".join([text] * 6)
    assert math.isfinite(lm.loglikelihood_rolling([SimpleNamespace(args=(long,))])[0])
    (answer,) = lm.generate_until([SimpleNamespace(args=("The minister", {"until": ["\n"], "max_gen_toks": 5}))])
    assert isinstance(answer, str) and "\n" not in answer


@pytest.mark.slow
def test_cli_runs_the_shipped_tasks_offline_and_agrees_with_evaluate(text_run, tmp_path):
    _, run_dir = text_run
    F.write_corpus(tmp_path / "facts", 4, seed=0, qa_test_fraction=1.0)
    qa = tmp_path / "facts/qa_test.jsonl"
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "pkmlm.eval.harness", str(run_dir), "--tasks", ",".join(H.SHIPPED),
                           "--qa", str(qa), "--docs", "4", "--work-dir", str(tmp_path / "work"),
                           "--json", str(tmp_path / "out.json")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "out.json").read_text())
    assert set(results) == set(H.SHIPPED)
    row = evaluate_checkpoint(run_dir, splits=["valid"], qa=qa)
    # The likelihood task scores exactly what evaluate.py --qa scores.
    assert results["pkmlm_facts_qa_ll"]["acc"] == pytest.approx(row["qa_acc"])
    assert math.log(results["pkmlm_facts_qa_ll"]["perplexity"]) == pytest.approx(-row["qa_logprob"], rel=1e-5)
    assert 0 <= results["pkmlm_facts_qa"]["exact_match"] <= 1
    assert results["pkmlm_text_ppl"]["bits_per_byte"] > 0 and 0 <= results["pkmlm_cloze"]["acc"] <= 1


@pytest.mark.slow
def test_bad_input_is_one_line_exit_2(text_run, tmp_path):
    for args, message in ((["--tasks", "nope"], "unknown task"), (["--tasks", "pkmlm_facts_qa"], "--qa")):
        proc = subprocess.run([sys.executable, "-m", "pkmlm.eval.harness", str(text_run[1]), *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_cloze_records():
    records = H.cloze_records(["A title\none two three four five six seven.\nnext line", "too short."])
    assert records == [{"context": "one two three four five six", "target": "seven"}]
