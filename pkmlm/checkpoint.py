"""Checkpoints: atomic save, keep the last N, safe load, exact-resume checks.

A checkpoint is one file, ``OUT_DIR/checkpoints/step_XXXXXXX.pt``, holding a dict of tensors and plain Python
containers only, so that it loads with ``torch.load(weights_only=True)`` (no arbitrary unpickling):

    {"format": 1, "config": dict, "model": state_dict, "optimizers": dict, "step": int,
     "rng": {"ranks": [rng_state(), ...]}, "data": dict, "vocab_hash": str}

The trainer may add further plain entries (e.g. "scaler" for fp16). ``load_checkpoint`` checks the types of
every entry it knows, so a damaged or crafted file is one CheckpointError, not a traceback from deep inside torch.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from pkmlm.cli import UserError
from pkmlm.fileio import atomic_open, fsync_dir

FORMAT = 1
REQUIRED_KEYS = ("format", "config", "model", "optimizers", "step", "rng", "data", "vocab_hash")
_NAME = re.compile(r"^step_(\d{7,})\.pt$")
BEST = "best.pt"
# The temporary names pkmlm.fileio.atomic_open gives our checkpoints (".step_0000100.pt.tmp.<pid>"): a write that
# was killed leaves one behind. Nothing else in the directory is ever removed as a temporary.
_TEMPORARY = re.compile(r"^\.(step_\d{7,}\.pt|best\.pt)\.tmp\.\d+$")

# Config fields that may differ between a checkpoint and the run that resumes it (README's list is tested to be
# these two sets). The first set changes how long the run goes, where it runs and where and how often it reports,
# not the computation.
RESUMABLE_CHANGES = frozenset({
    "data.dir",
    "data.verify_checksums",
    # Where a run executes is not part of its identity (`make demo` trains with cpu, the config says auto); the
    # same arithmetic on another device differs only in float rounding.
    "train.device",
    "train.out_dir",
    "train.max_steps",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.keep_best",
    "train.max_nonfinite",
    "train.dist_timeout_s",
    # DDP and FSDP checkpoints are the same whole state dicts; only the order of float sums differs.
    "train.parallel",
    # Checkpoints hold whole value tables either way; sharding changes only the order of float sums.
    "memory.shard_values",
    # When changed rows reach the values file, not what they hold.
    "memory.values_file_cache_gb",
})
# These change the trajectory from the resumed step on (the run is then no longer bit for bit the one it would
# have been) but leave every saved state valid: what a diverged run is resumed with. The change is logged.
STEERING_CHANGES = frozenset({
    "train.lr",
    "train.value_lr",
    "train.warmup_steps",
    "train.grad_clip",
    "train.precision",
    "train.compile",  # same weights and state; compiled kernels round differently
})


class CheckpointError(UserError):
    """A checkpoint cannot be read, or does not fit the run that tries to resume from it."""


def checkpoint_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    return checkpoint_dir(out_dir) / f"step_{step:07d}.pt"


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """The run's checkpoints, oldest step first."""
    directory = checkpoint_dir(out_dir)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest step checkpoint (never best.pt, nothing in abandoned-*/), or None."""
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def best_path(out_dir: str | os.PathLike) -> Path:
    """Where ``train.keep_best`` keeps the checkpoint with the lowest validation loss."""
    return checkpoint_dir(out_dir) / BEST


def save_checkpoint(state: dict, out_dir: str | os.PathLike, keep: int) -> Path:
    """Write ``state`` to ``step_XXXXXXX.pt`` atomically, then delete all but the newest ``keep`` checkpoints.

    Atomic: the bytes go to a temporary file in the same directory, are fsynced, then renamed over the final
    name, so a crash or preemption mid-write never leaves a truncated checkpoint behind. The checkpoint just
    written is never pruned, and best.pt is not a step checkpoint, so pruning never touches it either.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    path = _write(state, checkpoint_path(out_dir, state["step"]))
    for old in list_checkpoints(out_dir)[:-keep]:
        if old != path:
            old.unlink(missing_ok=True)
    return path


def save_best(state: dict, out_dir: str | os.PathLike) -> Path:
    """Write ``state`` (a whole checkpoint: it resumes and evaluates like any other) to best.pt atomically."""
    return _write(state, best_path(out_dir))


