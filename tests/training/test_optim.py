import copy

import pytest
import torch
from torch import nn

from pkmlm.memory import ProductKeyMemory, make_value_table
from pkmlm.training.optim import Optimizers, RowAdam, inverse_sqrt_warmup, make_optimizers


def sparse_grad(rows, grads, shape):
    """An uncoalesced row-sparse gradient: rows may repeat (their grads add up)."""
    return torch.sparse_coo_tensor(torch.tensor([rows]), torch.stack(grads), shape,
                                   check_invariants=True)


def test_row_adam_matches_dense_adam_per_row():
    torch.manual_seed(0)
    table = nn.Parameter(torch.randn(6, 3))
    start = table.detach().clone()
    opt = RowAdam([table], lr=0.1, betas=(0.8, 0.9), eps=1e-6)
    # Reference: every row is its own dense Adam, stepped only when the row is touched.
    ref_rows = [nn.Parameter(start[i].clone()) for i in range(6)]
    ref_opts = [torch.optim.Adam([r], lr=0.1, betas=(0.8, 0.9), eps=1e-6) for r in ref_rows]
    steps = [[0, 2, 2, 5], [1, 2], [0, 0, 0], [2, 5, 1]]  # row 3 and 4 never touched
    for rows in steps:
        grads = [torch.randn(3) for _ in rows]
        table.grad = sparse_grad(rows, grads, (6, 3))
        opt.step()
        for i in set(rows):
            ref_rows[i].grad = sum(g for r, g in zip(rows, grads) if r == i)
            ref_opts[i].step()
    torch.testing.assert_close(table.detach(), torch.stack([r.detach() for r in ref_rows]))
    assert torch.equal(table[3:5].detach(), start[3:5])
    assert opt.state[table]["step"].tolist() == [2, 2, 3, 0, 0, 2]


def test_reset_state_makes_rows_start_afresh():
    torch.manual_seed(0)
    table = nn.Parameter(torch.randn(4, 2))
    opt = RowAdam([table], lr=0.1)
    for _ in range(3):
        table.grad = sparse_grad([0, 1, 2], [torch.randn(2) for _ in range(3)], (4, 2))
        opt.step()
    opt.reset_state(table, torch.tensor([1]))
    assert opt.state[table]["step"].tolist() == [3, 0, 3, 0]
    assert (opt.state[table]["moments"][1] == 0).all() and (opt.state[table]["moments"][0] != 0).all()
    before = table.detach().clone()
    g = torch.tensor([0.3, -2.0])
    table.grad = sparse_grad([1], [g], (4, 2))
    opt.step()
    # A fresh Adam row's first step moves each coordinate by lr * sign(g) (up to eps).
    torch.testing.assert_close(table[1].detach(), before[1] - 0.1 * g.sign())
    with pytest.raises(ValueError, match="not optimized"):
        opt.reset_state(nn.Parameter(torch.zeros(4, 2)), torch.tensor([0]))


def test_optimizers_reset_rows_routes_values_and_dense_parameters():
    torch.manual_seed(0)
    table, keys = nn.Parameter(torch.randn(4, 2)), nn.Parameter(torch.randn(3, 2))
    opts = Optimizers(torch.optim.AdamW([keys], lr=0.1), RowAdam([table], lr=0.1))
    for _ in range(2):
        table.grad = sparse_grad([0, 1, 2], [torch.randn(2) for _ in range(3)], (4, 2))
        keys.grad = torch.randn(3, 2)
        opts.step()
    opts.reset_rows(table, torch.tensor([2]))
    opts.reset_rows(keys, torch.tensor([False, True, False]))
    assert opts.values.state[table]["step"].tolist() == [2, 2, 0, 0]
    dense = opts.dense.state[keys]
    for name in ("exp_avg", "exp_avg_sq"):
        assert (dense[name][1] == 0).all() and (dense[name][0] != 0).all() and (dense[name][2] != 0).all()
    with pytest.raises(ValueError, match="not optimized"):
        opts.reset_rows(nn.Parameter(torch.zeros(2)), torch.tensor([0]))


def test_row_adam_rejects_dense_gradients():
    table = nn.Parameter(torch.zeros(3, 2))
    table.grad = torch.ones(3, 2)
    with pytest.raises(ValueError, match="sparse=True"):
        RowAdam([table]).step()


class TwoMemoryNet(nn.Module):
    def __init__(self, sparse=True):
        super().__init__()
        shared = make_value_table(4, 8, sparse=sparse)
        self.inp = nn.Linear(8, 8)
        self.a = ProductKeyMemory(8, 8, n_keys=4, heads=1, knn=2, k_dim=4, values=shared, sparse=sparse)
        self.b = ProductKeyMemory(8, 8, n_keys=4, heads=1, knn=2, k_dim=4, values=shared, sparse=sparse)
        self.c = ProductKeyMemory(8, 8, n_keys=4, heads=1, knn=2, k_dim=4, sparse=sparse)

    def forward(self, x):
        h = self.inp(x)
        return self.a(h) + self.b(h) + self.c(h)


