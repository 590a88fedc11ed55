"""memory.values_file: the value table and its RowAdam state in memory-mapped files (pkmlm/memory/values_file.py)."""

import hashlib
import os

import pytest
import torch

from pkmlm import checkpoint as ckpt
from pkmlm.checkpoint import list_checkpoints, load_checkpoint
from pkmlm.config import Config, ConfigError
from pkmlm.eval.evaluation import load_model
from pkmlm.memory.values_file import ValuesFile, ValuesFileError
from pkmlm.training.trainer import train

VOCAB = 64


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, learnable_corpus):
    return learnable_corpus(tmp_path_factory.mktemp("data"), vocab=VOCAB, seed=0)


def config(data_dir, out_dir, values_file, **train_settings):
    return Config.from_dict({
        "model": {"n_layers": 2, "d_model": 32, "n_heads": 2, "dropout": 0.1, "max_seq_len": 16},
        "memory": {"positions": ["1:parallel"], "n_keys": 16, "heads": 2, "knn": 4, "k_dim": 16,
                   "values_file": str(values_file)},
        "data": {"dir": str(data_dir), "batch_size": 8, "bptt": 16},
        "train": {"out_dir": str(out_dir), "max_steps": 6, "lr": 1e-2, "warmup_steps": 2, "eval_every": 3,
                  "eval_batches": 2, "checkpoint_every": 3, "device": "cpu", **train_settings},
    })


def digest(path):
    return hashlib.sha1(open(path, "rb").read()).hexdigest()


def test_resume_is_bitwise_exact_and_checkpoints_hold_no_table(data_dir, tmp_path):
    whole = train(config(data_dir, tmp_path / "whole", tmp_path / "whole.values"))
    first = train(config(data_dir, tmp_path / "cut", tmp_path / "cut.values", max_steps=3))
    rest = train(config(data_dir, tmp_path / "cut", tmp_path / "cut.values"), resume="latest")
    assert {**first.losses, **rest.losses} == whole.losses
    assert whole.losses[6] < whole.losses[1] - 0.2  # it learns
    for (name, a), b in zip(whole.model.state_dict().items(), rest.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert digest(tmp_path / "whole.values") == digest(tmp_path / "cut.values")
    assert digest(tmp_path / "whole.values.adam") == digest(tmp_path / "cut.values.adam")
    state = load_checkpoint(list_checkpoints(tmp_path / "cut")[-1])
    assert not any("values.weight" in k for k in state["model"])
    assert all(not s for s in state["optimizers"]["values"]["state"].values())  # moments stay in the file
    assert state["values_file"]["path"] == str(tmp_path / "cut.values")


def test_crash_between_checkpoints_is_rolled_back_on_resume(data_dir, tmp_path, monkeypatch):
    whole = train(config(data_dir, tmp_path / "whole", tmp_path / "whole.values"))
    train(config(data_dir, tmp_path / "run", tmp_path / "run.values", max_steps=3))
    at_step_3 = digest(tmp_path / "run.values")
    real_save = ckpt.save_checkpoint

    def crash(state, *args, **kwargs):  # the process dies before step 5's checkpoint is written
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ckpt, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        train(config(data_dir, tmp_path / "run", tmp_path / "run.values", max_steps=5, checkpoint_every=100),
              resume="latest")
    assert digest(tmp_path / "run.values") != at_step_3  # steps 4 and 5 changed the table in place
    # Evaluation maps the files read-only and sees the table of checkpoint 3, changing nothing on disk.
    files = {p: digest(p) for p in tmp_path.glob("run.values*")}
    path = list_checkpoints(tmp_path / "run")[-1]
    model = load_model(load_checkpoint(path), path, torch.device("cpu"))
    table = next(m for _, m in model.memories()).values.weight
    assert hashlib.sha1(table.detach().numpy().tobytes()).hexdigest() == at_step_3  # the journal undone in RAM
    reference = ValuesFile(tmp_path / "whole.values", table.shape[0], table.shape[1], writable=False)
    assert {p: digest(p) for p in tmp_path.glob("run.values*")} == files
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    rest = train(config(data_dir, tmp_path / "run", tmp_path / "run.values"), resume="latest")
    assert rest.losses == {s: l for s, l in whole.losses.items() if s > 3}  # bitwise, as if never crashed
    assert digest(tmp_path / "run.values") == digest(tmp_path / "whole.values")
    assert not torch.equal(table, reference.weight)  # the whole run moved on from step 3


def test_moments_file_is_allocated_zero_and_never_written_until_used(tmp_path):
    vf = ValuesFile(tmp_path / "v", 1 << 14, 256, writable=True, seed=0)
    adam = tmp_path / "v.adam"
    assert adam.stat().st_size == (1 << 14) * 2 * 256 * 4
    assert vf.moments.count_nonzero() == 0 and vf.step.count_nonzero() == 0
    assert vf.weight.std().item() == pytest.approx(256**-0.5, rel=0.02)
    again = ValuesFile(tmp_path / "v", 1 << 14, 256, writable=False)
    assert torch.equal(again.weight, vf.weight) and again.uid == vf.uid
    with pytest.raises(ValuesFileError, match=r"holds a \(16384, 256\) table, this model needs \(16384, 128\)"):
        ValuesFile(tmp_path / "v", 1 << 14, 128, writable=True)


def test_bad_locations_are_clear_errors(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(ValuesFileError, match="file, not a directory"):
        ValuesFile(blocked / "v", 64, 8, writable=True)
    with pytest.raises(ValuesFileError, match="is a directory: name a file in it"):  # not IsADirectoryError
        ValuesFile(tmp_path, 64, 8, writable=True)
    with pytest.raises(ValuesFileError, match="is a directory: name a file in it"):
        ValuesFile(tmp_path, 64, 8, writable=False)
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    if not os.access(tmp_path / "ro", os.W_OK):  # root writes anywhere
        with pytest.raises(ValuesFileError, match="cannot write in"):
            ValuesFile(tmp_path / "ro" / "v", 64, 8, writable=True)
    import shutil
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**6, 10**6, 1000))
    with pytest.raises(ValuesFileError, match="GiB on disk"):
        ValuesFile(tmp_path / "v", 1 << 12, 64, writable=True)
    with pytest.raises(ValuesFileError, match="no table there"):
        ValuesFile(tmp_path / "absent", 64, 8, writable=False)


