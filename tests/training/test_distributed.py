import os
import signal
import stat
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pkmlm import distributed as D
from pkmlm.training import parallel as P

from conftest import free_port


def _fake_scontrol(tmp_path, monkeypatch, hostnames="node-a\nnode-b\n"):
    """Put a fake `scontrol` first on PATH: it records its arguments and prints ``hostnames``."""
    log = tmp_path / "scontrol.log"
    script = tmp_path / "bin" / "scontrol"
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\necho "$@" >> {log}\n[ "$1" = show ] && printf "{hostnames}"\nexit 0\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    return log


def test_no_launcher_means_one_process():
    assert D.detect_env({}) == D.DistEnv()
    assert D.detect_env({}).is_main


def test_torchrun_env():
    env = D.detect_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1",
                        "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert env == D.DistEnv(3, 4, 1, "10.0.0.1", 1234, "torchrun")


def test_slurm_env_takes_master_from_first_host(tmp_path, monkeypatch):
    log = _fake_scontrol(tmp_path, monkeypatch)
    env = D.detect_env({"SLURM_PROCID": "9", "SLURM_NTASKS": "32", "SLURM_LOCALID": "1",
                        "SLURM_JOB_NODELIST": "node-[a-d]"})
    assert env == D.DistEnv(9, 32, 1, "node-a", D.DEFAULT_MASTER_PORT, "slurm")
    assert log.read_text().split() == ["show", "hostnames", "node-[a-d]"]
    # An explicit MASTER_ADDR / MASTER_PORT wins over scontrol.
    env = D.detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "MASTER_ADDR": "h0", "MASTER_PORT": "4000"})
    assert (env.master_addr, env.master_port, env.local_rank) == ("h0", 4000, 0)


@pytest.mark.parametrize("environ, message", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, "outside"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "SLURM_JOB_NODELIST or MASTER_ADDR"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_PORT": "http"}, "MASTER_PORT"),
])
def test_bad_env_is_a_clear_error(environ, message):
    with pytest.raises(D.DistributedError, match=message):
        D.detect_env(environ)


def test_scontrol_failure_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol at all
    with pytest.raises(D.DistributedError, match="set MASTER_ADDR"):
        D.detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]"})


def test_resolve_device():
    assert D.resolve_device("cpu", D.DistEnv()) == torch.device("cpu")
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        D.resolve_device("tpu", D.DistEnv())
    if not torch.cuda.is_available():
        assert D.resolve_device("auto", D.DistEnv()) == torch.device("cpu")
        with pytest.raises(D.DistributedError, match="train.device=cpu"):
            D.resolve_device("cuda", D.DistEnv())


def test_sync_batchnorm_on_cpu_is_a_clear_error():
    model = torch.nn.BatchNorm1d(4)
    assert P.wrap_model(model, D.DistEnv(), torch.device("cpu"), sparse_params=[], sync_batchnorm=True) is model
    with pytest.raises(D.DistributedError, match="sync_batchnorm=true needs CUDA"):
        P.wrap_model(model, D.DistEnv(0, 2), torch.device("cpu"), sparse_params=[], sync_batchnorm=True)


def test_preemption_signals_set_flag_and_requeue(tmp_path, monkeypatch):
    handler = P.PreemptionHandler().install()
    try:
        assert not handler.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.signal == signal.SIGUSR1
    finally:
        handler.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    log = _fake_scontrol(tmp_path, monkeypatch)
    assert not P.requeue_slurm_job({})
    assert P.requeue_slurm_job({"SLURM_JOB_ID": "4242"})
    assert log.read_text().split() == ["requeue", "4242"]


