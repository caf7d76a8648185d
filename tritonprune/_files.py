"""Every file the package writes or reads back as JSON goes through here (a leaf: imports nothing of ours).

Writes are atomic and never go through a link: the text is produced (and JSON checked to be encodable)
before anything touches the disk, written to a fresh temporary file in the target's folder (O_EXCL, so a
name another user planted is never opened), flushed and fsynced, then `os.replace`d over the target. A
symbolic link at the target is replaced itself, never written through; a failure at any point leaves the
previous file as it was. Reads of JSON name the file and say what is wrong (not UTF-8, truncated, too
deeply nested, not an object, a missing key) instead of a bare decoder traceback.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from typing import Any


def _umask() -> int:
    try:  # Linux says it without changing it (os.umask would, for every thread)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    """Write `data` to `path` atomically (see the module docstring). `mode`: the file's permissions
    (default: what open(path, "w") would give under the umask)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path)[:40])
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~_umask() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # the rename itself survives a crash once the folder is synced
        dfd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def write_text(path: str | os.PathLike, text: str, mode: int | None = None) -> None:
    write_bytes(path, text.encode("utf-8"), mode)


def to_json(obj: Any, what: str, strict: bool = True) -> str:
    """`obj` as JSON text, or ValueError naming `what` (nothing is written). `strict`: no NaN or infinity
    (other JSON readers reject them; reports of measurements may pass strict=False)."""
    try:
        return json.dumps(obj, indent=1, allow_nan=not strict) + "\n"
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: cannot be written as JSON ({e}); nothing was written") from e


def write_json(path: str | os.PathLike, obj: Any, strict: bool = True) -> None:
    """Check `obj` encodes, then write it atomically to `path`."""
    write_text(path, to_json(obj, os.fspath(path), strict))


def parse_json(text: str | bytes, where: str) -> Any:
    """Decode JSON `text` read from `where`; ValueError naming it for every way it can be malformed."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not UTF-8 text (byte {e.start}); is it the right file?") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); the file is "
                         "truncated or corrupt: write it again") from None
    except RecursionError:  # the decoder recurses per level
        raise ValueError(f"{where}: JSON nested too deeply; not a file tritonprune wrote") from None


def read_json(path: str | os.PathLike, what: str = "") -> Any:
    """Read and decode the JSON file at `path` (errors name the file)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    return parse_json(data, f"{what} {path}".strip())


def require_object(obj: Any, where: str, keys: Iterable[str] = ()) -> dict:
    """`obj` if it is a JSON object holding every key in `keys`, else ValueError naming `where`."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; the file is incomplete or not written by tritonprune")
    return obj
