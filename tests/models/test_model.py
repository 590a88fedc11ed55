"""pkmlm.models.transformer: shapes, causality, memory placements, shared values, tied embeddings, counts."""
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from pkmlm.config import Config, load_config
from pkmlm.memory import ProductKeyMemory
from conftest import assert_causal  # tests/conftest.py
from pkmlm.models.transformer import TransformerLM

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
V = 50


def small(positions=(), **memory) -> Config:
    """A 3-layer d=32 model; memory of 8**2 slots, 2 heads, knn 4."""
    return Config.from_dict({
        "model": {"n_layers": 3, "d_model": 32, "n_heads": 2, "max_seq_len": 16, "dropout": 0.1},
        "memory": {"positions": list(positions), "n_keys": 8, "heads": 2, "knn": 4, "k_dim": 8, **memory},
        "data": {"batch_size": 4, "bptt": 16},
        "train": {"max_steps": 1},
    })


def build(config, seed=0) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(config, V)


def tokens(B=2, T=12, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


class Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


@pytest.mark.parametrize("name", ["tiny", "tiny_deep", "tiny_pkm", "tiny_pkm_parallel", "llama_tiny_pkm"])
def test_tiny_configs_forward_backward(name):
    model = build(load_config(CONFIGS / f"{name}.yaml"))
    idx = tokens(B=2, T=32)
    logits = model(idx)
    assert logits.shape == (2, 32, V)
    nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()
    assert all(p.grad is not None for p in model.parameters())
    for _, memory in model.memories():  # values get the row-sparse gradient the sparse optimizer expects
        assert memory.values.weight.grad.is_sparse


def test_bad_inputs_raise_clear_errors():
    model = build(small())
    with pytest.raises(ValueError, match="2-D .* torch.long"):
        model(tokens()[0])
    with pytest.raises(ValueError, match="torch.long"):
        model(tokens().int())
    with pytest.raises(ValueError, match="sequence length 17 exceeds model.max_seq_len=16"):
        model(tokens(T=17))
    with pytest.raises(ValueError, match="vocab_size must be a positive int"):
        TransformerLM(small(), 0)


@pytest.mark.parametrize("positions", [(), ("1:replace",), ("1:parallel",), ("1:after",)])
def test_causal(positions):
    # eval mode: in training, query BatchNorm normalises with batch statistics over all positions
    model = build(small(positions)).eval()
    assert_causal(model, tokens(), V)


def test_dropout_only_in_training():
    model = build(small(["1:parallel"], value_dropout=0.5))
    idx = tokens()
    model.eval()
    torch.testing.assert_close(model(idx), model(idx), rtol=0, atol=0)
    model.train()
    assert not torch.allclose(model(idx), model(idx))


@pytest.mark.parametrize("kind, attr", [("replace", "memory"), ("parallel", "memory"), ("after", "after_memory")])
def test_placements_route_through_the_memory(kind, attr):
    model = build(small([f"1:{kind}"])).eval()
    block = model.blocks[1]
    memory = getattr(block, attr)
    assert [name for name, _ in model.memories()] == [f"blocks.1.{attr}"] and memory is not None
    assert (block.ffn is None) == (kind == "replace")
    assert (block.after_norm is not None) == (kind == "after")
    idx = tokens()
    with_memory = model(idx)
    with torch.no_grad():
        memory.values.weight.zero_()  # the memory now adds exactly nothing
    zeroed = model(idx)
    setattr(block, attr, Zero())
    torch.testing.assert_close(zeroed, model(idx), rtol=0, atol=1e-6)
    assert not torch.allclose(with_memory, zeroed, atol=1e-4)
    if kind == "parallel":  # the FFN still contributes next to the memory
        block.ffn = Zero()
        assert not torch.allclose(zeroed, model(idx), atol=1e-4)


def test_several_memories_in_layer_order_and_shared_values():
    positions = ["2:after", "0:replace", "2:parallel", "0:after"]
    model = build(small(positions, share_values=True))
    names = [name for name, _ in model.memories()]
    assert names == ["blocks.0.memory", "blocks.0.after_memory", "blocks.2.memory", "blocks.2.after_memory"]
    tables = {id(m.values.weight) for _, m in model.memories()}
    assert len(tables) == 1
    assert sum(p.numel() for p in model.parameters()) == model.num_parameters()["total"]
    assert model.num_parameters()["memory_values"] == 8**2 * 32
    # the one table survives a state_dict round trip as one table
    clone = build(small(positions, share_values=True), seed=5)
    clone.load_state_dict(model.state_dict())
    torch.testing.assert_close(clone.eval()(tokens()), model.eval()(tokens()))
    assert len({id(m.values.weight) for _, m in clone.memories()}) == 1

    separate = build(small(positions))
    assert len({id(m.values.weight) for _, m in separate.memories()}) == 4


def test_tied_embeddings():
    model = build(small()).eval()
    idx = torch.full((1, 5), 3)
    before = model(idx)
    with torch.no_grad():
        # Token 7 is never input: only the output layer reads its row. (A constant shift would not show:
        # the final LayerNorm output has zero mean.)
        model.tok_emb.weight[7] += torch.linspace(-1.0, 1.0, model.tok_emb.weight.shape[1])
    after = model(idx)
    assert not torch.allclose(before[..., 7], after[..., 7])
    torch.testing.assert_close(before[..., :7], after[..., :7])
    assert not any(p.shape == (V, 32) and p is not model.tok_emb.weight for p in model.parameters())


def test_parameter_counts():
    d, L, V_, f = 32, 3, V, 4
    attn = 3 * d * d + 3 * d + d * d + d
    ffn = d * f * d + f * d + f * d * d + d
    dense = V_ * d + 16 * d + L * (attn + ffn + 4 * d) + 2 * d
    assert build(small()).num_parameters() == {"total": dense, "memory_values": 0, "active_per_token": dense}

    model = build(small(["1:replace", "2:after"], v_dim=16))
    mem = next(m for _, m in model.memories())
    per_memory = sum(p.numel() for p in mem.parameters())
    total = dense - ffn + 2 * per_memory + 2 * d  # the "after" sub-layer brings its own LayerNorm
    values = 2 * 8**2 * 16
    assert model.num_parameters() == {"total": total, "memory_values": values,
                                      "active_per_token": total - values + 2 * (2 * 4 * 16)}


def test_initialisation_leaves_memories_alone():
    model = build(small(["1:parallel"]))
    block = model.blocks[1]
    assert block.ffn.fc.bias.abs().sum() == 0 and block.attn.qkv.bias.abs().sum() == 0
    assert abs(block.ffn.fc.weight.std().item() - 0.02) < 0.002
    assert abs(block.ffn.proj.weight.std().item() - 0.02 / math.sqrt(6)) < 0.001
    assert abs(block.attn.proj.weight.std().item() - 0.02 / math.sqrt(6)) < 0.002
    memory = block.memory
    assert isinstance(memory, ProductKeyMemory)
    fan_in = memory.query_proj.in_features  # PyTorch's own U(+-1/sqrt(fan_in)) init, not the 0.02 of ours
    # 512 weights: the std of their std is ~0.003, and 0.02 (our init) is far outside 0.01
    assert abs(memory.query_proj.weight.std().item() - (3 * fan_in) ** -0.5) < 0.01
    assert abs(memory.values.weight.std().item() - 32**-0.5) < 0.02  # the memory's N(0, v_dim**-0.5)


def test_bf16_autocast_forward_backward():
    model = build(small(["1:parallel"]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens())
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    logits.float().logsumexp(-1).mean().backward()
    assert torch.isfinite(model.tok_emb.weight.grad).all()


def test_memory_options_reach_every_memory_and_train():
    from pkmlm.training.optim import make_optimizers

    options = dict(gated=True, qk_norm=True, learn_keys=False, key_init="orthogonal", score_temperature=0.5,
                   score_softmax=False, query_layers=2, query_batchnorm=False, query_layernorm=True,
                   value_init="zero", share_values=True)
    model = build(small(["0:replace", "2:after"], **options))
    for _, m in model.memories():
        assert m.gate_proj is not None and m.qk_norm and not m.keys.requires_grad and m.key_init == "orthogonal"
        assert m.score_temperature == 0.5 and not m.score_softmax and len(m.query_mlp) == 2
        assert isinstance(m.query_norm, nn.LayerNorm) and m.value_init == "zero"
    assert (model.memories()[0][1].values.weight == 0).all()  # the shared table follows value_init
    opt = make_optimizers(model, lr=1e-2, value_lr=1e-2)
    idx = tokens()
    nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    opt.step()
    assert (model.memories()[0][1].values.weight != 0).any()  # zero values still learn

    flat = build(small(["1:replace"], flat=True))
    mem = flat.memories()[0][1]
    assert mem.flat and mem.keys.shape == (2, 64, 8)
    flat(tokens()).sum().backward()
