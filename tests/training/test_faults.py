"""Faults during training: a full disk while a checkpoint is written, a peer that dies or hangs, SIGKILL at any
moment (mid-step, mid-checkpoint, mid values-file write). Each ends in one line (exit 2) or resumes exactly.

The multi-process and SIGKILL cases start processes and are marked slow; each has a wall-clock limit, so a hang
fails the test instead of the suite.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from pkmlm import checkpoint as ckpt, distributed as D
from pkmlm.checkpoint import list_checkpoints, load_checkpoint
from pkmlm.config import Config
from pkmlm.training.trainer import train

from conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 64
LIMIT_S = 300  # wall-clock limit of each process a test starts


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, learnable_corpus):
    return learnable_corpus(tmp_path_factory.mktemp("data"), vocab=VOCAB, seed=0)


def tiny(data_dir, out_dir, values_file=None, **train) -> dict:
    """Two layers, one memory (so that memory.values_file applies), dropout on; 6 steps, a checkpoint every 2."""
    return {
        "model": {"n_layers": 2, "d_model": 32, "n_heads": 2, "dropout": 0.1, "max_seq_len": 16},
        "memory": {"positions": ["1:parallel"], "n_keys": 16, "heads": 2, "knn": 4, "k_dim": 16,
                   "values_file": str(values_file) if values_file else None},
        "data": {"dir": str(data_dir), "batch_size": 8, "bptt": 16},
        "train": {"out_dir": str(out_dir), "max_steps": 6, "lr": 1e-2, "warmup_steps": 2, "log_every": 1,
                  "eval_every": 3, "eval_batches": 2, "checkpoint_every": 2, "device": "cpu", **train},
    }


def _config_file(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env



def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# ---- a full disk while a checkpoint is written ------------------------------------------------------------------

def _state(step: int) -> dict:
    return {"format": 1, "config": {}, "model": {"w": torch.zeros(1000, 100)}, "optimizers": {}, "step": step,
            "rng": {"ranks": [ckpt.rng_state(torch.device("cpu"))]}, "data": {}, "vocab_hash": "v"}


def _full_disk(kind: str):
    """A torch.save that writes part of the file, then fails as a full disk makes it fail."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 the first bytes")
        if kind == "oserror":  # a Python file object: the write's own error
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")  # torch's zip writer, with its own file handle

    return real, save


@pytest.mark.parametrize("kind", ["oserror", "zip_writer"])
def test_full_disk_while_writing_a_checkpoint_is_one_clear_error(kind, tmp_path, monkeypatch):
    ckpt.save_checkpoint(_state(1), tmp_path, keep=3)
    before = (tmp_path / "checkpoints" / "step_0000001.pt").read_bytes()
    _, save = _full_disk(kind)
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.save_checkpoint(_state(2), tmp_path, keep=3)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "checkpoints" / "step_0000002.pt") in message
    needed = ckpt.state_bytes(_state(2))  # the tensors: 400,000 bytes of weights and the random states
    assert 400_000 < needed < 420_000 and f"no space left on the device (it needs about {needed:,} bytes" in message
    assert "free" in message and "--resume" in message
    # No partial file under any name; the previous checkpoint untouched.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000001.pt"]
    assert (tmp_path / "checkpoints" / "step_0000001.pt").read_bytes() == before


def test_other_errors_while_saving_keep_their_traceback(tmp_path, monkeypatch):
    def broken(obj, f, *args, **kwargs):
        raise RuntimeError("a bug, not a write failure")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        ckpt.save_checkpoint(_state(1), tmp_path, keep=1)


def test_state_bytes_counts_each_storage_once():
    w = torch.zeros(10, 10)
    assert ckpt.state_bytes({"a": w, "b": [w, w[1]], "c": (torch.zeros(3, dtype=torch.int64), 1, "x")}) == 424


@pytest.mark.slow
def test_full_disk_during_training_is_one_line_exit_2(data_dir, tmp_path, monkeypatch, capsys):
    """train.py as a user runs it: the step-2 checkpoint is written, step 4's finds the disk full."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_cli_faults", ROOT / "train.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    real, full = _full_disk("zip_writer")
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: (
        full if isinstance(obj, dict) and obj.get("step") == 4 else real)(obj, f, *a, **k))
    cfg = _config_file(tmp_path / "c.yaml", tiny(data_dir, tmp_path / "run"))
    assert cli.main(["--config", cfg]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = _errors(err)
    assert f"cannot write checkpoint {tmp_path / 'run' / 'checkpoints' / 'step_0000004.pt'}: no space" in line
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_0000002.pt"]


FULL_DISK_ON_RANK_0 = textwrap.dedent("""
    import errno, os, runpy, sys, torch
    real = torch.save
    def save(obj, f, *args, **kwargs):  # the disk fills up before the checkpoint of step 4
        if isinstance(obj, dict) and obj.get("step") == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *args, **kwargs)
    torch.save = save
    sys.argv = ["train.py", *sys.argv[1:]]
    runpy.run_path("train.py", run_name="__main__")
