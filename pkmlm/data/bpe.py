"""Subword vocabularies behind one interface: sentencepiece BPE (default) or fastBPE.

Both read Moses-tokenized text (paragraphs on separate lines) and use the same special ids:
0 = <unk>, 1 = </s> (end of document), 2 = <n> (line break inside a document). A document of L lines
is `line1 <n> line2 <n> ... lineL </s>`: L boundary tokens, as many as the paper's `</s>` after every
line, while `</s>` keeps meaning "end of document" for batching, evaluation and generation.
A tokenizer lives in a directory with its backend's files (`spm.model`, or fastBPE's `codes` and
`vocab`, in the original release's formats) and a `tokenizer.json` naming them, with the vocabulary
size and hash that every binarized split records and the Moses settings the text was prepared with.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from pkmlm.cli import file_in_the_way
from pkmlm.data import DataError
from pkmlm.data.tokenize import MosesSettings, detokenize, tokenize
from pkmlm.fileio import write_text_atomic

BACKENDS = ("sentencepiece", "fastbpe")  # learnt by prepare; "hf" (a pretrained model's own) is only reused
UNK_ID, EOS_ID, NEWLINE_ID = 0, 1, 2
SPECIAL = {"<unk>": UNK_ID, "</s>": EOS_ID, "<n>": NEWLINE_ID}
META = "tokenizer.json"
META_FORMAT = 2  # 1: no <n> id, lines of a document were run together


class Tokenizer:
    """Maps Moses-tokenized text to ids and back. `pieces[i]` is the string of id i.

    sentencepiece falls back to bytes for characters it never saw, so every text round-trips;
    fastBPE (like the original release) maps such characters to <unk>.
    """

    backend: str
    files: dict[str, str]

    def __init__(self, directory: Path, pieces: list[str]):
        self.directory, self.pieces = Path(directory), pieces
        self.eos_id, self.unk_id, self.newline_id = EOS_ID, UNK_ID, NEWLINE_ID
        self.moses = MosesSettings()  # load_tokenizer sets the recorded settings

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    @property
    def vocab_hash(self) -> str:
        """Identifies the id -> piece mapping: data and models must agree on it."""
        text = "\n".join([self.backend, *self.pieces])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _encode_lines(self, lines: list[str]) -> list[list[int]]:
        """Ids of each line (no line breaks inside)."""
        raise NotImplementedError

    def _decode_line(self, ids: list[int]) -> str:
        """Moses-tokenized text of the ids of one line."""
        raise NotImplementedError

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Ids of each Moses-tokenized text, its lines joined by `newline_id`; no eos is added."""
        lines = [text.split("\n") for text in texts]
        flat = self._encode_lines([line for doc in lines for line in doc])
        out, i = [], 0
        for doc in lines:
            ids = []
            for piece_ids in flat[i:i + len(doc)]:
                ids.extend(piece_ids)
                ids.append(NEWLINE_ID)
            out.append(ids[:-1])
            i += len(doc)
        return out

    def decode(self, ids, *, detokenized: bool = True) -> str:
        """Text of `ids`: the one way back from ids, for samples, generation and tests.

        `newline_id` becomes a line break and `eos_id` a blank line (end of document; trailing
        ones dropped). detokenized=True: Moses-detokenized for reading; False: the Moses-tokenized
        text that was encoded (lowercasing and removed accents are not undone).
        """
        docs, lines, line = [], [], []
        for i in map(int, ids):
            if i == self.newline_id or i == self.eos_id:
                lines.append(self._decode_line(line))
                line = []
                if i == self.eos_id:
                    docs.append("\n".join(lines))
                    lines = []
            else:
                line.append(i)
        if line or lines:
            lines.append(self._decode_line(line))
            docs.append("\n".join(lines))
        text = "\n\n".join(docs)
        return detokenize(text, self.moses.lang) if detokenized else text

    def tokenize(self, text: str) -> str:
        """Raw text -> what `encode` takes: Moses with the settings the data was prepared with."""
        return tokenize(text, self.moses)

    def save_meta(self) -> None:
        meta = {"format": META_FORMAT, "backend": self.backend, "files": self.files,
                "vocab_size": self.vocab_size, "vocab_hash": self.vocab_hash, "eos_id": self.eos_id,
                "newline_id": self.newline_id, "special": SPECIAL, "moses": self.moses.as_dict()}
        write_text_atomic(self.directory / META, json.dumps(meta, indent=1))


