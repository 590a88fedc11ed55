"""Dead-slot re-initialisation: give memory slots that training stopped reading a fresh start.

Product-key memories can lose slots for good: a slot no query selects gets no gradient, so nothing brings it
back ("dying keys", reported for product-key memories in vision models and fixed there by re-initialising unused
key-value pairs). Every ``memory.reinit_every`` steps, ``DeadSlotReinit``:

- re-draws the value rows of slots read fewer than ``memory.reinit_min_count`` times in the window (all heads, all
  ranks, and every memory that shares the table), and zeroes their row-Adam state (moments and step count);
- re-draws the sub-keys that were in no top-knn of their half in the window, and zeroes their Adam moments
  (AdamW keeps one step count per tensor, so theirs goes on; the zeroed moments make the next update a fresh one).

Everything else (live slots, the query network, BatchNorm statistics, other optimizer state) is left alone.
Decisions come from histograms summed over ranks and new values from a CPU generator seeded by (seed, step), so
every rank does the same thing without communication beyond the all-reduce. docs/evaluation.md says more.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pkmlm import distributed as D
from pkmlm.memory.metrics import usage_fraction
from pkmlm.training.optim import Optimizers


class DeadSlotReinit:
    """The window's usage histograms and the re-initialisation policy for every memory of ``model``.

    The trainer calls ``after_step(step)`` after every optimizer step, and ``track()`` whenever something else
    (validation) has used the layers' usage accumulators.
    """

    def __init__(self, model: nn.Module, optim: Optimizers, *, every: int, min_count: int, seed: int):
        if every < 1 or min_count < 1:
            raise ValueError(f"reinit every and min_count must be >= 1, got every={every}, min_count={min_count}")
        self.memories = model.memories()
        if not self.memories:
            raise ValueError("dead-slot re-initialisation needs a model with memories (memory.positions)")
        if any(m.flat for _, m in self.memories):
            raise ValueError("dead-slot re-initialisation needs product keys (memory.flat=false)")
        self.optim, self.every, self.min_count, self.seed = optim, every, min_count, seed
        # Memories sharing one value table decide together: a slot is dead only if no sharer read it.
        self.tables: dict[str, list[str]] = {}
        owner: dict[int, str] = {}
        for name, m in self.memories:
            first = owner.setdefault(id(m.value_parameters()[0]), name)
            self.tables.setdefault(first, []).append(name)
        self.slot_counts = {name: torch.zeros(m.n_keys**2, dtype=torch.float64, device=m.keys.device)
                            for name, m in self.memories}
        self.subkey_counts = {name: torch.zeros(m.heads, 2, m.n_keys, dtype=torch.float64, device=m.keys.device)
                              for name, m in self.memories}
        self.last_reset: dict[str, Tensor] = {}  # table -> slots re-initialised last time (CPU LongTensor)
        self.track()

    def after_step(self, step: int) -> dict[str, dict] | None:
        """``observe()`` then ``maybe_reinit(step)``: the one call per training step."""
        self.observe()
        return self.maybe_reinit(step)

    def track(self) -> None:
        """Turn the layers' usage accumulators on and zero them (what the window reads from)."""
        for _, m in self.memories:
            m.track_usage(True)
            m.reset_usage()

    @torch.no_grad()
    def observe(self) -> None:
        """Add the layers' usage since the last call to this rank's window and zero the accumulators."""
        for name, m in self.memories:
            hist = m.usage()
            self.slot_counts[name] += hist["counts"].sum(0)
            self.subkey_counts[name] += hist["subkey_counts"]
            m.reset_usage()

    @torch.no_grad()
    def maybe_reinit(self, step: int) -> dict[str, dict] | None:
        """At every ``every``-th step: re-initialise, start a new window, and return per table
        ``{"usage", "dead_slots", "dead_subkeys", "revived"}`` (usage: fraction of slots read >= min_count times in
        the window; revived: fraction of the slots re-initialised last time that this window read). Else None.
        All ranks must call it at the same steps."""
        if step % self.every:
            return None
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        memories = dict(self.memories)
        report = {}
        for table, sharers in self.tables.items():
            counts = D.all_reduce_sum(sum(self.slot_counts[n] for n in sharers)).cpu()
            dead = (counts < self.min_count).nonzero().flatten()
            revived = self.last_reset.get(table)
            memories[table].reinit_slots(dead, generator)
            if dead.numel():
                self.optim.reset_rows(memories[table].value_parameters()[0], dead)
            dead_subkeys = 0
            for name in sharers:
                m = memories[name]
                if not m.keys.requires_grad:  # frozen keys (memory.learn_keys=false) are left as drawn
                    continue
                mask = D.all_reduce_sum(self.subkey_counts[name]).cpu() == 0  # (heads, 2, n_keys)
                dead_subkeys += int(mask.sum())
                m.reinit_subkeys(mask, generator)
                if mask.any():
                    self.optim.reset_rows(m.keys, mask)
            self.last_reset[table] = dead
            report[table] = {
                "usage": usage_fraction((counts >= self.min_count).double()),
                "dead_slots": int(dead.numel()),
                "dead_subkeys": dead_subkeys,
                "revived": (counts[revived] >= self.min_count).double().mean().item()
                if revived is not None and revived.numel() else float("nan"),
            }
        for c in (*self.slot_counts.values(), *self.subkey_counts.values()):
            c.zero_()
        return report

    # ---- checkpoints: the window, so that a resumed run re-initialises the same slots --------------------------

    def state_dict(self) -> dict:
        """The window summed over ranks (every rank must call; the same dict on all)."""
        return {"slot_counts": {n: D.all_reduce_sum(c.clone()).cpu() for n, c in self.slot_counts.items()},
                "subkey_counts": {n: D.all_reduce_sum(c.clone()).cpu() for n, c in self.subkey_counts.items()},
                "last_reset": dict(self.last_reset)}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``; the summed window goes to rank 0 only, so the next all-reduce counts it once."""
        main = D.rank() == 0
        for name in self.slot_counts:
            for key, mine in (("slot_counts", self.slot_counts), ("subkey_counts", self.subkey_counts)):
                saved = state[key][name]
                mine[name].copy_(saved if main else torch.zeros_like(saved))
        self.last_reset = dict(state["last_reset"])
