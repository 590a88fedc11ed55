"""Knowledge QA scoring: exact-match accuracy of the greedy answer and log-likelihood of the right answer.

    records = load_qa("data/facts_src/qa_test.jsonl")       # [{"prompt" or "question", "answer", ...}]
    scores = score_qa(model, encode_qa(records, codec, max_len), batch_size=32)
    scores["qa_acc"], scores["qa_logprob"]

A record's prompt is its "prompt" field, or "Question: {question} Answer:" (pkmlm.data.facts.qa_prompt); the
answer follows after one space. Each item is one forward of [eos] + prompt + answer (the eos: documents start
after one, as in training; cut from the left to the model's length, never into the answer):

- ``qa_logprob``: mean over items of sum_t log p(answer token t | prompt, answer tokens < t), in nats.
- ``qa_acc``: fraction of items whose answer tokens are each the argmax given the prompt and the answer tokens
  before them: exactly when greedy decoding from the prompt produces the answer's tokens first. What greedy
  decoding writes after them is not looked at.
- ``qa_acc/{attribute}``: the same per "attribute" field, when the records have one.

Items are split over ranks (item i to rank i mod world) and sums all-reduced; every rank runs the same number
of forwards (the short ones forward empty batches), since a sharded value table reads in collectives.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pkmlm.cli import UserError
from pkmlm import distributed as D
from pkmlm.data.facts import qa_prompt
from pkmlm.eval.textcodec import TextCodec
from pkmlm.precision import autocast


class QAError(UserError, ValueError):
    """A QA file that cannot be used (missing, not JSON lines, a record without prompt or answer)."""


def load_qa(path: str | os.PathLike) -> list[dict]:
    """The records of a .jsonl QA file, each with "prompt" (built from "question" when absent) and "answer"."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise QAError(f"--qa {path}: cannot read it ({e.strerror}): give a .jsonl file such as qa_test.jsonl "
                      "written by python -m pkmlm.data.facts") from None
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("answer"), str) or not record["answer"].strip() \
                or not isinstance(record.get("prompt", record.get("question")), str):
            raise QAError(f"--qa {path} line {i}: expected a JSON object with a non-empty string \"answer\" and a "
                          "string \"prompt\" or \"question\"")
        records.append({**record, "prompt": record.get("prompt") or qa_prompt(record["question"])})
    if not records:
        raise QAError(f"--qa {path} holds no question: give a non-empty .jsonl file")
    return records


def encode_qa(records: list[dict], codec: TextCodec, max_len: int) -> list[tuple[list[int], list[int], str]]:
    """(prompt ids, answer ids, attribute) per record, [eos] + prompt cut from the left to fit ``max_len``
    inputs with the answer. The answer's ids are those the prompt + " " + answer text gets after the prompt's
    (how the training text had it), else the answer encoded alone."""
    out = []
    for r in records:
        prompt = codec.encode(r["prompt"])
        full = codec.encode(f"{r['prompt']} {r['answer']}")
        answer = full[len(prompt):] if full[:len(prompt)] == prompt else codec.encode(r["answer"])
        if not answer:
            raise QAError(f"the answer {r['answer']!r} encodes to no token")
        if len(answer) > max_len:
            raise QAError(f"the answer {r['answer']!r} is {len(answer)} tokens, longer than the model's {max_len}")
        context = [codec.eos_id] + prompt
        out.append((context[max(0, len(context) + len(answer) - 1 - max_len):], answer, str(r.get("attribute", ""))))
    return out


@torch.no_grad()
def continuation_scores(model: nn.Module, items: list[tuple[list[int], list[int]]], *, batch_size: int,
                        precision: str = "fp32", min_batches: int = 0) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context) in nats, greedy: every continuation token is the argmax) per
    (context ids, continuation ids) item; context non-empty, len(context) + len(continuation) - 1 <= the model's
    length. Runs at least ``min_batches`` forwards (empty ones when the items run out). Restores train/eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for b in range(max(min_batches, math.ceil(len(items) / batch_size))):
        chunk = items[b * batch_size:(b + 1) * batch_size]
        width = max((len(p) + len(a) - 1 for p, a in chunk), default=1)
        inputs = torch.zeros(len(chunk), width, dtype=torch.long)
        targets = torch.full((len(chunk), width), -100, dtype=torch.long)
        for i, (context, continuation) in enumerate(chunk):
            seq = context + continuation
            inputs[i, :len(seq) - 1] = torch.tensor(seq[:-1])
            targets[i, len(context) - 1:len(seq) - 1] = torch.tensor(continuation)
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast(device, precision):
            logits = model(inputs)  # right padding: positions after an item's end do not change its own
        mask = targets != -100
        token_logp = F.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        logprob = (token_logp * mask).double().sum(-1)
        greedy = ((logits.argmax(-1) == targets) | ~mask).all(-1)
        out += [(float(lp), bool(g)) for lp, g in zip(logprob.tolist(), greedy.tolist())]
    model.train(was_training)
    return out


def score_qa(model: nn.Module, items: list[tuple[list[int], list[int], str]], *, batch_size: int,
             precision: str = "fp32") -> dict[str, float]:
    """{"qa_acc", "qa_logprob", "qa_count", "qa_acc/{attribute}"...} of ``items`` from ``encode_qa`` (all ranks call)."""
    rank, world = D.rank(), D.world_size()
    device = next(model.parameters()).device
    attributes = sorted({a for _, _, a in items if a})
    column = {a: i for i, a in enumerate(attributes)}
    # Per attribute (and a last column for all): correct, count; and the summed log-likelihood.
    correct = torch.zeros(2, len(attributes) + 1, dtype=torch.float64, device=device)
    logprob = torch.zeros(1, dtype=torch.float64, device=device)
    mine = items[rank::world]
    batches = math.ceil(math.ceil(len(items) / world) / batch_size)  # the same on every rank
    scores = continuation_scores(model, [(p, a) for p, a, _ in mine], batch_size=batch_size, precision=precision,
                                 min_batches=batches)
    for (_, _, attribute), (lp, right) in zip(mine, scores):
        logprob += lp
        for c in ([column[attribute]] if attribute else []) + [len(attributes)]:
            correct[0, c] += float(right)
            correct[1, c] += 1
    D.all_reduce_sum(correct)
    D.all_reduce_sum(logprob)
    total = correct[1, -1].item()
    out = {"qa_acc": correct[0, -1].item() / total, "qa_logprob": logprob.item() / total, "qa_count": int(total)}
    out.update({f"qa_acc/{a}": (correct[0, i] / correct[1, i]).item() for a, i in column.items()})
    return out
