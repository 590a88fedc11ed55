"""Fine-tuning modes (pkmlm/training/finetune.py): train.freeze, train.trainable = memory | slots | lora.

What must hold: frozen parameters (and frozen BatchNorm statistics) are bitwise unchanged; in slots mode only
the selected value rows change, they are the TF-IDF top rows, untouched rows keep their optimizer state, and a
resumed run is bitwise the uninterrupted one; LoRA trains adapters only and its checkpoints evaluate."""

from __future__ import annotations

import math
import re

import pytest
import torch

from pkmlm.config import Config, ConfigError
from pkmlm.checkpoint import load_checkpoint
from pkmlm.eval.evaluation import evaluate_checkpoint, load_model
from pkmlm.models.transformer import TransformerLM
from pkmlm.training import finetune as FT
from pkmlm.training.trainer import train

VOCAB = 48
TABLE = "blocks.1.memory.values.weight"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, learnable_corpus):
    """A training corpus, a background corpus (same vocabulary, other documents) and a pretrained run."""
    root = tmp_path_factory.mktemp("finetune")
    data = learnable_corpus(root / "data", vocab=VOCAB, seed=0)
    background = learnable_corpus(root / "background", vocab=VOCAB, seed=1)
    train(Config.from_dict(tiny(data, root / "pretrained", max_steps=6)))
    return data, background, root / "pretrained/checkpoints/step_0000006.pt"


def tiny(data_dir, out_dir, **train_options) -> dict:
    return {
        "model": {"n_layers": 2, "d_model": 32, "n_heads": 2, "dropout": 0.1, "max_seq_len": 16},
        "memory": {"positions": ["0:after", "1:replace"], "n_keys": 8, "heads": 2, "knn": 4, "k_dim": 16},
        "data": {"dir": str(data_dir), "batch_size": 8, "bptt": 16},
        "train": {"out_dir": str(out_dir), "max_steps": 3, "lr": 3e-3, "value_lr": 1e-2, "warmup_steps": 0,
                  "log_every": 1, "eval_every": 100, "eval_batches": 1, "checkpoint_every": 100, "device": "cpu",
                  **train_options},
    }


def slots(dirs, out_dir, **options) -> dict:
    data, background, _ = dirs
    return tiny(data, out_dir, trainable="slots", top_slots=5, background=str(background), **options)


def initial(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


# ---- validation ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("train_options, memory, key", [
    ({"freeze": ["dense", "memory"]}, None, "train.freeze"),
    ({"freeze": ["dense"]}, [], "train.freeze"),
    ({"freeze": ["attn"]}, None, "train.freeze[0]"),
    ({"freeze": ["ffn", "ffn"]}, None, "train.freeze[1]"),
    ({"trainable": "memory", "freeze": ["embeddings"]}, None, "train.freeze"),
    ({"trainable": "everything"}, None, "train.trainable"),
    ({"trainable": "memory"}, [], "train.trainable"),
    ({"trainable": "slots", "background": "bg"}, None, "train.top_slots"),
    ({"trainable": "slots", "top_slots": 4}, None, "train.background"),
    ({"top_slots": 4}, None, "train.top_slots"),
    ({"background": "bg"}, None, "train.background"),
    ({"trainable": "slots", "top_slots": 4, "background": "bg", "slot_selection": "random"}, None,
     "train.slot_selection"),
    ({"trainable": "lora", "lora_rank": 0}, None, "train.lora_rank"),
    ({"trainable": "memory"}, "reinit", "memory.reinit_every"),
])
def test_contradictions_are_one_line_config_errors(train_options, memory, key, tmp_path):
    config = tiny(tmp_path, tmp_path / "run", **train_options)
    if memory == "reinit":
        config["memory"]["reinit_every"] = 10
    elif memory is not None:
        config["memory"]["positions"] = memory
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")) as info:
        Config.from_dict(config)
    assert "\n" not in str(info.value)


