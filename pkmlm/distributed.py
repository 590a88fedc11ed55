"""Processes: the launcher's environment, the device, the process group and the few collectives that
evaluation and training share.

One process per device. The launcher is torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set for us),
Slurm's srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the master is the first host of the job), or nothing
(one process). NCCL on CUDA, gloo on CPU. Training's data-parallel wrapping, value-gradient sync and
preemption signals live in pkmlm/training/parallel.py.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist

from pkmlm.cli import UserError

DEFAULT_MASTER_PORT = 29500
# A collective waiting longer than this raises on every rank instead of hanging (train.dist_timeout_s).
DEFAULT_TIMEOUT_S = 1800.0


class DistributedError(UserError):
    """The launcher environment is inconsistent or incomplete."""


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT
    launcher: str = "none"  # none | torchrun | slurm

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read rank, world size and master address from torchrun's or Slurm's variables (torchrun wins)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher, keys = "torchrun", ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launcher, keys = "slurm", ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    else:
        return DistEnv()
    rank, world_size = _int_var(env, keys[0]), _int_var(env, keys[1])
    local_rank = _int_var(env, keys[2], default=0)
    if not 0 <= rank < world_size:
        raise DistributedError(f"{keys[0]}={rank} is outside [0, {keys[1]}={world_size})")
    port = _int_var(env, "MASTER_PORT", default=DEFAULT_MASTER_PORT)
    if launcher == "slurm" and "MASTER_ADDR" not in env and world_size > 1:
        addr = _first_slurm_host(env)
    else:
        addr = env.get("MASTER_ADDR", "127.0.0.1")
    return DistEnv(rank, world_size, local_rank, addr, port, launcher)


def _int_var(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    if key not in env:
        if default is None:
            raise DistributedError(f"environment variable {key} is not set")
        return default
    try:
        return int(env[key])
    except ValueError:
        raise DistributedError(f"environment variable {key}={env[key]!r} is not an integer") from None


def _first_slurm_host(env: Mapping[str, str]) -> str:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise DistributedError("under Slurm with several tasks, set SLURM_JOB_NODELIST or MASTER_ADDR")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True,
                             text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise DistributedError(f"`scontrol show hostnames {nodelist}` failed ({e}); set MASTER_ADDR instead") from None
    hosts = out.split()
    if not hosts:
        raise DistributedError(f"`scontrol show hostnames {nodelist}` printed no host; set MASTER_ADDR instead")
    return hosts[0]


def resolve_device(name: str, env: DistEnv) -> torch.device:
    """'auto' | 'cpu' | 'cuda' -> this process's device (cuda:LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda":
        raise ValueError(f"train.device must be auto, cpu or cuda, got {name!r}")
    if not torch.cuda.is_available():
        raise DistributedError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
    if env.local_rank >= torch.cuda.device_count():
        raise DistributedError(f"local rank {env.local_rank} has no GPU ({torch.cuda.device_count()} visible)")
    torch.cuda.set_device(env.local_rank)
    return torch.device("cuda", env.local_rank)


def init_process_group(env: DistEnv, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the process group (no-op for one process). A collective (or the rendezvous) that waits longer than
    ``timeout_s`` fails with an error on the ranks that wait, so a dead or stuck peer cannot hang the job."""
    if env.world_size == 1 or dist.is_initialized():
        return
    os.environ.update(MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(seconds=timeout_s), device_id=device if device.type == "cuda" else None)


# How gloo and NCCL report a peer that died or a collective that timed out (a RuntimeError, or torch's DistError).
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused",
              "remote process exited", "NCCL communicator was aborted", "ncclRemoteError")
_TIMED_OUT = ("Timed out", "timed out", "Timeout", "timeout", "Watchdog caught collective operation")


@contextmanager
def collective_errors(timeout_s: float = DEFAULT_TIMEOUT_S, setting: str = "the process-group timeout"
                      ) -> Iterator[None]:
    """Turn a collective that failed because a peer died or stayed away past ``timeout_s`` into one
    DistributedError line naming this rank and the likely cause, instead of torch's multi-line traceback.

    Anything else passes through unchanged. A no-op without a process group.
    """
    try:
        yield
    except RuntimeError as e:
        if not dist.is_initialized():
            raise
        text = str(e)
        lost, late = any(m in text for m in _PEER_LOST), any(m in text for m in _TIMED_OUT)
        if not (lost or late or isinstance(e, getattr(dist, "DistError", ()))):
            raise
        if lost:
            cause = ("a peer process died or closed its connection (killed, out of memory, or crashed: its own "
                     "output says which and why)")
        else:
            cause = (f"a collective waited longer than {timeout_s:g} s ({setting}) for a peer, which is stuck or "
                     "dead (see the other ranks' output)")
        raise DistributedError(f"rank {rank()} of {world_size()} stops: {cause}; the checkpoints written so far are "
                               "intact, --resume continues from the newest") from None


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Maximum of ``tensor`` over ranks in place (no-op for one process); returns it."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op for one process); returns it."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` for one process). Trusted peers only: pickles."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
