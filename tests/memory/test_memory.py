import copy

import pytest
import torch

from pkmlm.memory.layer import ProductKeyMemory, candidate_pairs, make_value_table


def small(input_dim=12, output_dim=10, **kw):
    args = dict(n_keys=8, heads=2, knn=4, k_dim=8)
    args.update(kw)
    return ProductKeyMemory(input_dim, output_dim, **args)


def brute_force_scores(mem, q):
    """(N, heads, n_keys**2) scores of every slot, slot = i1 * n_keys + i2."""
    half = mem.k_dim // 2
    keys = mem.keys.to(q.dtype)
    s1 = torch.einsum("nhd,hkd->nhk", q[..., :half], keys[:, 0])
    s2 = torch.einsum("nhd,hkd->nhk", q[..., half:], keys[:, 1])
    return (s1[..., :, None] + s2[..., None, :]).flatten(-2)


@pytest.mark.parametrize("n_keys,heads,knn,dtype", [
    (8, 1, 1, torch.float32), (16, 2, 5, torch.float32), (32, 4, 32, torch.float32),
    (20, 3, 7, torch.float64), (16, 2, 8, torch.bfloat16), (64, 2, 16, torch.float32)])
def test_lookup_is_exact_top_knn(n_keys, heads, knn, dtype):
    torch.manual_seed(n_keys + knn)
    mem = ProductKeyMemory(6, 6, n_keys=n_keys, heads=heads, knn=knn, k_dim=8).to(dtype)
    q = torch.randn(50, heads, 8, dtype=dtype)
    with torch.no_grad():
        scores, indices = mem.lookup(q)
        full = brute_force_scores(mem, q)
    assert scores.shape == indices.shape == (50, heads, knn)
    assert scores.dtype == dtype and indices.dtype == torch.long
    # Same top-knn scores as brute force, sorted; each returned slot really has its score; no slot
    # twice. Together these are exactness up to ties.
    torch.testing.assert_close(scores, full.topk(knn, dim=-1).values)
    torch.testing.assert_close(full.gather(-1, indices), scores)
    assert (scores[..., :-1] >= scores[..., 1:]).all()
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all()


def test_candidate_pairs_are_exactly_the_pruned_rank_pairs():
    a, b = candidate_pairs(32)
    pairs = set(zip(a.tolist(), b.tolist()))
    assert pairs == {(i, j) for i in range(32) for j in range(32) if (i + 1) * (j + 1) <= 32}
    assert len(pairs) < 32 * 32 // 8


@pytest.mark.parametrize("sparse", [True, False])
def test_gradients_reach_queries_keys_and_only_selected_values(sparse):
    torch.manual_seed(0)
    mem = small(sparse=sparse)
    x = torch.randn(4, 6, 12)
    mem(x).pow(2).sum().backward()
    for p in (mem.query_proj.weight, mem.query_norm.weight, mem.keys):
        assert p.grad is not None and p.grad.abs().sum() > 0
    with torch.no_grad():  # train mode: the same batch statistics, so the same queries
        _, indices = mem.lookup(mem.query(x))
    selected = indices.unique()
    grad = mem.values.weight.grad
    assert grad.is_sparse == sparse
    if sparse:
        touched = grad.coalesce().indices()[0].unique()
    else:
        touched = grad.abs().sum(-1).nonzero().squeeze(-1)
    assert torch.equal(touched, selected)


def test_sparse_value_gradient_equals_dense_gradient():
    torch.manual_seed(0)
    sparse, dense = small(sparse=True), small(sparse=False)
    dense.load_state_dict(sparse.state_dict())
    x = torch.randn(4, 6, 12)
    for mem in (sparse, dense):
        mem(x).pow(2).sum().backward()
    grad = sparse.values.weight.grad
    rows = grad._indices()[0]
    assert (rows.diff() > 0).all()  # one summed row per slot read, sorted
    torch.testing.assert_close(grad.to_dense(), dense.values.weight.grad)
    torch.testing.assert_close(sparse.keys.grad, dense.keys.grad)


