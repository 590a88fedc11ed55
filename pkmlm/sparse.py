"""Row-sparse gradients of memory value tables: the helpers the optimizer, clipping and the sync share.

A value table's gradient is a sparse COO tensor (table_rows, v_dim) with one index dimension: only the rows a
step read. Autograd drops its "coalesced" flag even when its rows are already unique and sorted.
"""

from __future__ import annotations

from torch import Tensor
import torch


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
