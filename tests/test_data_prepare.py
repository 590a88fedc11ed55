"""Text side of the pipeline: reading, Moses tokenization, both BPE backends, the prepare CLI."""

import itertools
import json

import pytest

from pkmlm.data import DataError
from pkmlm.data.bpe import fast_binary, learn_tokenizer, load_tokenizer
from pkmlm.data.corpora import bbc_news, decode_utf8, read_documents
from pkmlm.data.prepare import held_out_count, main, prepare
from pkmlm.data.shards import open_split
from pkmlm.data.tokenize import detokenize, tokenize, tokenize_all

try:
    fast_binary()
    import fastBPE  # noqa: F401
    HAVE_FASTBPE = True
except (DataError, ImportError):
    HAVE_FASTBPE = False

BACKENDS = ["sentencepiece", pytest.param("fastbpe", marks=pytest.mark.skipif(
    not HAVE_FASTBPE, reason="fastBPE not installed: run scripts/install_fastbpe.sh"))]


@pytest.fixture(scope="module")
def articles():
    return [doc.text for doc in itertools.islice(bbc_news(), 60)]


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


def test_moses_tokenize_detokenize(articles):
    text = 'He said: "Profits rose 76% to $1.13bn (£600m)," but didn\'t say more.\nSecond paragraph.'
    tokens = tokenize(text)
    assert tokens.split("\n")[1] == "Second paragraph ."
    assert "$ 1.13bn ( £ 600m ) ," in tokens and "didn 't" in tokens
    assert detokenize(tokens) == text
    assert list(tokenize_all(articles[:20], workers=2, progress=False)) == [tokenize(a) for a in articles[:20]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bpe_round_trip(tmp_path, articles, backend):
    tokenized = [tokenize(a) for a in articles]
    (tmp_path / "train.txt").write_text("\n".join(tokenized[:50]) + "\n")
    tok = learn_tokenizer(backend, tmp_path / "train.txt", tmp_path / "tok", 1000)
    tok = load_tokenizer(tmp_path / "tok")
    meta = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert meta["backend"] == backend and meta["vocab_size"] == tok.vocab_size == len(tok.pieces)
    assert meta["eos_id"] == tok.eos_id == 1 and tok.pieces[1] in ("</s>",)
    # fastBPE turns characters unseen in training into <unk>: exact only on training documents.
    for text in tokenized[40:] if backend == "sentencepiece" else tokenized[40:50]:
        ids = tok.encode([text])[0]
        assert 0 < min(ids) and max(ids) < tok.vocab_size  # no <unk>
        assert tok.decode(ids + [tok.eos_id]) == text.replace("\n", " ")
        assert detokenize(tok.decode(ids)) == detokenize(text).replace("\n", " ")
        assert len(ids) < len(text) / 2  # pieces are subwords, not characters
    # Changing the vocabulary files behind tokenizer.json is caught.
    meta["vocab_hash"] = "0" * 16
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="were changed"):
        load_tokenizer(tmp_path / "tok")


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
    for i, text in enumerate(articles[:40] + articles[:3]):  # 3 duplicates
        (inp / f"{i:03d}.txt").write_text(text)
    (inp / "bad.txt").write_bytes(b"Broken \xff byte here.\n")
    (inp / "ctrl.txt").write_bytes(b"\x00\x01\n")  # nothing left after Moses: dropped as empty
    report = prepare(tmp_path / "out", inputs=[inp], bpe=backend, vocab_size=400, valid="5", test="0.1",
                     max_shard_tokens=2000, workers=2, progress=False)
    assert (report["documents"], report["duplicates"], report["empty"], report["replaced_bytes"]) == (41, 3, 1, 1)
    tok = load_tokenizer(tmp_path / "out" / "tokenizer")
    splits = {name: open_split(tmp_path / "out" / name, expected_vocab_hash=tok.vocab_hash,
                               verify_checksums=True) for name in ("train", "valid", "test")}
    assert [s.num_documents for s in splits.values()] == [32, 5, 4]
    assert len(list((tmp_path / "out" / "train").glob("shard_*.bin"))) > 1
    # Every document lands in exactly one split, intact: decode each split back to its documents.
    decoded = []
    for corpus in splits.values():
        ids = corpus.read(0, corpus.num_tokens).tolist()
        docs, cur = [], []
        for t in ids:
            if t == tok.eos_id:
                docs.append(tok.decode(cur))
                cur = []
            else:
                cur.append(t)
        decoded.extend(docs)
    expected = [tokenize(t).replace("\n", " ") for t in articles[:40]] + [tokenize("Broken \ufffd byte here.")]
    if backend == "sentencepiece":  # fastBPE may map the rare U+FFFD to <unk>
        assert sorted(decoded) == sorted(expected)
    assert len(decoded) == 41 and not list(tmp_path.glob("out/.work*"))


def test_prepare_cli_errors_and_bbc_subset(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    assert main(["--input", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "\nerror: no text found in" in err and "Traceback" not in err
    assert main(["--corpus", "bbc_news", "--max-documents", "30", "--valid", "3", "--test", "3",
                 "--vocab-size", "400", "--workers", "1", "--out", str(tmp_path / "bbc")]) == 0
    assert "ready:" in capsys.readouterr().out
    assert open_split(tmp_path / "bbc" / "valid").num_documents == 3
    assert open_split(tmp_path / "bbc" / "train").num_documents == 24
    assert main(["--corpus", "bbc_news", "--max-documents", "4", "--valid", "2", "--test", "2",
                 "--out", str(tmp_path / "x")]) == 2
    assert "leave no training documents" in capsys.readouterr().err
    assert main(["--corpus", "bbc_news", "--vocab-size", "2", "--out", str(tmp_path / "x")]) == 2
    assert "--vocab-size (2) must be at least 3" in capsys.readouterr().err


@pytest.mark.parametrize("out", ["file.txt", "file.txt/sub"])
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