def test_parts_cover_the_model():
    model = TransformerLM(Config.from_dict(tiny("d", "o")), VOCAB)
    parts = FT.parts_of(model)
    names = {n for n, _ in model.named_parameters()}
    assert parts["dense"] | parts["memory"] == names and not parts["dense"] & parts["memory"]
    assert parts["embeddings"] == {"tok_emb.weight", "pos_emb.weight"}
    assert parts["memory_values"] == {"blocks.0.after_memory.values.weight", TABLE}
    assert parts["memory_keys"] == {"blocks.0.after_memory.keys", "blocks.1.memory.keys"}
    assert "blocks.0.attn.qkv.weight" in parts["attention"] and "blocks.0.ffn.fc.bias" in parts["ffn"]
    assert "blocks.1.ln2.weight" in parts["norms"] and "blocks.1.memory.query_norm.weight" not in parts["norms"]
    assert parts["attention"] | parts["ffn"] | parts["norms"] | parts["embeddings"] == parts["dense"]


# ---- freeze / trainable=memory ---------------------------------------------------------------------------

@pytest.mark.parametrize("options, frozen_part", [({"trainable": "memory"}, "dense"),
                                                  ({"freeze": ["embeddings", "memory_values"]}, None)])
def test_frozen_parameters_are_bitwise_unchanged(options, frozen_part, dirs, tmp_path):
    data, _, pretrained = dirs
    result = train(Config.from_dict(tiny(data, tmp_path / "ft", **options)), init_from=pretrained)
    before, after = initial(pretrained), result.model.state_dict()
    parts = FT.parts_of(result.model)
    frozen = parts[frozen_part] if frozen_part else parts["embeddings"] | parts["memory_values"]
    for name in after:
        same = torch.equal(before[name], after[name])
        if name in frozen:
            assert same, name
        elif name.endswith(".weight") and "ln" not in name:
            assert not same, f"{name} should have trained"


# ---- slots ----------------------------------------------------------------------------------------------

def test_top_tfidf_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 4, (64,), generator=gen).double()
    background = torch.randint(0, 50, (64,), generator=gen).double()
    rows = FT.top_tfidf(counts, background, 7)
    n = background.sum()
    scored = sorted(((counts[s] / counts.sum() * math.log((n + 1) / (background[s] + 1)), -s)
                     for s in range(64) if counts[s] > 0), reverse=True)
    assert rows.tolist() == sorted(-s for _, s in scored[:7])
    assert FT.top_tfidf(torch.zeros(64), background, 7).numel() == 0
    assert FT.top_tfidf(torch.eye(64)[3], background, 7).tolist() == [3]


def test_read_counts_are_the_slots_forward_reads():
    model = TransformerLM(Config.from_dict(tiny("d", "o")), VOCAB).eval()
    memory = model.blocks[1].memory
    x = torch.randn(5, 32)
    memory.count_reads(True)
    memory(x)
    memory(x)
    slots, _ = memory.reads(x)
    assert torch.equal(memory.take_read_counts(), 2 * torch.bincount(slots.flatten(), minlength=64).double())
    assert memory.take_read_counts().sum() == 0  # taking restarts the count


def record_selections(monkeypatch) -> list[dict]:
    """A list that each step's selected rows ({memory: rows}) are appended to, as FineTuning picks them."""
    selections = []
    original = FT.FineTuning.select_rows

    def recording(self):
        original(self)
        selections.append({k: v.clone() for k, v in self.selected.items()})
    monkeypatch.setattr(FT.FineTuning, "select_rows", recording)
    return selections


def test_slots_update_only_the_selected_rows(dirs, tmp_path, monkeypatch):
    _, _, pretrained = dirs
    selections = record_selections(monkeypatch)
    result = train(Config.from_dict(slots(dirs, tmp_path / "ft", max_steps=1)), init_from=pretrained)
    before, after = initial(pretrained), result.model.state_dict()
    tables = {"blocks.0.after_memory": "blocks.0.after_memory.values.weight", "blocks.1.memory": TABLE}
    for name in after:
        if name not in tables.values():
            assert torch.equal(before[name], after[name]), name  # BatchNorm statistics included
    for key, table in tables.items():
        changed = (before[table] != after[table]).any(1).nonzero().flatten()
        assert selections[0][key].numel() == 5
        assert torch.equal(changed, selections[0][key])  # these rows and no other
    assert (tmp_path / "ft" / FT.BACKGROUND_FILE).is_file()


