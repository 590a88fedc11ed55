"""Data-parallel training: DDP or FSDP2 wrapping, sparse value gradients, replica checks, preemption signals.

Memory value tables get row-sparse gradients, which NCCL cannot all-reduce. Replicated tables are therefore hidden
from DDP and averaged here over the union of the rows any rank touched (``all_reduce_sparse_grads``), with dense
collectives that work on every backend; ``check_replicas`` verifies at checkpoint time that the copies agree.
Sharded tables (pkmlm/memory/value_table.py) need no gradient sync: DDP ignores them too.

``train.parallel: fsdp`` shards the dense parameters instead (FSDP2, ``fully_shard``: one group per memory, per
block's attention and feed-forward, per block, and the rest at the root), as torchtitan does; the value tables
stay outside FSDP exactly as under DDP. Checkpoints stay whole: ``full_state`` / ``full_optimizer_state`` gather
the shards, and a run resumes by loading the whole state into the plain model and optimizer before
``shard_model`` cuts it (each rank keeps its slice).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import warnings
from contextlib import contextmanager, nullcontext
from typing import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from pkmlm.config import PARALLEL
from pkmlm.distributed import (DistEnv, DistributedError, all_gather_object, all_reduce_max, entering_collective,
                               world_size)
from pkmlm.memory import ProductKeyMemory
from pkmlm.memory.sparse import coalesce_rows

# Exit status of a run that stopped on SIGUSR1/SIGTERM after checkpointing (EX_TEMPFAIL: "try again later").
PREEMPTED_EXIT_CODE = 75
# SIGUSR1 (Slurm's warning before the time limit): checkpoint, requeue the job, exit.
# SIGTERM (scancel, a shutdown, Slurm preemption that requeues by itself): checkpoint, exit, no requeue.
REQUEUE_SIGNAL = signal.SIGUSR1
STOP_SIGNAL = signal.SIGTERM


def wrap_model(model: nn.Module, env: DistEnv, device: torch.device, *, sparse_params: Iterable[nn.Parameter],
               sharded_params: Iterable[nn.Parameter] = (), sync_batchnorm: bool = False, parallel: str = "ddp",
               precision: str = "fp32", optimizers: Iterable[torch.optim.Optimizer] = ()) -> nn.Module:
    """Make ``model`` data-parallel (returned unchanged for one process), leaving ``sparse_params`` to us and
    ``sharded_params`` (each rank holds its own slice: pkmlm/memory/value_table.py) alone.

    parallel "ddp": a DistributedDataParallel wrapper is returned. "fsdp": ``shard_model`` shards the dense
    parameters in place and returns ``model`` itself; its parameters are then new DTensor objects, onto which
    ``optimizers`` (built on the plain model, possibly with a resumed state) are moved (``shard_optimizer``).
    BatchNorm statistics stay per rank between evaluations (``average_batchnorm_stats`` joins them) unless
    ``sync_batchnorm``. The ignored parameters are broadcast from rank 0 here, as DDP would have done for them.
    """
    if env.world_size == 1:
        return model
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    if sync_batchnorm and device.type != "cuda":
        raise DistributedError("train.sync_batchnorm=true needs CUDA devices (torch syncs BatchNorm on GPUs "
                               "only); set it to false on the CPU")
    if sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    sparse_ids = {id(p) for p in sparse_params}
    skipped = sparse_ids | {id(p) for p in sharded_params}
    entering_collective()  # the broadcasts below, and DDP's or FSDP's own of the other parameters
    for p in {id(p): p for n, p in model.named_parameters() if id(p) in sparse_ids}.values():
        dist.broadcast(p.data, src=0)
    if parallel == "fsdp":
        before = dict(model.named_parameters())
        shard_model(model, ignored={p for p in model.parameters() if id(p) in skipped}, precision=precision)
        successors = {id(before[name]): p for name, p in model.named_parameters()}
        for optimizer in optimizers:
            shard_optimizer(optimizer, successors)
        return model
    # Every name of a shared table, so that DDP skips it whichever module it finds it under.
    ignored = [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in skipped]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    if not any(p.requires_grad for n, p in model.named_parameters() if n not in ignored):
        return _NothingToSync(model)  # e.g. train.trainable=slots: only value tables train, DDP has no work
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   forward_sync_buffers=False)


def shard_model(model: nn.Module, *, ignored: set[nn.Parameter], precision: str = "fp32") -> nn.Module:
    """FSDP2 in place over the default process group: ``fully_shard`` each memory, each block's attention and
    feed-forward, each block (its norms), then the root (embeddings, final norm), as torchtitan groups a model.

    ``ignored`` (the value tables, row-sparse or already sharded) stay plain tensors outside FSDP. Every rank must
    hold the same weights when called (the same seed, or the same checkpoint loaded). Mixed precision for bf16: the
    attention and feed-forward weights are all-gathered in bf16 and their gradients reduce-scattered in fp32; the
    rest (norms, embeddings, the memories' keys and query network) gathers fp32 weights and no input is cast. So
    every op sees the dtypes ``torch.autocast`` (on either way) gives it under DDP: autocast runs those matmuls in
    bf16 from weights rounded the same way, and keeps the residual stream and norms in fp32.
    """
    # Memory, attention and FFN return reshaped views; FSDP warns that an in-place op on one would skip its backward
    # hook. The blocks add them out of place (x = x + ...), so the warning would only alarm.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP(ProductKeyMemory|CausalSelfAttention|"
                            r"FeedForward)\) returned a view")
    fp32 = MixedPrecisionPolicy()
    matmuls = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                   cast_forward_inputs=False) if precision == "bf16" else fp32
    for module in model.modules():
        if isinstance(module, ProductKeyMemory) and _owns_parameters(module, ignored):
            fully_shard(module, mp_policy=fp32, ignored_params=ignored)
    for block in getattr(model, "blocks", ()):
        for part in (getattr(block, "attn", None), getattr(block, "ffn", None)):
            if part is not None:
                fully_shard(part, mp_policy=matmuls, ignored_params=ignored)
        fully_shard(block, mp_policy=fp32, ignored_params=ignored)
    fully_shard(model, mp_policy=fp32, ignored_params=ignored)
    return model


def _owns_parameters(module: nn.Module, ignored: set[nn.Parameter]) -> bool:
    return any(p not in ignored for p in module.parameters())


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Context for one micro-batch's backward: average the grads over ranks (``enabled``) or only accumulate
    them locally (DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync(False)``)."""
    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        yield
    else:
        yield


def is_shard(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (an FSDP parameter, its gradient or its optimizer state)."""
    return isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: the local shard of a DTensor, else ``t`` itself (no copy, no collective)."""
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def full_state(model: nn.Module, state: dict | None) -> dict | None:
    """``state`` (rank 0's ``VT.gather_state(model)``, None elsewhere) with every FSDP shard gathered whole,
    on the CPU; None on other ranks. All ranks must call (one all-gather per sharded tensor, in name order)."""
    for name, value in model.state_dict().items():
        if isinstance(value, DTensor):
            whole = value.full_tensor()
            if state is not None:
                state[name] = whole.cpu()
    return state


@torch.no_grad()
def full_optimizer_state(state: dict) -> dict:
    """An optimizer's ``state_dict()`` with its DTensor moments gathered whole (on the CPU): the format one
    process writes, so checkpoints load at any world size. All ranks must call."""
    out = {**state, "state": {}}
    for index, entries in state["state"].items():
        out["state"][index] = {k: v.full_tensor().cpu() if isinstance(v, DTensor) else v for k, v in entries.items()}
    return out


@torch.no_grad()
def shard_optimizer(optimizer: torch.optim.Optimizer, new_params: dict[int, nn.Parameter]) -> None:
    """Point ``optimizer`` at the parameters ``shard_model`` made: ``new_params`` maps id(old param) to its
    DTensor successor. Whole moments (a fresh or resumed optimizer) are cut to this rank's shard."""
    for group in optimizer.param_groups:
        group["params"] = [new_params.get(id(p), p) for p in group["params"]]
    moved = {}
    for old, entries in optimizer.state.items():
        new = new_params.get(id(old), old)
        moved[new] = {k: _like(v, new) for k, v in entries.items()}
    optimizer.state.clear()
    optimizer.state.update(moved)


def _like(value, param: nn.Parameter):
    """A whole per-element state tensor of ``param`` as a DTensor sharded like it (each rank slices its own
    part: no communication); anything else (step counts) unchanged."""
    if not isinstance(param, DTensor) or not isinstance(value, torch.Tensor) or value.shape != param.shape:
        return value
    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


class _NothingToSync(nn.Module):
    """The model as is, with DDP's ``no_sync()``, for a run whose every gradient is synced outside DDP."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def no_sync(self):
        return nullcontext()


@torch.no_grad()
def all_reduce_sparse_grads(params: Iterable[nn.Parameter]) -> None:
    """Average the gradients of ``params`` over ranks in place; row-sparse ones stay row-sparse.

    A row-sparse grad (rows, dim) becomes the average over the union U of the rows any rank touched: the
    union is agreed first (``union_rows``: ids or a bitmap, whichever is smaller), each rank scatters its
    summed rows into a zeroed (|U|, dim) buffer, and one all_reduce sums the buffers. Per rank this moves
    and holds |U| x dim values (ring all-reduce: about twice that on the wire), never more than a dense
    all-reduce of the table, and every rank gets the same bits. Dense grads are all-reduced. Every rank
    must call this with the same parameters in the same order.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    entering_collective()
    for p in params:
        if p.grad is None:
            raise RuntimeError("a memory value table got no gradient on this rank; all ranks must use every memory")
        if not p.grad.is_sparse:
            dist.all_reduce(p.grad)
            p.grad.div_(world)
            continue
        grad = coalesce_rows(p.grad)
        rows, values = grad._indices()[0], grad._values()
        union = union_rows(rows, grad.shape[0])
        summed = values.new_zeros((union.numel(), *values.shape[1:]))
        summed.index_copy_(0, torch.searchsorted(union, rows), values)
        del grad, values
        p.grad = None  # frees this rank's rows before the all-reduce
        dist.all_reduce(summed)
        summed.div_(world)
        p.grad = torch.sparse_coo_tensor(union.unsqueeze(0), summed, p.shape, is_coalesced=True,
                                         check_invariants=False)


def union_rows(rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The sorted union over ranks of each rank's unique row ids ``rows`` (R,) in [0, num_rows): (U,) int64.

    All ranks must call. Sends world x max(R) int32 ids (all_gather) or a num_rows-byte bitmap (all_reduce
    MAX), whichever is smaller; both give every rank the same union.
    """
    world = world_size()
    if world == 1:
        return rows.long()
    longest = all_reduce_max(torch.tensor([rows.numel()], device=rows.device))
    longest = int(longest)
    id_dtype = torch.int32 if num_rows < 2**31 else torch.int64
    if world * longest * id_dtype.itemsize < num_rows:
        padded = torch.full((longest,), -1, dtype=id_dtype, device=rows.device)
        padded[:rows.numel()] = rows
        everyone = padded.new_empty(world * longest)
        dist.all_gather_single(everyone, padded)
        return torch.unique(everyone[everyone >= 0]).long()  # sorted
    touched = torch.zeros(num_rows, dtype=torch.uint8, device=rows.device)
    touched[rows] = 1
    dist.all_reduce(touched, op=dist.ReduceOp.MAX)
    return touched.nonzero().flatten()


class ReplicaDriftError(DistributedError):
    """A tensor that must be identical on every rank is not."""


@torch.no_grad()
def check_replicas(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Raise ReplicaDriftError on every rank when a tensor differs between ranks (all ranks must call).

    Each rank hashes its copy of each tensor (blake2b of the bytes: exact, ~1 s per GB on a CPU core) and
    all-gathers the digests, so the check moves a few bytes per tensor. Meant for checkpoint time.
    """
    if world_size() == 1:
        return
    named = list(named_tensors)
    everyone = all_gather_object([_digest(t) for _, t in named])
    names = [name for name, _ in named]
    for i, name in enumerate(names):
        values = [d[i] for d in everyone]
        if len(set(values)) > 1:
            odd = [r for r, v in enumerate(values) if v != values[0]]
            raise ReplicaDriftError(
                f"{name} differs between ranks (ranks {odd} disagree with rank 0): the replicas drifted apart, "
                "so this run's weights are no longer one model. Not checkpointing; resume from the last "
                "checkpoint (each rank then loads the same weights), and report it if it recurs")


def _digest(t: torch.Tensor, chunk_bytes: int = 1 << 26) -> str:
    h = hashlib.blake2b(digest_size=16)
    flat = t.detach().contiguous().view(-1).view(torch.uint8)
    for start in range(0, flat.numel(), chunk_bytes):
        h.update(flat[start:start + chunk_bytes].cpu().numpy())
    return h.hexdigest()


@torch.no_grad()
def average_batchnorm_stats(model: nn.Module) -> None:
    """Average every BatchNorm's running mean and variance over ranks in place (all ranks must call).

    Each rank's statistics follow its own batches; validation and checkpoints should use those of all the
    data, so the trainer averages them first (a few vectors). No-op for one process.
    """
    if world_size() == 1:
        return
    entering_collective()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None:
            for stat in (m.running_mean, m.running_var):
                dist.all_reduce(stat)
                stat.div_(world_size())


class PreemptionHandler:
    """Turns SIGUSR1 (Slurm's advance warning: requeue) and SIGTERM (stop) into a flag the loop polls between
    steps; ``signal`` is the last one received (SIGTERM is kept once seen: a stop is never turned into a requeue)."""

    SIGNALS = (REQUEUE_SIGNAL, STOP_SIGNAL)

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def install(self) -> "PreemptionHandler":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signal != STOP_SIGNAL:
            self.signal = signal.Signals(signum)

    @property
    def requested(self) -> bool:
        return self.signal is not None


def requeue_slurm_job(environ: Mapping[str, str] | None = None) -> bool:
    """``scontrol requeue $SLURM_JOB_ID`` when running under Slurm; returns whether a requeue was asked for."""
    env = os.environ if environ is None else environ
    job = env.get("SLURM_JOB_ID")
    if not job:
        return False
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    return result.returncode == 0
