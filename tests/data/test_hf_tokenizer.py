"""prepare --hf-tokenizer: a pretrained model's own tokenizer (tokenizers library) encodes raw text; the shards
record it, and evaluation, generation and inspection decode through it."""

from __future__ import annotations

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")

from pkmlm.data import DataError  # noqa: E402
from pkmlm.data.bpe import load_tokenizer  # noqa: E402
from pkmlm.data.hf_tokenizer import save_hf_tokenizer  # noqa: E402
from pkmlm.data.prepare import MergeSettings, main, prepare  # noqa: E402
from pkmlm.data.shards import open_split  # noqa: E402
from conftest import make_hf_tokenizer  # noqa: E402  (tests/conftest.py)

def corpus(tmp_path, n=8):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(n):
        (folder / f"d{i}.txt").write_text(f"Document {i} says: the plan would work.\nShares rose {i}% on Monday.\n")
    return folder


def test_prepare_encodes_raw_text_with_the_pretrained_tokenizer(tmp_path):
    """No Moses: each document is exactly the tokenizer's ids of its raw text, then the end-of-text id."""
    tok_dir = make_hf_tokenizer(tmp_path / "tok")
    report = prepare(tmp_path / "data", inputs=[corpus(tmp_path)], workers=1, progress="off",
                     settings=MergeSettings(hf_tokenizer=str(tok_dir), valid="1", test="1"))
    tokenizer = load_tokenizer(tmp_path / "data" / "tokenizer")
    assert tokenizer.backend == "hf" and tokenizer.eos_id == 0 and report["backend"] == "hf"
    reference = tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    split = open_split(tmp_path / "data" / "train", expected_vocab_hash=tokenizer.vocab_hash)
    ids = split.read(0, split.num_tokens).tolist()
    docs = tokenizer.decode(ids).split("\n\n")
    assert len(docs) == split.num_documents == 6 and ids[-1] == 0 and ids.count(0) == 6
    first = docs[0]
    assert first.startswith("Document ") and "\nShares rose" in first  # line breaks kept, raw punctuation
    assert ids[:ids.index(0)] == reference.encode(first, add_special_tokens=False).ids
    assert split.newline_id is None and tokenizer.tokenize("a  b\n") == "a  b\n"


def test_the_same_source_gives_the_same_vocabulary_hash(tmp_path):
    """prepare --hf-tokenizer and pkmlm.hf import read one source to one hash; another eos or vocabulary differs."""
    tok_dir = make_hf_tokenizer(tmp_path / "tok")
    a = save_hf_tokenizer(tok_dir, tmp_path / "a")
    b = save_hf_tokenizer(tmp_path / "a", tmp_path / "b")  # a pkmlm "hf" tokenizer directory is a source too
    assert a.vocab_hash == b.vocab_hash
    make_hf_tokenizer(tmp_path / "tok2", specials=("<s>", "</s>"), config={"eos_token": "</s>"})
    c = save_hf_tokenizer(tmp_path / "tok2", tmp_path / "d")
    assert c.pieces[c.eos_id] == "</s>" and c.vocab_hash != a.vocab_hash
    assert save_hf_tokenizer(tmp_path / "tok2", tmp_path / "e", eos_token="<s>").vocab_hash != c.vocab_hash


def test_bad_hf_tokenizer_options_are_one_line(tmp_path, capsys):
    """Missing source, unknown eos token, both tokenizers: exit 2 with one line, before any work."""
    tok_dir = make_hf_tokenizer(tmp_path / "tok")
    folder = corpus(tmp_path)
    cases = [(["--hf-tokenizer", str(tmp_path / "nope")], "does not exist"),
             (["--hf-tokenizer", str(tok_dir), "--eos-token", "<zzz>"], "is not in the tokenizer's vocabulary"),
             (["--hf-tokenizer", str(tok_dir), "--tokenizer", str(tok_dir)], "pass only one"),
             (["--eos-token", "<|endoftext|>"], "pass --hf-tokenizer too")]
    for extra, message in cases:
        assert main(["--input", str(folder), "--out", str(tmp_path / "out"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], (extra, err)
    assert not (tmp_path / "out" / "train").exists()


def test_data_of_another_vocabulary_is_one_clear_error(tmp_path):
    """Data prepared with one tokenizer, opened for a model of another: a DataError naming both hashes."""
    prepare(tmp_path / "data", inputs=[corpus(tmp_path)], workers=1, progress="off",
            settings=MergeSettings(hf_tokenizer=str(make_hf_tokenizer(tmp_path / "tok")), valid="1", test="1"))
    other = save_hf_tokenizer(make_hf_tokenizer(tmp_path / "tok2", vocab_size=280), tmp_path / "other")
    with pytest.raises(DataError, match="differs from the model's"):
        open_split(tmp_path / "data" / "valid", expected_vocab_hash=other.vocab_hash)
    assert np.asarray(open_split(tmp_path / "data" / "valid").read(0, 3)).shape == (3,)
