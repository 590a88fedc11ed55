import math

import pytest
import torch

from pkmlm.memory.metrics import gini, kl_from_uniform, memory_stats, per_head_stats, slots_holding, usage_fraction


def test_uniform_histogram_has_full_usage_and_zero_kl():
    hist = torch.full((64,), 3.0)
    stats = memory_stats(hist, hist)
    assert stats.usage == 1.0
    assert stats.kl_counts == pytest.approx(0.0, abs=1e-12)
    assert stats.kl_weights == pytest.approx(0.0, abs=1e-12)
    assert stats.gini_weights == pytest.approx(0.0, abs=1e-12)
    assert (stats.slots_50, stats.slots_90, stats.slots_99) == (32, 58, 64)


def test_single_slot_histogram_has_kl_log_slots():
    hist = torch.zeros(1000)
    hist[17] = 5.0
    stats = memory_stats(hist, hist)
    assert stats.usage == pytest.approx(1 / 1000)
    assert stats.kl_counts == pytest.approx(math.log(1000))
    assert stats.gini_weights == pytest.approx(999 / 1000)
    assert (stats.slots_50, stats.slots_90, stats.slots_99) == (1, 1, 1)


def test_kl_and_gini_match_direct_formulas_on_random_histogram():
    torch.manual_seed(0)
    hist = torch.rand(200).double() * (torch.rand(200) > 0.3)
    p = hist / hist.sum()
    expected_kl = sum(pi * math.log(pi * 200) for pi in p.tolist() if pi > 0)
    assert kl_from_uniform(hist) == pytest.approx(expected_kl, rel=1e-10)
    # Gini as mean absolute difference over all pairs / (2 * mean).
    x = hist.tolist()
    mad = sum(abs(a - b) for a in x for b in x) / (len(x) ** 2)
    assert gini(hist) == pytest.approx(mad / (2 * sum(x) / len(x)), rel=1e-10)
    assert usage_fraction(hist) == pytest.approx((hist > 0).float().mean().item())


def test_slots_holding_counts_heaviest_slots():
    hist = torch.tensor([1.0, 6.0, 0.0, 3.0])
    assert slots_holding(hist, 0.5) == 1  # 6 of 10
    assert slots_holding(hist, 0.9) == 2  # 9 of 10
    assert slots_holding(hist, 0.99) == 3
    assert slots_holding(hist, 1.0) == 3


def test_heads_are_merged_for_usage_and_kept_apart_per_head():
    counts = torch.zeros(2, 8)
    counts[0, 0] = 4
    counts[1, 1] = 4
    merged = memory_stats(counts, counts)
    assert merged.usage == pytest.approx(2 / 8)
    assert merged.kl_counts == pytest.approx(math.log(4))
    heads = per_head_stats(counts, counts)
    assert [h.usage for h in heads] == [pytest.approx(1 / 8)] * 2
    assert heads[0].kl_counts == pytest.approx(math.log(8))


def test_streaming_sums_equal_one_shot():
    torch.manual_seed(1)
    chunks = [torch.randint(0, 50, (300,)) for _ in range(4)]
    streamed = sum(torch.bincount(c, minlength=50).double() for c in chunks)
    one_shot = torch.bincount(torch.cat(chunks), minlength=50).double()
    assert memory_stats(streamed, streamed) == memory_stats(one_shot, one_shot)


def test_empty_histogram_gives_nan_not_an_error():
    stats = memory_stats(torch.zeros(10), torch.zeros(10))
    assert stats.usage == 0.0
    assert math.isnan(stats.kl_counts) and math.isnan(stats.gini_weights)
    assert stats.slots_50 == 0


@pytest.mark.parametrize(
    "hist, message",
    [(torch.zeros(2, 2, 2), "1-D"), (torch.zeros(0), "no slots"), (torch.tensor([1.0, -1.0]), "negative")],
)
def test_bad_histograms_are_rejected(hist, message):
    with pytest.raises(ValueError, match=message):
        kl_from_uniform(hist)


def test_mismatched_shapes_and_bad_fraction_are_rejected():
    with pytest.raises(ValueError, match="differ in shape"):
        memory_stats(torch.ones(4), torch.ones(5))
    with pytest.raises(ValueError, match="fraction"):
        slots_holding(torch.ones(4), 0.0)