def _sparse_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    table = torch.nn.Embedding(10, 3, sparse=True)
    dense = torch.nn.Parameter(torch.zeros(2))
    # Different, overlapping rows on each rank, one row twice (uncoalesced), rank 1 reads more rows.
    rows = torch.tensor([[1, 4, 4], [4, 7, 2]])[rank] if rank < 2 else torch.tensor([0])
    (table(rows) * (rank + 1)).sum().backward()
    dense.grad = torch.full((2,), float(rank))
    P.all_reduce_sparse_grads([table.weight, dense])
    torch.save({"grad": table.weight.grad.to_dense(), "sparse": table.weight.grad.is_sparse,
                "dense": dense.grad}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_sparse_grads_matches_dense_average(tmp_path):
    mp.spawn(_sparse_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    expected = torch.zeros(10, 3)
    expected[1] += 1
    expected[4] += 2 + 2
    expected[7] += 2
    expected[2] += 2
    expected /= 2
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["sparse"]
        torch.testing.assert_close(got["grad"], expected)
        torch.testing.assert_close(got["dense"], torch.full((2,), 0.5))


def _timeout_worker(rank, port, out_dir):
    import time
    os.environ.pop("MASTER_ADDR", None)
    D.init_process_group(D.DistEnv(rank, 2, rank, "127.0.0.1", port), torch.device("cpu"), timeout_s=2)
    done = os.path.join(out_dir, "done")
    if rank == 0:  # rank 1 never joins this all_reduce (a stuck peer): it must fail, not hang
        start = time.time()
        try:
            D.all_reduce_sum(torch.ones(1))
            outcome = "returned"
        except Exception as e:  # gloo raises RuntimeError (or DistBackendError) naming the timeout
            outcome = f"{type(e).__name__}: {e}"
        with open(os.path.join(out_dir, "rank0.txt"), "w") as f:
            f.write(f"{time.time() - start}\n{outcome}")
        open(done, "w").close()
    else:
        deadline = time.time() + 120
        while not os.path.exists(done) and time.time() < deadline:
            time.sleep(0.1)
    os._exit(0)  # the group is broken on purpose: skip its teardown


@pytest.mark.slow
def test_process_group_timeout_fails_a_collective_instead_of_hanging(tmp_path):
    port = free_port()
    mp.spawn(_timeout_worker, args=(port, str(tmp_path)), nprocs=2)
    seconds, outcome = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert outcome != "returned" and 1.5 < float(seconds) < 30, outcome


def test_sigterm_is_a_stop_that_a_later_sigusr1_does_not_turn_into_a_requeue():
    handler = P.PreemptionHandler().install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.signal == P.STOP_SIGNAL == signal.SIGTERM and handler.requested
    finally:
        handler.uninstall()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def _union_worker(rank, world, init_file, out_dir, num_rows, reads):
    """Each rank reads its own random rows (some shared, some repeated); saves its synced grad."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(rank)
    table = torch.nn.Embedding(num_rows, 5, sparse=True)
    torch.nn.init.zeros_(table.weight)
    rows = torch.randint(0, num_rows, (reads,))
    (table(rows) * torch.randn(reads, 5)).sum().backward()
    mine = table.weight.grad.coalesce()
    P.all_reduce_sparse_grads([table.weight])
    got = table.weight.grad
    torch.save({"mine": mine.to_dense(), "rows": got._indices()[0], "values": got._values(),
                "coalesced": got.is_coalesced()}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


# Few reads of a large table take the id all_gather; many reads of a small one the bitmap all-reduce.
@pytest.mark.parametrize("world, num_rows, reads", [(2, 10_000, 6), (4, 50, 40)])
@pytest.mark.slow
def test_union_sync_matches_brute_force_and_is_identical_on_every_rank(tmp_path, world, num_rows, reads):
    mp.spawn(_union_worker, args=(world, str(tmp_path / "init"), str(tmp_path), num_rows, reads), nprocs=world)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    mean = sum(g["mine"] for g in got) / world  # the brute-force dense average
    touched = sorted(set().union(*(g["mine"].abs().sum(1).nonzero().flatten().tolist() for g in got)))
    for g in got:
        assert g["coalesced"] and g["rows"].tolist() == touched  # exactly the union: lazy Adam rows stay lazy
        torch.testing.assert_close(g["values"], mean[g["rows"]], rtol=1e-6, atol=1e-7)
        assert torch.equal(g["values"], got[0]["values"])  # bitwise the same on every rank


def _drift_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    a, b = torch.ones(1000, 8), torch.zeros(3)
    P.check_replicas([("a", a), ("b", b)])  # identical: passes
    if rank == 1:
        a[999, 7] = torch.nextafter(a[999, 7], torch.tensor(2.0))  # one ulp on one rank
    try:
        P.check_replicas([("a", a), ("b", b)])
        message = None
    except P.ReplicaDriftError as e:
        message = str(e)
    (Path(out_dir) / f"rank{rank}.txt").write_text(repr(message))
    dist.destroy_process_group()


@pytest.mark.slow
def test_replica_drift_is_detected_on_every_rank(tmp_path):
    mp.spawn(_drift_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert "a differs between ranks (ranks [1] disagree with rank 0)" in message
        assert "resume from the last checkpoint" in message


def _check_worker(rank, port, out_dir):
    """PKMLM_COLLECTIVE_CHECK=1: a matched collective works; different collectives on the two ranks raise on both,
    naming each rank's site; a collective rank 0 enters alone raises on rank 0 within the check's timeout."""
    import time
    os.environ.update(PKMLM_COLLECTIVE_CHECK="1", PKMLM_COLLECTIVE_CHECK_TIMEOUT_S="3")
    D.init_process_group(D.DistEnv(rank, 2, rank, "127.0.0.1", port), torch.device("cpu"), timeout_s=60)
    outcome = {"sum": D.all_reduce_sum(torch.tensor([rank + 1.0])).item()}
    try:  # rank 0 reduces a max, rank 1 a sum: the same shape, so only the call sites tell them apart
        (D.all_reduce_max if rank == 0 else D.all_reduce_sum)(torch.ones(1))
        outcome["mismatch"] = "returned"
    except D.CollectiveMismatch as e:
        outcome["mismatch"] = str(e)
    if rank == 0:  # alone: rank 1 enters no collective any more
        start = time.time()
        try:
            D.broadcast(torch.ones(1))
            outcome["alone"] = "returned"
        except D.CollectiveMismatch as e:
            outcome["alone"] = str(e)
        outcome["seconds"] = time.time() - start
    torch.save(outcome, os.path.join(out_dir, f"rank{rank}.pt"))
    open(os.path.join(out_dir, f"done{rank}"), "w").close()
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(out_dir, "done0")) and time.time() < deadline:
        time.sleep(0.1)
    os._exit(0)  # the check group is broken on purpose: skip its teardown


@pytest.mark.slow
def test_collective_check_names_where_each_rank_is(tmp_path):
    port = free_port()
    mp.spawn(_check_worker, args=(port, str(tmp_path)), nprocs=2)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [g["sum"] for g in got] == [3.0, 3.0]
    for g in got:  # both ranks raise the same error, naming both sites
        assert g["mismatch"].startswith("ranks entered different collectives (rank 0 at "), g["mismatch"]
        assert "distributed.py:all_reduce_max:" in g["mismatch"] and "distributed.py:all_reduce_sum:" in g["mismatch"]
    assert "rank 0 entered a collective at " in got[0]["alone"] and "distributed.py:broadcast:" in got[0]["alone"]
    assert "after 3 s, a collective entered by a subset of ranks" in got[0]["alone"] and got[0]["seconds"] < 30, got[0]


@pytest.mark.parametrize("flag, timeout, message", [("yes", "60", "PKMLM_COLLECTIVE_CHECK='yes'"),
                                                     ("1", "0", "PKMLM_COLLECTIVE_CHECK_TIMEOUT_S='0'")])
def test_collective_check_settings_are_validated(flag, timeout, message, monkeypatch):
    monkeypatch.setenv("PKMLM_COLLECTIVE_CHECK", flag)
    monkeypatch.setenv("PKMLM_COLLECTIVE_CHECK_TIMEOUT_S", timeout)
    with pytest.raises(D.DistributedError, match=message):
        D.collective_check_timeout()
    monkeypatch.setenv("PKMLM_COLLECTIVE_CHECK", "0")
    assert D.collective_check_timeout() is None
