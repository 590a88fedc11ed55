"""Dead-slot re-initialisation: config keys, the layer's reinit methods, DeadSlotReinit's choice and its resets."""

import pytest
import torch

from pkmlm.config import Config, ConfigError
from pkmlm.memory import ProductKeyMemory
from pkmlm.models.transformer import TransformerLM
from pkmlm.training.optim import make_optimizers
from pkmlm.training.reinit import DeadSlotReinit

VOCAB = 32


def _config(**memory) -> Config:
    return Config.from_dict({
        "model": {"n_layers": 2, "d_model": 16, "n_heads": 2, "dropout": 0.0, "max_seq_len": 8},
        "memory": {"positions": ["0:parallel", "1:after"], "n_keys": 8, "heads": 2, "knn": 2, "k_dim": 8,
                   "reinit_every": 2, **memory},
        "data": {"dir": "unused", "batch_size": 2, "bptt": 8},
        "train": {"max_steps": 1},
    })


@pytest.mark.parametrize("key, value, message", [
    ("reinit_every", -1, "must be >= 0"),
    ("reinit_min_count", 0, "must be >= 1"),
    ("positions", [], "no memory"),
])
def test_config_rejects_bad_reinit_values(key, value, message):
    with pytest.raises(ConfigError, match=f"memory.(reinit_every|{key}).*{message}"):
        _config(**{key: value})


def test_layer_reinit_methods_touch_only_the_given_rows_and_check_input():
    m = ProductKeyMemory(8, 8, n_keys=4, heads=2, knn=2, k_dim=4)
    values, keys = m.values.weight.detach().clone(), m.keys.detach().clone()
    m.reinit_slots(torch.tensor([1, 5]), torch.Generator().manual_seed(0))
    assert (m.values.weight != values).any(1).nonzero().flatten().tolist() == [1, 5]
    mask = torch.zeros(2, 2, 4, dtype=torch.bool)
    mask[1, 0, 2] = True
    m.reinit_subkeys(mask, torch.Generator().manual_seed(0))
    assert (m.keys != keys).any(-1).nonzero().tolist() == [[1, 0, 2]]
    assert m.keys.abs().max() <= 2**-0.5  # U(+-half**-0.5), half = 2
    with pytest.raises(ValueError, match=r"slots must lie in \[0, 16\)"):
        m.reinit_slots(torch.tensor([16]))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(2, 2, 4\)"):
        m.reinit_subkeys(torch.ones(2, 4, dtype=torch.bool))


def _trained(seed: int = 0, steps: int = 2, share_values: bool = False):
    """A model trained ``steps`` steps with the window observed: (model, optimizers, policy, window counts)."""
    torch.manual_seed(0)
    config = _config(share_values=share_values)
    model = TransformerLM(config, VOCAB)
    optim = make_optimizers(model, lr=1e-2, value_lr=1e-2)
    data = torch.Generator().manual_seed(1)
    # One step before the window: slots read here but not in the window have optimizer state to reset.
    model(torch.randint(0, VOCAB, (2, 8), generator=data)).logsumexp(-1).mean().backward()
    optim.step()
    optim.zero_grad()
    policy = DeadSlotReinit(model, optim, every=2, min_count=1, seed=seed)
    slot_counts = {name: 0 for name, _ in model.memories()}
    subkey_counts = {name: 0 for name, _ in model.memories()}
    for _ in range(steps):
        idx = torch.randint(0, VOCAB, (1, 4), generator=data)  # few reads: dead slots and sub-keys
        model(idx).logsumexp(-1).mean().backward()
        optim.step()
        optim.zero_grad()
        for name, m in model.memories():  # the window, read independently of the policy
            slot_counts[name] = slot_counts[name] + m.usage()["counts"].sum(0)
            subkey_counts[name] = subkey_counts[name] + m.usage()["subkey_counts"]
        policy.observe()
    return model, optim, policy, slot_counts, subkey_counts


def _snapshot(model, optim):
    keys = {name: m.keys.detach().clone() for name, m in model.memories()}
    key_moments = {name: optim.dense.state[m.keys]["exp_avg_sq"].clone() for name, m in model.memories()}
    values = {name: m.values.weight.detach().clone() for name, m in model.memories()}
    value_state = {name: {k: v.clone() for k, v in optim.values.state[m.values.weight].items()}
                   for name, m in model.memories()}
    dense = {n: p.detach().clone() for n, p in model.named_parameters() if "keys" not in n and "values" not in n}
    return keys, key_moments, values, value_state, dense


