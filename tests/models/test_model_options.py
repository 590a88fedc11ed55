"""model.* block options: today's models unchanged bit for bit; RMSNorm, RoPE, SwiGLU, GQA, biases, q/k norm,
head_dim and untied embeddings equal transformers' Llama/Qwen2/Qwen3/GPT-2 logits; the sliding RoPE cache; errors."""
from pathlib import Path

import pytest
import torch
from torch import nn

from pkmlm.config import Config, ConfigError
from pkmlm.eval.sampling import generate
from conftest import assert_causal  # tests/conftest.py
from pkmlm.models.transformer import KVCache, RMSNorm, TransformerLM

DATA = Path(__file__).resolve().parent / "data"
V = 50


def config(memory=(), **model) -> Config:
    return Config.from_dict({
        "model": {"n_layers": 2, "d_model": 32, "n_heads": 4, "max_seq_len": 16, "dropout": 0.0, **model},
        "memory": {"positions": list(memory), "n_keys": 8, "heads": 2, "knn": 4, "k_dim": 8},
        "data": {"batch_size": 2, "bptt": 8}, "train": {"max_steps": 1}})


LLAMA = dict(norm="rmsnorm", position_encoding="rope", ffn="swiglu", n_kv_heads=2, bias=False,
             tie_embeddings=False)


def build(cfg, seed=0, vocab=V) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(cfg, vocab).eval()


def tokens(B=2, T=12, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# --- defaults: today's models, checkpoints and numbers -------------------------------------------------------

def test_defaults_are_bit_identical_to_the_previous_model():
    # Written by the model of commit b203fb3 (before these options): a 2-layer model with an "after" and a
    # "parallel" memory, built with seed 0, its state_dict, an input and its eval-mode logits.
    ref = torch.load(DATA / "main_model_b203fb3.pt", weights_only=True)
    model = build(Config.from_dict(ref["config"]), seed=ref["seed"], vocab=ref["vocab_size"])
    state = model.state_dict()
    assert list(state) == list(ref["model"])  # same names, same order
    for name, tensor in ref["model"].items():  # same initialisation, value for value
        assert torch.equal(state[name], tensor), name
    other = build(Config.from_dict(ref["config"]), seed=1, vocab=ref["vocab_size"])
    other.load_state_dict(ref["model"])  # strict: an old checkpoint loads as it is
    with torch.no_grad():
        # 0 on the machine that wrote the file; a few ulps of slack for other CPUs' kernels
        torch.testing.assert_close(other(ref["idx"]), ref["logits"], rtol=0, atol=1e-6)


# --- against transformers' own implementations ---------------------------------------------------------------

def _perturbed(hf):
    """Every weight moved off its init (norm weights off one, biases off zero), so each mapping matters."""
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return hf.eval()


def _llama_like_state(hf, n_layers, *, qkv_bias=False, qk_norm=False):
    """transformers' Llama/Qwen2/Qwen3 names -> pkmlm names (q, k, v rows stacked into attn.qkv)."""
    sd = hf.state_dict()
    out = {"tok_emb.weight": sd["model.embed_tokens.weight"], "ln_f.weight": sd["model.norm.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        out[f"blocks.{i}.ln1.weight"] = sd[p + "input_layernorm.weight"]
        out[f"blocks.{i}.ln2.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        if qkv_bias:
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([sd[p + f"self_attn.{x}_proj.bias"] for x in "qkv"])
        if qk_norm:
            out[f"blocks.{i}.attn.q_norm.weight"] = sd[p + "self_attn.q_norm.weight"]
            out[f"blocks.{i}.attn.k_norm.weight"] = sd[p + "self_attn.k_norm.weight"]
        out[f"blocks.{i}.attn.proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[f"blocks.{i}.ffn.gate.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[f"blocks.{i}.ffn.fc.weight"] = sd[p + "mlp.up_proj.weight"]
        out[f"blocks.{i}.ffn.proj.weight"] = sd[p + "mlp.down_proj.weight"]
    return out


HF_COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rms_norm_eps=1e-2, rope_theta=500.0, tie_word_embeddings=False,
                 max_position_embeddings=64)
OURS_COMMON = dict(LLAMA, ffn_hidden=48, norm_eps=1e-2, rope_theta=500.0, max_seq_len=64)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_llama_qwen_blocks_equal_transformers(family):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_COMMON))
        ours = config(**OURS_COMMON)
    elif family == "qwen2":  # biases on q, k, v only
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**HF_COMMON))
        ours = config(**OURS_COMMON, attn_qkv_bias=True)
    else:  # per-head q/k RMSNorm and a head size other than d_model / n_heads
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**HF_COMMON, head_dim=12))
        ours = config(**OURS_COMMON, attn_qk_norm=True, head_dim=12)
    hf = _perturbed(hf)
    model = build(ours)
    model.load_state_dict(_llama_like_state(hf, 2, qkv_bias=family == "qwen2", qk_norm=family == "qwen3"))
    idx = tokens(T=40)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, rtol=0, atol=1e-5)


