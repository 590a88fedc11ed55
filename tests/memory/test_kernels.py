"""The compiled CPU kernels (pkmlm.memory.kernels, pkmlm/memory/csrc/pkm_cpu.cpp) against pkmlm's pure-torch code.

Each kernel test runs the same computation twice, PKMLM_CPU_KERNELS=1 (kernel) and =0 (torch), on
identical inputs, and checks that the kernel really ran (and the torch path did not call it). Kernel
tests skip when the kernels cannot be built; the env-var and build-failure tests always run.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from pkmlm.memory import kernels
from pkmlm.memory import layer as memory_mod
from pkmlm.memory.layer import ProductKeyMemory, _sparse_read
from pkmlm.training.optim import RowAdam
from pkmlm.memory.sparse import row_sparse_grad

OPS = ("pkm_lookup", "pkm_lookup_backward", "bag_weights_backward", "sparse_read_backward", "row_sparse_grad",
       "row_adam_")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls of each torch.ops.pkmlm op (wrapping the real ones); skips if not built."""
    monkeypatch.setenv(kernels.ENV_VAR, "1")
    if not kernels.available():
        pytest.skip("compiled CPU kernels not available (no compiler?)")
    calls = {name: 0 for name in OPS}
    for name in OPS:
        real = getattr(torch.ops.pkmlm, name)

        def counted(*args, _real=real, _name=name):
            calls[_name] += 1
            return _real(*args)

        monkeypatch.setattr(torch.ops.pkmlm, name, counted)
    return calls


def run(monkeypatch, use_kernels: bool, fn):
    monkeypatch.setenv(kernels.ENV_VAR, "1" if use_kernels else "0")
    try:
        return fn()
    finally:
        monkeypatch.setenv(kernels.ENV_VAR, "1")


