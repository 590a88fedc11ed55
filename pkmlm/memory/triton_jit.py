"""The Triton kernels behind pkmlm.memory.triton_kernels (imported only from there, and only when Triton is used).

A memory read is out[n] = sum_r w[n, r] * table[slots[n, r]] over R = heads * knn reads per token. Each program
works on whole value rows (BLOCK_D >= v_dim: v_dim is at most MAX_DIM), accumulating in float32.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def value_read_kernel(table, slots, weights, out, R, D, BLOCK_D: tl.constexpr):
    """One program per token n: out[n] = sum_r weights[n, r] * table[slots[n, r]], r in increasing order."""
    n = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    inside = d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r in range(R):
        slot = tl.load(slots + n * R + r)
        w = tl.load(weights + n * R + r).to(tl.float32)
        acc += w * tl.load(table + slot * D + d, mask=inside, other=0.0).to(tl.float32)
    tl.store(out + n * D + d, acc.to(out.dtype.element_ty), mask=inside)


@triton.jit
def value_read_backward_kernel(grad_out, table, weights, rows, order, starts, counts, row_grads, grad_weights, R, D,
                               BLOCK_D: tl.constexpr):
    """One program per distinct slot rows[u] read: its reads are order[starts[u] : starts[u] + counts[u]]
    (flat read ids e = n * R + r, increasing). Writes row_grads[u] = sum_e weights[e] * grad_out[e // R] and
    grad_weights[e] = grad_out[e // R] . table[rows[u]] for each of its reads, reading the table row once."""
    u = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    inside = d < D
    start = tl.load(starts + u)
    count = tl.load(counts + u)
    slot_row = tl.load(table + tl.load(rows + u) * D + d, mask=inside, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(count):
        e = tl.load(order + start + i)
        g = tl.load(grad_out + (e // R) * D + d, mask=inside, other=0.0).to(tl.float32)
        acc += tl.load(weights + e).to(tl.float32) * g
        tl.store(grad_weights + e, tl.sum(g * slot_row, axis=0).to(grad_weights.dtype.element_ty))
    tl.store(row_grads + u * D + d, acc.to(row_grads.dtype.element_ty), mask=inside)
