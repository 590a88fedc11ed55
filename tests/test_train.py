"""End-to-end training: exact resume, 1 vs 2 processes, non-finite losses, bf16, preemption, the CLI."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pkmlm.checkpoint import list_checkpoints, load_checkpoint
from pkmlm.config import Config, load_config
from pkmlm.data.shards import write_split
from pkmlm.model import TransformerLM
from pkmlm.trainer import TrainingError, clip_grad_norm_, train

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A random-token corpus: 8k training tokens, 1k validation tokens."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, docs in (("train", 160), ("valid", 20)):
        write_split(root / split, [rng.integers(1, VOCAB, size=50).tolist() for _ in range(docs)],
                    vocab_size=VOCAB, vocab_hash="test-vocab", eos_id=0)
    return root


def tiny(data_dir, out_dir, **sections) -> dict:
    """A two-layer model with a memory in parallel to the FFN of layer 1, as a config dict."""
    config = {
        "model": {"n_layers": 2, "d_model": 32, "n_heads": 2, "dropout": 0.1, "max_seq_len": 16},
        "memory": {"positions": ["1:parallel"], "n_keys": 8, "heads": 2, "knn": 4, "k_dim": 16,
                   "input_dropout": 0.1},
        "data": {"dir": str(data_dir), "batch_size": 8, "bptt": 16},
        "train": {"out_dir": str(out_dir), "max_steps": 6, "lr": 3e-3, "warmup_steps": 2, "log_every": 2,
                  "eval_every": 3, "eval_batches": 2, "checkpoint_every": 100, "device": "cpu"},
    }
    for section, values in sections.items():
        config[section].update(values)
    return config


def test_resume_is_bitwise_exact_with_dropout(data_dir, tmp_path):
    whole = train(Config.from_dict(tiny(data_dir, tmp_path / "whole", train={"grad_accum": 2})))
    first = train(Config.from_dict(tiny(data_dir, tmp_path / "cut", train={"grad_accum": 2, "max_steps": 3})))
    assert first.step == 3 and [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step_0000003.pt"]
    # max_steps may change on resume; "latest" finds step 3.
    rest = train(Config.from_dict(tiny(data_dir, tmp_path / "cut", train={"grad_accum": 2})), resume="latest")
    assert {**first.losses, **rest.losses} == whole.losses  # bitwise, all 6 steps
    assert rest.valid_loss == whole.valid_loss
    for (name, a), b in zip(whole.model.state_dict().items(), rest.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_refuses_changed_config_and_occupied_out_dir(data_dir, tmp_path):
    train(Config.from_dict(tiny(data_dir, tmp_path, train={"max_steps": 1})))
    with pytest.raises(TrainingError, match="--resume"):
        train(Config.from_dict(tiny(data_dir, tmp_path, train={"max_steps": 2})))
    with pytest.raises(Exception, match="train.lr: 0.003 in checkpoint, 0.001 now"):
        train(Config.from_dict(tiny(data_dir, tmp_path, train={"max_steps": 2, "lr": 1e-3})), resume="latest")


def test_global_batch_loss_does_not_depend_on_grad_accum(data_dir, tmp_path):
    no_dropout = {"dropout": 0.0}
    runs = [train(Config.from_dict(tiny(data_dir, tmp_path / str(k), model=no_dropout,
                                        memory={"input_dropout": 0.0, "query_batchnorm": False},
                                        train={"grad_accum": k, "max_steps": 3})))
            for k in (1, 4)]
    for step, loss in runs[0].losses.items():
        assert runs[1].losses[step] == pytest.approx(loss, rel=1e-5)


def test_tensorboard_scalars(data_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(Config.from_dict(tiny(data_dir, tmp_path, train={"max_steps": 4})))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/ppl", "valid/loss", "valid/ppl", "lr/dense", "lr/values", "grad_norm/dense",
            "grad_norm/values", "tokens_per_s", "memory/blocks.1.memory/usage", "memory/blocks.1.memory/kl"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]
    assert [e.step for e in events.Scalars("valid/ppl")] == [3, 4]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_trains_on_cpu_close_to_fp32(precision, data_dir, tmp_path):
    fp32 = train(Config.from_dict(tiny(data_dir, tmp_path / "fp32", train={"max_steps": 2})))
    low = train(Config.from_dict(tiny(data_dir, tmp_path / precision, train={"max_steps": 2, "precision": precision})))
    for step, loss in fp32.losses.items():
        assert low.losses[step] == pytest.approx(loss, abs=0.05)
    assert all(p.dtype == torch.float32 for p in low.model.parameters())  # autocast, not a low-precision model


@pytest.fixture(scope="module")
def learnable_dir(tmp_path_factory):
    """A corpus with something to learn: each document counts up by a fixed stride (mod the vocabulary)."""
    root = tmp_path_factory.mktemp("learnable")
    rng = np.random.default_rng(1)
    for split, docs in (("train", 160), ("valid", 20)):
        write_split(root / split, [((rng.integers(1, VOCAB) + 3 * np.arange(50)) % (VOCAB - 1) + 1).tolist()
                                   for _ in range(docs)], vocab_size=VOCAB, vocab_hash="test-vocab", eos_id=0)
    return root


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_each_precision_lowers_the_loss_and_resumes_exactly(precision, learnable_dir, tmp_path):
    settings = {"precision": precision, "max_steps": 8, "eval_every": 4, "lr": 1e-2}
    whole = train(Config.from_dict(tiny(learnable_dir, tmp_path / "whole", train=settings)))
    first = train(Config.from_dict(tiny(learnable_dir, tmp_path / "cut", train={**settings, "max_steps": 4})))
    rest = train(Config.from_dict(tiny(learnable_dir, tmp_path / "cut", train=settings)), resume="latest")
    losses = [whole.losses[s] for s in sorted(whole.losses)]
    assert losses[-1] < losses[0] - 0.5, losses
    assert {**first.losses, **rest.losses} == whole.losses  # bitwise
    for (name, a), b in zip(whole.model.state_dict().items(), rest.model.state_dict().values()):
        assert torch.equal(a, b), name
    if precision == "fp16":  # the GradScaler's state travels in the checkpoint
        saved = load_checkpoint(list_checkpoints(tmp_path / "cut")[-1])
        assert saved["scaler"] is not None and saved["scaler"]["scale"] > 0


def _nan_on_calls(monkeypatch, calls):
    """Make TransformerLM.forward return NaN logits on the given (1-based) training calls."""
    original, count = TransformerLM.forward, {"n": 0}

    def forward(self, idx):
        logits = original(self, idx)
        if self.training:
            count["n"] += 1
            if calls == "all" or count["n"] in calls:
                return logits * float("nan")
        return logits

    monkeypatch.setattr(TransformerLM, "forward", forward)


def test_nonfinite_loss_skips_the_update(data_dir, tmp_path, monkeypatch):
    _nan_on_calls(monkeypatch, {2})
    result = train(Config.from_dict(tiny(data_dir, tmp_path, train={"max_steps": 3})))
    assert np.isnan(result.losses[2]) and np.isfinite(result.losses[1]) and np.isfinite(result.losses[3])
    state = load_checkpoint(list_checkpoints(tmp_path)[-1])
    assert state["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    # The skipped step left no moment behind: Adam took 2 steps.
    assert all(s["step"].item() == 2 for s in state["optimizers"]["dense"]["state"].values())


def test_too_many_nonfinite_losses_stop_without_checkpoint(data_dir, tmp_path, monkeypatch):
    _nan_on_calls(monkeypatch, "all")
    with pytest.raises(TrainingError, match="2 non-finite losses in a row.*lower train.lr"):
        train(Config.from_dict(tiny(data_dir, tmp_path, train={"max_steps": 5, "max_nonfinite": 2})))
    assert list_checkpoints(tmp_path) == []


def test_clip_grad_norm_handles_sparse_rows():
    dense = torch.nn.Parameter(torch.zeros(3))
    dense.grad = torch.tensor([3.0, 0.0, 0.0])
    table = torch.nn.Parameter(torch.zeros(5, 2))
    # Row 1 twice (uncoalesced): it sums to (0, 4), so the norm is 5, not sqrt(3^2 + 2^2 + 2^2).
    table.grad = torch.sparse_coo_tensor([[1, 1]], torch.tensor([[0.0, 2.0], [0.0, 2.0]]), (5, 2), check_invariants=True)
    assert clip_grad_norm_([dense, table], 0.0) == pytest.approx(5.0)
    assert clip_grad_norm_([dense, table], 1.0) == pytest.approx(5.0)
    torch.testing.assert_close(dense.grad, torch.tensor([0.6, 0.0, 0.0]))
    torch.testing.assert_close(table.grad.to_dense()[1], torch.tensor([0.0, 0.8]))


@pytest.mark.parametrize("name", ["tiny.yaml", "tiny_deep.yaml", "tiny_pkm.yaml", "tiny_pkm_parallel.yaml"])
def test_cpu_configs_start_training(name, data_dir, tmp_path):
    config = load_config(ROOT / "configs" / name, [f"data.dir={data_dir}", f"train.out_dir={tmp_path}",
                                                    "train.max_steps=1", "train.eval_batches=1",
                                                    "data.bptt=16", "data.batch_size=4", "train.device=cpu"])
    result = train(config)
    assert result.step == 1 and np.isfinite(result.losses[1]) and np.isfinite(result.valid_loss)
    assert bool(result.memory) == bool(config.memory.positions)


# ---- the command line, in subprocesses ------------------------------------------------------------------------

def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                      "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _write_config(path, config):
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize("args, message", [
    (["train.nope=1"], "unknown key 'train.nope'"),
    (["train.precision=fp8"], "train.precision"),
    (["data.batch_size=7", "train.grad_accum=2"], "train.grad_accum"),
    (["data.dir=/nonexistent"], "/nonexistent"),
    (["--resume", "/nonexistent/step_0000001.pt"], "no checkpoint at /nonexistent"),
])
def test_cli_errors_are_one_line_exit_2(args, message, data_dir, tmp_path):
    cfg = _write_config(tmp_path / "c.yaml", tiny(data_dir, tmp_path / "run"))
    proc = subprocess.run([sys.executable, "train.py", "--config", cfg, *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_cli_print_config(data_dir, tmp_path):
    cfg = _write_config(tmp_path / "c.yaml", tiny(data_dir, tmp_path / "run"))
    proc = subprocess.run([sys.executable, "train.py", "--config", cfg, "--print-config", "train.max_steps=77"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["train"]["max_steps"] == 77
    assert not (tmp_path / "run").exists()


def test_preemption_checkpoints_requeues_and_resumes(data_dir, tmp_path):
    """SIGUSR1 under (fake) Slurm: finish the step, checkpoint, `scontrol requeue`, exit 75; --resume goes on."""
    bin_dir, log = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = _env(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0", SLURM_JOB_ID="777",
               PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "run"
    cfg = _write_config(tmp_path / "c.yaml", tiny(data_dir, out, train={"max_steps": 100000, "eval_every": 100000}))
    proc = subprocess.Popen([sys.executable, "train.py", "--config", cfg, "--resume"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "config.yaml").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr
    assert log.read_text().split() == ["requeue", "777"]
    stopped_at = list_checkpoints(out)[-1]
    step = load_checkpoint(stopped_at)["step"]
    assert step >= 1
    # The requeued job runs the same command line and continues from the checkpoint.
    proc = subprocess.run([sys.executable, "train.py", "--config", cfg, "--resume", f"train.max_steps={step + 2}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"resumed from {stopped_at} at step {step}" in proc.stderr
    assert f"step {step + 2}: valid loss" in proc.stdout
    assert load_checkpoint(list_checkpoints(out)[-1])["step"] == step + 2


# ---- two processes under torchrun ---------------------------------------------------------------------------

WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist, yaml
    from pkmlm.config import Config
    from pkmlm.trainer import train
    result = train(Config.from_dict(yaml.safe_load(open(sys.argv[1]))))
    rank = int(__import__("os").environ["RANK"])
    torch.save({"state": result.model.state_dict(), "losses": result.losses, "valid": result.valid_loss},
               f"{sys.argv[2]}/rank{rank}.pt")
""")


