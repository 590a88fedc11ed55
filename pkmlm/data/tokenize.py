"""Moses punctuation normalisation and tokenization (sacremoses), line by line.

Optional lowercasing and accent removal, as the paper's release did after Moses. Parallelism is
over preparation tasks (pkmlm/data/prepare.py), not inside this module.
"""

from __future__ import annotations

import unicodedata
from dataclasses import asdict, dataclass

from sacremoses import MosesDetokenizer, MosesPunctNormalizer, MosesTokenizer

_MOSES: dict = {}  # per process: built once per language, reused for every document


@dataclass(frozen=True)
class MosesSettings:
    """How raw text becomes the text the BPE sees; recorded in tokenizer.json with the vocabulary."""

    lang: str = "en"
    lowercase: bool = False
    remove_accents: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def _moses(lang: str):
    if lang not in _MOSES:
        _MOSES[lang] = (MosesPunctNormalizer(lang=lang), MosesTokenizer(lang=lang))
    return _MOSES[lang]


def strip_accents(text: str) -> str:
    """Drop combining marks after canonical decomposition: "café" -> "cafe"."""
    return "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")


def tokenize(text: str, settings: MosesSettings = MosesSettings()) -> str:
    """Normalise and tokenize each line (paragraph) of `text`; lines stay lines, empty ones go.

    escape=False keeps characters such as & and ' as they are rather than HTML entities.
    """
    normalizer, tokenizer = _moses(settings.lang)
    out = []
    for line in text.split("\n"):
        line = tokenizer.tokenize(normalizer.normalize(line), escape=False, return_str=True)
        if settings.lowercase:
            line = line.lower()
        if settings.remove_accents:
            line = strip_accents(line)
        line = " ".join(line.split())  # no stray separators (e.g. U+2028) survive inside a line
        if line:
            out.append(line)
    return "\n".join(out)


def detokenize(text: str, lang: str = "en") -> str:
    """Inverse of `tokenize` up to whitespace, normalisation and case: for reading. Lines stay lines."""
    detok = MosesDetokenizer(lang=lang)
    return "\n".join(detok.detokenize(line.split()) for line in text.split("\n"))