def test_slots_keep_untouched_rows_optimizer_state_and_resume_exactly(dirs, tmp_path, monkeypatch):
    _, _, pretrained = dirs
    whole = train(Config.from_dict(slots(dirs, tmp_path / "whole", max_steps=4)), init_from=pretrained)
    train(Config.from_dict(slots(dirs, tmp_path / "cut", max_steps=2)), init_from=pretrained)
    state2 = load_checkpoint(tmp_path / "cut/checkpoints/step_0000002.pt")
    # The background counts come from the cache: counting them again would see the fine-tuned weights.
    monkeypatch.setattr(FT, "background_reads", lambda *a, **k: pytest.fail("background counted again"))
    selections = record_selections(monkeypatch)
    rest = train(Config.from_dict(slots(dirs, tmp_path / "cut", max_steps=4)), resume="latest")
    assert rest.losses == {s: l for s, l in whole.losses.items() if s > 2}
    for (name, a), b in zip(whole.model.state_dict().items(), rest.model.state_dict().values()):
        assert torch.equal(a, b), name
    state4 = load_checkpoint(tmp_path / "cut/checkpoints/step_0000004.pt")
    values2, values4 = state2["optimizers"]["values"], state4["optimizers"]["values"]
    table_index = {"blocks.0.after_memory": 0, "blocks.1.memory": 1}
    for key, i in table_index.items():
        touched = torch.cat([s[key] for s in selections]).unique()
        untouched = torch.ones(64, dtype=torch.bool)
        untouched[touched] = False
        for field in ("moments", "step"):
            assert torch.equal(values2["state"][i][field][untouched], values4["state"][i][field][untouched])
        assert (values4["state"][i]["step"][touched] > values2["state"][i]["step"][touched]).all()


# ---- LoRA -----------------------------------------------------------------------------------------------

def test_lora_trains_adapters_only_and_its_checkpoint_evaluates(dirs, tmp_path):
    pytest.importorskip("peft")
    data, _, pretrained = dirs
    result = train(Config.from_dict(tiny(data, tmp_path / "lora", trainable="lora", lora_rank=2, max_steps=3)),
                   init_from=pretrained)
    before, after = initial(pretrained), result.model.state_dict()
    adapters = [n for n in after if "lora_" in n]
    assert adapters and all(".attn." in n or ".ffn." in n for n in adapters)
    assert not any("memory" in n for n in adapters)
    for name, value in after.items():
        if "lora_" not in name:
            assert torch.equal(before[name.replace(".base_layer.", ".")], value), name
    assert any(not torch.equal(after[n], torch.zeros_like(after[n])) for n in adapters if "lora_B" in n)
    path = tmp_path / "lora/checkpoints/step_0000003.pt"
    loaded = load_model(load_checkpoint(path), path, torch.device("cpu"))
    idx = torch.randint(1, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    result.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(idx), result.model(idx))
    row = evaluate_checkpoint(path, splits=["valid"])
    assert math.isfinite(row["valid_loss"])


WORKER = """
import os, sys, torch, yaml
from pkmlm.config import Config
from pkmlm.training.trainer import train
result = train(Config.from_dict(yaml.safe_load(open(sys.argv[1]))))
torch.save(result.model.state_dict(), f"{sys.argv[2]}/rank{os.environ['RANK']}.pt")
"""


@pytest.mark.slow
def test_slots_two_processes_match_one(dirs, tmp_path):
    """torchrun, 2 gloo processes: read counts and background summed over ranks, so both ranks select the rows
    one process selects (whole background split read), and end with its weights."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    config = slots(dirs, tmp_path / "two", max_steps=3, background_tokens=0)
    config["model"]["dropout"] = 0.0
    (tmp_path / "worker.py").write_text(WORKER)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "worker.py"), str(tmp_path / "c.yaml"), str(tmp_path)],
                          cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    config["train"].update(out_dir=str(tmp_path / "one"), grad_accum=2)
    one = train(Config.from_dict(config)).model.state_dict()
    for name, value in one.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-4, atol=1e-5, msg=name)
