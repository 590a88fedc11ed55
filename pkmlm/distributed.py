"""Processes: the launcher's environment, the device, the process group and the few collectives that
evaluation and training share.

One process per device. The launcher is torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set for us),
Slurm's srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the master is the first host of the job), or nothing
(one process). NCCL on CUDA, gloo on CPU. Training's data-parallel wrapping, value-gradient sync and
preemption signals live in pkmlm/training/parallel.py.

A collective must be entered by every rank or by none: one that a subset of ranks enters (code that runs on
rank 0 alone calling a sharded model, say) waits until ``train.dist_timeout_s``. ``PKMLM_COLLECTIVE_CHECK=1``
(the tests set it) turns that hang into an immediate error naming where each rank is: see
``entering_collective``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
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
# PKMLM_COLLECTIVE_CHECK=1: every pkmlm collective first checks that all ranks entered it from the same place;
# a rank left alone there waits at most PKMLM_COLLECTIVE_CHECK_TIMEOUT_S (default below) for its peers.
CHECK_ENV, CHECK_TIMEOUT_ENV = "PKMLM_COLLECTIVE_CHECK", "PKMLM_COLLECTIVE_CHECK_TIMEOUT_S"
DEFAULT_CHECK_TIMEOUT_S = 60.0
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_check_group = None  # the gloo group the check talks over (None: the check is off)
_check_timeout_s = DEFAULT_CHECK_TIMEOUT_S


class DistributedError(UserError):
    """The launcher environment is inconsistent or incomplete."""


class CollectiveMismatch(UserError, RuntimeError):
    """PKMLM_COLLECTIVE_CHECK found ranks entering different collectives, or a rank alone in one: a bug."""


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


def init_process_group(env: DistEnv, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group (no-op for one process, or when the caller already joined one); returns whether
    this call created it (then its caller destroys it). A collective (or the rendezvous) that waits longer than
    ``timeout_s`` fails with an error on the ranks that wait, so a dead or stuck peer cannot hang the job."""
    if env.world_size == 1 or dist.is_initialized():
        return False
    os.environ.update(MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(seconds=timeout_s), device_id=device if device.type == "cuda" else None)
    start_collective_check(timeout_s)
    return True


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
    global _check_group
    _check_group = None
    if dist.is_initialized():
        dist.destroy_process_group()