class SentencePieceTokenizer(Tokenizer):
    backend = "sentencepiece"
    files = {"model": "spm.model"}

    def __init__(self, directory):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(Path(directory) / "spm.model"))
        super().__init__(directory, [self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())])

    @classmethod
    def learn(cls, text_file: Path, directory: Path, vocab_size: int, seed: int = 0):
        import sentencepiece

        sentencepiece.set_random_generator_seed(seed)
        try:
            sentencepiece.SentencePieceTrainer.train(
                input=str(text_file), model_prefix=str(directory / "spm"), model_type="bpe",
                vocab_size=vocab_size, character_coverage=1.0, unk_id=UNK_ID, eos_id=EOS_ID,
                bos_id=-1, pad_id=-1,
                # id 2; a control symbol is never produced from text, so a literal "<n>" stays text.
                control_symbols=["<n>"],
                # Characters never seen in training become their UTF-8 bytes, not <unk>: every
                # text survives encode/decode. Costs 256 ids.
                byte_fallback=True,
                # Identity normalisation: Moses already normalised, and decoding stays exact.
                normalization_rule_name="identity", max_sentence_length=1 << 16,
                # The sample is bounded by --bpe-sample-bytes; this bounds its lines too.
                input_sentence_size=2_000_000, shuffle_input_sentence=True,
                num_threads=cpu_count(), minloglevel=2)
        except RuntimeError as e:
            raise DataError(f"sentencepiece could not learn {vocab_size} pieces from {text_file} "
                            f"({e}): use a --vocab-size between 256 + the number of distinct "
                            f"characters and what the text supports, or give more text") from e
        (directory / "spm.vocab").unlink(missing_ok=True)  # a readable copy of the model; unused
        return cls(directory)

    def _encode_lines(self, lines):
        return self.sp.encode(lines, num_threads=cpu_count())

    def _decode_line(self, ids):
        return self.sp.decode(ids)


@contextmanager
def _silenced():
    """fastBPE's module prints its loading progress from C++ straight to file descriptors 1 and 2."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
        yield
    finally:
        ctypes.CDLL(None).fflush(None)  # flush C stdio buffers now, or the text appears later
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


def fast_binary() -> str:
    """Path of fastBPE's `fast` tool: next to this Python, else on PATH."""
    local = Path(sys.executable).parent / "fast"
    found = str(local) if local.is_file() else shutil.which("fast")
    if not found:
        raise DataError("fastBPE's `fast` tool was not found: run scripts/install_fastbpe.sh")
    return found


class FastBPETokenizer(Tokenizer):
    """fastBPE codes and vocab; ids: <unk>, </s>, <n>, then the vocab file's entries in its order."""

    backend = "fastbpe"
    files = {"codes": "codes", "vocab": "vocab"}

    def __init__(self, directory):
        try:
            import fastBPE
        except ImportError as e:
            raise DataError("the fastbpe backend needs the fastBPE module: "
                            "run scripts/install_fastbpe.sh") from e
        directory = Path(directory)
        vocab = [line.split(" ")[0] for line in (directory / "vocab").read_text().splitlines() if line]
        super().__init__(directory, [*SPECIAL, *vocab])
        with _silenced():
            self.bpe = fastBPE.fastBPE(str(directory / "codes"), str(directory / "vocab"))
        self.ids = {piece: i for i, piece in enumerate(self.pieces)}

    @classmethod
    def learn(cls, text_file: Path, directory: Path, vocab_size: int, seed: int = 0):
        """`vocab_size` is the number of merges; the vocabulary adds the characters seen."""
        fast = fast_binary()
        run = dict(check=True, capture_output=True)
        try:
            with open(directory / "codes", "wb") as codes:
                subprocess.run([fast, "learnbpe", str(vocab_size), str(text_file)], stdout=codes,
                               check=True, stderr=subprocess.PIPE)
            applied = directory / "train.bpe.tmp"
            subprocess.run([fast, "applybpe", str(applied), str(text_file), str(directory / "codes")], **run)
            with open(directory / "vocab", "wb") as vocab:
                subprocess.run([fast, "getvocab", str(applied)], stdout=vocab, check=True,
                               stderr=subprocess.PIPE)
            applied.unlink()
        except subprocess.CalledProcessError as e:
            raise DataError(f"fastBPE failed on {text_file}: {e.stderr.decode(errors='replace')}") from e
        return cls(directory)

    def _encode_lines(self, lines):
        # Special pieces are ids, never text: a literal "</s>" in the text is unknown to fastBPE.
        return [[self.ids.get(p, UNK_ID) if p not in SPECIAL else UNK_ID for p in line.split()]
                for line in self.bpe.apply(lines)]

    def _decode_line(self, ids):
        return (" ".join(self.pieces[i] for i in ids) + " ").replace("@@ ", "").rstrip(" ")


