"""torch.compile of memory models (pkmlm.memory.compile_model, train.compile, evaluate.py --compile).

Every op a memory layer calls is a torch.library op with a fake kernel and autograd, so a memory model traces
into one graph; the compiled model trains like the eager one (losses within 1e-5 over 5 steps without dropout,
the value table's gradient still row-sparse for RowAdam) and saves the same checkpoints.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from pkmlm.config import Config, ConfigError
from pkmlm.eval.evaluation import evaluate_checkpoint
from pkmlm.memory import compile_model, kernels
from pkmlm.models.transformer import TransformerLM
from pkmlm.training.optim import make_optimizers
from pkmlm.training.trainer import train

VOCAB = 64

# Memory variants the issue names: tiny_pkm's (replace), Memory+ (gated, qk_norm), a table shared by two
# memories, a memory in parallel with the FFN; "torch path": the same without the compiled CPU kernels.
VARIANTS = {
    "tiny_pkm": {"positions": ["1:replace"]},
    "gated": {"positions": ["1:replace"], "gated": True, "qk_norm": True},
    "shared": {"positions": ["0:after", "1:replace"], "share_values": True},
    "parallel": {"positions": ["1:parallel"]},
}


def config(memory: dict, **train) -> Config:
    return Config.from_dict({
        "model": {"n_layers": 2, "d_model": 32, "n_heads": 2, "dropout": 0.0, "max_seq_len": 32, "vocab_size": VOCAB},
        "memory": {"n_keys": 8, "heads": 2, "knn": 4, "k_dim": 16, **memory},
        "data": {"dir": "unused", "batch_size": 4, "bptt": 16},
        "train": {"max_steps": 5, **train}})


@pytest.fixture(params=["kernels", "torch path"])
def cpu_path(request, monkeypatch):
    """The memory on the compiled CPU kernels (skipped when they cannot be built) or on pure torch."""
    use = request.param == "kernels"
    monkeypatch.setenv(kernels.ENV_VAR, "1" if use else "0")
    if use and not kernels.available():
        pytest.skip("compiled CPU kernels not available (no compiler?)")
    torch._dynamo.reset()
    yield request.param
    torch._dynamo.reset()


@pytest.mark.parametrize("variant", VARIANTS)
def test_memory_models_trace_without_graph_breaks(variant, cpu_path):
    torch.manual_seed(0)
    model = TransformerLM(config(VARIANTS[variant]), VOCAB)
    kernels.available()  # as compile_model does: the kernel build happens outside the trace
    x = torch.randint(0, VOCAB, (2, 16))
    report = torch._dynamo.explain(lambda x: model(x).square().mean())(x)
    assert report.graph_break_count == 0, [r.reason.splitlines()[0] for r in report.break_reasons]
    assert report.graph_count == 1


@pytest.mark.parametrize("positions", [["0:after", "1:replace"], ["0:replace", "0:after", "1:parallel", "1:after"]])
def test_shared_table_gradient_is_autograds_own_sum(positions, cpu_path, monkeypatch):
    """A table shared by several memories takes their gradients through stand-ins (share_table) summed by one op:
    bit for bit the row-sparse gradient autograd's own accumulation gives when every memory reads the table, and
    the other gradients unchanged."""
    torch.manual_seed(0)
    model = TransformerLM(config({"positions": positions, "share_values": True, "n_keys": 32}), VOCAB)
    x = torch.randint(0, VOCAB, (4, 16))

    def grads():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    got = grads()
    monkeypatch.setattr(model, "_shared_table_stand_ins", lambda: [(None, None)] * len(model.blocks))
    expected = grads()
    assert got.keys() == expected.keys()
    table = [g for g in got.values() if g.is_sparse]
    assert len(table) == 1 and 0 < table[0]._nnz() < 32**2  # one table, some rows unread: a real row-sparse sum
    for name in got:
        a, b = got[name], expected[name]
        if a.is_sparse:
            assert torch.equal(a._indices(), b._indices()), name
            a, b = a._values(), b._values()
        assert torch.equal(a, b), name


def train_steps(model, forward, steps=5):
    """Losses of `steps` RowAdam/Adam steps on fixed random batches."""
    optim = make_optimizers(model, lr=1e-2, value_lr=1e-2, betas=(0.9, 0.98), weight_decay=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, VOCAB, (4, 17), generator=gen)
        loss = F.cross_entropy(forward(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        table = model.blocks[1].memory.values.weight
        assert table.grad.is_sparse  # RowAdam's row-sparse gradient, also out of the compiled backward
        optim.step(scaler)
        optim.zero_grad()
        losses.append(loss.item())
    return losses


def assert_compiled_whole(model):
    """Since the counters were cleared, dynamo compiled the model into one graph and inductor compiled its forward
    and backward: no graph break, and no backend failure. Dynamo answers an inductor failure on one of the
    exceptions it tolerates (an op whose output size it refuses, say) by running that graph eagerly, counted under
    "unimplemented" and not as a graph break, with losses unchanged: only these counters show it. This holds for a
    table shared by several memories too (pkmlm.memory.layer.share_table)."""
    counters = torch._dynamo.utils.counters
    breaks = [r.splitlines()[:2] for kind in ("graph_break", "unimplemented") for r in counters[kind]]
    assert not breaks, breaks
    assert counters["aot_autograd"]["not_ok"] == 0, dict(counters["aot_autograd"])
    assert counters["aot_autograd"]["ok"] == counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert counters["frames"]["ok"] == counters["frames"]["total"] == 1, dict(counters["frames"])


# Compiled training: tiny_pkm's memory, and one model holding the other variants (Memory+ gating and qk_norm, a table
# shared by two memories, one of them in parallel with the FFN), so that one compile covers them.
TRAINED = {"tiny_pkm": VARIANTS["tiny_pkm"],
           "gated+shared+parallel": {"positions": ["0:after", "1:parallel"], "share_values": True, "gated": True,
                                     "qk_norm": True}}


@pytest.mark.slow
@pytest.mark.parametrize("variant", TRAINED)
def test_compiled_training_matches_eager(variant, cpu_path):
    """5 steps eager and compiled (inductor, forward and backward) from the same weights: losses within 1e-5, the
    same state_dict keys, and the step compiled whole (assert_compiled_whole: no graph break, no backend fallback)."""
    torch.manual_seed(0)
    eager = TransformerLM(config(TRAINED[variant]), VOCAB)
    compiled = copy.deepcopy(eager)
    expected = train_steps(eager, eager)
    torch._dynamo.utils.counters.clear()
    # As in a fresh process: compile_model itself must allow the backward's data-dependent output sizes. And no
    # compile caches: a graph found in inductor's on-disk cache is not traced again, so a fallback would not show.
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=False), \
            torch.compiler.config.patch(force_disable_caches=True):
        got = train_steps(compiled, compile_model(compiled))
    assert_compiled_whole(compiled)
    assert max(abs(a - b) for a, b in zip(expected, got)) < 1e-5, (expected, got)
    # Weights are not compared: Adam's first steps divide by the root of tiny squared gradients, so a rounding
    # difference in a near-zero gradient moves a weight by up to lr. The losses above are the check.
    assert eager.state_dict().keys() == compiled.state_dict().keys()


@pytest.mark.slow
def test_train_compile_checkpoints_match_eager_and_resume_either_way(tmp_path, random_corpus):
    """train.compile=true: same losses as eager (1e-5), a checkpoint with the eager run's keys (no `_orig_mod.`),
    an eager resume of the compiled run's checkpoint, and evaluate --compile's loss equal to the eager one."""
    random_corpus(tmp_path / "data", {"train": (20, 40), "valid": (4, 40)}, vocab=VOCAB, vocab_hash="v", eos_id=1)

    def run(name, compile, steps=4, resume=None):
        d = config(VARIANTS["tiny_pkm"], max_steps=steps, compile=compile, out_dir=str(tmp_path / name),
                   device="cpu", eval_every=100, checkpoint_every=2, log_every=1, warmup_steps=1).to_dict()
        d["data"]["dir"] = str(tmp_path / "data")
        return train(Config.from_dict(d), resume=resume)

    eager, compiled = run("eager", False), run("compiled", True)
    assert max(abs(eager.losses[s] - compiled.losses[s]) for s in eager.losses) < 1e-5
    saved = {n: torch.load(tmp_path / n / "checkpoints" / "step_0000004.pt", weights_only=True)["model"]
             for n in ("eager", "compiled")}
    assert saved["eager"].keys() == saved["compiled"].keys()
    resumed = run("compiled", False, steps=5, resume="latest")  # the compiled run, resumed eagerly
    assert resumed.step == 5 and list(resumed.losses) == [5]
    # evaluate.py --compile: the same loss as the eager evaluation of the same checkpoint.
    rows = [evaluate_checkpoint(tmp_path / "compiled", splits=["valid"], compile=c) for c in (False, True)]
    assert abs(rows[0]["valid_loss"] - rows[1]["valid_loss"]) < 1e-5 and rows[0]["step"] == 5


def test_compile_refuses_sharded_or_file_backed_tables():
    with pytest.raises(ConfigError, match="train.compile"):
        config({"positions": ["1:replace"], "shard_values": True}, compile=True)
    with pytest.raises(ConfigError, match="train.compile"):
        config({"positions": ["1:replace"], "values_file": "values.bin"}, compile=True)
    with pytest.raises(ConfigError, match="train.compile"):
        config({"positions": ["1:replace"]}, compile="yes")


def test_lookup_op_on_many_tokens_with_grad(cpu_path):
    """The lookup op hands the kernel detached tensors: with several token blocks (parallel matmuls inside the
    kernel) queries that require grad must not reach its matmuls (mm(): out= ... requires grad)."""
    from pkmlm.memory import ProductKeyMemory

    torch.manual_seed(0)
    mem = ProductKeyMemory(32, 32, n_keys=128, heads=4, knn=8, k_dim=32)
    mem(torch.randn(2048, 32)).sum().backward()
    assert mem.keys.grad is not None and mem.values.weight.grad.is_sparse
