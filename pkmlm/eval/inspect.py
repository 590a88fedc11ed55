"""Look into a trained memory: which slots are read most, in which contexts, and what each token of a text reads.

    python -m pkmlm.inspect runs/tiny_pkm --layer blocks.2.memory [--split valid] [--top 20] [--contexts 5]
        [--width 6] [--by reads|weight] [--max-tokens N] [--json slots.json]
    python -m pkmlm.inspect runs/tiny_pkm --layer blocks.2.memory --text "The prime minister said" [--top 8]

Split mode streams the split through the model (every token once, in windows of data.bptt as evaluation
reads it) and, for the chosen memory layer, adds up per slot the tokens that read it and the softmax weight they
gave it (heads merged: a slot is a row of the value table, whichever head picks it). For each slot it keeps the
`--contexts` tokens that gave it the most weight, so memory stays bounded by slots x contexts whatever the
split's size. It prints the `--top` slots, each with its contexts: `--width` tokens either side of the
reading token, marked [[like this]], within its document. The model predicts the token after the marked one.

Text mode prints, for each token of the text, the slots it reads with the largest weights (heads merged; a
weight is the share of the token's read, so a token's weights over all its slots sum to 1).
Exit status: 0 done, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pkmlm import cli
from pkmlm.cli import UserError
from pkmlm.data.shards import open_split
from pkmlm.data.stream import eval_batches
from pkmlm.distributed import detect_env, resolve_device
from pkmlm.eval.evaluation import TrainedModel, load_trained
from pkmlm.fileio import write_text_atomic
from pkmlm.memory import ProductKeyMemory
from pkmlm.memory.kernels import enabled as kernels_enabled


class InspectError(UserError, ValueError):
    """Bad inspector input: an unknown layer, a bad count."""


@dataclass
class Context:
    position: int  # index of the reading token in the split
    weight: float  # its weight on the slot, heads merged (share of its read)
    text: str  # the context with the reading token marked [[so]]


@dataclass
class SlotRecord:
    slot: int
    subkeys: tuple[int, int]  # (i1, i2): slot = i1 * n_keys + i2
    reads: int  # tokens that read the slot (with any head)
    weight: float  # summed weight those tokens gave it
    contexts: list[Context] = field(default_factory=list)  # heaviest first


@dataclass
class SlotReport:
    layer: str
    checkpoint: str
    step: int
    split: str
    tokens: int  # tokens read
    slots: int
    slots_read: int  # slots read at least once
    by: str  # "reads" | "weight": how `top` is ordered
    top: list[SlotRecord]


def find_memory(model, layer: str) -> ProductKeyMemory:
    """The memory layer named `layer` (as model.memories() names it); InspectError listing the others."""
    memories = dict(model.memories())
    if layer in memories:
        return memories[layer]
    if not memories:
        raise InspectError("this model has no memory layer (memory.positions is empty)")
    close = difflib.get_close_matches(layer, list(memories), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise InspectError(f"no memory layer {layer!r}: {hint}available: {', '.join(memories)}")


class _Capture:
    """Forward pre-hook that keeps a module's input of the last forward."""

    def __init__(self, module):
        self.input = None
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.input = args[0].detach()


