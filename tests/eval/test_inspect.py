"""pkmlm.eval.inspect: per-slot reads and top contexts against a brute-force pass, text mode, CLI errors."""

import json
from collections import defaultdict

import pytest
import torch

from pkmlm.data.shards import open_split
from pkmlm.data.stream import eval_batches
from pkmlm.eval.evaluation import load_trained
from pkmlm.eval.inspect import InspectError, find_memory, main, slot_report, text_reads

LAYER = "blocks.1.memory"


@pytest.fixture(scope="module")
def run(text_run):
    return load_trained(text_run[1])


@torch.no_grad()
def _brute_force(run, layer, max_tokens):
    """{slot: {position: weight}} by recording every read of the memory's own forward, one token at a time."""
    memory = find_memory(run.model, layer)
    corpus = open_split(run.data_dir / "valid")
    seen = []
    handle = memory.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    reads = defaultdict(dict)
    position = -1
    for inputs, targets in eval_batches(corpus, batch_size=3, bptt=run.config.data.bptt):
        if position >= max_tokens:
            break
        seen.clear()
        run.model(inputs)
        x = seen[0].flatten(0, -2)
        for i, target in enumerate(targets.flatten().tolist()):
            if target != -100 and 0 <= position < max_tokens:
                scores, slots = memory.lookup(memory.query(x[i:i + 1]))
                weights = torch.softmax(scores, -1) / memory.heads
                for s, w in zip(slots.flatten().tolist(), weights.flatten().tolist()):
                    reads[s][position] = reads[s].get(position, 0.0) + w
            position += 1
    handle.remove()
    return reads


def test_slot_report_matches_brute_force(run):
    max_tokens = 300
    report = slot_report(run, LAYER, top=10_000, contexts=3, width=2, max_tokens=max_tokens, batch_size=2)
    expected = _brute_force(run, LAYER, max_tokens)
    assert report.tokens == max_tokens and report.slots == 64 and report.slots_read == len(expected)
    assert {r.slot for r in report.top} == set(expected)
    counts = [r.reads for r in report.top]
    assert counts == sorted(counts, reverse=True)  # ordered by reads
    for r in report.top:
        by_pos = expected[r.slot]
        assert r.reads == len(by_pos) and r.weight == pytest.approx(sum(by_pos.values()), rel=1e-5)
        assert r.subkeys == divmod(r.slot, 8)
        heaviest = sorted(by_pos.values(), reverse=True)[:3]
        assert [c.weight for c in r.contexts] == pytest.approx(heaviest, rel=1e-5)
        for c in r.contexts:
            assert by_pos[c.position] == pytest.approx(c.weight, rel=1e-5) and "[[" in c.text
    by_weight = slot_report(run, LAYER, top=3, contexts=0, by="weight", max_tokens=max_tokens)
    assert [r.weight for r in by_weight.top] == pytest.approx(sorted((sum(v.values()) for v in expected.values()),
                                                                     reverse=True)[:3], rel=1e-5)


def test_text_reads_match_the_memory(run):
    rows = text_reads(run, LAYER, "The minister said", top=100)
    ids = [run.codec.eos_id] + run.codec.encode("The minister said")
    assert [r["token"] for r in rows] == ids and rows[0]["piece"] == "</s>"
    for r in rows:
        weights = [w for _, w in r["slots"]]
        assert sum(weights) == pytest.approx(1.0, rel=1e-5)  # every slot read, shares of the whole read
        assert weights == sorted(weights, reverse=True)
    top = text_reads(run, LAYER, "The minister said", top=2)
    assert [r["slots"] for r in top] == [r["slots"][:2] for r in rows]


def test_unknown_layer_lists_the_layers(run):
    with pytest.raises(InspectError, match=r"did you mean blocks.1.memory\? available: "
                                           r"blocks.0.after_memory, blocks.1.memory"):
        find_memory(run.model, "blocks.1.memroy")


def run_dir_codec_ids(run_dir, text):
    return load_trained(run_dir).codec.encode(text)


def test_cli(text_run, tmp_path, capsys):
    data_dir, run_dir = text_run
    out_json = tmp_path / "slots.json"
    assert main([str(run_dir), "--layer", LAYER, "--top", "3", "--max-tokens", "200", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "valid split: 200 tokens" in out and "[[" in out
    saved = json.loads(out_json.read_text())
    assert len(saved["top"]) == 3 and saved["layer"] == LAYER
    assert main([str(run_dir), "--layer", LAYER, "--text", "The minister said"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + len(run_dir_codec_ids(run_dir, "The minister said")) and "</s>" in lines[1]
    for args, message in ((["--layer", "nope"], "available: blocks.0.after_memory, blocks.1.memory"),
                          (["--layer", LAYER, "--split", "nope"], "nope"),
                          (["--layer", LAYER, "--top", "0"], "--top")):
        assert main([str(run_dir), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_table_escapes_line_breaks_in_contexts_and_pieces():
    """A context that spans a line break stays on one line of the table (JSON keeps the text as it is)."""
    from pkmlm.eval.inspect import Context, SlotRecord, SlotReport, format_report, format_text_reads, table_text

    report = SlotReport("blocks.1.memory", "ckpt.pt", 3, "valid", 100, 64, 10, "reads",
                        [SlotRecord(5, (0, 5), 4, 1.5, [Context(7, 0.5, "end of a line\n[[Next]] line\tand \\ more")])])
    lines = format_report(report).splitlines()
    assert len(lines) == 5 and lines[-1].endswith("0.500  end of a line\\n[[Next]] line\\tand \\\\ more")
    rows = format_text_reads([{"position": 0, "token": 2, "piece": "\n", "slots": [[1, 1.0]]}]).splitlines()
    assert len(rows) == 2 and rows[1].split()[1] == "\\n"
    assert table_text("café ▁x") == "café ▁x"
