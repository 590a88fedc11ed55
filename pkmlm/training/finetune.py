"""Fine-tuning modes: what trains (``train.freeze``, ``train.trainable``) and, for ``trainable=slots``, which
memory value rows each step updates (sparse memory fine-tuning, Lin et al. 2025, "Continual Learning via
Sparse Memory Finetuning").

    ft = FineTuning(model, config)      # before the optimizers: freezes parameters, adds LoRA adapters
    ft.start(out_dir, micro_rows, vocab_hash)  # after init-from / resume: background slot reads (slots mode)
    ft.begin_step(); forward/backward; sync grads; ft.select_rows(); clip; step

One mechanism decides what trains: a set of frozen *parts* of the model (docs/config.md):

    embeddings     token and position embeddings          attention   Linear layers under a block's attn
    ffn            Linear layers under a block's ffn        norms       LayerNorm/RMSNorm/BatchNorm outside memories
    dense          every parameter outside the memories (embeddings, attention, ffn, norms, ...)
    memory         every parameter of the memories (keys, query network, value tables, gate, output)
    memory_keys    the memories' (sub-)keys                 memory_values   the value tables

``trainable: all`` freezes the parts listed in ``freeze``; ``memory`` is ``freeze: [dense]``; ``slots`` freezes
everything but the value tables, and of those updates per step only the ``top_slots`` rows per table that the
batch reads most, relative to the background (TF-IDF below); ``lora`` freezes the whole model and trains LoRA
adapters on the attention and FFN projections (pkmlm/models/lora.py). A frozen parameter has
``requires_grad=False``: no gradient, no optimizer state, bitwise unchanged; a BatchNorm (a memory's query
norm) whose weight and bias are frozen also keeps its statistics (it normalises with them, as in evaluation).

TF-IDF of slot s in a step (per value table; heads, tokens and ranks summed):
    tf(s) = c(s) / sum c        c: reads of s in this step's global batch
    idf(s) = log((N + 1) / (b(s) + 1))   b: reads of s on the background, N = sum b
Rows with c(s) > 0 are ranked by tf * idf (ties: lower slot first) and the best ``top_slots`` keep their
gradient; the others' gradient is dropped before clipping, so RowAdam leaves their weights and moments alone.
The background counts are taken once, at the start of the fine-tuning run (eval mode, on ``background_tokens``
tokens of ``train.background``'s train split: each rank reads the start of its part of it), and cached in
``OUT_DIR/background_reads.pt``:
a resumed run reads them back and so selects exactly the rows an uninterrupted run would.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from pkmlm import distributed as D
from pkmlm.config import Config, ConfigError
from pkmlm.data import DataError
from pkmlm.data.shards import open_split
from pkmlm.data.stream import eval_batches
from pkmlm.fileio import atomic_open
from pkmlm.memory import ProductKeyMemory
from pkmlm.memory.sparse import coalesce_rows
from pkmlm.models.lora import LoraUnavailable, apply_lora
from pkmlm.precision import autocast

BACKGROUND_FILE = "background_reads.pt"
MEMORY_PARTS = ("memory", "memory_keys", "memory_values")


def parts_of(model: nn.Module) -> dict[str, set[str]]:
    """{part: the names of its parameters} for every part of FREEZE_PARTS (a parameter is in several parts)."""
    memories = [(name, m) for name, m in model.named_modules() if isinstance(m, ProductKeyMemory)]
    param_name = {id(p): n for n, p in model.named_parameters()}
    parts: dict[str, set[str]] = {p: set() for p in ("embeddings", "attention", "ffn", "norms", "dense", "memory",
                                                     "memory_keys", "memory_values")}
    for _, m in memories:
        parts["memory"] |= {param_name[id(p)] for p in m.parameters()}
        parts["memory_keys"].add(param_name[id(m.keys)])
        parts["memory_values"] |= {param_name[id(p)] for p in m.value_parameters()}
    for mod_name, module in model.named_modules():
        own = {param_name[id(p)] for p in module.parameters(recurse=False)} - parts["memory"]
        if isinstance(module, nn.Embedding):
            parts["embeddings"] |= own
        elif type(module).__name__.endswith("Norm") or isinstance(module, nn.modules.batchnorm._BatchNorm):
            parts["norms"] |= own
        segments = mod_name.split(".")
        if "attn" in segments:
            parts["attention"] |= own
        if "ffn" in segments:
            parts["ffn"] |= own
    parts["dense"] = set(param_name.values()) - parts["memory"]
    return parts


def frozen_names(model: nn.Module, config: Config) -> set[str]:
    """Names of the parameters that ``config``'s train.freeze / train.trainable freeze (lora: see apply_lora)."""
    t = config.train
    parts = parts_of(model)
    if t.trainable == "all":
        return set().union(*(parts[p] for p in t.freeze))
    if t.trainable == "memory":
        return parts["dense"]
    if t.trainable == "slots":
        return set(parts["dense"] | parts["memory"]) - parts["memory_values"]
    return set()


