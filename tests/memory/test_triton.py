"""The Triton kernels (pkmlm.memory.triton_kernels) against the torch path and float64 references.

Without a GPU they run under Triton's interpreter: TRITON_INTERPRET=1 must be set before Triton is imported, so
each interpreter check runs in a fresh Python process (this file's `check_*` functions, with PKMLM_TRITON=1 to
route CPU tensors to the kernels). The interpreter is slow: sizes stay tiny. On a CUDA machine the `cuda` test
runs the same checks on the GPU, compiled.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pkmlm.memory import triton_kernels

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")

# (tokens, reads per token, table rows, dim): duplicates within and across tokens (few rows), a dim that is not
# a power of two, one read per token, an empty batch.
CASES = [(6, 4, 5, 10), (9, 8, 40, 16), (3, 1, 7, 3), (0, 4, 5, 8)]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}


def inputs(n, r, rows, dim, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(rows, dim, generator=g)
    slots = torch.randint(0, rows, (n, r), generator=g)
    if n and r > 1:
        slots[0, 1] = slots[0, 0]  # a slot read twice by one token
    weights = torch.rand(n, r, generator=g)
    grad_out = torch.randn(n, dim, generator=g)
    return [t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in (table, slots, weights, grad_out)]


def check_value_read(device="cpu"):
    """Forward and both gradients against float64 embedding-bag autograd, for every case and dtype."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tol = TOLERANCE[dtype]
        for n, r, rows, dim in CASES:
            table, slots, weights, grad_out = inputs(n, r, rows, dim, dtype, device)
            t64 = table.double().requires_grad_()
            w64 = weights.double().requires_grad_()
            ref = F.embedding_bag(slots, t64, per_sample_weights=w64, mode="sum")
            ref.backward(grad_out.double())
            out = triton_kernels.value_read(table, slots, weights)
            assert out.dtype == dtype and out.shape == (n, dim)
            torch.testing.assert_close(out.double(), ref.detach(), atol=tol * 4, rtol=tol)
            got_rows, row_grads, grad_weights = triton_kernels.value_read_backward(grad_out, table, slots, weights)
            assert torch.equal(got_rows.cpu(), slots.reshape(-1).unique().cpu())  # distinct, increasing
            assert row_grads.dtype == dtype and grad_weights.dtype == dtype and grad_weights.shape == (n, r)
            torch.testing.assert_close(row_grads.double(), t64.grad[got_rows], atol=tol * 4, rtol=tol)
            torch.testing.assert_close(grad_weights.double(), w64.grad, atol=tol * 4, rtol=tol)


def check_memory_layer_uses_triton(device="cpu"):
    """A ProductKeyMemory takes the Triton path (counted) and matches the torch path's output and gradients."""
    from pkmlm.memory.layer import ProductKeyMemory

    calls = []
    read, backward = triton_kernels.value_read, triton_kernels.value_read_backward
    triton_kernels.value_read = lambda *a: calls.append("read") or read(*a)
    triton_kernels.value_read_backward = lambda *a: calls.append("backward") or backward(*a)
    torch.manual_seed(0)
    mem = ProductKeyMemory(8, 8, n_keys=6, heads=2, knn=3, k_dim=8).to(device)
    x = torch.randn(2, 3, 8, device=device)
    results = {}
    for mode in ("1", "0"):
        os.environ[triton_kernels.ENV_VAR] = mode
        mem.zero_grad()
        out = mem(x)
        out.square().sum().backward()
        results[mode] = out.detach(), mem.values.weight.grad.to_dense(), mem.query_proj.weight.grad.clone()
        assert mem.values.weight.grad.is_sparse
    assert calls == ["read", "backward"], calls  # PKMLM_TRITON=1 only
    for a, b in zip(results["1"], results["0"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def run_under_interpreter(check: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", triton_kernels.ENV_VAR: "1"}
    code = f"import runpy; runpy.run_path({__file__!r})[{check!r}]()"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@needs_triton
@pytest.mark.slow
def test_value_read_kernels_match_float64_under_interpreter():
    run_under_interpreter("check_value_read")


@needs_triton
@pytest.mark.slow
def test_memory_layer_runs_triton_path_under_interpreter():
    run_under_interpreter("check_memory_layer_uses_triton")


@pytest.mark.cuda
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_value_read_kernels_on_cuda(monkeypatch):
    """The same checks compiled for the GPU; the layer picks Triton by itself for CUDA tensors (auto)."""
    check_value_read("cuda")
    monkeypatch.setenv(triton_kernels.ENV_VAR, "auto")
    table, _, weights, _ = inputs(2, 2, 4, 8, torch.float32, "cuda")
    assert triton_kernels.usable(table, weights)
    check_memory_layer_uses_triton("cuda")


def test_cpu_tensors_never_take_triton_by_default(monkeypatch):
    monkeypatch.delenv(triton_kernels.ENV_VAR, raising=False)
    table, slots, weights, _ = inputs(3, 2, 5, 4, torch.float32)
    assert not triton_kernels.usable(table, weights)
    monkeypatch.setattr(triton_kernels, "value_read", lambda *a: pytest.fail("Triton used for CPU tensors"))
    from pkmlm.memory.layer import _sparse_read

    _sparse_read(table.requires_grad_(), slots, weights.requires_grad_()).sum().backward()
    monkeypatch.setenv(triton_kernels.ENV_VAR, "0")
    assert not triton_kernels.usable(table, weights)


def test_forced_triton_needs_triton_installed_and_a_supported_table(monkeypatch):
    monkeypatch.setenv(triton_kernels.ENV_VAR, "1")
    table, _, weights, _ = inputs(3, 2, 5, 4, torch.float32)
    monkeypatch.setitem(triton_kernels._state, "importable", False)  # as without triton
    assert not triton_kernels.usable(table, weights)
    monkeypatch.setitem(triton_kernels._state, "importable", True)
    assert triton_kernels.usable(table, weights)
    assert not triton_kernels.usable(table.double(), weights)  # float64: the torch path
    assert not triton_kernels.usable(torch.zeros(2, triton_kernels.MAX_DIM + 1), weights)


@pytest.mark.parametrize("value", ["yes", "cuda", ""])
def test_bad_switch_is_one_clear_error(monkeypatch, value):
    monkeypatch.setenv(triton_kernels.ENV_VAR, value)
    with pytest.raises(triton_kernels.TritonError, match="PKMLM_TRITON.*auto.*0.*1"):
        triton_kernels.mode()