def test_config_checks(data_dir, tmp_path):
    def build(**memory):
        c = config(data_dir, tmp_path, tmp_path / "v").to_dict()
        c["memory"].update(memory)
        return Config.from_dict(c)

    with pytest.raises(ConfigError, match="needs exactly one value table, the model has 2"):
        build(positions=["0:parallel", "1:parallel"])
    assert build(positions=["0:parallel", "1:parallel"], share_values=True).memory.values_file
    with pytest.raises(ConfigError, match="reinit_every"):
        build(reinit_every=10)
    with pytest.raises(ConfigError, match="empty"):
        build(values_file=" ")
    with pytest.raises(ConfigError, match="cannot be combined with memory.shard_values"):
        build(shard_values=True)
    with pytest.raises(ConfigError, match="cannot be combined with memory.value_init=zero"):
        build(value_init="zero")
    with pytest.raises(ConfigError, match=r"memory.values_file_cache_gb.*must be > 0"):
        build(values_file_cache_gb=0)
    with pytest.raises(ConfigError, match="memory.values_file_cache_gb.*memory.values_file is not"):
        build(values_file=None, values_file_cache_gb=4)
    assert build(values_file_cache_gb=0.5).memory.values_file_cache_gb == 0.5
    c = config(data_dir, tmp_path, tmp_path / "v").to_dict()
    c["train"]["keep_best"] = True
    with pytest.raises(ConfigError, match="cannot be combined with train.keep_best"):
        Config.from_dict(c)
    c = build()
    with pytest.raises(ConfigError, match="one CPU process"):
        c.validate_runtime(world_size=2)
    with pytest.raises(ConfigError, match="one CPU process"):
        c.validate_runtime(device_type="cuda")


def _update(vf, ids, value):
    """What RowAdam does: mark the rows, then change them in the cache."""
    ids = torch.tensor(ids)
    vf.before_update(ids)
    vf.weight[ids] = value
    vf.moments[ids] = value
    vf.step[ids] += 1


def test_changed_rows_stay_in_ram_until_written_back_and_spill_at_the_bound(tmp_path):
    rows, dim = 4096, 1024  # a row is one page: the bound below holds exactly 3 changed rows
    vf = ValuesFile(tmp_path / "v", rows, dim, writable=True, seed=0, cache_bytes=3 * (4096 + 8192 + 8))
    vf.restore(0)
    on_disk = ValuesFile(tmp_path / "v", rows, dim, writable=False)  # a second, read-only view of the files
    before = on_disk.weight.clone()

    def update(ids, value):
        _update(vf, ids, value)

    update([1, 5], 1.0)
    update([5, 9], 2.0)  # 3 changed rows: at the bound, not past it
    assert digest(tmp_path / "v") == hashlib.sha1(before.numpy().tobytes()).hexdigest()  # files untouched
    assert vf.weight[[1, 5, 9], 0].tolist() == [1.0, 2.0, 2.0]  # reads see the cache
    update([100], 3.0)  # a 4th row: the 3 cached ones are written back first
    disk = torch.from_file(str(tmp_path / "v"), size=rows * dim).view(rows, dim)
    assert torch.equal(disk[[1, 5, 9]], vf.weight[[1, 5, 9]]) and torch.equal(disk[100], before[100])
    assert (vf.weight[100] == 3.0).all()  # the cache holds the newest row
    assert vf.weight[[1, 5, 9], 0].tolist() == [1.0, 2.0, 2.0]  # read back from the files after the write-back
    steps = torch.from_file(str(tmp_path / "v.step"), size=rows, dtype=torch.int64)
    assert steps[[1, 5, 9, 100]].tolist() == [1, 2, 1, 0]
    vf.restore(0)  # a resume from checkpoint 0: the journal brings the written-back rows back
    disk = torch.from_file(str(tmp_path / "v"), size=rows * dim).view(rows, dim)
    assert torch.equal(disk, before) and torch.equal(vf.weight, before)
    assert vf.step.count_nonzero() == 0 and vf.moments.count_nonzero() == 0


