"""Text side of the pipeline: readers, Moses, both BPE backends, resumable tasks, the prepare CLI."""

import gzip
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pkmlm.data import DataError
from pkmlm.data.bpe import fast_binary, learn_tokenizer, load_tokenizer
from pkmlm.data.corpora import ReadStats, bbc_news, decode_utf8, read_documents
from pkmlm.data.prepare import (MergeSettings, SlurmSettings, held_out_count, main, make_plan, merge,
                                prepare, run_tasks_local, slurm_executors)
from pkmlm.data.shards import open_split
from pkmlm.data.tokenize import MosesSettings, detokenize, tokenize

try:
    fast_binary()
    import fastBPE  # noqa: F401
    HAVE_FASTBPE = True
except (DataError, ImportError):
    HAVE_FASTBPE = False

BACKENDS = ["sentencepiece", pytest.param("fastbpe", marks=pytest.mark.skipif(
    not HAVE_FASTBPE, reason="fastBPE not installed: run scripts/install_fastbpe.sh"))]
QUIET = dict(progress="off")


@pytest.fixture(scope="module")
def articles():
    return [doc.text for doc in itertools.islice(bbc_news(), 60)]


def split_documents(corpus, tok):
    """The documents of a split, decoded back to Moses-tokenized text."""
    ids = corpus.read(0, corpus.num_tokens).tolist()
    docs, start = [], 0
    for i, t in enumerate(ids):
        if t == tok.eos_id:
            docs.append(tok.decode(ids[start:i], detokenized=False))
            start = i + 1
    return docs


