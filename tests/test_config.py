"""pkmlm.config: loading, overrides, every ConfigError path, round trips, shipped configs."""
from pathlib import Path

import pytest
import torch
import yaml

from pkmlm.config import Config, ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))

MINIMAL = """\
model: {n_layers: 4, d_model: 64, n_heads: 4, max_seq_len: 32}
data: {batch_size: 8, bptt: 16}
train: {max_steps: 10}
"""


@pytest.fixture
def path(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text(MINIMAL)
    return p


def error(path, overrides=(), text=None):
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message  # every error names its file
    return message


def test_defaults_and_minimal_file(path):
    c = load_config(path)
    assert (c.model.n_layers, c.model.vocab_size, c.model.ffn_mult) == (4, 0, 4)
    assert c.memory.positions == [] and c.memory.v_dim is None and c.memory.query_batchnorm
    assert c.data.dir == "data/bbc_news" and c.train.betas == [0.9, 0.98] and c.train.lr == 2.5e-4


def test_overrides_parse_values_as_yaml(path):
    c = load_config(path, [
        "memory.positions=[3:parallel, 1:replace, 1:after]", "train.max_steps=7", "train.lr=1e-3",
        "data.dir=/tmp/my data", "train.out_dir=runs/a", "data.batch_size=16", "data.bptt=32",
        "memory.n_keys=64", "memory.knn=8", "memory.v_dim=32", "train.betas=[0.8, 0.9]", "train.value_lr=2",
    ])
    assert c.memory.positions == ["3:parallel", "1:replace", "1:after"]
    assert c.memory.placements() == [(3, "parallel"), (1, "replace"), (1, "after")]
    assert c.train.max_steps == 7 and c.train.lr == 1e-3 and c.data.dir == "/tmp/my data"
    assert (c.data.batch_size, c.data.bptt, c.memory.n_keys, c.memory.knn, c.memory.v_dim) == (16, 32, 64, 8, 32)
    assert c.train.betas == [0.8, 0.9] and c.train.value_lr == 2.0 and isinstance(c.train.value_lr, float)
    assert load_config(path, ["memory.v_dim=null"]).memory.v_dim is None


def test_scientific_floats_without_a_dot_are_numbers(path):
    # plain YAML 1.1 reads `1e-3` as a string; users write it anyway
    path.write_text(MINIMAL.replace("max_steps: 10", "max_steps: 10, lr: 3e-4, weight_decay: 1E2"))
    c = load_config(path)
    assert c.train.lr == 3e-4 and c.train.weight_decay == 100.0


def test_unknown_keys_suggest_the_right_one(path):
    assert "unknown key 'train.max_step' (did you mean 'train.max_steps'?)" in error(path, ["train.max_step=5"])
    assert "override 'train.max_step=5'" in error(path, ["train.max_step=5"])
    msg = error(path, text=MINIMAL + "memroy: {n_keys: 4}\n")
    assert "unknown key 'memroy' (did you mean 'memory'?)" in msg
    msg = error(path, text=MINIMAL.replace("bptt: 16", "bptt: 16, zzz: 1"))
    assert "unknown key 'data.zzz'" in msg and "known:" in msg
    assert "'model.n_layers' is a value, not a section" in error(path, ["model.n_layers.x=1"])


@pytest.mark.parametrize("override, expected", [
    ("model.n_layers=true", "'model.n_layers' must be an integer, got a boolean"),
    ("model.n_layers=2.5", "'model.n_layers' must be an integer, got a number"),
    ("train.lr=fast", "'train.lr' must be a number, got a string ('fast')"),
    ("train.lr='0.1'", "'train.lr' must be a number, got a string"),
    ("train.lr=false", "'train.lr' must be a number, got a boolean"),
    ("train.betas=0.9", "'train.betas' must be a list"),
    ("train.betas=[0.9, x]", "'train.betas[1]' must be a number"),
    ("memory.positions=3:replace", "'memory.positions' must be a list"),
    ("memory.positions=[3]", "'memory.positions[0]' must be a string"),
    ("memory.query_batchnorm=1", "'memory.query_batchnorm' must be true or false"),
    ("data.dir=", "'data.dir' must be a string, got nothing"),
    ("memory=3", "'memory' must be a mapping"),
])
def test_wrong_types(path, override, expected):
    assert expected in error(path, [override])


@pytest.mark.parametrize("override, expected", [
    ("model.n_heads=3", "'model.n_heads': 3 does not divide model.d_model=64"),
    ("model.n_layers=0", "'model.n_layers': 0 (must be >= 1)"),
    ("model.vocab_size=-1", "'model.vocab_size'"),
    ("model.dropout=1.0", "'model.dropout': 1.0 (must be in [0, 1))"),
    ("memory.k_dim=33", "'memory.k_dim': 33 is odd"),
    ("memory.knn=600", "'memory.knn': 600 is larger than memory.n_keys=512"),
    ("memory.v_dim=0", "'memory.v_dim'"),
    ("memory.value_dropout=-0.1", "'memory.value_dropout'"),
    ("memory.positions=[4:replace]", "'memory.positions[0]': '4:replace': layer 4 is out of range (layers are 0-based, model.n_layers=4)"),
    ("memory.positions=[1:replace, 1:replace]", "'memory.positions[1]': '1:replace' is a duplicate"),
    ("memory.positions=[1:parallel, 1:replace]", "'memory.positions[1]': '1:replace': layer 1 cannot have both 'replace' and 'parallel'"),
    ("memory.positions=[1:sideways]", "'memory.positions[0]': '1:sideways' (expected 'LAYER:PLACEMENT'"),
    ("memory.positions=[-1:after]", "'memory.positions[0]'"),
    ("data.batch_size=0", "'data.batch_size': 0 (must be >= 1)"),
    ("data.bptt=64", "'data.bptt': 64 is larger than model.max_seq_len=32"),
    ("data.dir=''", "'data.dir': empty"),
    ("train.out_dir=''", "'train.out_dir': empty"),
    ("train.max_steps=0", "'train.max_steps'"),
    ("train.lr=0", "'train.lr': 0.0 (must be > 0)"),
    ("train.betas=[0.9]", "'train.betas'"),
    ("train.betas=[0.9, 1.0]", "'train.betas[1]'"),
    ("train.grad_accum=3", "'train.grad_accum': 3 does not divide data.batch_size=8"),
    ("train.precision=fp8", "'train.precision': 'fp8' (must be one of fp32, bf16, fp16)"),
    ("train.device=tpu", "'train.device': 'tpu'"),
    ("train.keep_checkpoints=0", "'train.keep_checkpoints'"),
    ("train.eval_batches=-1", "'train.eval_batches'"),
    ("train.dist_timeout_s=0", "'train.dist_timeout_s': 0.0 (must be > 0 seconds)"),
    ("memory.key_init=gaussian", "'memory.key_init': 'gaussian' (must be one of uniform, normal, orthogonal)"),
    ("memory.value_init=ones", "'memory.value_init': 'ones' (must be one of normal, zero)"),
    ("memory.score_temperature=0", "'memory.score_temperature': 0.0 (must be > 0)"),
    ("memory.query_layers=0", "'memory.query_layers': 0 (must be >= 1)"),
    ("memory.query_layernorm=true", "'memory.query_layernorm': true together with memory.query_batchnorm=true"),
    ("memory.flat=true", "'memory.flat': true with memory.n_keys=512 (262144 slots)"),
])
def test_invalid_values(path, override, expected):
    msg = error(path, [override])
    assert "invalid value for " + expected.split(": ")[0] in msg and expected in msg


def _float_keys():
    """Every float field of every section (list fields of floats as their first element)."""
    import typing
    from pkmlm import config as C
    for section, cls in typing.get_type_hints(C.Config).items():
        for name, hint in typing.get_type_hints(cls).items():
            if hint is float or (typing.get_origin(hint) is list and typing.get_args(hint) == (float,)):
                yield f"{section}.{name}", hint is float


@pytest.mark.parametrize("key, scalar", list(_float_keys()), ids=lambda k: str(k))
@pytest.mark.parametrize("bad", [".nan", ".inf", "-.inf"])
def test_every_float_key_refuses_nan_and_inf(path, key, scalar, bad):
    value = bad if scalar else f"[0.9, {bad}]"
    name = key if scalar else f"{key}[1]"
    assert f"'{name}' must be a finite number" in error(path, [f"{key}={value}"])


def test_nan_in_the_file_and_in_a_saved_config_is_refused(path):
    msg = error(path, text=MINIMAL.replace("max_steps: 10", "max_steps: 10, grad_clip: .nan"))
    assert "'train.grad_clip' must be a finite number, got nan" in msg
    path.write_text(MINIMAL)
    d = load_config(path).to_dict()
    d["train"]["lr"] = float("inf")
    with pytest.raises(ConfigError, match="checkpoint: 'train.lr' must be a finite number, got inf"):
        Config.from_dict(d, source="checkpoint")


def test_duplicate_yaml_keys_are_refused_with_their_line(path):
    msg = error(path, text=MINIMAL + "train: {max_steps: 20}\n")
    assert "duplicate key 'train' on line 4 (first on line 3)" in msg
    msg = error(path, text=MINIMAL.replace("bptt: 16", "bptt: 16, bptt: 32"))
    assert "duplicate key 'bptt' on line 2 (first on line 2)" in msg
    nested = MINIMAL.replace("train: {max_steps: 10}", "train:\n  max_steps: 10\n  lr: 1e-3\n  lr: 2e-3")
    assert "duplicate key 'lr' on line 6 (first on line 5)" in error(path, text=nested)
    path.write_text(MINIMAL)
    assert "duplicate key 'a'" in error(path, ["train.betas=[{a: 1, a: 2}]"])


def test_fp16_on_cpu_is_accepted(path):
    config = load_config(path, ["train.precision=fp16", "train.device=cpu"])  # CPU autocast + GradScaler
    config.validate_runtime(device_type="cpu")
    assert config.train.precision == "fp16"


def test_memory_option_types_and_cross_checks(path):
    assert "'memory.gated' must be true or false" in error(path, ["memory.gated=1"])
    assert "'memory.learn_keys' must be true or false" in error(path, ["memory.learn_keys=no_thanks"])
    assert "'memory.query_layers' must be an integer" in error(path, ["memory.query_layers=1.5"])
    msg = error(path, ["memory.flat=true", "memory.n_keys=64", "memory.knn=32", "memory.reinit_every=10",
                       "memory.positions=[1:replace]"])
    assert "'memory.reinit_every': 10 with memory.flat=true" in msg
    c = load_config(path, ["memory.flat=true", "memory.n_keys=256", "memory.knn=32", "memory.gated=true",
                           "memory.query_batchnorm=false", "memory.query_layernorm=true", "memory.qk_norm=true",
                           "memory.learn_keys=false", "memory.key_init=orthogonal", "memory.score_temperature=2",
                           "memory.score_softmax=false", "memory.query_layers=2", "memory.value_init=zero"])
    assert c.memory.flat and c.memory.score_temperature == 2.0 and c.memory.value_init == "zero"
    assert "with memory.shard_values=true (sharded tables are initialised normal)" in error(
        path, ["memory.value_init=zero", "memory.shard_values=true"])
    assert Config.from_dict(c.to_dict()) == c


def test_missing_keys_bad_file_bad_yaml(path, tmp_path):
    assert "missing required key 'model.d_model'" in error(path, text=MINIMAL.replace("d_model: 64, ", ""))
    assert "missing required key 'train'" in error(path, text="\n".join(MINIMAL.splitlines()[:2]))
    assert "invalid YAML" in error(path, text="model: {n_layers: [\n")
    assert "top level must be a mapping" in error(path, text="- 1\n- 2\n")
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"{missing}: config file not found"):
        load_config(missing)
    path.write_text(MINIMAL)
    assert "expected KEY.SUB=VALUE" in error(path, ["train.max_steps"])
    assert "not valid YAML" in error(path, ["train.betas=[0.9"])


