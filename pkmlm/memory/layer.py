"""Product-key memory layer (Lample et al., "Large Memory Layers with Product Keys", NeurIPS 2019).

A token's query is split into two halves; each half is scored against its own `n_keys` sub-keys, and
the `n_keys**2` memory slots are all pairs (i1, i2) of sub-keys, scored by the sum of the two half
scores. The best `knn` slots per head are read from a value table with softmax weights, heads summed.
Finding them costs O(n_keys) per half instead of O(n_keys**2): see `ProductKeyMemory.lookup`.

Options for ablations and for Memory+ (Berges et al., "Memory Layers at Scale", 2024) — the gated output,
query/key normalisation, frozen keys, key initialisations, score temperature or no softmax, a query MLP,
LayerNorm queries, zero-initialised values and a flat (non-product) exact memory — are described in
`ProductKeyMemory` and docs/config.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pkmlm.distributed import set_where_
from pkmlm.memory import kernels, triton_kernels
from pkmlm.memory.sparse import coalesce_rows, inductor_sparse_outputs, row_sparse, row_sparse_grad

KEY_INITS = ("uniform", "normal", "orthogonal")
VALUE_INITS = ("normal", "zero")
# A flat memory scores every slot for every token: O(slots * k_dim) per token and head.
FLAT_MAX_SLOTS = 2**16


def make_value_table(n_keys: int, v_dim: int, *, sparse: bool = True, init: str = "normal",
                     device=None) -> nn.EmbeddingBag:
    """A value table of `n_keys**2` rows of size `v_dim`, initialised N(0, v_dim**-0.5) ("normal") or to zero.

    Build one and pass it as `values=` to several `ProductKeyMemory` layers to share it.
    `sparse=True` makes its gradient a row-sparse tensor (only the rows read in the step).
    device="meta": a placeholder without storage, for a table that pkmlm.memory.values_file maps from disk.
    """
    _check_positive(n_keys=n_keys, v_dim=v_dim)
    _check_choice("init", init, VALUE_INITS)
    # _weight: skip EmbeddingBag's own N(0, 1) draw, overwritten anyway (pkmlm.memory.value_table draws the same numbers).
    table = nn.EmbeddingBag(n_keys**2, v_dim, mode="sum", sparse=sparse,
                            _weight=torch.empty(n_keys**2, v_dim, device=device))
    if init == "zero":
        nn.init.zeros_(table.weight)
    else:
        nn.init.normal_(table.weight, mean=0.0, std=v_dim**-0.5)
    return table


def compile_model(model: nn.Module) -> nn.Module:
    """torch.compile(model): the compiled model, sharing `model`'s parameters and state_dict keys (call the result,
    keep using `model` for state_dict, metrics and saving).

    First settles, outside any trace, which kernels the memory layers run (building the compiled CPU kernels and
    registering their fake kernels; looking Triton up), so the trace sees plain decisions: a memory layer then
    compiles into one graph with no graph break, its value table's gradient still row-sparse.

    Sets torch._dynamo.config.capture_dynamic_output_shape_ops for the process: the memory's backward ops
    (value_read_backward, row_grads) return one row per distinct slot read, a size known only at run time, and
    without that setting dynamo's shape environment refuses such ops (DynamicOutputShapeException), which dynamo
    answers by running every graph holding a memory layer eagerly ("Backend compiler `inductor` failed"), silently.
    """
    kernels.available()
    triton_kernels.available()
    inductor_sparse_outputs()
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    return torch.compile(model)


def candidate_pairs(knn: int) -> tuple[Tensor, Tensor]:
    """Rank pairs (a, b), 0-based, that can reach the top-knn of sums of two sorted lists.

    With both lists sorted in decreasing order, the pair at ranks (a, b) is beaten or tied by every
    pair (a', b') with a' <= a and b' <= b: (a+1)(b+1) pairs, itself included. So only pairs with
    (a+1)(b+1) <= knn can be in the top-knn (up to ties): about knn*ln(knn) of the knn**2 pairs.
    Returns two LongTensors of shape (P,): the ranks a and b.
    """
    pairs = [(a, b) for a in range(knn) for b in range(knn) if (a + 1) * (b + 1) <= knn]
    a, b = zip(*pairs)
    return torch.tensor(a), torch.tensor(b)


class ProductKeyMemory(nn.Module):
    """Maps `(..., input_dim)` to `(..., output_dim)` through a memory of `n_keys**2` value slots.

    Args (every size must be a positive int):
        n_keys: sub-keys per query half; the memory has n_keys**2 slots.
        heads: independent queries per token, each reading knn slots; their reads are summed.
        knn: slots read per head (at most n_keys).
        k_dim: query size per head (even: it is split into two halves of k_dim // 2).
        v_dim: value size (default: output_dim). If it differs from output_dim, a linear
            projection v_dim -> output_dim follows the read.
        query_batchnorm: BatchNorm1d on the queries (the paper's fix for unbalanced key usage).
        input_dropout, query_dropout, value_dropout: dropout on the input, on the queries (after
            BatchNorm) and on the read values (before the output projection). Each in [0, 1).
        sparse: the value table's gradient is row-sparse (pair it with `pkmlm.training.optim`'s row
            optimizer); otherwise it is a dense (n_keys**2, v_dim) tensor every step.
        values: a table from `make_value_table` to share with other memories; its size must be
            (n_keys**2, v_dim) and its `sparse` flag must equal `sparse`.
        gated: Memory+ output, out_proj(read * silu(gate_proj(x))) with x the layer input; always adds
            the output projection, also when v_dim == output_dim.
        qk_norm: score cosines: query halves and sub-keys L2-normalised, scores scaled by sqrt(k_dim // 2)
            (sqrt(k_dim) for a flat memory) so that they start with about unit spread.
        learn_keys: False freezes the keys (requires_grad False: no gradient, no optimizer state).
        key_init: "uniform" U(+-s), s = (k_dim // 2)**-0.5 (the default); "normal" with the same variance;
            "orthogonal": each (head, half) sub-key matrix orthogonal, rescaled to the same variance.
        score_temperature: scores are divided by it before the softmax (> 0).
        score_softmax: False reads with the (temperature-scaled) scores themselves as weights.
        query_layers: linear layers in the query network; more than one makes an MLP with hidden
            width input_dim and GELU between layers.
        query_layernorm: LayerNorm over each head's query instead of BatchNorm (exclusive with
            query_batchnorm); per token, so it does not depend on the batch.
        value_init: "normal" or "zero" (used when this memory builds its own table, and by reinit_slots).
        flat: exact memory with one full key per slot (heads, n_keys**2, k_dim), every slot scored:
            the baseline product keys approximate. At most FLAT_MAX_SLOTS slots; no sub-keys.
    """

    def __init__(self, input_dim: int, output_dim: int, *, n_keys: int = 512, heads: int = 4,
                 knn: int = 32, k_dim: int = 512, v_dim: int | None = None,
                 query_batchnorm: bool = True, input_dropout: float = 0.0,
                 query_dropout: float = 0.0, value_dropout: float = 0.0, sparse: bool = True,
                 values: nn.EmbeddingBag | None = None, gated: bool = False, qk_norm: bool = False,
                 learn_keys: bool = True, key_init: str = "uniform", score_temperature: float = 1.0,
                 score_softmax: bool = True, query_layers: int = 1, query_layernorm: bool = False,
                 value_init: str = "normal", flat: bool = False):
        super().__init__()
        if v_dim is None:
            v_dim = values.embedding_dim if values is not None else output_dim
        _check_positive(input_dim=input_dim, output_dim=output_dim, n_keys=n_keys, heads=heads,
                        knn=knn, k_dim=k_dim, v_dim=v_dim, query_layers=query_layers)
        _check_choice("key_init", key_init, KEY_INITS)
        _check_choice("value_init", value_init, VALUE_INITS)
        if not score_temperature > 0:
            raise ValueError(f"score_temperature must be > 0, got {score_temperature}")
        if query_batchnorm and query_layernorm:
            raise ValueError("query_batchnorm and query_layernorm are exclusive: pick one query normalisation")
        if flat and n_keys**2 > FLAT_MAX_SLOTS:
            raise ValueError(f"a flat memory scores every slot: n_keys={n_keys} gives {n_keys**2} slots, "
                             f"at most {FLAT_MAX_SLOTS} are allowed (use product keys for larger memories)")
        if k_dim % 2:
            raise ValueError(f"k_dim must be even (it is split into two halves), got {k_dim}")
        if n_keys**2 >= 2**31:
            raise ValueError(f"n_keys={n_keys} gives {n_keys**2} slots; at most 2**31 - 1 are supported")
        if knn > n_keys:
            raise ValueError(f"knn ({knn}) must be at most n_keys ({n_keys}): each query half "
                             f"picks its top-knn among n_keys sub-keys")
        for name, p in (("input_dropout", input_dropout), ("query_dropout", query_dropout),
                        ("value_dropout", value_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        if values is None:
            values = make_value_table(n_keys, v_dim, sparse=sparse, init=value_init)
        else:
            _check_shared_values(values, n_keys, v_dim, sparse)

        self.input_dim, self.output_dim = input_dim, output_dim
        self.n_keys, self.heads, self.knn, self.k_dim, self.v_dim = n_keys, heads, knn, k_dim, v_dim
        self.flat, self.qk_norm, self.key_init, self.value_init = flat, qk_norm, key_init, value_init
        self.score_temperature, self.score_softmax = float(score_temperature), score_softmax

        self.input_dropout = nn.Dropout(input_dropout)
        # Hidden layers of a query MLP (None: the query is one linear map of the input).
        self.query_mlp = nn.Sequential(*(m for _ in range(query_layers - 1)
                                         for m in (nn.Linear(input_dim, input_dim), nn.GELU()))) \
            if query_layers > 1 else None
        # BatchNorm subtracts the mean, so a bias before it would be a parameter with no effect.
        self.query_proj = nn.Linear(input_dim, heads * k_dim, bias=not query_batchnorm)
        if query_batchnorm:
            self.query_norm = nn.BatchNorm1d(heads * k_dim)
        elif query_layernorm:
            self.query_norm = nn.LayerNorm(k_dim)
        else:
            self.query_norm = None
        self.query_dropout = nn.Dropout(query_dropout)
        half = k_dim // 2
        shape = (heads, n_keys**2, k_dim) if flat else (heads, 2, n_keys, half)
        # Flat keys use the sub-keys' scale too, so that flat and product scores have the same spread.
        self.keys = nn.Parameter(_init_keys(shape, half**-0.5, key_init), requires_grad=learn_keys)
        self.values = values
        # True when other memories read `values` too (set by whoever shares it, e.g. TransformerLM, which then hands
        # each memory its stand-in for the table: share_table).
        self.shared_table = False
        self.value_dropout = nn.Dropout(value_dropout)
        self.gate_proj = nn.Linear(input_dim, v_dim, bias=False) if gated else None
        self.out_proj = nn.Linear(v_dim, output_dim) if gated or v_dim != output_dim else None

        a, b = candidate_pairs(knn)
        self.register_buffer("pair_a", a, persistent=False)
        self.register_buffer("pair_b", b, persistent=False)
        # Usage histograms: allocated by track_usage(True), never saved in checkpoints.
        self.register_buffer("usage_counts", None, persistent=False)
        self.register_buffer("usage_weights", None, persistent=False)
        self.register_buffer("usage_subkeys", None, persistent=False)
        # Slot read counts for fine-tuning (count_reads / take_read_counts); never saved either.
        self.register_buffer("read_counts", None, persistent=False)

    # ---- forward path ---------------------------------------------------------------------------

    def forward(self, x: Tensor, mask: Tensor | None = None, table_grad_to: Tensor | None = None) -> Tensor:
        """(..., input_dim) -> (..., output_dim). `mask` (...) bool, True = real token.

        Padding tokens (mask False) are not looked up, do not enter the BatchNorm statistics or the
        usage histograms, and get a zero output. `table_grad_to`: for a value table that several memories read,
        this memory's stand-in for it from share_table, which receives the table's gradient instead.
        """
        x_flat, m = self._flatten(x, mask)
        if m is None:
            out = self._read(x_flat, table_grad_to)
        else:
            real = self._read(x_flat[m], table_grad_to)
            out = real.new_zeros(x_flat.shape[0], self.output_dim)
            out[m] = real
        return out.view(*x.shape[:-1], self.output_dim)

    def query(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Queries of the N flattened tokens of x: (N, heads, k_dim). Padding rows are zero."""
        x_flat, m = self._flatten(x, mask)
        if m is None:
            return self._query(x_flat)
        real = self._query(x_flat[m])
        q = real.new_zeros(x_flat.shape[0], self.heads, self.k_dim)
        q[m] = real
        return q

    def lookup(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """Exact top-knn slots of queries q (N, heads, k_dim) -> (scores, indices), each (N, heads, knn).

        Sorted by decreasing score; slot = i1 * n_keys + i2 and score = q[:half] . keys[h, 0, i1] +
        q[half:] . keys[h, 1, i2]. Exact up to ties among equal scores.
        """
        if q.dim() != 3 or q.shape[1:] != (self.heads, self.k_dim):
            raise ValueError(f"lookup expects queries of shape (N, {self.heads}, {self.k_dim}) "
                             f"(N, heads, k_dim), got {tuple(q.shape)}")
        scores, indices, _ = self._search(q, with_subkeys=False)
        return scores, indices

    @torch.no_grad()
    def reads(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """What forward reads for each of the N flattened tokens of x: slots (N, heads, knn) and their softmax
        weights (N, heads, knn) float32, each head's summing to 1. For looking into a trained memory."""
        scores, slots = self.lookup(self.query(x))
        return slots, F.softmax(scores.float(), dim=-1)

    def _flatten(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if x.dim() < 1 or x.shape[-1] != self.input_dim:
            raise ValueError(f"input's last dimension must be input_dim={self.input_dim}, "
                             f"got shape {tuple(x.shape)}")
        if mask is not None:
            if mask.dtype != torch.bool or mask.shape != x.shape[:-1]:
                raise ValueError(f"mask must be a bool tensor of shape {tuple(x.shape[:-1])} "
                                 f"(the input's shape without its last dimension), got "
                                 f"{mask.dtype} {tuple(mask.shape)}")
            mask = mask.reshape(-1)
        return x.reshape(-1, self.input_dim), mask

    def _query(self, x: Tensor) -> Tensor:
        """(N, input_dim) -> (N, heads, k_dim)."""
        h = self.input_dropout(x)
        if self.query_mlp is not None:
            h = self.query_mlp(h)
        q = self.query_proj(h).view(-1, self.heads, self.k_dim)
        if self.query_norm is not None:
            # BatchNorm1d normalises each of the heads * k_dim features; LayerNorm each head's query.
            q = self.query_norm(q.flatten(1)).view_as(q) if isinstance(self.query_norm, nn.BatchNorm1d) \
                else self.query_norm(q)
        return self.query_dropout(q)

    def _search(self, q: Tensor, with_subkeys: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
        """(N, heads, k_dim) -> scores, slots (N, heads, knn), sub-key ids (N, heads, 2, knn).

        On float32 CPU keys the compiled kernel does it all (see pkmlm.memory.kernels; sub-key ids only
        when asked for), also for bf16/fp16 autocast queries; elsewhere these torch ops do the same.
        A flat memory has no sub-key ids (None).
        """
        if self.flat:
            return (*self._flat_search(q), None)
        n, half = q.shape[0], self.k_dim // 2
        q, keys = q.view(n, self.heads, 2, half), self.keys
        if self.qk_norm:
            q, keys = F.normalize(q, dim=-1) * half**0.5, F.normalize(keys, dim=-1)
        if q.dtype in (torch.bfloat16, torch.float16) and kernels.usable(keys):
            q = q.float()  # CPU autocast: the kernel searches the rounded queries exactly, in float32
        if kernels.usable(q, keys):
            return _compiled_lookup(q, keys, self.knn, with_subkeys)
        # (N, heads, 2, n_keys): each query half against its own sub-keys, all heads in one einsum.
        half_scores = torch.einsum("nhpd,hpkd->nhpk", q, keys.to(q.dtype))
        top_scores, top_ids = half_scores.topk(self.knn, dim=-1)  # (N, heads, 2, knn), sorted
        # Sum only the rank pairs that can reach the top-knn (see candidate_pairs).
        sums = (top_scores[:, :, 0].index_select(-1, self.pair_a)
                + top_scores[:, :, 1].index_select(-1, self.pair_b))  # (N, heads, P)
        scores, best = sums.topk(self.knn, dim=-1)  # (N, heads, knn)
        i1 = top_ids[:, :, 0].gather(-1, self.pair_a[best])
        i2 = top_ids[:, :, 1].gather(-1, self.pair_b[best])
        return scores, i1 * self.n_keys + i2, top_ids

    def _flat_search(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """Exact top-knn over every slot's full key: (N, heads, k_dim) -> scores, slots (N, heads, knn)."""
        keys = self.keys.to(q.dtype)  # (heads, slots, k_dim)
        if self.qk_norm:
            q, keys = F.normalize(q, dim=-1) * self.k_dim**0.5, F.normalize(keys, dim=-1)
        slots = keys.shape[1]
        # The search needs no graph; chunks of tokens bound its (tokens, heads, slots) score block.
        chunk = max(1, 2**24 // (self.heads * slots))
        with torch.no_grad():
            indices = torch.cat([torch.einsum("nhd,hsd->nhs", q[i:i + chunk], keys).topk(self.knn, dim=-1).indices
                                 for i in range(0, q.shape[0], chunk)]) if q.shape[0] else \
                q.new_zeros(0, self.heads, self.knn, dtype=torch.long)
        # Scores of the selected slots, with gradients reaching only their keys.
        heads = torch.arange(self.heads, device=q.device).view(1, -1, 1)
        scores = (keys[heads, indices] * q.unsqueeze(2)).sum(-1)  # (N, heads, knn)
        return scores, indices

    def _read(self, x: Tensor, table_grad_to: Tensor | None = None) -> Tensor:
        """(N, input_dim) -> (N, output_dim); table_grad_to: see forward."""
        scores, indices, subkeys = self._search(self._query(x), with_subkeys=self.usage_counts is not None)
        # float32 weights even under autocast: bf16 weights over 32 slots lose the small ones.
        scores = scores.float() / self.score_temperature if self.score_temperature != 1.0 else scores.float()
        weights = F.softmax(scores, dim=-1) if self.score_softmax else scores  # (N, heads, knn)
        if self.usage_counts is not None:
            self._accumulate_usage(indices, weights, subkeys)
        if self.read_counts is not None:
            with torch.no_grad():
                self.read_counts.index_add_(0, indices.reshape(-1), torch.ones(indices.numel(), dtype=torch.float64,
                                                                              device=indices.device))
        n, table = indices.shape[0], self.values.weight
        reads = self.heads * self.knn  # explicit: n may be 0 (every token masked)
        indices, weights = indices.reshape(n, reads), weights.reshape(n, reads).to(table.dtype)
        if not isinstance(self.values, nn.EmbeddingBag):  # a table that reads itself (pkmlm/memory/value_table.py)
            out = self.values.read(indices, weights)
        elif self.values.sparse:
            out = _sparse_read(table, indices, weights, table_grad_to)
        else:
            out = self.values(indices, per_sample_weights=weights)
        out = self.value_dropout(out)  # (N, v_dim), heads summed by the bag
        if self.gate_proj is not None:
            out = out * F.silu(self.gate_proj(x))
        return self.out_proj(out) if self.out_proj is not None else out

    # ---- what the trainer and the metrics need ----------------------------------------------------

    def value_parameters(self) -> list[nn.Parameter]:
        """The value table's weight: the parameter `pkmlm.training.optim` gives to the sparse row optimizer."""
        return [self.values.weight]

    @torch.no_grad()
    def reinit_slots(self, slots: Tensor, generator: torch.Generator | None = None) -> None:
        """Redraw the value rows `slots` (LongTensor (S,)) from the table's init, N(0, v_dim**-0.5) or zero.

        Values are drawn on the CPU from `generator`, so equal seeds give equal rows on every device and rank.
        """
        rows = self._check_ids(slots, self.n_keys**2, "slots")
        fresh = torch.randn(rows.numel(), self.v_dim, generator=generator, dtype=torch.float32) * self.v_dim**-0.5
        if self.value_init == "zero":
            fresh.zero_()
        if not isinstance(self.values, nn.EmbeddingBag):
            self.values.write_rows(rows, fresh)
            return
        w = self.values.weight
        w.index_copy_(0, rows.to(w.device), fresh.to(device=w.device, dtype=w.dtype))

    @torch.no_grad()
    def reinit_subkeys(self, mask: Tensor, generator: torch.Generator | None = None) -> None:
        """Redraw the sub-keys where `mask` (heads, 2, n_keys) bool is True from their init, U(+-half**-0.5)
        (normal: N with the same variance; orthogonal: also that normal, a subset cannot be made orthogonal).

        Drawn on the CPU from `generator` (see `reinit_slots`). A flat memory has no sub-keys (ValueError).
        """
        if self.flat:
            raise ValueError("a flat memory has no sub-keys to re-initialise")
        if mask.dtype != torch.bool or mask.shape != self.keys.shape[:3]:
            raise ValueError(f"mask must be a bool tensor of shape {tuple(self.keys.shape[:3])} "
                             f"(heads, 2, n_keys), got {mask.dtype} {tuple(mask.shape)}")
        half = self.k_dim // 2
        mask = mask.cpu()
        if self.key_init == "uniform":
            fresh = torch.rand(int(mask.sum()), half, generator=generator, dtype=torch.float32)
            fresh = (fresh * 2 - 1) * half**-0.5
        else:
            fresh = torch.randn(int(mask.sum()), half, generator=generator, dtype=torch.float32) * (3 * half)**-0.5
        set_where_(self.keys.data, mask, fresh.to(device=self.keys.device, dtype=self.keys.dtype))  # FSDP: sharded

    @staticmethod
    def _check_ids(ids: Tensor, size: int, name: str) -> Tensor:
        if ids.dim() != 1 or ids.dtype != torch.long:
            raise ValueError(f"{name} must be a 1-D LongTensor, got {ids.dtype} {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= size):
            raise ValueError(f"{name} must lie in [0, {size}), got values in [{int(ids.min())}, {int(ids.max())}]")
        return ids

    def count_reads(self, enabled: bool = True) -> None:
        """Start (zeroed) or stop counting the slots forward reads: what sparse fine-tuning picks rows from.

        Separate from `track_usage`, so that validation's histograms and fine-tuning do not disturb each other."""
        if not enabled:
            self.read_counts = None
        elif self.read_counts is None:
            self.read_counts = torch.zeros(self.n_keys**2, dtype=torch.float64, device=self.keys.device)
        else:
            self.read_counts.zero_()

    def take_read_counts(self) -> Tensor:
        """(n_keys**2,) float64: times each slot was read (tokens and heads summed) since counting started or the
        last call; the counter restarts at zero. Counting must be on (`count_reads`)."""
        if self.read_counts is None:
            raise RuntimeError("read counting is off: call count_reads(True) first")
        counts = self.read_counts.clone()
        self.read_counts.zero_()
        return counts

    def track_usage(self, enabled: bool = True) -> None:
        """Start (zeroed histograms) or stop accumulating slot usage in forward."""
        if not enabled:
            self.usage_counts = self.usage_weights = self.usage_subkeys = None
            return
        if self.usage_counts is None:
            slots = self.n_keys**2
            kw = dict(dtype=torch.float64, device=self.keys.device)
            self.usage_counts = torch.zeros(self.heads, slots, **kw)
            self.usage_weights = torch.zeros(self.heads, slots, **kw)
            self.usage_subkeys = torch.zeros(self.heads, 2, self.n_keys, **kw)

    def reset_usage(self) -> None:
        """Zero the usage histograms (tracking must be on)."""
        self._require_tracking()
        for t in (self.usage_counts, self.usage_weights, self.usage_subkeys):
            t.zero_()

    def usage(self) -> dict[str, Tensor]:
        """Histograms since the last reset, summed over the real tokens this layer read.

        "counts": (heads, n_keys**2) float64, times each slot was selected by each head;
        "weights": (heads, n_keys**2) float64, summed softmax weight each slot received;
        "subkey_counts": (heads, 2, n_keys) float64, times each sub-key was in its half's top-knn.
        """
        self._require_tracking()
        return {"counts": self.usage_counts.clone(), "weights": self.usage_weights.clone(),
                "subkey_counts": self.usage_subkeys.clone()}

    def _require_tracking(self) -> None:
        if self.usage_counts is None:
            raise RuntimeError("usage tracking is off: call track_usage(True) first")

    @torch.no_grad()
    def _accumulate_usage(self, indices: Tensor, weights: Tensor, subkeys: Tensor) -> None:
        # Offset each head's ids into its own row of the flattened (heads, ...) histogram.
        heads = torch.arange(self.heads, device=indices.device)
        slot = (indices + (heads * self.n_keys**2).view(1, -1, 1)).reshape(-1)
        self.usage_counts.view(-1).index_add_(0, slot, torch.ones_like(slot, dtype=torch.float64))
        self.usage_weights.view(-1).index_add_(0, slot, weights.reshape(-1).double())
        if subkeys is None:  # flat memory: no sub-keys
            return
        half = torch.arange(2 * self.heads, device=indices.device).view(1, self.heads, 2, 1)
        sub = (subkeys + half * self.n_keys).reshape(-1)
        self.usage_subkeys.view(-1).index_add_(0, sub, torch.ones_like(sub, dtype=torch.float64))

    def extra_repr(self) -> str:
        options = [name for name, on in (("flat", self.flat), ("gated", self.gate_proj is not None),
                                         ("qk_norm", self.qk_norm), ("frozen keys", not self.keys.requires_grad),
                                         ("no softmax", not self.score_softmax)) if on]
        return (f"{self.input_dim}->{self.output_dim}, n_keys={self.n_keys} ({self.n_keys**2} slots), "
                f"heads={self.heads}, knn={self.knn}, k_dim={self.k_dim}, v_dim={self.v_dim}"
                + "".join(f", {o}" for o in options))


def _compiled_lookup(q: Tensor, keys: Tensor, knn: int, with_subkeys: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """ProductKeyMemory._search by the compiled CPU kernel: q (N, heads, 2, half), keys (heads, 2, n_keys, half)
    -> scores, slots (N, heads, knn), sub-key ids (N, heads, 2, knn) or None unless with_subkeys."""
    scores, slots, subkeys = torch.ops.pkmlm.lookup(q.contiguous(), keys.contiguous(), knn, with_subkeys)
    return scores, slots, subkeys if with_subkeys else None


@torch.library.custom_op("pkmlm::lookup", mutates_args=())
def _lookup(q: Tensor, keys: Tensor, knn: int, with_subkeys: bool) -> tuple[Tensor, Tensor, Tensor]:
    """torch.ops.pkmlm.pkm_lookup as a custom op with autograd: its backward sends each score's gradient to the
    two sub-keys it came from and to the query halves only. subkeys is (0, heads, 2, knn) unless with_subkeys."""
    # Detached: the kernel's own matmuls must not see tensors that require grad.
    return torch.ops.pkmlm.pkm_lookup(q.detach(), keys.detach(), knn, with_subkeys)


@_lookup.register_fake
def _(q, keys, knn, with_subkeys):
    n, heads = q.shape[0], q.shape[1]
    return (q.new_empty(n, heads, knn), q.new_empty(n, heads, knn, dtype=torch.long),
            q.new_empty(n if with_subkeys else 0, heads, 2, knn, dtype=torch.long))


def _lookup_context(ctx, inputs, output):
    q, keys, _knn, _with_subkeys = inputs
    ctx.save_for_backward(q, keys, output[1])


def _lookup_grads(ctx, grad_scores, _slots, _subkeys):
    q, keys, slots = ctx.saved_tensors
    grad_q, grad_keys = torch.ops.pkmlm.pkm_lookup_backward(grad_scores.float().contiguous(), slots, q.detach(),
                                                            keys.detach())
    return grad_q, grad_keys, None, None


_lookup.register_autograd(_lookup_grads, setup_context=_lookup_context)


# The value read as torch.library custom ops: each has a fake kernel (shapes only) and its autograd registered,
# so torch.compile traces a memory layer whole, and the table's row-sparse gradient (a sparse COO tensor built
# from (rows, one summed row each)) comes out of the compiled backward as it does in eager mode.

@torch.library.custom_op("pkmlm::value_read", mutates_args=())
def _value_read(table: Tensor, indices: Tensor, weights: Tensor, table_grad_to: Tensor | None = None) -> Tensor:
    """The fused value read: table (rows, v_dim), indices and weights (N, R) -> out (N, v_dim) =
    sum_r weights[n, r] * table[indices[n, r]]. Triton on CUDA (pkmlm.memory.triton_kernels), else an
    embedding bag; its backward is one fused pass (value_read_backward). The table's gradient goes to
    table_grad_to when given (a stand-in from share_table), else to the table."""
    if triton_kernels.usable(table, weights):
        return triton_kernels.value_read(table, indices, weights)
    return F.embedding_bag(indices, table.detach(), per_sample_weights=weights.detach(), mode="sum")


@_value_read.register_fake
def _(table, indices, weights, table_grad_to=None):
    return table.new_empty(indices.shape[0], table.shape[1])


@torch.library.custom_op("pkmlm::value_read_backward", mutates_args=())
def _value_read_backward(grad_out: Tensor, table: Tensor, indices: Tensor,
                         weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Both gradients of value_read in one pass over the reads sorted by slot, each table row read once:
    the distinct rows read (U,) int64 increasing, their summed gradients (U, v_dim) (the table's row-sparse
    gradient) and the weights' (N, R), grad_out[n] . table[indices[n, r]]. Triton on CUDA, else the compiled
    CPU kernel (torch.ops.pkmlm.sparse_read_backward)."""
    if triton_kernels.usable(table, weights):
        return triton_kernels.value_read_backward(grad_out, table, indices, weights)
    return torch.ops.pkmlm.sparse_read_backward(grad_out.contiguous(), table.detach().contiguous(),
                                                indices.contiguous(), weights.detach().contiguous())


@_value_read_backward.register_fake
def _(grad_out, table, indices, weights):
    rows = torch.library.get_ctx().new_dynamic_size()  # the distinct slots read: known only at run time
    return indices.new_empty(rows), grad_out.new_empty(rows, table.shape[1]), weights.new_empty(indices.shape)


def _value_read_context(ctx, inputs, output):
    table, indices, weights, table_grad_to = inputs
    ctx.save_for_backward(table, indices, weights)
    ctx.to_stand_in = table_grad_to is not None


def _value_read_grads(ctx, grad_out):
    table, indices, weights = ctx.saved_tensors
    rows, row_grads, grad_weights = torch.ops.pkmlm.value_read_backward(grad_out, table, indices, weights)
    grad_table = row_sparse(rows, row_grads, table.shape)
    if ctx.to_stand_in:
        return None, None, grad_weights, grad_table
    return grad_table, None, grad_weights, None


_value_read.register_autograd(_value_read_grads, setup_context=_value_read_context)


@torch.library.custom_op("pkmlm::row_sparse_route", mutates_args=())
def _row_sparse_route(out: Tensor, table: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """A copy of the values read, out (N, v_dim); its backward gives the table (rows, v_dim) a sparse gradient
    holding one summed row per slot read (pkmlm.memory.sparse.row_sparse_grad), grad_out to out.

    nn.EmbeddingBag(sparse=True) would instead emit one row per read (N * heads * knn rows: 67M floats for 2k
    tokens at heads=4, knn=32) and leave the summing to the optimizer's coalesce, which costs more than the rest
    of the step. indices, weights (N, R); table is an input only so that autograd routes its gradient here.
    """
    return out.clone()  # a custom op's output may not alias its input


@_row_sparse_route.register_fake
def _(out, table, indices, weights):
    return torch.empty_like(out)


def _route_context(ctx, inputs, output):
    _out, table, indices, weights = inputs
    ctx.save_for_backward(indices, weights)
    ctx.table_shape = table.shape


def _route_grads(ctx, grad_out):
    indices, weights = ctx.saved_tensors
    return grad_out, row_sparse_grad(indices, weights, grad_out, ctx.table_shape), None, None


_row_sparse_route.register_autograd(_route_grads, setup_context=_route_context)


def _sparse_read(table: Tensor, indices: Tensor, weights: Tensor, table_grad_to: Tensor | None = None) -> Tensor:
    """sum_r weights[n, r] * table[indices[n, r]]: (N, v_dim), with a row-sparse gradient for the table (one
    summed row per slot read; sent to table_grad_to instead when given, see share_table) and a dense one for the
    weights.

    The fused read (value_read) for a float32 CPU table with the compiled kernels, or a CUDA table with Triton
    (pkmlm.memory.triton_kernels); otherwise an embedding bag, its table gradient by row_sparse_route.
    """
    if indices.dtype == torch.long and (kernels.usable(table, weights) or triton_kernels.usable(table, weights)):
        if table_grad_to is not None:
            return torch.ops.pkmlm.value_read(table.detach(), indices, weights, table_grad_to)
        return torch.ops.pkmlm.value_read(table, indices, weights)
    # The table is read without autograd; row_sparse_route gives it (or its stand-in) its gradient.
    out = F.embedding_bag(indices, table.detach(), per_sample_weights=weights, mode="sum")
    grad_to = table if table_grad_to is None else table_grad_to
    return torch.ops.pkmlm.row_sparse_route(out, grad_to, indices, weights.detach())


def share_table(table: Tensor, n: int) -> list[Tensor]:
    """n stand-ins for a value table (rows, v_dim) that n memories read in one forward, one per memory
    (ProductKeyMemory.forward's table_grad_to): each memory sends its row-sparse gradient to its stand-in, and
    one op (pkmlm::fan_out's backward) sums them into the table's, still row-sparse and coalesced.

    Why: left to autograd, the memories' sparse gradients meet at the table and autograd adds them (aten.add),
    which inductor cannot compile (torch 2.13: aten.add of sparse fake tensors fails); through stand-ins each
    gradient has its own edge and the sum is a custom op, so a model sharing a table compiles into one graph.
    """
    return torch.ops.pkmlm.fan_out(table, n)


@torch.library.custom_op("pkmlm::fan_out", mutates_args=())
def _fan_out(table: Tensor, n: int) -> list[Tensor]:
    """n stand-ins for table in autograd: zeros broadcast to its shape (no memory; autograd checks a gradient's
    shape against its input's), never read."""
    return [table.new_zeros(()).expand(table.shape) for _ in range(n)]


@_fan_out.register_fake
def _(table, n):
    return [table.new_zeros(()).expand(table.shape) for _ in range(n)]


def _fan_out_context(ctx, inputs, output):
    ctx.table_shape = inputs[0].shape


def _fan_out_grads(ctx, grads):
    grads = [g for g in grads if g is not None]  # a stand-in that no read used
    if not grads:
        return None, None
    rows, row_grads = torch.ops.pkmlm.sum_row_sparse(grads)
    return row_sparse(rows, row_grads, ctx.table_shape), None


_fan_out.register_autograd(_fan_out_grads, setup_context=_fan_out_context)


@torch.library.custom_op("pkmlm::sum_row_sparse", mutates_args=())
def _sum_row_sparse(grads: list[Tensor]) -> tuple[Tensor, Tensor]:
    """The sum of row-sparse gradients (rows, dim) as its distinct rows (U,) int64 increasing and their summed
    gradients (U, dim). Added as autograd adds the gradients of one tensor's users (the last one's first, each
    sparse add summing a row's values in that order), so that sharing a table through share_table leaves eager
    numbers unchanged."""
    total = grads[-1]
    for grad in reversed(grads[:-1]):
        total = total + grad
    total = coalesce_rows(total)
    rows, row_grads = total._indices()[0], total._values()
    # A custom op's outputs may not alias its inputs (one gradient alone, or a sum that kept one's tensors).
    if any(row_grads.data_ptr() == g._values().data_ptr() or rows.data_ptr() == g._indices().data_ptr()
           for g in grads):
        rows, row_grads = rows.clone(), row_grads.clone()
    return rows, row_grads


@_sum_row_sparse.register_fake
def _(grads):
    rows = torch.library.get_ctx().new_dynamic_size()
    return grads[0].new_empty(rows, dtype=torch.long, layout=torch.strided), \
        grads[0].new_empty(rows, grads[0].shape[1], layout=torch.strided)


def _init_keys(shape: tuple[int, ...], scale: float, kind: str) -> Tensor:
    """Keys of `shape` with entries of variance scale**2 / 3 (that of U(+-scale)), drawn as `kind`."""
    if kind == "uniform":
        return torch.empty(shape).uniform_(-scale, scale)
    std = scale / 3**0.5
    if kind == "normal":
        return torch.randn(shape) * std
    keys = torch.empty(shape)
    rows, cols = shape[-2:]
    for matrix in keys.view(-1, rows, cols):
        nn.init.orthogonal_(matrix)  # entries' mean square: min(rows, cols) / (rows * cols)
    return keys * (std / (min(rows, cols) / (rows * cols)) ** 0.5)


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _check_positive(**sizes) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_shared_values(values, n_keys: int, v_dim: int, sparse: bool) -> None:
    # Besides nn.EmbeddingBag, any table with read(slots, weights), write_rows(rows, values), weight,
    # num_embeddings, embedding_dim and sparse will do (pkmlm.memory.value_table.ShardedValueTable).
    readable = callable(getattr(values, "read", None)) and callable(getattr(values, "write_rows", None))
    if not (isinstance(values, nn.EmbeddingBag) or readable) or values.mode != "sum":
        raise ValueError("values must be an nn.EmbeddingBag with mode='sum' (use make_value_table)")
    shape = (values.num_embeddings, values.embedding_dim)
    if shape != (n_keys**2, v_dim):
        raise ValueError(f"values has shape {shape}, this memory needs "
                         f"(n_keys**2, v_dim) = ({n_keys**2}, {v_dim})")
    if values.sparse != sparse:
        raise ValueError(f"values.sparse is {values.sparse} but sparse={sparse}: build the shared "
                         f"table with make_value_table(..., sparse={sparse})")
