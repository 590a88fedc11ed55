"""A run's own text <-> token ids: Moses + BPE in, BPE + Moses detokenizer out.

    codec = load_codec(data_dir, vocab_hash=state["vocab_hash"])   # DATA_DIR/tokenizer, checked
    ids = codec.encode("The minister said")                        # no eos added
    text = codec.decode(ids)                                       # readable text

generate.py, the validation samples in TensorBoard and pkmlm.eval.inspect all go through this one class, so
how ids become text is decided here and only here.
"""

from __future__ import annotations

import os
from pathlib import Path

from pkmlm.data import DataError
from pkmlm.data.bpe import Tokenizer, load_tokenizer


class TextCodec:
    """Text to ids the way `pkmlm.data.prepare` made the training data, and ids back to display text."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_id

    def encode(self, text: str) -> list[int]:
        """Moses-normalised (with the data's own settings), tokenized and BPE-encoded ids of `text`; line breaks
        become the newline id; no eos."""
        return self.tokenizer.encode([self.tokenizer.tokenize(text)])[0]

    def decode(self, ids) -> str:
        """Display text of `ids`: BPE pieces joined, line breaks restored (an eos inside: a blank line between
        documents), Moses detokenized. Leading eos ids, the start-of-document context prompts begin with, are
        dropped."""
        ids = [int(i) for i in ids]
        start = next((k for k, i in enumerate(ids) if i != self.eos_id), len(ids))
        return self.tokenizer.decode(ids[start:])

    def piece(self, token_id: int) -> str:
        """The vocabulary entry of one id, as stored (e.g. '▁the', 'the@@'); eos as '</s>'."""
        return self.tokenizer.pieces[int(token_id)]


def load_codec(data_dir: str | os.PathLike, *, vocab_hash: str | None = None) -> TextCodec:
    """The codec of the prepared data directory `data_dir` (its tokenizer/ folder).

    With `vocab_hash` (a checkpoint's), a tokenizer with another vocabulary is a DataError.
    """
    directory = Path(data_dir) / "tokenizer"
    tokenizer = load_tokenizer(directory)
    if vocab_hash is not None and tokenizer.vocab_hash != vocab_hash:
        raise DataError(f"{directory} has vocabulary {tokenizer.vocab_hash}, not the model's {vocab_hash}: "
                        f"use the data directory the model was trained on (--data-dir)")
    return TextCodec(tokenizer)
