"""bench/quality.py end to end on a tiny synthetic corpus: two of its models trained, evaluated and reported."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.n_layers=3", "model.d_model=32", "model.n_heads=2", "model.max_seq_len=16", "memory.n_keys=8",
        "memory.knn=4", "memory.k_dim=16", "memory.heads=2", "data.batch_size=2", "data.bptt=16",
        "train.log_every=1", "train.eval_batches=1", "train.warmup_steps=1"]


@pytest.mark.slow
def test_quality_bench_trains_evaluates_and_reports(tmp_path, random_corpus):
    random_corpus(tmp_path / "data", {"train": (20, 40), "valid": (4, 40), "test": (4, 40)}, vocab=50,
                  vocab_hash="bench-vocab", eos_id=1)
    out = tmp_path / "runs"
    cmd = [sys.executable, "bench/quality.py", "--data-dir", str(tmp_path / "data"), "--out", str(out),
           "--steps", "2", "--eval-every", "1", "--models", "a,e,heads1,l2_pkm", *TINY]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = (out / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| a: ") or line.startswith("| e: ")]
    assert len(rows) == 2, report
    assert "| e: tiny_pkm_no_bn |" in rows[1] and "%" in rows[1]  # the memory model reports its usage
    assert "memory.query_batchnorm=false" in report  # the exact commands are in the report
    # A sweep row: its own override wins over the extra ones (memory.heads=2 in TINY), and it gets the sweep plot.
    assert "| heads1: tiny_pkm_heads1 |" in report
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "sweep.png").exists() and "sweep.png" in report
    assert "heads: 1" in (out / "tiny_pkm_heads1" / "config.yaml").read_text()
    # The headline's L=2 memory row: two layers (over TINY's three), the memory in the upper block.
    l2 = (out / "tiny_l2_pkm" / "config.yaml").read_text()
    assert "n_layers: 2" in l2 and "1:replace" in l2 and "| l2_pkm: tiny_l2_pkm |" in report
    # The usage diagnosis reads the memory run's checkpoint; its numbers are fractions that bound each other.
    diag = subprocess.run([sys.executable, "bench/usage.py", str(out / "tiny_pkm_no_bn"), "--report",
                           str(tmp_path / "usage.md")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert diag.returncode == 0, diag.stderr[-2000:]
    row = (tmp_path / "usage.md").read_text().splitlines()[2].split("|")
    assert row[1].strip() == "tiny_pkm_no_bn" and row[3].strip() == "blocks.2.memory"
    usage, random, independent, live, reachable = (float(row[i].strip().rstrip("%")) for i in range(5, 10))
    assert 0 < usage <= reachable <= 100 and 0 < live <= 100 and 0 < independent <= random <= 100
    # A second call trains nothing: the finished runs are only re-evaluated and reported.
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "train.py" not in again.stdout


@pytest.mark.slow
def test_quality_bench_rejects_unknown_models_and_missing_data(tmp_path):
    for args, message in ((["--models", "a,z"], "subset of a,b,c,d,e"), ([], "no prepared corpus")):
        done = subprocess.run([sys.executable, "bench/quality.py", "--data-dir", str(tmp_path / "none"), *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and message in done.stderr