def test_reinit_touches_only_unused_slots_subkeys_and_their_optimizer_state():
    model, optim, policy, slot_counts, subkey_counts = _trained()
    for _, m in model.memories():
        # Sub-keys in a half's top-knn but in no selected pair get no gradient, so whether a dead sub-key has
        # Adam state depends on the seed; give every sub-key state, so the reset is always visible.
        optim.dense.state[m.keys]["exp_avg_sq"].add_(1.0)
    keys, key_moments, values, value_state, dense = _snapshot(model, optim)
    assert policy.maybe_reinit(1) is None  # not a reinit step: nothing happens
    report = policy.maybe_reinit(2)
    for name, m in model.memories():
        dead = slot_counts[name] == 0
        assert 0 < dead.sum() < dead.numel()  # the test needs both kinds
        changed_rows = (m.values.weight != values[name]).any(1)
        assert torch.equal(changed_rows, dead), name
        assert (value_state[name]["step"][dead] > 0).any()  # some dead rows had state to reset
        for k, after in optim.values.state[m.values.weight].items():  # every per-row tensor (moments, step)
            assert (after[dead] == 0).all() and torch.equal(after[~dead], value_state[name][k][~dead]), k
        dead_keys = subkey_counts[name] == 0  # (heads, 2, n_keys)
        assert dead_keys.any() and not dead_keys.all()
        assert torch.equal((m.keys != keys[name]).any(-1), dead_keys)
        assert (key_moments[name][dead_keys] != 0).any()
        moments = optim.dense.state[m.keys]["exp_avg_sq"]
        assert (moments[dead_keys] == 0).all() and torch.equal(moments[~dead_keys], key_moments[name][~dead_keys])
        assert report[name]["dead_slots"] == int(dead.sum())
        assert report[name]["usage"] == pytest.approx(1 - dead.double().mean().item())
        assert report[name]["dead_subkeys"] == int(dead_keys.sum())
    for n, p in model.named_parameters():  # everything else is untouched
        if n in dense:
            assert torch.equal(p, dense[n]), n
    # A new window starts: the next decision sees only what is read after this one.
    assert all(not c.any() for c in policy.slot_counts.values())


def test_reinit_is_deterministic_and_seeded():
    runs = [_trained(seed=s)[:3] for s in (0, 0, 1)]
    for _, _, policy in runs:
        policy.maybe_reinit(2)
    (a, _, _), (b, _, _), (c, _, _) = runs
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), name
    assert any(not torch.equal(p, r) for (n, p), r in zip(a.named_parameters(), c.parameters()) if "values" in n)


def test_shared_table_slot_is_dead_only_when_no_sharer_read_it():
    model, optim, policy, slot_counts, _ = _trained(share_values=True)
    (first, m), _ = model.memories()
    values = m.values.weight.detach().clone()
    report = policy.maybe_reinit(2)
    assert list(report) == [first]  # one decision for the one table
    dead = sum(slot_counts.values()) == 0
    assert torch.equal((m.values.weight != values).any(1), dead)


def test_window_survives_a_checkpoint_round_trip():
    model, optim, policy, _, _ = _trained()
    state = policy.state_dict()
    fresh = DeadSlotReinit(model, optim, every=2, min_count=1, seed=0)
    fresh.load_state_dict(state)
    for name, counts in policy.slot_counts.items():
        assert torch.equal(fresh.slot_counts[name], counts)
        assert torch.equal(fresh.subkey_counts[name], policy.subkey_counts[name])


@pytest.mark.slow
def test_training_with_reinit_logs_and_resumes_exactly(tmp_path, capsys, random_corpus):
    """train(): re-initialisations at steps 2 and 4; a run cut at step 3 (mid-window) and resumed ends identical."""
    from pkmlm.training.trainer import train

    random_corpus(tmp_path / "data", {"train": (20, 30), "valid": (20, 30)}, vocab=VOCAB, vocab_hash="v", eos_id=1)

    def config(out, max_steps):
        c = _config().to_dict()
        c["data"].update(dir=str(tmp_path / "data"), batch_size=2)
        c["train"].update(out_dir=str(tmp_path / out), max_steps=max_steps, eval_every=3, eval_batches=1,
                          checkpoint_every=3, device="cpu", warmup_steps=1)
        return Config.from_dict(c)

    whole = train(config("whole", 5))
    assert capsys.readouterr().err.count("dead-slot re-initialisation") == 2
    train(config("cut", 3))
    rest = train(config("cut", 5), resume="latest")
    for (name, a), b in zip(whole.model.state_dict().items(), rest.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_frozen_keys_are_not_reinitialised_and_flat_memories_are_refused():
    def model(**memory):
        torch.manual_seed(0)
        config = Config.from_dict({
            "model": {"n_layers": 2, "d_model": 16, "n_heads": 2, "max_seq_len": 8},
            "memory": {"positions": ["1:replace"], "n_keys": 16, "heads": 1, "knn": 2, "k_dim": 8, **memory},
            "data": {"batch_size": 2, "bptt": 8}, "train": {"max_steps": 1}})
        return TransformerLM(config, 20)

    frozen = model(learn_keys=False)
    mem = frozen.memories()[0][1]
    keys, values = mem.keys.detach().clone(), mem.values.weight.detach().clone()
    reinit = DeadSlotReinit(frozen, make_optimizers(frozen, lr=1e-3, value_lr=1e-3), every=1, min_count=1, seed=0)
    frozen(torch.randint(0, 20, (1, 4)))  # 4 tokens x 2 slots: most of the 256 slots and 32 sub-keys unused
    report = reinit.after_step(1)
    assert report["blocks.1.memory"]["dead_slots"] > 0 and report["blocks.1.memory"]["dead_subkeys"] == 0
    assert torch.equal(mem.keys, keys) and not torch.equal(mem.values.weight, values)

    flat = model(flat=True)
    with pytest.raises(ValueError, match="product keys"):
        DeadSlotReinit(flat, make_optimizers(flat, lr=1e-3, value_lr=1e-3), every=1, min_count=1, seed=0)
