"""Value tables sharded by columns over processes (pkmlm/memory/value_table.py), against a whole table."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pkmlm.memory import ProductKeyMemory, make_value_table
from pkmlm.memory.value_table import ShardedValueTable, gather_state, local_state


def test_init_draws_the_replicated_tables_numbers_in_chunks(monkeypatch):
    monkeypatch.setattr("pkmlm.memory.value_table.INIT_CHUNK_ROWS", 16)  # several chunks and a ragged last one
    torch.manual_seed(0)
    whole = make_value_table(7, 12).weight
    after_whole = torch.rand(3)
    torch.manual_seed(0)
    sharded = ShardedValueTable(49, 12)
    assert torch.equal(sharded.weight, whole) and torch.equal(torch.rand(3), after_whole)


def test_one_process_memory_reads_and_learns_like_the_replicated_one():
    memories = []
    for sharded in (False, True):
        torch.manual_seed(0)
        values = ShardedValueTable(64, 16) if sharded else make_value_table(8, 16)
        memories.append(ProductKeyMemory(12, 16, n_keys=8, heads=2, knn=4, k_dim=8, values=values))
    x = torch.randn(2, 5, 12)
    outs = [m(x) for m in memories]
    torch.testing.assert_close(outs[1], outs[0])
    for m, out in zip(memories, outs):
        out.square().sum().backward()
    assert memories[1].values.weight.grad.is_sparse
    torch.testing.assert_close(memories[1].values.weight.grad.to_dense(), memories[0].values.weight.grad.to_dense())
    torch.testing.assert_close(memories[1].query_proj.weight.grad, memories[0].query_proj.weight.grad)
    torch.testing.assert_close(memories[1].keys.grad, memories[0].keys.grad)


def _read_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    table = ShardedValueTable(50, 8)
    full = table.gather_columns(table.weight)
    # Every rank its own number of tokens, rank 1 none at all: all collectives must still pair up.
    n = [5, 0, 3, 7][rank]
    torch.manual_seed(10 + rank)
    slots = torch.randint(0, 50, (n, 6))
    weights = torch.rand(n, 6, requires_grad=True)
    out = table.read(slots, weights)
    upstream = torch.randn(n, 8)
    (out * upstream).sum().backward()
    table.write_rows(torch.tensor([3]), torch.arange(8.0).view(1, 8))  # the same full row on every rank
    after = table.gather_columns(table.weight)
    torch.save({"full": full, "slots": slots, "weights": weights.detach(), "out": out.detach(),
                "upstream": upstream, "grad_weights": weights.grad, "grad_shard": table.weight.grad.to_dense(),
                "columns": (table.columns.start, table.columns.stop), "after": after},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.slow
def test_sharded_read_and_gradients_match_a_whole_table(tmp_path, world):
    mp.spawn(_read_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    torch.manual_seed(0)
    full = torch.empty(50, 8).normal_(0, 8**-0.5)  # what a replicated table draws
    torch.testing.assert_close(got[0]["full"], full, rtol=0, atol=0)
    table = full.clone().requires_grad_()
    grad_table = torch.zeros(50, 8)
    for g in got:
        weights = g["weights"].clone().requires_grad_()
        out = F.embedding_bag(g["slots"], table, per_sample_weights=weights, mode="sum")
        torch.testing.assert_close(g["out"], out)
        (out * g["upstream"]).sum().backward()
        torch.testing.assert_close(g["grad_weights"], weights.grad)
    grad_table = table.grad / world  # the mean over ranks, as DDP averages
    for g in got:
        start, stop = g["columns"]
        assert stop - start == 8 // world
        torch.testing.assert_close(g["grad_shard"], grad_table[:, start:stop])
    expected = full.clone()
    expected[3] = torch.arange(8.0)
    assert torch.equal(got[0]["after"], expected)


def _state_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    shared = ShardedValueTable(64, 8)
    model = torch.nn.ModuleDict({"a": ProductKeyMemory(4, 8, n_keys=8, heads=1, knn=2, k_dim=4, values=shared),
                                 "b": ProductKeyMemory(4, 8, n_keys=8, heads=1, knn=2, k_dim=4, values=shared)})
    state = gather_state(model)
    if rank == 0:
        torch.save(state, os.path.join(out_dir, "state.pt"))
    dist.barrier()
    saved = torch.load(os.path.join(out_dir, "state.pt"), weights_only=True)
    mine = local_state(model, saved)
    assert torch.equal(mine["a.values.weight"], shared.weight) and torch.equal(mine["b.values.weight"], shared.weight)
    model.load_state_dict(mine)
    dist.destroy_process_group()


@pytest.mark.slow
def test_state_holds_whole_shared_tables_and_loads_back(tmp_path):
    mp.spawn(_state_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    torch.manual_seed(0)
    whole = make_value_table(8, 8).weight
    assert torch.equal(state["a.values.weight"], whole) and torch.equal(state["b.values.weight"], whole)
