"""Features combined the way users combine them, on real text with its tokenizer, under torchrun (2 gloo processes).

Each run trains with validation (samples on: the data has a tokenizer), checkpoints, resumes with ``--resume`` from an
earlier checkpoint and must redo the same steps bit for bit; sharded runs are then evaluated, sampled and inspected in
one process. The options form a pairwise covering array (every pair of option values in at least one run), not the
full product. Every launch has a wall-clock limit and runs with PKMLM_COLLECTIVE_CHECK=1 (tests/conftest.py), so a
collective that one rank enters alone fails at once, naming where each rank is, and a hang fails the test fast.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from pkmlm.checkpoint import best_path, list_checkpoints, load_checkpoint
from pkmlm.data.shards import open_split
from pkmlm.eval.evaluation import load_trained
from pkmlm.eval.sampling import ValidationSamples

from conftest import text_run_config  # tests/conftest.py

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 240  # one torchrun launch: two short runs (a hang would otherwise take train.dist_timeout_s)
DIST_TIMEOUT_S = 90  # collectives outside pkmlm's checks (DDP's, gloo's) give up before the launch limit

FACTORS = {
    "values": ["replicated", "sharded"],
    "feature": ["plain", "memory+", "reinit", "keep_best"],
    "precision": ["fp32", "bf16", "fp16"],
    "grad_accum": [1, 2],
}


def covering_array() -> list[dict]:
    """12 runs, one per (feature, precision): values and grad_accum alternate so that every pair of values of any two
    factors occurs (values x grad_accum: (f + p) and (p + f // 2) differ in parity by f + f // 2 = 0, 1, 3, 4)."""
    runs = []
    for (f, feature), (p, precision) in itertools.product(enumerate(FACTORS["feature"]),
                                                          enumerate(FACTORS["precision"])):
        runs.append({"values": FACTORS["values"][(f + p) % 2], "feature": feature, "precision": precision,
                     "grad_accum": FACTORS["grad_accum"][(p + f // 2) % 2]})
    return runs


def uncovered_pairs(runs: list[dict], factors: dict[str, list]) -> list[tuple]:
    """Every ((factor, value), (factor, value)) pair of two factors that no run has."""
    missing = []
    for a, b in itertools.combinations(factors, 2):
        seen = {(r[a], r[b]) for r in runs}
        missing += [((a, x), (b, y)) for x in factors[a] for y in factors[b] if (x, y) not in seen]
    return missing


RUNS = covering_array()


@pytest.fixture(autouse=True)
def one_thread():
    """This process's own work (samples, evaluate, generate, inspect of tiny models) on one thread: a second one
    costs more than it brings here, and spins (burns CPU) while the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_runs_cover_every_pair_of_options():
    assert uncovered_pairs(RUNS, FACTORS) == []
    assert len(RUNS) == len(FACTORS["feature"]) * len(FACTORS["precision"])  # the least any pairwise array needs
    # The check itself can fail: without the first run, its pairs that no other run has are missing.
    assert uncovered_pairs(RUNS[1:], FACTORS)


def _config(data_dir: Path, out_dir: Path, run: dict) -> dict:
    """text_run_config's model (memories after block 0 and replacing block 1's FFN) with ``run``'s options."""
    config = text_run_config(data_dir, out_dir, max_steps=4, eval_every=2, eval_batches=2, checkpoint_every=2,
                             log_every=2, warmup_steps=2, precision=run["precision"], grad_accum=run["grad_accum"],
                             dist_timeout_s=DIST_TIMEOUT_S)
    memory = config["memory"]
    memory["shard_values"] = run["values"] == "sharded"
    if run["feature"] == "memory+":  # Memory+: gated reads, one value table shared by both memories
        memory.update(gated=True, share_values=True)
    elif run["feature"] == "reinit":
        memory["reinit_every"] = 2
    elif run["feature"] == "keep_best":
        config["train"]["keep_best"] = True
    return config


# Both runs of a combination in one launch: train.main twice in one process group (torchrun's store hosts only one).
WORKER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, os.getcwd())
    import train as cli
    from pkmlm import distributed as D
    env = D.detect_env()
    D.init_process_group(env, D.resolve_device("cpu", env), timeout_s=float(sys.argv[2]))
    try:
        code = cli.main(["--config", sys.argv[1]])
        if code == 0:  # resume from step 2: steps 3 and 4 again, bit for bit
            if env.is_main:
                print("---- resume", flush=True)
            code = cli.main(["--config", sys.argv[1], "--resume", sys.argv[3]])
    finally:
        D.destroy_process_group()
    sys.exit(code)
""")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                      "MASTER_", "TORCHELASTIC"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PKMLM_COLLECTIVE_CHECK="1")
    return env


def _launch(args: list[str], what: str, timeout: float = LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run ``args`` in its own session; past ``timeout`` kill the whole session (torchrun and its workers) and fail."""
    proc = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{what}: no exit within {timeout} s, a hang; the end of its stderr:\n{err[-4000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _torchrun(script: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *args]


def _cli(name: str):
    """The root script ``name``.py as a module, to call its main() in this process (one process, no group)."""
    spec = importlib.util.spec_from_file_location(f"{name}_cli", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _logged_samples(run_dir: Path) -> dict[str, dict[int, str]]:
    """{"samples/i": {step: text}} from the run's TensorBoard events (the indentation log.texts adds removed)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    return {tag.removesuffix("/text_summary"): {
                e.step: "\n".join(line[4:] for line in e.tensor_proto.string_val[0].decode().split("\n"))
                for e in events.Tensors(tag)}  # a resumed run's events come last: they win
            for tag in events.Tags()["tensors"] if tag.startswith("samples/")}


def _same(a, b, where: str) -> None:
    """Bitwise equal nested checkpoint contents."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _name(run: dict) -> str:
    return f"{run['values']}-{run['feature']}-{run['precision']}-accum{run['grad_accum']}"


@pytest.mark.parametrize("run", RUNS, ids=_name)
def test_combination_trains_samples_checkpoints_resumes_exactly(run, text_data, tmp_path, capsys):
    out = tmp_path / "run"
    config = _config(text_data, out, run)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config))
    (tmp_path / "worker.py").write_text(WORKER)
    step2 = out / "checkpoints" / "step_0000002.pt"
    proc = _launch(_torchrun(tmp_path / "worker.py", str(cfg), str(DIST_TIMEOUT_S), str(step2)), _name(run))
    assert proc.returncode == 0, f"{_name(run)}:\n{proc.stderr[-4000:]}"
    first, resumed = proc.stdout.split("---- resume\n")
    for text in (first, resumed):  # train.py's summary line, from rank 0 only
        assert text.count("step 4: valid loss ") == 1, proc.stdout

    # The resume from step 2 set the first run's newer files aside and wrote the same step 4, bit for bit: weights,
    # both optimizers, data position, random state, loss scale, re-initialisation window, best entry.
    (aside,) = (out / "checkpoints").glob("abandoned-*")
    again, before = load_checkpoint(out / "checkpoints" / "step_0000004.pt"), load_checkpoint(aside / "step_0000004.pt")
    for key in ("model", "optimizers", "step", "data", "rng", "scaler", "reinit", "best"):
        _same(again[key], before[key], key)
    assert [p.name for p in list_checkpoints(out)] == ["step_0000002.pt", "step_0000004.pt"]

    table = again["model"]["blocks.1.memory.values.weight"]
    assert table.shape == (8 * 8, 32)  # whole tables in the file, sharded or not
    if run["feature"] == "memory+":
        assert torch.equal(again["model"]["blocks.0.after_memory.values.weight"], table)  # one shared table
        assert again["model"]["blocks.1.memory.gate_proj.weight"].shape == (32, 32)  # gated reads
    if run["feature"] == "reinit":
        assert again["reinit"] is not None and "dead-slot re-initialisation" in proc.stderr
    if run["feature"] == "keep_best":
        best = load_checkpoint(best_path(out))
        assert best["best"]["step"] == best["step"] and best["step"] in (2, 4)
        _same(best["model"], load_checkpoint(out / "checkpoints" / f"step_{best['step']:07d}.pt")["model"], "best")
    if run["feature"] == "plain" and run["values"] == "sharded":
        assert again["optimizers"]["values"]["state"][0]["moments"].shape == (64, 2, 32)  # whole-width moments

    # Samples were logged at every validation; each is what one process samples from that step's checkpoint.
    logged = _logged_samples(out)
    assert sorted(logged) == ["samples/0", "samples/1", "samples/2"], logged
    for step in (2, 4):
        trained = load_trained(out / "checkpoints" / f"step_{step:07d}.pt")
        alone = ValidationSamples(trained.codec, open_split(text_data / "valid"), window=trained.config.data.bptt,
                                  seed=trained.config.train.seed, precision=run["precision"]).texts(trained.model)
        for tag, text in alone.items():
            assert sorted(logged[tag]) == [2, 4] and " ▶ " in text
            assert logged[tag][step] == text, (step, tag, logged[tag][step], text)

    if run["values"] == "sharded":  # the sharded checkpoint, in one process, through each command line
        _use_in_one_process(out, text_data, again, capsys)


def _use_in_one_process(out: Path, data_dir: Path, state: dict, capsys) -> None:
    capsys.readouterr()
    evaluate = _cli("evaluate")
    assert evaluate.main([str(out), "--json", str(out / "eval.json"), "--device", "cpu"]) == 0
    import json
    row = json.loads((out / "eval.json").read_text())[0]
    assert row["step"] == 4 and row["params_memory_values"] >= 64 * 32 and 1 < row["valid_ppl"] < 400 * 2, row

    generate = _cli("generate")
    args = [str(out), "--prompt", "The government said", "--max-new-tokens", "12", "--seed", "3", "--device", "cpu"]
    capsys.readouterr()
    assert generate.main(args) == 0
    text = capsys.readouterr().out
    assert generate.main(args) == 0 and capsys.readouterr().out == text  # same seed, same text
    assert text.lower().startswith("the government said")

    from pkmlm.eval.inspect import main as inspect_main
    assert inspect_main([str(out), "--layer", "blocks.1.memory", "--top", "3", "--contexts", "1",
                         "--max-tokens", "256", "--device", "cpu"]) == 0
    report = capsys.readouterr().out
    assert "slot" in report.lower() and "[[" in report, report


@pytest.mark.parametrize("options, message", [
    ({"memory": {"shard_values": True, "v_dim": 33}}, "2 processes do not divide v_dim=33"),
    ({"memory": {"values_file": "values.bin", "share_values": True}}, "memory.values_file keeps the value table"),
    ({"train": {"sync_batchnorm": True}}, "train.sync_batchnorm=true needs CUDA devices"),
], ids=["sharded-odd-v_dim", "values_file-2-processes", "sync_batchnorm-cpu"])
def test_unsupported_combinations_are_refused_at_start(options, message, text_data, tmp_path):
    """torchrun train.py: each rank says why in one line and exits 2 before writing anything (torchrun may stop a
    rank's peers before they print)."""
    config = _config(text_data, tmp_path / "run", {"values": "replicated", "feature": "plain", "precision": "fp32",
                                                   "grad_accum": 1})
    for section, values in options.items():
        config[section].update(values)
    if "values_file" in config["memory"]:
        config["memory"]["values_file"] = str(tmp_path / "values.bin")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config))
    logs = tmp_path / "logs"
    args = _torchrun(ROOT / "train.py", "--config", str(cfg))
    script = args.index(str(ROOT / "train.py"))
    args[script:script] = [f"--log-dir={logs}", "--redirects=3"]  # each rank's stderr in its own file
    proc = _launch(args, f"refusal of {options}", timeout=120)
    assert proc.returncode != 0
    assert "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]  # torchrun's report of the first rank to stop
    errors = {}
    for log in logs.glob("*/attempt_0/*/stderr.log"):
        errors[int(log.parent.name)] = log.read_text().splitlines()
    assert sorted(errors) == [0, 1]
    printed = [lines for lines in errors.values() if lines]
    assert printed, errors
    for lines in printed:
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "run").exists() and not (tmp_path / "values.bin").exists()


# The bug of issue 22, put back: rank 0 samples alone (its sharded reads are collectives), rank 1 goes on.
RANK0_SAMPLES_ALONE = textwrap.dedent("""
    import os, runpy, sys
    from pkmlm.training.trainer import Trainer
    original = Trainer._validation_samples
    def rank0_only(self):
        samples = original(self)
        return samples if self.env.is_main else None
    Trainer._validation_samples = rank0_only
    sys.argv = ["train.py", *sys.argv[1:]]
    runpy.run_path("train.py", run_name="__main__")
""")


def test_a_collective_that_rank_0_enters_alone_fails_at_once_naming_both_ranks(text_data, tmp_path):
    """With PKMLM_COLLECTIVE_CHECK=1 the hang of issue 22 (a sharded run's first validation) is an error on both ranks
    within seconds, naming rank 0's samples and where rank 1 went, instead of a wait of train.dist_timeout_s."""
    config = _config(text_data, tmp_path / "run", {"values": "sharded", "feature": "plain", "precision": "fp32",
                                                   "grad_accum": 1})
    config["train"]["dist_timeout_s"] = 600  # what would bound the hang without the check
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config))
    (tmp_path / "worker.py").write_text(RANK0_SAMPLES_ALONE)
    proc = _launch(_torchrun(tmp_path / "worker.py", "--config", str(cfg)), "rank 0 sampling alone", timeout=180)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines()
              if line.startswith("error: ranks entered different collectives")]
    assert len(errors) == 2, proc.stderr[-4000:]  # one per rank
    for line in errors:
        rank0, rank1 = line.split("rank 0 at ", 1)[1].split("; rank 1 at ", 1)
        assert "trainer.py:_log_validation:" in rank0 and "value_table.py:forward:" in rank0, line
        assert "trainer.py:_log_validation:" not in rank1.split("):")[0], line
