import copy

import pytest
import torch

from pkmlm.memory import ProductKeyMemory, candidate_pairs, make_value_table


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