def test_runtime_checks(path):
    c = load_config(path, ["data.batch_size=12", "train.grad_accum=2"])
    c.validate_runtime(world_size=3)
    with pytest.raises(ConfigError, match="data.batch_size=12 is not divisible by world_size \\(4\\)"):
        c.validate_runtime(world_size=4)
    sharded = load_config(path, ["memory.positions=[0:replace]", "memory.shard_values=true", "memory.v_dim=30",
                                 "data.batch_size=48"])
    sharded.validate_runtime(world_size=3)  # 3 processes, 10 columns each
    with pytest.raises(ConfigError, match="4 processes do not divide v_dim=30; run on a number of processes"):
        sharded.validate_runtime(world_size=4)
    assert c.resolve_vocab_size(1000) == 1000
    big = load_config(path, ["model.vocab_size=1024"])
    assert big.resolve_vocab_size(1000) == 1024
    with pytest.raises(ConfigError, match="model.vocab_size=1024 is smaller than the data's vocabulary"):
        big.resolve_vocab_size(2000)


def test_round_trips_through_dict_yaml_and_torch_save(path, tmp_path):
    c = load_config(path, ["memory.positions=[1:after, 2:parallel]", "memory.v_dim=32", "train.lr=1e-3"])
    d = c.to_dict()
    assert Config.from_dict(d) == c
    # plain types only: a checkpoint holding it loads with weights_only=True
    torch.save({"config": d}, tmp_path / "ck.pt")
    assert Config.from_dict(torch.load(tmp_path / "ck.pt", weights_only=True)["config"]) == c
    (tmp_path / "resolved.yaml").write_text(c.to_yaml())
    assert load_config(tmp_path / "resolved.yaml") == c
    assert list(yaml.safe_load(c.to_yaml())) == ["model", "memory", "data", "train"]
    d["train"]["lr"] = "x"
    with pytest.raises(ConfigError, match="checkpoint: 'train.lr' must be a number"):
        Config.from_dict(d, source="checkpoint")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(config):
    c = load_config(config)
    assert c.train.out_dir.startswith("runs/")
    assert load_config(config, ["train.max_steps=3"]).train.max_steps == 3


def test_paper_configs_follow_the_paper():
    names = {p.name for p in CONFIGS}
    assert {"12L_pkm.yaml", "12L.yaml", "16L_pkm.yaml", "24L.yaml", "tiny.yaml", "tiny_deep.yaml",
            "tiny_pkm.yaml", "tiny_pkm_parallel.yaml"} <= names
    c = load_config(CONFIGS[0].parent / "12L_pkm.yaml")
    assert (c.model.n_layers, c.model.d_model, c.model.n_heads) == (12, 1024, 16)
    assert (c.memory.heads, c.memory.knn, c.memory.n_keys, c.memory.k_dim) == (4, 32, 512, 512)
    assert c.memory.query_batchnorm and c.memory.placements() == [(5, "replace")]
    assert (c.train.lr, c.train.value_lr, c.train.betas, c.train.warmup_steps, c.data.bptt) == \
        (2.5e-4, 1e-3, [0.9, 0.98], 4000, 256)
