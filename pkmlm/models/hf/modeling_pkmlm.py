"""A pkmlm model for transformers: `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`.

`python -m pkmlm.hf export` copies this file, unchanged, next to the weights (model.safetensors) and config.json
(whose "pkmlm" entry holds the run's model and memory sections). It is self-contained on purpose: it imports
torch and transformers only, never pkmlm, so the exported directory works where pkmlm is not installed. It
computes what pkmlm.models.transformer.TransformerLM computes, with the product-key memory in plain torch ops
(pkmlm's compiled CPU kernels give the same numbers); tests/models/test_hf.py checks logits and greedy
generation against pkmlm. Parameter names are pkmlm's, except that value tables live in `tables.J.weight`
(memory i reads table `table_of[i]`), so a table shared by several memories is stored once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class PkmlmConfig(PretrainedConfig):
    """pkmlm's model and memory sections ("pkmlm": {"model": {...}, "memory": {...}}) plus what transformers needs."""

    model_type = "pkmlm"

    def __init__(self, pkmlm: dict | None = None, vocab_size: int = 1, table_of: list | None = None, **kwargs):
        self.pkmlm = pkmlm or {"model": {}, "memory": {}}
        self.vocab_size = vocab_size
        self.table_of = table_of or []  # memory (layer order) -> index of its value table
        m = self.pkmlm["model"]
        # The names transformers' generation utilities (cache sizing) look for.
        self.num_hidden_layers, self.hidden_size = m.get("n_layers", 1), m.get("d_model", 1)
        self.num_attention_heads = m.get("n_heads", 1)
        self.num_key_value_heads = m.get("n_kv_heads") or self.num_attention_heads
        kwargs.setdefault("tie_word_embeddings", self.pkmlm["model"].get("tie_embeddings", True))
        super().__init__(**kwargs)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x**2) + eps) * weight, computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def _norm(m: dict, dim: int) -> nn.Module:
    eps = m.get("norm_eps", 1e-5)
    if m.get("norm", "layernorm") == "rmsnorm":
        return RMSNorm(dim, eps)
    return nn.LayerNorm(dim, eps=eps, bias=m.get("bias", True))


def _rotate(x: Tensor, pos: Tensor, theta: float) -> Tensor:
    """RoPE on (B, heads, T, dh) at positions pos (T,): pairs (i, i + dh/2) turned by pos * theta**(-2i/dh)."""
    dh = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, dh, 2, device=x.device).float() / dh))
    angles = pos.float()[:, None] * inv[None, :]  # (T, dh/2)
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(x.dtype), torch.cat([angles.sin()] * 2, -1).to(x.dtype)
    x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    def __init__(self, m: dict):
        super().__init__()
        d, self.n_heads = m["d_model"], m["n_heads"]
        self.n_kv = m.get("n_kv_heads", 0) or self.n_heads
        self.dh = m.get("head_dim", 0) or d // self.n_heads
        self.rope = m.get("position_encoding", "learned") == "rope"
        self.theta = m.get("rope_theta", 10000.0)
        bias = m.get("bias", True)
        qkv_bias = bias if m.get("attn_qkv_bias") is None else m["attn_qkv_bias"]
        self.qkv = nn.Linear(d, (self.n_heads + 2 * self.n_kv) * self.dh, bias=qkv_bias)
        self.proj = nn.Linear(self.n_heads * self.dh, d, bias=bias)
        if m.get("attn_qk_norm", False):
            self.q_norm = RMSNorm(self.dh, m.get("norm_eps", 1e-5))
            self.k_norm = RMSNorm(self.dh, m.get("norm_eps", 1e-5))
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: Tensor, pos: Tensor, cache, layer: int) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.n_heads * self.dh, self.n_kv * self.dh, self.n_kv * self.dh], -1)
        q = q.view(B, T, self.n_heads, self.dh).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.dh).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.dh).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = _rotate(q, pos, self.theta), _rotate(k, pos, self.theta)
        if cache is not None:
            k, v = cache.update(k, v, layer)
        past, mask = k.shape[2] - T, None
        if past and T > 1:
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        if self.n_kv != self.n_heads:  # grouped-query attention; SDPA's enable_gqa needs torch >= 2.5
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not past and T > 1)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.dh))