def _write(state: dict, path: Path) -> Path:
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {missing}")
    try:
        with atomic_open(path, "wb") as f:  # on any error the temporary file goes, the previous checkpoints stay
            torch.save(state, f)
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not any(s in str(e) for s in _ZIP_WRITER_FAILURES):
            raise  # not a write failure: a bug, keep its traceback
        raise CheckpointError(_write_failure(path, state, e)) from None
    fsync_dir(path.parent)
    return path


# How torch's zip writer reports a write that failed under it (a full disk, a quota), in place of the OSError.
_ZIP_WRITER_FAILURES = ("PytorchStreamWriter", "inline_container", "file write failed", "unexpected pos")


def _write_failure(path: Path, state: dict, error: Exception) -> str:
    """One line for a checkpoint write that failed: the path, the bytes it needs and has, and what to do."""
    needed = state_bytes(state)
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    space = f"it needs about {_size(needed)}" + (f", {path.parent} has {_size(free)} free" if free is not None else "")
    full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < needed) \
        or isinstance(error, RuntimeError)  # the zip writer hides the errno; a full disk is the usual cause
    cause = "no space left on the device" if full else (getattr(error, "strerror", None) or str(error).strip())
    return (f"cannot write checkpoint {path}: {cause} ({space}); no partial file was left and the previous "
            f"checkpoints are intact: free space or set train.out_dir to another disk, then rerun with --resume")


def state_bytes(state) -> int:
    """Bytes of the tensors in ``state`` (nested dicts, lists, tuples), each storage counted once: about the size
    of its checkpoint file."""
    seen, total, stack = set(), 0, [state]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            try:
                storage = item.untyped_storage()
            except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
                total += item.nelement() * item.element_size()
                continue
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(item, dict):
            stack += item.values()
        elif isinstance(item, (list, tuple)):
            stack += item
    return total


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