def test_a_checkpoint_writes_the_cache_back_and_keeps_it_until_a_spill(tmp_path):
    import resource

    rows, dim = 4096, 1024
    vf = ValuesFile(tmp_path / "v", rows, dim, writable=True, seed=0, cache_bytes=3 * (4096 + 8192 + 8))
    vf.restore(0)
    before = vf.weight.clone()
    _update(vf, [1, 5], 1.0)
    vf.sync()
    vf.checkpoint(1)
    disk = torch.from_file(str(tmp_path / "v"), size=rows * dim).view(rows, dim)
    assert (disk[[1, 5]] == 1.0).all()  # written back
    ids = torch.tensor([1, 5])
    vf.before_update(ids)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    vf.weight[1].fill_(2.0)
    vf.moments[1].fill_(2.0)
    vf.weight[5].fill_(2.0)
    vf.moments[5].fill_(2.0)
    # The kept pages change in place; a dropped cache would fault each of these 6 pages again (read, then copy).
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults < 3
    vf.step[ids] += 1
    assert (disk[[1, 5]] == 1.0).all()  # the files hold checkpoint 1 until the next write-back
    _update(vf, [9], 3.0)  # 3 rows with private pages (2 of them clean since the checkpoint): at the bound
    _update(vf, [100], 4.0)  # past it: the spill writes back rows 1, 5 and 9 and drops the cache
    assert (disk[[1, 5]] == 2.0).all() and (disk[9] == 3.0).all() and torch.equal(disk[100], before[100])
    assert vf.weight[[1, 5, 9, 100], 0].tolist() == [2.0, 2.0, 3.0, 4.0]
    vf.restore(1)  # a resume from checkpoint 1: the rows written back since then return to it
    assert (vf.weight[[1, 5]] == 1.0).all() and torch.equal(vf.weight[9], before[9])
    assert torch.equal(vf.weight[100], before[100]) and vf.step[[1, 5, 9, 100]].tolist() == [1, 1, 0, 0]


def test_a_table_that_fits_the_cache_is_read_into_ram_once_and_written_at_checkpoints(tmp_path):
    rows, dim = 4096, 64
    vf = ValuesFile(tmp_path / "v", rows, dim, writable=True, seed=0, cache_bytes=1 << 30)
    private = [line for line in open("/proc/self/maps") if line.split()[1].endswith("p")
               and line.rstrip().endswith(str(tmp_path / "v"))]
    assert vf.resident and not private  # ordinary memory, not a copy-on-write mapping of the files
    vf.restore(0)
    before = vf.weight.clone()
    disk = torch.from_file(str(tmp_path / "v"), size=rows * dim).view(rows, dim)
    assert torch.equal(disk, before)
    _update(vf, [1, 5], 1.0)
    assert torch.equal(disk, before)  # the files wait for the checkpoint
    vf.sync()
    vf.checkpoint(1)
    assert (disk[[1, 5]] == 1.0).all()
    _update(vf, [5, 9], 2.0)
    vf.sync()  # written back, not yet recorded by a checkpoint: a resume from 1 undoes it
    _update(vf, [100], 3.0)  # changed in RAM only
    vf.restore(1)
    assert (vf.weight[[1, 5]] == 1.0).all() and torch.equal(vf.weight[[9, 100]], before[[9, 100]])
    assert torch.equal(disk, vf.weight) and vf.step[[1, 5, 9, 100]].tolist() == [1, 1, 0, 0]
    assert torch.equal(vf.moments, torch.from_file(str(tmp_path / "v.adam"), size=rows * 2 * dim).view(rows, 2, dim))
    again = ValuesFile(tmp_path / "v", rows, dim, writable=True, cache_bytes=1 << 30)  # moments read back too
    assert torch.equal(again.weight, vf.weight) and torch.equal(again.moments, vf.moments)