class FineTuning:
    """One run's fine-tuning mode: freezes parameters on construction; in slots mode, picks each step's rows."""

    def __init__(self, model: nn.Module, config: Config):
        self.model, self.config = model, config
        t = config.train
        self.mode = t.trainable
        self.lora_targets: list[str] = []
        if self.mode == "lora":
            try:
                self.lora_targets = apply_lora(model, rank=t.lora_rank, alpha=t.lora_alpha)
            except LoraUnavailable as e:
                raise ConfigError(str(e)) from None
        frozen = frozen_names(model, config)
        for name, p in model.named_parameters():
            if name in frozen:
                p.requires_grad_(False)
        self._hooks = []
        for m in model.modules():
            params = list(m.parameters(recurse=False))
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and params and not any(p.requires_grad for p in params):
                # A frozen BatchNorm keeps its statistics too: it normalises with them and never updates them.
                self._hooks.append(m.register_forward_pre_hook(_eval_mode))
        # slots: value tables (shared ones once) -> the memories reading them, keyed by the first one's name.
        self.tables: dict[str, tuple[nn.Parameter, list[ProductKeyMemory]]] = {}
        if self.mode == "slots":
            for name, m in model.named_modules():
                if isinstance(m, ProductKeyMemory):
                    weight = m.value_parameters()[0]
                    key = next((k for k, (w, _) in self.tables.items() if w is weight), name)
                    self.tables.setdefault(key, (weight, []))[1].append(m)
        self.background: dict[str, Tensor] = {}
        self.selected: dict[str, Tensor] = {}  # the rows the last step updated, per table (for tests and logs)

    # ---- what trains ---------------------------------------------------------------------------------------

    def summary(self) -> str:
        """One line for the run log: the mode and how many parameters train."""
        seen, total, trainable = set(), 0, 0
        for p in self.model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
                trainable += p.numel() if p.requires_grad else 0
        what = {"all": f"freeze {self.config.train.freeze}" if self.config.train.freeze else "everything",
                "memory": "the memories", "lora": f"LoRA adapters on {len(self.lora_targets)} projections",
                "slots": f"the top {self.config.train.top_slots} value rows per table and step (TF-IDF against "
                         f"{self.config.train.background})"}[self.mode]
        return f"fine-tuning: train.trainable={self.mode}, training {what}: {trainable:,} of {total:,} parameters " \
               "require grad"

    # ---- slots mode ----------------------------------------------------------------------------------------

    def start(self, out_dir: str | Path, micro_rows: int, vocab_hash: str | None = None) -> str | None:
        """Slots mode: load the cached background slot reads, or count them now (all ranks call). Returns a
        line for the log, None in other modes."""
        if self.mode != "slots":
            return None
        t = self.config.train
        path = Path(out_dir) / BACKGROUND_FILE
        device = self.tables[next(iter(self.tables))][0].device
        # Rank 0 decides whether the cache is there, so that every rank takes the same branch.
        cached = D.all_reduce_sum(torch.tensor([float(path.is_file()) if D.rank() == 0 else 0.0], device=device))
        if cached.item() > 0:
            state = torch.load(path, map_location="cpu", weights_only=True)
            expected = {"background": str(t.background), "background_tokens": t.background_tokens,
                        "tables": sorted(self.tables)}
            found = {k: state.get(k) for k in expected}
            if found != expected:
                raise ConfigError(f"{path} was counted for {found}, this run needs {expected}: delete it or use "
                                  "another train.out_dir")
            self.background = {k: v.to(device) for k, v in state["counts"].items()}
            return f"background slot reads from {path} ({state['tokens']:,} tokens of {t.background})"
        counts, tokens = background_reads(self.model, t.background, vocab_hash=vocab_hash,
                                          max_tokens=t.background_tokens,
                                          batch_size=micro_rows, bptt=self.config.data.bptt,
                                          precision=t.precision, tables=self.tables)
        self.background = counts
        if D.rank() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(path, "wb") as f:
                torch.save({"background": str(t.background), "background_tokens": t.background_tokens,
                            "tables": sorted(self.tables), "tokens": tokens,
                            "counts": {k: v.cpu() for k, v in counts.items()}}, f)
        return f"counted background slot reads on {tokens:,} tokens of {t.background}, cached in {path}"

    def begin_step(self) -> None:
        """Slots mode: start counting this step's reads from zero."""
        for _, memories in self.tables.values():
            for m in memories:
                m.count_reads(True)

    @torch.no_grad()
    def select_rows(self) -> None:
        """Slots mode, after the gradients are synced over ranks: keep the value gradient of each table's
        ``top_slots`` best TF-IDF rows only (all ranks call; they agree, as counts are summed over ranks)."""
        for key, (weight, memories) in self.tables.items():
            counts = sum(m.take_read_counts() for m in memories)
            counts = D.all_reduce_sum(counts)
            rows = top_tfidf(counts, self.background[key], self.config.train.top_slots)
            self.selected[key] = rows
            if weight.grad is None:
                continue
            grad = coalesce_rows(weight.grad)
            have = grad._indices()[0]
            keep = torch.isin(have, rows.to(have.device))
            weight.grad = torch.sparse_coo_tensor(have[keep].unsqueeze(0), grad._values()[keep], grad.shape,
                                                  is_coalesced=True, check_invariants=False)