""")


def _two_processes(tmp_path, script: str, config: dict, *, kill_rank_1_after: float | None = None):
    """Launch ``script`` (train.py's arguments: --config) as ranks 0 and 1, as srun would; returns
    [(returncode, stderr)] per rank. Rank 1 is killed once rank 0 has ended when ``kill_rank_1_after`` is set.

    Output goes to files, not pipes: a pipe nobody reads would stall its writer, and with it the collectives.
    The compiled kernels are off: they are not what these tests are about, and a build would only cost time.
    """
    (tmp_path / "worker.py").write_text(script)
    cfg = _config_file(tmp_path / "c.yaml", config)
    port = str(free_port())
    logs = [open(tmp_path / f"rank{r}.err", "w+") for r in range(2)]
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), "--config", cfg], cwd=ROOT,
                              env=_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port, PKMLM_CPU_KERNELS="0"),
                              stdout=subprocess.DEVNULL, stderr=logs[r])
             for r in range(2)]
    try:
        procs[0].wait(timeout=LIMIT_S)
        if kill_rank_1_after is not None:
            try:
                procs[1].wait(timeout=kill_rank_1_after)
            except subprocess.TimeoutExpired:
                procs[1].kill()
        procs[1].wait(timeout=LIMIT_S)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    out = []
    for proc, log in zip(procs, logs):
        log.seek(0)
        out.append((proc.returncode, log.read()))
        log.close()
    return out


@pytest.mark.slow
def test_full_disk_on_rank_0_stops_every_rank(data_dir, tmp_path):
    """Rank 0 alone writes checkpoints: when its disk is full, rank 1 must not wait for it in the next collective."""
    out = tmp_path / "run"
    ranks = _two_processes(tmp_path, FULL_DISK_ON_RANK_0, tiny(data_dir, out, dist_timeout_s=600))
    for rank, (code, stderr) in enumerate(ranks):
        assert code == 2 and len(_errors(stderr)) == 1 and "Traceback" not in stderr, (rank, stderr[-3000:])
    assert "cannot write checkpoint" in _errors(ranks[0][1])[0] and "step_0000004.pt" in _errors(ranks[0][1])[0]
    assert "rank 1: stopping because rank 0 could not write the checkpoint of step 4" in _errors(ranks[1][1])[0]
    assert [p.name for p in list_checkpoints(out)] == ["step_0000002.pt"]


# ---- a peer that dies or hangs ---------------------------------------------------------------------------------

PEER_FAILS = textwrap.dedent("""
    import os, runpy, sys, time
    from pkmlm.training.trainer import Trainer
    original = Trainer._forward_backward
    def _forward_backward(self, ddp_model):
        if self.env.rank == 1 and self.step == 3:
            if os.environ["HOW"] == "dies":
                os._exit(137)  # as if killed (OOM killer, a node lost)
            time.sleep(3600)  # stuck (a deadlock, a hung file system)
        return original(self, ddp_model)
    Trainer._forward_backward = _forward_backward
    sys.argv = ["train.py", *sys.argv[1:]]
    runpy.run_path("train.py", run_name="__main__")
""")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["dies", "stuck"])
def test_a_dead_or_stuck_peer_ends_the_surviving_rank_in_one_line(how, data_dir, tmp_path):
    out = tmp_path / "run"
    script = PEER_FAILS.replace('os.environ["HOW"]', repr(how))
    ranks = _two_processes(tmp_path, script, tiny(data_dir, out, dist_timeout_s=15), kill_rank_1_after=1)
    code, stderr = ranks[0]
    assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
    [line] = _errors(stderr)
    assert line.startswith("error: rank 0 of 2 stops: "), line
    if how == "dies":
        assert "a peer process died or closed its connection" in line
    else:
        assert "a collective waited longer than 15 s (train.dist_timeout_s) for a peer" in line
    assert "--resume continues" in line
    assert [p.name for p in list_checkpoints(out)] == ["step_0000002.pt"]


def test_collective_errors_pass_other_errors_through(tmp_path):
    with pytest.raises(RuntimeError, match="gloo"), D.collective_errors():  # no process group: unchanged
        raise RuntimeError("gloo: Connection reset by peer")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(D.DistributedError, match="rank 0 of 1 stops: a peer process died"), D.collective_errors():
            raise RuntimeError("[pair.cc:537] Read error [127.0.0.1]:950: Connection reset by peer. This is ...")
        with pytest.raises(D.DistributedError, match=r"longer than 30 s \(train.dist_timeout_s\)"):
            with D.collective_errors(30, "train.dist_timeout_s"):
                raise RuntimeError("[unbound_buffer.cc:78] Timed out waiting 30000ms for recv operation to complete")
        with pytest.raises(RuntimeError, match="size mismatch"), D.collective_errors():
            raise RuntimeError("size mismatch")
    finally:
        dist.destroy_process_group()


# ---- SIGKILL at several moments --------------------------------------------------------------------------------

KILLED = textwrap.dedent("""
    import os, runpy, signal, sys, torch
    from pkmlm.training.trainer import Trainer
    from pkmlm.memory.values_file import ValuesFile
    point = os.environ["KILL_AT"]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if point == "mid-step":  # forward and backward of step 5 done, its update not
        original = Trainer._update
        def _update(self, loss):
            if self.step == 4:
                die()
            return original(self, loss)
        Trainer._update = _update
    elif point == "mid-checkpoint":  # part of step 4's checkpoint written to its temporary file
        real = torch.save
        def save(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and obj.get("step") == 4:
                f.write(b"PK\\x03\\x04 part of a checkpoint")
                f.flush()
                die()
            return real(obj, f, *args, **kwargs)
        torch.save = save
    else:  # the values file during step 3's update
        original = ValuesFile.before_update
        def before_update(self, rows):
            if int(self.journal_step()) == 2 and rows.numel():
                if point == "mid-journal":  # half of an undo record written
                    with open(self.undo, "ab") as f:
                        f.write(b"\\x05\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x05\\x00\\x00\\x00")
                        f.flush()
                        os.fsync(f.fileno())
                    die()
                original(self, rows)  # "mid-table": rows marked, then some changed (in the write-back cache)
                with torch.no_grad():
                    self.weight[rows[:3]] += 1.0
                    self.moments[rows[:3]] += 1.0
                die()
            return original(self, rows)
        ValuesFile.before_update = before_update
    sys.argv = ["train.py", *sys.argv[1:]]
    runpy.run_path("train.py", run_name="__main__")
""")


def _digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def never_killed(data_dir, tmp_path_factory):
    """The reference runs, one with the table in RAM and one in a values file: {values_file: (result, dir)}."""
    runs = {}

    def get(values_file: bool):
        if values_file not in runs:
            root = tmp_path_factory.mktemp("whole")
            result = train(Config.from_dict(tiny(data_dir, root / "run", values_file and root / "whole.values")))
            runs[values_file] = result, root
        return runs[values_file]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("point, values_file", [
    ("mid-step", False), ("mid-checkpoint", False),
    ("mid-step", True), ("mid-checkpoint", True), ("mid-journal", True), ("mid-table", True)])
def test_sigkill_at_any_moment_then_resume_continues_exactly(point, values_file, data_dir, tmp_path, never_killed):
    """A run killed (SIGKILL: no handler runs) mid-step, mid-checkpoint or mid values-file write: the newest
    checkpoint loads and `--resume` ends with the same losses and weights, bit for bit, as a run never killed."""
    whole, whole_dir = never_killed(values_file)
    (tmp_path / "worker.py").write_text(KILLED)
    config = tiny(data_dir, tmp_path / "run", values_file and tmp_path / "run.values")
    cfg = _config_file(tmp_path / "c.yaml", config)
    proc = subprocess.run([sys.executable, str(tmp_path / "worker.py"), "--config", cfg], cwd=ROOT,
                          # as many threads as this process: reductions (and so the last bits) depend on it
                          env={**_env(KILL_AT=point), "OMP_NUM_THREADS": str(torch.get_num_threads())},
                          capture_output=True, text=True, timeout=LIMIT_S)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    newest = list_checkpoints(tmp_path / "run")[-1]
    expected = {"mid-step": 4, "mid-checkpoint": 2, "mid-journal": 2, "mid-table": 2}[point]
    assert load_checkpoint(newest)["step"] == expected
    rest = train(Config.from_dict(config), resume="latest")  # what `train.py ... --resume` runs
    assert rest.losses == {s: loss for s, loss in whole.losses.items() if s > expected}  # bitwise
    assert rest.valid_loss == whole.valid_loss
    for (name, a), b in zip(whole.model.state_dict().items(), rest.model.state_dict().values()):
        assert torch.equal(a, b), name
    if values_file:
        for suffix in ("", ".adam", ".step"):
            assert _digest(tmp_path / f"run.values{suffix}") == _digest(whole_dir / f"whole.values{suffix}"), suffix
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if ".tmp." in p.name]
