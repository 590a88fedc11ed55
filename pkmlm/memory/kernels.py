"""CPU speed: compiled kernels for the memory layer and RowAdam (source: pkmlm/memory/csrc/pkm_cpu.cpp), and
the allocator setting the entry points apply (`retain_freed_memory`).

On the CPU, torch's generic ops spend most of a memory layer's time on full memory passes: `topk`
over every sub-key score, the dense (N, heads, 2, n_keys) gradient of those scores, and Adam's seven
passes over each touched value row. The kernels do the same arithmetic with far less traffic (see
docs/benchmarks.md). They are built on first use with `torch.utils.cpp_extension` (a C++ compiler
and ninja; about 15 s, once per machine, cached in torch's extension directory, `TORCH_EXTENSIONS_DIR`);
a process that compiles them says so on stderr, before and after.

The lookup's top-k selection and RowAdam's row update have AVX-512, AVX2 and scalar versions
(pkm_topk_simd.h, pkm_adam_simd.h); the best one the CPU reports (`__builtin_cpu_supports`) is used,
and all return identical results (`simd_path()`).

Everything else — other devices, other dtypes, or when the kernels cannot be built or are switched
off — runs pkmlm's pure-torch code, with the same results up to float rounding and the order of
tied scores. Switch: environment variable `PKMLM_CPU_KERNELS`: "1" (default) builds and uses them,
falling back with a warning if the build fails; "0" never uses them; anything else is a `KernelsError`.

Concurrent builds: torch serialises them with a lock file that a killed build leaves behind, after
which every later process would wait on it forever. pkmlm builds under its own `flock` lock next to
it, which dies with its owner: whoever holds that lock may delete torch's leftover file, and a
process that cannot get it within `BUILD_LOCK_TIMEOUT` seconds warns, naming the lock, and runs the
pure-torch code.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import hashlib
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

from pkmlm.cli import UserError

ENV_VAR = "PKMLM_CPU_KERNELS"
SOURCE = Path(__file__).parent / "csrc" / "pkm_cpu.cpp"
# -march=native: the kernels are built on the machine that runs them; the CPU's flags go into the
# extension's name so that machines sharing a home directory never load each other's build. The
# vectorised selection does not rely on it: each version is compiled for its own instruction set and
# picked at run time.
CFLAGS = ["-O3", "-march=native", "-fopenmp"]

BUILD_LOCK_TIMEOUT = 600.0  # seconds to wait for another process's build (a cold build takes ~30 s)

_build: dict[str, object] = {}  # "ok": bool, once a build was attempted in this process


class KernelsError(UserError, ValueError):
    """`PKMLM_CPU_KERNELS` holds something other than "0" or "1"."""


def enabled() -> bool:
    """Whether `PKMLM_CPU_KERNELS` allows the kernels ("1", the default) or not ("0")."""
    value = os.environ.get(ENV_VAR, "1")
    if value not in ("0", "1"):
        raise KernelsError(f"environment variable {ENV_VAR}={value!r} is not valid: set it to 1 (use the "
                           f"compiled CPU kernels, the default) or 0 (pure torch), or unset it")
    return value == "1"


def available() -> bool:
    """True when the kernels are enabled and built (building them on the first call)."""
    if not enabled():
        return False
    if "ok" not in _build:
        _build["ok"] = _load()
    return bool(_build["ok"])


def usable(*tensors: Tensor) -> bool:
    """True when every tensor is a float32 CPU tensor and the kernels are available."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and available()


def simd_path() -> str:
    """The vector path the kernels use (top-k selection, RowAdam's row update): "avx512", "avx2" or "scalar"
    (the best the CPU has; `torch.ops.pkmlm.select_simd(name)` forces another for tests), or "none" without
    the kernels."""
    return torch.ops.pkmlm.select_simd("") if available() else "none"


def _registered() -> bool:
    """Whether this process already has the ops (torch.ops namespaces are created on first access)."""
    return hasattr(torch.ops.pkmlm, "pkm_lookup")