def _eval_mode(module: nn.Module, _inputs) -> None:
    module.eval()


def top_tfidf(counts: Tensor, background: Tensor, top: int) -> Tensor:
    """The (at most) ``top`` slots with the highest tf * idf among those read in ``counts`` (slots,), sorted.

    idf from ``background`` (slots,) read counts: log((N + 1) / (b + 1)), N its sum. Ties: lower slot first."""
    counts, background = counts.double(), background.double().to(counts.device)
    read = counts > 0
    if not read.any():
        return torch.zeros(0, dtype=torch.long, device=counts.device)
    idf = torch.log((background.sum() + 1) / (background + 1))
    score = torch.where(read, counts / counts.sum() * idf, torch.tensor(-math.inf, dtype=torch.float64,
                                                                           device=counts.device))
    order = torch.argsort(score, descending=True, stable=True)
    return order[:min(top, int(read.sum()))].sort().values


@torch.no_grad()
def background_reads(model: nn.Module, data_dir: str | Path, *, vocab_hash: str | None, max_tokens: int,
                     batch_size: int, bptt: int, precision: str,
                     tables: dict[str, tuple[nn.Parameter, list[ProductKeyMemory]]]) -> tuple[dict[str, Tensor], int]:
    """Slot read counts (slots,) float64 per table over ``max_tokens`` (0: all) tokens of ``data_dir``'s train
    split (each rank the start of its part), model in eval mode, summed over ranks (all ranks call).
    Returns (counts, tokens read)."""
    try:
        corpus = open_split(Path(data_dir) / "train", expected_vocab_hash=vocab_hash,
                            require_tokens="background counting")
    except DataError as e:
        raise ConfigError(f"train.background: {e}") from None
    n = corpus.num_tokens if max_tokens == 0 else min(max_tokens, corpus.num_tokens)
    memories = [m for _, ms in tables.values() for m in ms]
    device = memories[0].keys.device
    was_training = model.training
    model.eval()
    for m in memories:
        m.count_reads(True)
    rank, world = D.rank(), D.world_size()
    share = n * (rank + 1) // world - n * rank // world  # this rank's part of the first n tokens
    done = 0
    for inputs, targets in eval_batches(corpus, batch_size=batch_size, bptt=bptt, rank=rank, world_size=world):
        if done >= share:
            break
        with autocast(device, precision):
            model(inputs.to(device))
        done += int((targets != -100).sum())
    counts = {k: D.all_reduce_sum(sum(m.take_read_counts() for m in ms)) for k, (_, ms) in tables.items()}
    for m in memories:
        m.count_reads(False)
    model.train(was_training)
    total = D.all_reduce_sum(torch.tensor([done], device=device)).item()
    return counts, int(total)