def test_a_table_larger_than_the_ram_is_mapped(tmp_path):
    import json

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rows, dim = 2 * ram // (1024 * 4), 1024  # twice the RAM, as a sparse file (no disk used)
    os.truncate(open(tmp_path / "v", "wb").name, rows * dim * 4)
    (tmp_path / "v.json").write_text(json.dumps({"uid": "u", "rows": rows, "dim": dim, "dtype": "float32"}))
    vf = ValuesFile(tmp_path / "v", rows, dim, writable=False)  # a private mapping; ENOMEM without MAP_NORESERVE
    vf.weight[rows - 1, :2] = 1.0
    assert vf.weight[rows - 1, :3].tolist() == [1.0, 1.0, 0.0]
    assert os.stat(tmp_path / "v").st_blocks == 0  # the change stayed in the process


def _train_cli(cfg, *args, kill_at=None):
    import subprocess
    import sys
    from pathlib import Path
    env = {k: v for k, v in os.environ.items() if k != "PKMLM_TEST_KILL_AT"}
    env.update(OMP_NUM_THREADS="1", **({"PKMLM_TEST_KILL_AT": kill_at} if kill_at else {}))
    return subprocess.run([sys.executable, "train.py", "--config", str(cfg), *args], env=env, capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])


def _final_state(run, values):
    state = load_checkpoint(list_checkpoints(run)[-1])
    files = {p.name[len(values.name):]: digest(p) for p in values.parent.glob(values.name + "*")
             if p.suffix in (".values", ".adam", ".step")}
    return state["step"], state["model"], state["optimizers"]["dense"], files


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed processes run (OMP_NUM_THREADS=1): bitwise the same sums
    yield
    torch.set_num_threads(threads)


# Steps 1-8, checkpoints at 3, 6, 8. A tiny cache (mapped) spills before every step: write-backs (3 passes
# each) before steps 2-6 and 7-8 and at checkpoints. A resident cache writes back at checkpoints only.
KILL_POINTS = {1e-6: ["step:5", "journal:4", "writeback:11", "writeback:17", "sync:2", "checkpoint:3"],
               None: ["step:5", "journal:2", "writeback:5", "sync:2", "checkpoint:2"]}


@pytest.mark.slow
@pytest.mark.parametrize("cache_gb", KILL_POINTS, ids=["mapped, spilling", "resident"])
def test_sigkill_at_any_moment_resumes_bitwise(data_dir, tmp_path, one_thread, cache_gb):
    """SIGKILL mid-step, mid-journal, mid-write-back (a spill's, a checkpoint's), with the files durable but
    the checkpoint unwritten, and with the checkpoint written but the journal not reset: the resumed run
    ends bitwise where an uninterrupted one does."""
    import yaml

    def cfg(name):
        c = config(data_dir, tmp_path / name, tmp_path / f"{name}.values", max_steps=8, eval_every=100)
        c.memory.values_file_cache_gb = cache_gb  # 1e-6: one changed row's pages are past it
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(c.to_dict()))
        return c

    whole = train(cfg("whole"))
    step, model, dense, files = _final_state(tmp_path / "whole", tmp_path / "whole.values")
    assert step == 8 and set(files) == {"", ".adam", ".step"}
    for kill_at in KILL_POINTS[cache_gb]:
        name = kill_at.replace(":", "_")
        c = cfg(name)
        crashed = _train_cli(tmp_path / f"{name}.yaml", kill_at=kill_at)
        assert crashed.returncode == -9, (kill_at, crashed.returncode, crashed.stderr[-2000:])
        first = list_checkpoints(tmp_path / name)[-1]
        rest = train(c, resume="latest")
        assert rest.losses == {s: l for s, l in whole.losses.items() if s > load_checkpoint(first)["step"]}, kill_at
        r_step, r_model, r_dense, r_files = _final_state(tmp_path / name, tmp_path / f"{name}.values")
        assert r_step == 8 and r_files == files, kill_at
        for key, tensor in model.items():
            assert torch.equal(r_model[key], tensor), (kill_at, key)
        for key, s in dense["state"].items():
            assert all(torch.equal(r_dense["state"][key][k], v) for k, v in s.items()), (kill_at, key)


def test_a_mapped_table_is_freed_with_its_model(tmp_path):
    """The table's mapping must not outlive the model (else its pages stay mapped and resident)."""
    import gc
    import weakref

    from pkmlm.memory import ProductKeyMemory, make_value_table
    from pkmlm.memory.values_file import attach, file_of

    layer = ProductKeyMemory(32, 32, n_keys=16, heads=2, knn=4, k_dim=16,
                             values=make_value_table(16, 32, device="meta"))
    vf = attach(layer, tmp_path / "v", writable=True)
    assert file_of(layer.values.weight) is vf
    alive = weakref.ref(vf)
    del layer, vf
    gc.collect()
    assert alive() is None
