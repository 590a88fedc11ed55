"""Checkpoints: atomic save, keep the last N, safe load, exact-resume checks.

A checkpoint is one file, ``OUT_DIR/checkpoints/step_XXXXXXX.pt``, holding a dict of tensors and plain Python
containers only, so that it loads with ``torch.load(weights_only=True)`` (no arbitrary unpickling):

    {"format": 1, "config": dict, "model": state_dict, "optimizers": dict, "step": int,
     "rng": dict, "data": dict, "vocab_hash": str}

The trainer may add further plain entries (e.g. "scaler" for fp16).
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from pkmlm.fileio import atomic_open

FORMAT = 1
REQUIRED_KEYS = ("format", "config", "model", "optimizers", "step", "rng", "data", "vocab_hash")
_NAME = re.compile(r"^step_(\d{7,})\.pt$")

# Config fields that may differ between a checkpoint and the run that resumes it: they change how long the run
# goes and where and how often it reports, not the trajectory of the weights. Anything else must match.
RESUMABLE_CHANGES = frozenset({
    "data.dir",
    "data.verify_checksums",
    "train.out_dir",
    "train.max_steps",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.max_nonfinite",
    # Checkpoints hold whole value tables either way; sharding changes only the order of float sums.
    "memory.shard_values",
})


class CheckpointError(Exception):
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
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def save_checkpoint(state: dict, out_dir: str | os.PathLike, keep: int) -> Path:
    """Write ``state`` to ``step_XXXXXXX.pt`` atomically, then delete all but the newest ``keep`` checkpoints.

    Atomic: the bytes go to a temporary file in the same directory, are fsynced, then renamed over the final
    name, so a crash or preemption mid-write never leaves a truncated checkpoint behind.
    """
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {missing}")
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    path = checkpoint_path(out_dir, state["step"])
    with atomic_open(path, "wb") as f:
        torch.save(state, f)
    _fsync_dir(path.parent)
    for old in list_checkpoints(out_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint onto the CPU without unpickling arbitrary objects; check its format and keys."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, foreign pickle, ...: one clear line instead of a deep traceback
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a pkmlm checkpoint of format {FORMAT} (format: {got})")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}")
    return state


def check_resumable(saved: dict, current: dict, source: str | os.PathLike = "checkpoint") -> None:
    """Raise CheckpointError when the resumed config differs from the saved one outside RESUMABLE_CHANGES.

    saved, current: ``Config.to_dict()`` outputs (nested plain dicts).
    """
    a, b = _flatten(saved), _flatten(current)
    changed = sorted(k for k in a.keys() | b.keys() if k not in RESUMABLE_CHANGES and a.get(k) != b.get(k))
    if changed:
        details = "; ".join(f"{k}: {a.get(k)!r} in checkpoint, {b.get(k)!r} now" for k in changed)
        raise CheckpointError(
            f"cannot resume from {source}: the config changed ({details}). Resume with the saved config "
            f"(only {', '.join(sorted(RESUMABLE_CHANGES))} may change), or start a new run in another out_dir"
        )


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
