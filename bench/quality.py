"""The paper's headline claims, checked at CPU scale on real text with the project's own train.py and evaluate.py.

Lample et al. (2019) report that (1) L layers plus a memory beat 2L layers without one, at about twice the
inference speed; (2) query BatchNorm is what makes the memory used (25.8% -> 80.3% usage at 1M slots); and
(3) memories in the middle of the network work best. This script trains five models on the same data with the
same token budget, batch and optimiser settings, evaluates them, and writes a markdown report and a plot:

    a  tiny               L layers                          configs/tiny.yaml
    b  tiny_deep          2L layers                         configs/tiny_deep.yaml
    c  tiny_pkm           L layers, memory replaces a middle FFN    configs/tiny_pkm.yaml
    d  tiny_pkm_parallel  like c, memory in parallel with the FFN   configs/tiny_pkm_parallel.yaml
    e  tiny_pkm_no_bn     like c, without query BatchNorm           configs/tiny_pkm.yaml memory.query_batchnorm=false

    python bench/quality.py --report docs/quality_400.md --plot docs/quality_400.png   # BBC news, ~30 min on 2 cores
    python bench/quality.py --data-dir data/wiki --steps 2000 --models a,c --out runs/wiki_quality
    python bench/quality.py --report-only                     # rebuild the report from finished runs

Beyond these five, rows for Memory+ (Berges et al. 2024) and for the papers' ablations, all variations of c:
groups `memory_plus`, `sweep` (heads 1/2/4/8, knn 16/32/64, 64^2/128^2/256^2 slots, memory in block 0/2/3) and
`ablations` (frozen keys, key inits, temperature, no softmax, query MLP, LayerNorm queries, zero values, flat
memory, re-initialisation). `--models` takes keys and group names (`--models sweep,a`); with sweep rows the
report gets a second plot (`--sweep-plot`) of test perplexity along each swept axis.

The headline needs a regime where 2L beats L. At width 256 on BBC it does not within 1,000 steps (L=1, 2 and
4 layers: l1, l2, a), so group `headline` also trains width-64 models, where it does: n1, n2, n4 (L=1, 2, 4),
n1_pkm and n1_pkm_parallel (L=1 with a memory replacing or beside its FFN) and n2_pkm, with l2_pkm at width 256:

    python bench/quality.py --models headline --steps 1000 --out runs/h --report docs/quality_headline.md \
        --plot docs/quality_headline.png

Runs go to --out (default runs/quality/<model>); a finished run is not trained again and an interrupted one
resumes from its last checkpoint (delete a run's folder to retrain it).
Needs matplotlib for the plot (`pip install -e ".[bench]"`); without it the report is written without one.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from pkmlm.eval.evaluation import perplexity

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Model:
    key: str
    name: str
    config: str
    overrides: tuple[str, ...]
    description: str
    group: str = "paper"
    axis: tuple[str, int, str] | None = None  # (swept axis, position on it, label) for the sweep plot


PKM = "configs/tiny_pkm.yaml"


def _variant(key: str, overrides: tuple[str, ...], description: str, group: str, axis=None) -> Model:
    return Model(key, f"tiny_pkm_{key}", PKM, overrides, description, group, axis)


MODELS = (
    Model("a", "tiny", "configs/tiny.yaml", (), "L=4 layers"),
    Model("b", "tiny_deep", "configs/tiny_deep.yaml", (), "2L=8 layers"),
    Model("c", "tiny_pkm", PKM, (), "L=4, memory replaces the FFN of block 2"),
    Model("d", "tiny_pkm_parallel", "configs/tiny_pkm_parallel.yaml", (), "L=4, memory parallel to the FFN of block 2"),
    Model("e", "tiny_pkm_no_bn", PKM, ("memory.query_batchnorm=false",), "like c, without query BatchNorm"),
    # Memory+ (Berges et al. 2024): the gated output; with qk-norm; two memories sharing one value table.
    _variant("memplus", ("memory.gated=true",), "Memory+: c with the SiLU-gated output", "memory_plus"),
    _variant("memplus_qknorm", ("memory.gated=true", "memory.qk_norm=true"), "Memory+ with query/key norm",
             "memory_plus"),
    _variant("qknorm", ("memory.qk_norm=true",), "c with query/key norm (no gate)", "memory_plus"),
    _variant("memplus_shared",
             ("memory.gated=true", "memory.share_values=true", "memory.positions=[1:replace,2:replace]"),
             "Memory+, memories replace FFNs 1 and 2, one shared value table", "memory_plus"),
    _variant("shared", ("memory.share_values=true", "memory.positions=[1:replace,2:replace]"),
             "memplus_shared without the gate (plain PKM in blocks 1 and 2, one table)", "memory_plus"),
    # Sweeps around c (heads 4, knn 32, 128^2 slots, block 2 of 4).
    *(_variant(f"heads{h}", (f"memory.heads={h}",), f"c with {h} memory heads", "sweep", ("heads", h, str(h)))
      for h in (1, 2, 8)),
    *(_variant(f"knn{k}", (f"memory.knn={k}",), f"c reading {k} slots per head", "sweep", ("knn", k, str(k)))
      for k in (16, 64)),
    *(_variant(f"keys{n}", (f"memory.n_keys={n}",), f"c with {n}^2 slots", "sweep", ("slots", n, f"{n}²"))
      for n in (64, 256)),
    _variant("low", ("memory.positions=[0:replace]",), "c with the memory in block 0 (low)", "sweep",
             ("position", 0, "low (0)")),
    _variant("high", ("memory.positions=[3:replace]",), "c with the memory in block 3 (high)", "sweep",
             ("position", 3, "high (3)")),
    # The papers' ablations.
    _variant("frozen_keys", ("memory.learn_keys=false",), "c with frozen (random) keys", "ablations"),
    _variant("keys_normal", ("memory.key_init=normal",), "c with normal key init", "ablations"),
    _variant("keys_orthogonal", ("memory.key_init=orthogonal",), "c with orthogonal key init", "ablations"),
    _variant("temp2", ("memory.score_temperature=2",), "c with score temperature 2", "ablations"),
    _variant("no_softmax", ("memory.score_softmax=false",), "c weighting by raw scores (no softmax)", "ablations"),
    _variant("query_mlp", ("memory.query_layers=2",), "c with a 2-layer query MLP", "ablations"),
    _variant("query_ln", ("memory.query_batchnorm=false", "memory.query_layernorm=true"),
             "c with LayerNorm instead of BatchNorm on queries", "ablations"),
    _variant("zero_values", ("memory.value_init=zero",), "c with zero-initialised values", "ablations"),
    _variant("flat64", ("memory.flat=true", "memory.n_keys=64"), "flat exact memory, 64^2 slots (vs keys64)",
             "ablations"),
    _variant("reinit", ("memory.reinit_every=50",), "c with dead-slot re-initialisation every 50 steps", "ablations"),
    # The headline needs a regime where 2L beats L. At width 256 on BBC it does not (b > a above, and at 1,000
    # steps L=1 ~ L=2 < L=4), so it is checked where the model, not the steps, is the limit: width 64.
    Model("l1", "tiny_l1", "configs/tiny.yaml", ("model.n_layers=1",), "L=1 layer", "headline"),
    Model("l2", "tiny_l2", "configs/tiny.yaml", ("model.n_layers=2",), "L=2 layers", "headline"),
    Model("l2_pkm", "tiny_l2_pkm", PKM, ("model.n_layers=2", "memory.positions=[1:replace]"),
          "L=2, memory replaces the FFN of block 1", "headline"),
    *(Model(f"n{n}", f"narrow_l{n}", "configs/tiny.yaml", ("model.d_model=64", f"model.n_layers={n}"),
            f"width 64, L={n}", "headline") for n in (1, 2, 4)),
    Model("n1_pkm", "narrow_l1_pkm", PKM, ("model.d_model=64", "model.n_layers=1", "memory.positions=[0:replace]"),
          "width 64, L=1, memory replaces its FFN", "headline"),
    Model("n1_pkm_parallel", "narrow_l1_pkm_parallel", PKM,
          ("model.d_model=64", "model.n_layers=1", "memory.positions=[0:parallel]"),
          "width 64, L=1, memory parallel to its FFN", "headline"),
    Model("n2_pkm", "narrow_l2_pkm", PKM, ("model.d_model=64", "model.n_layers=2", "memory.positions=[1:replace]"),
          "width 64, L=2, memory replaces the FFN of block 1", "headline"),
)
GROUPS = {group: [m.key for m in MODELS if m.group == group]
          for group in ("paper", "memory_plus", "sweep", "ablations", "headline")}
GROUPS["headline"].insert(3, "a")  # L=4 at width 256
assert not GROUPS.keys() & {m.key for m in MODELS}, "a group name must not be a model key"
# The sweep's reference point: c's value on each axis.
BASELINE_AXES = {"heads": (4, "4"), "knn": (32, "32"), "slots": (128, "128²"), "position": (2, "middle (2)")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data/bbc_news", help="prepared corpus (default: the BBC news shards)")
    parser.add_argument("--out", type=Path, default=Path("runs/quality"), help="parent folder of the five runs")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per model (same token budget)")
    parser.add_argument("--eval-every", type=int, default=100, help="validation interval, in steps")
    parser.add_argument("--models", default="a,b,c,d,e",
                        help="comma-separated model keys and group names (paper, memory_plus, sweep, ablations, "
                             "headline)")
    parser.add_argument("--report", type=Path, help="markdown report (default OUT/report.md)")
    parser.add_argument("--plot", type=Path, help="PNG plot, best beside the report (default OUT/plot.png)")
    parser.add_argument("--sweep-plot", type=Path, help="PNG plot of the sweeps (default OUT/sweep.png)")
    parser.add_argument("--report-only", action="store_true", help="do not train; report on the existing runs")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="extra overrides for every model")
    args = parser.parse_args(argv)

    keys = [k for g in args.models.split(",") if g.strip() for k in GROUPS.get(g.strip(), [g.strip()])]
    unknown = sorted(set(keys) - {m.key for m in MODELS})
    if unknown or not keys:
        parser.error(f"--models takes a comma-separated subset of a,b,c,d,e (more: {', '.join(GROUPS)}, "
                     f"or keys listed in bench/quality.py); got {args.models!r}")
    if args.steps < 1 or args.eval_every < 1:
        parser.error("--steps and --eval-every must be positive")
    if not (Path(args.data_dir) / "train" / "manifest.json").exists():
        parser.error(f"no prepared corpus at {args.data_dir}: run `python -m pkmlm.data.prepare --corpus bbc_news "
                     f"--out {args.data_dir}` (or `make data`) first, or pass --data-dir")
    models = [m for m in MODELS if m.key in keys]
    args.report = args.report or args.out / "report.md"
    args.plot = args.plot or args.out / "plot.png"
    args.sweep_plot = args.sweep_plot or args.out / "sweep.png"

    commands, results = {}, {}
    for m in models:
        run_dir = args.out / m.name
        # The row's own overrides come last: extra overrides for every model never undo what defines a row.
        train_cmd = [sys.executable, "train.py", "--config", m.config,
                     f"data.dir={args.data_dir}", f"train.out_dir={run_dir}", f"train.max_steps={args.steps}",
                     f"train.eval_every={args.eval_every}", f"train.checkpoint_every={args.steps}", *args.overrides,
                     *m.overrides, "--resume"]
        eval_json = run_dir / "evaluation.json"
        eval_cmd = [sys.executable, "evaluate.py", str(run_dir), "--split", "valid,test", "--json", str(eval_json)]
        commands[m.name] = (train_cmd, eval_cmd)
        if not args.report_only:
            if not _finished(run_dir, args.steps):
                _run(train_cmd)
            _run(eval_cmd)
        if not eval_json.exists():
            print(f"skipping {m.name}: no {eval_json} (train and evaluate it first)", file=sys.stderr)
            continue
        results[m.name] = (m, json.loads(eval_json.read_text())[0], _curve(run_dir))

    plotted = _plot(results, args.plot)
    swept = _sweep_plot(results, args.sweep_plot)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(_report(results, commands, args, plotted, swept))
    print(f"report: {args.report}" + (f", plot: {args.plot}" if plotted else "")
          + (f", sweep plot: {args.sweep_plot}" if swept else ""))
    return 0


def _run(cmd: list[str]) -> None:
    print("$ " + shlex.join(_display(cmd)), flush=True)
    started = time.perf_counter()
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise SystemExit(f"error: this command failed (its message is above): {shlex.join(_display(cmd))}")
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)


def _display(cmd: list[str]) -> list[str]:
    return ["python", *cmd[1:]] if cmd and cmd[0] == sys.executable else cmd


def _finished(run_dir: Path, steps: int) -> bool:
    return (run_dir / "checkpoints" / f"step_{steps:07d}.pt").exists()


def _curve(run_dir: Path) -> dict[str, list[float]]:
    """Validation loss against training tokens and training seconds, from the run's TensorBoard events.

    Training seconds exclude validation: they add up each logging window's steps / (tokens/s) * tokens per step.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    tokens_per_step = config["data"]["batch_size"] * config["data"]["bptt"]
    tags = events.Tags()["scalars"]
    if "valid/loss" not in tags or "tokens_per_s" not in tags:
        raise SystemExit(f"{run_dir}: no validation or speed scalars in its TensorBoard log; train it with "
                         "train.eval_every and train.log_every below train.max_steps")
    speed = {e.step: e.value for e in events.Scalars("tokens_per_s")}
    seconds, elapsed, last = {}, 0.0, 0
    for step in sorted(speed):
        elapsed += (step - last) * tokens_per_step / speed[step]
        seconds[step], last = elapsed, step
    valid = events.Scalars("valid/loss")
    logged = sorted(seconds)
    curve = {"step": [], "tokens": [], "seconds": [], "valid_ppl": []}
    for e in valid:
        # Time at the validation step: the nearest logged window at or before it.
        before = [s for s in logged if s <= e.step]
        curve["step"].append(e.step)
        curve["tokens"].append(e.step * tokens_per_step)
        curve["seconds"].append(seconds[before[-1]] if before else 0.0)
        curve["valid_ppl"].append(perplexity(e.value))
    curve["train_tokens_per_s"] = [last * tokens_per_step / elapsed]
    return curve


