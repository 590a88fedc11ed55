"""Training and evaluation batches: window coverage, rank disjointness, exact resume."""

import numpy as np
import pytest
import torch

from pkmlm.data import DataError
from pkmlm.data.shards import open_split, write_split
from pkmlm.data.stream import TrainStream, eval_batches, permute


@pytest.fixture
def corpus(tmp_path):
    # Token t of the stream has id t % 997 (plus eos=0 between documents): windows are recognisable.
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=40)
    docs, t = [], 1
    for n in lengths:
        docs.append([(t + i) % 996 + 1 for i in range(n)])
        t += n
    write_split(tmp_path / "train", docs, vocab_size=1000, vocab_hash="h", eos_id=0, max_shard_tokens=100)
    return open_split(tmp_path / "train")


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4099])
def test_permute_is_a_permutation(n):
    keys = np.random.default_rng(n).integers(0, 1 << 63, size=4, dtype=np.uint64)
    assert sorted(permute(np.arange(n), n, keys).tolist()) == list(range(n))


def test_windows_are_contiguous_slices_and_an_epoch_covers_distinct_windows(corpus):
    stream = TrainStream(corpus, batch_size=4, bptt=16, seed=3)
    everything = corpus.read(0, corpus.num_tokens)
    seen = []
    for step in range(stream.steps_per_epoch):
        windows = stream.windows(step)
        batch = next(stream)
        assert batch.dtype == torch.int64 and batch.shape == (4, 17)
        for w, row in zip(windows, batch):
            assert row.tolist() == everything[w * 16:w * 16 + 17].tolist()
        seen.extend(windows.tolist())
    assert len(set(seen)) == len(seen) == stream.steps_per_epoch * 4
    assert max(seen) < stream.num_windows
    # The next epoch is a different order.
    assert stream.epoch == 1 and stream.windows(stream.step).tolist() != stream.windows(0).tolist()


def test_ranks_split_the_global_batch(corpus):
    single = TrainStream(corpus, batch_size=6, bptt=8, seed=1)
    ranks = [TrainStream(corpus, batch_size=6, bptt=8, seed=1, rank=r, world_size=3) for r in range(3)]
    for _ in range(single.steps_per_epoch + 2):  # crosses an epoch boundary
        assert torch.equal(next(single), torch.cat([next(r) for r in ranks]))


def test_seed_changes_order(corpus):
    a = TrainStream(corpus, batch_size=4, bptt=8, seed=0)
    b = TrainStream(corpus, batch_size=4, bptt=8, seed=1)
    assert not torch.equal(next(a), next(b))


def test_resume_gives_the_same_next_batches(corpus):
    ref = TrainStream(corpus, batch_size=4, bptt=8, seed=5)
    expected = [next(ref) for _ in range(30)]
    first = TrainStream(corpus, batch_size=4, bptt=8, seed=5)
    for _ in range(11):
        next(first)
    state = first.state_dict()
    # Resume on 2 ranks: together they continue the single-process sequence.
    resumed = [TrainStream(corpus, batch_size=4, bptt=8, seed=5, rank=r, world_size=2) for r in range(2)]
    for r in resumed:
        r.load_state_dict(state)
    for k in range(11, 30):
        assert torch.equal(torch.cat([next(r) for r in resumed]), expected[k])
    with pytest.raises(DataError, match="bptt was 8 and is now 16"):
        TrainStream(corpus, batch_size=4, bptt=16, seed=5).load_state_dict(state)


def test_bad_settings_are_clear_errors(corpus):
    with pytest.raises(DataError, match="does not divide by world_size 4"):
        TrainStream(corpus, batch_size=6, bptt=8, world_size=4)
    with pytest.raises(DataError, match="fewer than one batch"):
        TrainStream(corpus, batch_size=1000, bptt=64)
    with pytest.raises(DataError, match="rank 2"):
        TrainStream(corpus, batch_size=4, bptt=8, rank=2, world_size=2)


@pytest.mark.parametrize("world_size", [1, 3])
@pytest.mark.parametrize("batch_size,bptt", [(2, 5), (3, 64), (1, 1000)])
def test_eval_predicts_every_token_once_in_order(corpus, world_size, batch_size, bptt):
    everything = corpus.read(0, corpus.num_tokens).tolist()
    targets, pairs = [], []
    for rank in range(world_size):
        for x, y in eval_batches(corpus, batch_size=batch_size, bptt=bptt, rank=rank, world_size=world_size):
            assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape
            assert x.shape[0] <= batch_size and x.shape[1] == bptt
            real = y.flatten() != -100
            targets.extend(y.flatten()[real].tolist())
            pairs.extend(zip(x.flatten()[real].tolist(), y.flatten()[real].tolist()))
    assert targets == everything
    assert pairs == list(zip([corpus.eos_id] + everything[:-1], everything))
