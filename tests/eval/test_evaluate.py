"""evaluate.py and pkmlm/eval/evaluation.py: exact perplexity, agreement with training, streamed histograms, bad input."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import write_random_corpus

from pkmlm.checkpoint import latest_checkpoint, load_checkpoint
from pkmlm.config import Config
from pkmlm.data.shards import open_split, write_split
from pkmlm.eval.evaluation import EvaluationError, evaluate_checkpoint, load_model
from pkmlm.memory.metrics import memory_stats
from pkmlm.training.trainer import train

ROOT = Path(__file__).resolve().parents[2]
VOCAB, BPTT = 64, 16


def _write_data(root: Path, vocab_hash: str = "eval-vocab") -> Path:
    # valid: 16 documents of 64 tokens (eos included) = 1024 tokens, so 2 ranks split it at a window boundary.
    return write_random_corpus(root, {"train": (80, 50), "valid": (16, 63), "test": (7, 40)}, vocab=VOCAB,
                               vocab_hash=vocab_hash, eos_id=1)


def _config(data_dir, out_dir) -> dict:
    return {
        "model": {"n_layers": 2, "d_model": 32, "n_heads": 2, "dropout": 0.0, "max_seq_len": BPTT},
        "memory": {"positions": ["1:parallel"], "n_keys": 8, "heads": 2, "knn": 4, "k_dim": 16},
        "data": {"dir": str(data_dir), "batch_size": 8, "bptt": BPTT},
        "train": {"out_dir": str(out_dir), "max_steps": 4, "lr": 3e-3, "warmup_steps": 2, "log_every": 2,
                  "eval_every": 4, "eval_batches": 0, "checkpoint_every": 100, "device": "cpu"},
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained tiny run: (data dir, run dir, TrainResult)."""
    root = tmp_path_factory.mktemp("eval")
    data_dir = _write_data(root / "data")
    result = train(Config.from_dict(_config(data_dir, root / "run")))
    return data_dir, root / "run", result


def test_valid_perplexity_equals_training_validation(run):
    data_dir, run_dir, result = run
    row = evaluate_checkpoint(run_dir, splits=["valid", "test"])
    assert row["step"] == 4 and row["name"] == "run"
    assert row["valid_loss"] == pytest.approx(result.valid_loss, rel=1e-9)
    assert row["valid_ppl"] == pytest.approx(math.exp(row["valid_loss"]))
    # The trainer's memory usage at the same checkpoint is measured on the same tokens.
    assert row["blocks.1.memory/usage"] == result.memory["blocks.1.memory"]["usage"]
    assert row["tokens_per_s"] > 0 and row["memory_split"] == "valid"
    assert row["params_active"] < row["params_total"]


def test_perplexity_is_exp_of_the_directly_computed_mean_nll(run):
    """Every token of the test split once (its first from an eos), windows of bptt without carried context."""
    data_dir, run_dir, _ = run
    row = evaluate_checkpoint(run_dir, splits=["test"], batch_size=3)
    state = load_checkpoint(latest_checkpoint(run_dir))
    model = load_model(state, run_dir, torch.device("cpu"))
    corpus = open_split(data_dir / "test")
    tokens = torch.from_numpy(corpus.read(0, corpus.num_tokens))
    stream = torch.cat([torch.tensor([corpus.eos_id]), tokens])
    nll, correct = [], 0
    with torch.no_grad():
        for start in range(0, corpus.num_tokens, BPTT):
            window = stream[start:start + BPTT + 1]
            logits = model(window[:-1].unsqueeze(0))[0]
            nll.append(F.cross_entropy(logits, window[1:], reduction="none").double())
            correct += sum(int(logits[i].argmax()) == int(window[i + 1]) for i in range(len(window) - 1))
    nll = torch.cat(nll)
    assert nll.numel() == corpus.num_tokens == 7 * 41  # no dropped tail
    assert row["test_ppl"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-6)
    assert row["test_acc"] == pytest.approx(correct / corpus.num_tokens, abs=1e-12) and correct > 0


def test_streamed_histograms_equal_one_shot(run):
    """Batch size 1 (many small updates of the histograms) and one batch holding the whole split agree."""
    data_dir, run_dir, _ = run
    small = evaluate_checkpoint(run_dir, splits=["valid"], batch_size=1, per_head=True)
    whole = evaluate_checkpoint(run_dir, splits=["valid"], batch_size=1000, per_head=True)
    # The same counts, recomputed from one lookup over every valid window at once.
    model = load_model(load_checkpoint(latest_checkpoint(run_dir)), run_dir, torch.device("cpu"))
    memory = dict(model.memories())["blocks.1.memory"]
    memory.track_usage(True)
    corpus = open_split(data_dir / "valid")
    stream = torch.cat([torch.tensor([corpus.eos_id]), torch.from_numpy(corpus.read(0, corpus.num_tokens))])
    with torch.no_grad():
        model(stream[:-1].view(-1, BPTT))
    hist = memory.usage()
    direct = memory_stats(hist["counts"], hist["weights"]).to_dict()
    for key, value in direct.items():
        for row in (small, whole):
            assert row[f"blocks.1.memory/{key}"] == pytest.approx(value, rel=1e-9), key
    assert "blocks.1.memory/head1/usage" in small
    assert small["valid_loss"] == pytest.approx(whole["valid_loss"], rel=1e-6)


