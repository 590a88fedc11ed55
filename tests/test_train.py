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


def test_bf16_autocast_trains_on_cpu(data_dir, tmp_path):
    fp32 = train(Config.from_dict(tiny(data_dir, tmp_path / "fp32", train={"max_steps": 2})))
    bf16 = train(Config.from_dict(tiny(data_dir, tmp_path / "bf16", train={"max_steps": 2, "precision": "bf16"})))
    for step, loss in fp32.losses.items():
        assert bf16.losses[step] == pytest.approx(loss, abs=0.05)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # autocast, not a bf16 model


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
    (["train.precision=fp16"], "fp16 needs CUDA"),
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
    for name, a in ranks[0]["state"].items():  # BatchNorm statistics too: averaged before validation
        assert torch.equal(a, ranks[1]["state"][name]), name
    assert ranks[0]["losses"] == ranks[1]["losses"] and ranks[0]["valid"] == ranks[1]["valid"]

    config["train"].update(out_dir=str(tmp_path / "single"), grad_accum=4)
    single = train(Config.from_dict(config))
    for step, loss in single.losses.items():
        assert ranks[0]["losses"][step] == pytest.approx(loss, rel=1e-5)
    for name, a in single.model.state_dict().items():
        if "running_" not in name and "num_batches" not in name:
            torch.testing.assert_close(ranks[0]["state"][name], a, rtol=1e-4, atol=1e-5, msg=name)


# ---- value tables sharded over processes (memory.shard_values) ------------------------------------------------

def _torchrun(tmp_path, config, world, *extra):
    (tmp_path / "worker.py").write_text(WORKER)
    cfg = _write_config(tmp_path / f"c{world}.yaml", config)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                           str(tmp_path / "worker.py"), cfg, str(tmp_path), *extra], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]


def _sharded(data_dir, out_dir, **train_options):
    # No dropout (masks differ by process count) and no query BatchNorm (its running statistics are per rank).
    return tiny(data_dir, out_dir, model={"dropout": 0.0}, memory={"input_dropout": 0.0, "query_batchnorm": False,
                                                                   "shard_values": True},
                train={"max_steps": 4, "eval_every": 4, "eval_batches": 0, "checkpoint_every": 2, **train_options})


TABLE = "blocks.1.memory.values.weight"


