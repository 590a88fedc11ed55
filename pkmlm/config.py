"""Typed run configuration: dataclasses <- YAML file <- `key.sub=value` overrides, validated once.

    config = load_config("configs/tiny_pkm.yaml", ["train.max_steps=200", "memory.positions=[2:parallel]"])

Every problem is a `ConfigError` that names the dotted key and where it came from (the file, or the
override that set it). `Config.to_dict()` / `Config.from_dict()` round-trip through plain Python types
so the config can sit inside a checkpoint loaded with `torch.load(weights_only=True)`.
See docs/config.md for every key.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from pkmlm.cli import UserError, utf8_text
from pkmlm.memory import FLAT_MAX_SLOTS, KEY_INITS, VALUE_INITS

PLACEMENTS = ("replace", "after", "parallel")
NORMS = ("layernorm", "rmsnorm")
POSITION_ENCODINGS = ("learned", "rope")
FFNS = ("gelu", "gelu_tanh", "swiglu")
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
PARALLEL = ("ddp", "fsdp")  # train.parallel: how several processes share the dense parameters
# Fine-tuning (pkmlm/training/finetune.py): parts train.freeze may name, and what train.trainable may be.
FREEZE_PARTS = ("embeddings", "attention", "ffn", "norms", "dense", "memory", "memory_keys", "memory_values")
TRAINABLE = ("all", "memory", "slots", "lora")
SLOT_SELECTIONS = ("tfidf",)


class ConfigError(UserError, ValueError):
    """An unknown key, a wrong type or an invalid value in a config file, override or dict."""


@dataclass
class ModelConfig:
    n_layers: int
    d_model: int
    n_heads: int
    vocab_size: int = 0  # 0: take it from the data manifest
    ffn_mult: int = 4
    dropout: float = 0.1
    attn_dropout: float = 0.0
    max_seq_len: int = 512  # learned: position table size, longest input; rope: attention window
    # Block variants (docs/config.md); the defaults are the 2019 transformer.
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    position_encoding: str = "learned"  # learned | rope
    rope_theta: float = 10000.0
    ffn: str = "gelu"  # gelu | gelu_tanh | swiglu
    ffn_hidden: int = 0  # 0: derived from ffn_mult (see ffn_width)
    n_kv_heads: int = 0  # grouped-query attention; 0: n_heads
    head_dim: int = 0  # 0: d_model // n_heads
    bias: bool = True  # biases of attention and FFN projections and of LayerNorm
    attn_qkv_bias: Optional[bool] = None  # q/k/v projection bias; None: follows bias (Qwen2: bias false, this true)
    attn_qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    tie_embeddings: bool = True  # output layer reuses the token embedding

    def kv_heads(self) -> int:
        """Key/value heads: n_kv_heads, or n_heads when it is 0."""
        return self.n_kv_heads or self.n_heads

    def head_size(self) -> int:
        """Per-head width of q, k and v: head_dim, or d_model // n_heads when it is 0."""
        return self.head_dim or self.d_model // self.n_heads

    def ffn_width(self) -> int:
        """FFN hidden width: ffn_hidden, else ffn_mult * d_model for GELU FFNs, and for SwiGLU two thirds of
        that rounded up to a multiple of 256 (Llama's rule: about the GELU FFN's parameter count)."""
        if self.ffn_hidden:
            return self.ffn_hidden
        if self.ffn == "swiglu":
            return 256 * math.ceil(2 * self.ffn_mult * self.d_model / 3 / 256)
        return self.ffn_mult * self.d_model


