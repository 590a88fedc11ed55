"""Decoder-only transformer language model with product-key memory layers.

    model = TransformerLM(config, vocab_size)      # config: pkmlm.config.Config
    logits = model(idx)                            # (B, T) long -> (B, T, vocab_size)
    cache = KVCache(len(model.blocks))             # incremental decoding (pkmlm/eval/sampling.py):
    logits = model(prompt, cache); logits = model(next_token, cache)   # each call sees all earlier tokens

Pre-norm blocks (attention, then FFN). The defaults are the 2019 transformer (LayerNorm, learned positions, GELU
FFN, biases, tied input/output embeddings); `config.model` switches each part to its Llama/Qwen counterpart
(RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases, q/k RMSNorm, an untied output layer):
docs/config.md. Parameter names stay the same across variants: ln1/ln2/ln_f/after_norm are the norms (LayerNorm
or RMSNorm), attn.qkv the fused q, k, v projection (rows: n_heads query heads, then n_kv_heads key heads, then
n_kv_heads value heads, each head_size rows), attn.proj the output projection, ffn.fc the up projection, ffn.gate
SwiGLU's gate, ffn.proj the down projection, lm_head the untied output layer.
`config.memory.positions` puts memories into blocks, LAYER 0-based:
    "i:replace"   the memory instead of block i's FFN (Lample et al. 2019)
    "i:after"     an extra residual sub-layer, with its own norm, after block i
    "i:parallel"  memory and FFN of block i read the same normed input; outputs summed (Kim & Jung 2020)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pkmlm.config import Config
from pkmlm.memory import ProductKeyMemory, make_value_table
from pkmlm.memory.layer import share_table
from pkmlm.memory.value_table import ShardedValueTable


class KVCache:
    """Attention keys and values of the positions already seen, per block, for incremental decoding.

    Memory layers and FFNs work per token, so attention is the only part of a block that needs the past.
    With learned positions the cache holds at most max_seq_len positions; a caller that wants to go on must
    start a new cache over a shorter window (see pkmlm.eval.sampling). With RoPE the cache slides: each new
    token attends to the last `window` positions (itself included; default: the model's max_seq_len), older
    ones are dropped, and positions stay absolute (`position` keeps counting), so generation has no length limit.
    """

    def __init__(self, n_layers: int, window: int | None = None):
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.keys: list[Tensor | None] = [None] * n_layers  # each (B, kv_heads, S, head_size)
        self.values: list[Tensor | None] = [None] * n_layers
        self.window = window
        self.dropped = 0  # positions slid out of the window (RoPE only)

    def __len__(self) -> int:
        """Positions held (S)."""
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    @property
    def position(self) -> int:
        """Absolute position of the next token: positions held plus positions dropped."""
        return self.dropped + len(self)

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add the new positions' k, v (B, heads, T, dh) of block `layer`; return all of them (B, heads, S+T, dh)."""
        if self.keys[layer] is not None:
            k, v = torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def slide(self, window: int) -> None:
        """Keep the last window - 1 positions of every layer: all the next token may attend to besides itself."""
        drop = len(self) - (window - 1)
        if drop > 0:
            self.keys = [k[:, :, drop:] for k in self.keys]
            self.values = [v[:, :, drop:] for v in self.values]
            self.dropped += drop


class RMSNorm(nn.Module):
    """(..., dim) -> (..., dim): x / sqrt(mean(x**2) + eps) * weight, computed in fp32 (Llama's convention)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(config: Config, dim: int) -> nn.Module:
    """model.norm over the last `dim` features: LayerNorm (its shift only with model.bias) or RMSNorm."""
    m = config.model
    if m.norm == "rmsnorm":
        return RMSNorm(dim, m.norm_eps)
    return nn.LayerNorm(dim, eps=m.norm_eps, bias=m.bias)


def rope_cos_sin(positions: Tensor, head_size: int, theta: float) -> tuple[Tensor, Tensor]:
    """positions (T,) -> cos, sin (T, head_size) in fp32, for rotate-half RoPE (transformers' Llama layout):
    frequency i (i < head_size/2) is theta**(-2i/head_size) and drives dimensions i and i + head_size/2."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, device=positions.device).float() / head_size))
    with torch.autocast(positions.device.type, enabled=False):
        angles = positions.float()[:, None] * inv_freq[None, :]  # (T, head_size / 2)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, heads, T, dh) rotated by its positions' angles: x * cos + rotate_half(x) * sin."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class CausalSelfAttention(nn.Module):
    """(B, T, d) -> (B, T, d): multi-head self-attention where position t sees positions <= t.

    n_kv_heads < n_heads: grouped-query attention, key/value head j serves query heads j*g .. j*g+g-1
    (g = n_heads / n_kv_heads). Optional per-head RMSNorm of q and k, then RoPE, before the dot products.
    """

    def __init__(self, config: Config):
        super().__init__()
        m = config.model
        self.n_heads, self.n_kv_heads, self.head_size = m.n_heads, m.kv_heads(), m.head_size()
        self.attn_dropout = m.attn_dropout
        qkv_bias = m.bias if m.attn_qkv_bias is None else m.attn_qkv_bias
        self.qkv = nn.Linear(m.d_model, (self.n_heads + 2 * self.n_kv_heads) * self.head_size, bias=qkv_bias)
        self.proj = nn.Linear(self.n_heads * self.head_size, m.d_model, bias=m.bias)
        self.q_norm = RMSNorm(self.head_size, m.norm_eps) if m.attn_qk_norm else None
        self.k_norm = RMSNorm(self.head_size, m.norm_eps) if m.attn_qk_norm else None

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0,
                rope: tuple[Tensor, Tensor] | None = None, window: int | None = None) -> Tensor:
        """With `cache`, x holds the positions after the cached ones; their k, v are added to it.
        rope: (cos, sin) of x's positions, (T, head_size). window: the most keys a query sees (a sliding cache)."""
        B, T, _ = x.shape
        H, Hkv, dh = self.n_heads, self.n_kv_heads, self.head_size
        # (B, T, (H + 2 Hkv) dh) -> (B, H, T, dh), (B, Hkv, T, dh), (B, Hkv, T, dh)
        q, k, v = self.qkv(x).split([H * dh, Hkv * dh, Hkv * dh], dim=-1)
        q, k, v = (t.view(B, T, -1, dh).transpose(1, 2) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        S = k.shape[2]
        past, mask = S - T, None
        if past and T > 1:  # query i (absolute past + i) sees keys 0 .. past + i
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=past)
        if window is not None and S > window:  # ... and only the last `window` of them
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=past) \
                .triu(diagonal=past - window + 1)
        if Hkv != H:  # each key/value head serves its group of query heads
            k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and not past,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * dh))


