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

from pkmlm.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from pkmlm.config import Config, load_config
from pkmlm.data.shards import write_split
from pkmlm.models.transformer import TransformerLM
from pkmlm.training.trainer import TrainingError, clip_grad_norm_, train

from conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 64


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, random_corpus):
    """A random-token corpus: 8k training tokens, 1k validation tokens."""
    return random_corpus(tmp_path_factory.mktemp("data"), {"train": (160, 50), "valid": (20, 50)}, vocab=VOCAB,
                         vocab_hash="test-vocab", eos_id=0, low=1)


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
    with pytest.raises(Exception, match="train.weight_decay: 0.0 in checkpoint, 0.1 now"):
        train(Config.from_dict(tiny(data_dir, tmp_path, train={"max_steps": 2, "weight_decay": 0.1})),
              resume="latest")


def test_resume_from_an_older_checkpoint_sets_the_newer_ones_aside(data_dir, tmp_path, capsys):
    """Checkpoints 2 and 4; --resume step 2 with keep_checkpoints=1: step 4 (and the best.pt of that run) go to
    checkpoints/abandoned-*/, the new step 3 is kept, and the next --resume continues the new run, not step 4."""
    train(Config.from_dict(tiny(data_dir, tmp_path, train={"max_steps": 4, "checkpoint_every": 2,
                                                           "eval_every": 4, "keep_best": True})))
    (tmp_path / "checkpoints" / ".step_0000006.pt.tmp.4242").write_bytes(b"killed mid-write")
    capsys.readouterr()
    older = tmp_path / "checkpoints" / "step_0000002.pt"
    second = Config.from_dict(tiny(data_dir, tmp_path, train={"max_steps": 3, "lr": 1e-3, "keep_checkpoints": 1,
                                                              "eval_every": 4, "keep_best": True}))
    train(second, resume=older)
    err = capsys.readouterr().err
    assert "removed 1 temporary file(s) of an interrupted checkpoint write: .step_0000006.pt.tmp.4242" in err
    assert "set aside step_0000004.pt, best.pt into" in err and "from step 2 abandons" in err
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000003.pt"]  # the one just written survives
    [folder] = (tmp_path / "checkpoints").glob("abandoned-*")
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "step_0000004.pt"]
    assert load_checkpoint(folder / "step_0000004.pt")["step"] == 4
    # The new run's own best: its validation at its last step (3), not the abandoned run's step 4.
    assert load_checkpoint(tmp_path / "checkpoints" / "best.pt")["step"] == 3
    third = train(Config.from_dict(tiny(data_dir, tmp_path, train={"max_steps": 4, "lr": 1e-3, "eval_every": 4})),
                  resume="latest")
    assert "resumed from" in capsys.readouterr().err and min(third.losses) == 4  # continued from step 3


