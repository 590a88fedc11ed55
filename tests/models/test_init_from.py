"""Initialising a memory model from a dense checkpoint: exact copies, the report, clear errors, the CLI hook."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pkmlm.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from pkmlm.config import Config
from pkmlm.models.init_from import InitFromError, init_from_checkpoint
from pkmlm.models.transformer import TransformerLM
from pkmlm.training.trainer import train

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 48


def _config(data_dir, out_dir, positions=(), **model) -> dict:
    return {
        "model": {"n_layers": 2, "d_model": 16, "n_heads": 2, "dropout": 0.0, "max_seq_len": 8, **model},
        "memory": {"positions": list(positions), "n_keys": 8, "heads": 2, "knn": 2, "k_dim": 8},
        "data": {"dir": str(data_dir), "batch_size": 4, "bptt": 8},
        "train": {"out_dir": str(out_dir), "max_steps": 2, "warmup_steps": 1, "eval_every": 2, "eval_batches": 1,
                  "log_every": 1, "device": "cpu"},
    }


@pytest.fixture(scope="module")
def dense(tmp_path_factory, random_corpus):
    """(data dir, checkpoint of a 2-step dense run)."""
    root = tmp_path_factory.mktemp("init_from")
    random_corpus(root / "data", {"train": (20, 30), "valid": (20, 30)}, vocab=VOCAB, vocab_hash="v1", eos_id=1)
    train(Config.from_dict(_config(root / "data", root / "dense")))
    return root / "data", latest_checkpoint(root / "dense")


def _model(data_dir, positions, **model):
    torch.manual_seed(1)
    return TransformerLM(Config.from_dict(_config(data_dir, "unused", positions, **model)), VOCAB)


def test_parallel_memory_copies_every_dense_weight_exactly(dense):
    data_dir, path = dense
    model = _model(data_dir, ["1:parallel"])
    before = {n: t.clone() for n, t in model.state_dict().items()}
    report = init_from_checkpoint(model, path, vocab_hash="v1")
    source = load_checkpoint(path)["model"]
    assert report.ignored == [] and set(report.copied) == set(source)
    assert report.new and all(n.startswith("blocks.1.memory.") for n in report.new)
    state = model.state_dict()
    for name in report.copied:
        assert torch.equal(state[name], source[name]), name
    assert report.silenced == ["blocks.1.memory"]
    for name in report.new:  # the memory keeps its own initialisation, but for its zeroed values (a no-op start)
        if name == "blocks.1.memory.values.weight":
            assert not state[name].any() and before[name].any()
        else:
            assert torch.equal(state[name], before[name]), name
    assert "copied" in report.summary() and "blocks.1.memory.keys" in report.summary()
    assert "silenced 1 memories, exact no-ops at step 0 (blocks.1.memory)" in report.summary()


def test_replace_memory_reports_the_dropped_ffn_as_ignored(dense):
    data_dir, path = dense
    report = init_from_checkpoint(_model(data_dir, ["1:replace"]), path)
    assert sorted(report.ignored) == ["blocks.1.ffn.fc.bias", "blocks.1.ffn.fc.weight",
                                      "blocks.1.ffn.proj.bias", "blocks.1.ffn.proj.weight"]


LLAMA = dict(norm="rmsnorm", position_encoding="rope", ffn="swiglu", ffn_hidden=24, n_kv_heads=1, bias=False,
             attn_qk_norm=True, tie_embeddings=False)


@pytest.fixture(scope="module")
def dense_llama(dense, tmp_path_factory):
    """Checkpoint of a 2-step dense run with Llama blocks (on the data of `dense`)."""
    data_dir, _ = dense
    out = tmp_path_factory.mktemp("init_from_llama") / "dense"
    train(Config.from_dict(_config(data_dir, out, **LLAMA)))
    return latest_checkpoint(out)


def _dense_logits(data_dir, path, idx, **model):
    dense = _model(data_dir, [], **model)
    dense.load_state_dict(load_checkpoint(path)["model"])
    with torch.no_grad():
        return dense.eval()(idx)


@pytest.mark.parametrize("blocks", ["gpt", "llama"])
@pytest.mark.parametrize("positions, memory, silenced", [
    (["1:parallel"], {}, "values"),  # no output projection: the value table is zeroed
    (["0:after", "1:parallel"], {"gated": True}, "out_proj"),  # Memory+
    (["1:parallel"], {"v_dim": 8, "share_values": True}, "out_proj"),
    (["0:after", "1:after"], {"share_values": True}, "values"),  # one table, read by two new memories only
])
def test_new_parallel_and_after_memories_start_as_exact_no_ops(dense, dense_llama, blocks, positions, memory,
                                                               silenced):
    data_dir, path = dense if blocks == "gpt" else (dense[0], dense_llama)
    model_opts = LLAMA if blocks == "llama" else {}
    torch.manual_seed(1)
    config = _config(data_dir, "unused", positions, **model_opts)
    config["memory"].update(memory)
    model = TransformerLM(Config.from_dict(config), VOCAB)
    report = init_from_checkpoint(model, path)
    assert report.silenced == [name for name, _ in model.memories()]
    for _, m in model.memories():
        zeroed = m.out_proj.weight if silenced == "out_proj" else m.values.weight
        assert not zeroed.any() and m.keys.any() and m.query_proj.weight.any()
    idx = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.eval()(idx), _dense_logits(data_dir, path, idx, **model_opts))  # bit for bit


def test_replace_shared_and_known_memories_are_not_silenced(dense, tmp_path):
    data_dir, path = dense

    def model(**memory):
        torch.manual_seed(1)
        config = _config(data_dir, "unused", ["0:replace", "1:parallel"])
        config["memory"].update(memory)
        return TransformerLM(Config.from_dict(config), VOCAB)

    # A replace memory is no FFN's no-op, and zeroing the table it shares would silence it too.
    shared = model(share_values=True)
    assert init_from_checkpoint(shared, path).silenced == [] and shared.blocks[1].memory.values.weight.any()
    # Its own output projection: silenced without touching the shared table.
    gated = model(share_values=True, gated=True)
    assert init_from_checkpoint(gated, path).silenced == ["blocks.1.memory"]
    assert gated.blocks[0].memory.out_proj.weight.any() and gated.blocks[1].memory.values.weight.any()
    # A memory the checkpoint already has is copied, not silenced.
    state = load_checkpoint(path)
    state["model"] = {n: t + 1 for n, t in gated.state_dict().items()}
    torch.save(state, tmp_path / "with_memory.pt")
    again = model(share_values=True, gated=True)
    assert init_from_checkpoint(again, tmp_path / "with_memory.pt").silenced == []
    assert torch.equal(again.blocks[1].memory.out_proj.weight, gated.blocks[1].memory.out_proj.weight + 1)


def test_silenced_memory_learns(dense, tmp_path):
    data_dir, path = dense
    config = _config(data_dir, tmp_path / "retrofit", ["1:parallel"])
    config["memory"]["gated"] = True
    config["train"].update(max_steps=4, lr=1e-2, value_lr=1e-2)
    torch.manual_seed(0)  # train.seed: the trainer's initial model
    start = TransformerLM(Config.from_dict(config), VOCAB)
    init_from_checkpoint(start, path)
    result = train(Config.from_dict(config), init_from=path)
    model = result.model.eval()
    memory = model.blocks[1].memory
    assert memory.out_proj.weight.any()
    for name in ("gate_proj.weight", "query_proj.weight", "keys", "values.weight"):  # behind the zeroed layer
        assert not torch.equal(memory.get_parameter(name), start.blocks[1].memory.get_parameter(name)), name
    h = torch.randn(2, 8, 16)
    with torch.no_grad():
        assert memory(h).abs().max() > 1e-4  # the memory writes into the residual stream now
        idx = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
        with_memory = model(idx)
        memory.out_proj.weight.zero_()
        memory.out_proj.bias.zero_()
        assert not torch.allclose(with_memory, model(idx), atol=1e-6)  # and changes what the model predicts
    assert len(set(result.losses.values())) == len(result.losses)  # the loss moves step by step


def test_shape_mismatch_names_the_parameter(dense):
    data_dir, path = dense
    with pytest.raises(InitFromError, match=r"parameter pos_emb.weight has shape \(8, 16\) there and \(16, 16\)"):
        init_from_checkpoint(_model(data_dir, ["1:parallel"], max_seq_len=16), path)


@pytest.mark.parametrize("option, value, fix", [
    ("norm", "rmsnorm", "model.norm=layernorm"),  # same weight shapes, another function: refused by name
    ("position_encoding", "rope", "model.position_encoding=learned"),
    ("ffn", "gelu_tanh", "model.ffn=gelu"),
    ("norm_eps", 1e-6, "model.norm_eps=1e-05"),
    ("attn_qkv_bias", False, "model.attn_qkv_bias=null"),
])
def test_other_block_options_are_refused(dense, option, value, fix):
    data_dir, path = dense
    with pytest.raises(InitFromError, match=rf"model.{option} is .* there and .* in this config; set {fix} "):
        init_from_checkpoint(_model(data_dir, ["1:parallel"], **{option: value}), path)


def test_equivalent_block_spellings_are_accepted(dense):
    data_dir, path = dense  # the source has 0 = n_heads, 0 = d_model / n_heads, null = bias
    report = init_from_checkpoint(_model(data_dir, ["1:parallel"], n_kv_heads=2, head_dim=8, attn_qkv_bias=True), path)
    assert report.ignored == []


def test_other_vocabulary_is_refused(dense):
    data_dir, path = dense
    with pytest.raises(CheckpointError, match="vocabulary v1 but the data has v2"):
        init_from_checkpoint(_model(data_dir, ["1:parallel"]), path, vocab_hash="v2")


def _train_cli(config_path, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_",
                                                                      "SLURM_"))}
    env.update(OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "train.py", "--config", str(config_path), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_train_cli_init_from_reports_records_and_refuses_mismatch(dense, tmp_path):
    data_dir, path = dense
    cfg = tmp_path / "mem.yaml"
    cfg.write_text(yaml.safe_dump(_config(data_dir, tmp_path / "mem", ["1:parallel"])))
    proc = _train_cli(cfg, "--init-from", str(path), "train.max_steps=1")
    assert proc.returncode == 0, proc.stderr
    assert f"init from {path}: copied" in proc.stderr and "ignored 0" in proc.stderr
    assert load_checkpoint(latest_checkpoint(tmp_path / "mem"))["init_from"] == str(path)

    proc = _train_cli(cfg, "--init-from", str(path), "model.max_seq_len=16", f"train.out_dir={tmp_path / 'bad'}")
    assert proc.returncode == 2 and "parameter pos_emb.weight" in proc.stderr and "Traceback" not in proc.stderr
    assert latest_checkpoint(tmp_path / "bad") is None