def test_gpt2_block_with_tanh_gelu_equals_transformers():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = _perturbed(transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=16, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)))
    sd = hf.state_dict()
    state = {"tok_emb.weight": sd["transformer.wte.weight"], "pos_emb.weight": sd["transformer.wpe.weight"],
             "ln_f.weight": sd["transformer.ln_f.weight"], "ln_f.bias": sd["transformer.ln_f.bias"]}
    ours = {"ln_1": "ln1", "ln_2": "ln2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
            "mlp.c_fc": "ffn.fc", "mlp.c_proj": "ffn.proj"}
    for i in range(2):
        for theirs, mine in ours.items():
            w = sd[f"transformer.h.{i}.{theirs}.weight"]
            state[f"blocks.{i}.{mine}.weight"] = w if theirs.startswith("ln") else w.t()  # Conv1D is (in, out)
            state[f"blocks.{i}.{mine}.bias"] = sd[f"transformer.h.{i}.{theirs}.bias"]
    model = build(config(ffn="gelu_tanh"))
    model.load_state_dict(state)
    idx = tokens(T=16)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, rtol=0, atol=1e-5)
        model.blocks[0].ffn.kind = "gelu"  # the exact GELU is a different function: the option matters
        assert not torch.allclose(model(idx), hf(idx).logits, atol=1e-5)


# --- the options' shapes and effects --------------------------------------------------------------------------

def test_llama_parameter_names_and_shapes():
    model = build(config(**LLAMA, attn_qk_norm=True, head_dim=12))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n.startswith(("blocks.0.", "ln_f", "lm"))}
    width = model.config.model.ffn_width()
    assert width == 256  # 2/3 * 4 * 32 = 85.3, rounded up to a multiple of 256 (Llama's rule)
    assert shapes == {
        "blocks.0.ln1.weight": (32,), "blocks.0.ln2.weight": (32,), "ln_f.weight": (32,),
        "blocks.0.attn.qkv.weight": ((4 + 2 * 2) * 12, 32), "blocks.0.attn.proj.weight": (32, 4 * 12),
        "blocks.0.attn.q_norm.weight": (12,), "blocks.0.attn.k_norm.weight": (12,),
        "blocks.0.ffn.gate.weight": (width, 32), "blocks.0.ffn.fc.weight": (width, 32),
        "blocks.0.ffn.proj.weight": (32, width), "lm_head.weight": (V, 32)}
    assert model.pos_emb is None and isinstance(model.ln_f, RMSNorm)
    assert config(ffn="swiglu", ffn_hidden=40).model.ffn_width() == 40
    assert config(ffn="gelu_tanh").model.ffn_width() == 128


def test_bias_switches():
    no_bias = build(config(bias=False))
    assert not [n for n, _ in no_bias.named_parameters() if n.endswith("bias")]  # LayerNorm's shift too
    qwen2 = build(config(bias=False, attn_qkv_bias=True))
    assert sorted(n for n, _ in qwen2.named_parameters() if n.endswith("bias")) == \
        ["blocks.0.attn.qkv.bias", "blocks.1.attn.qkv.bias"]
    no_qkv = build(config(attn_qkv_bias=False))
    assert no_qkv.blocks[0].attn.qkv.bias is None and no_qkv.blocks[0].attn.proj.bias is not None


def test_untied_output_layer():
    model = build(config(tie_embeddings=False))
    idx = torch.full((1, 5), 3)
    before = model(idx)
    with torch.no_grad():
        model.tok_emb.weight[7] += 1.0  # token 7 is never input, and the output layer is lm_head now
    torch.testing.assert_close(model(idx), before, rtol=0, atol=0)
    with torch.no_grad():
        model.lm_head.weight[7] += torch.linspace(-1.0, 1.0, 32)
    after = model(idx)
    assert not torch.allclose(before[..., 7], after[..., 7]) and torch.equal(before[..., :7], after[..., :7])
    tied = build(config())
    assert model.num_parameters()["total"] == tied.num_parameters()["total"] + V * 32


def test_rmsnorm_formula_and_eps():
    norm = RMSNorm(8, eps=0.5)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 9.0))
    x = torch.randn(3, 8)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 0.5) * torch.arange(1.0, 9.0)
    torch.testing.assert_close(norm(x), expected)
    assert build(config(norm_eps=1e-3)).ln_f.eps == 1e-3


@pytest.mark.parametrize("options", [LLAMA, dict(LLAMA, attn_qk_norm=True, head_dim=6, n_kv_heads=1)])
def test_options_forward_backward_bf16_and_causal(options):
    model = build(config(["1:parallel"], **options))
    idx = tokens()
    assert_causal(model, idx, V)
    model.train()
    nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(idx).float()).all()


