"""One invocation per ``--out`` at a time: an exclusive lock on ``OUT/.lock``.

Two invocations writing the same folder at once overwrite each other's checkpoints, configs
and results (a run folder then mixes both). :func:`hold` takes the lock for the whole
invocation, or fails at once naming the process that holds it.

- With ``fcntl`` (Linux, macOS): ``flock`` on ``OUT/.lock``, held by the open file. The kernel
  releases it when the process ends, however it ends (``kill -9`` included), so a lock never
  outlives its run. The file stays (removing it would race with the next taker); it holds the
  holder's pid, for the message.
- Without (Windows): ``OUT/.lock`` created exclusively (``O_EXCL``), holding the pid, and
  removed on release. A file whose process is gone (killed before it could remove it), or that
  has held no pid for :data:`UNWRITTEN_GRACE_S`, is stale and taken over.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .errors import OptionsError, OutInUseError, first_line, make_folder

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
NO_FLOCK_NAME = ".lock.pid"
"""With fcntl, on a file system without ``flock``: the pid file (``.lock`` is the flock's)."""
UNWRITTEN_GRACE_S = 10.0
"""Without fcntl: a lock file that holds no pid yet is another run's, being written, for this
long; after that it is stale (its process died between creating and writing it)."""


def _in_use(out: Path, pid: int | None) -> OutInUseError:
    holder = f" (pid {pid})" if pid is not None else ""
    return OutInUseError(f"--out {out} is in use by another run{holder}; wait for it or choose "
                         "another --out")


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (without signalling it: on Windows ``os.kill`` would
    terminate it)."""
    if os.name == "nt":  # pragma: no cover - Windows only
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return kernel32.GetLastError() == 5  # access denied: it exists
        try:
            code = ctypes.c_ulong()
            if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
                return True
            return code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return False
    return True


def _cannot_lock(out: Path, error: OSError) -> OptionsError:
    return OptionsError(f"--out {out}: cannot create its lock file {LOCK_NAME} "
                        f"({first_line(error)})")


def _flock(out: Path) -> IO[str] | None:
    """``OUT/.lock`` open and ``flock``-ed, holding this pid; None where the file system has
    no ``flock`` (some network file systems: the pid file :data:`NO_FLOCK_NAME` is used
    instead)."""
    path = out / LOCK_NAME
    try:
        handle: IO[str] = open(path, "a+")  # held open for the lock's lifetime
    except OSError as error:
        raise _cannot_lock(out, error) from error
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise _in_use(out, _read_pid(path)) from None
    except OSError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _unflock(handle: IO[str]) -> None:
    try:
        handle.seek(0)
        handle.truncate()
        handle.flush()
    except OSError:
        pass
    finally:
        handle.close()  # releases the lock


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return float("inf")


@contextlib.contextmanager
def _pid_file(out: Path, name: str = LOCK_NAME) -> Iterator[None]:
    path = out / name
    for _ in range(10):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid = _read_pid(path)
            if pid is not None and pid_alive(pid):
                raise _in_use(out, pid) from None
            if pid is None and _age(path) < UNWRITTEN_GRACE_S:  # being written just now
                raise _in_use(out, None) from None
            if _read_pid(path) == pid:  # stale (and not just taken over by another run)
                path.unlink(missing_ok=True)
            continue
        except OSError as error:
            raise _cannot_lock(out, error) from error
        with os.fdopen(fd, "w") as handle:
            handle.write(str(os.getpid()))
        break
    else:
        raise _in_use(out, _read_pid(path))
    try:
        yield
    finally:
        if _read_pid(path) == os.getpid():
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def hold(out: str | os.PathLike[str]) -> Iterator[None]:
    """Create ``out`` if missing and hold its lock until the block ends; raise
    :class:`OutInUseError` at once if another process holds it, and
    :class:`~.errors.OptionsError` if ``out`` is not a folder that can be created."""
    out = Path(out)
    make_folder(out, "--out", OptionsError)
    handle = _flock(out) if fcntl is not None else None
    if handle is None:
        with _pid_file(out, LOCK_NAME if fcntl is None else NO_FLOCK_NAME):
            yield
        return
    try:
        yield
    finally:
        _unflock(handle)
