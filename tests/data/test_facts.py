"""The synthetic knowledge corpus (pkmlm/data/facts.py): deterministic, disjoint sets, held-out questions,
mixing ratio, and a round trip through prepare."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pkmlm.data import DataError
from pkmlm.data import facts as F
from pkmlm.data.prepare import MergeSettings, prepare
from pkmlm.data.shards import open_split


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_same_seed_same_files_other_seed_other_people(tmp_path):
    a = F.write_corpus(tmp_path / "a", 20, seed=3)
    F.write_corpus(tmp_path / "b", 20, seed=3)
    F.write_corpus(tmp_path / "c", 20, seed=4)
    for name in ("text/people.txt", "text/qa_train.txt", "qa_train.jsonl", "qa_test.jsonl", "people.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a/people.jsonl").read_text() != (tmp_path / "c/people.jsonl").read_text()
    assert a["qa_train"] + a["qa_test"] == 20 * len(F.ATTRIBUTES)
    assert a["bits_per_person"] == pytest.approx(sum(F.attribute_bits().values()))


def test_person_depends_only_on_seed_and_index():
    whole = F.people(12, seed=1)
    tail = F.people(4, seed=1, first=8)
    assert tail == whole[8:]
    names = [p["name"] for p in F.people(500, seed=1)]
    assert len(set(names)) == 500


def test_biographies_hold_every_fact_and_questions_are_held_out(tmp_path):
    F.write_corpus(tmp_path, 10, seed=0, bios=2)
    bios = (tmp_path / "text/people.txt").read_text().strip().split("\n\n")
    assert len(bios) == 20
    people = read_jsonl(tmp_path / "people.jsonl")
    for i, person in enumerate(people):
        for bio in bios[2 * i:2 * i + 2]:
            assert bio.count(".") >= len(F.ATTRIBUTES)
            for attr in F.ATTRIBUTES:
                assert person[attr] in bio
    templates = [t.split("{name}")[0] for t in F.QUESTION_TEMPLATES.values()]
    for bio in bios:
        assert not any(t in bio for t in templates)  # no question wording inside a biography
    train, test = read_jsonl(tmp_path / "qa_train.jsonl"), read_jsonl(tmp_path / "qa_test.jsonl")
    assert {r["person"] for r in train}.isdisjoint({r["person"] for r in test})
    by_name = {p["name"]: p for p in people}
    for r in train + test:
        assert set(r) == {"prompt", "question", "answer", "person", "attribute"}
        assert by_name[r["person"]][r["attribute"]] == r["answer"]
        assert r["prompt"] == F.qa_prompt(r["question"])
    qa_text = (tmp_path / "text/qa_train.txt").read_text()
    assert all(f"{r['prompt']} {r['answer']}" in qa_text for r in train)
    assert not any(r["person"] in qa_text for r in test)  # held-out people's answers are never written as text


def test_qa_repeats_write_every_pair_r_times_in_new_contexts(tmp_path):
    once = F.write_corpus(tmp_path / "once", 20, seed=0)
    info = F.write_corpus(tmp_path / "rep", 20, seed=0, qa_repeats=3)
    assert info["qa_repeats"] == 3 and info["qa_train"] == once["qa_train"]  # the same questions are asked
    assert (tmp_path / "rep/qa_train.jsonl").read_text() == (tmp_path / "once/qa_train.jsonl").read_text()
    assert (tmp_path / "rep/text/people.txt").read_text() == (tmp_path / "once/text/people.txt").read_text()
    records = [json.loads(line) for line in (tmp_path / "rep/qa_train.jsonl").read_text().splitlines()]
    docs = (tmp_path / "rep/text/qa_train.txt").read_text().strip().split("\n\n")
    lines = [line for doc in docs for line in doc.split("\n")]
    pairs = [f"{r['prompt']} {r['answer']}" for r in records]
    assert sorted(lines) == sorted(pairs * 3)  # every pair exactly 3 times, nothing else
    assert len(set(docs)) == len(docs) and all(len(doc.split("\n")) <= 6 for doc in docs)  # survives dedup
    # Shuffled across people: the pair before each pair differs between passes for most pairs.
    before = {}
    for doc in docs:
        for prev, line in zip(["<start>"] + doc.split("\n"), doc.split("\n")):
            before.setdefault(line, set()).add(prev)
    assert sum(len(v) > 1 for v in before.values()) > 0.9 * len(pairs)
    with pytest.raises(DataError, match="--qa-repeats"):
        F.write_corpus(tmp_path / "bad", 3, qa_repeats=0)


def test_mix_share_and_bad_values(tmp_path):
    info = F.write_corpus(tmp_path, 30, seed=0, mix="bbc_news:0.75")
    assert 0.75 <= info["mixed_share"] < 0.80  # whole articles: at most one over the stated share
    assert (tmp_path / "text/bbc_news.txt").stat().st_size > 0
    F.write_corpus(tmp_path, 30, seed=0)  # rerun without mixing removes the mixed file
    assert not (tmp_path / "text/bbc_news.txt").exists()
    for bad in ("bbc_news", "bbc_news:1.5", "wiki:0.5", "bbc_news:x"):
        with pytest.raises(DataError, match="--mix"):
            F.write_corpus(tmp_path, 3, mix=bad)
    with pytest.raises(DataError, match="--people"):
        F.write_corpus(tmp_path, 0)
    with pytest.raises(DataError, match="distinct names"):
        F.write_corpus(tmp_path, 2, first=F.MAX_PEOPLE - 1)


def test_cli_bad_input_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pkmlm.data.facts", "--people", "3", "--out", str(tmp_path),
                             "--mix", "bbc_news:2"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --mix") and "Traceback" not in result.stderr


def test_goes_through_prepare(tmp_path):
    F.write_corpus(tmp_path / "src", 40, seed=0)
    prepare(tmp_path / "data", inputs=[tmp_path / "src/text"], split="blank-line",
            settings=MergeSettings(vocab_size=400, valid="2", test="2"), workers=1, progress="off")
    train = open_split(tmp_path / "data/train")
    # 120 biographies + 20 QA documents (one per qa_train person), four held out.
    assert train.num_documents == 120 + len(read_jsonl(tmp_path / "src/qa_train.jsonl")) // 6 - 4
