"""GPU speed: Triton kernels for the memory's weighted value read and its backward (kernels: triton_jit.py).

On a GPU the plain torch read is an embedding bag with per-sample weights, whose backward is the known slow
spot: one gradient row per read (N * heads * knn rows) left for the optimizer to sum, and a second pass over
the table rows at random for the weights' gradient. Here the backward sorts the reads by slot once and one
program per distinct slot reads its table row once, summing its gradient row and writing the weights'
gradient of each of its reads (the design of pkmlm's compiled CPU kernel, pkmlm/memory/csrc/pkm_cpu.cpp).

Entry points (tensors on one CUDA device; float32, bfloat16 or float16 table; int64 slots):
    value_read(table (S, D), slots (N, R), weights (N, R)) -> out (N, D), out[n] = sum_r weights[n, r] * table[slots[n, r]]
    value_read_backward(grad_out (N, D), table, slots, weights) -> rows (U,) int64 increasing (the distinct slots
        read), row_grads (U, D) (the table's row-sparse gradient, one summed row each), grad_weights (N, R)
    usable(*tensors) -> whether pkmlm.memory.layer takes this path for these tensors.
pkmlm.memory.layer wraps them in the torch.library op pkmlm::value_read (so torch.compile traces them) and
chooses them by itself for CUDA tables; sums are accumulated in float32 and match the torch path up to float
rounding (the reads of a row are summed in increasing read order, as the CPU kernel does).

Switch: environment variable `PKMLM_TRITON`: "auto" (default) uses them for CUDA tensors when Triton imports,
"0" never, "1" for every tensor, CPU ones included — only meaningful with `TRITON_INTERPRET=1` set before
Triton is imported (Triton's interpreter, how tests/memory/test_triton.py checks them without a GPU).
Anything else is a `TritonError`. The product-key candidate selection stays torch's topk (not measured to pay
yet: no GPU was available to measure it).
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from pkmlm.memory.kernels import KernelsError

ENV_VAR = "PKMLM_TRITON"
MODES = ("auto", "0", "1")
MAX_DIM = 8192  # value rows longer than this take the torch path (a program holds whole rows)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_state: dict[str, bool] = {}  # "importable": whether Triton is installed, looked up once


class TritonError(KernelsError):
    """`PKMLM_TRITON` holds something other than "auto", "0" or "1"."""


def mode() -> str:
    """`PKMLM_TRITON`: "auto" (the default: CUDA tensors), "0" (never) or "1" (every tensor: the interpreter)."""
    value = os.environ.get(ENV_VAR, "auto")
    if value not in MODES:
        raise TritonError(f"environment variable {ENV_VAR}={value!r} is not valid: set it to auto (Triton kernels "
                          f"for CUDA tensors, the default), 0 (never) or 1 (also CPU tensors, with TRITON_INTERPRET=1),"
                          f" or unset it")
    return value


def available() -> bool:
    """Whether Triton is installed (looked up, not imported)."""
    if "importable" not in _state:
        _state["importable"] = importlib.util.find_spec("triton") is not None
    return _state["importable"]


def usable(table: Tensor, *others: Tensor) -> bool:
    """True when the value read of `table` (S, D) with `others` (weights...) runs these kernels: CUDA tensors
    (every tensor with PKMLM_TRITON=1), a float32/bf16/fp16 table with D <= MAX_DIM, Triton installed."""
    m = mode()
    if m == "0" or (m == "auto" and not all(t.is_cuda for t in (table, *others))):
        return False
    return table.dtype in DTYPES and table.dim() == 2 and table.shape[1] <= MAX_DIM and available()


def value_read(table: Tensor, slots: Tensor, weights: Tensor) -> Tensor:
    """out (N, D) = sum_r weights[n, r] * table[slots[n, r]]; table (S, D), slots int64 and weights (N, R)."""
    from pkmlm.memory import triton_jit

    n, r = slots.shape
    out = table.new_empty(n, table.shape[1])
    if n and r:
        triton_jit.value_read_kernel[(n,)](table.contiguous(), slots.contiguous(), weights.contiguous(), out, r,
                                           table.shape[1], BLOCK_D=_block(table.shape[1]))
    elif n:
        out.zero_()
    return out


def value_read_backward(grad_out: Tensor, table: Tensor, slots: Tensor, weights: Tensor
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """Both gradients of value_read: rows (U,) int64 increasing, row_grads (U, D), grad_weights (N, R)."""
    from pkmlm.memory import triton_jit

    n, r = slots.shape
    dim = table.shape[1]
    grad_weights = weights.new_empty(n, r)
    if n * r == 0:
        return slots.new_empty(0), grad_out.new_empty(0, dim), grad_weights
    # Reads grouped by slot, each group in increasing read order (a stable sort): a fixed summation order.
    sorted_slots, order = slots.reshape(-1).sort(stable=True)
    rows, counts = torch.unique_consecutive(sorted_slots, return_counts=True)
    starts = counts.cumsum(0) - counts
    row_grads = grad_out.new_empty(rows.numel(), dim)
    triton_jit.value_read_backward_kernel[(rows.numel(),)](
        grad_out.contiguous(), table.contiguous(), weights.contiguous(), rows, order, starts, counts, row_grads,
        grad_weights, r, dim, BLOCK_D=_block(dim))
    return rows, row_grads, grad_weights


def _block(dim: int) -> int:
    return max(16, 1 << (dim - 1).bit_length())
