"""Moses punctuation normalisation and tokenization (sacremoses), in parallel over CPU cores."""

from __future__ import annotations

import itertools
import multiprocessing
import os
from typing import Iterable, Iterator

from sacremoses import MosesDetokenizer, MosesPunctNormalizer, MosesTokenizer
from tqdm import tqdm

_MOSES: dict = {}  # per process: built once, reused for every document


def _moses(lang: str):
    if lang not in _MOSES:
        _MOSES[lang] = (MosesPunctNormalizer(lang=lang), MosesTokenizer(lang=lang))
    return _MOSES[lang]


def tokenize(text: str, lang: str = "en") -> str:
    """Normalise and tokenize each line (paragraph) of `text`; lines stay lines.

    escape=False keeps characters such as & and ' as they are rather than HTML entities.
    """
    normalizer, tokenizer = _moses(lang)
    lines = (tokenizer.tokenize(normalizer.normalize(line), escape=False, return_str=True)
             for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def detokenize(text: str, lang: str = "en") -> str:
    """Inverse of `tokenize` up to whitespace and normalisation: for printing samples."""
    detok = MosesDetokenizer(lang=lang)
    return "\n".join(detok.detokenize(line.split()) for line in text.split("\n"))


def _tokenize_en(text: str) -> str:
    return tokenize(text, "en")


def tokenize_all(texts: Iterable[str], *, workers: int | None = None, chunk: int = 512,
                 progress: bool = True, total: int | None = None) -> Iterator[str]:
    """`tokenize(text, "en")` of each text, in order, over `workers` processes (default: all cores).

    Texts are taken `chunk * workers` at a time, so memory stays bounded however long `texts` is.
    """
    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=total, unit="doc", desc="moses", disable=not progress)
    texts = iter(texts)
    pool = multiprocessing.Pool(workers) if workers > 1 else None
    try:
        while batch := list(itertools.islice(texts, chunk * workers)):
            results = pool.imap(_tokenize_en, batch, chunksize=16) if pool else map(_tokenize_en, batch)
            for result in results:
                bar.update()
                yield result
    finally:
        bar.close()
        if pool:
            pool.terminate()
