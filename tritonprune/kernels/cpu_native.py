"""The torch backend's CPU accelerator: cpu_native.c compiled at first use with the system C compiler.

The matrix path's sums of squares and update are bound by memory traffic on a CPU, and torch needs
several passes for each (square, row sum, column sum; two broadcast multiply-adds). The C loops do each
in one pass over the weights, on `torch.get_num_threads()` threads. Float32 and float64 weights, and
bfloat16/float16 ones loaded as float32 and stored rounded to nearest even (compute in fp32, store in the
weight's dtype); everything else (other layouts, sign updates) stays on torch ops.

Nothing here is required: without a C compiler (or with TRITONPRUNE_NATIVE=0) `library()` is None and
the torch backend runs on torch ops alone, with the same results; `why_unavailable()` says why.

What gets loaded is checked, because a shared object runs with the user's rights and a broken one kills
the process (SIGBUS inside dlopen on a truncated file):
- the cache directory ($TRITONPRUNE_CACHE_DIR, else ~/.cache/tritonprune, else a per-user directory under
  the temp dir) is used only if it is a directory (not a link) owned by this user that nobody else can
  write, made with mode 0700 when missing, and every directory above it passes OpenSSH's StrictModes
  test: owned by root or this user, writable by nobody else unless sticky (/tmp). Otherwise another user
  could swap a directory on the path between the check and the load;
- every build is compiled to a temporary name, then its size and SHA-256 go to a sidecar file (written
  atomically), then both are renamed into place; a cached object is opened once (never through a link),
  read, checked against its sidecar, and exactly those bytes are loaded (from a private in-memory file,
  memfd, where Linux has one): the path is never opened again, so nothing swapped in after the check runs;
- the build lock is replaced in a forked child (os.register_at_fork): a fork while another thread builds
  (DataLoader workers) does not leave the child waiting on a lock nobody will release;
- a loaded object without the expected symbols is rebuilt once; if that fails too, torch ops with a warning.
`CC` may hold arguments (`CC="ccache gcc"`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: the accelerator is not built there
    fcntl = None

import torch

from .._files import write_text

SOURCE = Path(__file__).with_name("cpu_native.c")
ENV_SWITCH = "TRITONPRUNE_NATIVE"  # "0" turns the accelerator off
FLAGS = ["-std=c11", "-O3", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
         "-fPIC", "-shared", "-pthread"]
# tried in turn: OpenMP shares torch's threads (see the C file); -march=native is refused by some
# compilers (older Apple clang on arm64); the last build is plain C with POSIX threads
BUILDS = (("-fopenmp", "-march=native"), ("-march=native",), ())
_SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}
REQUIRED = ("f32", "f64", "bf16", "f16")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)  # where the library has them
# the type of the sums and column partials of each weight dtype
ACC = {torch.float32: torch.float32, torch.float64: torch.float64, torch.bfloat16: torch.float32,
       torch.float16: torch.float32}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_why: str | None = None
_tried = False


class Mat(ctypes.Structure):
    """One weight as the C code sees it (tp_mat): pointers, then O rows, J columns, Rg rows per group."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("w", "t", "rowc", "colc", "rows", "cols")] + [
        (name, ctypes.c_int64) for name in ("O", "J", "Rg")]


def _cache_dirs() -> list[Path]:
    """Where a build may live, in order of preference."""
    if os.environ.get("TRITONPRUNE_CACHE_DIR"):
        first = Path(os.environ["TRITONPRUNE_CACHE_DIR"])
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        first = Path(base) / "tritonprune"
    return [first, Path(tempfile.gettempdir()) / f"tritonprune-{os.getuid()}"]


def _unsafe_ancestor(folder: Path) -> str | None:
    """Why a directory above the cache is unsafe (None if every one is): like OpenSSH's StrictModes, each
    must be owned by root or this user and writable by nobody else, unless sticky (only an entry's owner
    may rename it there, as in /tmp)."""
    me = os.getuid()
    for d in [folder, *folder.parents]:
        try:
            st = os.stat(d)
        except OSError as e:
            return f"cannot check {d}: {e.strerror or e}"
        if st.st_uid not in (0, me):
            return f"{d} (above the cache directory) is owned by uid {st.st_uid}, not by root or this user"
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
            return (f"{d} (above the cache directory) is writable by other users (mode {stat.S_IMODE(st.st_mode):o}) "
                    "and not sticky: another user could swap the cache; use a private cache directory")
    return None