@pytest.fixture(scope="module")
def even_data_dir(data_dir, tmp_path_factory):
    """data_dir's training split and a 1024-token validation split: its parts for 1, 2 or 4 ranks are whole
    bptt windows, so validation reads the same windows at every world size (they are cut at rank boundaries)."""
    root = tmp_path_factory.mktemp("even")
    (root / "train").symlink_to(data_dir / "train")
    rng = np.random.default_rng(1)
    write_split(root / "valid", [rng.integers(1, VOCAB, size=63).tolist() for _ in range(16)],
                vocab_size=VOCAB, vocab_hash="test-vocab", eos_id=0)
    return root


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_tables_match_one_process_and_evaluate_alone(even_data_dir, tmp_path, world):
    """W processes each holding 1/W of the value columns give the losses and weights of one process with
    grad_accum=W (same global batches); the checkpoint holds whole tables and evaluates in one process."""
    from pkmlm.evaluation import evaluate_checkpoint

    data_dir = even_data_dir
    config = _sharded(data_dir, tmp_path / "sharded")
    ranks = _torchrun(tmp_path, config, world)
    assert ranks[0]["state"][TABLE].shape == (64, 32 // world)  # each rank holds its columns only
    saved = load_checkpoint(list_checkpoints(tmp_path / "sharded")[-1])
    assert saved["model"][TABLE].shape == (64, 32)
    assert saved["optimizers"]["values"]["state"][0]["moments"].shape == (64, 2, 32)

    single = tiny(data_dir, tmp_path / "single", model={"dropout": 0.0},
                  memory={"input_dropout": 0.0, "query_batchnorm": False},
                  train={"max_steps": 4, "eval_every": 4, "eval_batches": 0, "grad_accum": world})
    one = train(Config.from_dict(single))
    for step, loss in one.losses.items():
        assert ranks[0]["losses"][step] == pytest.approx(loss, rel=1e-5)  # float sums in another order only
    # Tolerance: the value table within 1e-5; dense weights within 1e-4, 3% of one Adam step at lr 3e-3 (Adam divides
    # by sqrt(v), so a tiny gradient summed in another order can move an element by a visible part of a step).
    for name, a in one.model.state_dict().items():
        torch.testing.assert_close(saved["model"][name], a, rtol=1e-4, atol=1e-5 if name == TABLE else 1e-4, msg=name)
    # One process (no process group) loads the sharded run's checkpoint and finds the perplexity it reported.
    row = evaluate_checkpoint(tmp_path / "sharded", splits=["valid"])
    assert row["valid_loss"] == pytest.approx(ranks[0]["valid"], rel=1e-6)
    assert one.valid_loss == pytest.approx(ranks[0]["valid"], rel=1e-5)


def test_sharded_resume_is_exact_and_reshards_to_another_world_size(data_dir, tmp_path):
    import shutil

    whole = _torchrun(tmp_path, _sharded(data_dir, tmp_path / "whole"), 2)
    step2 = list_checkpoints(tmp_path / "whole")[0]
    assert load_checkpoint(step2)["step"] == 2
    for name in ("cut", "alone"):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        shutil.copy(step2, tmp_path / name / "checkpoints" / step2.name)
    # Same world size: bitwise the same steps 3 and 4 and the same tables.
    (tmp_path / "worker.py").write_text(WORKER.replace("train(Config", "train(resume='latest', config=Config"))
    cfg = _write_config(tmp_path / "cut.yaml", _sharded(data_dir, tmp_path / "cut"))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "worker.py"), cfg, str(tmp_path)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rest = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for r in range(2):
        assert rest[r]["losses"] == {s: whole[r]["losses"][s] for s in (3, 4)}
        assert torch.equal(rest[r]["state"][TABLE], whole[r]["state"][TABLE])
    # One process resumes the 2-process checkpoint: the whole table and moments, same trajectory up to rounding.
    alone = train(Config.from_dict(_sharded(data_dir, tmp_path / "alone")), resume="latest")
    assert alone.step == 4
    for s in (3, 4):
        assert alone.losses[s] == pytest.approx(whole[0]["losses"][s], rel=1e-5)
    final = load_checkpoint(list_checkpoints(tmp_path / "whole")[-1])["model"][TABLE]
    torch.testing.assert_close(alone.model.state_dict()[TABLE], final, rtol=1e-4, atol=1e-5)


DRIFT_WORKER = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, os.getcwd())
    import train as cli
    from pkmlm.optim import RowAdam
    step = RowAdam.step
    def drifting_step(self, closure=None):  # rank 1's table gets one extra ulp in row 0
        out = step(self, closure)
        if os.environ["RANK"] == "1":
            w = self.param_groups[0]["params"][0].data
            w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(1.0))
        return out
    RowAdam.step = drifting_step
    sys.exit(cli.main(sys.argv[1:]))
""")


def test_replica_drift_stops_the_run_with_a_clear_message(data_dir, tmp_path):
    (tmp_path / "drift.py").write_text(DRIFT_WORKER)
    cfg = _write_config(tmp_path / "c.yaml", tiny(data_dir, tmp_path / "run", train={"max_steps": 2,
                                                                                     "checkpoint_every": 2}))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "drift.py"), "--config", cfg], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("error: blocks.1.memory.values.weight differs between ranks (ranks [1] disagree "
                             "with rank 0)") == 2, proc.stderr[-3000:]  # every rank stops, one line each
    assert list_checkpoints(tmp_path / "run") == []  # nothing written from drifted replicas
