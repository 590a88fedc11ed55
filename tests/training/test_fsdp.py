"""train.parallel=fsdp (FSDP2) on the CPU under torchrun with gloo: 1 vs 2 vs 4 processes, DDP vs FSDP, exact
resume, whole checkpoints, bf16 and fp16 (grad scaler) with sharded gradients.

Every run has dropout off (masks differ by process count) and grad_clip 0.05, so that every step clips and the
norm over the shards is what is compared. Each torchrun launch takes ~10 s here, so all of them are slow tests.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from pkmlm.checkpoint import list_checkpoints, load_checkpoint
from pkmlm.config import Config, ConfigError
from pkmlm.training.trainer import train

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 64
TABLE = "blocks.1.memory.values.weight"

WORKER = textwrap.dedent("""
    import json, os, sys, yaml
    from pkmlm.config import Config
    from pkmlm.training.trainer import train
    config = Config.from_dict(yaml.safe_load(open(sys.argv[1])))
    result = train(config, resume=sys.argv[3] if len(sys.argv) > 3 else None)
    with open(f"{sys.argv[2]}/rank{os.environ['RANK']}.json", "w") as f:
        json.dump({"losses": result.losses, "valid": result.valid_loss}, f)
""")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, random_corpus):
    """A random-token corpus: 8k training tokens, 1k validation tokens."""
    return random_corpus(tmp_path_factory.mktemp("data"), {"train": (160, 50), "valid": (20, 50)}, vocab=VOCAB,
                         vocab_hash="test-vocab", eos_id=0, low=1)


def config(data_dir, out_dir, **train) -> dict:
    """Two layers, a memory in parallel to layer 1's FFN (query BatchNorm on), global batch 8 x 16 tokens."""
    return {
        "model": {"n_layers": 2, "d_model": 32, "n_heads": 2, "dropout": 0.0, "max_seq_len": 16},
        "memory": {"positions": ["1:parallel"], "n_keys": 8, "heads": 2, "knn": 4, "k_dim": 16},
        "data": {"dir": str(data_dir), "batch_size": 8, "bptt": 16},
        "train": {"out_dir": str(out_dir), "max_steps": 4, "lr": 3e-3, "warmup_steps": 2, "grad_clip": 0.05,
                  "log_every": 2, "eval_every": 4, "eval_batches": 0, "checkpoint_every": 2, "device": "cpu",
                  **train},
    }


def torchrun(tmp_path: Path, cfg: dict, world: int, resume: str | None = None) -> list[dict]:
    """Run ``cfg`` on ``world`` gloo processes; every rank's {"losses": {step: loss}, "valid": loss}."""
    results = tmp_path / f"results_{Path(cfg['train']['out_dir']).name}"
    results.mkdir()
    (tmp_path / "worker.py").write_text(WORKER)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                      "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                           str(tmp_path / "worker.py"), str(tmp_path / "c.yaml"), str(results),
                           *([resume] if resume else [])], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = []
    for r in range(world):
        saved = json.loads((results / f"rank{r}.json").read_text())
        out.append({"losses": {int(s): v for s, v in saved["losses"].items()}, "valid": saved["valid"]})
    return out


def last_checkpoint(out_dir) -> dict:
    return load_checkpoint(list_checkpoints(out_dir)[-1])


def assert_whole(state: dict, reference: dict) -> None:
    """``state`` (an FSDP checkpoint) holds plain tensors of the shapes and dtypes of ``reference`` (one process's)."""
    assert state["model"].keys() == reference["model"].keys()
    for name, t in state["model"].items():
        assert type(t) is torch.Tensor and t.shape == reference["model"][name].shape, name
        assert t.dtype == reference["model"][name].dtype, name
    dense, ref = state["optimizers"]["dense"], reference["optimizers"]["dense"]
    assert dense["state"].keys() == ref["state"].keys() and dense["param_groups"] == ref["param_groups"]
    for i, entries in dense["state"].items():
        for key, t in entries.items():
            assert type(t) is torch.Tensor and t.shape == ref["state"][i][key].shape, (i, key)