def shard_hashes(out):
    return {name: [s["sha256"] for s in json.loads((out / name / "manifest.json").read_text())["shards"]]
            for name in ("train", "valid", "test")}


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    assert decode_utf8("ok \ufffd".encode()) == ("ok \ufffd", 0)  # a genuine U+FFFD is not an error
    (tmp_path / "a.txt").write_bytes(b"caf\xc3\xa9 \xff ok\n\nsecond \xfe\xfe doc\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_bytes(b"\n  third\n\n\n")
    docs = list(read_documents([tmp_path], split="blank-line"))
    assert [(d.text, d.replaced) for d in docs] == [
        ("caf\u00e9 \ufffd ok", 1), ("second \ufffd\ufffd doc", 2), ("third", 0)]
    assert [(d.text, d.replaced) for d in read_documents([tmp_path])] == [
        ("caf\u00e9 \ufffd ok\nsecond \ufffd\ufffd doc", 3), ("third", 0)]
    with pytest.raises(DataError, match="nope.txt does not exist"):
        list(read_documents([tmp_path / "nope.txt"]))


def test_gz_and_jsonl_readers(tmp_path):
    docs = ["First line.\nSecond line.", "Another \u00e9 doc."]
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress("\n\n".join(docs).encode()))
    lines = [json.dumps({"body": "First line.\n\n  Second line.  "}), "{broken", json.dumps([1]),
             json.dumps({"text": "no body"}), json.dumps({"body": "Another \u00e9 doc."}),
             '{"body": "lone \\ud800 surrogate"}']
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
    stats = ReadStats()
    got = [d.text for d in read_documents([tmp_path / "a.txt.gz"], split="blank-line")]
    assert got == docs
    got = [(d.text, d.replaced) for d in read_documents([tmp_path / "b.jsonl"], text_field="body",
                                                        stats=stats)]
    assert got == [(docs[0], 0), (docs[1], 0), ("lone \ufffd\ufffd\ufffd surrogate", 3)]
    assert (stats.bad_lines, stats.missing_field) == (2, 1)
    # A dump cut off in transfer: what was read is kept and the file is reported.
    data = gzip.compress(("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(2000)) + "\n").encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    stats = ReadStats()
    got = list(read_documents([tmp_path / "cut.jsonl.gz"], stats=stats))
    assert 0 < len(got) < 2000 and stats.truncated_files == [str(tmp_path / "cut.jsonl.gz")]


def test_moses_tokenize_detokenize_lowercase_accents():
    text = 'He said: "Profits rose 76% to $1.13bn (£600m)," but didn\'t say more.\nSecond paragraph.'
    tokens = tokenize(text)
    assert tokens.split("\n")[1] == "Second paragraph ."
    assert "$ 1.13bn ( £ 600m ) ," in tokens and "didn 't" in tokens
    assert detokenize(tokens) == text
    assert tokenize("Café Über", MosesSettings(lowercase=True)) == "café über"
    assert tokenize("Café Über", MosesSettings(remove_accents=True)) == "Cafe Uber"
    assert tokenize("Café Über", MosesSettings("fr", True, True)) == "cafe uber"
    assert tokenize("L'été", MosesSettings(lang="fr")) == "L' été"  # French elision rule


@pytest.mark.parametrize("backend", BACKENDS)
def test_bpe_round_trip_keeps_line_breaks(tmp_path, articles, backend):
    tokenized = [tokenize(a) for a in articles]
    (tmp_path / "train.txt").write_text("\n".join(tokenized[:50]) + "\n")
    tok = learn_tokenizer(backend, tmp_path / "train.txt", tmp_path / "tok", 1000)
    tok = load_tokenizer(tmp_path / "tok")
    meta = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert meta["backend"] == backend and meta["vocab_size"] == tok.vocab_size == len(tok.pieces)
    assert (meta["eos_id"], meta["newline_id"]) == (tok.eos_id, tok.newline_id) == (1, 2)
    assert tok.pieces[:3] == ["<unk>", "</s>", "<n>"]
    # fastBPE turns characters unseen in training into <unk>: exact only on training documents.
    for text in tokenized[40:] if backend == "sentencepiece" else tokenized[40:50]:
        ids = tok.encode([text])[0]
        assert 0 < min(ids) and max(ids) < tok.vocab_size  # no <unk>
        assert ids.count(tok.newline_id) == text.count("\n") > 0 and tok.eos_id not in ids
        assert tok.decode(ids, detokenized=False) == text
        assert tok.decode(ids + [tok.eos_id] + ids, detokenized=False) == text + "\n\n" + text
        assert tok.decode(ids) == detokenize(text) and tok.decode(ids).count("\n") == text.count("\n")
        assert len(ids) < len(text) / 2  # pieces are subwords, not characters
    # The special pieces written as text are text, never the special ids.
    ids = tok.encode(["a <n> b </s> c"])[0]
    assert tok.newline_id not in ids and tok.eos_id not in ids
    if backend == "sentencepiece":
        assert tok.decode(ids, detokenized=False) == "a <n> b </s> c"
    # Changing the vocabulary files behind tokenizer.json is caught.
    meta["vocab_hash"] = "0" * 16
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="were changed"):
        load_tokenizer(tmp_path / "tok")


def test_old_format_asks_to_prepare_again(tmp_path, articles):
    (tmp_path / "t.txt").write_text("\n".join(tokenize(a) for a in articles[:20]) + "\n")
    learn_tokenizer("sentencepiece", tmp_path / "t.txt", tmp_path / "tok", 400)
    path = tmp_path / "tok" / "tokenizer.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "format": 1}))
    with pytest.raises(DataError, match="older pkmlm.*prepare the data again"):
        load_tokenizer(tmp_path / "tok")
    assert main(["--input", str(tmp_path / "t.txt"), "--out", str(tmp_path / "o"),
                 "--tokenizer", str(tmp_path / "tok")]) == 2


def test_vocab_too_large_is_a_clear_error(tmp_path):
    (tmp_path / "t.txt").write_text("a b c\n")
    with pytest.raises(DataError, match="use a --vocab-size"):
        learn_tokenizer("sentencepiece", tmp_path / "t.txt", tmp_path / "tok", 5000)
    with pytest.raises(DataError, match="unknown BPE backend 'bpe'"):
        learn_tokenizer("bpe", tmp_path / "t.txt", tmp_path / "tok", 100)


def test_held_out_count():
    assert held_out_count("0.1", 95, "valid") == 10
    assert held_out_count("7", 95, "valid") == 7
    for bad in ("1.5", "-1", "ten"):
        with pytest.raises(DataError, match="--valid"):
            held_out_count(bad, 95, "valid")


@pytest.mark.parametrize("backend", BACKENDS)
def test_prepare_end_to_end(tmp_path, articles, backend):
    inp = tmp_path / "in"
    inp.mkdir()
    for i, text in enumerate(articles[:40] + articles[:3]):  # 3 duplicates, in another task
        (inp / f"{i:03d}.txt").write_text(text)
    (inp / "bad.txt").write_bytes(b"Broken \xff byte here.\n")
    (inp / "ctrl.txt").write_bytes(b"\x00\x01\n")  # nothing left after Moses: dropped as empty
    settings = MergeSettings(bpe=backend, vocab_size=400, valid="5", test="0.1", max_shard_tokens=2000)
    report = prepare(tmp_path / "out", inputs=[inp], settings=settings, tasks=3, workers=2, **QUIET)
    assert (report["documents"], report["duplicates"], report["empty"], report["replaced_bytes"]) == (41, 3, 1, 1)
    tok = load_tokenizer(tmp_path / "out" / "tokenizer")
    splits = {name: open_split(tmp_path / "out" / name, expected_vocab_hash=tok.vocab_hash,
                               verify_checksums=True) for name in ("train", "valid", "test")}
    assert [s.num_documents for s in splits.values()] == [32, 5, 4]
    assert all(s.newline_id == tok.newline_id for s in splits.values())
    assert len(list((tmp_path / "out" / "train").glob("shard_*.bin"))) > 1
    # Every document lands in exactly one split, intact and with its line breaks.
    decoded = [doc for corpus in splits.values() for doc in split_documents(corpus, tok)]
    expected = [tokenize(t) for t in articles[:40]] + [tokenize("Broken \ufffd byte here.")]
    assert sum(d.count("\n") for d in decoded) == sum(e.count("\n") for e in expected) > 40
    if backend == "sentencepiece":  # fastBPE may map the rare U+FFFD to <unk>
        assert sorted(decoded) == sorted(expected)
    assert len(decoded) == 41


def test_token_counts_do_not_depend_on_the_container(tmp_path, articles):
    docs = articles[:24]
    variants = {"txt": ("c.txt", "\n\n".join(docs).encode()),
                "gz": ("c.txt.gz", gzip.compress("\n\n".join(docs).encode())),
                "jsonl": ("c.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()),
                "jsonl.gz": ("c.jsonl.gz", gzip.compress(
                    "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()))}
    results = {}
    for name, (file, data) in variants.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / file).write_bytes(data)
        report = prepare(tmp_path / f"out-{name}", inputs=[tmp_path / name], split="blank-line",
                         settings=MergeSettings(vocab_size=400, valid="3", test="3"), **QUIET)
        results[name] = ({k: v["num_tokens"] for k, v in report["splits"].items()},
                         report["vocab_hash"], shard_hashes(tmp_path / f"out-{name}"))
    assert results["txt"][0]["train"] > 1000
    assert all(r == results["txt"] for r in results.values())


def test_parallel_tasks_equal_serial_run(tmp_path, articles):
    inp = tmp_path / "in"
    inp.mkdir()
    for i, text in enumerate(articles[:30] + articles[5:8]):
        (inp / f"{i:03d}.txt").write_text(text)
    settings = MergeSettings(vocab_size=400, valid="3", test="3", bpe_sample_bytes=40_000)
    serial = prepare(tmp_path / "serial", inputs=[inp], settings=settings, tasks=1, workers=1, **QUIET)
    parallel = prepare(tmp_path / "par", inputs=[inp], settings=settings, tasks=5, workers=2, **QUIET)
    assert parallel["tasks"] == 5 and parallel["workers"] == 2 and serial["duplicates"] == 3
    assert 0 < serial["bpe_sample_bytes"] <= 40_000 + 10_000
    assert shard_hashes(tmp_path / "serial") == shard_hashes(tmp_path / "par")
    assert serial["vocab_hash"] == parallel["vocab_hash"]


def test_tasks_resume(tmp_path, articles):
    inp = tmp_path / "in"
    inp.mkdir()
    for i, text in enumerate(articles[:12]):
        (inp / f"{i:03d}.txt").write_text(text)
    plan = make_plan(tmp_path / "out", inputs=[inp], tasks=3)
    assert len(plan.ranges) == 3 and plan.ranges[0][0] == 0 and plan.ranges[-1][1] == 12
    assert all(a[1] == b[0] for a, b in zip(plan.ranges, plan.ranges[1:]))  # contiguous
    run_tasks_local(plan, workers=2, **QUIET)
    docs = {r: (plan.task_dir(r) / "docs.txt").read_bytes() for r in range(3)}
    stamp = {r: (plan.task_dir(r) / "docs.txt").stat().st_mtime_ns for r in range(3)}
    # Task 1 "killed": no completion marker, no output, a half-written temporary left behind.
    (plan.work / "logs" / "completions" / "00001").unlink()
    os.replace(plan.task_dir(1), plan.task_dir(1).with_name(".00001.tmp-999"))
    (plan.task_dir(1).with_name(".00001.tmp-999") / "docs.txt").write_text("half")
    with pytest.raises(DataError, match="1 of 3 preparation tasks have not finished"):
        merge(plan, MergeSettings(vocab_size=400, valid="2", test="2"), **QUIET)
    # A finished task whose output went missing is redone too.
    shutil.rmtree(plan.task_dir(2))
    run_tasks_local(make_plan(tmp_path / "out", inputs=[inp], tasks=3), workers=1, **QUIET)
    assert (plan.task_dir(0) / "docs.txt").stat().st_mtime_ns == stamp[0]  # skipped
    assert all((plan.task_dir(r) / "docs.txt").read_bytes() == docs[r] for r in range(3))
    assert (plan.task_dir(1) / "docs.txt").stat().st_mtime_ns != stamp[1]  # redone
    # Other settings cannot reuse these tasks.
    with pytest.raises(DataError, match="other settings \\(moses differ"):
        make_plan(tmp_path / "out", inputs=[inp], tasks=3, moses=MosesSettings(lowercase=True))


def test_lowercase_remove_accents_and_reused_tokenizer(tmp_path, articles):
    inp = tmp_path / "in"
    inp.mkdir()
    for i, text in enumerate(articles[:16]):
        (inp / f"{i:03d}.txt").write_text(text.replace("e", "\u00e9"))
    moses = MosesSettings(lowercase=True, remove_accents=True)
    settings = MergeSettings(vocab_size=400, valid="2", test="2")
    prepare(tmp_path / "a", inputs=[inp], moses=moses, settings=settings, **QUIET)
    tok = load_tokenizer(tmp_path / "a" / "tokenizer")
    assert tok.moses == moses and tok.tokenize("Été") == "ete"
    train = open_split(tmp_path / "a" / "train")
    text = "\n".join(split_documents(train, tok))
    assert text == text.lower() and "\u00e9" not in text and "e" in text
    # Reusing that tokenizer: same vocabulary; other Moses settings are refused.
    report = prepare(tmp_path / "b", inputs=[inp], moses=moses, settings=MergeSettings(
        tokenizer=str(tmp_path / "a" / "tokenizer"), valid="2", test="2"), **QUIET)
    assert report["vocab_hash"] == tok.vocab_hash and report["bpe_sample_bytes"] == 0
    with pytest.raises(DataError, match="same --lang, --lowercase and --remove-accents"):
        prepare(tmp_path / "c", inputs=[inp], settings=MergeSettings(
            tokenizer=str(tmp_path / "a" / "tokenizer"), valid="2", test="2"), **QUIET)


def test_progress_lines_when_not_a_tty(tmp_path, articles, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    for i, text in enumerate(articles[:8]):
        (inp / f"{i:03d}.txt").write_text(text)
    prepare(tmp_path / "out", inputs=[inp], settings=MergeSettings(vocab_size=400, valid="1", test="1"),
            workers=1, every=0.0)  # progress="auto": pytest's stderr is no terminal
    err = capsys.readouterr().err
    assert "\r" not in err
    for stage in ("moses", "encode train", "encode valid", "encode test"):
        lines = [line for line in err.splitlines() if line.startswith(f"[{stage}] ")]
        assert lines and lines[-1].endswith("(done)") and "MB/s" in lines[-1] and "elapsed" in lines[-1]
    assert "tasks=8/8" in err


@pytest.mark.slow
def test_slurm_array_and_merge_jobs(tmp_path, articles, monkeypatch):
    """The Slurm path without Slurm: the scripts datatrove would submit, then each array task run the
    way a job runs it (launch_pickled_pipeline with Slurm's environment); equal to a local run."""
    import datatrove.executor.slurm as dt_slurm

    inp = tmp_path / "in"
    inp.mkdir()
    for i, text in enumerate(articles[:10]):
        (inp / f"{i:03d}.txt").write_text(text)
    settings = MergeSettings(vocab_size=400, valid="2", test="2")
    plan = make_plan(tmp_path / "slurm", inputs=[inp], tasks=3)
    submitted = []

    def fake_sbatch(script, retriever, *args):
        submitted.append((script, args))
        return str(100 + len(submitted))

    monkeypatch.setattr(dt_slurm, "launch_slurm_job", fake_sbatch)
    tasks_job, merge_job = slurm_executors(plan, settings, SlurmSettings(
        "cpu", time="1:00:00", sbatch={"account": "lm"}), workers=2)
    merge_job.run()
    array = [s for s, _ in submitted if "--job-name=pkmlm-moses" in s and "merge_stats" not in s]
    merged = [(s, a) for s, a in submitted if "--job-name=pkmlm-merge" in s and "merge_stats" not in s]
    assert len(array) == 1 and len(merged) == 1
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --partition=cpu", "#SBATCH --time=1:00:00",
                 "#SBATCH --account=lm", "#SBATCH --cpus-per-task=1", "launch_pickled_pipeline"):
        assert line in array[0]
    assert "#SBATCH --array=0-0" in merged[0][0] and "#SBATCH --cpus-per-task=8" in merged[0][0]
    assert f"--dependency=afterok:{tasks_job.job_id}" in merged[0][1]
    # Run the jobs as Slurm would, on this machine (a stand-in scontrol expands the node list).
    launcher = Path(sys.executable).parent / "launch_pickled_pipeline"
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "scontrol").write_text("#!/bin/sh\necho \"$3\"\n")
    (tmp_path / "bin" / "scontrol").chmod(0o755)
    for job, ranks in (("logs", 3), ("merge_logs", 1)):
        for rank in range(ranks):
            env = dict(os.environ, SLURM_ARRAY_TASK_ID=str(rank), SLURM_NODELIST="localhost",
                       PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
            run = subprocess.run([str(launcher), str(plan.work / job / "executor.pik")], env=env,
                                 check=True, capture_output=True, text=True)
            # Slurm's --output is a file: plain progress lines, and the merge's summary.
            assert f"[moses task {rank}] " in run.stderr if job == "logs" else "train: " in run.stderr
    prepare(tmp_path / "local", inputs=[inp], settings=settings, tasks=2, **QUIET)
    assert shard_hashes(tmp_path / "slurm") == shard_hashes(tmp_path / "local")


def test_prepare_cli_errors_and_bbc_subset(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    assert main(["--input", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "\nerror: no text found in" in err and "Traceback" not in err
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "some text"}) + "\n")
    assert main(["--input", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "j")]) == 2
    assert "1 JSON lines had no string field 'text': pass --text-field" in capsys.readouterr().err
    assert main(["--corpus", "bbc_news", "--max-documents", "30", "--valid", "3", "--test", "3",
                 "--vocab-size", "400", "--tasks", "1", "--out", str(tmp_path / "bbc")]) == 0
    assert "ready:" in capsys.readouterr().out
    assert open_split(tmp_path / "bbc" / "valid").num_documents == 3
    assert open_split(tmp_path / "bbc" / "train").num_documents == 24
    assert main(["--corpus", "bbc_news", "--max-documents", "4", "--valid", "2", "--test", "2",
                 "--tasks", "1", "--out", str(tmp_path / "x")]) == 2
    assert "leave no training documents" in capsys.readouterr().err
    assert main(["--corpus", "bbc_news", "--vocab-size", "2", "--out", str(tmp_path / "x")]) == 2
    assert "--vocab-size (2) must be at least 4" in capsys.readouterr().err
    assert main(["--corpus", "bbc_news", "--executor", "slurm", "--out", str(tmp_path / "x")]) == 2
    assert "needs --partition" in capsys.readouterr().err


@pytest.mark.parametrize("out", ["file.txt", "file.txt/sub"])
@pytest.mark.slow
def test_prepare_out_that_cannot_be_a_directory_is_one_line_exit_2(tmp_path, out):
    import subprocess
    import sys
    (tmp_path / "file.txt").write_text("keep me")
    (tmp_path / "doc.txt").write_text("Some text.\n")
    proc = subprocess.run([sys.executable, "-m", "pkmlm.data.prepare", "--input", str(tmp_path / "doc.txt"),
                           "--out", str(tmp_path / out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "file.txt" in proc.stderr and "give a" in proc.stderr
    assert (tmp_path / "file.txt").read_text() == "keep me"
