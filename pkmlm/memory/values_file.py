"""Memory value tables larger than RAM (`memory.values_file`): the table and its RowAdam state live in
files, mapped so that only the rows a step touches are paged in; steps run at RAM speed, the disk is
written at write-backs (checkpoints, and when the write-back cache is full).

Files, for `memory.values_file: PATH` (all next to each other):
    PATH        the table, (rows, v_dim) float32, initialised N(0, v_dim**-0.5) once, when created
    PATH.adam   RowAdam's moments, (rows, 2, v_dim) float32: allocated but never written (fallocate),
                so untouched rows cost no first-step pass (they read as zero pages)
    PATH.step   RowAdam's step count per row, (rows,) int64, allocated the same way
    PATH.json   shape and a random id (`uid`) that checkpoints record
    PATH.undo   the undo journal: the rows written back since the last checkpoint, as they were then

The write-back cache. Training maps the three files copy-on-write (MAP_PRIVATE, MADV_RANDOM): the
compiled kernels read and update the mapping in place; a page a step changes becomes the process's own
(anonymous) memory and the files stay untouched. Rows changed since the last write-back are marked
dirty. A write-back (at every checkpoint, and before a step whose rows would take the dirty rows past
the cache bound, `memory.values_file_cache_gb`) appends the checkpoint-time contents of the dirty rows
not journaled yet to the journal, fsyncs it and copies the dirty rows into the files (through a shared
mapping). A checkpoint's write-back keeps the private pages (they equal the files now, and the next
steps change them in place, without a page fault each); a spill drops them all (MADV_DONTNEED: later
reads see the files' new contents). The bound counts every row with private pages, clean or dirty.
When the table and its state fit the bound whole (`bytes_needed() <= cache_bytes`), the cache is resident
instead: they are read into ordinary memory once, sequentially, at attach, and steps run at the in-RAM
step's speed (the mapping's first touch of a row costs three page faults, each a copy and, with several
threads, a TLB shootdown: measured 4-9 s steps against 0.29 s in RAM for the 1.07B table,
docs/benchmarks.md). Write-backs, the journal and crash safety are the same in both forms.

Consistency. Checkpoints do not copy the table: they write back, fsync the files, record `uid`, and
start a fresh journal based at their step. Files change only at a write-back, after the old contents
of the rows it writes are durable in the journal, so at any moment (mid-step, mid-write-back,
mid-checkpoint) the files are the last checkpoint plus journaled rows. Resuming from the checkpoint the
journal is based at writes those rows back (the files return to that checkpoint exactly); a journal
based at an older step is stale (the newer checkpoint was durable before the journal was reset); one
based at a newer step means the files are past the checkpoint asked for, which is refused. A crash
loses the steps since the last checkpoint and nothing else. Evaluation maps the table copy-on-write
and applies the journal to its private copy. The files' format is unchanged from the earlier design
(the same files and journal records; only when rows reach the files differs).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
import os
import shutil
import signal
import struct
import uuid
from pathlib import Path

import torch
from torch import Tensor, nn

from pkmlm.cli import UserError, file_in_the_way
from pkmlm.fileio import fsync_dir, write_text_atomic

_MAGIC = b"PKMUNDO1"
_CHUNK_ROWS = 1 << 16  # rows per write when a table is created or written back (page-aligned in every file)
_KILL_ENV = "PKMLM_TEST_KILL_AT"  # tests: "POINT:N" SIGKILLs the process at the N-th pass through POINT
_kill_counts: dict[str, int] = {}


class ValuesFileError(UserError):
    """The values file cannot be created, opened or matched with a checkpoint."""


def file_of(param: Tensor) -> "ValuesFile | None":
    """The ValuesFile whose table is `param`, if any (RowAdam asks, to keep its state in the files)."""
    return getattr(param, "_values_file", None)


class ValuesFile:
    """One memory value table and its RowAdam state in files at `path` (see the module docstring).

    writable=True (training): created when absent (seeded init); `weight`, `moments` and `step` are
    copy-on-write mappings of the files (the write-back cache, at most `cache_bytes` of changed rows;
    None: half the machine's RAM). writable=False (evaluation, sampling): the table alone, mapped
    copy-on-write, never written.
    """

    def __init__(self, path: str | os.PathLike, rows: int, dim: int, *, writable: bool, seed: int = 0,
                 cache_bytes: int | None = None):
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
        self.cache_bytes = _half_the_ram() if cache_bytes is None else cache_bytes
        self.resident = writable and self.bytes_needed() <= self.cache_bytes
        self.moments = self.step = None
        if writable:
            # The files themselves, shared: written only by write-backs and rollbacks.
            self._disk = (_map(self.path, (rows, dim), torch.float32, shared=True),
                          _map(self._adam, (rows, 2, dim), torch.float32, shared=True),
                          _map(self._step, (rows,), torch.int64, shared=True))
        if self.resident:
            self.weight, self.moments, self.step = (torch.empty_like(t) for t in self._disk)
            self._load()
        else:
            self.weight = _map(self.path, (rows, dim), torch.float32, shared=False)
            if writable:
                self.moments = _map(self._adam, (rows, 2, dim), torch.float32, shared=False)
                self.step = _map(self._step, (rows,), torch.int64, shared=False)
        self._dirty = torch.zeros(rows, dtype=torch.bool)  # changed in the cache since the last write-back
        # Changed since the last drop (a mapping: has private pages) or, resident, since read from the files.
        self._cached = torch.zeros(rows, dtype=torch.bool)
        self._n_cached = 0
        self._journaled = torch.zeros(rows, dtype=torch.bool)  # in the journal since the last checkpoint
        self._journal = None  # the open journal while training

    @property
    def _adam(self) -> Path:
        return self.path.with_name(self.path.name + ".adam")

    @property
    def _step(self) -> Path:
        return self.path.with_name(self.path.name + ".step")

    def bytes_needed(self) -> int:
        return self.rows * self.dim * 4 * 3 + self.rows * 8

    def _load(self) -> None:
        """Resident cache: read the files into it, each sequentially (untouched moments are zeros: no read)."""
        _read_into(self.path, self.weight)
        _read_into(self._step, self.step)
        if self.step.count_nonzero():
            _read_into(self._adam, self.moments)
        else:
            self.moments.zero_()
        for path in (self.path, self._adam, self._step):  # our copy is in RAM now: the page cache need not be
            _fadvise_dontneed(path)

    def _row_cache_bytes(self) -> int:
        """RAM a changed row holds in the cache: its table row and moments, a page at least each (rows
        scattered over the table dirty a page apiece), plus its step count's page share."""
        page = os.sysconf("SC_PAGE_SIZE")
        return max(self.dim * 4, page) + max(self.dim * 8, page) + 8

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
        """(rows, table rows, moments, steps) of each journal record, in order, read one record at a time (a
        journal can hold most of the table); a torn last record is ignored (its rows were not changed:
        changes wait for the fsync). A record holds the moments of the rows with a step count only (the
        others' are zero)."""
        d = self.dim
        with open(self.undo, "rb") as f:
            f.seek(16)
            while len(head := f.read(16)) == 16:
                n, m = struct.unpack("<qq", head)
                if n <= 0 or not 0 <= m <= n:
                    break
                buf = torch.empty(n * 8 + n * d * 4 + n * 8 + m * 2 * d * 4, dtype=torch.uint8)
                if f.readinto(memoryview(buf.numpy())) != buf.numel():
                    break
                rows, table, steps, stepped = buf.split([n * 8, n * d * 4, n * 8, m * 2 * d * 4])
                steps = steps.view(torch.int64)
                moments = torch.zeros(n, 2, d)
                moments[steps > 0] = stepped.view(torch.float32).view(m, 2, d)
                yield rows.view(torch.int64), table.view(torch.float32).view(n, d), moments, steps

    def restore(self, step: int) -> None:
        """Bring the files to checkpoint `step` (resume, or a fresh run at step 0), then journal from there."""
        weight, moments, steps = self._disk
        rewound = self._rewind(step, weight, moments, steps,
                               fix="resume from the newest checkpoint (the files cannot go further back)")
        if rewound.numel():
            self._fsync_files()  # the files are that checkpoint again before the journal is dropped
        if self.resident:  # the rows that can differ from the files now, read again
            for rows in _chunks(torch.unique(torch.cat([rewound, self._cached.nonzero().squeeze(1)]))):
                for tensor, disk in zip((self.weight.detach(), self.moments, self.step), self._disk):
                    tensor[rows] = disk[rows]
        self._drop_cache()
        self.checkpoint(step)

    def overlay(self, step: int) -> None:
        """Read-only mapping: show the table as of checkpoint `step` (applies the journal to the private copy)."""
        self._rewind(step, self.weight, fix="evaluate the newest checkpoint")

    @torch.no_grad()
    def _rewind(self, step: int, weight: Tensor, moments: Tensor | None = None, steps: Tensor | None = None, *,
                fix: str) -> Tensor:
        """Undo, in `weight` (and `moments`, `steps` when given), the journaled changes made since checkpoint
        `step`; returns the rows changed. ValuesFileError (ending in `fix`) when the files are past `step`."""
        base = self.journal_step()
        if base > step:
            raise ValuesFileError(f"memory.values_file={self.path} is at step {base} or later, past the checkpoint "
                                  f"of step {step}: {fix}")
        done = torch.zeros(self.rows, dtype=torch.bool)
        for rows, table, old_moments, old_steps in (self._records() if base == step else ()):
            first = ~done[rows]  # a row's first record holds its checkpoint-time contents
            rows, table, old_moments, old_steps = rows[first], table[first], old_moments[first], old_steps[first]
            done[rows] = True
            weight.index_copy_(0, rows, table)
            if moments is not None:
                moments.index_copy_(0, rows, old_moments)
                steps.index_copy_(0, rows, old_steps)
        return done.nonzero().squeeze(1)

    def before_update(self, rows: Tensor) -> None:
        """RowAdam is about to change `rows` (unique, sorted) in the cache: mark them dirty, writing the cache
        back and dropping it first when they would take it past `cache_bytes` (the spill; a step's own rows
        always fit)."""
        new = rows[~self._cached[rows]]
        past = (self._n_cached + new.numel()) * self._row_cache_bytes() > self.cache_bytes
        if not self.resident and self._n_cached and past:
            self.write_back(keep=False)
            new = rows
        self._dirty[rows] = True
        self._cached[new] = True
        self._n_cached += new.numel()
        _test_kill("step")

    @torch.no_grad()
    def write_back(self, *, keep: bool) -> None:
        """Copy the dirty rows into the files, their checkpoint-time contents journaled (and fsynced) first;
        then keep the cache's private pages (`keep`: they equal the files now) or drop them. The files are
        not fsynced here (the journal covers them)."""
        keep = keep or self.resident  # a resident cache is the table itself: never dropped
        dirty = self._dirty.nonzero().squeeze(1)
        if not dirty.numel():
            if not keep:
                self._drop_cache()
            return
        disk_weight, disk_moments, disk_steps = self._disk
        new = dirty[~self._journaled[dirty]]
        if new.numel():
            if self._journal is None:
                self._journal = open(self.undo, "ab")
            for rows in _chunks(new):  # the files still hold these rows as of the checkpoint
                steps = disk_steps[rows]
                stepped = rows[steps > 0]  # rows never updated have zero moments: not read, not stored
                for part in (struct.pack("<qq", rows.numel(), stepped.numel()), rows.numpy(),
                             disk_weight[rows].numpy(), steps.numpy(), disk_moments[stepped].numpy()):
                    self._journal.write(part if isinstance(part, bytes) else part.reshape(-1).view("u1").data)
                for tensor in self._disk:  # keeps the process's resident file pages bounded
                    _advise(tensor, _MADV_DONTNEED, rows[0].item(), rows[-1].item() + 1)
                _test_kill("journal")
            self._journal.flush()
            os.fsync(self._journal.fileno())
            self._journaled[new] = True
        weight = self.weight.detach()
        for rows in _chunks(dirty):
            disk_weight.index_copy_(0, rows, weight[rows])
            _test_kill("writeback")
            disk_moments.index_copy_(0, rows, self.moments[rows])
            _test_kill("writeback")
            disk_steps.index_copy_(0, rows, self.step[rows])
            _test_kill("writeback")
            # Resident memory stays bounded: the written pages leave the process (the page cache keeps the
            # files' for the kernel to write out), the cache's own pages of these rows only where whole.
            lo, hi = rows[0].item(), rows[-1].item() + 1
            for tensor in self._disk:
                _advise(tensor, _MADV_DONTNEED, lo, hi)
            if not keep:
                for tensor in (self.weight, self.moments, self.step):
                    _advise(tensor, _MADV_DONTNEED, lo, hi, inward=True)
        if keep:
            self._dirty.zero_()
        else:
            self._drop_cache()

    def _drop_cache(self) -> None:
        """Forget the private pages (MADV_DONTNEED): the mappings read the files again, and resident
        file pages leave this process (the page cache keeps them for the kernel to write back or evict)."""
        for tensor in (() if self.resident else (self.weight, self.moments, self.step)) + self._disk:
            _advise(tensor, _MADV_DONTNEED)
        self._dirty.zero_()
        self._cached.zero_()
        self._n_cached = 0

    def _fsync_files(self) -> None:
        for path in (self.path, self._adam, self._step):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # writes back the pages the shared mappings dirtied
            finally:
                os.close(fd)

    def sync(self) -> None:
        """Write back and make every change so far durable (before a checkpoint records it)."""
        self.write_back(keep=True)
        self._fsync_files()
        _test_kill("sync")

    def checkpoint(self, step: int) -> None:
        """After checkpoint `step` is durable: the journal starts afresh from it."""
        _test_kill("checkpoint")
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


def attach(model: nn.Module, path: str | os.PathLike, *, writable: bool, seed: int = 0,
           cache_gb: float | None = None) -> ValuesFile:
    """Give every memory of `model` the file-backed table at `path` (the model built it on the meta
    device: memory.values_file needs one table, shared or single), with a write-back cache of `cache_gb`
    (None: half the RAM). Call before moving the model and before making its optimizers."""
    from pkmlm.memory.layer import ProductKeyMemory

    tables = {id(m.values): m.values for m in model.modules() if isinstance(m, ProductKeyMemory)}
    if len(tables) != 1:
        raise ValuesFileError(f"memory.values_file needs exactly one value table, the model has {len(tables)}")
    table = next(iter(tables.values()))
    rows, dim = table.weight.shape
    vf = ValuesFile(path, rows, dim, writable=writable, seed=seed,
                    cache_bytes=None if cache_gb is None else int(cache_gb * 2**30))
    table.weight = nn.Parameter(vf.weight, requires_grad=writable)
    vf.weight = table.weight
    # On the parameter, not in a registry keyed by it: the two refer to each other, a cycle the garbage
    # collector frees (a weak-keyed registry whose value holds its key never would: the mapping leaked).
    table.weight._values_file = vf
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
    if shared:
        mapped = torch.from_file(str(path), shared=True, size=numel, dtype=dtype)
    else:
        # MAP_NORESERVE: without it the kernel charges a private writable mapping in full against the commit
        # limit and refuses one larger than RAM (ENOMEM), the very case of a table larger than RAM; the
        # cache's bound keeps the pages it really takes.
        with open(path, "rb") as f:
            view = mmap.mmap(f.fileno(), numel * itemsize, flags=mmap.MAP_PRIVATE | _MAP_NORESERVE,
                             prot=mmap.PROT_READ | mmap.PROT_WRITE)
        mapped = torch.frombuffer(view, dtype=dtype)  # holds `view`: unmapped when the tensor is freed
    # MADV_RANDOM for the steps' copy-on-write mapping: a fault maps its own page only. Without it the kernel
    # reads around each faulting row (128 KB): for rows read at random that pages in (and, for the
    # never-written moments, zero-fills) most of the files within the first steps, the very pass this
    # module avoids. The shared mapping keeps the kernel's read-ahead: write-backs and rollbacks go through it
    # in ascending row order, and a checkpoint's dirty rows are often most of the table.
    if not shared:
        _advise(mapped, _MADV_RANDOM)
    return mapped.view(shape)


_MADV_RANDOM, _MADV_DONTNEED = 1, 4
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's value; Python 3.11's mmap lacks the name


def _advise(mapped: Tensor, advice: int, lo: int = 0, hi: int | None = None, *, inward: bool = False) -> None:
    """madvise(advice) over rows [lo, hi) of the mapping `mapped` (all of it by default): the pages that
    touch them, or with `inward` only the pages wholly inside them."""
    if _LIBC is None or not mapped.numel():
        return
    page = os.sysconf("SC_PAGE_SIZE")
    row = mapped[0].numel() * mapped.element_size() if mapped.dim() else mapped.element_size()
    hi = mapped.shape[0] if hi is None else hi
    start, end = mapped.data_ptr() + lo * row, mapped.data_ptr() + hi * row
    if inward:
        start, end = -(-start // page) * page, end // page * page
    else:
        start, end = start // page * page, -(-end // page) * page
    if end > start and _LIBC.madvise(start, end - start, advice) != 0 and advice == _MADV_DONTNEED:
        # The cache would keep rows the files now hold: never silently.
        raise OSError(ctypes.get_errno(), "madvise(MADV_DONTNEED) failed on a values file mapping")


def _read_into(path: Path, tensor: Tensor) -> None:
    """Fill the contiguous `tensor` with the file at `path`, read sequentially."""
    view = memoryview(tensor.numpy()).cast("B")
    with open(path, "rb", buffering=0) as f:
        done = 0
        while done < len(view):
            n = f.readinto(view[done:done + (1 << 30)])
            if not n:
                raise ValuesFileError(f"{path} ended after {done} bytes: not this table's file")
            done += n


def _fadvise_dontneed(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _libc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


_LIBC = _libc()


def _chunks(rows: Tensor):
    """`rows` (sorted) in pieces of at most _CHUNK_ROWS (bounded temporaries while writing back)."""
    for start in range(0, rows.numel(), _CHUNK_ROWS):
        yield rows[start:start + _CHUNK_ROWS]


def _half_the_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def _test_kill(point: str) -> None:
    """Tests of crash safety: PKMLM_TEST_KILL_AT=POINT:N SIGKILLs this process the N-th time it passes
    POINT (step: a row update about to start; journal: a journal record written, not fsynced; writeback:
    part of the rows copied into the files; sync: files durable, checkpoint not written; checkpoint:
    checkpoint written, journal not reset)."""
    target = os.environ.get(_KILL_ENV)
    if not target or not target.startswith(point + ":"):
        return
    _kill_counts[point] = _kill_counts.get(point, 0) + 1
    if _kill_counts[point] == int(target.split(":", 1)[1]):
        os.kill(os.getpid(), signal.SIGKILL)
