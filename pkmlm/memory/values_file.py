"""Memory value tables larger than RAM (`memory.values_file`): the table and its RowAdam state live in
memory-mapped files, so only the rows a step touches are paged in and the kernel pages the rest out.

Files, for `memory.values_file: PATH` (all next to each other):
    PATH        the table, (rows, v_dim) float32, initialised N(0, v_dim**-0.5) once, when created
    PATH.adam   RowAdam's moments, (rows, 2, v_dim) float32: allocated but never written (fallocate),
                so untouched rows cost no first-step pass (they read as zero pages)
    PATH.step   RowAdam's step count per row, (rows,) int64, allocated the same way
    PATH.json   shape and a random id (`uid`) that checkpoints record
    PATH.undo   the undo journal: the rows changed since the last checkpoint, as they were then

Consistency. Checkpoints do not copy the table: they fsync the files, record `uid`, and start a fresh
journal based at their step. Before a step changes rows that the journal does not hold yet, their old
table, moment and step values are appended to it and fsynced, then changed in place. Resuming from
the checkpoint the journal is based at writes those rows back (the files return to that checkpoint
exactly); a journal based at an older step is stale (nothing changed since the newer checkpoint); one
based at a newer step means the files are past the checkpoint asked for, which is refused. Nothing
is lost beyond what any crash loses: the steps since the last checkpoint. Cost: each row touched
between two checkpoints is written once more (to the journal; its moments only if it was updated
before), and one fsync per step that touches new rows. Evaluation maps the files copy-on-write and applies the journal to its private copy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import struct
import uuid
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from pkmlm.cli import UserError, file_in_the_way
from pkmlm.fileio import fsync_dir, write_text_atomic

_MAGIC = b"PKMUNDO1"
_CHUNK_ROWS = 1 << 16  # rows initialised per write when a table is created
_FILES = WeakIdKeyDictionary()  # table parameter -> its ValuesFile


class ValuesFileError(UserError):
    """The values file cannot be created, opened or matched with a checkpoint."""


def file_of(param: Tensor) -> "ValuesFile | None":
    """The ValuesFile whose table is `param`, if any (RowAdam asks, to keep its state in the files)."""
    return _FILES.get(param)


class ValuesFile:
    """One memory value table and its RowAdam state in files at `path` (see the module docstring).

    writable=True (training): created when absent (seeded init), mapped shared; `weight`, `moments`
    and `step` are views of the files. writable=False (evaluation, sampling): the table alone, mapped
    copy-on-write, never written.
    """

    def __init__(self, path: str | os.PathLike, rows: int, dim: int, *, writable: bool, seed: int = 0):
        self.path, self.rows, self.dim, self.writable = Path(path), rows, dim, writable
        if self.path.is_dir():
            raise ValuesFileError(f"memory.values_file={self.path} is a directory: name a file in it, e.g. "
                                  f"{self.path / 'values.bin'} (its .adam, .step, .json and .undo files go beside it)")
        blocker = file_in_the_way(self.path.parent)
        if blocker is not None:
            raise ValuesFileError(f"memory.values_file={self.path}: {blocker} is a file, not a directory: point "
                                  "memory.values_file at a path inside a directory")
        self.meta = self.path.with_name(self.path.name + ".json")
        self.undo = self.path.with_name(self.path.name + ".undo")
        if writable and not self.meta.exists():
            self._create(seed)
        self.uid = self._read_meta()
        self.weight = _map(self.path, (rows, dim), torch.float32, shared=writable)
        self.moments = self.step = None
        if writable:
            self.moments = _map(self._adam, (rows, 2, dim), torch.float32, shared=True)
            self.step = _map(self._step, (rows,), torch.int64, shared=True)
        self._journaled = torch.zeros(rows, dtype=torch.bool)
        self._journal = None  # the open journal while training

    @property
    def _adam(self) -> Path:
        return self.path.with_name(self.path.name + ".adam")

    @property
    def _step(self) -> Path:
        return self.path.with_name(self.path.name + ".step")

    def bytes_needed(self) -> int:
        return self.rows * self.dim * 4 * 3 + self.rows * 8

    # ---- creation -------------------------------------------------------------------------------------

    def _create(self, seed: int) -> None:
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            probe = parent / f".{self.path.name}.probe"
            probe.touch()
            probe.unlink()
        except OSError as e:
            raise ValuesFileError(f"memory.values_file={self.path}: cannot write in {parent} ({e.strerror}); "
                                  "point it at a writable directory") from None
        free = shutil.disk_usage(parent).free
        if free < self.bytes_needed():
            raise ValuesFileError(
                f"memory.values_file={self.path}: the table and its Adam state need {self.bytes_needed() / 2**30:.1f} "
                f"GiB on disk, {parent} has {free / 2**30:.1f} GiB free; free space or use another disk")
        # The table: written once, in chunks, from a seeded generator (a fixed seed gives a fixed table).
        tmp = self.path.with_name(self.path.name + ".tmp")
        generator = torch.Generator().manual_seed(seed)
        with open(tmp, "wb") as f:
            for start in range(0, self.rows, _CHUNK_ROWS):
                n = min(_CHUNK_ROWS, self.rows - start)
                chunk = torch.randn(n, self.dim, generator=generator) * self.dim**-0.5
                f.write(chunk.numpy().tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        for path, size in ((self._adam, self.rows * 2 * self.dim * 4), (self._step, self.rows * 8)):
            with open(path, "wb") as f:
                # Reserved, not written: reads are zero pages without I/O, writes never hit a full disk (a
                # SIGBUS through the mapping), and the blocks are contiguous (a sparse file written row by
                # row fragments into one extent per row).
                try:
                    os.posix_fallocate(f.fileno(), 0, size)
                except OSError:  # a file system without it: sparse
                    f.truncate(size)
        self._write_journal_header(0)
        write_text_atomic(self.meta, json.dumps({"uid": uuid.uuid4().hex, "rows": self.rows, "dim": self.dim,
                                                 "dtype": "float32"}) + "\n")

    def _read_meta(self) -> str:
        try:
            meta = json.loads(self.meta.read_text())
            uid, rows, dim = meta["uid"], meta["rows"], meta["dim"]
        except FileNotFoundError:
            raise ValuesFileError(f"memory.values_file={self.path}: no table there ({self.meta} is missing)") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValuesFileError(f"{self.meta}: unreadable ({e}); delete the values files to start afresh") from None
        if (rows, dim) != (self.rows, self.dim):
            raise ValuesFileError(f"memory.values_file={self.path} holds a ({rows}, {dim}) table, this model needs "
                                  f"({self.rows}, {self.dim}): point memory.values_file at another path")
        return uid

    # ---- the journal ----------------------------------------------------------------------------------

    def _write_journal_header(self, step: int) -> None:
        tmp = self.undo.with_name(self.undo.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(_MAGIC + struct.pack("<q", step))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.undo)
        fsync_dir(self.undo.parent)

    def journal_step(self) -> int:
        """The checkpoint step the journal rolls back to."""
        try:
            with open(self.undo, "rb") as f:
                head = f.read(16)
        except FileNotFoundError:
            raise ValuesFileError(f"{self.undo} is missing: the values files are incomplete; delete them and "
                                  "train from the start") from None
        if len(head) != 16 or head[:8] != _MAGIC:
            raise ValuesFileError(f"{self.undo} is not a pkmlm undo journal")
        return struct.unpack("<q", head[8:])[0]

    def _records(self):
        """(rows, table rows, moments, steps) of each journal record, in order; a torn last record is
        ignored (its rows were not changed: changes wait for the fsync). A record holds the moments of
        the rows with a step count only (the others' are zero)."""
        data = self.undo.read_bytes()
        pos, d = 16, self.dim
        while pos + 16 <= len(data):
            n, m = struct.unpack_from("<qq", data, pos)
            size = 16 + n * 8 + n * d * 4 + n * 8 + m * 2 * d * 4
            if n <= 0 or not 0 <= m <= n or pos + size > len(data):
                break
            buf = torch.frombuffer(bytearray(data[pos + 16:pos + size]), dtype=torch.uint8)
            rows, table, steps, stepped = buf.split([n * 8, n * d * 4, n * 8, m * 2 * d * 4])
            steps = steps.view(torch.int64)
            moments = torch.zeros(n, 2, d)
            moments[steps > 0] = stepped.view(torch.float32).view(m, 2, d)
            yield rows.view(torch.int64), table.view(torch.float32).view(n, d), moments, steps
            pos += size

    def restore(self, step: int) -> None:
        """Bring the files to checkpoint `step` (resume, or a fresh run at step 0), then journal from there."""
        self._rewind(step, optimizer_state=True,
                     fix="resume from the newest checkpoint (the files cannot go further back)")
        self.checkpoint(step)

    def overlay(self, step: int) -> None:
        """Read-only mapping: show the table as of checkpoint `step` (applies the journal to the private copy)."""
        self._rewind(step, optimizer_state=False, fix="evaluate the newest checkpoint")

    @torch.no_grad()
    def _rewind(self, step: int, *, optimizer_state: bool, fix: str) -> None:
        """Undo the journaled changes made since checkpoint `step`: the table's rows, and with `optimizer_state`
        their moments and step counts too. ValuesFileError (ending in `fix`) when the files are past `step`."""
        base = self.journal_step()
        if base > step:
            raise ValuesFileError(f"memory.values_file={self.path} is at step {base} or later, past the checkpoint "
                                  f"of step {step}: {fix}")
        if base < step:
            return
        for rows, table, moments, steps in reversed(list(self._records())):
            self.weight.index_copy_(0, rows, table)
            if optimizer_state:
                self.moments.index_copy_(0, rows, moments)
                self.step.index_copy_(0, rows, steps)

    def before_update(self, rows: Tensor) -> None:
        """Journal (and fsync) the old contents of those `rows` (unique, sorted) not journaled since the checkpoint."""
        new = rows[~self._journaled[rows]]
        if not new.numel():
            return
        if self._journal is None:
            self._journal = open(self.undo, "ab")
        steps = self.step[new]
        stepped = new[steps > 0]  # rows never updated have zero moments: not read, not stored
        record = [struct.pack("<qq", new.numel(), stepped.numel()), new.numpy().tobytes(),
                  self.weight.detach()[new].numpy().tobytes(), steps.numpy().tobytes(),
                  self.moments[stepped].numpy().tobytes()]
        self._journal.write(b"".join(record))
        self._journal.flush()
        os.fsync(self._journal.fileno())
        self._journaled[new] = True

    def sync(self) -> None:
        """Make every change so far durable (before a checkpoint records it)."""
        for path in (self.path, self._adam, self._step):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # writes back the pages the shared mapping dirtied
            finally:
                os.close(fd)

    def checkpoint(self, step: int) -> None:
        """After checkpoint `step` is durable: the journal starts afresh from it."""
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        self._write_journal_header(step)
        self._journaled.zero_()

    def record(self) -> dict:
        """What a checkpoint stores in place of the table: where it is and which one it is."""
        return {"path": str(self.path), "uid": self.uid, "rows": self.rows, "dim": self.dim}

    def check_record(self, record: dict | None, source) -> None:
        if not record or record.get("uid") != self.uid:
            raise ValuesFileError(f"{source} was not trained with the values file at {self.path} (its id differs): "
                                  "point memory.values_file at the files of that run")


def attach(model: nn.Module, path: str | os.PathLike, *, writable: bool, seed: int = 0) -> ValuesFile:
    """Give every memory of `model` the file-backed table at `path` (the model built it on the meta
    device: memory.values_file needs one table, shared or single). Call before moving the model and
    before making its optimizers."""
    from pkmlm.memory.layer import ProductKeyMemory

    tables = {id(m.values): m.values for m in model.modules() if isinstance(m, ProductKeyMemory)}
    if len(tables) != 1:
        raise ValuesFileError(f"memory.values_file needs exactly one value table, the model has {len(tables)}")
    table = next(iter(tables.values()))
    rows, dim = table.weight.shape
    vf = ValuesFile(path, rows, dim, writable=writable, seed=seed)
    table.weight = nn.Parameter(vf.weight, requires_grad=writable)
    vf.weight = table.weight
    _FILES[table.weight] = vf
    return vf


def strip_state(model_state: dict, vf: ValuesFile) -> dict:
    """A model state_dict without the file-backed table (it stays in its file)."""
    return {k: v for k, v in model_state.items() if not (isinstance(v, Tensor) and _same_storage(v, vf.weight))}


def load_model_state(model: nn.Module, state: dict, vf: ValuesFile) -> None:
    """model.load_state_dict(state) for a state without the file-backed table (which is not copied onto itself)."""
    table_keys = set(model.state_dict()) - set(strip_state(model.state_dict(), vf))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) - table_keys or unexpected:
        raise RuntimeError(f"Error(s) in loading state_dict:\n missing keys {sorted(set(missing) - table_keys)}, "
                           f"unexpected keys {sorted(unexpected)}")