def collective_check_timeout() -> float | None:
    """Seconds a rank waits for its peers in the collective check; None when PKMLM_COLLECTIVE_CHECK is off."""
    flag = os.environ.get(CHECK_ENV, "0").strip()
    if flag in ("", "0"):
        return None
    if flag != "1":
        raise DistributedError(f"{CHECK_ENV}={flag!r}: set it to 1 (check collectives) or 0 (off)")
    raw = os.environ.get(CHECK_TIMEOUT_ENV, str(DEFAULT_CHECK_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise DistributedError(f"{CHECK_TIMEOUT_ENV}={raw!r}: give a number of seconds > 0")
    return seconds


def start_collective_check(timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Under PKMLM_COLLECTIVE_CHECK=1, open the side group ``entering_collective`` talks over (all ranks call,
    right after joining the process group; ``init_process_group`` does). No-op when off or for one process.
    timeout_s: the process group's; the check waits no longer than that either."""
    global _check_group, _check_timeout_s
    timeout = collective_check_timeout()
    if timeout is None or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    _check_timeout_s = min(timeout, timeout_s)
    # gloo, whatever the main backend: the check sends a few CPU bytes, and gloo honours its own timeout.
    _check_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=_check_timeout_s))


def entering_collective(group=None) -> None:
    """Call before a collective on the default group. With PKMLM_COLLECTIVE_CHECK=1 every rank exchanges where it
    is (its call path through pkmlm: file, function, line of each frame) over a side group, and all raise
    CollectiveMismatch when the paths differ (two ranks in different collectives: the first collective a rank
    entered alone meets its peers' next one) or when peers do not arrive in time (they are in no pkmlm collective).
    No-op when the check is off, for one process, and for collectives on another ``group`` (the paths compared are
    those of the whole world)."""
    if _check_group is None or group not in (None, dist.group.WORLD):
        return
    here = _call_path()
    # One all-gather of an 8-byte digest per collective; the paths themselves travel only when they differ.
    digest = int.from_bytes(hashlib.blake2b("\n".join(here).encode(), digest_size=8).digest(), "little", signed=True)
    digests = torch.empty(dist.get_world_size(), dtype=torch.int64)
    try:
        dist.all_gather_into_tensor(digests, torch.tensor([digest]), group=_check_group)
        same = bool((digests == digest).all())
        everyone = [here] if same else [None] * dist.get_world_size()
        if not same:
            dist.all_gather_object(everyone, here, group=_check_group)
    except RuntimeError as e:  # gloo's timeout, or a peer that died: nobody else came
        raise CollectiveMismatch(
            f"rank {dist.get_rank()} entered a collective at {' > '.join(here[-4:])} and its peers did not join it "
            f"(gloo: {str(e).strip().splitlines()[0][:200]}): after {_check_timeout_s:g} s, a collective entered by a "
            f"subset of ranks or a peer stuck elsewhere; at once, a peer that died. Full path: {' > '.join(here)}"
        ) from None
    if not same:
        common = 0  # frames all paths share: what follows is where the ranks went different ways
        while all(len(p) > common and p[common] == everyone[0][common] for p in everyone):
            common += 1
        sites = "; ".join(f"rank {r} at {_from(p, common)}" for r, p in enumerate(everyone))
        raise CollectiveMismatch(
            f"ranks entered different collectives ({sites}): code that a subset of ranks runs alone reached a "
            f"collective (docs/architecture.md: collectives are entered by every rank or by none). Full paths: "
            + "; ".join(f"rank {r}: {' > '.join(p)}" for r, p in enumerate(everyone)))


def _call_path() -> tuple[str, ...]:
    """'file.py:function:line' of every pkmlm frame on the stack, outermost first (the root CLIs included)."""
    frames, frame = [], sys._getframe(2)
    root = os.path.dirname(_PACKAGE_DIR.rstrip(os.sep)) + os.sep
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(_PACKAGE_DIR) or (name.startswith(root) and os.path.dirname(name) + os.sep == root):
            frames.append(f"{os.path.relpath(name, root)}:{frame.f_code.co_name}:{frame.f_lineno}")
        frame = frame.f_back
    return tuple(reversed(frames))


def _from(path: tuple[str, ...], start: int, shown: int = 3) -> str:
    """The frames of ``path`` from ``start`` on: the first ``shown`` and the innermost."""
    part = list(path[max(0, start - 1):])
    if len(part) > shown + 1:
        part = part[:shown] + ["..."] + part[-1:]
    return " > ".join(part) if part else "(outside pkmlm)"


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Maximum of ``tensor`` over ranks in place (no-op for one process); returns it."""
    if dist.is_initialized():
        entering_collective()
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op for one process); returns it."""
    if dist.is_initialized():
        entering_collective()
        dist.all_reduce(tensor)
    return tensor


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s ``tensor`` on every rank, in place (no-op for one process); returns it."""
    if dist.is_initialized():
        entering_collective()
        dist.broadcast(tensor, src=src)
    return tensor


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` for one process). Trusted peers only: pickles."""
    if not dist.is_initialized():
        return [obj]
    entering_collective()
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def set_where_(tensor: torch.Tensor, where: torch.Tensor, values: torch.Tensor | float) -> None:
    """``tensor[where] = values`` in place, also for a DTensor (FSDP2's sharded parameters and their Adam moments):
    the whole tensor is gathered, written, and each rank keeps its own shard of it. where: a bool mask over
    tensor's leading dims or a LongTensor of dim-0 indices; values: a scalar or one row per selected row.
    Collective for a DTensor: every rank calls it with the same arguments (dead-slot re-initialisation draws the
    same numbers on every rank)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(tensor, DTensor):
        tensor[where.to(tensor.device)] = values
        return
    entering_collective()
    whole = tensor.full_tensor()
    whole[where.to(whole.device)] = values
    tensor.to_local().copy_(distribute_tensor(whole, tensor.device_mesh, tensor.placements).to_local())
