"""Start a memory model from a checkpoint trained without memory (Kim & Jung 2020 found this crucial).

    report = init_from_checkpoint(model, "runs/dense/checkpoints/step_0100000.pt", vocab_hash=data.vocab_hash)
    print(report.summary())

Every weight whose name exists in both models is copied (its shape must match); the memory's parameters, which the
dense model lacks, keep their own initialisation; weights only the source has (the FFN a "replace" memory removed)
are ignored. Names line up because memories are added as new modules (``blocks.{i}.memory``,
``blocks.{i}.after_memory``, ``blocks.{i}.after_norm``) next to the dense model's. Only weights are taken:
optimizer state, step and data position start afresh.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from pkmlm import checkpoint as ckpt
from pkmlm.memory.value_table import local_state


class InitFromError(ValueError):
    """The source checkpoint does not fit the model (a shape differs, no weight in common, another vocabulary)."""


@dataclass
class InitReport:
    source: str
    copied: list[str]  # in both, copied exactly
    new: list[str]  # only in the model: left as initialised (the memories)
    ignored: list[str]  # only in the source: not used

    def summary(self) -> str:
        def names(items):
            return ", ".join(items) if items else "none"
        return (f"init from {self.source}: copied {len(self.copied)} tensors; new {len(self.new)} "
                f"({names(self.new)}); ignored {len(self.ignored)} ({names(self.ignored)})")


def init_from_checkpoint(model: nn.Module, path: str | os.PathLike, *, vocab_hash: str | None = None) -> InitReport:
    """Copy into ``model`` every weight of checkpoint ``path`` whose name it shares; returns what was done.

    vocab_hash: the training data's vocabulary; a checkpoint trained on another one is refused.
    Raises InitFromError naming the parameter when a shared name has another shape.
    """
    path = Path(path)
    state = ckpt.load_checkpoint(path)
    if vocab_hash is not None:
        ckpt.check_vocab(state["vocab_hash"], vocab_hash, path)
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
    return InitReport(source=str(path), copied=copied, new=[n for n in target if n not in source],
                      ignored=[n for n in source if n not in target])
