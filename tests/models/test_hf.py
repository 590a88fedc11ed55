"""pkmlm.models.hf and python -m pkmlm.hf: import tiny random models that transformers builds (no download), and
export pkmlm models that transformers loads back; logits and greedy generation must agree."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
tokenizers = pytest.importorskip("tokenizers")

from pkmlm import checkpoint as ckpt  # noqa: E402
from pkmlm import hf as cli  # noqa: E402
from pkmlm.config import Config  # noqa: E402
from pkmlm.data.bpe import load_tokenizer  # noqa: E402
from pkmlm.eval.evaluation import load_trained  # noqa: E402
from pkmlm.eval.sampling import generate  # noqa: E402
from pkmlm.models.hf import HFError, export_pretrained, import_pretrained  # noqa: E402
from pkmlm.models.transformer import TransformerLM  # noqa: E402
from conftest import HF_TEXTS, make_hf_tokenizer  # noqa: E402  (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 300
def hf_model(family: str):
    """A tiny random transformers model of `family`, with weights large enough to give varied greedy tokens."""
    t = transformers
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64, rms_norm_eps=1e-6,
                  rope_theta=500.0, tie_word_embeddings=False)
    if family == "gpt2":
        config = t.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                              activation_function="gelu_new", n_inner=48)
        model = t.GPT2LMHeadModel(config)
    elif family == "llama":
        model = t.LlamaForCausalLM(t.LlamaConfig(**common))
    elif family == "qwen2":
        model = t.Qwen2ForCausalLM(t.Qwen2Config(**{**common, "tie_word_embeddings": True}))
    else:
        model = t.Qwen3ForCausalLM(t.Qwen3Config(**common, head_dim=16))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.normal_(1.0, 0.2)  # norms away from 1, q/k norms included: a wrong mapping shows
            else:
                p.normal_(0.0, 0.2)
    return model.eval()


def saved(tmp_path, family):
    model = hf_model(family)
    directory = tmp_path / family
    model.save_pretrained(directory)
    make_hf_tokenizer(directory, vocab_size=VOCAB)
    return model, directory


def prompt_ids():
    return torch.tensor([[0, 5, 9, 17, 33, 101, 250, 7], [3, 3, 60, 299, 12, 8, 8, 1]])


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "qwen3"])
def test_import_gives_transformers_logits(tmp_path, family, capsys):
    """The imported checkpoint's logits equal the transformers model's within 1e-4 (fp32), for every family;
    the run directory is usable as it is (load_trained, as generate.py, evaluate.py and pkmlm.inspect use)."""
    model, directory = saved(tmp_path, family)
    assert cli.main(["import", str(directory), "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert f"({family})" in printed and "mapped" in printed
    run = load_trained(tmp_path / "run")
    x = prompt_ids()
    with torch.no_grad():
        expected, got = model(x).logits, run.model(x)
    assert (expected - got).abs().max().item() < 1e-4
    assert run.step == 0 and run.codec.tokenizer.backend == "hf"
    assert run.codec.decode(run.codec.encode("Shares rose.")) == "Shares rose."
    state = ckpt.load_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000000.pt")
    assert state["vocab_hash"] == load_tokenizer(tmp_path / "run" / "tokenizer").vocab_hash
    assert Config.from_dict(state["config"]).to_yaml() == (tmp_path / "run" / "config.yaml").read_text()


def test_import_refuses_what_it_cannot_map(tmp_path, capsys):
    """An unsupported model_type, a missing tensor and an occupied run directory: exit 2, one line each."""
    _, directory = saved(tmp_path, "gpt2")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    assert cli.main(["import", str(directory), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model_type 'mamba' is not supported" in errors[0]

    _, directory = saved(tmp_path / "b", "llama")
    from safetensors.torch import load_file, save_file
    weights = load_file(str(directory / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(directory / "model.safetensors"))
    assert cli.main(["import", str(directory), "--out", str(tmp_path / "c")]) == 2
    assert "lacks tensor model.layers.1.mlp.up_proj.weight" in capsys.readouterr().err

    _, directory = saved(tmp_path / "d", "gpt2")
    assert cli.main(["import", str(directory), "--out", str(tmp_path / "e")]) == 0
    assert cli.main(["import", str(directory), "--out", str(tmp_path / "e")]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err


def test_import_refuses_scaled_rope(tmp_path):
    """Llama 3.1's "llama3" RoPE scaling changes the frequencies: refused by name, not imported wrongly."""
    _, directory = saved(tmp_path, "llama")
    config = json.loads((directory / "config.json").read_text())
    scaled = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    (directory / "config.json").write_text(json.dumps({**config, "rope_parameters": scaled}))
    with pytest.raises(HFError, match="RoPE type 'llama3'"):
        import_pretrained(directory, tmp_path / "run")


