"""A pretrained model's own tokenizer as a pkmlm tokenizer directory (backend "hf", pkmlm.data.bpe.HFTokenizer).

    tokenizer = save_hf_tokenizer("models/SmolLM2-135M", "runs/smollm2/tokenizer")   # or a .gguf file

The source is a transformers model directory (its tokenizer.json, or files transformers converts to one), a
.gguf file (transformers converts the vocabulary it holds), or a pkmlm tokenizer directory of backend "hf".
The end-of-text token that ends every document is "<|endoftext|>" or "<|end_of_text|>" when the vocabulary
has one (what base models were pretrained with between documents), else the model's eos token;
`eos_token` chooses another. Both `pkmlm.hf import` and `prepare --hf-tokenizer` call this, so a model
imported from a source and data prepared from the same source have the same vocabulary hash.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pkmlm.data import DataError
from pkmlm.data.bpe import META, HFTokenizer, load_tokenizer

END_OF_TEXT = ("<|endoftext|>", "<|end_of_text|>")


def _pkmlm_meta(directory: Path) -> dict | None:
    """The tokenizer.json of a pkmlm tokenizer directory of backend "hf", or None."""
    try:
        meta = json.loads((directory / META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("backend") == HFTokenizer.backend else None


def _transformers_tokenizer(source: Path):
    """(tokenizers.Tokenizer, eos token or None) of a transformers directory or .gguf file, via transformers."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DataError(f"reading the tokenizer of {source} needs transformers: pip install -e .[hf]") from None
    try:
        if source.is_file():
            tok = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name, local_files_only=True)
        else:
            tok = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except Exception as e:  # transformers raises many kinds; one line names the source
        first = str(e).strip().split("\n", 1)[0]
        raise DataError(f"cannot read a tokenizer from {source} ({type(e).__name__}: {first}): give a "
                        "transformers model directory with tokenizer files, or a .gguf file") from None
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend is None:
        raise DataError(f"{source}: transformers gave a slow tokenizer without a `tokenizers` form; "
                        "give a directory with a tokenizer.json")
    return backend, tok.eos_token


def _configured_eos(source: Path) -> str | None:
    """The eos token a transformers directory names (tokenizer_config.json), or None."""
    try:
        eos = json.loads((source / "tokenizer_config.json").read_text()).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    return eos.get("content") if isinstance(eos, dict) else eos if isinstance(eos, str) else None


def save_hf_tokenizer(source: str | os.PathLike, directory: str | os.PathLike,
                      eos_token: str | None = None) -> HFTokenizer:
    """Write the tokenizer of `source` to the pkmlm tokenizer directory `directory`; return it loaded.

    Raises DataError naming the source when there is no tokenizer there, or when `eos_token` is not in it.
    """
    from tokenizers import Tokenizer as Fast

    source, directory = Path(source), Path(directory)
    if not source.exists():
        raise DataError(f"{source} does not exist: give a transformers model directory, a .gguf file or a "
                        "pkmlm tokenizer directory")
    meta = _pkmlm_meta(source) if source.is_dir() else None
    default_eos = None
    if meta is not None:  # already ours (e.g. RUN_DIR/tokenizer of an imported model)
        fast = Fast.from_file(str(source / HFTokenizer.files["tokenizer"]))
        default_eos = meta.get("eos_token")
    elif source.is_dir() and (source / "tokenizer.json").is_file():
        fast = Fast.from_file(str(source / "tokenizer.json"))
        default_eos = _configured_eos(source)
    elif source.is_dir() or source.suffix == ".gguf":
        fast, default_eos = _transformers_tokenizer(source)
    else:
        raise DataError(f"{source} is neither a directory nor a .gguf file: give a transformers model directory "
                        "or a .gguf file")
    vocab = fast.get_vocab(with_added_tokens=True)
    if eos_token is None:
        eos_token = next((t for t in END_OF_TEXT if t in vocab), default_eos)
    if eos_token is None:
        raise DataError(f"{source}: the tokenizer names no end-of-text token: give one (--eos-token)")
    if eos_token not in vocab:
        raise DataError(f"{source}: the end-of-text token {eos_token!r} is not in the tokenizer's vocabulary: "
                        "give one of its tokens (--eos-token)")
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fast.save(str(tmp / HFTokenizer.files["tokenizer"]))
        (tmp / META).write_text(json.dumps({"eos_id": vocab[eos_token]}))  # read by HFTokenizer.__init__
        tokenizer = HFTokenizer(tmp)
        tokenizer.save_meta()
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(directory)