def test_masked_batchnorm_uses_only_real_tokens():
    torch.manual_seed(0)
    mem = small()
    ref = copy.deepcopy(mem)
    x = torch.randn(3, 7, 12)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, 1:] = False
    x[~mask] = 1e3  # padding content must not matter
    out = mem(x, mask)
    expected = ref(x[mask])
    torch.testing.assert_close(out[mask], expected)
    assert (out[~mask] == 0).all()
    torch.testing.assert_close(mem.query_norm.running_mean, ref.query_norm.running_mean)
    torch.testing.assert_close(mem.query_norm.running_var, ref.query_norm.running_var)
    q = mem.query(x, mask)
    assert q.shape == (21, 2, 8) and (q[~mask.reshape(-1)] == 0).all()


@pytest.mark.parametrize("training", [True, False])
def test_fully_masked_batch_gives_zeros_and_gradients(training):
    torch.manual_seed(0)
    mem = small().train(training)
    x = torch.randn(2, 3, 12, requires_grad=True)
    out = mem(x, torch.zeros(2, 3, dtype=torch.bool))
    assert out.shape == (2, 3, 10) and (out == 0).all()
    out.sum().backward()
    assert (x.grad == 0).all()


def test_batched_and_flat_inputs_agree():
    torch.manual_seed(0)
    mem = small()
    x = torch.randn(3, 5, 12)
    out = mem(x)
    assert out.shape == (3, 5, 10)
    torch.testing.assert_close(out.reshape(15, 10), mem(x.reshape(15, 12)))
    assert mem.query(x).shape == (15, 2, 8)


def test_seeded_construction_and_forward_are_deterministic():
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        mem = small(input_dropout=0.1, query_dropout=0.1, value_dropout=0.1)
        outs.append(mem(torch.randn(4, 12)))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_initialisation_ranges():
    torch.manual_seed(0)
    mem = ProductKeyMemory(8, 64, n_keys=32, heads=2, knn=4, k_dim=18)
    bound = 9**-0.5
    assert mem.keys.shape == (2, 2, 32, 9)
    assert mem.keys.abs().max() <= bound and mem.keys.abs().max() > 0.9 * bound
    assert abs(mem.values.weight.std().item() - 64**-0.5) < 0.02 * 64**-0.5
    assert mem.values.weight.shape == (1024, 64) and mem.out_proj is None


def test_v_dim_adds_output_projection_and_batchnorm_is_optional():
    mem = small(v_dim=6, query_batchnorm=False)
    assert mem.values.weight.shape == (64, 6) and mem.out_proj.in_features == 6
    assert mem.query_norm is None
    x = torch.randn(5, 12)
    assert mem(x).shape == (5, 10)
    torch.testing.assert_close(mem.query(x), mem.query_proj(x).view(5, 2, 8))


@pytest.mark.parametrize("name", ["input_dropout", "query_dropout", "value_dropout"])
def test_each_dropout_acts_in_training_only(name):
    torch.manual_seed(0)
    plain = small()
    dropped = small(**{name: 0.5})
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(16, 12)
    plain.eval(), dropped.eval()
    torch.testing.assert_close(dropped(x), plain(x))
    plain.train(), dropped.train()
    assert not torch.allclose(dropped(x), plain(x))


def test_shared_value_table():
    table = make_value_table(8, 10)
    a, b = small(values=table), small(values=table)
    assert a.value_parameters()[0] is b.value_parameters()[0] is table.weight
    assert a.v_dim == 10
    x = torch.randn(6, 12)
    (a(x).sum() + b(x).sum()).backward()
    assert table.weight.grad.is_sparse


def test_softmax_is_float32_under_autocast():
    torch.manual_seed(0)
    mem = ProductKeyMemory(32, 32, n_keys=16, heads=2, knn=16, k_dim=16)
    mem.track_usage()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mem(torch.randn(64, 32))
    assert torch.isfinite(out).all()
    # Per token and head the weights sum to 1: float32 rounding, not bf16's (~4e-3).
    total = mem.usage()["weights"].sum().item()
    assert abs(total - 64 * 2) < 1e-4


