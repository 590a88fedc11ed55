"""Memory value tables sharded over processes by columns (``memory.shard_values: true``).

    table = ShardedValueTable(n_keys**2, v_dim)        # after the process group is up; world must divide v_dim
    out = table.read(slots, weights)                   # (N, R) slots and weights -> (N, v_dim)

Process r holds columns [r * v_dim / W, (r + 1) * v_dim / W) of every row, and the optimizer state of those
columns only. A read gathers the batch's slot ids and weights from every rank (all_gather_single), reads
its column slice for every token of the batch, and sends each rank its own tokens' slices back (all_to_all):
every rank then has full-width outputs for its tokens. The backward runs the same exchange in reverse; each
rank gets the exact gradient of its columns over the whole global batch, so the table needs no gradient sync.
Why columns and not rows: any slot's owner is every rank, so no request routing, no variable-size exchange
and no load imbalance from popular slots (Berges et al. 2024, "Memory Layers at Scale", shard the same way).

Checkpoints hold full tables: ``gather_state`` assembles them on rank 0, ``local_state`` cuts a full state
back to this rank's columns, whatever world size wrote it (so a run resumes at any world size dividing
v_dim, and one process can load it). At world size 1 the table is a plain full table.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pkmlm import distributed as D
from pkmlm.memory import kernels
from pkmlm.memory.sparse import row_sparse_grad

INIT_CHUNK_ROWS = 4096  # a multiple of 16: chunked normal_ then draws the numbers one whole-table normal_ would


class ShardedValueTable(nn.Module):
    """A (num_rows, dim) value table of which this process holds ``dim // world`` columns.

    ``weight`` is the local shard (num_rows, dim // world); ``num_embeddings``, ``embedding_dim`` are the full
    sizes. Initialised N(0, dim**-0.5) exactly as a replicated table built with the same seed. Every rank
    must call ``read`` the same number of times, in the same order (training steps, evaluation and the training
    loop's samples do): a read is a collective, so code that runs on one rank alone must not read a sharded
    table (PKMLM_COLLECTIVE_CHECK=1 makes such a read fail at once instead of hanging: pkmlm/distributed.py).
    """

    sparse = True  # row-sparse gradient: pkmlm.training.optim gives the shard to RowAdam
    mode = "sum"

    def __init__(self, num_rows: int, dim: int, *, group: dist.ProcessGroup | None = None):
        super().__init__()
        self.group = group
        self.world = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        if dim % self.world:
            raise ValueError(f"memory.shard_values: {self.world} processes do not divide v_dim={dim}; "
                             f"run on a number of processes that divides {dim}, or set memory.v_dim")
        self.num_embeddings, self.embedding_dim = num_rows, dim
        self.shard_dim = dim // self.world
        self.weight = nn.Parameter(torch.empty(num_rows, self.shard_dim))
        self.reset_parameters()

    @property
    def columns(self) -> slice:
        """This rank's columns of the full table."""
        return slice(self.rank * self.shard_dim, (self.rank + 1) * self.shard_dim)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Full-width rows drawn chunk by chunk, this rank keeping its columns: the numbers (and the generator's
        # state after) of one normal_ over the whole table, without ever holding it.
        # normal_ draws 16 numbers at a time and redraws a ragged tail's last 16: so chunks of a multiple of 16
        # rows, the last one taking the remainder (a tail chunk under 16 numbers would be drawn another way).
        starts = list(range(0, self.num_embeddings - INIT_CHUNK_ROWS, INIT_CHUNK_ROWS)) or [0]
        for start, stop in zip(starts, starts[1:] + [self.num_embeddings]):
            rows = stop - start
            full = torch.empty(rows, self.embedding_dim).normal_(0.0, self.embedding_dim**-0.5)
            self.weight[start:start + rows] = full[:, self.columns]

    def read(self, slots: Tensor, weights: Tensor) -> Tensor:
        """sum_r weights[n, r] * table[slots[n, r]] for this rank's N tokens: slots (N, R) long, weights (N, R)
        -> (N, dim). Autograd reaches ``weights`` and the local shard (row-sparse, averaged over ranks like DDP)."""
        return _ShardedRead.apply(weights, self.weight, slots, self)

    @torch.no_grad()
    def write_rows(self, rows: Tensor, values: Tensor) -> None:
        """Set full-width rows (R,) to ``values`` (R, dim), the same on every rank; each rank keeps its columns."""
        w = self.weight
        w.index_copy_(0, rows.to(w.device), values[:, self.columns].to(device=w.device, dtype=w.dtype))

    def gather_columns(self, shard: Tensor) -> Tensor | None:
        """(..., dim // world) on every rank -> (..., dim) on rank 0, None elsewhere (all ranks must call)."""
        if self.world == 1:
            return shard.detach().clone()
        D.entering_collective(self.group)
        shard = shard.detach().contiguous()
        parts = [torch.empty_like(shard) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(shard, parts, dst=0, group=self.group)
        return torch.cat(parts, dim=-1) if self.rank == 0 else None

    def local_columns(self, full: Tensor) -> Tensor:
        """(..., dim) -> this rank's (..., dim // world)."""
        if full.shape[-1] != self.embedding_dim:
            raise ValueError(f"a full value table has {self.embedding_dim} columns, got shape {tuple(full.shape)}")
        return full[..., self.columns].clone()

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings} x {self.embedding_dim}, columns {self.columns.start}:{self.columns.stop} "
                f"on rank {self.rank} of {self.world}")


class _ShardedRead(torch.autograd.Function):
    """weights (N, R), shard (rows, dim / W), slots (N, R) -> (N, dim); see the module docstring."""

    @staticmethod
    def forward(ctx, weights, shard, slots, table):
        world, group = table.world, table.group
        n, reads = slots.shape
        if world > 1:
            D.entering_collective(group)
        counts = _all_gather_sizes(n, slots.device, group) if world > 1 else [n]
        # (M, R): every rank's tokens, rank by rank; sent as int32 (slots < 2**31, checked by the memory).
        all_slots = _all_gather_rows(slots.int(), counts, group).long()
        all_weights = _all_gather_rows(weights.detach().to(shard.dtype), counts, group)
        part = F.embedding_bag(all_slots, shard.detach(), per_sample_weights=all_weights, mode="sum")  # (M, dim/W)
        # Rank s gets its tokens' rows of every rank's column slice: (W, N, dim/W), slice by slice.
        got = _all_to_all(part, in_splits=counts, out_splits=[n] * world, group=group)
        ctx.save_for_backward(shard, all_slots, all_weights)
        ctx.counts, ctx.table = counts, table
        return got.view(world, n, table.shard_dim).transpose(0, 1).reshape(n, world * table.shard_dim)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        shard, all_slots, all_weights = ctx.saved_tensors
        table, counts = ctx.table, ctx.counts
        world, group, n = table.world, table.group, grad_out.shape[0]
        if world > 1:
            D.entering_collective(group)
        # Column slice c of this rank's output gradient goes to rank c: every token's gradient for my columns.
        send = grad_out.reshape(n, world, table.shard_dim).transpose(0, 1).reshape(world * n, table.shard_dim)
        grad_part = _all_to_all(send.to(shard.dtype), in_splits=[n] * world, out_splits=counts, group=group)
        grad_shard = row_sparse_grad(all_slots, all_weights, grad_part, shard.shape)
        if world > 1:  # the gradient of the mean of the ranks' losses, as DDP gives the other parameters
            grad_shard = grad_shard / world
        # d out[m] / d weights[m, r] = table[slots[m, r]]: a dot product over all columns, so each rank's
        # partial sums over its columns go back to the token's rank and are added there.
        partial = _bag_weights_grad(grad_part, shard.detach(), all_slots)  # (M, R)
        back = _all_to_all(partial, in_splits=counts, out_splits=[n] * world, group=group)
        grad_weights = back.view(world, n, all_slots.shape[1]).sum(0)
        return grad_weights, grad_shard, None, None


def _bag_weights_grad(grad_out: Tensor, table: Tensor, slots: Tensor, chunk: int = 1024) -> Tensor:
    """(M, R): grad_out[m] . table[slots[m, r]], by the compiled kernel when usable, else in token chunks."""
    if kernels.usable(grad_out, table):
        return torch.ops.pkmlm.bag_weights_backward(grad_out.contiguous(), table.contiguous(), slots.contiguous())
    out = grad_out.new_empty(slots.shape)
    for start in range(0, slots.shape[0], chunk):
        rows = table[slots[start:start + chunk]]  # (chunk, R, dim/W)
        out[start:start + chunk] = torch.einsum("mrd,md->mr", rows, grad_out[start:start + chunk])
    return out


def _all_gather_sizes(n: int, device: torch.device, group) -> list[int]:
    sizes = torch.empty(dist.get_world_size(group), dtype=torch.long, device=device)
    dist.all_gather_single(sizes, torch.tensor([n], dtype=torch.long, device=device), group=group)
    return sizes.tolist()


def _all_gather_rows(t: Tensor, counts: list[int], group) -> Tensor:
    """Every rank's (counts[r], ...) tensor, concatenated in rank order (padded to the longest for the collective)."""
    if len(counts) == 1:
        return t
    longest = max(counts)
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[:t.shape[0]] = t
    out = t.new_empty((len(counts) * longest, *t.shape[1:]))
    if longest:
        dist.all_gather_single(out, padded.contiguous(), group=group)
    return torch.cat([out[r * longest:r * longest + c] for r, c in enumerate(counts)])


def _all_to_all(t: Tensor, *, in_splits: list[int], out_splits: list[int], group) -> Tensor:
    if len(in_splits) == 1:
        return t
    out = t.new_empty((sum(out_splits), *t.shape[1:]))
    dist.all_to_all_single(out, t.contiguous(), output_split_sizes=out_splits, input_split_sizes=in_splits,
                           group=group)
    return out


# ---- checkpoints: full tables in the file, local columns in memory ----------------------------------------------

def sharded_tables(model: nn.Module) -> dict[str, ShardedValueTable]:
    """{module name: table} for every name a sharded table has in ``model`` (a shared table under each)."""
    return {name: m for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, ShardedValueTable)}


def gather_state(model: nn.Module) -> dict | None:
    """``model.state_dict()`` with full sharded tables on rank 0; None on other ranks (all ranks must call)."""
    tables = sharded_tables(model)
    full = {}
    for table in {id(t): t for t in tables.values()}.values():
        full[id(table)] = table.gather_columns(table.weight)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    state = model.state_dict()
    for name, table in tables.items():
        state[f"{name}.weight"] = full[id(table)]
    return state


def local_state(model: nn.Module, state: dict) -> dict:
    """A full model state (``gather_state``'s, or a replicated run's) with this rank's columns of sharded tables."""
    state = dict(state)
    for name, table in sharded_tables(model).items():
        key = f"{name}.weight"
        if key in state and table.world > 1:
            state[key] = table.local_columns(state[key])
    return state
