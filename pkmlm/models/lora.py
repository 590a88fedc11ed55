"""LoRA adapters (Hu et al. 2021) on a TransformerLM's attention and FFN projections, through peft.

    apply_lora(model, rank=8, alpha=16.0)    # in place; only the adapters stay trainable

Targets: every ``nn.Linear`` whose qualified name matches ``LORA_TARGETS`` (the Linear modules under a block's
``attn`` and ``ffn``, whatever their names: qkv/proj, q_proj/k_proj/..., fc/gate/up/down), never the memory's
query network. peft keeps the wrapped layer's weight under ``<name>.base_layer.weight`` and adds
``<name>.lora_A.default.weight`` (rank, in) and ``<name>.lora_B.default.weight`` (out, rank), B zero at the
start, so the model's function is unchanged until the first step. The training loop applies it for
``train.trainable=lora`` and evaluation applies it again to load such a checkpoint (pkmlm/eval/evaluation.py).
peft is an optional extra (``pip install -e .[lora]``), imported only here, only when called.
"""

from __future__ import annotations

import re

from torch import nn

from pkmlm.cli import UserError

LORA_TARGETS = re.compile(r"blocks\.\d+\.(attn|ffn)\..+")


class LoraUnavailable(UserError, RuntimeError):
    """peft is not installed."""


def lora_targets(model: nn.Module) -> list[str]:
    """Qualified names of the nn.Linear modules the adapters go on, in module order."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and LORA_TARGETS.fullmatch(name)]


def apply_lora(model: nn.Module, *, rank: int, alpha: float) -> list[str]:
    """Wrap ``model``'s attention and FFN Linear layers with LoRA adapters of ``rank``, scaled alpha / rank.

    Every other parameter is frozen (requires_grad False). Returns the wrapped module names. Draws the A
    matrices from torch's global generator (seed before calling for reproducible adapters)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise LoraUnavailable("train.trainable=lora needs peft: pip install -e .[lora]") from None
    targets = lora_targets(model)
    if not targets:
        raise ValueError("the model has no attention or FFN Linear layer to put LoRA adapters on")
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets), model)
    return targets
