"""Regenerate the README's examples from a real run, so that they stay true.

    python scripts/readme_examples.py [--skip-demo] [--readme README.md]

Runs `scripts/demo.sh` (what `make demo` runs: prepare data/bbc_news once, train configs/tiny_pkm.yaml, evaluate),
then each example command of the README on the demo's model, and rewrites every README block between
`<!-- example NAME -->` and `<!-- /example -->` with the command and what it printed. --skip-demo reuses the model
already in runs/tiny_pkm (its newest checkpoint; the first block then shows evaluate.py's table). Speeds depend on the machine and its load: the block that quotes them says where they
were measured. tests/test_readme_examples.py checks that every block has a generator here and the reverse.
Run from the repository root with the project's environment (`.venv/bin/python scripts/readme_examples.py`).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = "runs/tiny_pkm"
LAYER = "blocks.2.memory"
BLOCK = re.compile(r"(<!-- example (?P<name>[a-z-]+) -->\n)(?P<body>.*?)(<!-- /example -->)", re.S)


def run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command from the repository root with this interpreter; fail loudly if it fails."""
    if args[0] == "python":
        args = [sys.executable, *args[1:]]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


def fence(lines: list[str]) -> str:
    return "```\n" + "\n".join(line.rstrip() for line in lines) + "\n```\n"


def demo(skip: bool) -> dict[str, str]:
    """Run the demo (or not); its final report, and the perplexities of evaluate.py's table."""
    if skip:
        out = run(["python", "evaluate.py", RUN, "--split", "valid,test"]).stdout
        report = ["$ python evaluate.py runs/tiny_pkm --split valid,test", *out.strip().splitlines()]
    else:
        python_dir = str(Path(sys.executable).parent.parent)  # demo.sh runs $VENV/bin/python
        out = run(["bash", "scripts/demo.sh"], env={"VENV": python_dir}).stdout
        lines = out.splitlines()
        start = max(i for i, line in enumerate(lines) if line.startswith("step ") and "valid loss" in line)
        report = ["$ make demo", "...", *lines[start:]]
    table = [line for line in out.splitlines() if line.startswith("|")]
    columns = [c.strip() for c in table[0].strip("|").split("|")]
    row = dict(zip(columns, (c.strip() for c in table[2].strip("|").split("|"))))
    return {"report": report, "step": row["step"], "valid_ppl": row["valid_ppl"], "test_ppl": row["test_ppl"]}


def generate_example(facts: dict) -> tuple[str, str]:
    cmd = ["python", "generate.py", RUN, "--prompt", "The government said", "--max-new-tokens", "40",
           "--num-samples", "2"]
    proc = run(cmd, env=_default_threads())
    shown = "$ " + " ".join(f'"{a}"' if " " in a else a for a in cmd)
    intro = (f"The demo model (`configs/tiny_pkm.yaml` at step {facts['step']}, validation perplexity "
             f"{facts['valid_ppl']}, test {facts['test_ppl']}, as `evaluate.py` measures them):\n")
    return intro, fence([shown, *proc.stdout.splitlines(), *proc.stderr.strip().splitlines()[-1:]])


def _default_threads() -> dict:
    """The environment without OMP_NUM_THREADS: generate.py's own choice is what a user gets."""
    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}


def speed_prose() -> str:
    """One 100-token sample: the measured thread count (the default), one thread, every core, no KV cache."""
    def tokens_per_s(extra: list[str]) -> str:
        proc = subprocess.run([sys.executable, "generate.py", RUN, "--prompt", "The government said",
                               "--max-new-tokens", "100", "--temperature", "0", *extra], cwd=ROOT,
                              capture_output=True, text=True, env=_default_threads())
        if proc.returncode != 0:
            sys.exit(f"generate.py {' '.join(extra)} failed:\n{proc.stderr[-3000:]}")
        return re.search(r"([\d.]+) tokens/s", proc.stderr).group(1)

    cores = os.cpu_count() or 1
    measured, one, every = tokens_per_s([]), tokens_per_s(["--threads", "1"]), tokens_per_s(["--threads", str(cores)])
    no_cache = tokens_per_s(["--no-cache"])
    load = os.getloadavg()[0]
    return (f"One-token steps are short, so threads mostly wait for each other, and more so on a busy machine: "
            f"`generate.py` times its first steps with 1, 2, 4, ... threads and keeps the fastest (`--threads N` "
            f"fixes the count). On the machine these examples were made on ({cores} cores, load average {load:.1f}), "
            f"one 100-token sample of this model ran at {measured} tokens/s with the measured choice, {one} with "
            f"`--threads 1`, {every} with `--threads {cores}` (torch's default) and {no_cache} with `--no-cache`.\n")


def inspect_split() -> str:
    cmd = ["python", "-m", "pkmlm.inspect", RUN, "--layer", LAYER, "--max-tokens", "20000", "--top", "2",
           "--contexts", "3", "--width", "5"]
    return fence(["$ " + " ".join(cmd), *run(cmd).stdout.splitlines()])


def inspect_text() -> str:
    cmd = ["python", "-m", "pkmlm.inspect", RUN, "--layer", LAYER, "--text", "Shares in the company rose", "--top", "4"]
    shown = " ".join(f'"{a}"' if " " in a else a for a in cmd)
    return fence(["$ " + shown, *run(cmd).stdout.splitlines()])


GENERATORS = ("demo-report", "generate-intro", "generate", "generate-speed", "inspect-split", "inspect-text")


def rewrite(readme: str, blocks: dict[str, str]) -> str:
    """``readme`` with the body of each `<!-- example NAME -->` block replaced by ``blocks[NAME]``."""
    found = {m.group("name") for m in BLOCK.finditer(readme)}
    if found != set(blocks):
        sys.exit(f"README blocks {sorted(found)} do not match the generators {sorted(blocks)}")
    return BLOCK.sub(lambda m: m.group(1) + blocks[m.group("name")] + m.group(4), readme)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-demo", action="store_true", help=f"reuse the model in {RUN}")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args()
    facts = demo(args.skip_demo)
    intro, sample = generate_example(facts)
    blocks = {"demo-report": fence(facts["report"]), "generate-intro": intro,
              "generate": sample, "generate-speed": speed_prose(), "inspect-split": inspect_split(),
              "inspect-text": inspect_text()}
    assert set(blocks) == set(GENERATORS)
    args.readme.write_text(rewrite(args.readme.read_text(), blocks))
    print(f"rewrote {len(blocks)} example blocks of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