def _load() -> bool:
    if _registered():
        _register_tracing()
        return True
    from torch.utils import cpp_extension

    name = "pkmlm_cpu_" + _machine_digest()
    try:
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        # A first use compiles for ~15 s in silence: say so (stderr, once per process that finds no build).
        start = time.monotonic()
        building = not (build_dir / f"{name}.so").exists()
        if building:
            print(f"pkmlm: compiling the CPU kernels for this machine (first use, about 15 s, once; cached in "
                  f"{build_dir}) ...", file=sys.stderr, flush=True)
        with _build_lock(build_dir.with_name(build_dir.name + ".pkmlm-lock")):
            (build_dir / "lock").unlink(missing_ok=True)  # torch's lock: stale, since we hold ours
            cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=CFLAGS, is_python_module=False,
                               verbose=False)
        if building:
            print(f"pkmlm: CPU kernels ready ({time.monotonic() - start:.0f} s)", file=sys.stderr, flush=True)
    except Exception as e:  # no compiler, no ninja, unsupported flags, a lock held too long: "use torch"
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(f"pkmlm: could not build the compiled CPU kernels ({first_line}); using the slower "
                      f"pure-torch code. Install a C++ compiler and ninja, or set {ENV_VAR}=0 to silence this.",
                      RuntimeWarning, stacklevel=3)
        return False
    _register_tracing()
    return True


def _register_tracing() -> None:
    """Fake (shape-only) kernels for every op, registered with torch.library so that torch.compile can trace
    them (pkmlm.memory.layer wraps the differentiable ones in custom ops with their autograd).

    The ops whose output size depends on the data (the distinct rows a read touched) get an unbacked size.
    """
    if _build.get("tracing"):
        return
    _build["tracing"] = True
    lib = "pkmlm::"

    @torch.library.register_fake(lib + "pkm_lookup")
    def _(q, keys, knn, with_subkeys):  # q (N, H, 2, half) -> scores, slots (N, H, knn), subkeys (N or 0, H, 2, knn)
        n, h = q.shape[0], q.shape[1]
        return (q.new_empty(n, h, knn), q.new_empty(n, h, knn, dtype=torch.long),
                q.new_empty(n if with_subkeys else 0, h, 2, knn, dtype=torch.long))

    @torch.library.register_fake(lib + "pkm_lookup_backward")
    def _(grad_scores, slots, q, keys):
        return torch.empty_like(q), torch.empty_like(keys)

    @torch.library.register_fake(lib + "bag_weights_backward")
    def _(grad_out, table, slots):
        return grad_out.new_empty(slots.shape)

    @torch.library.register_fake(lib + "row_sparse_grad")
    def _(slots, weights, grad_out, num_rows):
        rows = torch.library.get_ctx().new_dynamic_size()
        return slots.new_empty(rows), grad_out.new_empty(rows, grad_out.shape[1])

    @torch.library.register_fake(lib + "sparse_read_backward")
    def _(grad_out, table, slots, weights):
        rows = torch.library.get_ctx().new_dynamic_size()
        return slots.new_empty(rows), grad_out.new_empty(rows, grad_out.shape[1]), grad_out.new_empty(slots.shape)

    @torch.library.register_fake(lib + "row_adam_")
    def _(weight, moments, step, rows, grads, lr, beta1, beta2, eps):
        return None


class _build_lock:
    """An exclusive flock on `path`, waited for up to BUILD_LOCK_TIMEOUT s; released when its owner dies."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + BUILD_LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    raise TimeoutError(f"another process has held the kernel build lock {self.path} for over "
                                       f"{BUILD_LOCK_TIMEOUT:.0f} s (a build still running?)") from None
                time.sleep(0.1)

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _machine_digest() -> str:
    # torch rebuilds when SOURCE changes, not when a header it includes does: those go into the name. SOURCE goes in
    # too, so that checkouts with different sources (branches, worktrees) never rebuild over each other's build.
    headers = b"".join(p.read_bytes() for p in sorted(SOURCE.parent.glob("*.h"))) + SOURCE.read_bytes()
    cpu = platform.machine() + hashlib.sha1(headers).hexdigest()
    try:
        with open("/proc/cpuinfo") as f:
            cpu += "".join(line for line in f if line.startswith(("model name", "flags")))
    except OSError:
        cpu += platform.processor()
    return hashlib.sha1((cpu + " ".join(CFLAGS)).encode()).hexdigest()[:12]


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    By default glibc serves every block above 32 MB with its own mmap and unmaps it when freed, so a
    tensor of that size allocated each step (a memory layer's row-sparse value gradient is 238 MB at
    1M slots) is page-faulted in afresh every step: measured here, ~90k page faults and ~0.3 s of
    kernel time per step, a third of the step. With mmap off and trimming off, freed blocks stay in
    the heap and the next step reuses them; the process's memory stays at its peak, as with jemalloc
    or tcmalloc (which PyTorch's CPU tuning guide recommends preloading). train.py, evaluate.py and
    the benchmarks call this at start. Returns False (and changes nothing) where glibc is absent.
    """
    libc_name = ctypes.util.find_library("c")
    if platform.system() != "Linux" or not libc_name:
        return False
    try:
        libc = ctypes.CDLL(libc_name)
        m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):  # another libc (musl) has no mallopt
        return False