def test_two_processes_match_one_and_stay_in_sync(data_dir, tmp_path):
    """torchrun, 2 gloo processes with grad_accum=2 (no_sync on the first micro-batch): both ranks end with
    identical parameters (value tables included), and the same global batches give the same losses and weights
    as one process with grad_accum=4."""
    # Dropout off: masks differ by process count. Query BatchNorm on: rank r's micro-batch i holds the rows of
    # the one-process run's micro-batch 2r + i, so batch statistics match too.
    config = tiny(data_dir, tmp_path / "ddp", model={"dropout": 0.0}, memory={"input_dropout": 0.0},
                  train={"max_steps": 4, "eval_every": 4, "grad_accum": 2})
    (tmp_path / "worker.py").write_text(WORKER)
    cfg = _write_config(tmp_path / "c.yaml", config)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "worker.py"), cfg, str(tmp_path)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, a in ranks[0]["state"].items():
        if "running_" in name or "num_batches" in name:
            continue  # BatchNorm statistics are per rank by design
        assert torch.equal(a, ranks[1]["state"][name]), name
    assert ranks[0]["losses"] == ranks[1]["losses"] and ranks[0]["valid"] == ranks[1]["valid"]

    config["train"].update(out_dir=str(tmp_path / "single"), grad_accum=4)
    single = train(Config.from_dict(config))
    for step, loss in single.losses.items():
        assert ranks[0]["losses"][step] == pytest.approx(loss, rel=1e-5)
    for name, a in single.model.state_dict().items():
        if "running_" not in name and "num_batches" not in name:
            torch.testing.assert_close(ranks[0]["state"][name], a, rtol=1e-4, atol=1e-5, msg=name)