def test_gqa_equals_attention_with_repeated_key_value_heads():
    """n_kv_heads=2 of 4 is the full-head model whose k, v heads 2j and 2j+1 are both kv head j."""
    gqa = build(config(n_kv_heads=2, position_encoding="rope"))
    full = build(config(position_encoding="rope"))
    state = gqa.state_dict()
    for i in range(2):
        for suffix in ("weight", "bias"):
            q, k, v = state[f"blocks.{i}.attn.qkv.{suffix}"].split([32, 16, 16])
            rep = [t.unflatten(0, (2, 8)).repeat_interleave(2, dim=0).flatten(0, 1) for t in (k, v)]
            state[f"blocks.{i}.attn.qkv.{suffix}"] = torch.cat([q, *rep])
    full.load_state_dict(state)
    idx = tokens()
    torch.testing.assert_close(gqa(idx), full(idx), rtol=0, atol=1e-6)


# --- RoPE generation beyond max_seq_len ----------------------------------------------------------------------

@torch.no_grad()
def test_rope_cache_slides_beyond_max_seq_len():
    """Past max_seq_len, a RoPE model's cache is sliding-window attention: in every layer a query sees the last
    max_seq_len keys, at their absolute positions. Token by token and chunk by chunk give the same logits."""
    model = build(config(**LLAMA, attn_qk_norm=True, max_seq_len=8))
    idx = tokens(T=30)
    cache = KVCache(len(model.blocks))
    steps = [model(idx[:, :5], cache)]  # prefill
    steps += [model(idx[:, t:t + 1], cache) for t in range(5, 20)]  # token by token, past max_seq_len
    steps.append(model(idx[:, 20:26], cache))  # a chunk after the cache slid: a window mask per query
    steps += [model(idx[:, t:t + 1], cache) for t in range(26, 30)]
    got = torch.cat(steps, dim=1)
    assert len(cache) == 7 and cache.position == 30  # holds window - 1; positions stay absolute
    torch.testing.assert_close(got[:, :8], model(idx[:, :8]), rtol=0, atol=1e-5)
    chunked = KVCache(len(model.blocks))
    torch.testing.assert_close(got, torch.cat([model(c, chunked) for c in idx.split(8, dim=1)], dim=1),
                               rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="sequence length 9 exceeds model.max_seq_len=8"):
        model(idx[:, :9])  # one input is still bounded by max_seq_len
    with pytest.raises(ValueError, match="cache window 9 exceeds"):
        model(idx[:, :2], KVCache(len(model.blocks), window=9))
    with pytest.raises(ValueError, match="slides RoPE positions only"):
        build(config())(idx[:, :2], KVCache(2, window=4))


@torch.no_grad()
def test_rope_one_layer_window_equals_a_fresh_window():
    # With one layer the keys depend on their own token only, and RoPE scores only on distances: position t
    # seeing t-5 .. t through the sliding cache equals a fresh forward over those 6 tokens at positions 0 .. 5.
    model = build(config(**dict(LLAMA, n_layers=1), max_seq_len=16))
    idx = tokens(T=24)
    cache = KVCache(1, window=6)
    got = torch.cat([model(idx[:, t:t + 1], cache) for t in range(24)], dim=1)
    for t in range(5, 24):
        torch.testing.assert_close(got[:, t], model(idx[:, t - 5:t + 1])[:, -1], rtol=0, atol=1e-5)
    assert not torch.allclose(got[:, 10], model(idx[:, :11])[:, -1], atol=1e-3)  # the window does cut


def test_rope_generate_runs_past_max_seq_len_with_and_without_cache():
    model = build(config(**LLAMA, max_seq_len=8))
    kw = dict(max_new_tokens=30, window=8, seeds=[3, 4], temperature=1.0, top_k=0, top_p=1.0)
    a = generate(model, [1, 5, 7, 9], **kw)
    assert [len(s) for s in a] == [30, 30]
    assert generate(model, [1, 5, 7, 9], use_cache=False, **kw) == a
    greedy = generate(model, [1, 5], max_new_tokens=12, window=6, seeds=[0], temperature=0)[0]
    seq = [1, 5]
    for _ in range(12):  # the same model function: all tokens so far through a sliding cache of 6
        cache = KVCache(len(model.blocks), window=6)
        logits = torch.cat([model(c, cache) for c in torch.tensor([seq]).split(6, dim=1)], dim=1)
        seq.append(int(logits[0, -1].argmax()))
    assert greedy == seq[2:]


