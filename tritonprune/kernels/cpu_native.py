"""The torch backend's CPU accelerator: cpu_native.c compiled at first use with the system C compiler.

The matrix path's sums of squares and update are bound by memory traffic on a CPU, and torch needs
several passes for each (square, row sum, column sum; two broadcast multiply-adds). The C loops do each
in one pass over the weights, on `torch.get_num_threads()` POSIX threads. Float32 and float64 weights
only; everything else (half types, other layouts, sign updates) stays on torch ops.

Nothing here is required: without a C compiler (or with TRITONPRUNE_NATIVE=0) `library()` is None and
the torch backend runs on torch ops alone, with the same results; `why_unavailable()` says why. The
shared object is cached under $TRITONPRUNE_CACHE_DIR (default ~/.cache/tritonprune), keyed by the
source, the flags, the compiler and the CPU, and written atomically so parallel processes can share it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_native.c")
ENV_SWITCH = "TRITONPRUNE_NATIVE"  # "0" turns the accelerator off
FLAGS = ["-std=c11", "-O3", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
         "-fPIC", "-shared", "-pthread"]
# tried in turn: OpenMP shares torch's threads (see the C file); -march=native is refused by some
# compilers (older Apple clang on arm64); the last build is plain C with POSIX threads
BUILDS = (("-fopenmp", "-march=native"), ("-march=native",), ())
DTYPES = (torch.float32, torch.float64)
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_why: str | None = None
_tried = False


class Mat(ctypes.Structure):
    """One weight as the C code sees it (tp_mat): pointers, then O rows, J columns, Rg rows per group."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("w", "t", "rowc", "colc", "rows", "cols")] + [
        (name, ctypes.c_int64) for name in ("O", "J", "Rg")]


def _cache_dir() -> Path:
    if os.environ.get("TRITONPRUNE_CACHE_DIR"):
        return Path(os.environ["TRITONPRUNE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tritonprune"


def _cpu_key() -> str:
    """What -march=native depends on: the CPU's feature flags where Linux tells them."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compile(cc: str, out: Path) -> str | None:
    """Build the shared object at `out`; returns None, or the compiler's complaint."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    err = "no build was tried"
    try:
        for extra in BUILDS:
            r = subprocess.run([cc, *FLAGS, *extra, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                               timeout=300)
            if r.returncode == 0:
                os.replace(tmp, out)
                return None
            lines = (r.stderr or r.stdout).strip().splitlines()
            err = lines[-1] if lines else f"exit code {r.returncode}, no output"
        return err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> None:
    global _lib, _why
    if os.environ.get(ENV_SWITCH, "1") == "0":
        _why = f"turned off by {ENV_SWITCH}=0"
        return
    if sys.platform == "win32":
        _why = "not built on Windows"
        return
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        _why = "no C compiler found (set CC or install gcc/clang)"
        return
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), repr((FLAGS, BUILDS)).encode(), cc.encode(),
                                     _cpu_key().encode()])).hexdigest()[:16]
    name = f"cpu_native-{key}.so"
    # an unwritable cache dir (read-only home) still gets the accelerator: the second place is this user's
    for where in (_cache_dir(), Path(tempfile.gettempdir()) / f"tritonprune-{os.getuid()}"):
        path = where / name
        try:
            if not path.exists():
                err = _compile(cc, path)
                if err is not None:
                    _why = f"{cc} failed to compile {SOURCE.name}: {err}"
                    return
            lib = ctypes.CDLL(str(path))
            break
        except (OSError, subprocess.SubprocessError) as e:
            _why = f"could not build or load {path}: {e}"
    else:
        return
    _why = None
    for sfx in _SUFFIX.values():
        fn = getattr(lib, f"tp_run_{sfx}")
        fn.argtypes = [ctypes.c_int, ctypes.POINTER(Mat), ctypes.c_int64, ctypes.c_int, ctypes.c_void_p]
        fn.restype = ctypes.c_int
    _lib = lib


def library() -> ctypes.CDLL | None:
    """The loaded accelerator, or None (see `why_unavailable`). Built once per process, warned once."""
    global _tried
    if not _tried:
        with _lock:
            if not _tried:
                _load()
                _tried = True
                if _lib is None and os.environ.get(ENV_SWITCH, "1") != "0":
                    warnings.warn(f"tritonprune: the CPU accelerator is unavailable ({_why}); the torch backend "
                                  f"runs on torch ops alone, about 2x slower on large models. Set {ENV_SWITCH}=0 "
                                  "to silence this.", RuntimeWarning, stacklevel=3)
    return _lib


def why_unavailable() -> str | None:
    """None when the accelerator is loaded, else the reason."""
    library()
    return _why


def reset() -> None:
    """Forget the loaded library (tests switch the accelerator on and off)."""
    global _lib, _why, _tried
    with _lock:
        _lib, _why, _tried = None, None, False


class Table:
    """The weights of one dtype as a C array; pointers are filled per call, sizes once."""

    def __init__(self, dtype: torch.dtype, shapes: list[tuple[int, int, int]]):
        self.fn = getattr(library(), f"tp_run_{_SUFFIX[dtype]}")
        self.dtype, self.n = dtype, len(shapes)
        self.mats = (Mat * self.n)()
        for m, (rows, cols, rows_per_group) in zip(self.mats, shapes):
            m.O, m.J, m.Rg = rows, cols, rows_per_group
        self.total_cols = sum((rows // g) * cols for rows, cols, g in shapes)
        self.scratch = torch.empty(0, dtype=dtype)

    def sq_sums(self) -> None:
        """rows / cols of every entry with either pointer set get the sums of squares of w."""
        nt = torch.get_num_threads()
        if self.scratch.numel() < nt * self.total_cols:
            self.scratch = torch.empty(nt * self.total_cols, dtype=self.dtype)
        self.fn(0, self.mats, self.n, nt, self.scratch.data_ptr())

    def update(self) -> None:
        """t += (rowc + colc) * w on every entry with t set."""
        self.fn(1, self.mats, self.n, torch.get_num_threads(), None)