def assert_same_checkpoint(a: dict, b: dict, *, atol: float, batchnorm: bool = True) -> None:
    """Model weights and Adam moments of two checkpoints within ``atol`` (0: bitwise), BatchNorm statistics too
    when ``batchnorm``."""
    tol = dict(rtol=0 if atol == 0 else 1e-4, atol=atol)
    for name, t in a["model"].items():
        if batchnorm or ("running_" not in name and "num_batches" not in name):
            torch.testing.assert_close(t, b["model"][name], **tol, msg=name)
    for part in ("dense", "values"):
        for i, entries in a["optimizers"][part]["state"].items():
            for key, t in entries.items():
                torch.testing.assert_close(t, b["optimizers"][part]["state"][i][key], **tol, msg=f"{part} {i} {key}")


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory):
    """The same 4 steps in one process with grad_accum=4: micro-batch i holds the rows rank i of 4 (or micro-batch
    i % 2 of rank i // 2 of 2) gets, so even the query BatchNorm sees the same batches."""
    out = tmp_path_factory.mktemp("one") / "run"
    result = train(Config.from_dict(config(data_dir, out, grad_accum=4)))
    return result, last_checkpoint(out)


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    """run(parallel, world, precision): a 4-step run on ``world`` processes (global batch split as in
    ``one_process``), made once per module: (every rank's results, its out_dir)."""
    done = {}

    def get(parallel: str, world: int, precision: str = "fp32", shard_values: bool = False):
        key = (parallel, world, precision, shard_values)
        if key not in done:
            root = tmp_path_factory.mktemp(f"{parallel}{world}{precision}")
            out = root / "run"
            cfg = config(data_dir, out, parallel=parallel, grad_accum=4 // world, precision=precision)
            cfg["memory"]["shard_values"] = shard_values
            done[key] = torchrun(root, cfg, world), out
        return done[key]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("world, shard_values", [(2, False), (4, False), (2, True)],
                         ids=["2", "4", "2-sharded-values"])
def test_fsdp_matches_one_process_with_whole_checkpoints(world, shard_values, run, one_process, data_dir, tmp_path):
    """FSDP over 2 or 4 processes: the losses and the checkpointed weights and moments of one process. Tolerance:
    losses rel 1e-5, weights and moments 1e-4 (3% of one Adam step at lr 3e-3: gradients summed in another order
    move an element by a visible part of a step, as in the DDP test). The checkpoint holds whole plain tensors and
    resumes in one process. With memory.shard_values each rank also holds half the value table's columns (the
    one-process table is initialised with the same numbers)."""
    single, reference = one_process
    ranks, out = run("fsdp", world, shard_values=shard_values)
    assert all(r == ranks[0] for r in ranks)  # every rank reports the same global losses
    for step, loss in single.losses.items():
        assert ranks[0]["losses"][step] == pytest.approx(loss, rel=1e-5)
    saved = last_checkpoint(out)
    assert_whole(saved, reference)
    # BatchNorm statistics: one process updates them once per micro-batch, W ranks average theirs.
    assert_same_checkpoint(saved, reference, atol=1e-4, batchnorm=False)
    shutil.copytree(out, tmp_path / "alone")  # one process, no process group
    alone_config = config(data_dir, tmp_path / "alone", grad_accum=4 // world, max_steps=5)
    alone_config["memory"]["shard_values"] = shard_values
    alone = train(Config.from_dict(alone_config), resume="latest")
    assert alone.step == 5 and set(alone.losses) == {5}


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_fsdp_equals_ddp(precision, run):
    """2 processes, grad_accum 2 (FSDP's gradient sync off on the first micro-batch): FSDP gives DDP's losses and
    checkpoints (bf16: FSDP gathers the matmul weights rounded to bf16 exactly as autocast casts them; fp16: the
    scaler's inf check covers every shard, so an overflow skips the step on every rank). Not bitwise: the clipping
    norm sums the squares of shards instead of whole tensors, so the clip factor differs in the last bit (weights
    differ by ~3e-8 after 4 steps); tolerance: losses rel 1e-6, weights and moments 1e-6."""
    ddp, ddp_out = run("ddp", 2, precision)
    fsdp, fsdp_out = run("fsdp", 2, precision)
    assert fsdp[1] == fsdp[0]
    for step, loss in ddp[0]["losses"].items():
        assert fsdp[0]["losses"][step] == pytest.approx(loss, rel=1e-6)
    assert fsdp[0]["valid"] == pytest.approx(ddp[0]["valid"], rel=1e-6)
    assert_same_checkpoint(last_checkpoint(fsdp_out), last_checkpoint(ddp_out), atol=1e-6)


@pytest.mark.slow
def test_fsdp_resumes_exactly(run, data_dir, tmp_path):
    """The bf16 FSDP run resumed from its step-2 checkpoint at the same world size: bitwise the same steps 3-4 and
    the same final checkpoint (weights, moments, BatchNorm statistics)."""
    whole, out = run("fsdp", 2, "bf16")
    step2 = list_checkpoints(out)[0]
    (tmp_path / "cut" / "checkpoints").mkdir(parents=True)
    shutil.copy(step2, tmp_path / "cut" / "checkpoints" / step2.name)
    rest = torchrun(tmp_path, config(data_dir, tmp_path / "cut", parallel="fsdp", grad_accum=2, precision="bf16"), 2,
                    resume="latest")
    assert rest[0]["losses"] == {s: whole[0]["losses"][s] for s in (3, 4)} and rest[0]["valid"] == whole[0]["valid"]
    assert_same_checkpoint(last_checkpoint(tmp_path / "cut"), last_checkpoint(out), atol=0)


@pytest.mark.parametrize("override, message", [
    ({"parallel": "zero3"}, "train.parallel"),
])
def test_parallel_is_validated(override, message, data_dir, tmp_path):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict(config(data_dir, tmp_path, **override))


@pytest.mark.slow
def test_fsdp_dead_slot_reinit_matches_one_process(data_dir, tmp_path, capsys):
    """memory.reinit_every under FSDP: the dead sub-keys are re-drawn in the sharded key tensor and their sharded
    Adam moments zeroed (pkmlm.distributed.set_where_), the dead value rows (outside FSDP) as under DDP. 2
    processes give one process's losses and checkpoint (tolerances of the test above) over 4 steps with a
    re-initialisation at steps 2 and 4, which here re-draws both value slots and sub-keys (a 4,096-slot memory that
    this batch leaves partly unread)."""
    def reinit_config(out, **train):
        cfg = config(data_dir, out, **train)
        cfg["memory"].update(n_keys=64, reinit_every=2)
        return cfg

    single = train(Config.from_dict(reinit_config(tmp_path / "one", grad_accum=4)))
    reports = [line for line in capsys.readouterr().err.splitlines() if "dead-slot re-initialisation" in line]
    assert reports[0].startswith("step 2:") and " 0 sub-keys" not in reports[0] and " 0 slots" not in reports[0]
    ranks = torchrun(tmp_path, reinit_config(tmp_path / "fsdp", parallel="fsdp", grad_accum=2), 2)
    assert ranks[1] == ranks[0]
    for step, loss in single.losses.items():
        assert ranks[0]["losses"][step] == pytest.approx(loss, rel=1e-5)
    saved, reference = last_checkpoint(tmp_path / "fsdp"), last_checkpoint(tmp_path / "one")
    assert_whole(saved, reference)
    dead = [c["reinit"]["last_reset"]["blocks.1.memory"] for c in (saved, reference)]
    assert torch.equal(dead[0], dead[1])  # the same slots re-initialised at step 4
    assert_same_checkpoint(saved, reference, atol=1e-4, batchnorm=False)