def test_import_reads_sharded_safetensors_with_index(tmp_path):
    """A model saved in several shards with model.safetensors.index.json imports like a single file."""
    model = hf_model("llama")
    model.save_pretrained(tmp_path / "src", max_shard_size="20KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    make_hf_tokenizer(tmp_path / "src", vocab_size=VOCAB)
    report = import_pretrained(tmp_path / "src", tmp_path / "run")
    run = load_trained(report.checkpoint)
    with torch.no_grad():
        assert (model(prompt_ids()).logits - run.model(prompt_ids())).abs().max().item() < 1e-4


def pkmlm_model(model: dict, memory: dict | None = None) -> TransformerLM:
    """A random pkmlm model with weights large enough for varied greedy tokens and BatchNorm statistics that
    are not the initial ones."""
    config = Config.from_dict({"model": {"n_layers": 3, "d_model": 32, "n_heads": 4, "max_seq_len": 64,
                                         "dropout": 0.0, **model},
                               "memory": memory or {}, "data": {"batch_size": 2, "bptt": 32},
                               "train": {"max_steps": 1}})
    torch.manual_seed(0)
    lm = TransformerLM(config, VOCAB)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith("values.weight"):
                p.normal_(0.0, 1.0)
            elif p.dim() > 1 and "keys" not in name:
                p.normal_(0.0, 0.3)
        lm.train()
        lm(torch.randint(0, VOCAB, (4, 32)))  # BatchNorm running statistics move
    return lm.eval()


def check_export(lm: TransformerLM, tmp_path, tokenizer_dir, *, remote: bool, native: bool = True):
    """Export, load with transformers (offline), compare logits (1e-5) and greedy generation."""
    out = tmp_path / "exported"
    report = export_pretrained(lm, out, tokenizer_dir=tokenizer_dir, native=native)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=remote, local_files_only=True)
    x = prompt_ids()
    with torch.no_grad():
        assert (lm(x) - hf(x).logits).abs().max().item() < 1e-5
    prompt = [0, 5, 9, 17]
    ours = generate(lm, prompt, max_new_tokens=20, window=32, seeds=[0], temperature=0, stop_id=0)[0]
    out_ids = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt):].tolist()
    if out_ids and out_ids[-1] == 0:
        out_ids = out_ids[:-1]  # transformers keeps the eos it stopped at; generate.py drops it
    assert ours == out_ids and len(set(ours)) >= 2
    return report, out


