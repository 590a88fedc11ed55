"""Language-model batches from a `TokenCorpus`: shuffled training windows and ordered evaluation.

A window is a contiguous slice of `bptt + 1` tokens of the split's stream (documents joined by eos):
inputs are its first `bptt` tokens, targets its last `bptt`. Window i starts at token `i * bptt`,
so consecutive windows share one token and every token is a target in exactly one window.
"""

from __future__ import annotations

import numpy as np
import torch

from pkmlm.data import DataError
from pkmlm.data.shards import TokenCorpus

_MASK64 = (1 << 64) - 1


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """A keyed 64-bit hash (splitmix64 finaliser) of each element of `x` (uint64)."""
    with np.errstate(over="ignore"):
        z = (x + key) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def permute(positions: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
    """The images of `positions` (int64, in [0, n)) under a keyed pseudo-random permutation of [0, n).

    A Feistel network is a bijection on [0, 2**bits) for any round function; "cycle walking"
    (re-applying it to values >= n) turns that into a bijection on [0, n). So any slice of the
    permutation costs O(slice) memory, however many windows the corpus has.
    """
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)

    def feistel(x):
        left, right = x >> shift, x & mask
        for key in keys:
            left, right = right, left ^ (_mix(right, key) & mask)
        return (left << shift) | right

    y = feistel(positions.astype(np.uint64))
    outside = y >= n
    while outside.any():  # 2**(2*half) < 4n, so on average fewer than 4 rounds of walking
        y[outside] = feistel(y[outside])
        outside = y >= n
    return y.astype(np.int64)


class TrainStream:
    """Infinite iterator of LongTensor `(batch_size // world_size, bptt + 1)`: this rank's rows.

    Step s of epoch e reads global windows `permute(e)[s*B : (s+1)*B]`, a seeded permutation that
    is independent of `world_size`; rank r takes rows `[r*B/W, (r+1)*B/W)`. So 1 and N processes
    see the same global batches, and the ranks are disjoint and together complete. An epoch is
    `num_windows // batch_size` steps; the leftover windows differ every epoch.
    """

    def __init__(self, corpus: TokenCorpus, *, batch_size: int, bptt: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        if bptt < 1 or batch_size < 1:
            raise DataError(f"bptt and batch_size must be positive, got bptt={bptt}, "
                            f"batch_size={batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside [0, world_size={world_size})")
        if batch_size % world_size:
            raise DataError(f"batch_size {batch_size} does not divide by world_size {world_size}: "
                            f"use a multiple of {world_size}")
        self.corpus, self.batch_size, self.bptt = corpus, batch_size, bptt
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_windows = max(0, (corpus.num_tokens - 1) // bptt)
        self.steps_per_epoch = self.num_windows // batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"{corpus.split_dir} has {corpus.num_tokens} tokens = "
                            f"{self.num_windows} windows of bptt={bptt}, fewer than one batch of "
                            f"{batch_size}: use a smaller batch_size or bptt, or more data")
        self.step = 0  # global batches consumed so far, over all epochs

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def _epoch_keys(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).integers(0, 1 << 63, size=4, dtype=np.uint64)

    def windows(self, step: int) -> np.ndarray:
        """Window indices `(batch_size // world_size,)` of this rank's rows at global step `step`."""
        epoch, s = divmod(step, self.steps_per_epoch)
        rows = self.batch_size // self.world_size
        positions = s * self.batch_size + self.rank * rows + np.arange(rows, dtype=np.int64)
        return permute(positions, self.num_windows, self._epoch_keys(epoch))

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        rows = [self.corpus.read(int(w) * self.bptt, self.bptt + 1) for w in self.windows(self.step)]
        self.step += 1
        return torch.from_numpy(np.stack(rows))

    def state_dict(self) -> dict:
        """Plain-type position; valid for any world_size with the same global batch."""
        return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size,
                "bptt": self.bptt, "num_tokens": self.corpus.num_tokens}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "batch_size", "bptt", "num_tokens"):
            if state.get(key) != mine[key]:
                raise DataError(f"cannot resume the data stream: {key} was {state.get(key)} and is "
                                f"now {mine[key]}; resume with the original data and settings")
        self.step = int(state["step"])


def eval_batches(corpus: TokenCorpus, *, batch_size: int, bptt: int, rank: int = 0,
                 world_size: int = 1):
    """Finite iterator of `(inputs, targets)` LongTensor `(B, bptt)`, B <= batch_size, in order.

    Every token of the split is a target exactly once: the first token is predicted from an eos
    (the start of a document), and rank r predicts tokens `[r*N//W, (r+1)*N//W)`. The last window is
    padded (inputs with eos, targets with -100) and the last batch may have fewer rows.
    """
    if bptt < 1 or batch_size < 1:
        raise DataError(f"bptt and batch_size must be positive, got bptt={bptt}, "
                        f"batch_size={batch_size}")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside [0, world_size={world_size})")
    n = corpus.num_tokens
    first, last = rank * n // world_size, (rank + 1) * n // world_size  # targets [first, last)
    per_batch = batch_size * bptt
    for start in range(first, last, per_batch):
        count = min(per_batch, last - start)
        # Input of target t is token t - 1; for t = 0 it is the eos that precedes the split.
        if start == 0:
            seq = np.concatenate([[corpus.eos_id], corpus.read(0, count)])
        else:
            seq = corpus.read(start - 1, count + 1)
        rows = -(-count // bptt)
        inputs = np.full(rows * bptt, corpus.eos_id, dtype=np.int64)
        targets = np.full(rows * bptt, -100, dtype=np.int64)
        inputs[:count], targets[:count] = seq[:-1], seq[1:]
        yield torch.from_numpy(inputs.reshape(rows, bptt)), torch.from_numpy(targets.reshape(rows, bptt))
