"""KV cache, sampling filters, generate() and generate.py; the validation samples and histograms in TensorBoard."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pkmlm.config import Config
from pkmlm.data.shards import open_split
from pkmlm.eval.evaluation import load_trained
from pkmlm.models.transformer import KVCache, TransformerLM
from pkmlm.eval.sampling import SamplingError, candidates, generate, next_token_probs

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import generate as generate_cli  # noqa: E402  (the script at the repository root)

ROOT = Path(__file__).resolve().parents[2]


def _model(max_seq_len=24) -> TransformerLM:
    config = Config.from_dict({
        "model": {"n_layers": 3, "d_model": 32, "n_heads": 4, "dropout": 0.1, "max_seq_len": max_seq_len},
        "memory": {"positions": ["0:after", "1:parallel", "2:replace"], "n_keys": 8, "heads": 2, "knn": 4,
                   "k_dim": 16},
        "data": {"batch_size": 2, "bptt": max_seq_len}, "train": {"max_steps": 1}})
    torch.manual_seed(0)
    model = TransformerLM(config, 50)
    # Non-trivial BatchNorm running statistics: eval mode must use them, token by token.
    model.train()
    model(torch.randint(0, 50, (4, max_seq_len)))
    return model.eval()


@torch.no_grad()
def test_kv_cache_matches_full_forward_step_by_step():
    model = _model()
    idx = torch.randint(0, 50, (3, 20))
    full = model(idx)
    cache = KVCache(len(model.blocks))
    parts = [model(idx[:, :7], cache)]  # prefill
    parts += [model(idx[:, t:t + 1], cache) for t in range(7, 12)]  # one token at a time
    parts.append(model(idx[:, 12:20], cache))  # several tokens after a cache: the causal mask is offset
    assert len(cache) == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_kv_cache_is_bounded_by_max_seq_len():
    model = _model(max_seq_len=8)
    cache = KVCache(len(model.blocks))
    model(torch.zeros(1, 8, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=8"):
        model(torch.zeros(1, 1, dtype=torch.long), cache)


def test_next_token_probs_filters():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    torch.testing.assert_close(next_token_probs(logits, temperature=1.0), logits.exp())
    assert next_token_probs(logits, temperature=0).tolist() == [[1.0, 0.0, 0.0, 0.0, 0.0]]
    top2 = next_token_probs(logits, temperature=1.0, top_k=2)
    torch.testing.assert_close(top2, torch.tensor([[5 / 7, 2 / 7, 0.0, 0.0, 0.0]]))
    # top-p 0.8: 0.5 + 0.2 = 0.7 < 0.8, so the third token is needed; the fourth is not.
    nucleus = next_token_probs(logits, temperature=1.0, top_p=0.8)
    torch.testing.assert_close(nucleus, torch.tensor([[0.5, 0.2, 0.15, 0.0, 0.0]]) / 0.85)
    # Temperature sharpens before the filters: at 0.5, p ~ p**2.
    sharp = next_token_probs(logits, temperature=0.5)
    torch.testing.assert_close(sharp, logits.exp() ** 2 / (logits.exp() ** 2).sum())


def _full_vocab_probs(logits, temperature, top_k, top_p):
    """The filters over the whole vocabulary, step by step: mask below the k-th logit, softmax, sort, cut."""
    logits = logits / temperature
    if top_k:
        logits = logits.masked_fill(logits < logits.topk(top_k, dim=-1).values[..., -1:], float("-inf"))
    probs = logits.softmax(-1)
    out = torch.zeros_like(probs)
    for row, p in enumerate(probs):
        total = 0.0
        for i in p.argsort(descending=True).tolist():
            if total >= top_p:
                break
            out[row, i], total = p[i], total + float(p[i])
    return out / out.sum(-1, keepdim=True)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.8, 40, 0.95), (1.3, 7, 1.0),
                                                       (0.7, 0, 0.5), (1.0, 999, 0.9)])
def test_candidates_equal_the_filters_over_the_whole_vocabulary(temperature, top_k, top_p):
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0)) * 3
    probs, ids = candidates(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    assert ids.shape[1] == (top_k or 1000)
    if top_k or top_p < 1:
        assert bool((probs[:, :-1] >= probs[:, 1:]).all())  # most likely first
    torch.testing.assert_close(next_token_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p),
                               _full_vocab_probs(logits, temperature, top_k, top_p), rtol=1e-5, atol=1e-6)


def test_generate_seeds_cache_and_window():
    model = _model(max_seq_len=12)
    prompt = [1, 5, 7, 9]
    kw = dict(max_new_tokens=30, window=10, temperature=1.0, top_k=0, top_p=1.0)  # 34 tokens > window: crops
    a = generate(model, prompt, seeds=[3, 4], **kw)
    assert [len(s) for s in a] == [30, 30]
    assert generate(model, prompt, seeds=[3, 4], **kw) == a  # same seeds, same tokens
    assert generate(model, prompt, seeds=[4], **kw) == [a[1]]  # sample i is the single sample of its seed
    assert generate(model, prompt, seeds=[3, 4], use_cache=False, **kw) == a
    assert generate(model, prompt, seeds=[5], **kw) != [a[0]]
    assert not model.training
    greedy = generate(model, prompt, seeds=[0], max_new_tokens=5, window=10, temperature=0)[0]
    seq = list(prompt)
    for _ in range(5):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert greedy == seq[len(prompt):]


def test_generate_stops_at_eos_and_checks_options():
    model = _model()
    greedy = generate(model, [1], max_new_tokens=6, window=8, seeds=[0], temperature=0)[0]
    stop = greedy[3]
    # A sample ends before its first stop token, which is not part of it.
    assert generate(model, [1], max_new_tokens=6, window=8, seeds=[0], temperature=0, stop_id=stop) == \
        [greedy[:greedy.index(stop)]]
    with pytest.raises(SamplingError, match="--top-p"):
        generate(model, [1], max_new_tokens=5, window=8, seeds=[0], top_p=0)
    with pytest.raises(SamplingError, match="window"):
        generate(model, [1], max_new_tokens=5, window=100, seeds=[0])
    with pytest.raises(SamplingError, match="no tokens"):
        generate(model, [], max_new_tokens=5, window=8, seeds=[0])


@pytest.mark.slow
def test_generate_cli(text_run):
    data_dir, run_dir = text_run
    # The torch path: loading the compiled kernels in a fresh process costs seconds, and they are not what
    # this test is about.
    result = subprocess.run([sys.executable, str(ROOT / "generate.py"), str(run_dir), "--prompt", "The minister",
                             "--max-new-tokens", "10"], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PKMLM_CPU_KERNELS": "0"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The minister") and "tokens/s" in result.stderr


def _main(capsys, *args):
    code = generate_cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_same_seed_same_text_cache_or_not_stdin(text_run, capsys, monkeypatch):
    data_dir, run_dir = text_run
    common = [run_dir, "--max-new-tokens", 40, "--seed", 7, "--num-samples", 2, "--top-k", 0, "--top-p", 1.0,
              "--temperature", 1.0]
    code, first, err = _main(capsys, *common, "--prompt", "The government said")
    assert code == 0 and "tokens/s" in err and "KV cache" in err
    samples = first.split("==== sample ")[1:]
    assert len(samples) == 2 and all("The government said" in s for s in samples) and samples[0] != samples[1]
    assert _main(capsys, *common, "--prompt", "The government said")[1] == first
    assert _main(capsys, *common, "--prompt", "The government said", "--no-cache")[1] == first
    monkeypatch.setattr(sys, "stdin", io.StringIO("The government said"))
    assert _main(capsys, *common)[1] == first
    code, out, _ = _main(capsys, run_dir, "--prompt", "", "--precision", "bf16", "--max-new-tokens", 5)
    assert code == 0 and out.strip()


def test_generate_cli_bad_input(text_run, tmp_path, capsys):
    data_dir, run_dir = text_run
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    for args, message in (([bad], "cannot read checkpoint"), ([tmp_path / "missing"], "does not exist"),
                          ([tmp_path], "without checkpoints"), ([run_dir, "--top-p", "2"], "--top-p"),
                          ([run_dir, "--data-dir", tmp_path], "tokenizer.json not found")):
        code, out, err = _main(capsys, *args, "--prompt", "x")
        assert code == 2 and not out, args
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_trained_run_samples_and_histograms_in_tensorboard(text_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data_dir, run_dir = text_run
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"histograms": 0, "tensors": 0}).Reload()
    tags = events.Tags()
    for layer in ("blocks.0.after_memory", "blocks.1.memory"):
        reads = events.Histograms(f"memory/{layer}/slot_reads")
        assert [e.step for e in reads] == [10, 20]
        # Every validation token read heads * knn slots: the histogram's values sum to that many reads.
        assert reads[-1].histogram_value.sum == pytest.approx(4 * 8 * 16 * 2 * 4)
        assert f"memory/{layer}/slot_weights" in tags["histograms"]
    assert "valid/accuracy" in tags["scalars"]
    texts = sorted(t for t in tags["tensors"] if t.startswith("samples/"))
    assert len(texts) == 3, tags["tensors"]
    logged = events.Tensors(texts[0])
    assert [e.step for e in logged] == [10, 20]
    sample = logged[-1].tensor_proto.string_val[0].decode()
    # The prompt is the opening of the first validation document, continued after the marker.
    run = load_trained(run_dir)
    corpus = open_split(data_dir / "valid")
    opening = run.codec.decode(corpus.read(0, 12).tolist())
    assert sample.startswith("    " + opening + " ▶ ") and len(sample) > len(opening) + 10
