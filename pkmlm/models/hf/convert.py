"""Import a pretrained transformers model as a pkmlm run, and export a pkmlm model for transformers.

    report = import_pretrained("models/SmolLM2-135M", "runs/smollm2")      # or a .gguf file
    report = export_pretrained(model, "exported/", tokenizer_dir=run_data_dir / "tokenizer")

Import reads config.json and the *.safetensors (with or without an index; pytorch_model.bin too), or a .gguf file
through transformers (dequantised to float32), maps the tensors with the model's Family (families.py), checks that
they fill a TransformerLM exactly, and writes RUN_DIR/checkpoints/step_0000000.pt (a normal pkmlm checkpoint, step
0), RUN_DIR/config.yaml (the resolved config; data.dir is RUN_DIR, so generate.py and pkmlm.inspect find the
tokenizer in RUN_DIR/tokenizer) and RUN_DIR/tokenizer (pkmlm.data.hf_tokenizer).

Export writes model.safetensors, config.json, generation_config.json and the tokenizer. A model without memory
whose blocks are a transformers family (gpt2: LayerNorm, learned positions, GELU; llama: RMSNorm, RoPE, SwiGLU)
is written as that family, loadable without trust_remote_code; any other, memories included, as model_type
"pkmlm" with modeling_pkmlm.py (self-contained torch) and auto_map, loaded with trust_remote_code=True.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pkmlm import checkpoint as ckpt
from pkmlm.config import Config, ModelConfig
from pkmlm.data.bpe import HFTokenizer, load_tokenizer
from pkmlm.data.hf_tokenizer import save_hf_tokenizer
from pkmlm.fileio import write_text_atomic
from pkmlm.models.hf.families import HFError, family_of, hf_config, native_family, to_hf
from pkmlm.models.transformer import TransformerLM

MODELING = Path(__file__).with_name("modeling_pkmlm.py")
_MODEL_FIELDS = {f for f in ModelConfig.__dataclass_fields__}


# ---- reading a source -------------------------------------------------------------------------------------------

def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def read_source(source: str | os.PathLike) -> tuple[dict, dict]:
    """(transformers config dict, state dict of float tensors) of a model directory or .gguf file."""
    source = Path(source)
    if source.is_file() and source.suffix == ".gguf":
        return _read_gguf(source)
    if not source.is_dir():
        raise HFError(f"{source} is neither a transformers model directory nor a .gguf file")
    try:
        config = json.loads((source / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise HFError(f"{source}/config.json is missing or unreadable ({_first_line(e)}): give a transformers "
                      "model directory (config.json and *.safetensors)") from None
    index = source / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        paths = [_inside(source, f) for f in files]
    else:
        paths = sorted(source.glob("*.safetensors"))
    state: dict = {}
    if paths:
        from safetensors.torch import load_file
        for path in paths:
            try:
                state.update(load_file(str(path)))
            except Exception as e:  # a damaged file: one line naming it
                raise HFError(f"cannot read {path} ({_first_line(e)})") from None
    elif (source / "pytorch_model.bin").is_file():
        state = torch.load(source / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise HFError(f"{source} holds no *.safetensors (nor pytorch_model.bin): give a model directory with weights")
    return config, state


def _inside(directory: Path, name: str) -> Path:
    """`name` from an index file as a file directly inside `directory`; an index never points elsewhere."""
    path = directory / name
    if Path(name).name != name or not path.is_file():
        raise HFError(f"{directory}/model.safetensors.index.json names {name!r}, not a file in {directory}")
    return path


def _read_gguf(path: Path) -> tuple[dict, dict]:
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise HFError(f"reading {path} needs transformers, gguf and accelerate: pip install -e .[hf]") from None
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True,
                                                     dtype=torch.float32)
    except Exception as e:
        raise HFError(f"transformers cannot read {path} ({_first_line(e)})") from None
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    return config.to_dict(), state


# ---- import -----------------------------------------------------------------------------------------------------

@dataclass
class ImportReport:
    source: str
    family: str
    checkpoint: Path
    config: Config
    vocab_size: int
    mapped: list[tuple[str, str]] = field(default_factory=list)  # (pkmlm name, shape)
    ignored: list[str] = field(default_factory=list)  # source tensors that carry nothing (buffers, tied copies)

    def summary(self) -> str:
        m = self.config.model
        lines = [f"imported {self.source} ({self.family}): {m.n_layers} layers, d_model {m.d_model}, "
                 f"{m.n_heads} heads ({getattr(m, 'n_kv_heads', 0) or m.n_heads} kv), vocabulary {self.vocab_size}",
                 "model options: " + ", ".join(f"{k}={v}" for k, v in self.config.to_dict()["model"].items()),
                 f"mapped {len(self.mapped)} tensors; ignored {len(self.ignored)}"
                 + (f" ({', '.join(self.ignored[:6])}{' ...' if len(self.ignored) > 6 else ''})" if self.ignored else ""),
                 f"wrote {self.checkpoint}, {self.checkpoint.parent.parent / 'config.yaml'}, "
                 f"{self.checkpoint.parent.parent / 'tokenizer'}"]
        return "\n".join(lines)


def import_pretrained(source: str | os.PathLike, out: str | os.PathLike, *, eos_token: str | None = None,
                      bptt: int = 1024, batch_size: int = 8) -> ImportReport:
    """Write the transformers model `source` (directory or .gguf) as the pkmlm run directory `out`.

    bptt, batch_size: the data section of the written config (what fine-tuning it starts from).
    Raises HFError (unsupported or incomplete source, existing checkpoints in `out`), DataError (tokenizer).
    """
    source, out = Path(source), Path(out)
    if ckpt.list_checkpoints(out):
        raise HFError(f"{out} already holds checkpoints: give a new --out directory")
    hf_cfg, hf_state = read_source(source)
    family = family_of(hf_cfg, source)
    options = family.options(hf_cfg)
    vocab_size = hf_cfg.get("vocab_size") or hf_state.get("model.embed_tokens.weight",
                                                          hf_state.get("transformer.wte.weight")).shape[0]
    model_section = _model_section(options, vocab_size, source)
    config = Config.from_dict({
        "model": model_section, "memory": {},
        "data": {"dir": str(out.resolve()), "batch_size": batch_size, "bptt": min(bptt, model_section["max_seq_len"])},
        "train": {"max_steps": 1, "out_dir": str(out)}}, source=f"{source} (imported config)")
    state, used = family.to_pkmlm(hf_state, {**_NEW_DEFAULTS, **options})
    ignored = sorted(k for k in hf_state if k not in used)
    unexpected = [k for k in ignored if not k.endswith(family.ignored)]
    if unexpected:
        raise HFError(f"{source}: tensors pkmlm has no place for: {', '.join(unexpected[:5])}"
                      f"{' ...' if len(unexpected) > 5 else ''} (an architecture variant pkmlm does not implement)")
    model = TransformerLM(config, vocab_size)
    state = {k: v.float().contiguous() for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise HFError(f"{source}: the mapped tensors do not fit pkmlm's model ({str(e).splitlines()[1].strip()})") \
            from None

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = save_hf_tokenizer(source, out / "tokenizer", eos_token)
    if tokenizer.vocab_size > vocab_size:
        raise HFError(f"{source}: the tokenizer has {tokenizer.vocab_size} ids, the model's embedding only "
                      f"{vocab_size}: they do not belong together")
    write_text_atomic(out / "config.yaml", config.to_yaml())
    path = ckpt.save_checkpoint(checkpoint_state(model, config, tokenizer.vocab_hash, f"import {source}"), out, keep=1)
    return ImportReport(str(source), family.name, path, config, vocab_size,
                        [(k, "x".join(map(str, v.shape))) for k, v in state.items()], ignored)


def _model_section(options: dict, vocab_size: int, source) -> dict:
    """pkmlm's model section of a family's options; an option ModelConfig lacks is an error unless it is the
    value that leaving it out means (so a source that needs none also imports into an older ModelConfig)."""
    section = {"vocab_size": vocab_size}
    for key, value in options.items():
        if key in _MODEL_FIELDS:
            section[key] = value
        elif value != _NEW_DEFAULTS.get(key, object()):
            raise HFError(f"{source} needs model.{key}={value!r}, which this pkmlm does not have")
    return section


# What options newer than some pkmlm versions mean when left out (so a source that needs none imports anywhere).
_NEW_DEFAULTS = {"norm": "layernorm", "norm_eps": 1e-5, "position_encoding": "learned", "ffn": "gelu",
                 "ffn_hidden": 0, "n_kv_heads": 0, "head_dim": 0, "bias": True, "attn_qkv_bias": None,
                 "attn_qk_norm": False, "tie_embeddings": True, "rope_theta": 10000.0}


def checkpoint_state(model: nn.Module, config: Config, vocab_hash: str, origin: str) -> dict:
    """A step-0 pkmlm checkpoint dict of `model` (no optimizer state): what train.py --init-from, evaluate.py,
    generate.py and pkmlm.inspect read."""
    return {"format": ckpt.FORMAT, "config": config.to_dict(), "model": model.state_dict(), "optimizers": {},
            "step": 0, "rng": {"ranks": [ckpt.rng_state(torch.device("cpu"))]}, "data": {},
            "vocab_hash": vocab_hash, "init_from": origin}


# ---- export -----------------------------------------------------------------------------------------------------

@dataclass
class ExportReport:
    out: Path
    family: str  # gpt2 | llama | pkmlm (remote code)
    tensors: int
    tokenizer: str  # what was written for the tokenizer

    def summary(self) -> str:
        how = ("AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)" if self.family == "pkmlm"
               else "AutoModelForCausalLM.from_pretrained(DIR)")
        return (f"exported to {self.out} as model_type {self.family} ({self.tensors} tensors); tokenizer: "
                f"{self.tokenizer}; load with {how}")


def export_pretrained(model: TransformerLM, out: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None,
                      native: bool = True) -> ExportReport:
    """Write `model` (fp32 weights) as a transformers model directory `out` (replaced atomically).

    native: export a dense model whose blocks match gpt2 or llama as that family (else always model_type pkmlm).
    tokenizer_dir: the run's pkmlm tokenizer directory; backend "hf" becomes tokenizer.json, a Moses-based one
    (sentencepiece, fastbpe) is copied to pkmlm_tokenizer/ (its text must be Moses-tokenized first: no
    transformers tokenizer does that).
    """
    from safetensors.torch import save_file

    out = Path(out)
    config = model.config
    sections = config.to_dict()
    m = sections["model"]
    width = config.model.ffn_width()
    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
    eos = tokenizer.eos_id if tokenizer is not None else None
    memories = model.memories()
    family = native_family(m, bool(memories)) if native else None
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    if family is not None:
        tensors = to_hf(family, state, m)
        hf_cfg = hf_config(family, m, model.vocab_size, width, eos)
    else:
        family = "pkmlm"
        tensors, table_of = _remote_tensors(model, state)
        hf_cfg = {"architectures": ["PkmlmForCausalLM"], "model_type": "pkmlm",
                  "auto_map": {"AutoConfig": "modeling_pkmlm.PkmlmConfig",
                               "AutoModelForCausalLM": "modeling_pkmlm.PkmlmForCausalLM"},
                  "pkmlm": {"model": m, "memory": sections["memory"]}, "vocab_size": model.vocab_size,
                  "table_of": table_of, "tie_word_embeddings": m.get("tie_embeddings", True),
                  "torch_dtype": "float32"}
        if eos is not None:
            hf_cfg.update(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=1))
        generation = {"do_sample": False}
        if eos is not None:
            generation.update(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=1))
        if family == "pkmlm":
            shutil.copyfile(MODELING, tmp / MODELING.name)
        written = _write_tokenizer(tokenizer, tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportReport(out, family, len(tensors), written)


def _remote_tensors(model: TransformerLM, state: dict) -> tuple[dict, list[int]]:
    """pkmlm state -> modeling_pkmlm's names: every value table once, as tables.J.weight; table_of[i] = J."""
    tables: dict[int, int] = {}
    table_of = []
    for name, mem in model.memories():
        key = id(mem.values)
        tables.setdefault(key, len(tables))
        table_of.append(tables[key])
        state[f"tables.{tables[key]}.weight"] = mem.values.weight.detach().float().contiguous()
    tensors = {k: v for k, v in state.items() if not k.endswith(".values.weight")}
    return tensors, table_of


def _write_tokenizer(tokenizer, directory: Path) -> str:
    if tokenizer is None:
        return "none (no tokenizer given)"
    if isinstance(tokenizer, HFTokenizer):
        shutil.copyfile(tokenizer.directory / HFTokenizer.files["tokenizer"], directory / "tokenizer.json")
        eos = tokenizer.pieces[tokenizer.eos_id]
        (directory / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos, "pad_token": eos,
            "model_max_length": 1 << 30}, indent=1))
        return "tokenizer.json (the model's own)"
    shutil.copytree(tokenizer.directory, directory / "pkmlm_tokenizer")
    return (f"pkmlm_tokenizer/ ({tokenizer.backend} after Moses; not a transformers tokenizer: encode with "
            "pkmlm.data.bpe.load_tokenizer)")