def test_export_memory_model_loads_with_remote_code(tmp_path):
    """A model with memories (replace, parallel, after; one shared Memory+ table; BatchNorm queries) exports with its
    modeling code: same logits and greedy tokens in transformers, the shared table stored once."""
    tok = load_tokenizer_dir(tmp_path)
    lm = pkmlm_model({}, {"positions": ["0:replace", "1:parallel", "2:after"], "n_keys": 8, "heads": 2, "knn": 4,
                          "k_dim": 16, "share_values": True, "gated": True})
    report, out = check_export(lm, tmp_path, tok, remote=True)
    assert report.family == "pkmlm" and (out / "modeling_pkmlm.py").is_file()
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        tables = [k for k in f.keys() if "tables" in k or "values" in k]
    assert tables == ["tables.0.weight"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.decode(hf_tok("Shares rose.")["input_ids"]) == "Shares rose."


def test_export_memory_variants(tmp_path):
    """Separate tables, LayerNorm queries, a query MLP, no softmax, a flat memory, qk_norm: still exact."""
    tok = load_tokenizer_dir(tmp_path)
    lm = pkmlm_model({}, {"positions": ["0:parallel", "2:after"], "n_keys": 6, "heads": 2, "knn": 3, "k_dim": 8,
                          "query_batchnorm": False, "query_layernorm": True, "query_layers": 2, "qk_norm": True,
                          "score_temperature": 0.5, "v_dim": 12})
    check_export(lm, tmp_path / "a", tok, remote=True)
    lm = pkmlm_model({}, {"positions": ["1:replace"], "n_keys": 6, "heads": 2, "knn": 3, "k_dim": 8, "flat": True,
                          "score_softmax": False})
    check_export(lm, tmp_path / "b", tok, remote=True)


def load_tokenizer_dir(tmp_path):
    from pkmlm.data.hf_tokenizer import save_hf_tokenizer
    make_hf_tokenizer(tmp_path / "src_tok", vocab_size=VOCAB)
    return save_hf_tokenizer(tmp_path / "src_tok", tmp_path / "tokenizer").directory


def test_export_dense_gpt2_shaped_model_is_native_gpt2(tmp_path):
    """Today's default block (LayerNorm, learned positions, GELU) exports as model_type gpt2, no remote code."""
    lm = pkmlm_model({})
    report, out = check_export(lm, tmp_path, load_tokenizer_dir(tmp_path), remote=False)
    assert report.family == "gpt2" and not (out / "modeling_pkmlm.py").exists()
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"
    # The same model forced through the remote code agrees too.
    report, _ = check_export(lm, tmp_path / "remote", load_tokenizer_dir(tmp_path / "r"), remote=True, native=False)
    assert report.family == "pkmlm"


def test_export_cli_round_trip_and_llama_native(tmp_path, capsys):
    """import -> export of a llama gives model_type llama (no remote code) with the source's logits;
    the CLI reads the run directory and finds the tokenizer itself."""
    model, directory = saved(tmp_path, "llama")
    assert cli.main(["import", str(directory), "--out", str(tmp_path / "run")]) == 0
    assert cli.main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "exp")]) == 0
    assert "model_type llama" in capsys.readouterr().out
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exp", local_files_only=True)
    with torch.no_grad():
        assert (back(prompt_ids()).logits - model(prompt_ids()).logits).abs().max().item() < 1e-4
    assert cli.main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "run" / "tokenizer")
    assert cli.main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "x")]) == 2
    assert "pass --data-dir" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_export_qwen_through_remote_code(tmp_path, family):
    """q/k/v biases and q/k norms have no native gpt2/llama form: the remote code carries them exactly."""
    model, directory = saved(tmp_path, family)
    report = import_pretrained(directory, tmp_path / "run")
    run = load_trained(report.checkpoint)
    rep, _ = check_export(run.model, tmp_path, tmp_path / "run" / "tokenizer", remote=True)
    assert rep.family == "pkmlm"


