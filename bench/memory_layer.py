"""Memory layer speed: pkmlm's ProductKeyMemory vs a dense FFN vs the `product-key-memory` package.

    python bench/memory_layer.py [--sizes 128 256 512 1024] [--repeats 5] [--device cpu|cuda]

Every layer maps 256 -> 256 on a batch of 8 x 256 tokens: memories with heads=4, knn=32, k_dim=256
and query BatchNorm; the FFN is 256 -> 1024 -> 256. Two timings per layer, each the median of
`--repeats` runs after one warm-up (pkmlm and the package take turns in every round):
  forward: the training-mode forward, autograd recording (the first half of a training step);
  step:    zero_grad + forward + backward + optimizer step(s), loss = mean of the squared output.
pkmlm's values use its sparse RowAdam (lr 1e-3), everything else Adam. The package (optional, v0.3.0,
`pip install -e .[bench]`, or with --no-deps: product-key-memory==0.3.0 einops colt5-attention
local-attention hyper-connections) is
configured identically (heads=4, num_keys, topk=32, dim_head=128 per query half; LayerNorm queries,
since its BatchNorm option crashes in that version)
and trained with its recommended parameter groups (`fetch_optimizer_parameters`: Adam, values at
lr 1e-2, dense). A last table times the value-table update alone: torch.optim.SparseAdam vs RowAdam
on the same sparse gradient. Between them, the floor of pkmlm's step at each size from rates measured
on this machine (copy bandwidth, matmul FLOP/s; see step_floor) and the step's ratio to it.

Like train.py, the bench first calls pkmlm.memory.kernels.retain_freed_memory(), which applies to every
layer timed here; pkmlm's compiled CPU kernels are used unless PKMLM_CPU_KERNELS=0 (the header line
says which).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from pkmlm.memory.kernels import available as kernels_available, retain_freed_memory, simd_path
from pkmlm.memory import ProductKeyMemory
from pkmlm.training.optim import RowAdam, make_optimizers

DIM, HEADS, KNN, K_DIM, BATCH, SEQ = 256, 4, 32, 256, 8, 256
DEVICE = torch.device("cpu")  # --device: every layer, input and optimizer state lives here


def _sync() -> None:
    """Wait for the GPU's queued work, so that a timer reads the work done (no-op on the CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def median_ms(fn, repeats: int) -> float:
    """Median wall time of fn in ms over `repeats` runs after one warm-up."""
    fn()  # warm-up: allocations, optimizer state
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def time_layers(layers: list, x: torch.Tensor, repeats: int) -> list[tuple[float, float]]:
    """(forward ms, training step ms) of each (layer, (zero_grad, step)) on x, medians of `repeats`.

    The layers take turns within every round, so a change in the machine's load hits them alike.
    """
    def forward(layer):
        layer(x)

    def train_step(layer, zero_grad, step):
        zero_grad()
        layer(x).pow(2).mean().backward()
        step()

    runs = [(lambda layer=layer: forward(layer), lambda layer=layer, o=opts: train_step(layer, *o))
            for layer, opts in layers]
    for fwd, step in runs:  # warm-up: allocations, optimizer state
        fwd()
        step()
    times = [([], []) for _ in runs]
    for _ in range(repeats):
        for (fwd, step), (fwd_times, step_times) in zip(runs, times):
            for fn, into in ((fwd, fwd_times), (step, step_times)):
                _sync()
                start = time.perf_counter()
                fn()
                _sync()
                into.append(time.perf_counter() - start)
    return [(1000 * statistics.median(f), 1000 * statistics.median(s)) for f, s in times]


def ours(n_keys: int) -> tuple[nn.Module, tuple]:
    mem = ProductKeyMemory(DIM, DIM, n_keys=n_keys, heads=HEADS, knn=KNN, k_dim=K_DIM).to(DEVICE)
    opts = make_optimizers(mem, lr=1e-4, value_lr=1e-3)
    return mem, (opts.zero_grad, opts.step)


