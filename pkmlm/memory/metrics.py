"""Memory-access metrics computed from per-slot histograms.

A memory layer's usage accumulator (``ProductKeyMemory.track_usage``) adds every forward's slot indices and
softmax weights into histograms of shape ``(heads, n_keys**2)``. Histograms add up, so they stream over any amount
of data and all-reduce across ranks by summation; everything here is a pure function of them. The paper (Lample
et al., 2019, section 4.3) reports two of these: memory usage and the KL divergence from uniform.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

MASS_FRACTIONS = (0.5, 0.9, 0.99)


def usage_fraction(hist: torch.Tensor) -> float:
    """Fraction of slots read at least once. hist: (slots,) non-negative."""
    _check_hist(hist)
    return (hist > 0).double().mean().item()


def kl_from_uniform(hist: torch.Tensor) -> float:
    """KL(p || uniform) in nats, p = hist / hist.sum(); 0 for a uniform histogram, log(slots) for one slot.

    hist: (slots,) non-negative. NaN when the histogram is empty (nothing was read).
    """
    _check_hist(hist)
    total = hist.sum(dtype=torch.float64)
    if total <= 0:
        return math.nan
    p = hist.double() / total
    nonzero = p[p > 0]
    return (nonzero * torch.log(nonzero * hist.numel())).sum().item()


def gini(hist: torch.Tensor) -> float:
    """Gini coefficient of the slot distribution: 0 when every slot is equally used, (slots-1)/slots for one slot.

    hist: (slots,) non-negative. NaN when the histogram is empty.
    """
    _check_hist(hist)
    total = hist.sum(dtype=torch.float64)
    if total <= 0:
        return math.nan
    x = torch.sort(hist.double()).values
    n = x.numel()
    # Mean absolute difference form: G = sum_i (2i - n - 1) x_(i) / (n * sum x), i = 1..n over sorted x.
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    return ((2 * ranks - n - 1) * x).sum().item() / (n * total.item())


def slots_holding(hist: torch.Tensor, fraction: float) -> int:
    """Smallest number of slots whose mass reaches ``fraction`` of the total. hist: (slots,). 0 when empty."""
    _check_hist(hist)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    total = hist.sum(dtype=torch.float64)
    if total <= 0:
        return 0
    cumulative = torch.cumsum(torch.sort(hist.double(), descending=True).values, 0)
    # A small relative tolerance so that fraction=1.0 is reached despite float rounding of the cumulative sum.
    target = torch.tensor(fraction * total.item() * (1 - 1e-12), dtype=torch.float64)
    return int(torch.searchsorted(cumulative, target).item()) + 1


@dataclass
class MemoryStats:
    """The metrics of one memory (or one head): fractions in [0, 1], KL in nats."""

    usage: float  # fraction of slots read at least once
    kl_counts: float  # KL from uniform of the per-slot access counts
    kl_weights: float  # KL from uniform of the per-slot summed softmax weights
    gini_weights: float  # Gini coefficient of the per-slot summed weights
    slots_50: int  # slots holding 50 / 90 / 99 % of the weight mass
    slots_90: int
    slots_99: int

    def to_dict(self) -> dict:
        return asdict(self)


def memory_stats(counts: torch.Tensor, weights: torch.Tensor) -> MemoryStats:
    """Metrics of one memory from its histograms.

    counts, weights: (heads, slots) or (slots,). Heads are merged by summation: a slot counts as used when any
    head read it, which is the paper's memory usage.
    """
    if counts.shape != weights.shape:
        raise ValueError(f"counts {tuple(counts.shape)} and weights {tuple(weights.shape)} differ in shape")
    counts = counts.reshape(-1, counts.shape[-1]).sum(0)
    weights = weights.reshape(-1, weights.shape[-1]).sum(0)
    s50, s90, s99 = (slots_holding(weights, f) for f in MASS_FRACTIONS)
    return MemoryStats(
        usage=usage_fraction(counts),
        kl_counts=kl_from_uniform(counts),
        kl_weights=kl_from_uniform(weights),
        gini_weights=gini(weights),
        slots_50=s50,
        slots_90=s90,
        slots_99=s99,
    )


def per_head_stats(counts: torch.Tensor, weights: torch.Tensor) -> list[MemoryStats]:
    """``memory_stats`` of each head separately. counts, weights: (heads, slots)."""
    if counts.dim() != 2:
        raise ValueError(f"per-head stats need (heads, slots) histograms, got shape {tuple(counts.shape)}")
    return [memory_stats(c, w) for c, w in zip(counts, weights)]


def _check_hist(hist: torch.Tensor) -> None:
    if hist.dim() != 1:
        raise ValueError(f"expected a 1-D histogram (slots,), got shape {tuple(hist.shape)}")
    if hist.numel() == 0:
        raise ValueError("histogram has no slots")
    if bool((hist < 0).any()):
        raise ValueError("histogram has negative entries")