def test_usage_histograms_match_lookup():
    torch.manual_seed(0)
    mem = small().eval()
    x = torch.randn(2, 9, 12)
    mask = torch.rand(2, 9) > 0.3
    mem.track_usage()
    mem(x, mask)
    mem(x, mask)
    usage = mem.usage()
    with torch.no_grad():
        q = mem.query(x[mask])
        scores, indices = mem.lookup(q)
        sub_ids = torch.einsum("nhpd,hpkd->nhpk", q.view(-1, 2, 2, 4), mem.keys).topk(4, -1).indices
    weights = scores.float().softmax(-1).double()
    for h in range(2):
        counts = torch.bincount(indices[:, h].reshape(-1), minlength=64).double()
        torch.testing.assert_close(usage["counts"][h], 2 * counts)
        w = torch.zeros(64, dtype=torch.float64).index_add_(0, indices[:, h].reshape(-1), weights[:, h].reshape(-1))
        torch.testing.assert_close(usage["weights"][h], 2 * w)
        for p in range(2):
            sub = torch.bincount(sub_ids[:, h, p].reshape(-1), minlength=8).double()
            torch.testing.assert_close(usage["subkey_counts"][h, p], 2 * sub)
    mem.reset_usage()
    assert all((t == 0).all() for t in mem.usage().values())
    mem.track_usage(False)
    with pytest.raises(RuntimeError, match="track_usage"):
        mem.usage()


