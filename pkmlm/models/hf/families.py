"""Model families: how a transformers checkpoint's config and tensors map onto pkmlm's, and back.

One `Family` per transformers `model_type`. `options(hf_config)` gives pkmlm's `model` section (block options of
docs/config.md), `to_pkmlm(hf_state, section)` the state dict under pkmlm's parameter names
(pkmlm.models.transformer) and the source names it used; `native_family`, `hf_config` and `to_hf` are the way
back for export. Names pkmlm uses: tok_emb, pos_emb,
blocks.i.{ln1, attn.qkv (q heads, then k heads, then v heads), attn.q_norm, attn.k_norm, attn.proj, ln2, ffn.fc
(up), ffn.gate (SwiGLU), ffn.proj (down)}, ln_f, lm_head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from pkmlm.cli import UserError


class HFError(UserError, ValueError):
    """A source or target this module cannot convert: the message names what and the fix."""


def _get(cfg: dict, *names, default=None):
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    return default


def _rope_theta(cfg: dict) -> float:
    """RoPE base of a transformers config (4.x: rope_theta; 5.x: rope_parameters), refusing scaled variants."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise HFError(f"RoPE type {kind!r} (rope scaling) is not implemented in pkmlm: import a model with plain "
                      "RoPE (e.g. SmolLM2, TinyLlama, Llama 3, Qwen2.5, Qwen3)")
    return float(params.get("rope_theta") or cfg.get("rope_theta") or 10000.0)


def _taken(state: dict, name: str, used: set) -> Tensor:
    if name not in state:
        raise HFError(f"the checkpoint lacks tensor {name}: it is incomplete or of another architecture")
    used.add(name)
    return state[name]


@dataclass(frozen=True)
class Family:
    name: str
    options: Callable[[dict], dict]          # hf config -> pkmlm model section (and data hints)
    to_pkmlm: Callable[[dict, dict], tuple[dict, set]]   # (hf state, pkmlm model section) -> (state, used names)
    ignored: tuple[str, ...] = ()            # hf tensor name suffixes that carry nothing (buffers)


# ---- gpt2 -------------------------------------------------------------------------------------------------------

def _gpt2_options(cfg: dict) -> dict:
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if cfg.get(flag):
            raise HFError(f"gpt2 option {flag}=true is not implemented in pkmlm")
    if cfg.get("scale_attn_weights") is False:
        raise HFError("gpt2 option scale_attn_weights=false is not implemented in pkmlm")
    act = cfg.get("activation_function", "gelu_new")
    ffn = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}.get(act)
    if ffn is None:
        raise HFError(f"gpt2 activation {act!r} is not implemented in pkmlm (gelu, gelu_new are)")
    d = cfg["n_embd"]
    return {"n_layers": cfg["n_layer"], "d_model": d, "n_heads": cfg["n_head"], "ffn": ffn,
            "ffn_hidden": 0 if cfg.get("n_inner") in (None, 4 * d) else cfg["n_inner"], "norm": "layernorm",
            "norm_eps": float(cfg.get("layer_norm_epsilon", 1e-5)), "position_encoding": "learned",
            "max_seq_len": cfg["n_positions"], "bias": True,
            "tie_embeddings": cfg.get("tie_word_embeddings", True),
            "dropout": float(cfg.get("resid_pdrop", 0.0)), "attn_dropout": float(cfg.get("attn_pdrop", 0.0))}