def remove_stale_temporaries(out_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of checkpoint writes that were killed (our own naming only); returns them.

    Call once at the start of a run, before anything writes a checkpoint.
    """
    directory = checkpoint_dir(out_dir)
    stale = sorted(p for p in directory.iterdir() if _TEMPORARY.match(p.name)) if directory.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of checkpoint ``path``, read without loading its tensors (memory-mapped); None if unreadable."""
    try:
        step = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("step")
    except Exception:
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def abandon_newer(out_dir: str | os.PathLike, step: int, best_step: int | None) -> tuple[Path | None, list[Path]]:
    """Set aside what does not belong to a run resumed at ``step``: returns (folder, files moved there).

    Step checkpoints newer than ``step`` continue a run the resume abandons; left in place, pruning (by step)
    would delete the resumed run's new checkpoints and a later ``--resume`` would pick the abandoned run up
    again. best.pt stays only when it is the one the resumed checkpoint knows (``best_step``, from its "best"
    entry); otherwise it belongs to another run. Both are moved, never deleted, into
    ``checkpoints/abandoned-<date>-<time>/``.
    """
    newer = [p for p in list_checkpoints(out_dir) if int(_NAME.match(p.name).group(1)) > step]
    best = best_path(out_dir)
    if best.is_file() and (best_step is None or checkpoint_step(best) != best_step):  # best_step <= step
        newer.append(best)
    if not newer:
        return None, []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = checkpoint_dir(out_dir) / f"abandoned-{stamp}"
    n = 1
    while folder.exists():
        n += 1
        folder = checkpoint_dir(out_dir) / f"abandoned-{stamp}-{n}"
    folder.mkdir()
    for p in newer:
        os.replace(p, folder / p.name)
    fsync_dir(folder)
    fsync_dir(checkpoint_dir(out_dir))
    return folder, [folder / p.name for p in newer]


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint onto the CPU without unpickling arbitrary objects; check its format and keys."""
    path = Path(path)
    if path.is_dir():
        latest = latest_checkpoint(path)
        raise CheckpointError(f"{path} is a directory, not a checkpoint file: give a checkpoint file, e.g. "
                              + (f"its newest, {latest}" if latest else f"{checkpoint_dir(path)}/step_XXXXXXX.pt"))
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, foreign pickle, ...: one clear line instead of a deep traceback
        first = str(e).strip().split("\n", 1)[0]  # torch's messages run over many lines
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {first}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a pkmlm checkpoint of format {FORMAT} (format: {got})")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}")
    problem = _structure_problem(state)
    if problem:
        raise CheckpointError(f"checkpoint {path} is damaged or not written by pkmlm: {problem}; "
                              "use another checkpoint")
    return state


def _structure_problem(state: dict) -> str | None:
    """What is wrong with the types of a loaded checkpoint dict, or None."""
    def kind(value, expected) -> bool:
        return isinstance(value, expected) and not (expected is int and isinstance(value, bool))

    for key, expected in (("config", dict), ("model", dict), ("optimizers", dict), ("step", int), ("rng", dict),
                          ("data", dict), ("vocab_hash", str)):
        if not kind(state[key], expected):
            return f"'{key}' is a {type(state[key]).__name__}, not a {expected.__name__}"
    if state["step"] < 0:
        return f"'step' is {state['step']}"
    for name, value in state["model"].items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            return f"model entry {name!r} is a {type(value).__name__}, not a tensor"
    for key, expected in (("scaler", dict), ("reinit", dict), ("init_from", str), ("best", dict)):
        if state.get(key) is not None and not kind(state[key], expected):
            return f"'{key}' is a {type(state[key]).__name__}, not a {expected.__name__} or None"
    best = state.get("best")
    if best is not None and not (kind(best.get("step"), int) and kind(best.get("valid_loss"), float)):
        return "'best' must hold an integer step and a float valid_loss"
    ranks = state["rng"].get("ranks")
    if not isinstance(ranks, list) or not ranks:
        return "'rng' lacks a non-empty list 'ranks' (one random state per process)"
    for i, rank_state in enumerate(ranks):
        problem = _rng_problem(rank_state)
        if problem:
            return f"rng state of rank {i}: {problem}"
    return None


def _rng_problem(state) -> str | None:
    """What is wrong with an ``rng_state()`` dict read back from a file, or None."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, not a dict"
    for key in ("torch", "python", "numpy"):
        if key not in state:
            return f"no '{key}' generator"
    for key in ("torch", "cuda"):
        value = state.get(key, torch.empty(0, dtype=torch.uint8))
        if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
            return f"'{key}' is not a byte tensor"
    python = state["python"]
    if not (isinstance(python, (tuple, list)) and len(python) == 3 and isinstance(python[1], (tuple, list))
            and all(isinstance(x, int) for x in python[1])):
        return "'python' is not (version, state, gauss)"
    numpy = state["numpy"]
    if not (isinstance(numpy, (tuple, list)) and len(numpy) == 5 and isinstance(numpy[0], str)
            and isinstance(numpy[1], torch.Tensor) and numpy[1].shape == (624,)
            and all(isinstance(x, int) for x in numpy[2:4])):
        return "'numpy' is not (kind, keys (624,), pos, has_gauss, cached)"
    return None


def check_resumable(saved: dict, current: dict, source: str | os.PathLike = "checkpoint") -> list[str]:
    """Raise CheckpointError when the resumed config differs from the saved one outside RESUMABLE_CHANGES
    and STEERING_CHANGES; return the STEERING_CHANGES made, as "key: old -> new" lines for the log.

    saved, current: ``Config.to_dict()`` outputs (nested plain dicts).
    """
    a, b = _flatten(saved), _flatten(current)
    allowed = RESUMABLE_CHANGES | STEERING_CHANGES
    changed = sorted(k for k in a.keys() | b.keys() if k not in allowed and a.get(k) != b.get(k))
    if changed:
        details = "; ".join(f"{k}: {a.get(k)!r} in checkpoint, {b.get(k)!r} now" for k in changed)
        raise CheckpointError(
            f"cannot resume from {source}: the config changed ({details}). Resume with the saved config "
            f"(only {', '.join(sorted(allowed))} may change), or start a new run in another out_dir"
        )
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(STEERING_CHANGES) if a.get(k) != b.get(k)]


def check_vocab(saved_hash: str, data_hash: str, source: str | os.PathLike = "checkpoint") -> None:
    if saved_hash != data_hash:
        raise CheckpointError(
            f"{source} was trained with vocabulary {saved_hash} but the data has {data_hash}: "
            "point data.dir at the corpus the checkpoint was trained on"
        )


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def rng_state(device: torch.device) -> dict:
    """Every random generator the training loop draws from, as tensors and plain types (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
