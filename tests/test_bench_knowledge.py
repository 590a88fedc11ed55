"""bench/knowledge.py's pieces that its numbers rest on: the models it compares and the bits it counts."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from pkmlm.config import Config
from pkmlm.data import facts as F
from pkmlm.models.transformer import TransformerLM

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def knowledge():
    spec = importlib.util.spec_from_file_location("bench_knowledge", ROOT / "bench" / "knowledge.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_knowledge", None)


def counts(knowledge, name, layers, width, vocab=1000):
    config = knowledge.base_config(Path("unused"), Path("unused"), steps=10, lr=1e-2)
    for section, values in knowledge.model_sections(name, layers, width).items():
        config[section] = {**config[section], **values}
    config["model"]["vocab_size"] = vocab
    return TransformerLM(Config.from_dict(config), vocab).num_parameters()


def test_memory_model_reads_within_five_percent_of_dense_and_deep_doubles_the_layers(knowledge):
    dense, memory = counts(knowledge, "dense", 2, 64), counts(knowledge, "memory", 2, 64)
    assert dense["memory_values"] == 0 and memory["memory_values"] == 64 * 64 * 64
    assert 1 < memory["active_per_token"] / dense["active_per_token"] <= 1.05  # the "within 5 %"
    deep, one = counts(knowledge, "deep", 1, 256), counts(knowledge, "dense", 1, 256)
    block = deep["total"] - one["total"]  # one more block of width 256: attention 4d^2 + FFN 8d^2 (+ biases, norms)
    assert 12 * 256**2 <= block <= 12 * 256**2 + 20 * 256


def test_knowledge_bits_count_exact_answers_and_the_loss_lower_bound(knowledge):
    bits = F.attribute_bits()
    # 10 birth-city questions, 3 answered exactly, answers at a mean cross-entropy of 2 bits: (5 - 2) bits each.
    scores = {"count/birth_city": 10, "qa_acc/birth_city": 0.3, "logprob/birth_city": -2 * math.log(2),
              # 4 field questions at a cross-entropy above the attribute's entropy: no bits, never negative.
              "count/field": 4, "qa_acc/field": 0.0, "logprob/field": -10.0}
    exact, loss = knowledge.knowledge_bits([scores, {"count/birth_city": 2, "qa_acc/birth_city": 1.0,
                                                     "logprob/birth_city": 0.0}])
    assert exact == pytest.approx(3 * bits["birth_city"] + 2 * bits["birth_city"])
    assert loss == pytest.approx(10 * (bits["birth_city"] - 2) + 2 * bits["birth_city"])


def test_knowledge_bench_rejects_unknown_models(knowledge, capsys):
    assert knowledge.main(["--models", "dense,wide"]) == 2
    assert "--models takes dense, memory, deep" in capsys.readouterr().err


def test_continual_bench_rejects_unknown_methods_before_any_work(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_continual", ROOT / "bench" / "continual.py")
    continual = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(continual)
    assert continual.main(["--methods", "full,adapters", "--out", str(tmp_path / "out")]) == 2
    assert "--methods takes full, lora, memory, slots" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
