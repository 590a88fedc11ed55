"""scripts/gpu_check.sh without a GPU: a clear skip for every GPU part, the summary table, exit status 1; bad usage
exits 2. (`scripts/gpu_check.sh --dry-run` runs every part tiny on the CPU: ~1.5 min, not run here.)"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs its ~8-minute check")
def test_without_a_gpu_every_part_is_skipped_with_the_reason_and_the_table_printed(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    table = proc.stdout[proc.stdout.index("| part | status | s | result |"):].splitlines()
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table[2:] if line.startswith("|")}
    assert rows == {"environment": "PASS", "cuda-tests": "SKIP", "memory-layer": "SKIP", "12L_pkm-bf16": "SKIP"}
    assert proc.stdout.count("no CUDA device visible to torch (run scripts/gpu_check.sh --dry-run") >= 3
    assert (tmp_path / "environment.log").read_text().startswith("== environment")


def test_a_failing_part_does_not_stop_the_others_and_the_table_says_so(tmp_path):
    """An interpreter that fails at once (PYTHON=false): every part runs, fails, and gets its row; exit status 1."""
    env = {**os.environ, "PYTHON": "false", "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1, proc.stderr
    table = proc.stdout[proc.stdout.index("| part | status | s | result |"):].splitlines()
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table[2:] if line.startswith("|")}
    assert rows == {name: "FAIL (1)" for name in ("environment", "cuda-tests", "memory-layer", "tiny_pkm-cpu")}


def test_bad_usage_is_one_line_exit_2(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--gpu"], cwd=ROOT, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "OUT": str(tmp_path)})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: unknown argument '--gpu': use no argument (a GPU run) or --dry-run (the CPU)"]
