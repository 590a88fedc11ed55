"""Evaluate checkpoints: exact perplexity per split, inference speed, and memory-usage metrics.

    row = evaluate_checkpoint("runs/tiny_pkm", splits=["valid", "test"])   # one dict per model

The loss is ``evaluate_loss``, which the training loop's validation also uses (every token once, token-weighted, summed over ranks), so a row's
validation perplexity is the one the training loop logged at the same checkpoint. Memory metrics are streamed into
each layer's usage histograms (no per-token storage), all-reduced over ranks, then turned into
``pkmlm.memory.metrics.MemoryStats``. Every rank must call ``evaluate_checkpoint``; the rows are the same on all of them.
Row keys are documented in docs/evaluation.md.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule

from pkmlm import checkpoint as ckpt, distributed as D
from pkmlm.cli import UserError
from pkmlm.config import Config
from pkmlm.data.shards import open_split
from pkmlm.data.stream import eval_batches
from pkmlm.eval.qa import QAError, encode_qa, load_qa, score_qa
from pkmlm.eval.textcodec import TextCodec, load_codec
from pkmlm.memory import compile_model
from pkmlm.memory.metrics import memory_stats, per_head_stats
from pkmlm.memory.value_table import local_state, sharded_tables
from pkmlm.memory.values_file import ValuesFileError, attach, load_model_state
from pkmlm.models.lora import LoraUnavailable, apply_lora
from pkmlm.models.transformer import TransformerLM
from pkmlm.precision import autocast


def perplexity(loss: float) -> float:
    """exp(mean NLL in nats); inf for a non-finite loss or one too large for a float (no OverflowError)."""
    return math.exp(loss) if math.isfinite(loss) and loss < 700 else math.inf


class EvaluationError(UserError):
    """Bad evaluation input: no checkpoint in a run directory, a checkpoint that does not fit its config."""


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the newest step checkpoint of a run directory (best.pt only when named)."""
    path = Path(path)
    if path.is_dir():
        latest = ckpt.latest_checkpoint(path)
        if latest is None:
            best = ckpt.best_path(path)
            raise EvaluationError(f"{path} is a directory without checkpoints ({ckpt.checkpoint_dir(path)}/step_*.pt): "
                                  + (f"pass {best} itself" if best.is_file() else
                                     "pass a run directory that has trained, or a checkpoint file"))
        return latest
    if not path.exists():
        raise EvaluationError(f"{path} does not exist: pass a checkpoint file or a run directory")
    return path


def load_model(state: dict, path: Path, device: torch.device) -> TransformerLM:
    """The model of checkpoint dict ``state`` (read from ``path``, named in errors), in eval mode on ``device``."""
    config = Config.from_dict(state["config"], source=f"{path} (saved config)")
    saved_vocab = state["model"].get("tok_emb.weight")
    if saved_vocab is None:
        raise EvaluationError(f"{path} holds no token embedding (tok_emb.weight): not a TransformerLM checkpoint")
    model = TransformerLM(config, saved_vocab.shape[0])
    if config.train.trainable == "lora":  # the adapters the run trained (pkmlm/models/lora.py), then its weights
        try:
            apply_lora(model, rank=config.train.lora_rank, alpha=config.train.lora_alpha)
        except LoraUnavailable as e:
            raise EvaluationError(f"{path}: {e}") from None
    weights = state["model"]
    if config.memory.values_file:  # the table is mapped copy-on-write as of the checkpoint's step, never loaded
        try:
            vf = attach(model, config.memory.values_file, writable=False)
            vf.check_record(state.get("values_file"), path)
            vf.overlay(state["step"])
        except ValuesFileError as e:
            raise EvaluationError(str(e)) from None
    try:
        if config.memory.values_file:
            load_model_state(model, weights, vf)
        else:
            model.load_state_dict(local_state(model, weights))  # a sharded table keeps its columns
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise EvaluationError(f"{path}: its weights do not fit its saved config ({first})") from None
    return model.to(device).eval()


@dataclass
class TrainedModel:
    """A checkpoint ready for use: its model (eval mode), config, the run's text codec and data directory."""
    model: TransformerLM
    config: Config
    codec: TextCodec
    data_dir: Path
    checkpoint: Path
    step: int