def dense_ffn() -> tuple[nn.Module, tuple]:
    ffn = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.ReLU(), nn.Linear(4 * DIM, DIM)).to(DEVICE)
    opt = torch.optim.Adam(ffn.parameters(), lr=1e-4)
    return ffn, (lambda: opt.zero_grad(set_to_none=True), opt.step)


def pypi_package(n_keys: int) -> tuple[nn.Module, tuple] | None:
    try:
        from product_key_memory import PKM, fetch_optimizer_parameters
    except ImportError as e:
        print(f"[skip] product-key-memory package not importable ({e}); its columns show '-'")
        return None
    # Its BatchNorm option (use_layernorm=False) crashes in v0.3.0: BatchNorm1d(dim_head) meets
    # 2 * dim_head query features. So it keeps its default LayerNorm queries (cost: about the same).
    pkm = PKM(DIM, heads=HEADS, num_keys=n_keys, topk=KNN, dim_head=K_DIM // 2).to(DEVICE)
    opt = torch.optim.Adam(fetch_optimizer_parameters(pkm), lr=1e-4)
    return pkm, (lambda: opt.zero_grad(set_to_none=True), opt.step)


def value_update_ms(n_keys: int, repeats: int) -> tuple[float, float]:
    """Value-table update time alone, SparseAdam vs RowAdam, on one real sparse gradient."""
    mem = ProductKeyMemory(DIM, DIM, n_keys=n_keys, heads=HEADS, knn=KNN, k_dim=K_DIM).to(DEVICE)
    mem(torch.randn(BATCH, SEQ, DIM, device=DEVICE)).pow(2).mean().backward()
    grad = mem.values.weight.grad
    results = []
    for opt in (torch.optim.SparseAdam([mem.values.weight], lr=1e-3), RowAdam([mem.values.weight], lr=1e-3)):
        def update(opt=opt):
            mem.values.weight.grad = grad.clone()  # the summed-rows gradient, as backward leaves it
            opt.step()
        results.append(median_ms(update, repeats))
    return results[0], results[1]


def machine_rates() -> tuple[float, float]:
    """(copy bandwidth in bytes/s, counting read + write, of a 512 MB tensor; float32 matmul FLOP/s at the
    search's shape: heads * 2 products of (tokens x k_dim/2) by (k_dim/2 x 1024)), best of 5 runs."""
    src = torch.rand(2**27)
    dst = torch.empty_like(src)
    copy_s = min(_seconds(lambda: dst.copy_(src)) for _ in range(5))
    half, n = K_DIM // 2, BATCH * SEQ
    a, b = torch.randn(HEADS * 2, n, half), torch.randn(HEADS * 2, half, 1024)
    out = torch.empty(HEADS * 2, n, 1024)
    mm_s = min(_seconds(lambda: torch.bmm(a, b, out=out)) for _ in range(5))
    return 2 * src.numel() * 4 / copy_s, 2 * HEADS * 2 * n * half * 1024 / mm_s


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_floor(n_keys: int, copy_rate: float, mm_rate: float) -> dict[str, float]:
    """Lower bound (ms) of each phase of pkmlm's training step at the machine's measured rates.

    Matmuls (FLOPs / mm_rate): the exact search (every sub-key scored) and the query projection,
    forward and backward. Memory traffic (bytes / copy_rate): the value rows read in the forward and
    again for the weights' gradient, the summed gradient rows written, and RowAdam reading gradient,
    weights and both moments and writing the last three of every touched row. Touched rows are
    counted on a real batch. Each phase alone at peak rate, nothing overlapped: no implementation of
    this step (exact search, Adam on the values) does less.
    """
    mem, _ = ours(n_keys)
    with torch.no_grad():
        _, slots = mem.lookup(mem.query(torch.randn(BATCH, SEQ, DIM)))
    touched, reads, n, half, row = slots.unique().numel(), slots.numel(), BATCH * SEQ, K_DIM // 2, DIM * 4
    flops = {"search matmul": 2 * n * HEADS * 2 * half * n_keys,
             "query projection fwd+bwd": 3 * 2 * n * DIM * HEADS * K_DIM}
    traffic = {"value reads fwd+bwd": 2 * reads * row, "gradient rows": touched * row,
               "RowAdam (7 row passes)": 7 * touched * row}
    floor = {k: 1000 * v / mm_rate for k, v in flops.items()}
    floor.update({k: 1000 * v / copy_rate for k, v in traffic.items()})
    floor["touched rows"] = touched
    return floor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024], help="n_keys values")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where layers, inputs and optimizers live (cuda: the first GPU; the floor table is "
                             "CPU-only)")
    args = parser.parse_args()
    if args.repeats < 1 or any(n < KNN for n in args.sizes):
        parser.error(f"--repeats must be >= 1 and every size >= knn ({KNN})")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; use --device cpu")
    global DEVICE
    DEVICE = torch.device(args.device)

    retained = retain_freed_memory()  # as train.py does; applies to every layer timed here alike
    torch.manual_seed(0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, 1-min load {load:.2f}, "
          f"compiled CPU kernels: {'yes (top-k: ' + simd_path() + ')' if kernels_available() else 'no'}, "
          f"freed memory retained: "
          f"{'yes' if retained else 'no'}, device: "
          f"{torch.cuda.get_device_name(DEVICE) if DEVICE.type == 'cuda' else 'cpu'}")
    x = torch.randn(BATCH, SEQ, DIM, device=DEVICE)
    [(ffn_fwd, ffn_step)] = time_layers([dense_ffn()], x, args.repeats)
    print(f"dense FFN 256->1024->256: forward {ffn_fwd:.1f} ms, step {ffn_step:.1f} ms\n")

    print("| slots | pkmlm fwd ms | package fwd ms | fwd ratio | pkmlm step ms | package step ms | step ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    our_steps = {}
    for n_keys in args.sizes:
        pypi = pypi_package(n_keys)
        if pypi is None:
            [(fwd, step)] = time_layers([ours(n_keys)], x, args.repeats)
            our_steps[n_keys] = step
            print(f"| {n_keys**2:,} | {fwd:.1f} | - | - | {step:.1f} | - | - |", flush=True)
            continue
        (fwd, step), (p_fwd, p_step) = time_layers([ours(n_keys), pypi], x, args.repeats)
        our_steps[n_keys] = step
        del pypi
        print(f"| {n_keys**2:,} | {fwd:.1f} | {p_fwd:.1f} | {fwd / p_fwd:.2f} | {step:.1f} | "
              f"{p_step:.1f} | {step / p_step:.2f} |", flush=True)

    if DEVICE.type != "cpu":
        print("\n[skip] the floor table: its rates and phases are the CPU's")
    else:
        print_floor(args.sizes, our_steps)

    print("\n| slots | SparseAdam update ms | RowAdam update ms |")
    print("|---:|---:|---:|")
    for n_keys in args.sizes:
        sparse_adam, row_adam = value_update_ms(n_keys, args.repeats)
        print(f"| {n_keys**2:,} | {sparse_adam:.1f} | {row_adam:.1f} |", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n1-min load at the end {load:.2f}")


def print_floor(sizes: list[int], our_steps: dict[int, float]) -> None:
    """The table of step_floor's phases at this machine's rates, beside the measured steps."""
    copy_rate, mm_rate = machine_rates()
    print(f"\nMeasured here: copy {copy_rate / 1e9:.1f} GB/s (read + write), float32 matmul {mm_rate / 1e9:.0f} "
          f"GFLOP/s. Floor of pkmlm's step (each phase at those rates, see step_floor):")
    print("| slots | touched rows | search mm | query proj | value reads | grad rows | RowAdam | floor ms | "
          "step ms | step / floor |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n_keys in sizes:
        f = step_floor(n_keys, copy_rate, mm_rate)
        phases = [f["search matmul"], f["query projection fwd+bwd"], f["value reads fwd+bwd"], f["gradient rows"],
                  f["RowAdam (7 row passes)"]]
        floor = sum(phases)
        print(f"| {n_keys**2:,} | {int(f['touched rows']):,} | " + " | ".join(f"{p:.1f}" for p in phases)
              + f" | {floor:.1f} | {our_steps[n_keys]:.1f} | {our_steps[n_keys] / floor:.2f} |", flush=True)


if __name__ == "__main__":
    main()