def test_keep_best_keeps_the_lowest_validation_loss(data_dir, tmp_path):
    """best.pt: a whole checkpoint at the best validation, never pruned, evaluated and resumed like any other."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pkmlm.eval.evaluation import evaluate_checkpoint, find_checkpoint

    config = tiny(data_dir, tmp_path, model={"dropout": 0.0}, memory={"input_dropout": 0.0},
                  train={"max_steps": 6, "eval_every": 1, "eval_batches": 0, "checkpoint_every": 2,
                         "keep_checkpoints": 1, "keep_best": True, "lr": 3e-2})
    train(Config.from_dict(config))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    valid = {e.step: e.value for e in events.Scalars("valid/loss")}
    best_step = min(valid, key=valid.get)
    state = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert state["step"] == best_step and state["best"]["step"] == best_step
    assert state["best"]["valid_loss"] == pytest.approx(valid[best_step], rel=1e-6)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000006.pt"]
    assert find_checkpoint(tmp_path).name == "step_0000006.pt"  # a run directory means its newest step
    row = evaluate_checkpoint(tmp_path / "checkpoints" / "best.pt", splits=["valid"])
    assert row["step"] == best_step and row["valid_loss"] == pytest.approx(valid[best_step], rel=1e-6)
    assert load_checkpoint(tmp_path / "checkpoints" / "step_0000006.pt")["best"] == state["best"]


def test_keep_best_off_writes_no_best(data_dir, tmp_path):
    train(Config.from_dict(tiny(data_dir, tmp_path, train={"max_steps": 2, "eval_every": 1})))
    assert not (tmp_path / "checkpoints" / "best.pt").exists()
    assert load_checkpoint(list_checkpoints(tmp_path)[-1])["best"] is None


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
def learnable_dir(tmp_path_factory, learnable_corpus):
    """A corpus with something to learn: each document counts up by a fixed stride (mod the vocabulary)."""
    return learnable_corpus(tmp_path_factory.mktemp("learnable"), vocab=VOCAB, seed=1)


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


def test_progress_off_a_terminal_is_plain_lines_and_partial_validation_says_so(data_dir, tmp_path, capsys):
    # Under pytest stderr is not a terminal: no carriage-return bar, one line per logged step.
    train(Config.from_dict(tiny(data_dir, tmp_path / "part", train={"max_steps": 4, "eval_every": 4})))
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if " | " in line]
    assert [line.split(" | ")[0] for line in lines] == ["step 2/4", "step 4/4"], err
    assert all(f" {k} " in f" {line} " for line in lines for k in ("loss", "ppl", "lr", "tok_s", "elapsed", "ETA"))
    assert "(first 2 batches per rank, ~" in err and "evaluate.py reads all of it" in err
    train(Config.from_dict(tiny(data_dir, tmp_path / "whole", train={"max_steps": 1, "eval_batches": 0})))
    assert "valid loss" in (err := capsys.readouterr().err) and "batches per rank" not in err


def test_divergence_advice_works_resume_with_lower_lr(data_dir, tmp_path, monkeypatch, capsys):
    """The divergence message advises a lower train.lr (etc.) on resume: that resume must be accepted and used."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(Config.from_dict(tiny(data_dir, tmp_path, train={"max_steps": 2})))
    with monkeypatch.context() as m:
        _nan_on_calls(m, "all")
        with pytest.raises(TrainingError, match="lower train.lr"):
            train(Config.from_dict(tiny(data_dir, tmp_path, train={"max_steps": 6, "max_nonfinite": 2})),
                  resume="latest")
    capsys.readouterr()
    advice = {"lr": 1e-3, "warmup_steps": 4, "grad_clip": 0.5, "precision": "bf16"}
    result = train(Config.from_dict(tiny(data_dir, tmp_path, train={"max_steps": 4, **advice})), resume="latest")
    assert result.step == 4 and all(np.isfinite(v) for v in result.losses.values())
    err = capsys.readouterr().err
    for change in ("train.lr: 0.003 -> 0.001", "train.warmup_steps: 2 -> 4", "train.grad_clip: 1.0 -> 0.5",
                   "train.precision: 'fp32' -> 'bf16'"):
        assert f"resuming with a changed {change}" in err
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    lr = {e.step: e.value for e in events.Scalars("lr/dense")}
    assert lr[4] == pytest.approx(1e-3)  # the new lr at the new warmup's end (step 4 of 4), not the saved 3e-3
    assert load_config(tmp_path / "config.yaml").train.lr == 1e-3


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