# --- validation ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, expected", [
    (dict(norm="batchnorm"), "'model.norm': 'batchnorm' (must be one of layernorm, rmsnorm)"),
    (dict(norm_eps=0), "'model.norm_eps': 0.0 (must be in (0, 1)"),
    (dict(position_encoding="alibi"), "'model.position_encoding': 'alibi' (must be one of learned, rope)"),
    (dict(position_encoding="rope", head_dim=5), "rope rotates pairs of dimensions, but the head size 5 is odd"),
    (dict(rope_theta=0.5), "'model.rope_theta': 0.5 (must be > 1"),
    (dict(ffn="relu"), "'model.ffn': 'relu' (must be one of gelu, gelu_tanh, swiglu)"),
    (dict(ffn_hidden=-1), "'model.ffn_hidden': -1 (must be >= 0)"),
    (dict(n_kv_heads=3), "'model.n_kv_heads': 3 does not divide model.n_heads=4"),
    (dict(n_kv_heads=-1), "'model.n_kv_heads': -1 (must be >= 0)"),
    (dict(head_dim=-2), "'model.head_dim': -2 (must be >= 0)"),
    (dict(n_heads=5), "'model.n_heads': 5 does not divide model.d_model=32 (or set model.head_dim"),
    (dict(bias="no"), "'model.bias' must be true or false"),
    (dict(attn_qkv_bias=1), "'model.attn_qkv_bias' must be true or false"),
    (dict(attn_qk_norm="yes"), "'model.attn_qk_norm' must be true or false"),
    (dict(tie_embeddings=None), "'model.tie_embeddings' must be true or false"),
])
def test_invalid_options_are_one_line_config_errors(override, expected):
    with pytest.raises(ConfigError) as info:
        config(**override)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_head_dim_lifts_the_divisibility_rule():
    assert config(n_heads=5, head_dim=8).model.head_size() == 8
    assert config(n_kv_heads=0).model.kv_heads() == 4


# --- checkpoints from before these keys ----------------------------------------------------------------------

def test_checkpoint_without_the_new_keys_resumes_and_evaluates(tmp_path, random_corpus):
    from pkmlm.checkpoint import latest_checkpoint, load_checkpoint
    from pkmlm.eval.evaluation import load_model
    from pkmlm.training.trainer import train

    random_corpus(tmp_path / "data", {"train": (20, 30), "valid": (20, 30)}, vocab=V, vocab_hash="v", eos_id=1)
    raw = {"model": {"n_layers": 1, "d_model": 16, "n_heads": 2, "max_seq_len": 8},
           "data": {"dir": str(tmp_path / "data"), "batch_size": 4, "bptt": 8},
           "train": {"out_dir": str(tmp_path / "run"), "max_steps": 2, "warmup_steps": 1, "eval_every": 2,
                     "eval_batches": 1, "device": "cpu"}}
    train(Config.from_dict(raw))
    path = latest_checkpoint(tmp_path / "run")
    state = load_checkpoint(path)
    for key in ("norm", "norm_eps", "position_encoding", "rope_theta", "ffn", "ffn_hidden", "n_kv_heads",
                "head_dim", "bias", "attn_qkv_bias", "attn_qk_norm", "tie_embeddings"):
        del state["config"]["model"][key]  # as written before these keys existed
    torch.save(state, path)
    assert load_model(state, path, torch.device("cpu")).state_dict().keys() == state["model"].keys()
    raw["train"]["max_steps"] = 3
    assert train(Config.from_dict(raw), resume="latest").step == 3


@pytest.mark.slow
def test_llama_run_trains_evaluates_and_generates_past_max_seq_len(text_run, tmp_path, capsys):
    """A Llama-style memory run end to end on real text: train, evaluate, and generate.py beyond max_seq_len."""
    import sys

    from conftest import text_run_config
    from pkmlm.eval.evaluation import evaluate_checkpoint
    from pkmlm.training.trainer import train

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import generate as generate_cli  # the script at the repository root

    data_dir, _ = text_run
    raw = text_run_config(data_dir, tmp_path / "run", max_steps=6, eval_every=6)
    raw["model"].update(LLAMA, max_seq_len=16)  # = data.bptt: generation runs past it with a sliding cache
    raw["memory"].update(positions=["1:parallel"], gated=True, qk_norm=True, query_batchnorm=False)
    result = train(Config.from_dict(raw))
    assert result.losses[6] < result.losses[1]
    row = evaluate_checkpoint(tmp_path / "run", splits=["valid"])
    assert row["valid_ppl"] > 1
    common = [str(tmp_path / "run"), "--prompt", "The minister", "--max-new-tokens", "40", "--temperature", "1.0",
              "--top-k", "0", "--top-p", "1.0"]
    assert generate_cli.main(common) == 0
    out = capsys.readouterr()
    assert "40 new tokens in" in out.err  # 8 prompt + 40 new positions > max_seq_len 16
    assert generate_cli.main([*common, "--no-cache"]) == 0
    assert capsys.readouterr().out == out.out