def slot_scores(mem, q, slots):
    """Score of each given slot, computed from its two sub-keys in float64: (N, heads, R)."""
    n, half, k = q.shape[0], mem.k_dim // 2, mem.n_keys
    q4 = q.detach().double().view(n, mem.heads, 2, half)
    keys = mem.keys.detach().double()  # (heads, 2, n_keys, half)
    heads = torch.arange(mem.heads).view(1, -1, 1)
    k1 = keys[:, 0][heads, slots // k]  # (N, heads, R, half)
    k2 = keys[:, 1][heads, slots % k]
    return (k1 * q4[:, :, 0, None]).sum(-1) + (k2 * q4[:, :, 1, None]).sum(-1)


def assert_same_topk(mem, q, scores_k, idx_k, scores_t, idx_t):
    """Kernel (scores_k, idx_k) vs torch (scores_t, idx_t): equal up to float rounding and ties."""
    assert idx_k.dtype == torch.long and idx_k.shape == idx_t.shape == scores_k.shape
    torch.testing.assert_close(scores_k, scores_t, atol=1e-5, rtol=1e-5)
    # The returned scores are the returned slots' scores, sorted, and no slot is returned twice.
    torch.testing.assert_close(slot_scores(mem, q, idx_k).float(), scores_k, atol=1e-5, rtol=1e-5)
    assert (scores_k[..., :-1] >= scores_k[..., 1:]).all()
    assert (idx_k >= 0).all() and (idx_k < mem.n_keys**2).all()
    s = idx_k.sort(-1).values
    assert (s[..., 1:] != s[..., :-1]).all()
    # Indices equal except at (near-)ties, where the two slots must score the same.
    diff = idx_k != idx_t
    if diff.any():
        a, b = slot_scores(mem, q, idx_k)[diff], slot_scores(mem, q, idx_t)[diff]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert diff.float().mean() < 0.01  # random inputs: ties practically absent


# (n_keys, heads, knn, k_dim, N): knn == n_keys, knn = 1, n_keys not a power of two, N = 1, N not a
# multiple of the kernel's token block (64, or fewer tokens per block for large heads * n_keys).
LOOKUP_CASES = [
    (8, 1, 8, 4, 1),
    (8, 2, 8, 6, 70),
    (10, 2, 1, 6, 65),
    (37, 3, 5, 16, 130),
    (64, 4, 32, 8, 200),
    (100, 2, 16, 32, 1),
    (300, 1, 300, 4, 33),
    (2000, 4, 7, 8, 45),  # block of 32 tokens: 2 blocks, the last partial
]


@pytest.mark.parametrize("n_keys,heads,knn,k_dim,n", LOOKUP_CASES)
def test_lookup_kernel_matches_torch(monkeypatch, kernel_calls, n_keys, heads, knn, k_dim, n):
    torch.manual_seed(n_keys * 7 + knn + n)
    mem = ProductKeyMemory(6, 6, n_keys=n_keys, heads=heads, knn=knn, k_dim=k_dim)
    q = torch.randn(n, heads, k_dim)
    with torch.no_grad():
        scores_k, idx_k = run(monkeypatch, True, lambda: mem.lookup(q))
        assert kernel_calls["pkm_lookup"] == 1
        scores_t, idx_t = run(monkeypatch, False, lambda: mem.lookup(q))
        assert kernel_calls["pkm_lookup"] == 1
    assert scores_k.shape == (n, heads, knn) and scores_k.dtype == torch.float32
    assert_same_topk(mem, q, scores_k, idx_k, scores_t, idx_t)
    if n_keys <= 100:  # and both are the exact top-knn of all n_keys**2 slots
        full = slot_scores(mem, q, torch.arange(n_keys**2).expand(n, heads, -1))
        torch.testing.assert_close(scores_k, full.topk(knn, dim=-1).values.float(), atol=1e-5, rtol=1e-5)

    # Sub-key ids: each half's top-knn sub-keys, sorted by decreasing half score.
    with torch.no_grad():
        sk, ik, sub_k = run(monkeypatch, True, lambda: mem._search(q, with_subkeys=True))
        _, _, sub_t = run(monkeypatch, False, lambda: mem._search(q, with_subkeys=True))
        _, _, none = run(monkeypatch, True, lambda: mem._search(q, with_subkeys=False))
    assert kernel_calls["pkm_lookup"] == 3
    assert none is None
    assert torch.equal(sk, scores_k) and torch.equal(ik, idx_k)  # same call, same answer
    assert sub_k.shape == (n, heads, 2, knn) and sub_k.dtype == torch.long
    assert torch.equal(sub_k, sub_t)


def test_lookup_kernel_with_noncontiguous_query(monkeypatch, kernel_calls):
    torch.manual_seed(3)
    mem = ProductKeyMemory(6, 6, n_keys=24, heads=3, knn=6, k_dim=10)
    q = torch.randn(3, 10, 40).permute(2, 0, 1)  # (40, 3, 10), not contiguous
    with torch.no_grad():
        scores_k, idx_k = run(monkeypatch, True, lambda: mem.lookup(q))
        scores_t, idx_t = run(monkeypatch, False, lambda: mem.lookup(q))
    assert kernel_calls["pkm_lookup"] == 1
    assert_same_topk(mem, q, scores_k, idx_k, scores_t, idx_t)


@pytest.mark.parametrize("n_keys,heads,knn,k_dim,n", [(8, 2, 8, 6, 9), (37, 3, 5, 16, 130), (64, 2, 16, 8, 70)])
def test_search_gradients_kernel_matches_torch(monkeypatch, kernel_calls, n_keys, heads, knn, k_dim, n):
    torch.manual_seed(n_keys + n)
    mem = ProductKeyMemory(6, 6, n_keys=n_keys, heads=heads, knn=knn, k_dim=k_dim)
    q0 = torch.randn(n, heads, k_dim)
    w = torch.randn(n, heads, knn)

    def grads():
        mem.zero_grad(set_to_none=True)
        q = q0.clone().requires_grad_(True)
        scores, idx, _ = mem._search(q)
        (scores * w).sum().backward()
        return q.grad, mem.keys.grad.clone(), idx

    gq_k, gk_k, idx_k = run(monkeypatch, True, grads)
    assert kernel_calls["pkm_lookup"] == 1 and kernel_calls["pkm_lookup_backward"] == 1
    gq_t, gk_t, idx_t = run(monkeypatch, False, grads)
    assert kernel_calls["pkm_lookup_backward"] == 1
    assert torch.equal(idx_k, idx_t)  # else the gradients are of different functions
    assert gq_k.shape == q0.shape and gk_k.shape == mem.keys.shape
    assert gk_k.abs().sum() > 0 and (gk_k == 0).any() == (gk_t == 0).any()
    torch.testing.assert_close(gq_k, gq_t, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gk_k, gk_t, atol=1e-5, rtol=1e-4)


def test_memory_forward_backward_kernel_matches_torch(monkeypatch, kernel_calls):
    torch.manual_seed(0)
    mem_k = ProductKeyMemory(16, 12, n_keys=20, heads=3, knn=6, k_dim=12, v_dim=10,
                             query_batchnorm=True, sparse=True)
    mem_t = copy.deepcopy(mem_k)
    x = torch.randn(3, 23, 16)
    w = torch.randn(3, 23, 12)

    def step(mem):
        out = mem(x)
        (out * w).sum().backward()
        return out

    out_k = run(monkeypatch, True, lambda: step(mem_k))
    assert {name: kernel_calls[name] for name in OPS} == {
        "pkm_lookup": 1, "pkm_lookup_backward": 1, "bag_weights_backward": 0, "sparse_read_backward": 1,
        "row_sparse_grad": 0, "row_adam_": 0}
    out_t = run(monkeypatch, False, lambda: step(mem_t))
    assert kernel_calls["pkm_lookup"] == 1 and kernel_calls["sparse_read_backward"] == 1
    torch.testing.assert_close(out_k, out_t, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mem_k.query_norm.running_mean, mem_t.query_norm.running_mean)
    torch.testing.assert_close(mem_k.query_norm.running_var, mem_t.query_norm.running_var)

    params_t = dict(mem_t.named_parameters())
    names = set()
    for name, p_k in mem_k.named_parameters():
        g_k, g_t = p_k.grad, params_t[name].grad
        assert g_k is not None and g_t is not None, name
        names.add(name)
        assert g_k.is_sparse == g_t.is_sparse, name
        if g_k.is_sparse:
            assert name == "values.weight"
            g_k, g_t = g_k.to_dense(), g_t.to_dense()
        assert g_k.abs().sum() > 0, name
        torch.testing.assert_close(g_k, g_t, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    assert {"query_proj.weight", "query_norm.weight", "query_norm.bias", "keys", "values.weight",
            "out_proj.weight", "out_proj.bias"} <= names


def read_grads(grad_out, table, indices, weights):
    """The gradients a value read sends to the table and to its weights, through pkmlm.memory.layer._sparse_read."""
    table = table.clone().requires_grad_()
    weights = weights.clone().requires_grad_()
    _sparse_read(table, indices, weights).backward(grad_out)
    return table.grad, weights.grad


@pytest.mark.parametrize("n,r,rows,dim", [(50, 12, 1000, 24), (7, 3, 40, 13), (1, 1, 5, 1), (130, 32, 300, 70),
                                          (2048, 32, 100_000, 16)])  # the last: per-thread chunks (ROW_GRAD_CASES)
def test_sparse_read_grads_kernel_matches_torch_and_reference(monkeypatch, kernel_calls, n, r, rows, dim):
    """The fused backward (sparse_read_backward) against the torch path and float64: the weights' gradient
    grad_out[n] . table[indices[n, r]] bitwise equal to bag_weights_backward's (the sharded table's kernel),
    the table's row-sparse gradient bitwise equal to row_sparse_grad's."""
    torch.manual_seed(n + r + dim)
    grad_out = torch.randn(n, dim)
    table = torch.randn(rows, dim)
    indices = torch.randint(0, rows, (n, r))
    indices[0, 0] = rows - 1  # the last row, and repeated reads
    if r > 1:
        indices[-1, 1] = indices[-1, 0]
    weights = torch.rand(n, r)
    ref = (table.double()[indices] * grad_out.double()[:, None]).sum(-1)
    table_k, weights_k = run(monkeypatch, True, lambda: read_grads(grad_out, table, indices, weights))
    assert kernel_calls["sparse_read_backward"] == 1
    table_t, weights_t = run(monkeypatch, False, lambda: read_grads(grad_out, table, indices, weights))
    assert kernel_calls["sparse_read_backward"] == 1 and kernel_calls["bag_weights_backward"] == 0
    assert weights_k.shape == weights_t.shape == (n, r) and weights_k.dtype == weights_t.dtype == torch.float32
    torch.testing.assert_close(weights_k, weights_t, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weights_k.double(), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weights_t.double(), ref, atol=1e-5, rtol=1e-4)
    assert torch.equal(torch.ops.pkmlm.bag_weights_backward(grad_out, table, indices), weights_k)
    assert table_k.is_sparse  # autograd drops the coalesced flag (pkmlm.memory.sparse.coalesce_rows)
    assert torch.equal(table_k._indices(), table_t._indices())
    torch.testing.assert_close(table_k._values(), table_t._values(), atol=1e-5, rtol=1e-4)
    rows_k, grads_k = torch.ops.pkmlm.row_sparse_grad(indices, weights, grad_out, rows)
    assert torch.equal(rows_k, table_k._indices()[0]) and torch.equal(grads_k, table_k._values())

    # A non-contiguous table (a column slice) takes the kernel too (it is made contiguous).
    wide = torch.randn(rows, dim + 3)
    view = wide[:, 2:dim + 2]
    ref2 = (view.double()[indices] * grad_out.double()[:, None]).sum(-1)
    got = run(monkeypatch, True, lambda: _sparse_read_weights_grad(grad_out, view, indices, weights))
    torch.testing.assert_close(got.double(), ref2, atol=1e-5, rtol=1e-4)
    assert kernel_calls["sparse_read_backward"] == 2


def _sparse_read_weights_grad(grad_out, table, indices, weights):
    weights = weights.clone().requires_grad_()
    return torch.autograd.grad(_sparse_read(table, indices, weights), weights, grad_out)[0]


# (tokens, reads per token, table rows, row size): one row read by everyone, a table of 2**31 rows (the
# kernel's limit; counting-sort buckets on the high bits), rows shorter and longer than a vector, no tokens.
# The last case has 65,536 reads: enough for the kernel's counting sort to split them into per-thread chunks
# (one chunk per 16,384 reads, up to the thread count), which the smaller cases never do.
ROW_GRAD_CASES = [(300, 24, 1, 5), (200, 32, 2**31, 3), (500, 64, 5000, 37), (64, 128, 1 << 20, 256), (0, 8, 10, 4),
                  (2048, 32, 100_000, 16)]


@pytest.mark.parametrize("n,r,rows,dim", ROW_GRAD_CASES)
def test_row_sparse_grad_kernel_matches_torch_and_float64(monkeypatch, kernel_calls, n, r, rows, dim):
    """The table's row-sparse gradient: the same sorted distinct rows as the torch path, each the sum of its
    reads' weighted output gradients (float64 reference), marked coalesced; the same bits at 1 and 2 threads."""
    g = torch.Generator().manual_seed(n + rows)
    slots = torch.randint(0, rows, (n, r), generator=g)
    if n:
        slots[: n // 3, : r // 2] = rows - 1  # many reads of one row, and the largest id
    weights, grad_out = torch.rand(n, r, generator=g), torch.randn(n, dim, generator=g)
    grad_k = run(monkeypatch, True, lambda: row_sparse_grad(slots, weights, grad_out, (rows, dim)))
    assert kernel_calls["row_sparse_grad"] == 1
    grad_t = run(monkeypatch, False, lambda: row_sparse_grad(slots, weights, grad_out, (rows, dim)))
    assert kernel_calls["row_sparse_grad"] == 1
    assert grad_k.is_coalesced() and grad_k.shape == (rows, dim)
    assert torch.equal(grad_k._indices(), grad_t._indices())
    assert torch.equal(grad_k._indices()[0], slots.unique())
    ref = torch.zeros(grad_k._nnz(), dim, dtype=torch.float64)
    ref.index_add_(0, torch.searchsorted(slots.unique(), slots.reshape(-1)),
                   weights.reshape(-1, 1).double() * grad_out.double().repeat_interleave(r, 0))
    # float32 sums of up to ~5,000 terms (the row everyone reads)
    torch.testing.assert_close(grad_k._values().double(), ref, atol=2e-3, rtol=1e-5)
    torch.testing.assert_close(grad_t._values().double(), ref, atol=2e-3, rtol=1e-5)
    threads = torch.get_num_threads()
    try:
        for t in (1, 4):
            torch.set_num_threads(t)
            rows_t, grads_t = torch.ops.pkmlm.row_sparse_grad(slots, weights, grad_out, rows)
            assert torch.equal(rows_t, grad_k._indices()[0]) and torch.equal(grads_t, grad_k._values()), t
    finally:
        torch.set_num_threads(threads)


def _row_adam_run(monkeypatch, use_kernels, start, steps, shape, lr=0.05, betas=(0.8, 0.95), eps=1e-6):
    table = nn.Parameter(start.clone())
    opt = RowAdam([table], lr=lr, betas=betas, eps=eps)

    def go():
        for rows, grads in steps:
            # Uncoalesced: rows may repeat, their gradients add up.
            table.grad = torch.sparse_coo_tensor(torch.tensor([rows]), grads, shape, check_invariants=True)
            opt.step()
    run(monkeypatch, use_kernels, go)
    return table.detach(), opt.state[table]


def _row_adam_steps(n_rows, row_shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    touched = [[0, 2, 2, 5, 9], [1, 2, 40], [0, 0, 0, 44], [2, 5, 1, 9, 9, 9], list(range(10, 30)) + [2], [2]]
    steps = [(rows, torch.randn((len(rows),) + row_shape, generator=g) * 3) for rows in touched]
    untouched = sorted(set(range(n_rows)) - {r for rows in touched for r in rows})
    return steps, untouched


def test_row_adam_kernel_matches_torch(monkeypatch, kernel_calls):
    torch.manual_seed(1)
    shape = (50, 19)
    start = torch.randn(shape)
    steps, untouched = _row_adam_steps(shape[0], shape[1:])
    w_k, st_k = _row_adam_run(monkeypatch, True, start, steps, shape)
    assert kernel_calls["row_adam_"] == len(steps)
    w_t, st_t = _row_adam_run(monkeypatch, False, start, steps, shape)
    assert kernel_calls["row_adam_"] == len(steps)
    assert torch.equal(st_k["step"], st_t["step"])
    assert st_k["step"][[0, 1, 2, 5, 9, 44]].tolist() == [2, 2, 5, 2, 2, 1]
    torch.testing.assert_close(st_k["moments"], st_t["moments"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w_k, w_t, atol=1e-6, rtol=1e-5)
    assert not torch.equal(w_k[2], start[2])
    # Untouched rows: weights bit-identical, state still zero.
    assert torch.equal(w_k[untouched], start[untouched]) and torch.equal(w_t[untouched], start[untouched])
    assert (st_k["moments"][untouched] == 0).all() and (st_k["step"][untouched] == 0).all()


def test_row_adam_3d_param_takes_torch_path(monkeypatch, kernel_calls):
    torch.manual_seed(2)
    shape = (50, 4, 5)
    start = torch.randn(shape)
    steps, untouched = _row_adam_steps(shape[0], shape[1:], seed=1)
    w3, st3 = _row_adam_run(monkeypatch, True, start, steps, shape)
    assert kernel_calls["row_adam_"] == 0  # the kernel handles 2-D tables only
    assert st3["moments"].shape == (50, 2, 4, 5)
    # Same as the same rows flattened to a 2-D table, stepped by the kernel.
    flat_steps = [(rows, g.flatten(1)) for rows, g in steps]
    w2, st2 = _row_adam_run(monkeypatch, True, start.flatten(1), flat_steps, (50, 20))
    assert kernel_calls["row_adam_"] == len(steps)
    torch.testing.assert_close(w3.flatten(1), w2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(st3["moments"].flatten(2), st2["moments"], atol=1e-6, rtol=1e-5)
    assert torch.equal(st3["step"], st2["step"])
    assert torch.equal(w3[untouched], start[untouched])


def test_row_adam_3d_param_without_kernels(monkeypatch):
    """The torch path alone (runs without a compiler too): a 3-D table's rows step like a 2-D one's."""
    torch.manual_seed(2)
    shape = (50, 4, 5)
    start = torch.randn(shape)
    steps, untouched = _row_adam_steps(shape[0], shape[1:], seed=1)
    w3, st3 = _row_adam_run(monkeypatch, False, start, steps, shape)
    w2, st2 = _row_adam_run(monkeypatch, False, start.flatten(1), [(r, g.flatten(1)) for r, g in steps], (50, 20))
    torch.testing.assert_close(w3.flatten(1), w2, atol=0, rtol=0)
    assert torch.equal(st3["step"], st2["step"])
    assert torch.equal(w3[untouched], start[untouched]) and not torch.equal(w3[2], start[2])


# ---- switch and fallback: these run whether or not the kernels can be built --------------------------

def test_env_var_switch(monkeypatch):
    t = torch.zeros(3)
    monkeypatch.setenv(kernels.ENV_VAR, "0")
    assert kernels.enabled() is False
    assert kernels.available() is False
    assert kernels.usable(t) is False
    for bad in ("yes", "", "true", " 1"):
        monkeypatch.setenv(kernels.ENV_VAR, bad)
        with pytest.raises(kernels.KernelsError, match=kernels.ENV_VAR):
            kernels.enabled()
        with pytest.raises(ValueError, match="PKMLM_CPU_KERNELS"):
            kernels.usable(t)
    monkeypatch.delenv(kernels.ENV_VAR)
    assert kernels.enabled() is True  # the default
    monkeypatch.setenv(kernels.ENV_VAR, "1")
    assert kernels.enabled() is True
    # Other dtypes or devices are never usable, whatever the build.
    for other in (torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.bfloat16),
                  torch.zeros(3, dtype=torch.float16), torch.zeros(3, device="meta")):
        assert kernels.usable(other) is False
        assert kernels.usable(t, other) is False
    assert kernels.usable(t) is kernels.available()


def test_env_var_zero_runs_torch_path(monkeypatch):
    """With "0", no pkmlm op is called even where the kernels are registered."""
    monkeypatch.setenv(kernels.ENV_VAR, "0")

    def boom(*args):
        raise AssertionError("kernel called with PKMLM_CPU_KERNELS=0")

    ops = getattr(torch.ops, "pkmlm", None)
    if ops is not None and hasattr(ops, "pkm_lookup"):
        for name in OPS:
            monkeypatch.setattr(ops, name, boom)
    torch.manual_seed(0)
    mem = ProductKeyMemory(8, 8, n_keys=10, heads=2, knn=4, k_dim=6)
    opt = RowAdam(mem.value_parameters(), lr=0.01)
    mem(torch.randn(2, 5, 8)).sum().backward()
    opt.step()
    assert mem.keys.grad is not None and mem.values.weight.grad.is_sparse


def test_float64_memory_runs_torch_path(monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "1")
    torch.manual_seed(0)
    mem = ProductKeyMemory(8, 8, n_keys=10, heads=2, knn=4, k_dim=6).double()
    called = []
    original = memory_mod._compiled_lookup
    monkeypatch.setattr(memory_mod, "_compiled_lookup", lambda *a: called.append(1) or original(*a))
    out = mem(torch.randn(2, 5, 8, dtype=torch.float64))
    out.sum().backward()
    assert out.dtype == torch.float64 and not called


def _failing_build(monkeypatch, message="no compiler"):
    from torch.utils import cpp_extension

    calls = []

    def load(**kwargs):
        calls.append(kwargs)
        raise RuntimeError(message)

    monkeypatch.setattr(cpp_extension, "load", load)
    monkeypatch.setattr(kernels, "_registered", lambda: False)  # as in a process that never built them
    return calls


def test_load_falls_back_with_warning_when_build_fails(monkeypatch):
    calls = _failing_build(monkeypatch, "no compiler\nsecond line")
    with pytest.warns(RuntimeWarning, match="PKMLM_CPU_KERNELS") as record:
        assert kernels._load() is False
    assert len(calls) == 1
    assert calls[0]["name"].startswith("pkmlm_cpu_") and calls[0]["sources"] == [str(kernels.SOURCE)]
    message = str(record[0].message)
    assert "no compiler" in message and "second line" not in message


def test_load_warning_for_empty_error_message(monkeypatch):
    _failing_build(monkeypatch, "")
    with pytest.warns(RuntimeWarning, match="RuntimeError"):
        assert kernels._load() is False


def test_failed_build_is_cached_and_memory_uses_torch(monkeypatch):
    calls = _failing_build(monkeypatch)
    monkeypatch.setattr(kernels, "_build", {})
    monkeypatch.setenv(kernels.ENV_VAR, "1")
    with pytest.warns(RuntimeWarning, match="PKMLM_CPU_KERNELS"):
        assert kernels.available() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, built (tried) once
        assert kernels.available() is False
        assert kernels.usable(torch.zeros(2)) is False
        torch.manual_seed(0)
        mem = ProductKeyMemory(8, 8, n_keys=10, heads=2, knn=4, k_dim=6)
        q = torch.randn(5, 2, 6)
        with torch.no_grad():
            scores, idx = mem.lookup(q)
    assert len(calls) == 1 and kernels._build == {"ok": False}
    full = slot_scores(mem, q, torch.arange(100).expand(5, 2, -1))
    torch.testing.assert_close(scores, full.topk(4, dim=-1).values.float())
    # "0" never tries to build.
    monkeypatch.setattr(kernels, "_build", {})
    monkeypatch.setenv(kernels.ENV_VAR, "0")
    assert kernels.available() is False and kernels._build == {} and len(calls) == 1


@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
@pytest.mark.slow
def test_bad_env_var_is_one_line_exit_2(script, tmp_path):
    root = Path(__file__).resolve().parents[2]
    args = ["--config", str(tmp_path / "none.yaml")] if script == "train.py" else [str(tmp_path)]
    env = dict(os.environ, PKMLM_CPU_KERNELS="yes")
    proc = subprocess.run([sys.executable, script, *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "PKMLM_CPU_KERNELS='yes'" in proc.stderr
    assert "set it to 1" in proc.stderr and "Traceback" not in proc.stderr


def _recording_build(monkeypatch, tmp_path):
    """cpp_extension.load replaced by a recorder; builds go to tmp_path. Returns (calls, torch's lock file)."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "_registered", lambda: False)
    name = "pkmlm_cpu_" + kernels._machine_digest()
    torch_lock = tmp_path / name / "lock"
    calls = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.append(torch_lock.exists()))
    return calls, torch_lock


def test_stale_torch_lock_of_a_killed_build_is_taken_over(monkeypatch, tmp_path):
    calls, torch_lock = _recording_build(monkeypatch, tmp_path)
    torch_lock.parent.mkdir(parents=True)
    torch_lock.write_text("")  # what a build killed mid-way leaves: torch would wait on it forever
    assert kernels._load() is True
    assert calls == [False]  # removed before torch's build looked for it


def test_build_lock_held_by_a_live_process_times_out_naming_it(monkeypatch, tmp_path):
    import fcntl

    calls, torch_lock = _recording_build(monkeypatch, tmp_path)
    torch_lock.parent.mkdir(parents=True)
    ours = torch_lock.parent.with_name(torch_lock.parent.name + ".pkmlm-lock")
    monkeypatch.setattr(kernels, "BUILD_LOCK_TIMEOUT", 0.3)
    with open(ours, "w") as holder:  # another open file: flock conflicts as with another process
        fcntl.flock(holder, fcntl.LOCK_EX)
        start = time.monotonic()
        with pytest.warns(RuntimeWarning, match="kernel build lock") as record:
            assert kernels._load() is False
        assert time.monotonic() - start < 5
    assert str(ours) in str(record[0].message) and calls == []
    assert kernels._load() is True and calls == [False]  # released: the next build goes ahead


# ---- the ops check what they are given (one pass; the hot loops stay unchecked) -----------------------

@pytest.mark.parametrize("bad", [10**9, -1, 64])
def test_ops_reject_out_of_range_ids(kernel_calls, bad):
    q, keys = torch.randn(3, 2, 2, 4), torch.randn(2, 2, 8, 4)
    slots = torch.zeros(3, 2, 5, dtype=torch.long)
    slots[1, 1, 2] = bad
    with pytest.raises(RuntimeError, match=r"slots must lie in \[0, 64\)"):
        torch.ops.pkmlm.pkm_lookup_backward(torch.randn(3, 2, 5), slots, q, keys)
    table, ids = torch.randn(64, 6), torch.zeros(3, 10, dtype=torch.long)
    ids[2, 9] = bad
    with pytest.raises(RuntimeError, match=r"slots must lie in \[0, 64\)"):
        torch.ops.pkmlm.bag_weights_backward(torch.randn(3, 6), table, ids)
    before = table.clone()
    rows = torch.tensor([0, 5, bad])
    with pytest.raises(RuntimeError, match=r"rows must lie in \[0, 64\)"):
        torch.ops.pkmlm.row_adam_(table, torch.zeros(64, 2, 6), torch.zeros(64, dtype=torch.long), rows,
                                  torch.randn(3, 6), 0.1, 0.9, 0.999, 1e-8)
    assert torch.equal(table, before)  # checked before any row was written


def test_lookup_backward_rejects_shapes_that_do_not_match_the_query(kernel_calls):
    q, keys = torch.randn(3, 2, 2, 4), torch.randn(2, 2, 8, 4)
    for shape in [(4, 2, 5), (3, 1, 5)]:  # more tokens or fewer heads than q
        with pytest.raises(RuntimeError, match="grad_scores and slots must be"):
            torch.ops.pkmlm.pkm_lookup_backward(torch.randn(shape), torch.zeros(shape, dtype=torch.long), q, keys)
    with pytest.raises(RuntimeError, match="do not match"):
        torch.ops.pkmlm.pkm_lookup_backward(torch.randn(3, 2, 5), torch.zeros(3, 2, 5, dtype=torch.long), q,
                                            torch.randn(2, 2, 8, 6))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_takes_the_kernels(monkeypatch, kernel_calls, dtype):
    """Under CPU autocast the search, its backward and the weights' gradient still run in the kernels,
    and find the same slots as float32 queries rounded like autocast rounds them."""
    torch.manual_seed(0)
    mem = ProductKeyMemory(16, 16, n_keys=12, heads=2, knn=4, k_dim=8)
    x = torch.randn(3, 5, 16)
    with torch.autocast("cpu", dtype=dtype):
        q = mem.query(x)
        out = mem(x)
    out.float().sum().backward()
    assert q.dtype == dtype and mem.keys.grad is not None and mem.keys.grad.dtype == torch.float32
    assert kernel_calls["pkm_lookup"] == 1 and kernel_calls["pkm_lookup_backward"] == 1
    assert kernel_calls["sparse_read_backward"] == 1
    scores, slots = mem.lookup(q.float())
    ref_scores, ref_slots = run(monkeypatch, False, lambda: mem.lookup(q.float()))
    assert_same_topk(mem, q.float(), scores, slots, ref_scores, ref_slots)


# (N, heads, n_keys, half, knn): every register count of both vector widths (knn 1 to 128), the
# fallback above them (knn 300), short rows sorted whole and long rows pre-filtered by group maxima.
SELECTION_CASES = [(70, 2, 8, 3, 8), (65, 2, 10, 3, 1), (130, 3, 37, 8, 5), (200, 4, 64, 4, 32), (40, 2, 128, 8, 33),
                   (50, 2, 1024, 8, 32), (40, 2, 1000, 8, 64), (20, 2, 500, 8, 100), (9, 1, 700, 4, 128),
                   (33, 1, 300, 2, 300), (45, 4, 2000, 4, 7), (30, 2, 333, 4, 16)]


@pytest.mark.parametrize("n,heads,n_keys,half,knn", SELECTION_CASES)
def test_every_selection_path_gives_the_scalar_result(kernel_calls, n, heads, n_keys, half, knn):
    """Each vectorised top-k the CPU can run returns exactly the scalar path's slots, sub-keys and
    scores, also with tied scores (a zero query), NaN scores and duplicated sub-keys."""
    paths = torch.ops.pkmlm.simd_paths()
    assert paths[0] == "scalar" and kernels.simd_path() == paths[-1]  # the best one by default
    torch.manual_seed(n_keys + knn)
    q, keys = torch.randn(n, heads, 2, half), torch.randn(heads, 2, n_keys, half)
    q[0] = 0
    q[1, 0, 0, 0] = float("nan")
    keys[0, 1, n_keys // 2:] = keys[0, 1, :n_keys - n_keys // 2].clone()  # each second-half score twice
    results = {}
    try:
        for path in paths:
            torch.ops.pkmlm.select_simd(path)
            results[path] = torch.ops.pkmlm.pkm_lookup(q, keys, knn, True)
    finally:
        torch.ops.pkmlm.select_simd("auto")
    scores, slots, subkeys = results["scalar"]
    assert scores[1, 0].isnan().all() and (scores[2:, 0, :-1] >= scores[2:, 0, 1:]).all()
    for path in paths[1:]:
        assert torch.equal(results[path][1], slots) and torch.equal(results[path][2], subkeys), path
        torch.testing.assert_close(results[path][0], scores, rtol=0, atol=0, equal_nan=True)


def test_select_simd_rejects_unknown_paths(kernel_calls):
    with pytest.raises(RuntimeError, match="unknown selection path 'sse9'"):
        torch.ops.pkmlm.select_simd("sse9")
    assert torch.ops.pkmlm.select_simd("auto") == torch.ops.pkmlm.simd_paths()[-1]


@pytest.mark.parametrize("dim", [256, 19, 40])
def test_every_row_adam_path_gives_the_scalar_result(kernel_calls, dim):
    """RowAdam's vectorised row updates (AVX2, AVX-512; rows longer or shorter than a vector, with a tail)
    give exactly the scalar path's weights, moments and step counts, over steps with gradients from tiny to
    huge, zero rows and rows updated more than once."""
    paths = torch.ops.pkmlm.simd_paths()
    gen = torch.Generator().manual_seed(dim)
    start = torch.randn(300, dim, generator=gen)
    steps = []
    for k in range(5):
        rows = torch.randperm(300, generator=gen)[:120].sort().values
        grads = torch.randn(120, dim, generator=gen) * 10.0 ** (3 * k - 6)
        grads[::7] = 0
        steps.append((rows, grads))
    results = {}
    try:
        for path in paths:
            torch.ops.pkmlm.select_simd(path)
            w, moments, count = start.clone(), torch.zeros(300, 2, dim), torch.zeros(300, dtype=torch.long)
            for i, (rows, grads) in enumerate(steps):
                torch.ops.pkmlm.row_adam_(w, moments, count, rows, grads, 1e-3 * (i + 1), 0.9, 0.98, 1e-8)
            results[path] = (w, moments, count)
    finally:
        torch.ops.pkmlm.select_simd("auto")
    assert kernel_calls["row_adam_"] == 5 * len(paths)
    w, moments, count = results["scalar"]
    assert not torch.equal(w, start) and count.max() > 1
    for path in paths[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[path], results["scalar"])), path


def test_first_build_says_what_is_happening(monkeypatch, tmp_path, capsys):
    """The ~15 s compile on first use prints a line before and after; loading a finished build prints nothing."""
    calls, torch_lock = _recording_build(monkeypatch, tmp_path)
    assert kernels._load() is True and calls == [False]
    err = capsys.readouterr().err
    assert "compiling the CPU kernels" in err and str(torch_lock.parent) in err and "CPU kernels ready" in err
    (torch_lock.parent / f"{torch_lock.parent.name}.so").write_bytes(b"")  # what a finished build leaves
    assert kernels._load() is True and calls == [False, False]
    assert capsys.readouterr().err == ""