class HFTokenizer(Tokenizer):
    """A pretrained model's own tokenizer (the `tokenizers` library's `hf_tokenizer.json`), used as it is.

    No Moses and no <n>: the model's tokenizer sees the raw text, line breaks included, and documents end with
    the model's end-of-text token (`eos_id`, recorded in tokenizer.json). Written by pkmlm.data.hf_tokenizer.
    """

    backend = "hf"
    files = {"tokenizer": "hf_tokenizer.json"}

    def __init__(self, directory):
        from tokenizers import Tokenizer as Fast

        directory = Path(directory)
        self.fast = Fast.from_file(str(directory / self.files["tokenizer"]))
        size = self.fast.get_vocab_size(with_added_tokens=True)
        super().__init__(directory, [self.fast.id_to_token(i) or "" for i in range(size)])
        meta = directory / META
        self.eos_id = json.loads(meta.read_text())["eos_id"] if meta.is_file() else 0
        self.unk_id, self.newline_id = None, None

    @property
    def vocab_hash(self) -> str:
        # The end-of-text id is part of the stream's meaning, so two choices of it are two vocabularies.
        text = "\n".join([self.backend, f"eos={self.eos_id}", *self.pieces])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Ids of each raw text, as the model's tokenizer splits it (no special tokens added, no eos)."""
        return [e.ids for e in self.fast.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, *, detokenized: bool = True) -> str:
        """Text of `ids`; `eos_id` ends a document (a blank line between documents, trailing ones dropped)."""
        docs, doc = [], []
        for i in map(int, ids):
            if i == self.eos_id:
                docs.append(doc)
                doc = []
            else:
                doc.append(i)
        if doc:
            docs.append(doc)
        return "\n\n".join(self.fast.decode(d, skip_special_tokens=False) for d in docs)

    def tokenize(self, text: str) -> str:
        """The model's tokenizer takes raw text: unchanged."""
        return text

    def save_meta(self) -> None:
        meta = {"format": META_FORMAT, "backend": self.backend, "files": self.files,
                "vocab_size": self.vocab_size, "vocab_hash": self.vocab_hash, "eos_id": self.eos_id,
                "eos_token": self.pieces[self.eos_id], "newline_id": None, "moses": self.moses.as_dict()}
        write_text_atomic(self.directory / META, json.dumps(meta, indent=1))


_CLASSES = {"sentencepiece": SentencePieceTokenizer, "fastbpe": FastBPETokenizer, "hf": HFTokenizer}


def cpu_count() -> int:
    """CPUs this process may use (a Slurm allocation, not the whole node)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def learn_tokenizer(backend: str, text_file, directory, vocab_size: int, seed: int = 0,
                    moses: MosesSettings = MosesSettings()) -> Tokenizer:
    """Learn a `backend` vocabulary from `text_file` (one Moses-tokenized paragraph per line).

    `moses`: the settings `text_file` was tokenized with, recorded for `Tokenizer.tokenize`.
    """
    if backend not in BACKENDS:
        raise DataError(f"unknown BPE backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if vocab_size < 3:
        raise DataError(f"vocab size must be at least 3, got {vocab_size}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _CLASSES[backend].learn(Path(text_file), directory, vocab_size, seed)
    tokenizer.moses = moses
    tokenizer.save_meta()
    return tokenizer


def load_tokenizer(directory) -> Tokenizer:
    """The tokenizer saved in `directory` (DATA_DIR/tokenizer), checked against its tokenizer.json."""
    path = Path(directory) / META
    blocker = file_in_the_way(directory)
    if blocker is not None:
        raise DataError(f"{blocker} is a file, not a directory: give a prepared data directory (its tokenizer "
                        "is DATA_DIR/tokenizer)")
    if not path.is_file():
        raise DataError(f"{path} not found: prepare the data first (python -m pkmlm.data.prepare)")
    meta = json.loads(path.read_text())
    if meta.get("format") != META_FORMAT:
        raise DataError(f"{path} has format {meta.get('format')!r}, written by an older pkmlm whose "
                        f"token stream had no line breaks; this code reads format {META_FORMAT}: "
                        f"prepare the data again (python -m pkmlm.data.prepare)")
    if meta.get("backend") not in _CLASSES:
        raise DataError(f"{path}: unknown backend {meta.get('backend')!r}: prepare the data again")
    tokenizer = _CLASSES[meta["backend"]](directory)
    if tokenizer.vocab_hash != meta.get("vocab_hash"):
        raise DataError(f"{path}: the vocabulary files hash to {tokenizer.vocab_hash}, not "
                        f"{meta.get('vocab_hash')}: they were changed; prepare the data again")
    tokenizer.moses = MosesSettings(**meta["moses"])
    return tokenizer