def load_trained(path: str | os.PathLike, *, data_dir: str | os.PathLike | None = None,
                 device: torch.device | None = None) -> TrainedModel:
    """The checkpoint (or newest checkpoint of the run directory) ``path`` with the tokenizer of its data.

    data_dir: the prepared data directory (default: the ``data.dir`` saved in the checkpoint); its tokenizer
    must have the checkpoint's vocabulary. Raises EvaluationError, CheckpointError, ConfigError, DataError.
    """
    path = find_checkpoint(path)
    state = ckpt.load_checkpoint(path)
    config = Config.from_dict(state["config"], source=f"{path} (saved config)")
    root = Path(data_dir or config.data.dir)
    codec = load_codec(root, vocab_hash=state["vocab_hash"])
    model = load_model(state, path, device or torch.device("cpu"))
    return TrainedModel(model, config, codec, root, path, state["step"])


def evaluate_checkpoint(path: str | os.PathLike, *, splits: list[str], data_dir: str | None = None,
                        batch_size: int = 0, per_head: bool = False, device: torch.device | None = None,
                        qa: str | os.PathLike | None = None, compile: bool = False) -> dict:
    """One table row for the checkpoint (or newest checkpoint of the run directory) ``path``.

    splits: split names under the data directory (``data_dir``, default the saved ``data.dir``); memory metrics
    are measured on the first. batch_size: rows (B, bptt) per forward on each rank (0: the training loop's
    validation batch). qa: a QA .jsonl file (pkmlm/eval/qa.py) to score too: qa_acc, qa_logprob.
    compile: the forward compiled with torch.compile (tokens_per_s then includes compiling).
    Keys: docs/evaluation.md.
    """
    if not splits:
        raise EvaluationError("no split to evaluate: pass --split valid,test")
    if batch_size < 0:
        raise EvaluationError(f"batch size must be >= 0 (0: the training loop's), got {batch_size}")
    device = device or torch.device("cpu")
    path = find_checkpoint(path)
    state = ckpt.load_checkpoint(path)
    config = Config.from_dict(state["config"], source=f"{path} (saved config)")
    root = Path(data_dir or config.data.dir)
    # Every split is opened (and its vocabulary checked) before any forward, so bad input fails fast.
    corpora = {s: open_split(root / s, expected_vocab_hash=state["vocab_hash"], require_tokens="evaluation")
               for s in splits}
    qa_items = None
    if qa is not None:  # read and encoded before any forward, so a bad file fails fast
        try:
            qa_items = encode_qa(load_qa(qa), load_codec(root, vocab_hash=state["vocab_hash"]),
                                 config.model.max_seq_len)
        except QAError as e:
            raise EvaluationError(str(e)) from None
    model = load_model(state, path, device)
    forward = compile_model(model) if compile else model  # metrics and counts read `model` itself
    world = D.world_size()
    rows_per_batch = batch_size or max(1, config.data.batch_size // (world * config.train.grad_accum))

    counts = model.num_parameters()
    row = {"name": _run_name(path), "checkpoint": str(path), "step": state["step"],
           "params_total": counts["total"], "params_memory_values": counts["memory_values"],
           "params_active": counts["active_per_token"]}
    memories = model.memories()
    timings = []  # (tokens, seconds, tracked) per split
    for i, (split, corpus) in enumerate(corpora.items()):
        track = i == 0  # histograms from the first split only
        for _, m in memories:
            m.track_usage(track)
            if track:
                m.reset_usage()
        _sync(device)
        start = time.perf_counter()
        loss, accuracy = evaluate_split(forward, corpus, batch_size=rows_per_batch, bptt=config.data.bptt,
                                        precision=config.train.precision)
        _sync(device)
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
        # Ranks run in parallel: the split took as long as the slowest rank.
        D.all_reduce_max(elapsed)
        timings.append((corpus.num_tokens, elapsed.item(), track))
        row[f"{split}_loss"] = loss
        row[f"{split}_ppl"] = perplexity(loss)
        row[f"{split}_acc"] = accuracy
        if track:
            row["memory_split"] = split
            # Flat "{memory}/{metric}" (and "{memory}/head{h}/{metric}") columns, summed over ranks.
            row.update({f"{name}/{k}": v for name, stats in memory_metrics(model, per_head).items()
                        for k, v in stats.items()})
    for _, m in memories:
        m.track_usage(False)
    # Speed from the splits read without usage tracking (histogram updates are not inference work), when any.
    timed = [(n, sec) for n, sec, tracked in timings if not tracked] or [(n, sec) for n, sec, _ in timings]
    tokens, seconds = sum(n for n, _ in timed), sum(sec for _, sec in timed)
    row["tokens_per_s"] = tokens / seconds if seconds > 0 else math.inf
    if qa_items is not None:
        row["qa_file"] = str(qa)
        row.update(score_qa(model, qa_items, batch_size=rows_per_batch, precision=config.train.precision))
    return row


def evaluate_loss(model: nn.Module, corpus, *, batch_size: int, bptt: int, max_batches: int = 0,
                  precision: str = "fp32") -> float:
    """Exact token-weighted mean NLL (nats) of ``model`` over ``corpus``; perplexity = exp of it.

    Every token of the split is predicted once (``eval_batches``), split over ranks when a process group
    is up and summed over them. ``max_batches`` > 0 evaluates only each rank's first batches.
    batch_size: rows (B, bptt) per forward on each rank.
    """
    return evaluate_split(model, corpus, batch_size=batch_size, bptt=bptt, max_batches=max_batches,
                          precision=precision)[0]


@torch.no_grad()
def evaluate_split(model: nn.Module, corpus, *, batch_size: int, bptt: int, max_batches: int = 0,
                   precision: str = "fp32") -> tuple[float, float]:
    """``evaluate_loss``'s mean NLL and the next-token accuracy (fraction of targets that are the argmax)."""
    rank, world = D.rank(), D.world_size()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # NLL sum, target count, correct
    batches = eval_batches(corpus, batch_size=batch_size, bptt=bptt, rank=rank, world_size=world)
    if world > 1 and (sharded_tables(model) or isinstance(model, FSDPModule)):  # forwards that need every rank
        batches = _in_lockstep(batches, corpus.num_tokens, batch_size * bptt, bptt, device)
    for i, (inputs, targets) in enumerate(batches):
        if max_batches and i == max_batches:
            break
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast(device, precision):
            logits = model(inputs)
        totals[0] += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                                     reduction="sum")
        totals[1] += (targets != -100).sum()
        # argmax is never -100, so padding never counts as correct.
        totals[2] += (logits.argmax(-1) == targets).sum()
    model.train(was_training)
    D.all_reduce_sum(totals)
    return (totals[0] / totals[1]).item(), (totals[2] / totals[1]).item()