class FeedForward(nn.Module):
    """(B, T, d) -> (B, T, d): proj(act(fc(x))) with GELU (exact or tanh-approximated), or SwiGLU's
    proj(silu(gate(x)) * fc(x)); hidden width config.model.ffn_width()."""

    def __init__(self, config: Config):
        super().__init__()
        m = config.model
        hidden = m.ffn_width()
        self.kind = m.ffn
        self.fc = nn.Linear(m.d_model, hidden, bias=m.bias)
        self.gate = nn.Linear(m.d_model, hidden, bias=m.bias) if m.ffn == "swiglu" else None
        self.proj = nn.Linear(hidden, m.d_model, bias=m.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is not None:
            return self.proj(F.silu(self.gate(x)) * self.fc(x))
        return self.proj(F.gelu(self.fc(x), approximate="tanh" if self.kind == "gelu_tanh" else "none"))


class Block(nn.Module):
    """One pre-norm transformer block; (B, T, d) -> (B, T, d).

    x += attn(ln1(x)); then x += ffn(h) + memory(h) with h = ln2(x), either term possibly absent
    ("replace": no FFN; "parallel": both); then, for "after", x += after_memory(after_norm(x)).
    """

    def __init__(self, config: Config, memory: ProductKeyMemory | None = None, *, replace_ffn: bool = False,
                 after_memory: ProductKeyMemory | None = None):
        super().__init__()
        m = config.model
        self.ln1 = make_norm(config, m.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln2 = make_norm(config, m.d_model)
        self.ffn = None if replace_ffn else FeedForward(config)
        self.memory = memory
        self.after_norm = make_norm(config, m.d_model) if after_memory is not None else None
        self.after_memory = after_memory
        self.dropout = nn.Dropout(m.dropout)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0,
                rope: tuple[Tensor, Tensor] | None = None, window: int | None = None,
                table_grad_to: tuple[Tensor | None, Tensor | None] = (None, None)) -> Tensor:
        """rope, window: see CausalSelfAttention.forward. table_grad_to: the memory's and the after-memory's
        stand-ins for a shared value table (TransformerLM.forward), or None."""
        x = x + self.dropout(self.attn(self.ln1(x), cache, layer, rope, window))
        h = self.ln2(x)
        if self.ffn is None:
            y = _read(self.memory, h, table_grad_to[0])
        elif self.memory is None:
            y = self.ffn(h)
        else:
            y = self.ffn(h) + _read(self.memory, h, table_grad_to[0])
        x = x + self.dropout(y)
        if self.after_memory is not None:
            x = x + self.dropout(_read(self.after_memory, self.after_norm(x), table_grad_to[1]))
        return x


def _read(memory: nn.Module, h: Tensor, table_grad_to: Tensor | None) -> Tensor:
    """memory(h), handing it its stand-in for a shared value table when there is one."""
    return memory(h) if table_grad_to is None else memory(h, table_grad_to=table_grad_to)


class TransformerLM(nn.Module):
    """Decoder-only LM: forward(idx (B, T) long) -> logits (B, T, vocab_size).

    `config` must be a validated `pkmlm.config.Config`; `vocab_size` is the resolved vocabulary
    size (`config.resolve_vocab_size(data_vocab_size)`).
    """

    def __init__(self, config: Config, vocab_size: int):
        super().__init__()
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        m = config.model
        self.config, self.vocab_size, self.max_seq_len = config, vocab_size, m.max_seq_len
        self.rope = m.position_encoding == "rope"
        self.tok_emb = nn.Embedding(vocab_size, m.d_model)
        self.pos_emb = None if self.rope else nn.Embedding(m.max_seq_len, m.d_model)
        self.dropout = nn.Dropout(m.dropout)

        placements = config.memory.placements()
        shared = None
        if config.memory.values_file and placements:
            # One table in one file, shared by the memories: a placeholder that pkmlm.memory.values_file.attach maps.
            shared = make_value_table(config.memory.n_keys, config.memory.v_dim or m.d_model, device="meta")
        elif config.memory.share_values and placements:
            shared = self._make_table(config)

        def memory_if(layer: int, kinds: tuple[str, ...]) -> ProductKeyMemory | None:
            if any(p == (layer, kind) for p in placements for kind in kinds):
                return self._make_memory(config, shared if shared is not None else self._make_table(config))
            return None

        self.blocks = nn.ModuleList(
            Block(config, memory_if(i, ("replace", "parallel")), replace_ffn=(i, "replace") in placements,
                  after_memory=memory_if(i, ("after",)))
            for i in range(m.n_layers))
        if shared is not None and len(self.memories()) > 1:
            for _, memory in self.memories():
                memory.shared_table = True
        self.ln_f = make_norm(config, m.d_model)
        self.lm_head = None if m.tie_embeddings else nn.Linear(m.d_model, vocab_size, bias=False)
        self._init_weights()

    @staticmethod
    def _make_table(config: Config) -> nn.Module:
        """A value table: replicated (every process holds it whole), or sharded by columns over the processes
        of the current process group (memory.shard_values; pkmlm/memory/value_table.py)."""
        mem = config.memory
        v_dim = mem.v_dim or config.model.d_model
        if mem.shard_values:
            return ShardedValueTable(mem.n_keys**2, v_dim)
        return make_value_table(mem.n_keys, v_dim, init=mem.value_init)

    @staticmethod
    def _make_memory(config: Config, values: nn.Module) -> ProductKeyMemory:
        mem, d = config.memory, config.model.d_model
        return ProductKeyMemory(d, d, n_keys=mem.n_keys, heads=mem.heads, knn=mem.knn, k_dim=mem.k_dim,
                                v_dim=mem.v_dim, query_batchnorm=mem.query_batchnorm,
                                input_dropout=mem.input_dropout, query_dropout=mem.query_dropout,
                                value_dropout=mem.value_dropout, sparse=True, values=values, gated=mem.gated,
                                qk_norm=mem.qk_norm, learn_keys=mem.learn_keys, key_init=mem.key_init,
                                score_temperature=mem.score_temperature, score_softmax=mem.score_softmax,
                                query_layers=mem.query_layers, query_layernorm=mem.query_layernorm,
                                value_init=mem.value_init, flat=mem.flat)

    def _init_weights(self) -> None:
        # GPT-2 convention: N(0, 0.02) everywhere, and the projections that write into the residual
        # stream scaled by 1/sqrt(2 * n_layers) so its variance does not grow with depth.
        # Memories own their initialisation (keys, values, query network): skip their modules.
        in_memory = {id(sub) for _, mem in self.memories() for sub in mem.modules()}
        for module in self.modules():
            if id(module) in in_memory:
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * len(self.blocks))
        for block in self.blocks:  # (RMSNorm weights start at one: not Linear or Embedding)
            for proj in (block.attn.proj, block.ffn.proj if block.ffn is not None else None):
                if proj is not None:
                    nn.init.normal_(proj.weight, mean=0.0, std=residual_std)

    def forward(self, idx: Tensor, cache: KVCache | None = None) -> Tensor:
        """idx (B, T) long token ids, T <= max_seq_len -> logits (B, T, vocab_size).

        With `cache` (a KVCache of len(blocks) layers, S = cache.position positions seen), idx continues them:
        its tokens sit at positions S .. S+T-1, attend to the cached ones, and are added to the cache. Learned
        positions bound S + T by max_seq_len; RoPE does not: the cache slides over the last `cache.window`
        (default max_seq_len) positions.
        """
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"idx must be a 2-D (batch, time) tensor of dtype torch.long, "
                             f"got {idx.dtype} of shape {tuple(idx.shape)}")
        past = cache.position if cache is not None else 0
        T = past + idx.shape[1]
        length = idx.shape[1] if self.rope else T  # RoPE bounds one input, learned positions every position
        if length > self.max_seq_len:
            raise ValueError(f"sequence length {length} exceeds model.max_seq_len={self.max_seq_len}; "
                             f"use a shorter data.bptt or a larger model.max_seq_len")
        if cache is not None and cache.window is not None and not self.rope:
            raise ValueError("a KVCache window slides RoPE positions only; with learned positions leave it None")
        pos = torch.arange(past, T, device=idx.device)
        rope, window = None, None
        if self.rope:
            m = self.config.model
            rope = rope_cos_sin(pos, m.head_size(), m.rope_theta)
            if cache is not None:
                window = cache.window or self.max_seq_len
                if window > self.max_seq_len:
                    raise ValueError(f"cache window {window} exceeds model.max_seq_len={self.max_seq_len}")
            x = self.dropout(self.tok_emb(idx))  # (B, T, d)
        else:
            x = self.dropout(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, d)
        stand_ins = self._shared_table_stand_ins()
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i, rope, window, stand_ins[i])
        if window is not None:
            cache.slide(window)
        x = self.ln_f(x)
        if self.lm_head is not None:
            return self.lm_head(x)
        return F.linear(x, self.tok_emb.weight)  # tied output embedding

    def _shared_table_stand_ins(self) -> list[tuple[Tensor | None, Tensor | None]]:
        """Per block, its memory's and after-memory's stand-in for a row-sparse value table that several memories
        read (pkmlm.memory.layer.share_table: their gradients summed by one op, so that torch.compile keeps the
        model in one graph), or Nones: no shared table, or no gradient to send."""
        pairs = [(block.memory, block.after_memory) for block in self.blocks]

        def reads_shared(m) -> bool:
            return isinstance(m, ProductKeyMemory) and m.shared_table

        readers = [m for pair in pairs for m in pair if reads_shared(m)]
        table = readers[0].values if readers else None
        if not (len(readers) > 1 and isinstance(table, nn.EmbeddingBag) and table.sparse
                and table.weight.requires_grad and torch.is_grad_enabled()):
            return [(None, None)] * len(self.blocks)
        stand_ins = iter(share_table(table.weight, len(readers)))
        return [tuple([next(stand_ins) if reads_shared(m) else None for m in pair]) for pair in pairs]

    def memories(self) -> list[tuple[str, ProductKeyMemory]]:
        """(module name, memory) for every memory, in layer order, e.g. ("blocks.2.memory", m)."""
        return [(name, m) for name, m in self.named_modules() if isinstance(m, ProductKeyMemory)]

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts: "total" (a shared value table once), "memory_values" (value tables; a sharded table
        counts its full size),
        and "active_per_token": total minus value tables plus the value rows one token reads
        (heads * knn rows of v_dim per memory). Embedding tables count whole in both."""
        tables = {id(m.values.weight): m.values.num_embeddings * m.values.embedding_dim for _, m in self.memories()}
        total = sum(p.numel() for p in self.parameters() if id(p) not in tables) + sum(tables.values())
        read = sum(m.heads * m.knn * m.v_dim for _, m in self.memories())
        values = sum(tables.values())
        return {"total": total, "memory_values": values, "active_per_token": total - values + read}
