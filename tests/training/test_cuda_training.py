"""Training, evaluation and generation on a CUDA GPU: 20 steps in fp32, bf16 and fp16 lower the loss and resume
exactly; a checkpoint evaluates (API and evaluate.py) and generates on CUDA as on the CPU.

Marked `cuda` (scripts/gpu_check.sh runs them); without a GPU every test skips with the reason. Resume on CUDA is
compared within a tolerance, not bitwise: the GPU's atomic adds (embedding-bag and index-add backward) sum floats
in an order that changes from run to run, so two identical CUDA runs already differ in the last bits.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pkmlm.checkpoint import list_checkpoints, load_checkpoint
from pkmlm.config import Config
from pkmlm.eval.evaluation import evaluate_checkpoint, load_model
from pkmlm.eval.sampling import generate
from pkmlm.training.trainer import train

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")]

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 64


@pytest.fixture(scope="module")
def learnable_dir(tmp_path_factory, learnable_corpus):
    return learnable_corpus(tmp_path_factory.mktemp("learnable"), vocab=VOCAB, seed=1)


def config(data_dir, out_dir, **train) -> dict:
    """Two layers with a memory replacing layer 1's FFN, on the GPU."""
    return {
        "model": {"n_layers": 2, "d_model": 64, "n_heads": 2, "dropout": 0.1, "max_seq_len": 16},
        "memory": {"positions": ["1:replace"], "n_keys": 16, "heads": 2, "knn": 8, "k_dim": 32},
        "data": {"dir": str(data_dir), "batch_size": 16, "bptt": 16},
        "train": {"out_dir": str(out_dir), "max_steps": 20, "lr": 1e-2, "warmup_steps": 2, "log_every": 5,
                  "eval_every": 10, "eval_batches": 2, "checkpoint_every": 10, "device": "cuda", **train},
    }


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_training_lowers_the_loss_and_resumes(precision, learnable_dir, tmp_path):
    """20 steps: the loss falls by 0.5 nats; the run resumed from its step-10 checkpoint gives the same steps 11-20
    (losses within rel 1e-3, weights within 1e-3: see the module docstring) and keeps fp32 weights."""
    whole = train(Config.from_dict(config(learnable_dir, tmp_path / "whole", precision=precision)))
    losses = [whole.losses[s] for s in sorted(whole.losses)]
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in whole.model.parameters())
    step10 = list_checkpoints(tmp_path / "whole")[0]
    (tmp_path / "cut" / "checkpoints").mkdir(parents=True)
    (tmp_path / "cut" / "checkpoints" / step10.name).write_bytes(step10.read_bytes())
    rest = train(Config.from_dict(config(learnable_dir, tmp_path / "cut", precision=precision)), resume="latest")
    assert sorted(rest.losses) == list(range(11, 21))
    for step, loss in rest.losses.items():
        assert loss == pytest.approx(whole.losses[step], rel=1e-3)
    final = load_checkpoint(list_checkpoints(tmp_path / "whole")[-1])
    for name, t in load_checkpoint(list_checkpoints(tmp_path / "cut")[-1])["model"].items():
        torch.testing.assert_close(t, final["model"][name], rtol=1e-3, atol=1e-3, msg=name)
    if precision == "fp16":
        assert final["scaler"] is not None and final["scaler"]["scale"] > 0


def test_evaluate_and_generate_on_cuda_match_the_cpu(learnable_dir, tmp_path):
    """A run trained on the CPU: evaluate.py on CUDA prints the CPU's loss (rel 1e-5), and greedy generation on
    CUDA gives the CPU's tokens (with and without the KV cache)."""
    cfg = config(learnable_dir, tmp_path / "run", device="cpu", max_steps=10)
    train(Config.from_dict(cfg))
    cpu = evaluate_checkpoint(tmp_path / "run", splits=["valid"], device=torch.device("cpu"))
    gpu = evaluate_checkpoint(tmp_path / "run", splits=["valid"], device=torch.device("cuda"))
    assert gpu["valid_loss"] == pytest.approx(cpu["valid_loss"], rel=1e-5)
    proc = subprocess.run([sys.executable, "evaluate.py", str(tmp_path / "run"), "--device", "cuda", "--json",
                           str(tmp_path / "eval.json")], cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [row] = json.loads((tmp_path / "eval.json").read_text())
    assert row["valid_loss"] == pytest.approx(cpu["valid_loss"], rel=1e-5)
    path = list_checkpoints(tmp_path / "run")[-1]
    texts = []
    for device, cache in (("cpu", True), ("cuda", True), ("cuda", False)):
        model = load_model(load_checkpoint(path), path, torch.device(device))
        texts.append(generate(model, [0, 5, 8, 11], max_new_tokens=12, window=16, seeds=[0], temperature=0.0,
                              use_cache=cache))
    assert texts[0] == texts[1] == texts[2] and len(texts[0][0]) == 12