def _plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[bench]')", file=sys.stderr)
        return False
    fig, (ax_tokens, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, (_, _, curve) in results.items():
        ax_tokens.plot([t / 1e6 for t in curve["tokens"]], curve["valid_ppl"], marker="o", ms=3, label=name)
        ax_time.plot([s / 60 for s in curve["seconds"]], curve["valid_ppl"], marker="o", ms=3, label=name)
    for ax, xlabel in ((ax_tokens, "training tokens (millions)"), (ax_time, "training wall time (minutes)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation perplexity")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    ax_time.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def _sweep_plot(results: dict, path: Path) -> bool:
    """Test perplexity along each swept axis, c at the axis' reference value; False without sweep rows."""
    axes: dict[str, list] = {}
    baseline = next((row for m, row, _ in results.values() if m.key == "c"), None)
    for m, row, _ in results.values():
        if m.axis is not None:
            axes.setdefault(m.axis[0], []).append((*m.axis[1:], row["test_ppl"]))
    if not axes:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, panels = plt.subplots(1, len(axes), figsize=(3.2 * len(axes), 3.2), squeeze=False)
    for ax, (axis, points) in zip(panels[0], axes.items()):
        if baseline is not None:
            points = points + [(*BASELINE_AXES[axis], baseline["test_ppl"])]
        points.sort()
        labels, values = [p[1] for p in points], [p[2] for p in points]
        ax.plot(range(len(values)), values, marker="o")
        ax.set_xticks(range(len(values)), labels)
        ax.set_xlabel(axis)
        ax.set_ylabel("test perplexity")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def _report(results: dict, commands: dict, args, plotted: bool, swept: bool = False) -> str:
    lines = ["# Quality benchmark: the paper's claims at CPU scale", "",
             f"Data: `{args.data_dir}`; {args.steps} steps per model; generated by `bench/quality.py`.", "",
             "| model | what | params total | memory values | active/token | valid ppl | test ppl "
             "| memory usage | KL (counts) | train tok/s | inference tok/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, (m, row, curve) in results.items():
        usage = [v for k, v in row.items() if k.endswith("/usage") and "/head" not in k]
        kl = [v for k, v in row.items() if k.endswith("/kl_counts") and "/head" not in k]
        lines.append(
            f"| {m.key}: {name} | {m.description} | {row['params_total']:,} | {row['params_memory_values']:,} "
            f"| {row['params_active']:,} | {row['valid_ppl']:.2f} | {row['test_ppl']:.2f} "
            f"| {', '.join(f'{u:.1%}' for u in usage) or '-'} | {', '.join(f'{k:.3f}' for k in kl) or '-'} "
            f"| {curve['train_tokens_per_s'][0]:,.0f} | {row['tokens_per_s']:,.0f} |")
    lines += ["", "Validation perplexity during training (on the first `train.eval_batches` validation batches):", ""]
    lines.append("| model | " + " | ".join(f"step {s}" for s in _steps(results)) + " |")
    lines.append("|---|" + "---:|" * len(_steps(results)))
    for name, (_, _, curve) in results.items():
        by_step = dict(zip(curve["step"], curve["valid_ppl"]))
        lines.append(f"| {name} | " + " | ".join(f"{by_step[s]:.1f}" if s in by_step else "" for s in _steps(results))
                     + " |")
    if plotted:
        lines += ["", f"![validation perplexity against training tokens and time]({args.plot.name})"]
    if swept:
        lines += ["", f"![test perplexity along each swept axis]({args.sweep_plot.name})"]
    lines += ["", "Commands (from the repository root):", "", "```"]
    for train_cmd, eval_cmd in commands.values():
        lines += [shlex.join(_display(train_cmd)), shlex.join(_display(eval_cmd))]
    lines += ["```", ""]
    return "\n".join(lines)


def _steps(results: dict) -> list[int]:
    return sorted({s for _, _, c in results.values() for s in c["step"]})


if __name__ == "__main__":
    sys.exit(main())
