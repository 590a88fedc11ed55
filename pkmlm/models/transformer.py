"""Decoder-only transformer language model with product-key memory layers.

    model = TransformerLM(config, vocab_size)      # config: pkmlm.config.Config
    logits = model(idx)                            # (B, T) long -> (B, T, vocab_size)
    cache = KVCache(len(model.blocks))             # incremental decoding (pkmlm/eval/sampling.py):
    logits = model(prompt, cache); logits = model(next_token, cache)   # each call sees all earlier tokens

Pre-LayerNorm blocks (attention, then FFN), learned positions, tied input/output embeddings.
`config.memory.positions` puts memories into blocks, LAYER 0-based:
    "i:replace"   the memory instead of block i's FFN (Lample et al. 2019)
    "i:after"     an extra residual sub-layer, with its own LayerNorm, after block i
    "i:parallel"  memory and FFN of block i read the same normed input; outputs summed (Kim & Jung 2020)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pkmlm.config import Config
from pkmlm.memory import ProductKeyMemory, make_value_table
from pkmlm.memory.value_table import ShardedValueTable


class KVCache:
    """Attention keys and values of the positions already seen, per block, for incremental decoding.

    Memory layers and FFNs work per token, so attention is the only part of a block that needs the past.
    The model's learned positions make the cache hold at most max_seq_len positions; a caller that wants to
    go on must start a new cache over a shorter window (see pkmlm.eval.sampling).
    """

    def __init__(self, n_layers: int):
        self.keys: list[Tensor | None] = [None] * n_layers  # each (B, heads, S, d // heads)
        self.values: list[Tensor | None] = [None] * n_layers

    def __len__(self) -> int:
        """Positions held (S)."""
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add the new positions' k, v (B, heads, T, dh) of block `layer`; return all of them (B, heads, S+T, dh)."""
        if self.keys[layer] is not None:
            k, v = torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class CausalSelfAttention(nn.Module):
    """(B, T, d) -> (B, T, d): multi-head self-attention where position t sees positions <= t."""

    def __init__(self, d_model: int, n_heads: int, attn_dropout: float):
        super().__init__()
        self.n_heads, self.attn_dropout = n_heads, attn_dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        """With `cache`, x holds the positions after the cached ones; their k, v are added to it."""
        B, T, d = x.shape
        # (B, T, 3d) -> three (B, heads, T, d // heads)
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        past, mask = k.shape[2] - T, None
        if past and T > 1:  # query i (absolute past + i) sees keys 0 .. past + i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not past,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, d))


class FeedForward(nn.Module):
    """(B, T, d) -> (B, T, d): Linear(d, ffn_mult*d), GELU, Linear back."""

    def __init__(self, d_model: int, ffn_mult: int):
        super().__init__()
        self.fc = nn.Linear(d_model, ffn_mult * d_model)
        self.proj = nn.Linear(ffn_mult * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """One pre-LayerNorm transformer block; (B, T, d) -> (B, T, d).

    x += attn(ln1(x)); then x += ffn(h) + memory(h) with h = ln2(x), either term possibly absent
    ("replace": no FFN; "parallel": both); then, for "after", x += after_memory(after_norm(x)).
    """

    def __init__(self, config: Config, memory: ProductKeyMemory | None = None, *, replace_ffn: bool = False,
                 after_memory: ProductKeyMemory | None = None):
        super().__init__()
        m = config.model
        self.ln1 = nn.LayerNorm(m.d_model)
        self.attn = CausalSelfAttention(m.d_model, m.n_heads, m.attn_dropout)
        self.ln2 = nn.LayerNorm(m.d_model)
        self.ffn = None if replace_ffn else FeedForward(m.d_model, m.ffn_mult)
        self.memory = memory
        self.after_norm = nn.LayerNorm(m.d_model) if after_memory is not None else None
        self.after_memory = after_memory
        self.dropout = nn.Dropout(m.dropout)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        x = x + self.dropout(self.attn(self.ln1(x), cache, layer))
        h = self.ln2(x)
        if self.ffn is None:
            y = self.memory(h)
        elif self.memory is None:
            y = self.ffn(h)
        else:
            y = self.ffn(h) + self.memory(h)
        x = x + self.dropout(y)
        if self.after_memory is not None:
            x = x + self.dropout(self.after_memory(self.after_norm(x)))
        return x


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
        self.tok_emb = nn.Embedding(vocab_size, m.d_model)
        self.pos_emb = nn.Embedding(m.max_seq_len, m.d_model)
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
        self.ln_f = nn.LayerNorm(m.d_model)
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
        for block in self.blocks:
            for proj in (block.attn.proj, block.ffn.proj if block.ffn is not None else None):
                if proj is not None:
                    nn.init.normal_(proj.weight, mean=0.0, std=residual_std)

    def forward(self, idx: Tensor, cache: KVCache | None = None) -> Tensor:
        """idx (B, T) long token ids, T <= max_seq_len -> logits (B, T, vocab_size).

        With `cache` (a KVCache of len(blocks) layers, S positions), idx continues those S positions:
        they sit at positions S .. S+T-1, attend to the cached ones, and are added to the cache.
        """
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"idx must be a 2-D (batch, time) tensor of dtype torch.long, "
                             f"got {idx.dtype} of shape {tuple(idx.shape)}")
        past = len(cache) if cache is not None else 0
        T = past + idx.shape[1]
        if T > self.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.max_seq_len}; "
                             f"use a shorter data.bptt or a larger model.max_seq_len")
        pos = torch.arange(past, T, device=idx.device)
        x = self.dropout(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, d)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        return F.linear(self.ln_f(x), self.tok_emb.weight)  # tied output embedding

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