def private_dir(path: Path) -> str | None:
    """Make `path` (mode 0700) if missing; None if it is fit to hold code we run, else why not: it must be a
    directory (not a link) owned by this user, writable by nobody else, below directories that pass
    `_unsafe_ancestor`."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(path)
    except OSError as e:
        return f"cannot create {path}: {e.strerror or e}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid != os.getuid():
        return f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.getuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}); make it 0700"
    return _unsafe_ancestor(Path(os.path.realpath(path.parent)))


def _resolved(path: Path) -> Path:
    """`path` with its (checked) parents resolved: used for every later step, so a link above it that is
    changed afterwards does not move where we read and write."""
    return Path(os.path.realpath(path.parent)) / path.name


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


def _digest(path: str | Path) -> tuple[int, str]:
    data = Path(path).read_bytes()
    return len(data), hashlib.sha256(data).hexdigest()


def _sidecar(so: Path) -> Path:
    return so.with_name(so.name + ".sha256")


_NOFOLLOW = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _read_private(path: Path) -> bytes:
    """The bytes of `path`, opened once without following a link; OSError unless it is a regular file of
    this user that nobody else can write."""
    fd = os.open(path, _NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise OSError(f"{path} is not a regular file of this user, private to it")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _read_verified(so: Path) -> bytes | None:
    """The bytes of `so` if they have the size and SHA-256 its sidecar recorded at build time, else None."""
    try:
        size_s, digest = _read_private(_sidecar(so)).decode().split()
        if os.lstat(so).st_size != int(size_s):  # cheap first: a truncated file is not even read
            return None
        data = _read_private(so)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if (len(data), hashlib.sha256(data).hexdigest()) == (int(size_s), digest) else None


def _verified(so: Path) -> bool:
    return _read_verified(so) is not None


_keep: list[int] = []  # memfds of loaded libraries: never closed, so their /proc path is never reused


def _load_bytes(data: bytes, folder: Path) -> ctypes.CDLL:
    """dlopen exactly `data`: from an anonymous in-memory file where Linux has memfd_create (sealed against
    writes), else from a fresh private file in `folder` (checked private), removed once loaded."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        flags = os.MFD_CLOEXEC | getattr(os, "MFD_ALLOW_SEALING", 0)
        fd = os.memfd_create("tritonprune-cpu_native", flags)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            seals = sum(getattr(fcntl, n, 0) if fcntl is not None else 0 for n in ("F_SEAL_SEAL", "F_SEAL_SHRINK", "F_SEAL_GROW", "F_SEAL_WRITE"))
            if fcntl is not None and seals and hasattr(fcntl, "F_ADD_SEALS"):
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            lib = ctypes.CDLL(f"/proc/self/fd/{fd}")
        except BaseException:
            os.close(fd)
            raise
        _keep.append(fd)
        return lib
    fd, tmp = tempfile.mkstemp(suffix=".so", prefix=".load-", dir=folder)  # a fresh name: no dlopen reuse
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return ctypes.CDLL(tmp)
    finally:
        os.unlink(tmp)