def _cli(*args, **env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_",
                                                                      "SLURM_"))}
    env.update(OMP_NUM_THREADS="1", **env_extra)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_table_json_and_csv(run, tmp_path):
    _, run_dir, _ = run
    proc = _cli("evaluate.py", str(run_dir), "--split", "valid,test", "--json", str(tmp_path / "r.json"),
                "--csv", str(tmp_path / "r.csv"))
    assert proc.returncode == 0, proc.stderr
    header = proc.stdout.splitlines()[0]
    assert "valid_ppl" in header and "test_acc" in header and "blocks.1.memory/kl_weights" in header
    rows = json.loads((tmp_path / "r.json").read_text())
    assert len(rows) == 1 and rows[0]["step"] == 4
    csv_lines = (tmp_path / "r.csv").read_text().splitlines()
    assert csv_lines[0].split(",") == list(rows[0]) and len(csv_lines) == 2


@pytest.fixture()
def bad_inputs(run, tmp_path):
    data_dir, run_dir, _ = run
    checkpoint = latest_checkpoint(run_dir)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(checkpoint.read_bytes()[:2000])
    other_vocab = _write_data(tmp_path / "other", vocab_hash="another-vocab")
    empty = tmp_path / "empty"
    write_split(empty / "test", [], vocab_size=VOCAB, vocab_hash="eval-vocab", eos_id=1)
    (tmp_path / "a_dir").mkdir()
    return {
        "json is a directory": ([str(checkpoint), "--csv", str(tmp_path / "a_dir")], "--csv"),
        "empty split": ([str(checkpoint), "--data-dir", str(empty), "--split", "test"],
                        "holds no tokens, and evaluation needs some"),
        "missing": ([str(tmp_path / "nope.pt")], "does not exist"),
        "empty run dir": ([str(tmp_path)], "without checkpoints"),
        "truncated": ([str(truncated)], "cannot read checkpoint"),
        "other vocabulary": ([str(checkpoint), "--data-dir", str(other_vocab)], "vocabulary hash"),
        "no such split": ([str(checkpoint), "--split", "valid,dev"], "dev/manifest.json not found"),
    }


@pytest.mark.parametrize("case", ["missing", "empty run dir", "truncated", "other vocabulary", "no such split",
                                  "empty split", "json is a directory"])
@pytest.mark.slow
def test_cli_bad_input_is_one_line_exit_2_nothing_written(case, bad_inputs, tmp_path):
    args, message = bad_inputs[case]
    out = tmp_path / "out.json"
    proc = _cli("evaluate.py", *args, "--json", str(out))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not out.exists() and proc.stdout == ""


def test_evaluation_rejects_empty_splits_and_negative_batch_size(run):
    with pytest.raises(EvaluationError, match="--split"):
        evaluate_checkpoint(run[1], splits=[])
    with pytest.raises(EvaluationError, match="batch size must be >= 0"):
        evaluate_checkpoint(run[1], splits=["valid"], batch_size=-1)


@pytest.mark.slow
def test_two_processes_all_reduce_losses_and_histograms(run, tmp_path):
    """torchrun, 2 gloo processes, each evaluating half of the split: the same row as one process."""
    _, run_dir, _ = run
    proc = _cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "evaluate.py", str(run_dir),
                "--batch-size", "4", "--per-head", "--json", str(tmp_path / "two.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())[0]
    one = evaluate_checkpoint(run_dir, splits=["valid"], batch_size=4, per_head=True)
    assert two["valid_loss"] == pytest.approx(one["valid_loss"], rel=1e-9)
    for key, value in one.items():
        if "/" in key:  # every memory metric, per head too: the summed histograms are the same
            assert two[key] == pytest.approx(value, rel=1e-9), key


def test_huge_loss_prints_inf_perplexity_in_every_output(run, tmp_path, monkeypatch):
    """A finite loss too large for exp(): perplexity inf in the table, CSV and JSON (no OverflowError)."""
    import importlib.util

    import pkmlm.eval.evaluation as evaluation
    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    monkeypatch.setattr(evaluation, "evaluate_split", lambda *a, **k: (1e4, 0.0))  # (loss, accuracy)
    assert cli.main([str(run[1]), "--json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv")]) == 0
    row = json.loads((tmp_path / "r.json").read_text())[0]
    assert row["valid_loss"] == 1e4 and row["valid_ppl"] == math.inf
    assert "valid_ppl" in (tmp_path / "r.csv").read_text() and ",inf," in (tmp_path / "r.csv").read_text()
    assert cli.markdown_table([row], ["valid"]).splitlines()[2].split(" | ")[5] == "inf"