@pytest.mark.parametrize("kwargs,match", [
    (dict(k_dim=7), "k_dim"), (dict(knn=9), "knn"), (dict(n_keys=0), "n_keys"),
    (dict(heads=-1), "heads"), (dict(n_keys=46341), "n_keys=46341"), (dict(knn=0), "knn"), (dict(v_dim=0), "v_dim"),
    (dict(input_dim=0), "input_dim"), (dict(output_dim=2.5), "output_dim"),
    (dict(input_dropout=1.0), "input_dropout"), (dict(query_dropout=-0.1), "query_dropout"),
    (dict(value_dropout=1.5), "value_dropout"),
    (dict(values=make_value_table(4, 10)), "n_keys\\*\\*2"),
    (dict(values=make_value_table(8, 10, sparse=False)), "sparse"),
    (dict(values=torch.nn.Embedding(64, 10)), "EmbeddingBag"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small(**kwargs)


def test_bad_inputs_raise_value_error():
    mem = small()
    with pytest.raises(ValueError, match="input_dim=12"):
        mem(torch.randn(4, 11))
    with pytest.raises(ValueError, match="mask"):
        mem(torch.randn(2, 4, 12), torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        mem.query(torch.randn(2, 4, 12), torch.ones(2, 4))
    with pytest.raises(ValueError, match="heads, k_dim"):
        mem.lookup(torch.randn(4, 3, 8))


# ---- Memory+ and the ablation options -----------------------------------------------------------------


def test_gate_is_silu_of_a_projection_of_the_input():
    torch.manual_seed(0)
    gated = small(gated=True)
    assert gated.out_proj is not None and gated.out_proj.in_features == gated.v_dim == 10
    plain = small(v_dim=10, output_dim=10)
    x = torch.randn(7, 12)
    gated.eval()
    with torch.no_grad():
        scores, indices = gated.lookup(gated.query(x))
        read = torch.einsum("nhk,nhkd->nd", scores.softmax(-1), gated.values.weight[indices])
        expected = gated.out_proj(read * torch.nn.functional.silu(gated.gate_proj(x)))
        torch.testing.assert_close(gated(x), expected)
    assert plain.gate_proj is None and plain.out_proj is None
    gated.train()
    gated(x).sum().backward()
    assert gated.gate_proj.weight.grad.abs().sum() > 0 and gated.gate_proj.bias is None


def test_frozen_keys_get_no_gradient_and_no_optimizer_state():
    from pkmlm.training.optim import make_optimizers

    torch.manual_seed(0)
    mem = small(learn_keys=False)
    before = mem.keys.detach().clone()
    opt = make_optimizers(mem, lr=1e-2, value_lr=1e-2)
    mem(torch.randn(5, 12)).pow(2).sum().backward()
    assert mem.keys.grad is None and mem.query_proj.weight.grad is not None
    assert all(p is not mem.keys for g in opt.dense.param_groups for p in g["params"])
    opt.step()
    assert torch.equal(mem.keys, before)


@pytest.mark.parametrize("kernels_on", ["0", "1"])
def test_temperature_and_softmax_off_weights(monkeypatch, kernels_on):
    monkeypatch.setenv("PKMLM_CPU_KERNELS", kernels_on)
    torch.manual_seed(0)
    x = torch.randn(6, 12)
    for kw, weigh in ((dict(score_temperature=0.25), lambda s: (s / 0.25).softmax(-1)),
                      (dict(score_softmax=False), lambda s: s),
                      (dict(score_softmax=False, score_temperature=2.0), lambda s: s / 2.0)):
        mem = small(output_dim=10, v_dim=10, **kw).eval()
        mem.track_usage()
        with torch.no_grad():
            scores, indices = mem.lookup(mem.query(x))
            expected = torch.einsum("nhk,nhkd->nd", weigh(scores), mem.values.weight[indices])
            torch.testing.assert_close(mem(x), expected)
        # the usage histogram records the weights actually used
        torch.testing.assert_close(mem.usage()["weights"].sum(), weigh(scores).double().sum())


def test_query_mlp_shapes_and_gradients():
    torch.manual_seed(0)
    mem = small(query_layers=3)
    assert [type(m).__name__ for m in mem.query_mlp] == ["Linear", "GELU", "Linear", "GELU"]
    x = torch.randn(2, 5, 12)
    assert mem.query(x).shape == (10, 2, 8)
    mem(x).sum().backward()
    for m in mem.query_mlp:
        if isinstance(m, torch.nn.Linear):
            assert m.weight.grad.abs().sum() > 0
    assert small(query_layers=1).query_mlp is None


def test_layernorm_queries_normalise_each_head_per_token():
    torch.manual_seed(0)
    mem = small(query_batchnorm=False, query_layernorm=True)
    assert isinstance(mem.query_norm, torch.nn.LayerNorm) and mem.query_proj.bias is not None
    x = torch.randn(9, 12)
    q = mem.query(x)
    torch.testing.assert_close(q.mean(-1), torch.zeros(9, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(q.var(-1, unbiased=False), torch.ones(9, 2), atol=1e-3, rtol=0)
    # per token: a token's query does not depend on the rest of the batch (unlike BatchNorm)
    torch.testing.assert_close(mem.query(x[:1]), q[:1])
    with pytest.raises(ValueError, match="exclusive"):
        small(query_layernorm=True)


def test_zero_initialised_values_and_their_reinit():
    torch.manual_seed(0)
    mem = small(value_init="zero")
    assert (mem.values.weight == 0).all()
    x = torch.randn(4, 12)
    assert (mem(x) == 0).all()
    mem.values.weight.data.fill_(1.0)
    mem.reinit_slots(torch.tensor([3, 5]))
    assert (mem.values.weight[[3, 5]] == 0).all() and (mem.values.weight[4] == 1).all()
    assert (make_value_table(4, 6, init="zero").weight == 0).all()


@pytest.mark.parametrize("init", ["uniform", "normal", "orthogonal"])
def test_key_init_variants_have_the_same_variance(init):
    torch.manual_seed(0)
    half = 16
    mem = ProductKeyMemory(8, 8, n_keys=64, heads=2, knn=4, k_dim=2 * half, key_init=init)
    var = 1 / (3 * half)
    assert abs(mem.keys.var().item() - var) < 0.1 * var
    if init == "orthogonal":  # n_keys > half: each (head, half) matrix has orthogonal columns of equal norm
        for m in mem.keys.view(-1, 64, half):
            gram = m.T @ m
            torch.testing.assert_close(gram, gram[0, 0] * torch.eye(half), atol=1e-4, rtol=0)
    if init == "uniform":
        assert mem.keys.abs().max() <= half**-0.5
    mask = torch.zeros(2, 2, 64, dtype=torch.bool)
    mask[0, 1, :32] = True
    before = mem.keys.detach().clone()
    mem.reinit_subkeys(mask, torch.Generator().manual_seed(1))
    assert torch.equal(mem.keys[~mask], before[~mask]) and not torch.equal(mem.keys[mask], before[mask])
    assert abs(mem.keys[mask].var().item() - var) < 0.3 * var


def brute_force_flat(mem, q):
    keys = mem.keys.to(q.dtype)
    if mem.qk_norm:
        q, keys = torch.nn.functional.normalize(q, dim=-1) * mem.k_dim**0.5, torch.nn.functional.normalize(keys, dim=-1)
    return torch.einsum("nhd,hsd->nhs", q, keys)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_flat_memory_is_exact_top_knn(qk_norm):
    torch.manual_seed(0)
    mem = ProductKeyMemory(6, 6, n_keys=12, heads=3, knn=7, k_dim=8, flat=True, qk_norm=qk_norm)
    assert mem.keys.shape == (3, 144, 8)
    q = torch.randn(40, 3, 8)
    with torch.no_grad():
        scores, indices = mem.lookup(q)
        full = brute_force_flat(mem, q)
    torch.testing.assert_close(scores, full.topk(7, dim=-1).values)
    torch.testing.assert_close(full.gather(-1, indices), scores)
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all()
    # gradients reach the queries and only the selected keys
    mem.train()
    x = torch.randn(5, 6)
    mem.track_usage()
    mem(x).sum().backward()
    touched = mem.keys.grad.abs().sum(-1).nonzero()
    with torch.no_grad():
        _, sel = mem.lookup(mem.query(x))
    expected = {(h, s) for h in range(3) for s in sel[:, h].reshape(-1).tolist()}
    assert {tuple(t) for t in touched.tolist()} == expected
    assert mem.usage()["counts"].sum() == 5 * 3 * 7 and (mem.usage()["subkey_counts"] == 0).all()
    with pytest.raises(ValueError, match="no sub-keys"):
        mem.reinit_subkeys(torch.zeros(3, 2, 12, dtype=torch.bool))


def test_flat_memory_has_a_size_limit():
    with pytest.raises(ValueError, match="at most 65536"):
        ProductKeyMemory(6, 6, n_keys=257, heads=1, knn=4, k_dim=8, flat=True)


def test_qk_norm_scores_are_scaled_cosines():
    torch.manual_seed(0)
    mem = small(qk_norm=True)
    q = torch.randn(11, 2, 8) * 5
    with torch.no_grad():
        scores, indices = mem.lookup(q)
        qn = torch.nn.functional.normalize(q.view(11, 2, 2, 4), dim=-1) * 2
        kn = torch.nn.functional.normalize(mem.keys, dim=-1)
        half = torch.einsum("nhpd,hpkd->nhpk", qn, kn)
        full = (half[:, :, 0, :, None] + half[:, :, 1, None, :]).flatten(-2)
    torch.testing.assert_close(scores, full.topk(4, -1).values)
    assert scores.abs().max() <= 2 * 2 + 1e-5  # two cosines, each scaled by sqrt(k_dim // 2) = 2


@pytest.mark.parametrize("kw", [dict(), dict(gated=True, qk_norm=True), dict(learn_keys=False),
                                dict(query_layers=2, query_batchnorm=False, query_layernorm=True),
                                dict(key_init="orthogonal", score_temperature=0.5)])
def test_options_agree_between_compiled_kernels_and_torch(monkeypatch, kw):
    from pkmlm.memory import kernels

    if not kernels.available():
        pytest.skip("compiled CPU kernels unavailable")
    torch.manual_seed(0)
    mem = small(**kw)
    ref = copy.deepcopy(mem)
    x = torch.randn(3, 5, 12)
    out = mem(x)
    out.pow(2).sum().backward()
    monkeypatch.setenv("PKMLM_CPU_KERNELS", "0")
    ref_out = ref(x)
    ref_out.pow(2).sum().backward()
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    for (name, p), r in zip(mem.named_parameters(), ref.parameters()):
        if p.grad is None:
            assert r.grad is None, name
        else:
            torch.testing.assert_close(p.grad.to_dense(), r.grad.to_dense(), atol=1e-5, rtol=1e-4, msg=name)


def test_flat_memory_never_calls_the_compiled_lookup(monkeypatch):
    from pkmlm.memory import layer as memory

    def boom(*args):
        raise AssertionError("the compiled product-key lookup was used for a flat memory")

    monkeypatch.setattr(memory, "_compiled_lookup", boom)
    mem = ProductKeyMemory(6, 6, n_keys=8, heads=2, knn=4, k_dim=8, flat=True)
    mem(torch.randn(4, 6)).sum().backward()
    with pytest.raises(AssertionError, match="compiled"):
        small()(torch.randn(4, 12)) if memory.kernels.available() else boom()


@pytest.mark.parametrize("kwargs,match", [
    (dict(key_init="gaussian"), "key_init"), (dict(value_init="ones"), "value_init"),
    (dict(score_temperature=0.0), "score_temperature"), (dict(query_layers=0), "query_layers"),
])
def test_bad_option_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small(**kwargs)
