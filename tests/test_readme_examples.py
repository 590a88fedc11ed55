"""scripts/readme_examples.py: every example block of the README has a generator, and the rewrite keeps the rest."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("readme_examples", ROOT / "scripts" / "readme_examples.py")
examples = importlib.util.module_from_spec(spec)
spec.loader.exec_module(examples)


def test_every_readme_example_block_is_generated_by_the_script():
    readme = (ROOT / "README.md").read_text()
    found = [m.group("name") for m in examples.BLOCK.finditer(readme)]
    assert sorted(found) == sorted(examples.GENERATORS) and len(found) == len(set(found))


def test_rewrite_replaces_only_the_blocks():
    text = "intro\n<!-- example a -->\nold\n<!-- /example -->\nmiddle\n<!-- example b -->\n<!-- /example -->\nend\n"
    out = examples.rewrite(text, {"a": "new a\n", "b": "```\nb\n```\n"})
    assert out == ("intro\n<!-- example a -->\nnew a\n<!-- /example -->\nmiddle\n<!-- example b -->\n```\nb\n```\n"
                   "<!-- /example -->\nend\n")
    with pytest.raises(SystemExit, match="do not match"):
        examples.rewrite(text, {"a": "x\n"})
