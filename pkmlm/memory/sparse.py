"""Row-sparse gradients of memory value tables: the helpers the optimizer, clipping and the sync share.

A value table's gradient is a sparse COO tensor (table_rows, v_dim) with one index dimension: only the rows a
step read. Autograd drops its "coalesced" flag even when its rows are already unique and sorted.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor


def coalesce_rows(grad: Tensor) -> Tensor:
    """A row-sparse gradient with unique, sorted rows, marked coalesced.

    Autograd drops the "coalesced" flag of pkmlm.memory's already summed, sorted gradient; checking its rows
    is far cheaper than coalesce()'s sort and copy of all values, which runs only when rows repeat or are
    out of order (e.g. nn.EmbeddingBag's own gradient).
    """
    if grad.is_coalesced():
        return grad
    rows = grad._indices()[0]
    if (rows[1:] > rows[:-1]).all():
        return torch.sparse_coo_tensor(grad._indices(), grad._values(), grad.shape, is_coalesced=True,
                                       check_invariants=False)
    return grad.coalesce()


def summed_rows(grad: Tensor) -> tuple[Tensor, Tensor]:
    """A row-sparse gradient as (rows (R,), one summed gradient row each (R, ...)), rows unique."""
    if not grad.is_sparse:
        raise ValueError("RowAdam needs sparse gradients: build the value table with sparse=True, "
                         "or give a dense table to a dense optimizer")
    grad = coalesce_rows(grad)  # sums duplicate rows, so each row is updated once
    return grad._indices()[0], grad._values()


def row_sparse_grad(indices: Tensor, weights: Tensor, grad_out: Tensor, shape) -> Tensor:
    """The table gradient of out[n] = sum_r weights[n, r] * table[indices[n, r]]: row-sparse, coalesced.

    indices, weights (N, R); grad_out (N, dim); shape: the table's (rows, dim). One summed row per slot read:
    an embedding bag over grad_out of the tokens that read it, weighted by their weights (nn.EmbeddingBag's
    own sparse gradient would hold N * R rows and leave the summing to a costly coalesce).
    """
    rows, row_grads = torch.ops.pkmlm.row_grads(indices, weights, grad_out, shape[0])
    return row_sparse(rows, row_grads, shape)


def row_sparse(rows: Tensor, row_grads: Tensor, shape) -> Tensor:
    """The row-sparse gradient (shape) holding row_grads (U, dim) at the unique increasing rows (U,), coalesced.

    Built inside a memory layer's backward, also when torch.compile traces it (see inductor_sparse_outputs, which
    runs here when inductor is loaded; pkmlm.memory.compile_model runs it before compiling).
    """
    if "torch._inductor.fx_utils" in sys.modules:  # inductor loaded: this backward may be compiled
        inductor_sparse_outputs()
    return torch.sparse_coo_tensor(rows.unsqueeze(0), row_grads, shape, is_coalesced=True, check_invariants=False)


def inductor_sparse_outputs() -> None:
    """Let inductor compile a backward whose output is a sparse gradient.

    Inductor (torch 2.13) compiles and runs such a graph, except that one of its passes asks every node's fake
    output for its storage, which a sparse tensor has not (NotImplementedError "Cannot access storage of
    SparseTensorImpl"; PyTorch issue #170761, open). Its storage identity is only compared, so a sparse tensor
    is given one of its own: it never shares storage with another node. Done once, and only when needed.
    """
    from torch._inductor import fx_utils

    get_storage = fx_utils.get_storage
    if getattr(get_storage, "pkmlm_sparse", False):
        return

    def sparse_safe_get_storage(t: Tensor) -> int:
        return id(t) if t.layout != torch.strided else get_storage(t)

    sparse_safe_get_storage.pkmlm_sparse = True
    fx_utils.get_storage = sparse_safe_get_storage


@torch.library.custom_op("pkmlm::row_grads", mutates_args=())
def _row_grads(indices: Tensor, weights: Tensor, grad_out: Tensor, num_rows: int) -> tuple[Tensor, Tensor]:
    """row_sparse_grad's parts: the distinct rows read (U,) int64 increasing and their summed gradients (U, dim).

    A torch.library op (fake kernel below) so that torch.compile traces it; its output size depends on the data.
    On the CPU in float32 the compiled kernel does it in one pass after a counting sort of the slots
    (pkmlm.memory.kernels; imported here, not at the top: distributed.py uses this module's coalescing helpers
    and must not load the kernels).
    """
    from pkmlm.memory import kernels

    if indices.dtype == torch.long and kernels.usable(weights, grad_out):
        return torch.ops.pkmlm.row_sparse_grad(indices.contiguous(), weights.contiguous(), grad_out.contiguous(),
                                               num_rows)
    # int32 keys (slot ids < 2**31) sort markedly faster on CPU than int64.
    slots, order = indices.reshape(-1).int().sort()
    rows, counts = torch.unique_consecutive(slots, return_counts=True)
    row_grads = torch.nn.functional.embedding_bag(order // indices.shape[1], grad_out, counts.cumsum(0) - counts,
                                                  mode="sum", per_sample_weights=weights.reshape(-1)[order])
    return rows.long(), row_grads


@_row_grads.register_fake
def _(indices, weights, grad_out, num_rows):
    rows = torch.library.get_ctx().new_dynamic_size()
    return indices.new_empty(rows, dtype=torch.long), grad_out.new_empty(rows, grad_out.shape[1])
