"""Start a memory model from a checkpoint trained without memory (Kim & Jung 2020 found this crucial).

    report = init_from_checkpoint(model, "runs/dense/checkpoints/step_0100000.pt", vocab_hash=data.vocab_hash)
    print(report.summary())

Every weight whose name exists in both models is copied (its shape must match); the memory's parameters, which the
dense model lacks, keep their own initialisation; weights only the source has (the FFN a "replace" memory removed)
are ignored. Names line up because memories are added as new modules (``blocks.{i}.memory``,
``blocks.{i}.after_memory``, ``blocks.{i}.after_norm``) next to the dense model's. Only weights are taken:
optimizer state, step and data position start afresh.

A memory the checkpoint does not have, placed ``parallel`` to an FFN or ``after`` a block, starts as an exact
no-op, so the step-0 model computes the source model's function bit for bit (a retrofit starts where the
pretrained model is): the last layer that writes its output is zeroed, the output projection ``out_proj``
(Memory+ ``gated``, or ``v_dim`` != d_model), else the value table (as ``memory.value_init=zero``). Gradient
reaches that zeroed layer at once, and the rest of the memory from the first update on, like LoRA's zero B.
A ``replace`` memory keeps its own initialisation (it stands in for an FFN; nothing it could do is a no-op), and
so does a table that a memory outside this rule also reads (shared values) or that lives in a file
(``memory.values_file``: zeroing would rewrite all of it); the report says which memories were silenced.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pkmlm import checkpoint as ckpt
from pkmlm.config import Config
from pkmlm.memory import ProductKeyMemory
from pkmlm.memory.value_table import local_state


class InitFromError(ValueError):
    """The source checkpoint does not fit the model (a shape differs, no weight in common, another vocabulary)."""


@dataclass
class InitReport:
    source: str
    copied: list[str]  # in both, copied exactly
    new: list[str]  # only in the model: left as initialised (the memories)
    ignored: list[str]  # only in the source: not used
    silenced: list[str] = field(default_factory=list)  # new parallel/after memories, output zeroed at the start

    def summary(self) -> str:
        def names(items):
            return ", ".join(items) if items else "none"
        return (f"init from {self.source}: copied {len(self.copied)} tensors; new {len(self.new)} "
                f"({names(self.new)}); ignored {len(self.ignored)} ({names(self.ignored)}); silenced "
                f"{len(self.silenced)} memories, exact no-ops at step 0 ({names(self.silenced)})")


def init_from_checkpoint(model: nn.Module, path: str | os.PathLike, *, vocab_hash: str | None = None) -> InitReport:
    """Copy into ``model`` every weight of checkpoint ``path`` whose name it shares; returns what was done.

    vocab_hash: the training data's vocabulary; a checkpoint trained on another one is refused.
    Raises InitFromError naming the parameter when a shared name has another shape, or the model.* block option
    (BLOCK_OPTIONS: norm, position_encoding, ffn, ...) that differs from the source's saved config.
    """
    path = Path(path)
    state = ckpt.load_checkpoint(path)
    if vocab_hash is not None:
        ckpt.check_vocab(state["vocab_hash"], vocab_hash, path)
    _check_block_options(model, state, path)
    source, target = local_state(model, state["model"]), model.state_dict()  # sharded tables: this rank's columns
    for name in source.keys() & target.keys():
        if source[name].shape != target[name].shape:
            raise InitFromError(
                f"cannot initialise from {path}: parameter {name} has shape {tuple(source[name].shape)} there and "
                f"{tuple(target[name].shape)} in this model; the model sizes and block options (model.d_model, "
                f"model.n_layers, model.ffn_mult / ffn_hidden / ffn, model.n_kv_heads, model.head_dim, "
                f"model.max_seq_len, vocabulary) must match the source run's")
    copied = [n for n in target if n in source]
    if not copied:
        raise InitFromError(f"{path} shares no weight name with this model: it is not a checkpoint of this "
                            "architecture")
    model.load_state_dict({n: source[n] for n in copied}, strict=False)  # in place: parameters keep their identity
    new = [n for n in target if n not in source]
    return InitReport(source=str(path), copied=copied, new=new, ignored=[n for n in source if n not in target],
                      silenced=silence_new_memories(model, set(new)))


# Options that change what the same weights compute without changing their shapes: a difference would load every
# tensor and silently build another function (e.g. LayerNorm reading RMSNorm weights, RoPE weights without RoPE).
BLOCK_OPTIONS = ("norm", "norm_eps", "position_encoding", "rope_theta", "ffn", "n_kv_heads", "head_dim", "bias",
                 "attn_qkv_bias", "attn_qk_norm", "tie_embeddings")


def _check_block_options(model: nn.Module, state: dict, path: Path) -> None:
    config = getattr(model, "config", None)
    if not isinstance(config, Config) or "config" not in state:
        return
    saved = Config.from_dict(state["config"], source=f"{path} (saved config)").model  # old files: defaults
    for key in BLOCK_OPTIONS:
        theirs, ours = _effective(saved, key), _effective(config.model, key)
        if theirs != ours:
            theirs, ours = getattr(saved, key), getattr(config.model, key)
            raise InitFromError(f"cannot initialise from {path}: model.{key} is {theirs!r} there and {ours!r} in this "
                                f"config; set model.{key}={_yaml(theirs)} (the block options must match the source's)")


def _effective(m, key: str):
    """The value a block option acts with (0 and null resolved), so equivalent spellings are not refused."""
    if key == "n_kv_heads":
        return m.kv_heads()
    if key == "head_dim":
        return m.head_size()
    if key == "attn_qkv_bias":
        return m.bias if m.attn_qkv_bias is None else m.attn_qkv_bias
    return getattr(m, key)


def _yaml(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def silence_new_memories(model: nn.Module, new: set[str]) -> list[str]:
    """Zero the output of every memory placed parallel or after whose weights are all in ``new`` (names of
    model.state_dict()); returns their module names. See the module docstring for which layer is zeroed."""
    memories = [(name, m) for name, m in model.named_modules() if isinstance(m, ProductKeyMemory)]
    readers: dict[int, list[str]] = {}  # value table -> the memories that read it
    for name, m in memories:
        readers.setdefault(id(m.values.weight), []).append(name)
    chosen = []
    for name, m in memories:
        parent = model.get_submodule(name.rpartition(".")[0])
        beside_ffn = name.endswith(".after_memory") or getattr(parent, "ffn", None) is not None
        if beside_ffn and all(f"{name}.{key}" in new for key in m.state_dict()):
            chosen.append(name)
    silenced = []
    with torch.no_grad():
        for name in chosen:
            m = model.get_submodule(name)
            if m.out_proj is not None:
                m.out_proj.weight.zero_()
                if m.out_proj.bias is not None:
                    m.out_proj.bias.zero_()
            elif set(readers[id(m.values.weight)]) <= set(chosen) and not _file_backed(m.values.weight):
                m.values.weight.zero_()
            else:
                continue
            silenced.append(name)
    return silenced


def _file_backed(weight: torch.Tensor) -> bool:
    """A value table mapped from memory.values_file (or still its meta placeholder): never rewritten here."""
    return weight.is_meta or not weight.untyped_storage().resizable()  # torch.from_file storage is fixed-size