def test_make_optimizers_routes_every_parameter_once():
    net = TwoMemoryNet()
    opts = make_optimizers(net, lr=1e-3, value_lr=1e-2, weight_decay=0.1)
    values = opts.values.param_groups[0]["params"]
    assert len(values) == 2 and values[0] is net.a.values.weight and values[1] is net.c.values.weight
    dense = [p for g in opts.dense.param_groups for p in g["params"]]
    ids = [id(p) for p in dense + values]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in net.parameters()}
    decayed = {id(p) for g in opts.dense.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(net.inp.weight) in decayed and id(net.inp.bias) not in decayed
    assert opts.values.param_groups[0]["lr"] == 1e-2


def test_dense_value_tables_go_to_adamw_at_value_lr():
    net = TwoMemoryNet(sparse=False)
    opts = make_optimizers(net, lr=1e-3, value_lr=1e-2)
    assert opts.values is None
    (group,) = [g for g in opts.dense.param_groups if g["lr"] == 1e-2]
    assert {id(p) for p in group["params"]} == {id(net.a.values.weight), id(net.c.values.weight)}
    assert make_optimizers(nn.Linear(2, 2), lr=1e-3, value_lr=1e-2).values is None


def test_training_step_touches_only_read_value_rows_and_lr_factor_applies():
    torch.manual_seed(0)
    net = TwoMemoryNet()
    opts = make_optimizers(net, lr=1e-3, value_lr=1e-2)
    opts.set_lr_factor(0.5)
    assert all(g["lr"] == g["base_lr"] * 0.5 for o in (opts.dense, opts.values) for g in o.param_groups)
    before = net.c.values.weight.detach().clone()
    net(torch.randn(5, 8)).pow(2).sum().backward()
    touched = net.c.values.weight.grad.coalesce().indices()[0]
    opts.step()
    changed = (net.c.values.weight.detach() != before).any(-1).nonzero().squeeze(-1)
    assert torch.equal(changed, touched)
    opts.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_state_dict_round_trip_resumes_exactly():
    def train(net, opts, steps, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            opts.zero_grad()
            net(torch.randn(6, 8, generator=g)).pow(2).sum().backward()
            opts.step()

    torch.manual_seed(0)
    net = TwoMemoryNet()
    opts = make_optimizers(net, lr=1e-2, value_lr=1e-2)
    train(net, opts, 2, seed=1)
    # state_dict()s alias live tensors; a checkpoint is a snapshot.
    saved_model, saved_opts = copy.deepcopy(net.state_dict()), copy.deepcopy(opts.state_dict())
    train(net, opts, 2, seed=2)

    resumed = TwoMemoryNet()
    resumed.load_state_dict(saved_model)
    resumed_opts = make_optimizers(resumed, lr=1e-2, value_lr=1e-2)
    resumed_opts.load_state_dict(saved_opts)
    train(resumed, resumed_opts, 2, seed=2)
    for p, q in zip(net.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    with pytest.raises(ValueError, match="value tables"):
        make_optimizers(nn.Linear(2, 2), lr=1e-3, value_lr=1e-3).load_state_dict(saved_opts)


def test_inverse_sqrt_warmup():
    assert inverse_sqrt_warmup(1, 4) == 0.25
    assert inverse_sqrt_warmup(4, 4) == 1.0
    assert inverse_sqrt_warmup(16, 4) == 0.5
    assert inverse_sqrt_warmup(7, 0) == 1.0
    with pytest.raises(ValueError, match="step"):
        inverse_sqrt_warmup(0, 4)
    with pytest.raises(ValueError, match="warmup_steps"):
        inverse_sqrt_warmup(1, -1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=0.0), "lr"), (dict(value_lr=-1.0), "value_lr"), (dict(betas=(0.9, 1.0)), "betas"),
    (dict(eps=0.0), "eps"), (dict(weight_decay=-0.1), "weight_decay")])
def test_make_optimizers_rejects_bad_arguments(kwargs, match):
    args = dict(lr=1e-3, value_lr=1e-3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        make_optimizers(TwoMemoryNet(), **args)


def test_coalesce_rows_sums_duplicates_and_marks_sorted_rows_without_copying():
    from pkmlm.memory.sparse import coalesce_rows

    values = torch.arange(8.0).view(4, 2)
    repeated = torch.sparse_coo_tensor(torch.tensor([[3, 1, 3, 0]]), values, (5, 2))
    summed = coalesce_rows(repeated)
    assert summed.is_coalesced() and summed._indices()[0].tolist() == [0, 1, 3]
    torch.testing.assert_close(summed.to_dense(), repeated.to_dense())
    ordered = torch.sparse_coo_tensor(torch.tensor([[0, 2, 4]]), values[:3], (5, 2))
    assert not ordered.is_coalesced()
    marked = coalesce_rows(ordered)
    assert marked.is_coalesced() and marked._values().data_ptr() == ordered._values().data_ptr()