def _same_storage(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _map(path: Path, shape: tuple, dtype: torch.dtype, *, shared: bool) -> Tensor:
    numel = 1
    for s in shape:
        numel *= s
    itemsize = torch.empty((), dtype=dtype).element_size()
    try:
        actual = path.stat().st_size
    except FileNotFoundError:
        raise ValuesFileError(f"memory.values_file: {path} is missing; delete the other values files to start "
                              "afresh, or restore it") from None
    if actual != numel * itemsize:
        raise ValuesFileError(f"{path} has {actual} bytes, expected {numel * itemsize}: not this table's file")
    mapped = torch.from_file(str(path), shared=shared, size=numel, dtype=dtype)
    _advise_random(mapped)
    return mapped.view(shape)


def _advise_random(mapped: Tensor) -> None:
    """madvise(MADV_RANDOM): a fault maps its own page only. Without it the kernel reads around each
    faulting row (128 KB): for rows read at random that pages in (and, for the never-written moments,
    zero-fills) most of the files within the first steps, the very pass this module avoids."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name or not mapped.numel():
        return
    libc = ctypes.CDLL(libc_name, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = os.sysconf("SC_PAGE_SIZE")
    start = mapped.data_ptr() // page * page
    libc.madvise(start, mapped.data_ptr() + mapped.numel() * mapped.element_size() - start, 1)  # MADV_RANDOM