def _gpt2_to_pkmlm(hf: dict, m: dict) -> tuple[dict, set]:
    used: set = set()
    prefix = "transformer." if any(k.startswith("transformer.") for k in hf) else ""

    def t(name):
        return _taken(hf, prefix + name, used)

    out = {"tok_emb.weight": t("wte.weight"), "pos_emb.weight": t("wpe.weight"),
           "ln_f.weight": t("ln_f.weight"), "ln_f.bias": t("ln_f.bias")}
    for i in range(m["n_layers"]):
        h, b = f"h.{i}.", f"blocks.{i}."
        for src, dst in (("ln_1", "ln1"), ("ln_2", "ln2")):
            out[f"{b}{dst}.weight"], out[f"{b}{dst}.bias"] = t(f"{h}{src}.weight"), t(f"{h}{src}.bias")
        # GPT-2's Conv1D stores (in, out): a Linear's weight transposed. c_attn's columns are q, k, v as ours.
        for src, dst in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj"), ("mlp.c_fc", "ffn.fc"),
                         ("mlp.c_proj", "ffn.proj")):
            out[f"{b}{dst}.weight"] = t(f"{h}{src}.weight").t().contiguous()
            out[f"{b}{dst}.bias"] = t(f"{h}{src}.bias")
    if not m["tie_embeddings"]:
        out["lm_head.weight"] = _taken(hf, "lm_head.weight", used)
    elif "lm_head.weight" in hf:
        used.add("lm_head.weight")  # the tied copy
    return out, used


def _gpt2_from_pkmlm(state: dict, n_layers: int) -> dict:
    out = {"transformer.wte.weight": state["tok_emb.weight"], "transformer.wpe.weight": state["pos_emb.weight"],
           "transformer.ln_f.weight": state["ln_f.weight"], "transformer.ln_f.bias": state["ln_f.bias"]}
    for i in range(n_layers):
        h, b = f"transformer.h.{i}.", f"blocks.{i}."
        for dst, src in (("ln_1", "ln1"), ("ln_2", "ln2")):
            out[f"{h}{dst}.weight"], out[f"{h}{dst}.bias"] = state[f"{b}{src}.weight"], state[f"{b}{src}.bias"]
        for dst, src in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj"), ("mlp.c_fc", "ffn.fc"),
                         ("mlp.c_proj", "ffn.proj")):
            out[f"{h}{dst}.weight"] = state[f"{b}{src}.weight"].t().contiguous()
            out[f"{h}{dst}.bias"] = state[f"{b}{src}.bias"]
    return out


# ---- llama, qwen2, qwen3 ---------------------------------------------------------------------------------------

def _llama_options(cfg: dict) -> dict:
    if cfg.get("hidden_act", "silu") != "silu":
        raise HFError(f"activation {cfg.get('hidden_act')!r} is not implemented in pkmlm (silu: SwiGLU is)")
    if cfg.get("use_sliding_window"):
        raise HFError("sliding-window attention (use_sliding_window=true) is not implemented in pkmlm")
    attention_bias, mlp_bias = bool(cfg.get("attention_bias", False)), bool(cfg.get("mlp_bias", False))
    if attention_bias != mlp_bias:
        raise HFError(f"attention_bias={attention_bias} with mlp_bias={mlp_bias}: pkmlm's model.bias covers both")
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or d // heads
    return {"n_layers": cfg["num_hidden_layers"], "d_model": d, "n_heads": heads,
            "n_kv_heads": cfg.get("num_key_value_heads") or heads,
            "head_dim": 0 if head_dim * heads == d else head_dim,
            "ffn": "swiglu", "ffn_hidden": cfg["intermediate_size"], "norm": "rmsnorm",
            "norm_eps": float(cfg.get("rms_norm_eps", 1e-6)), "position_encoding": "rope",
            "rope_theta": _rope_theta(cfg), "max_seq_len": cfg.get("max_position_embeddings", 2048),
            "bias": attention_bias, "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
            "dropout": 0.0, "attn_dropout": float(cfg.get("attention_dropout", 0.0))}


def _qwen2_options(cfg: dict) -> dict:
    # Qwen2 always has q, k, v biases and none elsewhere.
    return {**_llama_options({**cfg, "attention_bias": False}), "attn_qkv_bias": True}


def _qwen3_options(cfg: dict) -> dict:
    return {**_llama_options({**cfg, "mlp_bias": cfg.get("attention_bias", False)}), "attn_qk_norm": True}