def test_gguf_round_trip(tmp_path):
    """A tiny llama written as GGUF (gguf's writer, f32 tensors, llama.cpp's q/k row order) imports exactly."""
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    model = hf_model("llama")
    cfg = model.config
    writer = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    writer.add_name("tiny")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(500.0)
    writer.add_vocab_size(VOCAB)
    make_hf_tokenizer(tmp_path / "tok", vocab_size=VOCAB, specials=("<|endoftext|>",))
    vocab = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    pieces = sorted(vocab["model"]["vocab"], key=vocab["model"]["vocab"].get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(pieces)
    writer.add_token_types([3 if p == "<|endoftext|>" else 1 for p in pieces])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in vocab["model"]["merges"]])
    writer.add_eos_token_id(0)
    writer.add_bos_token_id(0)

    def permute(w, heads):  # llama.cpp's convert: rotate-half rows -> interleaved pairs
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    sd = model.state_dict()
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for k, v in names.items():
        writer.add_tensor(v, sd[k].numpy())
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for src, dst, heads in (("self_attn.q_proj", "attn_q", cfg.num_attention_heads),
                                ("self_attn.k_proj", "attn_k", cfg.num_key_value_heads),
                                ("self_attn.v_proj", "attn_v", None), ("self_attn.o_proj", "attn_output", None),
                                ("mlp.gate_proj", "ffn_gate", None), ("mlp.up_proj", "ffn_up", None),
                                ("mlp.down_proj", "ffn_down", None), ("input_layernorm", "attn_norm", None),
                                ("post_attention_layernorm", "ffn_norm", None)):
            w = sd[p + src + ".weight"]
            writer.add_tensor(f"blk.{i}.{dst}.weight", (permute(w, heads) if heads else w).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    report = import_pretrained(tmp_path / "tiny.gguf", tmp_path / "run")
    run = load_trained(report.checkpoint)
    with torch.no_grad():
        assert (model(prompt_ids()).logits - run.model(prompt_ids())).abs().max().item() < 1e-4
    assert run.codec.tokenizer.eos_id == 0


def test_hf_module_is_importable_without_transformers_for_safetensors(tmp_path, monkeypatch):
    """Importing a safetensors directory never imports transformers (only .gguf sources need it)."""
    _, directory = saved(tmp_path, "gpt2")
    import sys
    monkeypatch.setitem(sys.modules, "transformers", None)  # any import of it now fails
    report = import_pretrained(directory, tmp_path / "run")
    assert report.family == "gpt2"
    shutil.rmtree(tmp_path / "run")


@pytest.mark.slow
def test_imported_run_through_the_command_lines(tmp_path):
    """import -> prepare --hf-tokenizer -> evaluate.py and generate.py --temperature 0 -> export: generate.py's
    text is transformers' greedy continuation of the same prompt; evaluate.py's perplexity is transformers'."""
    import subprocess
    import sys

    from pkmlm.data.prepare import MergeSettings, prepare

    model, directory = saved(tmp_path, "llama")
    assert cli.main(["import", str(directory), "--out", str(tmp_path / "run"), "--bptt", "16"]) == 0
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"{i}.txt").write_text(f"{HF_TEXTS[i % 3]} Document {i}.\n")
    prepare(tmp_path / "data", inputs=[docs], workers=1, progress="off",
            settings=MergeSettings(hf_tokenizer=str(tmp_path / "run" / "tokenizer"), valid="2", test="1"))

    def python(*args):
        done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        return done.stdout

    table = python("evaluate.py", str(tmp_path / "run"), "--data-dir", str(tmp_path / "data"), "--split", "valid",
                   "--json", str(tmp_path / "eval.json"))
    assert "run" in table
    row = json.loads((tmp_path / "eval.json").read_text())[0]
    from pkmlm.data.shards import open_split
    from pkmlm.data.stream import eval_batches
    nll, count = 0.0, 0
    with torch.no_grad():
        for inputs, targets in eval_batches(open_split(tmp_path / "data" / "valid"), batch_size=4, bptt=16):
            logits = model(inputs).logits
            nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                                                     reduction="sum").item()
            count += int((targets != -100).sum())
    assert abs(row["valid_loss"] - nll / count) < 1e-5

    text = python("generate.py", str(tmp_path / "run"), "--prompt", "Shares in", "--temperature", "0",
                  "--max-new-tokens", "8").rstrip("\n")
    tokenizer = load_tokenizer(tmp_path / "run" / "tokenizer")
    prompt = [tokenizer.eos_id] + tokenizer.encode(["Shares in"])[0]
    greedy = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=0,
                            pad_token_id=0)[0, len(prompt):].tolist()
    if greedy and greedy[-1] == 0:
        greedy = greedy[:-1]
    assert text == tokenizer.decode(prompt[1:] + greedy) and len(greedy) > 0  # generate.py drops the leading eos


@pytest.mark.slow
def test_import_retrofit_export_chain(tmp_path):
    """A pretrained llama imported, a Memory+ memory added parallel to an FFN and fine-tuned with train.py
    --init-from, then exported: transformers (trust_remote_code) gives the fine-tuned pkmlm model's logits."""
    import subprocess
    import sys

    from pkmlm.data.prepare import MergeSettings, prepare

    _, directory = saved(tmp_path, "llama")
    run = tmp_path / "run"
    assert cli.main(["import", str(directory), "--out", str(run), "--bptt", "16"]) == 0
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(8):
        (docs / f"{i}.txt").write_text(f"{HF_TEXTS[i % 3]} Document {i}.\n")
    prepare(tmp_path / "data", inputs=[docs], workers=1, progress="off",
            settings=MergeSettings(hf_tokenizer=str(run / "tokenizer"), valid="1", test="1"))
    overrides = [f"data.dir={tmp_path / 'data'}", f"train.out_dir={tmp_path / 'ft'}", "train.max_steps=3",
                 "train.warmup_steps=1", "train.eval_every=3", "data.batch_size=2", "memory.positions=[1:parallel]",
                 "memory.n_keys=8", "memory.heads=2", "memory.knn=4", "memory.k_dim=16", "memory.gated=true"]
    done = subprocess.run([sys.executable, "train.py", "--config", str(run / "config.yaml"), "--init-from",
                           str(run / "checkpoints" / "step_0000000.pt"), *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert cli.main(["export", str(tmp_path / "ft"), "--out", str(tmp_path / "exp")]) == 0
    tuned = load_trained(tmp_path / "ft")
    assert tuned.step == 3 and tuned.model.memories()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exp", trust_remote_code=True,
                                                           local_files_only=True)
    with torch.no_grad():
        assert (tuned.model(prompt_ids()) - hf(prompt_ids()).logits).abs().max().item() < 1e-5