class FeedForward(nn.Module):
    def __init__(self, m: dict):
        super().__init__()
        d, self.kind = m["d_model"], m.get("ffn", "gelu")
        hidden = m.get("ffn_hidden", 0) or m.get("ffn_mult", 4) * d
        if not m.get("ffn_hidden", 0) and self.kind == "swiglu":  # two thirds, to a multiple of 256 (Llama)
            hidden = 256 * math.ceil(2 * m.get("ffn_mult", 4) * d / 3 / 256)
        bias = m.get("bias", True)
        self.fc = nn.Linear(d, hidden, bias=bias)
        self.gate = nn.Linear(d, hidden, bias=bias) if self.kind == "swiglu" else None
        self.proj = nn.Linear(hidden, d, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is not None:
            return self.proj(F.silu(self.gate(x)) * self.fc(x))
        return self.proj(F.gelu(self.fc(x), approximate="tanh" if self.kind == "gelu_tanh" else "none"))


class Memory(nn.Module):
    """A product-key memory (Lample et al. 2019; Memory+ options of Berges et al. 2024), inference path."""

    def __init__(self, d: int, mem: dict, table: int):
        super().__init__()
        self.heads, self.knn, self.k_dim = mem["heads"], mem["knn"], mem["k_dim"]
        self.n_keys, self.flat, self.qk_norm = mem["n_keys"], mem["flat"], mem["qk_norm"]
        self.temperature, self.softmax, self.table = mem["score_temperature"], mem["score_softmax"], table
        v_dim = mem["v_dim"] or d
        layers = mem["query_layers"]
        self.query_mlp = nn.Sequential(*(m for _ in range(layers - 1) for m in (nn.Linear(d, d), nn.GELU()))) \
            if layers > 1 else None
        self.query_proj = nn.Linear(d, self.heads * self.k_dim, bias=not mem["query_batchnorm"])
        self.query_norm = nn.BatchNorm1d(self.heads * self.k_dim) if mem["query_batchnorm"] else \
            nn.LayerNorm(self.k_dim) if mem["query_layernorm"] else None
        half = self.k_dim // 2
        shape = (self.heads, self.n_keys**2, self.k_dim) if self.flat else (self.heads, 2, self.n_keys, half)
        self.keys = nn.Parameter(torch.zeros(shape))
        self.gate_proj = nn.Linear(d, v_dim, bias=False) if mem["gated"] else None
        self.out_proj = nn.Linear(v_dim, d) if mem["gated"] or v_dim != d else None

    def search(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """Queries (N, heads, k_dim) -> the best knn (scores, slots), each (N, heads, knn)."""
        keys = self.keys.to(q.dtype)
        if self.flat:
            if self.qk_norm:
                q, keys = F.normalize(q, dim=-1) * self.k_dim**0.5, F.normalize(keys, dim=-1)
            return torch.einsum("nhd,hsd->nhs", q, keys).topk(self.knn, dim=-1)
        n, half = q.shape[0], self.k_dim // 2
        q = q.view(n, self.heads, 2, half)
        if self.qk_norm:
            q, keys = F.normalize(q, dim=-1) * half**0.5, F.normalize(keys, dim=-1)
        top, ids = torch.einsum("nhpd,hpkd->nhpk", q, keys).topk(self.knn, dim=-1)  # each half's best knn
        # Every pair of the two halves' best knn, then the best knn sums: the exact top-knn slots.
        sums = (top[:, :, 0, :, None] + top[:, :, 1, None, :]).flatten(2)  # (N, heads, knn * knn)
        scores, best = sums.topk(self.knn, dim=-1)
        slots = ids[:, :, 0].gather(-1, best // self.knn) * self.n_keys + ids[:, :, 1].gather(-1, best % self.knn)
        return scores, slots

    def forward(self, x: Tensor, tables: nn.ModuleList) -> Tensor:
        shape, x = x.shape, x.reshape(-1, x.shape[-1])
        h = self.query_mlp(x) if self.query_mlp is not None else x
        q = self.query_proj(h).view(-1, self.heads, self.k_dim)
        if isinstance(self.query_norm, nn.BatchNorm1d):
            q = self.query_norm(q.flatten(1)).view_as(q)
        elif self.query_norm is not None:
            q = self.query_norm(q)
        scores, slots = self.search(q)
        scores = scores.float() / self.temperature
        weights = F.softmax(scores, dim=-1) if self.softmax else scores
        table = tables[self.table].weight
        out = F.embedding_bag(slots.flatten(1), table, per_sample_weights=weights.flatten(1).to(table.dtype),
                              mode="sum")
        if self.gate_proj is not None:
            out = out * F.silu(self.gate_proj(x))
        out = self.out_proj(out) if self.out_proj is not None else out
        return out.view(*shape[:-1], out.shape[-1])


class Table(nn.Module):
    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, dim))


class Block(nn.Module):
    def __init__(self, m: dict, mem: dict, kinds: set, tables: list):
        super().__init__()
        d = m["d_model"]
        self.ln1, self.attn, self.ln2 = _norm(m, d), Attention(m), _norm(m, d)
        self.ffn = None if "replace" in kinds else FeedForward(m)
        self.memory = Memory(d, mem, tables.pop(0)) if kinds & {"replace", "parallel"} else None
        self.after_norm = _norm(m, d) if "after" in kinds else None
        self.after_memory = Memory(d, mem, tables.pop(0)) if "after" in kinds else None

    def forward(self, x: Tensor, pos: Tensor, cache, layer: int, tables) -> Tensor:
        x = x + self.attn(self.ln1(x), pos, cache, layer)
        h = self.ln2(x)
        y = self.ffn(h) if self.ffn is not None else 0
        x = x + (y + self.memory(h, tables) if self.memory is not None else y)
        if self.after_memory is not None:
            x = x + self.after_memory(self.after_norm(x), tables)
        return x


class PkmlmForCausalLM(PreTrainedModel, GenerationMixin):
    """pkmlm's decoder-only LM: input_ids (B, T) -> logits (B, T, vocab_size); KV cache for generate()."""

    config_class = PkmlmConfig
    base_model_prefix = "pkmlm"
    _supports_cache_class = True

    def __init__(self, config: PkmlmConfig):
        super().__init__(config)
        m, mem = config.pkmlm["model"], config.pkmlm["memory"]
        d = m["d_model"]
        self.tok_emb = nn.Embedding(config.vocab_size, d)
        self.pos_emb = nn.Embedding(m["max_seq_len"], d) if m.get("position_encoding", "learned") == "learned" \
            else None
        places: dict[int, set] = {}
        for p in mem.get("positions", []):
            layer, kind = p.split(":")
            places.setdefault(int(layer), set()).add(kind)
        order = list(config.table_of)
        self.blocks = nn.ModuleList(Block(m, mem, places.get(i, set()), order) for i in range(m["n_layers"]))
        n_tables = max(config.table_of) + 1 if config.table_of else 0
        v_dim = mem.get("v_dim") or d
        self.tables = nn.ModuleList(Table(mem["n_keys"] ** 2, v_dim) for _ in range(n_tables))
        self.ln_f = _norm(m, d)
        self.lm_head = None if m.get("tie_embeddings", True) else nn.Linear(d, config.vocab_size, bias=False)
        self.max_seq_len = m["max_seq_len"]
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.tok_emb

    def _init_weights(self, module: nn.Module) -> None:
        pass  # every weight comes from model.safetensors

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, cache=None, past_key_values=None,
                use_cache: bool | None = None, labels: Tensor | None = None, **kwargs) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            from transformers import DynamicCache
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        T = input_ids.shape[1]
        pos = torch.arange(past, past + T, device=input_ids.device)
        x = self.tok_emb(input_ids)
        if self.pos_emb is not None:
            if past + T > self.max_seq_len:
                raise ValueError(f"sequence length {past + T} exceeds max_seq_len={self.max_seq_len} (learned "
                                 "positions)")
            x = x + self.pos_emb(pos)
        for i, block in enumerate(self.blocks):
            x = block(x, pos, cache, i, self.tables)
        x = self.ln_f(x)
        logits = self.lm_head(x) if self.lm_head is not None else F.linear(x, self.tok_emb.weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache if use_cache else None)