def _llama_to_pkmlm(hf: dict, m: dict) -> tuple[dict, set]:
    used: set = set()

    def t(name):
        return _taken(hf, name, used)

    out = {"tok_emb.weight": t("model.embed_tokens.weight"), "ln_f.weight": t("model.norm.weight")}
    qkv_bias = m.get("attn_qkv_bias") if m.get("attn_qkv_bias") is not None else m.get("bias", False)
    for i in range(m["n_layers"]):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        out[f"{b}ln1.weight"] = t(f"{h}input_layernorm.weight")
        out[f"{b}ln2.weight"] = t(f"{h}post_attention_layernorm.weight")
        out[f"{b}attn.qkv.weight"] = torch.cat([t(f"{h}self_attn.{p}_proj.weight") for p in "qkv"])
        if qkv_bias:
            out[f"{b}attn.qkv.bias"] = torch.cat([t(f"{h}self_attn.{p}_proj.bias") for p in "qkv"])
        out[f"{b}attn.proj.weight"] = t(f"{h}self_attn.o_proj.weight")
        if m.get("attn_qk_norm"):
            out[f"{b}attn.q_norm.weight"] = t(f"{h}self_attn.q_norm.weight")
            out[f"{b}attn.k_norm.weight"] = t(f"{h}self_attn.k_norm.weight")
        for src, dst in (("gate_proj", "ffn.gate"), ("up_proj", "ffn.fc"), ("down_proj", "ffn.proj")):
            out[f"{b}{dst}.weight"] = t(f"{h}mlp.{src}.weight")
        if m.get("bias"):
            out[f"{b}attn.proj.bias"] = t(f"{h}self_attn.o_proj.bias")
            for src, dst in (("gate_proj", "ffn.gate"), ("up_proj", "ffn.fc"), ("down_proj", "ffn.proj")):
                out[f"{b}{dst}.bias"] = t(f"{h}mlp.{src}.bias")
    if not m["tie_embeddings"]:
        out["lm_head.weight"] = t("lm_head.weight")
    elif "lm_head.weight" in hf:
        used.add("lm_head.weight")
    return out, used


def _llama_from_pkmlm(state: dict, n_layers: int, n_heads: int, n_kv: int, head_dim: int) -> dict:
    out = {"model.embed_tokens.weight": state["tok_emb.weight"], "model.norm.weight": state["ln_f.weight"]}
    if "lm_head.weight" in state:
        out["lm_head.weight"] = state["lm_head.weight"]
    sizes = [n_heads * head_dim, n_kv * head_dim, n_kv * head_dim]
    for i in range(n_layers):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        out[f"{h}input_layernorm.weight"] = state[f"{b}ln1.weight"]
        out[f"{h}post_attention_layernorm.weight"] = state[f"{b}ln2.weight"]
        for name, part in zip("qkv", state[f"{b}attn.qkv.weight"].split(sizes)):
            out[f"{h}self_attn.{name}_proj.weight"] = part.contiguous()
        if f"{b}attn.qkv.bias" in state:
            for name, part in zip("qkv", state[f"{b}attn.qkv.bias"].split(sizes)):
                out[f"{h}self_attn.{name}_proj.bias"] = part.contiguous()
        for dst, src in (("self_attn.o_proj", "attn.proj"), ("mlp.gate_proj", "ffn.gate"), ("mlp.up_proj", "ffn.fc"),
                         ("mlp.down_proj", "ffn.proj")):
            out[f"{h}{dst}.weight"] = state[f"{b}{src}.weight"]
            if f"{b}{src}.bias" in state:
                out[f"{h}{dst}.bias"] = state[f"{b}{src}.bias"]
    return out


