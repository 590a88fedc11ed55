"""The memory layer on a CUDA GPU against the CPU and brute force; the Triton value read against torch's.

Marked `cuda` (scripts/gpu_check.sh runs them); without a GPU every test skips with the reason.
"""

import copy
import importlib.util

import pytest
import torch

from pkmlm.memory.layer import ProductKeyMemory

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")]


def brute_force_scores(mem, q):
    """(N, heads, n_keys**2) float64 scores of every slot, slot = i1 * n_keys + i2."""
    half = mem.k_dim // 2
    keys, q = mem.keys.double(), q.double()
    s1 = torch.einsum("nhd,hkd->nhk", q[..., :half], keys[:, 0])
    s2 = torch.einsum("nhd,hkd->nhk", q[..., half:], keys[:, 1])
    return (s1[..., :, None] + s2[..., None, :]).flatten(-2)


@pytest.mark.parametrize("n_keys,heads,knn", [(16, 2, 5), (64, 4, 32), (128, 2, 16)])
def test_lookup_on_cuda_is_exact_top_knn(n_keys, heads, knn):
    torch.manual_seed(n_keys + knn)
    mem = ProductKeyMemory(16, 16, n_keys=n_keys, heads=heads, knn=knn, k_dim=16).cuda()
    q = torch.randn(300, heads, 16, device="cuda")
    with torch.no_grad():
        scores, slots = mem.lookup(q)
        full = brute_force_scores(mem, q)
    # The knn best scores (float32 sums against float64: 1e-5), each slot really has its score, no slot twice.
    torch.testing.assert_close(scores.double(), full.topk(knn, dim=-1).values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full.gather(-1, slots), scores.double(), rtol=1e-5, atol=1e-5)
    assert (slots.sort(-1).values.diff(dim=-1) > 0).all()


def _forward_backward(mem, x):
    x = x.clone().requires_grad_(True)
    out = mem(x)
    (out * torch.linspace(-1, 1, out.shape[-1], device=out.device)).sum().backward()
    grads = {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).cpu() for n, p in mem.named_parameters()
             if p.grad is not None}
    return out.detach().cpu(), x.grad.cpu(), grads


@pytest.mark.parametrize("kw", [{}, {"gated": True, "qk_norm": True}, {"query_batchnorm": False, "v_dim": 24}])
def test_forward_and_gradients_on_cuda_match_the_cpu(kw):
    """The same memory and batch on the CPU and on CUDA: outputs and every gradient (input, keys, query network,
    row-sparse values) agree to float32 rounding (1e-4)."""
    torch.manual_seed(0)
    cpu = ProductKeyMemory(32, 32, n_keys=32, heads=4, knn=8, k_dim=32, **kw)
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(4, 50, 32)
    out_c, dx_c, grads_c = _forward_backward(cpu, x)
    out_g, dx_g, grads_g = _forward_backward(gpu, x.cuda())
    torch.testing.assert_close(out_g, out_c, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dx_g, dx_c, rtol=1e-4, atol=1e-4)
    assert grads_g.keys() == grads_c.keys() and "values.weight" in grads_c
    for name in grads_c:
        torch.testing.assert_close(grads_g[name], grads_c[name], rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_value_read_matches_torch_on_cuda(dtype, monkeypatch):
    """PKMLM_TRITON=auto (Triton kernels on CUDA) against PKMLM_TRITON=0 (torch's embedding bag): same outputs and
    gradients, duplicate slots included (a tiny table read by many tokens)."""
    if importlib.util.find_spec("pkmlm.memory.triton_kernels") is None or importlib.util.find_spec("triton") is None:
        pytest.skip("pkmlm.memory.triton_kernels or triton is not installed")
    torch.manual_seed(0)
    mem = ProductKeyMemory(32, 32, n_keys=8, heads=4, knn=8, k_dim=16).cuda()  # 64 slots: many duplicates
    x = torch.randn(2, 300, 32, device="cuda")
    results = {}
    for mode in ("auto", "0"):
        monkeypatch.setenv("PKMLM_TRITON", mode)
        mem.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            results[mode] = _forward_backward(mem, x)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    (out_t, dx_t, g_t), (out_p, dx_p, g_p) = results["auto"], results["0"]
    torch.testing.assert_close(out_t, out_p, **tol)
    torch.testing.assert_close(dx_t, dx_p, **tol)
    for name in g_p:
        torch.testing.assert_close(g_t[name], g_p[name], **tol, msg=name)
