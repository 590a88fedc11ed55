"""Sampling text from a trained model: temperature, top-k, top-p, a KV cache, and a bounded context window.

    new = generate(model, prompt_ids, max_new_tokens=100, window=config.data.bptt, seeds=[0, 1])

The model runs in eval mode, where every memory layer and FFN works on each token alone (BatchNorm uses its
running statistics), so only attention needs the past: the KV cache (pkmlm.models.transformer.KVCache) holds it, and each
new token costs one position's forward. Learned positions were trained on windows of `data.bptt` tokens, so
the model never sees more than `window` tokens: the prompt's last `window`, and when a sample fills the
window, its context drops to the last `window // 2` tokens (re-encoded into a fresh cache) and grows again.
A RoPE model (model.position_encoding=rope) has no such bound: its cache slides (sliding-window attention, each
layer's query sees the last `window` keys at their absolute positions) and nothing is re-encoded.
Without the cache every step re-reads the same context from scratch (for RoPE: from the prompt's window on, in
chunks of `window` through a fresh sliding cache), so both give the same tokens (tested).

On the CPU the one-token steps run with the thread count `ThreadTuner` (pkmlm/eval/threads.py) measures on
the first steps (or `threads`); encoding the prompt keeps torch's default.

Randomness comes only from one CPU torch.Generator per sample, seeded with that sample's seed: the same
seed gives the same text on any device, and sample i of a batch equals a single sample with seed i.

Under a process group ``generate`` is a collective: every rank calls it with the same prompt and seeds, and every
rank continues with rank 0's tokens (one broadcast per token). So all ranks run the same forwards in lockstep,
which a model with sharded value tables needs (each forward is collective there: pkmlm/memory/value_table.py),
and the number of forwards cannot differ between ranks even if their logits differed in the last bit.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pkmlm import distributed as D
from pkmlm.eval.threads import ThreadTuner
from pkmlm.cli import UserError
from pkmlm.models.transformer import KVCache
from pkmlm.precision import autocast


class SamplingError(UserError, ValueError):
    """An invalid sampling option (temperature, top-k, top-p, lengths)."""


def check_options(*, max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """SamplingError naming the first invalid option and its valid range."""
    if max_new_tokens < 0:
        raise SamplingError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if not temperature >= 0:
        raise SamplingError(f"--temperature must be >= 0 (0: always the most likely token), got {temperature}")
    if top_k < 0:
        raise SamplingError(f"--top-k must be >= 0 (0: off), got {top_k}")
    if not 0 < top_p <= 1:
        raise SamplingError(f"--top-p must be in (0, 1] (1: off), got {top_p}")


def candidates(logits: Tensor, *, temperature: float, top_k: int = 0, top_p: float = 1.0) -> tuple[Tensor, Tensor]:
    """(N, V) logits -> (probs (N, K), ids (N, K)): the tokens that can be drawn (most likely first when
    filtered; the vocabulary in order when not) and their probabilities after temperature, top-k, then top-p
    (nucleus); dropped tokens get probability 0.

    temperature 0 puts all mass on the most likely token (K = 1). top_k keeps the k most likely tokens (0: all);
    top_p keeps the fewest most likely tokens whose probability sums to at least top_p (1: all). With top-k the
    rest of the work is on K = top_k columns, not the vocabulary: drawing from 40 tokens instead of 16,000 is
    what makes a sampling step cheap next to the model's forward.
    """
    logits = logits.float()
    if temperature == 0:
        ids = logits.argmax(-1, keepdim=True)
        return torch.ones(ids.shape), ids
    if 0 < top_k < logits.shape[-1]:
        values, ids = logits.topk(top_k, dim=-1)  # sorted, most likely first
    elif top_p < 1:
        values, ids = logits.sort(dim=-1, descending=True)
    else:
        values, ids = logits, torch.arange(logits.shape[-1]).expand_as(logits)
    probs = (values / temperature).softmax(-1)
    if top_p < 1:
        # A token is dropped when the more likely ones before it already hold top_p.
        drop = probs.cumsum(-1) - probs >= top_p
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs, ids


def next_token_probs(logits: Tensor, *, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """(N, V) logits -> (N, V) float32 probabilities after temperature, top-k, then top-p: `candidates`
    scattered over the whole vocabulary."""
    probs, ids = candidates(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return torch.zeros(logits.shape).scatter_(-1, ids, probs)


@torch.no_grad()
def generate(model: nn.Module, prompt: list[int], *, max_new_tokens: int, window: int, seeds: list[int],
             temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95, use_cache: bool = True,
             stop_id: int | None = None, precision: str = "fp32", threads: int | ThreadTuner = 0) -> list[list[int]]:
    """One continuation of `prompt` (non-empty list of ids) per seed: its new ids, at most `max_new_tokens`.

    A sample ends at `stop_id` (the end of document; not included). `window`: the most positions the model
    sees (at most its max_seq_len); see the module docstring. The model's train/eval mode is restored.
    threads: CPU threads of the one-token steps (0: measured on the first steps), or a ThreadTuner to use
    and read back (its `chosen`); torch's own count is restored on return.
    Under a process group every rank must call it alike (see the module docstring).
    """
    check_options(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    if not prompt:
        raise SamplingError("the prompt has no tokens: start it with the end-of-document id")
    if not 1 <= window <= model.max_seq_len:
        raise SamplingError(f"window must be in [1, model.max_seq_len={model.max_seq_len}], got {window}")
    device = next(model.parameters()).device
    tuner = threads if isinstance(threads, ThreadTuner) else ThreadTuner(threads)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    seq = torch.tensor([prompt] * len(seeds), dtype=torch.long, device=device)  # (N, L)
    start = max(0, seq.shape[1] - window)  # first position of the context
    cache, cache_start = None, -1
    done = torch.zeros(len(seeds), dtype=torch.bool)
    new: list[list[int]] = [[] for _ in seeds]
    was_training = model.training
    sliding = getattr(model, "rope", False)  # RoPE: the cache slides; no restart, nothing re-encoded
    model.eval()
    try:
        for _ in range(max_new_tokens):
            if not sliding and seq.shape[1] - start > window:
                start = seq.shape[1] - max(1, window // 2)
            with autocast(device, precision):
                if not use_cache and sliding:
                    scratch = KVCache(len(model.blocks), window)
                    logits = torch.cat([model(c, scratch) for c in seq[:, start:].split(window, dim=1)], dim=1)
                elif not use_cache:
                    logits = model(seq[:, start:])
                elif cache is None or cache_start != start:  # a fresh cache over the new context
                    cache, cache_start = KVCache(len(model.blocks), window if sliding else None), start
                    logits = model(seq[:, start:], cache)
                elif device.type == "cpu":
                    with tuner.step():
                        logits = model(seq[:, -1:], cache)
                else:
                    logits = model(seq[:, -1:], cache)
            probs, ids = candidates(logits[:, -1].cpu(), temperature=temperature, top_k=top_k, top_p=top_p)
            token = torch.cat([i[torch.multinomial(p, 1, generator=g)] for p, i, g in zip(probs, ids, generators)])
            if D.world_size() > 1:  # rank 0's choice for everyone: the ranks' next forwards stay the same
                token = D.broadcast(token.to(device)).cpu()
            for i, t in enumerate(token.tolist()):
                if not done[i]:
                    if t == stop_id:
                        done[i] = True
                    else:
                        new[i].append(t)
            if done.all():
                break
            seq = torch.cat([seq, token.view(-1, 1).to(device)], dim=1)
    finally:
        tuner.restore()
        model.train(was_training)
    return new


class ValidationSamples:
    """Samples from fixed prompts for TensorBoard at every validation.

    The prompts are the openings (`prompt_tokens` ids) of the first `count` documents of the validation
    split, so they suit any corpus and stay the same for the whole run; the seed is fixed too, so only the
    model changes from one validation to the next. Sampling uses its own generators: training's random
    state is untouched. Under a process group every rank builds one and calls ``texts`` (``generate`` is a
    collective there); ranks that log nothing pass ``codec=None`` and get no text back.
    """

    def __init__(self, codec, corpus, *, window: int, count: int = 3, prompt_tokens: int = 12,
                 new_tokens: int = 48, seed: int = 0, precision: str = "fp32"):
        self.codec, self.window, self.new_tokens, self.seed = codec, window, new_tokens, seed
        self.precision, self.eos_id = precision, corpus.eos_id
        head = corpus.read(0, min(corpus.num_tokens, 64 * prompt_tokens * count)).tolist()
        docs, doc = [], []
        for t in head:
            if t == corpus.eos_id:
                docs.append(doc)
                doc = []
            else:
                doc.append(t)
        docs.append(doc)
        self.prompts = [[corpus.eos_id] + d[:prompt_tokens] for d in docs if d][:count]

    def texts(self, model: nn.Module) -> dict[str, str]:
        """{"samples/i": prompt and continuation as text} for every prompt ({} without a codec)."""
        out = {}
        for i, prompt in enumerate(self.prompts):
            new = generate(model, prompt, max_new_tokens=self.new_tokens, window=self.window, seeds=[self.seed],
                           stop_id=self.eos_id, precision=self.precision)[0]
            if self.codec is not None:
                out[f"samples/{i}"] = f"{self.codec.decode(prompt)} ▶ {self.codec.decode(new)}"
        return out
