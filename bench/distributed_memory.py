"""Memory value tables across processes: bytes communicated, peak RSS and step time per rank.

    python bench/distributed_memory.py [--worlds 1 2 4] [--cases tiny_pkm layer] [--steps 3]

Runs every (case, world size, mode) under `torchrun --standalone` with gloo on the CPU and prints a markdown
table (docs/benchmarks.md). Cases:
  tiny_pkm: the model of configs/tiny_pkm.yaml (16,384 x 256 table), its global batch (16 x 128 tokens)
            split over the ranks, random tokens from a 16k vocabulary;
  layer:    one ProductKeyMemory of 512^2 = 262,144 x 1024 values (heads 4, knn 32, k_dim 512, 1024 -> 1024),
            --layer-tokens random inputs per rank (weak scaling, as in training: each rank its own batch).
Modes, at world > 1 (at world 1 there is nothing to exchange and all modes are one):
  allgather: the value-gradient sync pkmlm used before (kept here as `padded_all_gather_sync`): all_gather
             of every rank's rows padded to the largest rank, concatenated, coalesced;
  union:     pkmlm.distributed.all_reduce_sparse_grads, replicated tables (the default);
  sharded:   memory.shard_values=true (pkmlm/memory/value_table.py): no gradient sync, lookups exchanged.
A step is zero_grad, forward, backward (DDP for the dense parameters), value sync, RowAdam/Adam step.
Bytes: the sizes of the result buffers of the value-table collectives (what a rank receives; an all_reduce
counts its buffer once, a ring moves about 2(W-1)/W of it each way), counted by wrapping torch.distributed's
functions; DDP's dense all-reduce (C++) is not counted. Peak RSS: ru_maxrss of each rank, the largest shown.
Step time: rank 0's median over --steps steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pkmlm import distributed as D
from pkmlm.training import parallel as P  # noqa: E402
from pkmlm.config import load_config  # noqa: E402
from pkmlm.memory.kernels import retain_freed_memory  # noqa: E402
from pkmlm.memory import ProductKeyMemory, make_value_table  # noqa: E402
from pkmlm.models.transformer import TransformerLM  # noqa: E402
from pkmlm.training.optim import make_optimizers  # noqa: E402
from pkmlm.memory.sparse import coalesce_rows  # noqa: E402
from pkmlm.memory.value_table import ShardedValueTable, sharded_tables  # noqa: E402

VOCAB = 16_000


@torch.no_grad()
def padded_all_gather_sync(params) -> None:
    """pkmlm's value-gradient sync before the union all-reduce (reference for this bench only)."""
    world = dist.get_world_size()
    for p in params:
        grad = coalesce_rows(p.grad)
        indices, rows = grad.indices()[0], grad.values()
        count = torch.tensor([indices.numel()])
        counts = [torch.empty_like(count) for _ in range(world)]
        dist.all_gather(counts, count)
        counts = [int(c) for c in counts]
        longest = max(counts)
        padded_idx = indices.new_zeros(longest)
        padded_idx[: indices.numel()] = indices
        padded_rows = rows.new_zeros((longest, *rows.shape[1:]))
        padded_rows[: rows.shape[0]] = rows
        all_idx = [torch.empty_like(padded_idx) for _ in range(world)]
        all_rows = [torch.empty_like(padded_rows) for _ in range(world)]
        dist.all_gather(all_idx, padded_idx)
        dist.all_gather(all_rows, padded_rows)
        idx = torch.cat([t[:n] for t, n in zip(all_idx, counts)])
        val = torch.cat([t[:n] for t, n in zip(all_rows, counts)]) / world
        p.grad = torch.sparse_coo_tensor(idx.unsqueeze(0), val, grad.shape, check_invariants=False).coalesce()


class ByteCounter:
    """Wraps torch.distributed's collectives and adds up the bytes of their result buffers."""

    NAMES = ("all_reduce", "all_gather", "all_gather_single", "all_to_all_single", "gather", "broadcast")

    def __init__(self):
        self.bytes = 0
        self.on = False
        for name in self.NAMES:
            setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            if self.on:
                out = args[0]
                if name == "gather":
                    out = args[1] if len(args) > 1 and args[1] is not None else args[0]
                tensors = out if isinstance(out, (list, tuple)) else [out]
                self.bytes += sum(t.numel() * t.element_size() for t in tensors)
            return fn(*args, **kwargs)
        return counted


class LayerModel(nn.Module):
    def __init__(self, sharded: bool):
        super().__init__()
        values = ShardedValueTable(512**2, 1024) if sharded else make_value_table(512, 1024)
        self.memory = ProductKeyMemory(1024, 1024, n_keys=512, heads=4, knn=32, k_dim=512, values=values)

    def forward(self, x):
        return self.memory(x)