@pytest.mark.slow
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
    (["train.out_dir=c.yaml"], "is a file, not a directory"),
])
@pytest.mark.slow
def test_cli_errors_are_one_line_exit_2(args, message, data_dir, tmp_path):
    cfg = _write_config(tmp_path / "c.yaml", tiny(data_dir, tmp_path / "run"))
    args = [a.replace("=c.yaml", f"={cfg}") for a in args]
    proc = subprocess.run([sys.executable, "train.py", "--config", cfg, *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def _broken_copy(data_dir, tmp_path, case):
    """A copy of ``data_dir`` with one class of bad data."""
    import json
    import shutil
    root = tmp_path / "data"
    shutil.copytree(data_dir, root)
    manifest = root / "train" / "manifest.json"
    m = json.loads(manifest.read_text())
    if case == "empty valid split":
        write_split(root / "valid", [], vocab_size=VOCAB, vocab_hash="test-vocab", eos_id=0)
    elif case == "id outside the vocabulary":
        shard = root / "train" / m["shards"][0]["file"]
        ids = np.fromfile(shard, dtype=np.uint16)
        ids[::7] = VOCAB + 3
        ids.tofile(shard)
    elif case == "eos outside the vocabulary":
        manifest.write_text(json.dumps({**m, "eos_id": VOCAB}))
    elif case == "shard outside the split":
        (root / "stolen.bin").write_bytes((root / "train" / m["shards"][0]["file"]).read_bytes())
        m["shards"][0]["file"] = "../stolen.bin"
        manifest.write_text(json.dumps(m))
    elif case == "string vocab_size":
        manifest.write_text(json.dumps({**m, "vocab_size": str(VOCAB)}))
    return root


@pytest.mark.parametrize("case, message", [
    ("empty valid split", "holds no tokens, and validation needs some"),
    ("id outside the vocabulary", f"is outside the vocabulary [0, {VOCAB}) (corrupt or foreign shard)"),
    ("eos outside the vocabulary", f"eos_id {VOCAB} is outside the vocabulary"),
    ("shard outside the split", "'../stolen.bin' is not a plain file name inside"),
    ("string vocab_size", "'vocab_size' must be an integer"),
])
@pytest.mark.slow
def test_cli_bad_data_is_one_line_exit_2(case, message, data_dir, tmp_path):
    root = _broken_copy(data_dir, tmp_path, case)
    cfg = _write_config(tmp_path / "c.yaml", tiny(root, tmp_path / "run"))
    proc = subprocess.run([sys.executable, "train.py", "--config", cfg], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    # Found while training (ids are checked as they are read): progress and log lines may precede the one error
    # line, which ends the output.
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    assert errors == lines[-1:] and errors[0].startswith("error: "), proc.stderr
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))


@pytest.mark.slow
def test_cli_crafted_checkpoints_are_one_line_exit_2(data_dir, tmp_path):
    out = tmp_path / "run"
    config = tiny(data_dir, out, train={"max_steps": 1})
    train(Config.from_dict(config))
    state = load_checkpoint(list_checkpoints(out)[-1])
    cases = {
        "no rng": ({**state, "rng": {}}, "damaged or not written by pkmlm: 'rng' lacks"),
        "model a list": ({**state, "model": list(state["model"].values())}, "'model' is a list, not a dict"),
        "weights missing": ({**state, "model": {k: v for k, v in list(state["model"].items())[1:]}},
                            "does not fit this run (Missing key(s)"),
        "optimizer of another model": ({**state, "optimizers": {"dense": {}, "values": None}},
                                       "does not fit this run"),
        "rng of another kind": ({**state, "rng": {"ranks": [{**state["rng"]["ranks"][0],
                                                             "torch": torch.zeros(5, dtype=torch.uint8)}]}},
                                "does not fit this run"),
    }
    longer = {**config, "train": {**config["train"], "max_steps": 3}}
    for name, (crafted, message) in cases.items():  # in process: fast
        torch.save(crafted, tmp_path / f"{name}.pt")
        with pytest.raises(CheckpointError) as err:
            train(Config.from_dict(longer), resume=tmp_path / f"{name}.pt")
        assert message in str(err.value) and "\n" not in str(err.value), name
    # and one through the command line
    proc = subprocess.run([sys.executable, "train.py", "--config", _write_config(tmp_path / "c.yaml", longer),
                           "--resume", str(tmp_path / "weights missing.pt")], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and "does not fit this run (Missing key(s)" in proc.stderr


def test_cli_prints_inf_perplexity_for_a_huge_loss(monkeypatch, capsys):
    """A finite loss too large for exp() (e.g. 1e4 nats) is reported as perplexity inf, not an OverflowError."""
    import importlib.util

    from pkmlm.training.trainer import TrainResult
    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    monkeypatch.setattr(cli, "load_config", lambda *a, **k: None)
    monkeypatch.setattr(cli, "train", lambda *a, **k: TrainResult(step=3, valid_loss=1e4))
    assert cli.main(["--config", "x.yaml"]) == 0
    assert "step 3: valid loss 10000.0000, perplexity inf" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_print_config(data_dir, tmp_path):
    cfg = _write_config(tmp_path / "c.yaml", tiny(data_dir, tmp_path / "run"))
    proc = subprocess.run([sys.executable, "train.py", "--config", cfg, "--print-config", "train.max_steps=77"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["train"]["max_steps"] == 77
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_preemption_checkpoints_requeues_and_resumes(sig, data_dir, tmp_path):
    """Under (fake) Slurm: finish the step, checkpoint, exit 75; SIGUSR1 (the time-limit warning) also runs
    `scontrol requeue`, SIGTERM (scancel) does not. --resume goes on."""
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
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr
    if sig == signal.SIGUSR1:
        assert log.read_text().split() == ["requeue", "777"] and "asked Slurm to requeue" in stderr
    else:
        assert not log.exists() and "not requeued (SIGTERM" in stderr
        return
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
    from pkmlm.training.trainer import train
    result = train(Config.from_dict(yaml.safe_load(open(sys.argv[1]))))
    rank = int(__import__("os").environ["RANK"])
    torch.save({"state": result.model.state_dict(), "losses": result.losses, "valid": result.valid_loss},
               f"{sys.argv[2]}/rank{rank}.pt")
""")


NAN_ON_RANK1 = textwrap.dedent("""
    import runpy, sys, torch
    from pkmlm.training.trainer import Trainer
    original = Trainer._save
    def _save(self, **kw):
        if self.env.rank == 1 and self.step == 2:  # one rank's weights go bad (e.g. a broken device)
            with torch.no_grad():
                next(self.model.parameters()).view(-1)[0] = float("nan")
        return original(self, **kw)
    Trainer._save = _save
    sys.argv = ["train.py", *sys.argv[1:]]
    runpy.run_path("train.py", run_name="__main__")
""")



@pytest.mark.slow
def test_nonfinite_weights_on_one_rank_stop_every_rank(data_dir, tmp_path):
    """2 processes (launched as srun/torchrun would: RANK, WORLD_SIZE, MASTER_*): a NaN weight on rank 1 alone is
    found at the checkpoint by both ranks together; both exit 2 with one error line, nobody waits in a collective
    (the process-group timeout bounds the test if one did), the earlier checkpoint is kept."""
    (tmp_path / "worker.py").write_text(NAN_ON_RANK1)
    out = tmp_path / "run"
    cfg = _write_config(tmp_path / "c.yaml", tiny(data_dir, out, train={
        "max_steps": 4, "checkpoint_every": 1, "eval_every": 100, "dist_timeout_s": 120}))
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), "--config", cfg], cwd=ROOT,
                              env=_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    results = [p.communicate(timeout=400) for p in procs]
    # A rank left waiting in a collective would fail after dist_timeout_s with a traceback and another status.
    for rank, (proc, (_, stderr)) in enumerate(zip(procs, results)):
        errors = [line for line in stderr.splitlines() if "error:" in line]
        assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in stderr, (rank, stderr[-3000:])
        assert errors[0].startswith("error: refusing to checkpoint at step 2: "), errors
    assert "holds NaN or inf on rank 1" in results[1][1] and "a peer's weights hold NaN or inf" in results[0][1]
    assert [p.name for p in list_checkpoints(out)] == ["step_0000001.pt"]


@pytest.mark.slow
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
@pytest.mark.slow
def test_sharded_tables_match_one_process_and_evaluate_alone(even_data_dir, tmp_path, world):
    """W processes each holding 1/W of the value columns give the losses and weights of one process with
    grad_accum=W (same global batches); the checkpoint holds whole tables and evaluates in one process."""
    from pkmlm.eval.evaluation import evaluate_checkpoint

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


@pytest.mark.slow
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
    from pkmlm.training.optim import RowAdam
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


@pytest.mark.slow
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
