"""The command lines' shared error path (pkmlm.cli): every class of bad input is one `error:` line and exit 2 in
every command (train.py, evaluate.py, generate.py, python -m pkmlm.inspect, python -m pkmlm.data.prepare).

One test per class of bad input: environment, text that is not UTF-8, a path of the wrong kind, an integer
option where 0 would silently mean "unset". All run in-process (no subprocess), so they stay in `make test-fast`.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import io
import pkgutil
import sys
from pathlib import Path

import pytest

import pkmlm
from pkmlm import cli
from pkmlm.data import prepare as prepare_cli
from pkmlm.eval import inspect as inspect_cli

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_cli_under_test", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAINS = {"train.py": lambda: _script("train").main, "evaluate.py": lambda: _script("evaluate").main,
         "generate.py": lambda: _script("generate").main, "pkmlm.inspect": lambda: inspect_cli.main,
         "pkmlm.data.prepare": lambda: prepare_cli.main}


def _one_line_exit_2(capsys, main, args, *expected: str) -> str:
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    return err


def test_every_error_class_of_the_project_takes_the_shared_path():
    """Each exception class pkmlm defines is a cli.UserError (one line, exit 2): none is left out."""
    for info in pkgutil.walk_packages(pkmlm.__path__, "pkmlm."):
        importlib.import_module(info.name)
    found = {cls for module in list(sys.modules.values()) if (getattr(module, "__name__", "") or "").startswith("pkmlm")
             for _, cls in inspect.getmembers(module, inspect.isclass)
             if issubclass(cls, Exception) and cls.__module__.startswith("pkmlm") and not cls.__name__.startswith("_")}
    assert len(found) >= 12, sorted(c.__name__ for c in found)
    missing = sorted(f"{c.__module__}.{c.__name__}" for c in found if not issubclass(c, cli.UserError))
    assert missing == []


def test_run_reports_user_errors_in_one_line_and_lets_bugs_through(capsys):
    def bad():
        raise cli.UserError("first line\nsecond line")

    assert cli.run(bad) == 2 and capsys.readouterr().err == "error: first line\n"
    assert cli.run(lambda: None) == 0 and cli.run(lambda: 75) == 75
    with pytest.raises(KeyError):  # a bug keeps its traceback
        cli.run(lambda: {}["x"])


@pytest.mark.parametrize("command", ["train.py", "evaluate.py", "generate.py", "pkmlm.inspect"])
def test_bad_environment_variable_is_one_line_in_every_command(command, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PKMLM_CPU_KERNELS", "2")
    args = {"train.py": ["--config", tmp_path / "none.yaml"], "evaluate.py": [tmp_path],
            "generate.py": [tmp_path, "--prompt", "x"], "pkmlm.inspect": [tmp_path, "--layer", "x"]}[command]
    _one_line_exit_2(capsys, MAINS[command](), args, "PKMLM_CPU_KERNELS='2'", "set it to 1")


class _Stdin:
    """A piped stdin holding ``data`` (bytes), as `echo ... | generate.py` gives."""

    def __init__(self, data: bytes):
        self.buffer = io.BytesIO(data)

    def isatty(self) -> bool:
        return False


def test_text_that_is_not_utf8_is_refused_before_any_tokenizer(tmp_path, capsys, monkeypatch):
    """A prompt on stdin, --prompt and --text with invalid bytes (argv gives them as lone surrogates), and a
    config file. prepare's input files are the documented exception: invalid bytes become U+FFFD and are counted
    (tests/data/test_data_prepare.py)."""
    generate = MAINS["generate.py"]()
    monkeypatch.setattr(sys, "stdin", _Stdin(b"The government \xff\xfe said"))
    _one_line_exit_2(capsys, generate, [tmp_path], "the prompt on stdin is not valid UTF-8", "0xff at offset 15")
    bad_arg = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python makes of such bytes in argv
    _one_line_exit_2(capsys, generate, [tmp_path, "--prompt", bad_arg], "--prompt is not valid UTF-8", "0xe9")
    _one_line_exit_2(capsys, inspect_cli.main, [tmp_path, "--layer", "x", "--text", bad_arg],
                     "--text is not valid UTF-8")
    config = tmp_path / "c.yaml"
    config.write_bytes(b"model:\n  n_layers: 2  # caf\xe9\n")
    _one_line_exit_2(capsys, MAINS["train.py"](), ["--config", config], "c.yaml is not valid UTF-8")
    assert cli.utf8_text("café".encode(), "x") == "café" and cli.check_text("café", "x") == "café"


def test_a_path_of_the_wrong_kind_is_one_line_wherever_a_user_gives_one(text_run, tmp_path, capsys):
    data_dir, run_dir = text_run
    a_file, a_dir = tmp_path / "a_file", tmp_path / "a_dir"
    a_file.write_text("x")
    a_dir.mkdir()
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{n_layers: 1, d_model: 16, n_heads: 2}}\nmemory: {{positions: ['0:replace'], "
                      f"n_keys: 4, heads: 1, knn: 2, k_dim: 8}}\ndata: {{dir: {data_dir}, batch_size: 2, bptt: 8}}\n"
                      f"train: {{max_steps: 1, device: cpu, out_dir: {tmp_path / 'run'}}}\n")
    train, evaluate, generate = (MAINS[c]() for c in ("train.py", "evaluate.py", "generate.py"))
    cases = [
        (train, ["--config", a_dir], "is a directory, not a config file"),
        (train, ["--config", config, f"data.dir={a_file}"], "a_file is a file, not a directory"),
        (train, ["--config", config, f"train.out_dir={a_file}"], "a_file is a file, not a directory"),
        (train, ["--config", config, f"train.out_dir={a_file / 'run'}"], "a_file is a file, not a directory"),
        (train, ["--config", config, f"memory.values_file={a_dir}"], "is a directory: name a file in it"),
        (train, ["--config", config, f"memory.values_file={a_file / 'v'}"], "a_file is a file, not a directory"),
        (train, ["--config", config, "--init-from", run_dir], "is a directory, not a checkpoint file"),
        (train, ["--config", config, "--resume", a_dir], "is a directory, not a checkpoint file"),
        (evaluate, [run_dir, "--json", a_dir], "--json", "is a directory: give a file name"),
        (evaluate, [run_dir, "--csv", a_file / "t.csv"], "a_file is a file, not a directory"),
        (evaluate, [run_dir, "--data-dir", a_file], "a_file is a file, not a directory"),
        (generate, [run_dir, "--prompt", "x", "--data-dir", a_file], "a_file is a file, not a directory"),
        (inspect_cli.main, [run_dir, "--layer", "blocks.1.memory", "--json", a_dir], "--json", "is a directory"),
        (prepare_cli.main, ["--input", a_file, "--out", a_file], "--out", "is an existing file"),
        (prepare_cli.main, ["--input", a_file, "--out", tmp_path / "o", "--tokenizer", a_file],
         "a_file is a file, not a directory"),
    ]
    for main, args, *expected in cases:
        _one_line_exit_2(capsys, main, args, *expected)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "o").exists()  # nothing written


@pytest.mark.parametrize("flag", ["--tasks", "--workers", "--max-documents"])
def test_zero_is_refused_where_it_would_silently_mean_unset(flag, tmp_path, capsys):
    """prepare's count options default to None ("automatic"); 0 used to fall back to that default silently.
    (Options where 0 has a documented meaning, such as --top-k 0 or train.eval_batches 0, keep it.)"""
    _one_line_exit_2(capsys, prepare_cli.main, ["--corpus", "bbc_news", "--out", tmp_path / "o", flag, "0"],
                     f"{flag} must be positive, got 0")
    assert not (tmp_path / "o" / "train").exists()


def test_zero_slurm_resources_are_refused(tmp_path, capsys):
    for flag in ("--cpus-per-task", "--mem-per-cpu-gb", "--merge-cpus"):
        _one_line_exit_2(capsys, prepare_cli.main, ["--corpus", "bbc_news", "--out", tmp_path / "o", "--executor",
                                                    "slurm", "--partition", "p", flag, "0"], f"{flag} must be positive")