@dataclass
class MemoryConfig:
    positions: list[str] = field(default_factory=list)  # "LAYER:replace|after|parallel", LAYER 0-based
    n_keys: int = 512
    heads: int = 4
    knn: int = 32
    k_dim: int = 512
    v_dim: Optional[int] = None  # None: d_model
    query_batchnorm: bool = True
    input_dropout: float = 0.0
    query_dropout: float = 0.0
    value_dropout: float = 0.0
    share_values: bool = False
    shard_values: bool = False  # each process holds v_dim / world_size columns of every table (pkmlm/memory/value_table.py)
    reinit_every: int = 0  # steps between dead-slot re-initialisations (0: off); see pkmlm/training/reinit.py
    reinit_min_count: int = 1  # a slot read fewer times than this in the window is dead
    values_file: Optional[str] = None  # the value table and its Adam state in memory-mapped files here
    values_file_cache_gb: Optional[float] = None  # RAM for rows changed between write-backs (None: half the RAM)
    # Memory+ and the papers' ablations (docs/config.md).
    gated: bool = False  # Memory+: out = W_o(read * silu(W_g x))
    qk_norm: bool = False  # cosine scores between query halves and sub-keys
    learn_keys: bool = True
    key_init: str = "uniform"  # uniform | normal | orthogonal
    score_temperature: float = 1.0
    score_softmax: bool = True
    query_layers: int = 1  # linear layers of the query network
    query_layernorm: bool = False  # LayerNorm instead of BatchNorm on the queries
    value_init: str = "normal"  # normal | zero
    flat: bool = False  # exact memory, one full key per slot (small sizes only)

    def placements(self) -> list[tuple[int, str]]:
        """`positions` parsed to (layer, placement) pairs, in the order given. Assumes a validated config."""
        return [(int(layer), kind) for layer, kind in (p.split(":") for p in self.positions)]


@dataclass
class DataConfig:
    batch_size: int  # global sequences per optimizer step (summed over ranks and accumulation steps)
    bptt: int
    dir: str = "data/bbc_news"
    seed: int = 0
    verify_checksums: bool = False


@dataclass
class TrainConfig:
    max_steps: int
    out_dir: str = "runs/default"
    lr: float = 2.5e-4
    value_lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    weight_decay: float = 0.0
    warmup_steps: int = 4000
    grad_clip: float = 1.0  # 0: off
    grad_accum: int = 1
    precision: str = "fp32"
    device: str = "auto"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 500
    eval_batches: int = 0  # 0: the whole valid split
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    sync_batchnorm: bool = False
    parallel: str = "ddp"  # ddp: replicated dense parameters; fsdp: sharded over processes (FSDP2)
    max_nonfinite: int = 10  # consecutive non-finite losses before the run stops
    keep_best: bool = False  # also keep checkpoints/best.pt, the lowest validation loss seen
    dist_timeout_s: float = 1800.0  # a collective that waits longer than this fails the run on every rank
    # Fine-tuning (pkmlm/training/finetune.py, docs/config.md): what trains and what stays frozen.
    freeze: list[str] = field(default_factory=list)  # parts not trained, from FREEZE_PARTS (trainable=all only)
    trainable: str = "all"  # all | memory (= freeze everything outside memories) | slots | lora
    slot_selection: str = "tfidf"  # slots: how the T rows of a step are chosen
    top_slots: int = 0  # slots: value rows updated per step and value table (required, >= 1)
    background: Optional[str] = None  # slots: prepared data dir whose train split gives background slot reads
    background_tokens: int = 1_000_000  # slots: background tokens read (0: the whole train split)
    lora_rank: int = 8  # lora: rank of the adapters on attention and FFN projections
    lora_alpha: float = 16.0  # lora: adapters scaled by lora_alpha / lora_rank
    compile: bool = False  # the training forward and backward compiled with torch.compile (docs/config.md)


