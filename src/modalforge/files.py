"""Where modalforge keeps what it downloads or converts, how it names a file's content, and how
it writes a file so that a crash never leaves half of one.

One cache root for everything (``$MODALFORGE_CACHE``, default ``~/.cache/modalforge``): dataset
packages under ``npm/``, features under ``features/``, converted Whisper and LLM weights under
``whisper/`` and ``llm/``, ONNX encoders under ``onnx/``. A file is named, checked and recorded
by the sha256 of its bytes.

Every artefact is written atomically: to a hidden temporary name in the target's own folder
(``.NAME.tmp-PID-XXXX``), flushed to disk, then renamed over the target with ``os.replace``, so
a reader — or a rerun after ``kill -9`` — sees the old file or the new one, never a half.
:func:`atomic_path` is the one way to do it (the ``atomic_write_*`` helpers and
:func:`atomic_dir`, its folder variant, are built on it). A temporary left by a killed process
is never mistaken for the real thing (hidden name, different suffix) and
:func:`remove_stale_temps` clears it on the next write to that folder.

``MODALFORGE_CRASH_AT=POINT`` (or ``POINT:N``, the N-th time) makes the process SIGKILL itself
at :func:`crash_point` ``POINT``; the crash-safety tests use it to kill writers mid-way.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """``$MODALFORGE_CACHE`` or ``~/.cache/modalforge``, created if missing."""
    path = Path(os.environ.get("MODALFORGE_CACHE") or Path.home() / ".cache" / "modalforge")
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file's bytes, read in blocks."""
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# -- fault injection -------------------------------------------------------------------------

_CRASH_COUNTS: dict[str, int] = {}
_CRASH_LOCK = threading.Lock()


def crash_point(name: str) -> None:
    """SIGKILL this process here if ``$MODALFORGE_CRASH_AT`` names this point (``name``, or
    ``name:N`` for its N-th call in this process). A dictionary lookup when the variable is
    unset."""
    wanted = os.environ.get("MODALFORGE_CRASH_AT")
    if not wanted:
        return
    point, _, nth = wanted.partition(":")
    if point != name:
        return
    with _CRASH_LOCK:  # writers in threads (a dataset build's workers) count every pass
        _CRASH_COUNTS[name] = count = _CRASH_COUNTS.get(name, 0) + 1
    if count >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


# -- atomic writes ---------------------------------------------------------------------------

# .NAME.tmp-PID-HEX[SUFFIX]: the pid tells a dead writer's leftovers from a live one's
_TEMP = re.compile(r"^\..+\.(?:tmp|old)-(\d+)-[0-9a-f]{8}(?:\.[^.]*)?$")


def temp_name(path: Path, kind: str = "tmp", suffix: bool = True) -> Path:
    """A hidden sibling of ``path`` for writing it: ``.NAME.tmp-PID-HEX`` + ``path``'s suffix
    (so writers that pick a format by suffix — ``soundfile``, ``savefig`` — still do)."""
    end = path.suffix if suffix else ""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}{end}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporaries (files or folders named by :func:`temp_name`) that a writer which
    is no longer running left in ``folder``; returns what was removed."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in Path(folder).iterdir():
            match = _TEMP.match(entry.name)
            if match is None or _pid_alive(int(match.group(1))):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def sync_all() -> None:
    """Flush every file system's written data to disk (``os.sync``, where there is one)."""
    if hasattr(os, "sync"):
        os.sync()


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename in ``path`` durable (where the platform allows fsync on a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a written file's data to disk."""
    with path.open("rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], point: str | None = None,
                durable: bool = True) -> Iterator[Path]:  # fmt: skip
    """Yield a temporary path next to ``path`` to write the file to; on success it is fsynced
    and renamed over ``path`` (``os.replace``), on an exception it is removed.

    ``point`` names the crash points ``POINT.write`` (before the body runs) and
    ``POINT.rename`` (the temporary complete, ``path`` not yet replaced). ``durable=False``
    skips the fsyncs (still atomic against a killed process; for the thousands of sample files
    of a dataset build, which syncs once before it writes the file that marks it complete).

        with atomic_path(out / "plot.png") as tmp:
            fig.savefig(tmp)
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(target)
    try:
        if point:
            crash_point(f"{point}.write")
        yield tmp
        if durable:
            fsync_file(tmp)
        if point:
            crash_point(f"{point}.rename")
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, point: str | None = None,
                       durable: bool = True) -> Path:  # fmt: skip
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`). With ``point``, the
    crash point ``POINT.partial`` fires with half the bytes in the temporary."""
    path = Path(path)
    with atomic_path(path, point, durable) as tmp, tmp.open("wb") as f:
        if point:
            half = len(data) // 2
            f.write(data[:half])
            f.flush()
            crash_point(f"{point}.partial")
            f.write(data[half:])
        else:
            f.write(data)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str, point: str | None = None) -> Path:
    """Write ``text`` as UTF-8 to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), point)


def atomic_write_json(path: str | os.PathLike[str], value: Any, point: str | None = None,
                      **dumps: Any) -> Path:  # fmt: skip
    """Write ``value`` as JSON (``indent=2`` and a final newline unless ``dumps`` says
    otherwise) to ``path`` atomically."""
    dumps.setdefault("indent", 2)
    return atomic_write_text(path, json.dumps(value, **dumps) + "\n", point)


# renameat2(RENAME_EXCHANGE) swaps two paths in one step (Linux >= 3.15, glibc >= 2.28)
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` atomically; False where the system cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]  # fmt: skip
    done = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return done == 0


def replace_dir(tmp: Path, target: Path, point: str | None = None) -> None:
    """Put the finished folder ``tmp`` at ``target``. An existing ``target`` is swapped out in
    one atomic exchange where the system has one (else moved aside, then ``tmp`` renamed in:
    a crash between the two leaves no ``target``, never a partial one), then deleted."""
    if not target.exists():
        if point:
            crash_point(f"{point}.rename")
        os.rename(tmp, target)
        fsync_dir(target.parent)
        return
    if point:
        crash_point(f"{point}.swap")
    if _exchange(tmp, target):  # tmp now holds the old folder
        fsync_dir(target.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = temp_name(target, "old", suffix=False)
    os.rename(target, old)
    try:
        if point:
            crash_point(f"{point}.aside")
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], point: str | None = None) -> Iterator[Path]:
    """Yield a fresh hidden folder next to ``path`` to fill; on success its files are fsynced
    and it replaces ``path`` (:func:`replace_dir`); on an exception it is deleted. Stale
    temporaries of killed writers next to ``path`` are removed first. The caller decides
    beforehand whether an existing ``path`` may be replaced.

    Crash points (with ``point``): ``POINT.write`` before the body, ``POINT.rename`` /
    ``POINT.swap`` with the folder complete."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent)
    tmp = temp_name(target, suffix=False)
    tmp.mkdir()
    try:
        if point:
            crash_point(f"{point}.write")
        yield tmp
        for file in sorted(tmp.rglob("*")):
            if file.is_file() and not file.is_symlink():
                fsync_file(file)
        fsync_dir(tmp)
        replace_dir(tmp, target, point)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = [
    "atomic_dir",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "cache_dir",
    "crash_point",
    "fsync_dir",
    "fsync_file",
    "remove_stale_temps",
    "replace_dir",
    "sha256_file",
    "sync_all",
    "temp_name",
]