FAMILIES = {
    "gpt2": Family("gpt2", _gpt2_options, _gpt2_to_pkmlm, ignored=(".attn.bias", ".attn.masked_bias")),
    "llama": Family("llama", _llama_options, _llama_to_pkmlm, ignored=(".rotary_emb.inv_freq",)),
    "qwen2": Family("qwen2", _qwen2_options, _llama_to_pkmlm, ignored=(".rotary_emb.inv_freq",)),
    "qwen3": Family("qwen3", _qwen3_options, _llama_to_pkmlm, ignored=(".rotary_emb.inv_freq",)),
}


def family_of(hf_config: dict, source) -> Family:
    kind = hf_config.get("model_type")
    if kind not in FAMILIES:
        raise HFError(f"{source}: model_type {kind!r} is not supported; pkmlm imports {', '.join(FAMILIES)}")
    return FAMILIES[kind]


# ---- export: which native family a pkmlm model is -----------------------------------------------------------------

def native_family(model_section: dict, has_memory: bool) -> str | None:
    """"gpt2" or "llama" when a pkmlm model with these options is exactly that transformers family, else None."""
    m = model_section
    if has_memory:
        return None
    norm, pos, ffn = m.get("norm", "layernorm"), m.get("position_encoding", "learned"), m.get("ffn", "gelu")
    bias, qkv_bias = m.get("bias", True), m.get("attn_qkv_bias")
    same_bias = qkv_bias is None or qkv_bias == bias
    if m.get("attn_qk_norm", False) or not same_bias:
        return None
    heads_whole = not m.get("head_dim") or m["head_dim"] * m["n_heads"] == m["d_model"]
    if (norm, pos) == ("layernorm", "learned") and ffn in ("gelu", "gelu_tanh") and bias and heads_whole \
            and (m.get("n_kv_heads") or m["n_heads"]) == m["n_heads"] and m.get("tie_embeddings", True):
        return "gpt2"
    if (norm, pos, ffn) == ("rmsnorm", "rope", "swiglu"):
        return "llama"
    return None


def hf_config(family: str, m: dict, vocab_size: int, ffn_hidden: int, eos_id: int | None) -> dict:
    """config.json of a native `family` ("gpt2" or "llama") for pkmlm model section `m`."""
    special = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id} if eos_id is not None else {}
    if family == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab_size,
                "n_positions": m["max_seq_len"], "n_embd": m["d_model"], "n_layer": m["n_layers"],
                "n_head": m["n_heads"], "n_inner": ffn_hidden,
                "activation_function": "gelu" if m.get("ffn", "gelu") == "gelu" else "gelu_new",
                "layer_norm_epsilon": m.get("norm_eps", 1e-5), "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                "attn_pdrop": 0.0, "tie_word_embeddings": True, "torch_dtype": "float32", **special}
    heads = m["n_heads"]
    head_dim = m.get("head_dim") or m["d_model"] // heads
    theta = m.get("rope_theta", 10000.0)
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
            "hidden_size": m["d_model"], "intermediate_size": ffn_hidden, "num_hidden_layers": m["n_layers"],
            "num_attention_heads": heads, "num_key_value_heads": m.get("n_kv_heads") or heads,
            "head_dim": head_dim, "hidden_act": "silu", "max_position_embeddings": m["max_seq_len"],
            "rms_norm_eps": m.get("norm_eps", 1e-5), "rope_theta": theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": theta},
            "attention_bias": m.get("bias", True), "mlp_bias": m.get("bias", True),
            "tie_word_embeddings": m.get("tie_embeddings", True), "torch_dtype": "float32", **special}


def to_hf(family: str, state: dict, m: dict) -> dict:
    """pkmlm state dict -> the native family's tensor names."""
    if family == "gpt2":
        return _gpt2_from_pkmlm(state, m["n_layers"])
    heads = m["n_heads"]
    return _llama_from_pkmlm(state, m["n_layers"], heads, m.get("n_kv_heads") or heads,
                             m.get("head_dim") or m["d_model"] // heads)