def _compile(cc: list[str], out: Path) -> tuple[ctypes.CDLL | None, str | None]:
    """Build the shared object and load it; returns (library, None) or (None, the compiler's complaint).

    The build goes to a temporary name in the (checked) cache directory; its bytes are read once, loaded,
    recorded in the sidecar, and only then is the file renamed to `out`."""
    fd, tmp = tempfile.mkstemp(suffix=".so", prefix=".tmp-", dir=out.parent)
    os.close(fd)
    err = "no build was tried"
    try:
        for extra in BUILDS:
            r = subprocess.run([*cc, *FLAGS, *extra, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                               timeout=300)
            if r.returncode == 0:
                os.chmod(tmp, 0o700)
                data = _read_private(Path(tmp))
                lib = _load_bytes(data, out.parent)
                write_text(_sidecar(out), f"{len(data)} {hashlib.sha256(data).hexdigest()}\n", mode=0o600)
                os.replace(tmp, out)
                return lib, None
            lines = (r.stderr or r.stdout).strip().splitlines()
            err = lines[-1] if lines else f"exit code {r.returncode}, no output"
        return None, err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _missing(lib: ctypes.CDLL) -> list[str]:
    return [f"tp_run_{s}" for s in REQUIRED if not hasattr(lib, f"tp_run_{s}")]


def compiler() -> list[str] | None:
    """The compiler command: $CC split as a shell would (`ccache gcc`), else cc, gcc or clang."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"]) or None
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return [cc] if cc else None


def _load() -> None:
    global _lib, _why
    if os.environ.get(ENV_SWITCH, "1") == "0":
        _why = f"turned off by {ENV_SWITCH}=0"
        return
    if sys.platform == "win32":
        _why = "not built on Windows"
        return
    cc = compiler()
    if not cc:
        _why = "no C compiler found (set CC or install gcc/clang)"
        return
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), repr((FLAGS, BUILDS)).encode(), shlex.join(cc).encode(),
                                     _cpu_key().encode()])).hexdigest()[:16]
    name = f"cpu_native-{key}.so"
    # an unusable cache dir (read-only home, wrong owner) still gets the accelerator: the second place is
    # this user's own directory under the temp dir, held to the same checks
    reasons = []
    for where in _cache_dirs():
        bad = private_dir(where)
        if bad is not None:
            reasons.append(bad)
            continue
        lib, _why = _open(cc, _resolved(where) / name)
        if lib is not None:
            _bind(lib)
            return
        if not _why.startswith("could not"):
            return  # the compiler failed: another directory will not help
        reasons.append(_why)
    _why = "no usable cache directory: " + "; ".join(reasons)


def _open(cc: list[str], path: Path) -> tuple[ctypes.CDLL | None, str | None]:
    """A verified cached build at `path`, else a fresh one; a build without the symbols is rebuilt once."""
    try:
        data = _read_verified(path)
        lib = _load_bytes(data, path.parent) if data is not None else None
        if lib is not None and not _missing(lib):
            return lib, None
        lib, err = _compile(cc, path)
        if err is not None:
            return None, f"{shlex.join(cc)} failed to compile {SOURCE.name}: {err}"
        missing = _missing(lib)
        if missing:
            return None, f"the library built at {path} lacks {', '.join(missing)}"
        return lib, None
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"could not build or load {path}: {e}"


def _bind(lib: ctypes.CDLL) -> None:
    global _lib
    for sfx in _SUFFIX.values():
        fn = getattr(lib, f"tp_run_{sfx}", None)
        if fn is not None:
            fn.argtypes = [ctypes.c_int, ctypes.POINTER(Mat), ctypes.c_int64, ctypes.c_int, ctypes.c_void_p]
            fn.restype = ctypes.c_int
    _lib = lib


def supports(dtype: torch.dtype) -> bool:
    """The loaded library has loops for weights of `dtype`."""
    lib = library()
    return lib is not None and dtype in _SUFFIX and hasattr(lib, f"tp_run_{_SUFFIX[dtype]}")


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


def _after_fork_in_child() -> None:
    # a thread of the parent may have held the lock at the fork; it does not exist in the child
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


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
        self.acc = ACC[dtype]
        self.scratch = torch.empty(0, dtype=self.acc)

    def sq_sums(self) -> None:
        """rows / cols of every entry with either pointer set get the sums of squares of w."""
        nt = torch.get_num_threads()
        if self.scratch.numel() < nt * self.total_cols:
            self.scratch = torch.empty(nt * self.total_cols, dtype=self.acc)
        self.fn(0, self.mats, self.n, nt, self.scratch.data_ptr())

    def update(self) -> None:
        """t += (rowc + colc) * w on every entry with t set."""
        self.fn(1, self.mats, self.n, torch.get_num_threads(), None)