def worker(args) -> None:
    env = D.detect_env()
    D.init_process_group(env, torch.device("cpu"))
    counter = ByteCounter()
    world, rank = env.world_size, env.rank
    torch.manual_seed(0)
    if args.case == "tiny_pkm":
        config = load_config(ROOT / "configs" / "tiny_pkm.yaml", [f"memory.shard_values={args.mode == 'sharded'}"])
        model = TransformerLM(config, VOCAB)
        rows = config.data.batch_size // world
        gen = torch.Generator().manual_seed(1 + rank)

        def batch():
            tokens = torch.randint(0, VOCAB, (rows, config.data.bptt + 1), generator=gen)
            return tokens[:, :-1], tokens[:, 1:]

        def loss_fn(out, target):
            return nn.functional.cross_entropy(out.flatten(0, 1), target.flatten())
    else:
        model = LayerModel(args.mode == "sharded")
        gen = torch.Generator().manual_seed(1 + rank)

        def batch():
            return torch.randn(args.layer_tokens, 1024, generator=gen), None

        def loss_fn(out, target):
            return out.square().mean()
    optim = make_optimizers(model, lr=1e-3, value_lr=1e-3)
    sharded = {id(t.weight) for t in sharded_tables(model).values()}
    values = [p for g in optim.values.param_groups for p in g["params"]]
    replicated = [p for p in values if id(p) not in sharded]
    ddp = P.wrap_model(model, env, torch.device("cpu"), sparse_params=replicated,
                       sharded_params=[p for p in values if id(p) in sharded])
    sync = padded_all_gather_sync if args.mode == "allgather" else P.all_reduce_sparse_grads
    times, touched, union = [], [], []
    for step in range(args.steps + 1):
        counter.on = step > 0
        x, y = batch()
        dist.barrier() if world > 1 else None
        start = time.perf_counter()
        optim.zero_grad()
        loss_fn(ddp(x), y).backward()
        if replicated:
            touched.append(coalesce_rows(replicated[0].grad)._nnz())
            if world > 1:
                sync(replicated)
            union.append(replicated[0].grad._nnz())
        optim.step()
        if step > 0:
            times.append(time.perf_counter() - start)
    counter.on = False
    result = {"rank": rank, "bytes_per_step": counter.bytes / args.steps, "step_s": statistics.median(times),
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "touched_rows": statistics.mean(touched) if touched else None,
              "union_rows": statistics.mean(union) if union else None}
    results = D.all_gather_object(result)
    if rank == 0:
        Path(args.json).write_text(json.dumps(results))
    D.destroy_process_group()


def run(case: str, world: int, mode: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               __file__, "--worker", "--case", case, "--mode", mode, "--steps", str(args.steps),
               "--layer-tokens", str(args.layer_tokens), "--json", str(out)]
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // world)))
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{case} world {world} {mode} failed:\n{proc.stderr[-3000:]}")
        ranks = json.loads(out.read_text())
    return {"case": case, "world": world, "mode": mode,
            "bytes_per_step": statistics.mean(r["bytes_per_step"] for r in ranks),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks), "step_s": ranks[0]["step_s"],
            "touched_rows": ranks[0]["touched_rows"], "union_rows": ranks[0]["union_rows"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--cases", nargs="+", default=["tiny_pkm", "layer"], choices=["tiny_pkm", "layer"])
    parser.add_argument("--modes", nargs="+", default=["allgather", "union", "sharded"],
                        choices=["allgather", "union", "sharded"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layer-tokens", type=int, default=512, help="tokens per rank for the 262k x 1024 layer")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    retain_freed_memory()
    if args.worker:
        worker(args)
        return
    print(f"torch {torch.__version__}, gloo on the CPU, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} at start; {args.steps} steps after a warm-up")
    print("| case | world | mode | MB sent to collectives / rank / step | peak RSS / rank (MB) | step (s) "
          "| rows touched / rank | union rows |")
    print("|---|---|---|---|---|---|---|---|")
    for case in args.cases:
        for world in args.worlds:
            for mode in (["union"] if world == 1 else args.modes):
                r = run(case, world, mode, args)
                rows = lambda v: "-" if v is None else f"{v:,.0f}"  # noqa: E731
                print(f"| {case} | {world} | {mode if world > 1 else '(any)'} | {r['bytes_per_step'] / 1e6:.2f} "
                      f"| {r['peak_rss_mb']:,.0f} | {r['step_s']:.3f} | {rows(r['touched_rows'])} "
                      f"| {rows(r['union_rows'])} |", flush=True)


if __name__ == "__main__":
    main()