@dataclass
class Config:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts/lists/scalars: safe for YAML and for `torch.load(weights_only=True)`."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in ("model", "memory", "data", "train")}

    @classmethod
    def from_dict(cls, d: dict, source: str = "config dict") -> "Config":
        """Build and validate a Config; errors name the dotted key and `source`."""
        return _build(cls, d, "", source)._validated(source)

    def to_yaml(self) -> str:
        """The resolved config as YAML that `load_config` reads back to an equal Config."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def _validated(self, source: str) -> "Config":
        for key, message in _problems(self):
            raise ConfigError(f"{source}: invalid value for '{key}': {message}")
        return self

    def validate_runtime(self, *, world_size: int = 1, device_type: str = "cpu") -> None:
        """Checks that need facts known only at launch: the process count and the device actually used."""
        per_step = world_size * self.train.grad_accum
        if self.memory.values_file and (world_size > 1 or device_type != "cpu"):
            raise ConfigError(
                f"memory.values_file keeps the value table in memory-mapped files for one CPU process; this run "
                f"has {world_size} process(es) on {device_type}: unset memory.values_file, or run one CPU process")
        if self.data.batch_size % per_step:
            raise ConfigError(
                f"data.batch_size={self.data.batch_size} is not divisible by world_size ({world_size}) x "
                f"train.grad_accum ({self.train.grad_accum}); pick a multiple of {per_step}")
        if self.train.sync_batchnorm and world_size > 1 and device_type != "cuda":
            raise ConfigError(  # refused here, before any file is written, as wrap_model would refuse it later
                f"train.sync_batchnorm=true needs CUDA devices (torch syncs BatchNorm on GPUs only); this run has "
                f"{world_size} processes on {device_type}: set train.sync_batchnorm=false")
        v_dim = self.memory.v_dim or self.model.d_model
        if self.memory.shard_values and self.memory.positions and v_dim % world_size:
            raise ConfigError(
                f"memory.shard_values=true splits the value columns over processes, but {world_size} processes do "
                f"not divide v_dim={v_dim}; run on a number of processes that divides {v_dim}, or set "
                "memory.shard_values=false")

    def resolve_vocab_size(self, data_vocab_size: int) -> int:
        """The embedding size to build: model.vocab_size, or the data's when it is 0."""
        if self.model.vocab_size == 0:
            return data_vocab_size
        if self.model.vocab_size < data_vocab_size:
            raise ConfigError(
                f"model.vocab_size={self.model.vocab_size} is smaller than the data's vocabulary "
                f"({data_vocab_size}); set it to 0 to take the data's size")
        return self.model.vocab_size


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply `key.sub=value` overrides (value parsed as YAML), validate."""
    path = Path(path)
    source = str(path)
    if path.is_dir():
        raise ConfigError(f"{source} is a directory, not a config file: give a YAML file, e.g. configs/tiny_pkm.yaml")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found (see configs/ for the shipped ones)") from None
    except OSError as e:
        raise ConfigError(f"{source}: cannot read config file: {e.strerror}") from None
    try:
        text = utf8_text(data, source)
    except UserError as e:
        raise ConfigError(str(e)) from None
    try:
        raw = yaml.load(text, Loader=_Loader)
    except _DuplicateKey as e:
        raise ConfigError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {_one_line(e)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections "
                          f"(model, memory, data, train), got {type(raw).__name__}")
    for override in overrides:
        _apply_override(raw, override, source)
    return Config.from_dict(raw, source)


# --- YAML ----------------------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`; users write the former)
    and refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: SafeLoader's own error says so
                    break
                if duplicate:
                    raise _DuplicateKey(f"duplicate key '{key}' on line {line} (first on line {seen[key]}): "
                                        "keep only one of them")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(yaml.YAMLError):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _apply_override(raw: dict, override: str, source: str) -> None:
    key, sep, text = override.partition("=")
    where = f"{source}: override '{override}'"
    if not sep or not key.strip():
        raise ConfigError(f"{where}: expected KEY.SUB=VALUE, e.g. train.max_steps=100")
    try:
        value = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: the value is not valid YAML: {_one_line(e)}") from None
    parts = key.strip().split(".")
    _check_path(parts, where)
    node = raw
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: '{'.'.join(parts[:i + 1])}' is not a section")
    node[parts[-1]] = value


def _check_path(parts: list[str], where: str) -> None:
    """Reject an unknown dotted key early, so the error names the override rather than the file."""
    cls: Any = Config
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"{where}: '{'.'.join(parts[:i])}' is a value, not a section")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            raise ConfigError(f"{where}: {_unknown(parts[:i], part, fields)}")
        cls = _hints(cls)[part]


# --- dict -> dataclasses, with type checks -------------------------------------------------------------

def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown(prefix: list[str], name: str, fields) -> str:
    dotted = ".".join([*prefix, str(name)])
    close = difflib.get_close_matches(str(name), list(fields), n=1)
    hint = f" (did you mean '{'.'.join([*prefix, close[0]])}'?)" if close else \
        f" (known: {', '.join(fields)})"
    return f"unknown key '{dotted}'{hint}"


def _build(cls, d: Any, prefix: str, source: str):
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: '{where}' must be a mapping, got {_describe(d)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix_parts = prefix.rstrip(".").split(".") if prefix else []
    for name in d:
        if name not in fields:
            raise ConfigError(f"{source}: {_unknown(prefix_parts, name, fields)}")
    hints = _hints(cls)
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in d:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{source}: missing required key '{key}'")
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, d[name], key + ".", source)
        else:
            kwargs[name] = _coerce(d[name], hint, key, source)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check `value` against a field's type; ints are accepted (and converted) for floats, bools are not."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key, source)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{key}' must be a list, got {_describe(value)}")
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):  # .nan would slip past every comparison below; .inf is never meant
            raise ConfigError(f"{source}: '{key}' must be a finite number, got {value!r}")
        return float(value)
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{source}: '{key}' must be {_TYPE_NAMES[hint]}, got {_describe(value)}")


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _describe(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping", type(None): "nothing (null)"}.get(type(value), type(value).__name__)
    return f"{kind} ({value!r})" if not isinstance(value, (dict, list)) else kind


# --- value checks ---------------------------------------------------------------------------------------

def _problems(c: Config):
    """Yield (dotted key, message) for every invalid value, in a fixed order."""
    m, mem, d, t = c.model, c.memory, c.data, c.train

    def at_least(key: str, value, low):
        if value < low:
            yield key, f"{value} (must be >= {low})"

    def probability(key: str, value):
        if not 0.0 <= value < 1.0:
            yield key, f"{value} (must be in [0, 1))"

    yield from at_least("model.vocab_size", m.vocab_size, 0)
    yield from at_least("model.n_layers", m.n_layers, 1)
    yield from at_least("model.d_model", m.d_model, 1)
    yield from at_least("model.n_heads", m.n_heads, 1)
    yield from at_least("model.head_dim", m.head_dim, 0)
    if m.n_heads >= 1 and m.head_dim == 0 and m.d_model % m.n_heads:
        yield "model.n_heads", (f"{m.n_heads} does not divide model.d_model={m.d_model} (or set model.head_dim "
                                "to the per-head width)")
    yield from at_least("model.n_kv_heads", m.n_kv_heads, 0)
    if m.n_kv_heads >= 1 and m.n_heads >= 1 and m.n_heads % m.n_kv_heads:
        yield "model.n_kv_heads", (f"{m.n_kv_heads} does not divide model.n_heads={m.n_heads} (each key/value "
                                   "head serves a whole group of query heads; 0: n_heads)")
    yield from at_least("model.ffn_mult", m.ffn_mult, 1)
    yield from at_least("model.ffn_hidden", m.ffn_hidden, 0)
    yield from probability("model.dropout", m.dropout)
    yield from probability("model.attn_dropout", m.attn_dropout)
    yield from at_least("model.max_seq_len", m.max_seq_len, 1)
    if m.norm not in NORMS:
        yield "model.norm", f"'{m.norm}' (must be one of {', '.join(NORMS)})"
    if not 0 < m.norm_eps < 1:
        yield "model.norm_eps", f"{m.norm_eps} (must be in (0, 1), e.g. 1e-5 or 1e-6)"
    if m.position_encoding not in POSITION_ENCODINGS:
        yield "model.position_encoding", f"'{m.position_encoding}' (must be one of {', '.join(POSITION_ENCODINGS)})"
    elif m.position_encoding == "rope" and m.n_heads >= 1 and m.head_size() % 2:
        yield "model.position_encoding", (f"rope rotates pairs of dimensions, but the head size {m.head_size()} is "
                                          "odd; choose model.d_model / model.n_heads (or model.head_dim) even")
    if m.rope_theta <= 1:
        yield "model.rope_theta", f"{m.rope_theta} (must be > 1, e.g. 10000)"
    if m.ffn not in FFNS:
        yield "model.ffn", f"'{m.ffn}' (must be one of {', '.join(FFNS)})"

    seen: dict[int, set[str]] = {}
    for i, p in enumerate(mem.positions):
        key = f"memory.positions[{i}]"
        match = re.fullmatch(r"(\d+):(\w+)", p)
        if not match or match.group(2) not in PLACEMENTS:
            yield key, f"'{p}' (expected 'LAYER:PLACEMENT' with PLACEMENT one of {', '.join(PLACEMENTS)}, e.g. '5:replace')"
            continue
        layer, kind = int(match.group(1)), match.group(2)
        if layer >= m.n_layers:
            yield key, f"'{p}': layer {layer} is out of range (layers are 0-based, model.n_layers={m.n_layers})"
        kinds = seen.setdefault(layer, set())
        if kind in kinds:
            yield key, f"'{p}' is a duplicate"
        if {kind} | kinds >= {"replace", "parallel"}:
            yield key, f"'{p}': layer {layer} cannot have both 'replace' and 'parallel' (both act on its FFN)"
        kinds.add(kind)
    yield from at_least("memory.n_keys", mem.n_keys, 1)
    yield from at_least("memory.heads", mem.heads, 1)
    yield from at_least("memory.knn", mem.knn, 1)
    if mem.knn > mem.n_keys:
        yield "memory.knn", f"{mem.knn} is larger than memory.n_keys={mem.n_keys}"
    yield from at_least("memory.k_dim", mem.k_dim, 2)
    if mem.k_dim % 2:
        yield "memory.k_dim", f"{mem.k_dim} is odd (it is split in two halves, one per sub-key set)"
    if mem.v_dim is not None:
        yield from at_least("memory.v_dim", mem.v_dim, 1)
    for name in ("input_dropout", "query_dropout", "value_dropout"):
        yield from probability(f"memory.{name}", getattr(mem, name))
    yield from at_least("memory.reinit_every", mem.reinit_every, 0)
    yield from at_least("memory.reinit_min_count", mem.reinit_min_count, 1)
    if mem.values_file_cache_gb is not None:
        if mem.values_file is None:
            yield "memory.values_file_cache_gb", "is set but memory.values_file is not (unset it, or set both)"
        elif not mem.values_file_cache_gb > 0:
            yield "memory.values_file_cache_gb", f"{mem.values_file_cache_gb} (must be > 0 GB, or null for half the RAM)"
    if mem.values_file is not None:
        tables = 1 if mem.share_values else len(mem.positions)
        if not mem.values_file.strip():
            yield "memory.values_file", "empty (give a file path, or leave it unset for a table in RAM)"
        elif tables != 1:
            yield "memory.values_file", (f"needs exactly one value table, the model has {tables} "
                                         "(set memory.share_values=true or use one memory position)")
        elif mem.reinit_every > 0:
            yield "memory.values_file", "cannot be combined with memory.reinit_every > 0 (set it to 0)"
        elif mem.shard_values:
            yield "memory.values_file", "cannot be combined with memory.shard_values=true (one process holds the file)"
        elif mem.value_init != "normal":
            yield "memory.values_file", f"cannot be combined with memory.value_init={mem.value_init} (the file is " \
                                        "initialised normal); set memory.value_init=normal"
        elif t.keep_best:
            yield "memory.values_file", ("cannot be combined with train.keep_best=true (the file holds the newest "
                                         "checkpoint's table only); set train.keep_best=false")
    if t.compile and mem.positions and (mem.shard_values or mem.values_file):
        key = "memory.shard_values" if mem.shard_values else "memory.values_file"
        yield "train.compile", (f"true with {key} set: a sharded or file-backed value table is not compiled yet; "
                                f"set train.compile=false, or unset {key}")
    if mem.reinit_every > 0 and not mem.positions:
        yield "memory.reinit_every", f"{mem.reinit_every} but the model has no memory (memory.positions is empty)"
    if mem.key_init not in KEY_INITS:
        yield "memory.key_init", f"'{mem.key_init}' (must be one of {', '.join(KEY_INITS)})"
    if mem.value_init not in VALUE_INITS:
        yield "memory.value_init", f"'{mem.value_init}' (must be one of {', '.join(VALUE_INITS)})"
    elif mem.shard_values and mem.value_init != "normal":
        yield "memory.value_init", (f"'{mem.value_init}' with memory.shard_values=true (sharded tables are "
                                    "initialised normal): set memory.value_init=normal")
    if mem.score_temperature <= 0:
        yield "memory.score_temperature", f"{mem.score_temperature} (must be > 0)"
    yield from at_least("memory.query_layers", mem.query_layers, 1)
    if mem.query_layernorm and mem.query_batchnorm:
        yield "memory.query_layernorm", "true together with memory.query_batchnorm=true; set query_batchnorm=false"
    if mem.flat and mem.n_keys**2 > FLAT_MAX_SLOTS:
        yield "memory.flat", (f"true with memory.n_keys={mem.n_keys} ({mem.n_keys**2} slots): a flat memory "
                              f"scores every slot, so it is limited to {FLAT_MAX_SLOTS} slots "
                              f"(n_keys <= {int(FLAT_MAX_SLOTS**0.5)})")
    if mem.flat and mem.reinit_every > 0:
        yield "memory.reinit_every", (f"{mem.reinit_every} with memory.flat=true; dead-slot re-initialisation "
                                      "needs product keys")

    if not d.dir:
        yield "data.dir", "empty (give the prepared data directory)"
    yield from at_least("data.batch_size", d.batch_size, 1)
    yield from at_least("data.bptt", d.bptt, 1)
    if d.bptt > m.max_seq_len:
        yield "data.bptt", f"{d.bptt} is larger than model.max_seq_len={m.max_seq_len}"

    if not t.out_dir:
        yield "train.out_dir", "empty (give the run's output directory)"
    yield from at_least("train.max_steps", t.max_steps, 1)
    if t.lr <= 0:
        yield "train.lr", f"{t.lr} (must be > 0)"
    if t.value_lr <= 0:
        yield "train.value_lr", f"{t.value_lr} (must be > 0)"
    if len(t.betas) != 2:
        yield "train.betas", f"{t.betas} (must be two numbers, e.g. [0.9, 0.98])"
    for i, beta in enumerate(t.betas):
        yield from probability(f"train.betas[{i}]", beta)
    yield from at_least("train.weight_decay", t.weight_decay, 0)
    yield from at_least("train.warmup_steps", t.warmup_steps, 0)
    yield from at_least("train.grad_clip", t.grad_clip, 0)
    yield from at_least("train.grad_accum", t.grad_accum, 1)
    if t.grad_accum >= 1 and d.batch_size % t.grad_accum:
        yield "train.grad_accum", f"{t.grad_accum} does not divide data.batch_size={d.batch_size}"
    if t.precision not in PRECISIONS:
        yield "train.precision", f"'{t.precision}' (must be one of {', '.join(PRECISIONS)})"
    if t.device not in DEVICES:
        yield "train.device", f"'{t.device}' (must be one of {', '.join(DEVICES)})"
    if t.parallel not in PARALLEL:
        yield "train.parallel", f"'{t.parallel}' (must be one of {', '.join(PARALLEL)})"
    for name in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "max_nonfinite"):
        yield from at_least(f"train.{name}", getattr(t, name), 1)
    yield from at_least("train.eval_batches", t.eval_batches, 0)
    if t.dist_timeout_s <= 0:
        yield "train.dist_timeout_s", f"{t.dist_timeout_s} (must be > 0 seconds)"
    yield from _finetune_problems(c)


def _finetune_problems(c: Config):
    """train.freeze / train.trainable and their options: one coherent choice of what trains."""
    mem, t = c.memory, c.train
    for i, part in enumerate(t.freeze):
        if part not in FREEZE_PARTS:
            yield f"train.freeze[{i}]", f"'{part}' (must be one of {', '.join(FREEZE_PARTS)})"
        elif part in t.freeze[:i]:
            yield f"train.freeze[{i}]", f"'{part}' is a duplicate"
    if t.trainable not in TRAINABLE:
        yield "train.trainable", f"'{t.trainable}' (must be one of {', '.join(TRAINABLE)})"
        return
    if t.freeze and t.trainable != "all":
        yield "train.freeze", (f"{t.freeze} with train.trainable={t.trainable}, which already decides what trains: "
                               "use train.freeze with train.trainable=all only")
    frozen = set(t.freeze)
    if "dense" in frozen and ("memory" in frozen or not mem.positions):
        yield "train.freeze", f"{t.freeze} freezes every parameter: leave something to train"
    if frozen & {"memory", "memory_keys", "memory_values"} and not mem.positions:
        yield "train.freeze", f"{t.freeze} names memory parts but the model has no memory (memory.positions is empty)"
    if t.trainable in ("memory", "slots") and not mem.positions:
        yield "train.trainable", f"'{t.trainable}' but the model has no memory (memory.positions is empty)"
    if mem.reinit_every > 0 and (t.trainable != "all" or frozen & {"memory", "memory_keys", "memory_values"}):
        yield "memory.reinit_every", (f"{mem.reinit_every} while the memory is (partly) frozen by train.trainable="
                                      f"{t.trainable} / train.freeze={t.freeze}: set memory.reinit_every=0")
    if t.slot_selection not in SLOT_SELECTIONS:
        yield "train.slot_selection", f"'{t.slot_selection}' (must be one of {', '.join(SLOT_SELECTIONS)})"
    if t.top_slots < 0:
        yield "train.top_slots", f"{t.top_slots} (must be >= 0)"
    if t.background_tokens < 0:
        yield "train.background_tokens", f"{t.background_tokens} (must be >= 0)"
    if t.trainable == "slots":
        if t.top_slots < 1:
            yield "train.top_slots", f"{t.top_slots} with train.trainable=slots: give the rows per step, e.g. 1000"
        if not t.background:
            yield "train.background", ("unset with train.trainable=slots: give a prepared data dir (e.g. the "
                                       "pretraining data) whose slot reads are the background")
        if mem.shard_values:
            yield "train.trainable", "'slots' with memory.shard_values=true is not supported: set shard_values=false"
    else:
        if t.top_slots:
            yield "train.top_slots", f"{t.top_slots} is used by train.trainable=slots only: remove it or set 0"
        if t.background:
            yield "train.background", "is used by train.trainable=slots only: remove it"
    if t.lora_rank < 1:
        yield "train.lora_rank", f"{t.lora_rank} (must be >= 1)"
    if t.lora_alpha <= 0:
        yield "train.lora_alpha", f"{t.lora_alpha} (must be > 0)"