def memory_metrics(model: nn.Module, per_head: bool = False) -> dict[str, dict]:
    """Metrics of every memory from its usage histograms, summed over ranks (all ranks must call).

    {memory name: MemoryStats as a dict}; with per_head, also "head{h}/{metric}" keys for every head.
    """
    return histogram_metrics(usage_histograms(model), per_head)


def usage_histograms(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """{memory name: {"counts", "weights"}}: each memory's usage histograms (heads, slots) float64 summed
    over ranks (all ranks must call; tracking must be on)."""
    out = {}
    for name, memory in model.memories():
        hist = memory.usage()
        out[name] = {"counts": D.all_reduce_sum(hist["counts"]), "weights": D.all_reduce_sum(hist["weights"])}
    return out


def histogram_metrics(histograms: dict[str, dict[str, torch.Tensor]], per_head: bool = False) -> dict[str, dict]:
    """``memory_metrics`` of histograms from ``usage_histograms``."""
    out = {}
    for name, hist in histograms.items():
        counts, weights = hist["counts"], hist["weights"]
        out[name] = memory_stats(counts, weights).to_dict()
        if per_head:
            for h, stats in enumerate(per_head_stats(counts, weights)):
                out[name].update({f"head{h}/{k}": v for k, v in stats.to_dict().items()})
    return out


def _in_lockstep(batches, num_tokens: int, batch_tokens: int, bptt: int, device: torch.device):
    """``batches``, then empty (0, bptt) ones until every rank has had as many: a sharded value table reads in
    collectives (and FSDP gathers weights), so every rank must run the same number of forwards (parts differ by a
    token, so by a batch)."""
    rank, world = D.rank(), D.world_size()
    mine = -(-((rank + 1) * num_tokens // world - rank * num_tokens // world) // batch_tokens)
    most = int(D.all_reduce_max(torch.tensor([mine], device=device)))
    yield from batches
    empty = torch.empty(0, bptt, dtype=torch.long)
    for _ in range(most - mine):
        yield empty, empty


def _run_name(path: Path) -> str:
    # runs/NAME/checkpoints/step_X.pt -> NAME; a loose checkpoint file is named by its stem.
    return path.parent.parent.name if path.parent.name == "checkpoints" else path.stem


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