@torch.no_grad()
def slot_report(run: TrainedModel, layer: str, *, split: str = "valid", top: int = 20, contexts: int = 5,
                width: int = 6, by: str = "reads", max_tokens: int = 0, batch_size: int = 16) -> SlotReport:
    """The `top` slots of memory `layer` over split `split` of the run's data (see the module docstring).

    max_tokens > 0 reads only the split's first tokens.
    """
    if top < 1 or contexts < 0 or width < 0 or max_tokens < 0 or batch_size < 1:
        raise InspectError(f"--top ({top}) and --batch-size ({batch_size}) must be >= 1, --contexts ({contexts}), "
                           f"--width ({width}) and --max-tokens ({max_tokens}) >= 0")
    if by not in ("reads", "weight"):
        raise InspectError(f"--by must be reads or weight, got {by!r}")
    memory = find_memory(run.model, layer)
    corpus = open_split(run.data_dir / split, expected_vocab_hash=run.codec.tokenizer.vocab_hash)
    device = next(run.model.parameters()).device
    n_slots, bptt = memory.n_keys**2, run.config.data.bptt
    limit = min(corpus.num_tokens, max_tokens or corpus.num_tokens)
    reads = torch.zeros(n_slots, dtype=torch.float64, device=device)
    weight = torch.zeros(n_slots, dtype=torch.float64, device=device)
    # Per slot, the `contexts` heaviest reads so far: weight (-inf = none yet) and position.
    best_w = torch.full((n_slots, max(contexts, 1)), float("-inf"), device=device)
    best_pos = torch.full((n_slots, max(contexts, 1)), -1, dtype=torch.long, device=device)
    capture = _Capture(memory)
    try:
        start = 0
        for inputs, targets in eval_batches(corpus, batch_size=batch_size, bptt=bptt):
            if start >= limit:
                break
            run.model(inputs.to(device))
            # The input at flat index i of this batch is token start + i - 1 (the first one: the eos before the split).
            pos = start - 1 + torch.arange(inputs.numel(), device=device)
            keep = (targets.flatten().to(device) != -100) & (pos >= 0) & (pos < limit)
            start += inputs.numel()
            slots, w = memory.reads(capture.input.flatten(0, -2)[keep])  # (N, heads, knn)
            pos = pos[keep]
            # Heads merged: one entry per (token, slot), weights summed over the heads that picked it.
            key = (torch.arange(len(pos), device=device).view(-1, 1, 1) * n_slots + slots).flatten()
            key, inverse = key.unique(return_inverse=True)
            w = torch.zeros(len(key), device=device).index_add_(0, inverse, w.flatten()) / memory.heads
            slot, pos = key % n_slots, pos[key // n_slots]
            reads.index_add_(0, slot, torch.ones_like(slot, dtype=torch.float64))
            weight.index_add_(0, slot, w.double())
            if contexts:
                _merge_best(best_w, best_pos, slot, w, pos)
    finally:
        capture.handle.remove()
    order = (reads if by == "reads" else weight).argsort(descending=True, stable=True)[:top].tolist()
    records = []
    for s in order:
        if reads[s] == 0:
            break
        found = [(p, w) for p, w in zip(best_pos[s].tolist(), best_w[s].tolist()) if p >= 0][:contexts]
        records.append(SlotRecord(s, divmod(s, memory.n_keys), int(reads[s]), weight[s].item(),
                                  [Context(p, w, render_context(run.codec, corpus, p, width)) for p, w in found]))
    return SlotReport(layer, str(run.checkpoint), run.step, split, limit, n_slots, int((reads > 0).sum()), by, records)


def _merge_best(best_w, best_pos, slot, w, pos) -> None:
    """Merge new reads (slot, w, pos), each (M,), into each slot's heaviest `best_w.shape[1]` reads."""
    touched = slot.unique()
    c = best_w.shape[1]
    # Old best of the touched slots and the new reads, grouped by slot, heaviest first within a slot.
    all_slot = torch.cat([touched.repeat_interleave(c), slot])
    all_w = torch.cat([best_w[touched].flatten(), w])
    all_pos = torch.cat([best_pos[touched].flatten(), pos])
    order = all_w.argsort(descending=True, stable=True)
    order = order[all_slot[order].argsort(stable=True)]
    all_slot, all_w, all_pos = all_slot[order], all_w[order], all_pos[order]
    _, counts = all_slot.unique_consecutive(return_counts=True)
    rank = torch.arange(len(all_slot), device=slot.device) - (counts.cumsum(0) - counts).repeat_interleave(counts)
    keep = rank < c
    best_w[all_slot[keep], rank[keep]] = all_w[keep]
    best_pos[all_slot[keep], rank[keep]] = all_pos[keep]


def render_context(codec, corpus, position: int, width: int) -> str:
    """Text of tokens position-width .. position+width of `corpus`, cut at document ends, the token marked."""
    lo = max(0, position - width)
    ids = corpus.read(lo, min(corpus.num_tokens, position + width + 1) - lo).tolist()
    i = position - lo
    left, token, right = ids[:i], ids[i], ids[i + 1:]
    if codec.eos_id in left:
        left = left[len(left) - left[::-1].index(codec.eos_id):]
    if codec.eos_id in right:
        right = right[:right.index(codec.eos_id)]
    marked = "</s>" if token == codec.eos_id else codec.decode([token])
    return " ".join(part for part in (codec.decode(left), f"[[{marked}]]", codec.decode(right)) if part)


@torch.no_grad()
def text_reads(run: TrainedModel, layer: str, text: str, *, top: int = 8) -> list[dict]:
    """For each token of `text` (after the end-of-document token it follows): its piece and its `top`
    heaviest slots as [slot, weight] (heads merged; weights are shares of the token's read).

    Texts longer than data.bptt are read in consecutive windows of data.bptt tokens, as evaluation does.
    """
    if top < 1:
        raise InspectError(f"--top must be >= 1, got {top}")
    memory = find_memory(run.model, layer)
    device = next(run.model.parameters()).device
    ids = [run.codec.eos_id] + run.codec.encode(text)
    window, n_slots = run.config.data.bptt, memory.n_keys**2
    rows = []
    capture = _Capture(memory)
    try:
        for i in range(0, len(ids), window):
            chunk = ids[i:i + window]
            run.model(torch.tensor([chunk], device=device))
            slots, w = memory.reads(capture.input.flatten(0, -2))  # (T, heads, knn)
            for t, token in enumerate(chunk):
                merged = torch.zeros(n_slots, device=device).index_add_(0, slots[t].flatten(), w[t].flatten())
                weights, best = (merged / memory.heads).topk(min(top, n_slots))
                rows.append({"position": i + t, "token": token, "piece": run.codec.piece(token),
                             "slots": [[s, w] for s, w in zip(best.tolist(), weights.tolist()) if w > 0]})
    finally:
        capture.handle.remove()
    return rows


def format_report(report: SlotReport) -> str:
    lines = [f"{report.layer} of {report.checkpoint} (step {report.step}), {report.split} split: "
             f"{report.tokens:,} tokens; {report.slots_read:,} of {report.slots:,} slots read "
             f"({report.slots_read / report.slots:.1%}); top {len(report.top)} by {report.by}",
             "", f"{'slot':>8} {'(i1, i2)':>11} {'reads':>9} {'of tokens':>9} {'weight':>9} {'mean w':>7}"]
    for r in report.top:
        lines.append(f"{r.slot:>8} {str(r.subkeys):>11} {r.reads:>9,} {r.reads / report.tokens:>9.2%} "
                     f"{r.weight:>9.2f} {r.weight / r.reads:>7.3f}")
        lines += [f"{'':>10}{c.weight:.3f}  {table_text(c.text)}" for c in r.contexts]
    return "\n".join(lines)


def table_text(text: str) -> str:
    """``text`` on one line of a table: line breaks, tabs and other control characters escaped (\\n, \\t, ...),
    backslashes doubled so the escapes stay unambiguous. JSON keeps the text as it is."""
    return "".join(ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii")
                   for ch in text.replace("\\", "\\\\"))


def format_text_reads(rows: list[dict]) -> str:
    width = max([len(table_text(r["piece"])) for r in rows] + [5])
    lines = [f"{'pos':>4}  {'token':<{width}}  slots read (slot:weight, heads merged, heaviest first)"]
    for r in rows:
        slots = "  ".join(f"{s}:{w:.3f}" for s, w in r["slots"])
        lines.append(f"{r['position']:>4}  {table_text(r['piece']):<{width}}  {slots}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pkmlm.inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    parser.add_argument("--layer", required=True, help="memory layer, e.g. blocks.2.memory (a wrong name lists them)")
    parser.add_argument("--split", default="valid", help="split to read (default valid)")
    parser.add_argument("--text", help="show the slots each token of this text reads, instead of a split's top slots")
    parser.add_argument("--top", type=int, help="slots to list (default 20); with --text, slots per token (default 8)")
    parser.add_argument("--contexts", type=int, default=5, help="contexts shown per slot, heaviest first (default 5)")
    parser.add_argument("--width", type=int, default=6, help="tokens either side of a context's token (default 6)")
    parser.add_argument("--by", default="reads", choices=("reads", "weight"),
                        help="order slots by tokens reading them or by summed weight (default reads)")
    parser.add_argument("--max-tokens", type=int, default=0, help="read only the split's first N tokens (0: all)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward (default 16)")
    parser.add_argument("--json", type=Path, help="also write the result as JSON to this file")
    parser.add_argument("--data-dir", help="prepared data directory (default: the data.dir saved in the checkpoint)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    return cli.run(lambda: _run(args))


def _run(args) -> int:
    kernels_enabled()  # a bad PKMLM_CPU_KERNELS is reported before any work
    text_arg = cli.check_text(args.text, "--text") if args.text is not None else None
    if args.json is not None:
        cli.check_output_file(args.json, "--json")
    run = load_trained(args.path, data_dir=args.data_dir, device=resolve_device(args.device, detect_env()))
    find_memory(run.model, args.layer)  # a wrong name fails before reading any data
    top = args.top if args.top is not None else 8 if text_arg is not None else 20
    if text_arg is not None:
        result = text_reads(run, args.layer, text_arg, top=top)
        text, payload = format_text_reads(result), {"layer": args.layer, "checkpoint": str(run.checkpoint),
                                                    "step": run.step, "tokens": result}
    else:
        report = slot_report(run, args.layer, split=args.split, top=top, contexts=args.contexts,
                             width=args.width, by=args.by, max_tokens=args.max_tokens, batch_size=args.batch_size)
        text, payload = format_report(report), asdict(report)
    print(text)
    if args.json:
        write_text_atomic(args.json, json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
