"""Building, caching, verifying and loading the native CPU kernels (``native_cpu.cpp``).

The source ships with the package. On first use it is compiled with the system C++ compiler
(``$CXX``, split as a shell splits it: ``ccache g++`` works; else ``c++``/``g++``/``clang++``)
with ``-O3 -march=native -fopenmp`` into a cache
directory (``$DYNLOSS_CACHE_DIR``, else ``$XDG_CACHE_HOME/dynloss``, else
``~/.cache/dynloss``). The file name hashes the source, the flags, the compiler and the CPU,
so a new version or another machine gets its own build. What makes it safe to share:

* **One build per machine and torch installation** (the link flags name that torch's
  OpenMP runtime by its path, so they are part of the key). A build holds a file lock;
  processes that start together (``torchrun`` ranks, DataLoader workers) wait for it and load
  the library it wrote.
* **Messages.** One line (on the ``dynloss`` logger, which prints warnings to stderr by
  default) when a build starts, one with the time it took (and the configuration, where a
  faster one failed), and one while waiting for another process's build (however many
  configurations it waits for). A configuration that fails says why and what is tried next
  in one line; the next ones that fail alike add none.
* **A compiler timeout** (``$DYNLOSS_NATIVE_BUILD_TIMEOUT`` seconds, default 300; the
  ``--version`` probe gets at most 60 s). A compiler that runs past it is killed with every
  process it started, and no other way to build is tried (each would wait as long again).
  So is one whose build is interrupted (Ctrl-C), or whose process a SIGTERM or SIGHUP with
  its default action ends (then the process ends by that signal, as it would have).
* **Verified cache.** Beside the library a ``.sha256`` file holds its checksum, written after
  a complete build; a library whose checksum does not match (truncated, zeroed, half-written
  by a crash) or whose ABI version differs is deleted and rebuilt, never loaded.
* **Failures remembered.** A failed build leaves a ``.failed`` note; for a day (a build that
  ran out of time or failed for the machine's state, a killed compiler, a full disk: 60
  seconds) other processes report the same failure (saying so, and which note to delete to
  retry sooner) instead of compiling again.
* **Loading.** A library that cannot be mapped where it is (a cache on a ``noexec`` file
  system) is loaded from a copy in the temporary directory (said once), not rebuilt; one that
  cannot be loaded anywhere is rebuilt once, then remembered like a failed build, and no
  other plan is tried; one that lacks the C++ runtime (a C compiler driver as ``$CXX``) is
  not rebuilt, and the failure says to set ``CXX`` to a C++ compiler; one that calls another
  OpenMP runtime's entry points (clang++'s code against torch's libgomp) is not rebuilt, and
  the next plan is tried. A rebuild says why in its start line.
* **One OpenMP runtime.** The kernels link against the OpenMP runtime that torch has already
  loaded into the process (found in ``/proc/self/maps``), not the system's, so there is one
  thread pool. Where that is not possible the system runtime is used, then
  ``-fopenmp-simd`` (one thread), then the compiler's baseline instruction set.

Set ``DYNLOSS_NATIVE=0`` to never build or load it.

Decision: the compiled library is not shipped in platform wheels. ``-march=native`` builds run
the kernels 1.3-2x faster than a portable baseline build would, the compiler is present on
the machines the project targets (Linux training boxes, CI), and the build happens once per
machine and CPU; a wheel would pin one instruction set for everyone.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..._warn import caller_stacklevel
from ._env import switched_on
from .abi import ABI_VERSION, FUNCTIONS, Args

__all__ = ["SOURCE", "library", "status"]

SOURCE = Path(__file__).with_name("native_cpu.cpp")
COMPILE_FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-std=c++17",
                 "-fPIC")
FAILURE_MEMORY_SECONDS = 86400.0
"""How long a failed build is reported from its note instead of being retried: a day (the
note's name holds the source, flags, compiler and CPU, so a change of any is a new build)."""
TIMEOUT_MEMORY_SECONDS = 60.0
"""How long a build that ran out of time, or failed for the machine's state (a compiler killed
by a signal, the OOM killer's; a full disk; exhausted memory), is remembered."""

# A compiler's words for a failure of the machine rather than of the build (gcc's driver
# exits 1, not by the signal, when the OOM killer ends cc1plus).
_MACHINE_FAILURE = re.compile(r"failed with signal|signal terminated program|"
                              r"No space left on device|"
                              r"Cannot allocate memory|virtual memory exhausted|out of memory",
                              re.IGNORECASE)

_LOG = logging.getLogger("dynloss")


@dataclass(frozen=True)
class Plan:
    """One way to build: compiler flags and what the link step adds."""

    compile_flags: tuple[str, ...]
    link_flags: tuple[str, ...]
    label: str


def cache_dir() -> Path:
    """Where compiled libraries are kept: ``$DYNLOSS_CACHE_DIR`` (``~`` expanded; a relative
    path from the working directory), else ``$XDG_CACHE_HOME/dynloss`` (when absolute, as the
    XDG specification asks), else ``~/.cache/dynloss``.

    Raises:
        RuntimeError: none is set and there is no home directory (no ``$HOME``, no passwd
            entry: an arbitrary-UID container), where ``~`` stayed a folder named ``~``.
    """
    given = os.environ.get("DYNLOSS_CACHE_DIR", "").strip()  # (as CXX: spaces are no name)
    if given:
        return Path(os.path.expanduser(given)).absolute()
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        home = os.path.expanduser("~")
        if not os.path.isabs(home):
            raise RuntimeError("no home directory to keep the native build in ($HOME is not "
                               "set): set DYNLOSS_CACHE_DIR to a writable directory")
        base = os.path.join(home, ".cache")
    return Path(base) / "dynloss"


_CXX_SAID: set[str] = set()


def compiler_command() -> list[str] | None:
    """The C++ compiler as a command: ``$CXX`` (a program, or else split as a shell splits it:
    a launcher and its compiler, ``ccache g++``, or a compiler with flags), its program found
    on ``PATH``; else the first of ``c++``, ``g++``, ``clang++`` found. A ``$CXX`` that names no
    program found is said (on the ``dynloss`` logger), and the others are tried."""
    wanted = os.environ.get("CXX", "").strip()
    whole = shutil.which(wanted) if wanted else None
    if whole:  # a program's path, spaces and all (``/opt/my tools/g++``, unquoted)
        return [whole]
    if wanted:
        try:
            words = shlex.split(wanted)
            problem = "names no program found"
        except ValueError as error:
            words, problem = [], f"cannot be split into words ({error})"
        found = shutil.which(words[0]) if words else None
        if found:
            return [found, *words[1:]]
        if wanted not in _CXX_SAID:  # once per value
            _CXX_SAID.add(wanted)
            _LOG.warning("dynloss: $CXX=%r %s; trying c++, g++ and clang++", wanted, problem)
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def compiler() -> str | None:
    """The command of :func:`compiler_command` as one string (None: no compiler found)."""
    command = compiler_command()
    return None if command is None else shlex.join(command)


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f if ln.startswith(("flags", "model name", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


_OPENMP = re.compile(r"/lib(gomp|omp|iomp5)[^/]*\.(so[^/]*|dylib)$")


def loaded_openmp_runtime() -> Path | None:
    """The OpenMP runtime torch uses in this process, or None (none mapped).

    The library that defines ``omp_get_max_threads`` as torch's own extension module finds
    it (among its dependencies, as the dynamic loader does); else the mapped runtime that lies
    in torch's package folder (or auditwheel's ``torch.libs``); else the first one mapped. Not
    simply the first in ``/proc/self/maps``: that list is ordered by address, and a runtime
    another package loaded later (scikit-learn's bundled libgomp) comes first."""
    mapped = _mapped_openmp_runtimes()
    if len(mapped) < 2:
        return mapped[0] if mapped else None
    torch_module = sys.modules.get("torch")
    extension = getattr(getattr(torch_module, "_C", None), "__file__", None)
    found = _defining_library(extension, "omp_get_max_threads") if extension else None
    same = [path for path in mapped if _same_file(found, path)] if found is not None else []
    if same:  # (named as the maps name it, as when it is the only one: the same cache key)
        return same[0]
    package = Path(getattr(torch_module, "__file__", "") or "/").resolve().parent
    torchs = (package, package.with_name("torch.libs"))  # (torch.libs: auditwheel's copies)
    inside = [path for path in mapped
              if any(path.resolve().is_relative_to(folder) for folder in torchs)]
    return (inside or mapped)[0]


def _mapped_openmp_runtimes() -> list[Path]:
    """The OpenMP runtimes in ``/proc/self/maps``, each once, in its (address) order."""
    mapped: list[Path] = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if _OPENMP.search(path) and os.path.exists(path) and Path(path) not in mapped:
                    mapped.append(Path(path))
    except OSError:
        pass
    return mapped


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def _defining_library(library: str, symbol: str) -> Path | None:
    """The file of the library that defines ``symbol`` for the loaded ``library`` (itself or
    one of its dependencies: ``dlsym`` on its handle, then ``dladdr``); None if not known.
    Loads nothing (``RTLD_NOLOAD``)."""
    try:
        handle = ctypes.CDLL(library, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        address = ctypes.cast(getattr(handle, symbol), ctypes.c_void_p).value
        info = _DlInfo()
        if not address or not ctypes.CDLL(None).dladdr(ctypes.c_void_p(address),
                                                       ctypes.byref(info)):
            return None
    except (OSError, AttributeError, TypeError, ValueError):
        return None
    return Path(os.fsdecode(info.dli_fname)) if info.dli_fname else None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _vector_flags() -> tuple[str, ...]:
    """``-mprefer-vector-width=512`` on x86 CPUs with AVX-512: the compilers default to 256-bit
    vectors there, and the kernels' polynomial exp/log run 1.3-1.8x faster at 512 bits."""
    if platform.machine().lower() in ("x86_64", "amd64") and " avx512f" in _cpu_signature():
        return ("-mprefer-vector-width=512",)
    return ()


def plans() -> list[Plan]:
    """The ways to build, fastest first."""
    native = (*COMPILE_FLAGS, *_vector_flags())
    result = []
    runtime = loaded_openmp_runtime()
    if runtime is not None:
        result.append(Plan((*native, "-fopenmp"),
                           (str(runtime), f"-Wl,-rpath,{runtime.parent}"),
                           f"OpenMP ({runtime.name}, the runtime torch loaded)"))
    result.append(Plan((*native, "-fopenmp"), ("-fopenmp",), "OpenMP (system runtime)"))
    # no OpenMP runtime (e.g. Apple clang): one thread, the simd loops still vectorised
    result.append(Plan((*native, "-fopenmp-simd"), (), "single-threaded (-fopenmp-simd)"))
    # nor -march=native: the compiler's baseline instruction set
    baseline = tuple(f for f in (*COMPILE_FLAGS, "-fopenmp-simd") if f != "-march=native")
    result.append(Plan(baseline, (), "single-threaded, baseline instruction set"))
    return result


def _key(plan: Plan, version: str) -> str:
    return hashlib.sha256(b"\0".join([
        SOURCE.read_bytes(), " ".join(plan.compile_flags + plan.link_flags).encode(),
        version.encode(), _cpu_signature().encode(), sys.platform.encode(),
        str(ABI_VERSION).encode(),
    ])).hexdigest()[:20]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verified(path: Path) -> bool:
    """Whether ``path`` is a complete build: its checksum file matches its bytes."""
    checksum = path.with_name(path.name + ".sha256")
    try:
        return path.stat().st_size > 0 and checksum.read_text().strip() == _sha256(path)
    except OSError:
        return False


def _discard(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".sha256")):
        with contextlib.suppress(OSError):
            p.unlink()


def _say_waiting(lock: Path) -> None:
    _LOG.warning("dynloss: waiting for another process that is compiling the native CPU "
                 "kernels (%s)", lock)


@contextlib.contextmanager
def _locked(lock: Path, waiting: Callable[[Path], None] = _say_waiting) -> Iterator[None]:
    """An exclusive lock on ``lock`` across processes (a no-op where ``fcntl`` is missing);
    ``waiting(lock)`` is called when another process holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(lock, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waiting(lock)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class BuildTimeout(RuntimeError):
    """The compiler ran past ``$DYNLOSS_NATIVE_BUILD_TIMEOUT``: no other plan is tried."""


class LoadFailure(RuntimeError):
    """A library built here, rebuilt once, still cannot be loaded (nor a copy of it in the
    temporary directory): no other plan is tried, each would be built and refused alike."""


_STOPPING = {"timeout": BuildTimeout, "load": LoadFailure}


def _raise_recent_failure(note: Path, compiler: str) -> None:
    """Raise the failure that ``note`` remembers, if it is younger than
    :data:`FAILURE_MEMORY_SECONDS` (:data:`TIMEOUT_MEMORY_SECONDS` for a build that ran out
    of time; a note from the future, another clock's, is stale), for
    a build that ran out of time, this process allows no more time than it had, and for a
    failure that names its compiler, ``compiler`` (the command) is that one."""
    try:
        data = json.loads(note.read_text())
        age = time.time() - float(data["time"])
        message = str(data["message"])
        kind = str(data.get("kind", ""))
        had = float(data.get("timeout", math.inf))
        failed_with = str(data.get("compiler", compiler))
    except (OSError, ValueError, KeyError, TypeError):
        return
    if (kind == "timeout" and _timeout() > had) or failed_with != compiler:
        return
    short = kind in ("timeout", "transient")
    if 0 <= age < (TIMEOUT_MEMORY_SECONDS if short else FAILURE_MEMORY_SECONDS):
        error = _STOPPING.get(kind, RuntimeError)
        how_long = (f"{TIMEOUT_MEMORY_SECONDS:.0f} s" if short else
                    f"a day: delete {note} to try again sooner")
        raise error(f"{message} (a build {age:.0f} s ago failed; not retried for {how_long})")


def _failure(error: BaseException) -> RuntimeError:
    """A failed build's ``error`` (from :func:`_run` or the file system) as the error a build
    raises: a :class:`BuildTimeout`, or a RuntimeError, marked ``transient`` where the machine's
    state caused it (an OSError, a compiler killed by a signal, no disk or memory left)."""
    if isinstance(error, BuildTimeout):
        return BuildTimeout(str(error))
    failure = RuntimeError(str(error))
    failure.transient = (isinstance(error, OSError) or getattr(error, "signalled", False)  # type: ignore[attr-defined]
                         or bool(_MACHINE_FAILURE.search(str(error))))
    return failure


def _remember_failure(note: Path, error: BaseException, compiler: str = "") -> None:
    """Write ``note``; ``compiler``: the failure is this compiler command's own (another one
    with the same ``--version``, clang++ after clang, shares the note's path)."""
    kind = next((k for k, cls in _STOPPING.items() if isinstance(error, cls)),
                "transient" if getattr(error, "transient", False) else "")
    data: dict[str, object] = {"time": time.time(), "message": str(error), "kind": kind}
    if kind == "timeout":
        data["timeout"] = _timeout()
    if compiler:
        data["compiler"] = compiler
    with contextlib.suppress(OSError):
        note.write_text(json.dumps(data))


_TIMEOUTS_SAID: set[str] = set()


def _timeout() -> float:
    """``$DYNLOSS_NATIVE_BUILD_TIMEOUT`` in seconds; 300 when unset, and when not a positive
    number (said)."""
    text = os.environ.get("DYNLOSS_NATIVE_BUILD_TIMEOUT", "").strip()
    if not text:
        return 300.0
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if 0 < value < math.inf:
        return value
    if text in _TIMEOUTS_SAID:
        return 300.0
    _TIMEOUTS_SAID.add(text)
    warnings.warn(f"dynloss: DYNLOSS_NATIVE_BUILD_TIMEOUT={text!r} is not a positive number of "
                  "seconds: the build gets 300", RuntimeWarning, stacklevel=caller_stacklevel())
    return 300.0


def _kill_group(process: subprocess.Popen) -> None:
    """Kill ``process`` and everything it started (a compiler driver's cc1plus, as)."""
    with contextlib.suppress(OSError):
        if hasattr(os, "killpg"):
            os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        process.kill()


class _Ended(BaseException):
    """A signal that ends the process (SIGTERM, SIGHUP) arrived while a compiler ran: the
    compiler's group is killed, the exception unwinds the build (its scratch folder removed,
    its lock released), then :func:`library` ends the process by the signal, as it would
    have."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_ENDING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP")
                        if hasattr(signal, name))


def _default_action(number: int) -> bool:
    """Whether signal ``number`` has its default action for the kernel, not only for Python:
    a handler installed in C (torch's DataLoader workers install one for SIGTERM) is not
    Python's, and ``signal.getsignal`` reports ``SIG_DFL`` for it. Asked with ``sigaction``
    (the handler is the first member of ``struct sigaction`` on Linux and macOS); where that
    cannot be asked, False (the handler is left alone)."""
    if signal.getsignal(number) != signal.SIG_DFL:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        action = ctypes.create_string_buffer(512)  # larger than any struct sigaction
        if libc.sigaction(number, None, action) != 0:
            return False
    except (OSError, AttributeError, TypeError):
        return False
    handler = ctypes.c_void_p.from_buffer(action).value
    return not handler  # SIG_DFL is 0


@contextlib.contextmanager
def _ended_with(process: subprocess.Popen) -> Iterator[None]:
    """While ``process`` runs in a session of its own (out of reach of the signals that stop
    this process's group: torchrun's, a job scheduler's), a SIGTERM or SIGHUP whose action is
    the default one (to end the process at once) kills it first, then raises :class:`_Ended`.
    A handler of the program's own, in Python or in C, is left alone; Python handles signals
    in the main thread only, so elsewhere nothing changes."""
    def ended(signum: int, frame: object) -> None:
        if process.returncode is None:
            _kill_group(process)
        raise _Ended(signum)

    replaced = {}
    if threading.current_thread() is threading.main_thread():
        for number in _ENDING_SIGNALS:
            with contextlib.suppress(ValueError, OSError):  # (another interpreter's thread)
                if _default_action(number):
                    replaced[number] = signal.signal(number, ended)
    try:
        yield
    finally:
        for number, handler in replaced.items():
            signal.signal(number, handler)


def _run(command: list[str], *, what: str | None = None, timeout: float | None = None,
         check: bool = True) -> str:
    """Run ``command`` in a process group of its own and return its stdout.

    Raises:
        BuildTimeout: it ran past ``timeout`` (default :func:`_timeout`); the group is killed.
        RuntimeError: it failed (with ``check``); the message ends with its stderr.
    """
    what = what or command[0]
    limit = _timeout() if timeout is None else timeout
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True)
    except OSError as error:
        raise RuntimeError(f"{what} could not be started: {error}") from None
    with process, _ended_with(process):
        try:
            stdout, stderr = process.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            process.wait()
            raise BuildTimeout(f"{what} did not finish within {limit:g} s "
                               "(DYNLOSS_NATIVE_BUILD_TIMEOUT)") from None
        except BaseException:  # Ctrl-C: the compiler's own session would outlive us
            _kill_group(process)
            raise
    if check and process.returncode != 0:
        said = stderr.strip()[-2000:]
        failed = RuntimeError(f"{what} failed: {said}" if said else
                              f"{what} failed with {_ending(process.returncode)} and printed "
                              "nothing")
        failed.signalled = process.returncode < 0  # type: ignore[attr-defined]
        raise failed
    return stdout


def _ending(returncode: int) -> str:
    """How a process ended, from its ``returncode`` (negative: the signal that killed it)."""
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-returncode).name}"
        return f"signal {-returncode}"
    return f"exit status {returncode}"


def _wrote(cxx: list[str], output: Path) -> None:
    """Raise where a compiler step that exited 0 left no ``output`` (``CXX=true``): the
    message names the file, not the scratch folder, so every configuration says it alike."""
    if not output.is_file():
        raise RuntimeError(f"{shlex.join(cxx)} exited with status 0 but wrote no {output.name}")


def _compile(cxx: list[str], plan: Plan, target: Path) -> None:
    """Compile and link ``SOURCE`` into ``target`` (written whole, then renamed)."""
    directory = target.parent
    with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as scratch:
        obj = Path(scratch) / "native_cpu.o"
        out = Path(scratch) / target.name
        _run([*cxx, *plan.compile_flags, "-c", str(SOURCE), "-o", str(obj)])
        _wrote(cxx, obj)
        _run([*cxx, "-shared", str(obj), *plan.link_flags, "-o", str(out)])
        _wrote(cxx, out)
        checksum = _sha256(out)
        os.replace(out, target)  # atomic: nobody ever sees half a library
    sidecar = target.with_name(target.name + ".sha256")
    tmp = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.tmp")
    tmp.write_text(checksum + "\n")
    os.replace(tmp, sidecar)


def _paths(plan: Plan, version: str) -> tuple[Path, Path]:
    """``(library, failure note)`` of ``plan`` in the cache."""
    directory, key = cache_dir(), _key(plan, version)
    return directory / f"native_cpu-{key}.so", directory / f"native_cpu-{key}.failed"


def _announce(cxx: list[str], plan: Plan, directory: Path, reason: str = "") -> None:
    """The start line; ``reason``: why a build that was cached is built again."""
    _LOG.warning("dynloss: compiling the native CPU kernels with %s, %s (once per machine "
                 "and environment; 20-50 s) into %s%s", shlex.join(cxx), plan.label,
                 directory, f"; rebuilding: {reason}" if reason else "")


def _build(cxx: list[str], plan: Plan, version: str,
           announce: Callable[[Plan, Path, str], None] | None = None,
           waiting: Callable[[Path], None] = _say_waiting, reason: str = "") -> Path:
    """The verified library for ``plan``: from the cache, or built now (once per machine and
    torch installation). ``announce(plan, directory, reason)`` is called before compiling
    (default: the start line; ``reason``: why a cached build is built again, this one or a
    damaged leftover's), ``waiting(lock)`` before waiting for another process's build
    (default: the waiting line); a failure raises, and the caller says it."""
    path, note = _paths(plan, version)
    directory = path.parent
    if verified(path):
        return path
    _raise_recent_failure(note, shlex.join(cxx))
    try:
        directory.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".lock").touch()
    except OSError as error:  # e.g. a read-only home
        raise OSError(f"cannot write to the cache directory {directory} ({error}); set "
                      "DYNLOSS_CACHE_DIR (or XDG_CACHE_HOME) to a writable directory") from error
    with _locked(path.with_suffix(".lock"), waiting):
        if verified(path):  # another process built it while this one waited
            return path
        _raise_recent_failure(note, shlex.join(cxx))
        if not reason and path.exists():
            reason = "the cached build did not match its checksum (damaged or half-written)"
        _discard(path)  # a corrupt or unverified leftover
        (announce or (lambda plan, where, why: _announce(cxx, plan, where, why)))(
            plan, directory, reason)
        start = time.perf_counter()
        try:
            _compile(cxx, plan, path)
        except (RuntimeError, OSError) as error:
            failure = _failure(error)
            failure.seconds = time.perf_counter() - start  # type: ignore[attr-defined]
            _remember_failure(note, failure)
            raise failure from None
        later = "" if plan == plans()[0] else f" ({plan.label})"  # a faster one failed
        _LOG.warning("dynloss: compiled the native CPU kernels in %.1f s%s",
                     time.perf_counter() - start, later)
        with contextlib.suppress(OSError):
            note.unlink()
    return path


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.dynloss_abi_version() != ABI_VERSION:
        raise RuntimeError("the compiled library has another ABI version")
    for name in FUNCTIONS:
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.POINTER(Args)]
        fn.restype = ctypes.c_int
    return lib


def _open_copy(path: Path, directory: Path) -> ctypes.CDLL:
    """Open a copy of ``path`` under a fresh name in ``directory`` (the copy is removed once
    mapped)."""
    handle, name = tempfile.mkstemp(prefix=".dynloss-load-", suffix=".so", dir=directory)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(path.read_bytes())
        return _open(Path(name))
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)


def _open_anywhere(path: Path) -> ctypes.CDLL:
    """Open ``path``; else a copy of it under a fresh name beside it (the dynamic loader hands
    back what it already mapped for a path, so a library rebuilt at the same path must be
    opened under another name); else a copy in the temporary directory (a cache directory on
    a file system that does not allow mapping code, ``noexec``: said once).

    Raises:
        LoadFailure: none of them could be opened; the message gives each reason.
    """
    def in_temporary() -> tuple[str, ctypes.CDLL]:
        # looked up only now: a read-only root file system has no temporary directory
        # (FileNotFoundError), which must not stop the cache's own library from loading
        temporary = Path(tempfile.gettempdir())
        if temporary.resolve() == path.parent.resolve():
            raise OSError("the temporary directory is the cache directory")
        return str(temporary), _open_copy(path, temporary)

    attempts = [lambda: ("", _open(path)), lambda: ("", _open_copy(path, path.parent)),
                in_temporary]
    errors = []
    for attempt in attempts:
        try:
            elsewhere, lib = attempt()
        except (OSError, RuntimeError, AttributeError) as error:
            errors.append(str(error))
            continue
        if elsewhere:
            _LOG.warning("dynloss: the native CPU kernels in %s could not be loaded there (%s; "
                         "a file system mounted noexec?); loaded a copy from %s instead (set "
                         "DYNLOSS_CACHE_DIR to a directory that allows it)", path.parent,
                         errors[0], elsewhere)
        return lib
    raise LoadFailure(f"{path} could not be loaded: {'; '.join(dict.fromkeys(errors))}")


# What a library needs from the C++ runtime (Itanium ABI names): type info and vtables of
# std classes, std functions, operator new/delete, exception support. A C compiler driver as
# $CXX (gcc, clang) compiles the .cpp as C++ but links without that runtime.
_CXX_RUNTIME_SYMBOL = re.compile(
    r"undefined symbol: ((?:_ZT[ISV]St|_ZNK?St|_ZSt|_ZTVN10__cxxabiv1|_Zn[wa][jm]|_Zd[la]Pv"
    r"|__cxa_|__gxx_personality_v0)\w*)")


# What code compiled with another compiler's -fopenmp calls in its runtime: LLVM's (clang)
# ``__kmpc_*``, GNU's (gcc) ``GOMP_*``.
_OPENMP_ENTRY = re.compile(r"undefined symbol: ((?:__kmpc_|GOMP_)\w*)")


def _first_undefined(symbols: re.Pattern[str], message: str) -> str:
    """The first of ``symbols`` that ``message`` (a loader's error) says is undefined."""
    found = symbols.search(message)
    return found.group(1) if found else ""


def _missing_openmp_entry(message: str) -> str:
    """The first OpenMP runtime entry point ``message`` says is undefined: the library was
    linked against a runtime its compiler's code does not call."""
    return _first_undefined(_OPENMP_ENTRY, message)


def _missing_cxx_runtime(message: str) -> str:
    """The first C++ runtime symbol ``message`` says is undefined."""
    return _first_undefined(_CXX_RUNTIME_SYMBOL, message)


_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_status: str | None = None  # None: not tried yet; "" loaded; else why not


def _after_fork_in_child() -> None:
    """A fork while another thread loaded the kernels left the child's copy of the lock held
    for ever (its first loss call hung): the child gets a new one, and loads them itself."""
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _disabled() -> bool:
    """Whether ``DYNLOSS_NATIVE`` turns the kernels off; a value that is neither on nor off
    (a typo: ``flase``) leaves them on and says so."""
    return not switched_on("DYNLOSS_NATIVE", "the native kernels stay on")


def _load() -> ctypes.CDLL:
    cxx = compiler_command()
    if cxx is None:
        wanted = os.environ.get("CXX", "").strip()
        raise RuntimeError(
            f"no C++ compiler found ($CXX={wanted!r} names no program found, and no c++, g++ "
            "or clang++ is on PATH: install one, or set CXX to one)" if wanted else
            "no C++ compiler found (no c++, g++ or clang++ on PATH: install one, or set CXX to "
            "one)")
    cache_dir()  # no cache directory to be had (no home): said once, not once per configuration
    version = _run([*cxx, "--version"], what=f"{shlex.join(cxx)} --version",
                   timeout=min(_timeout(), 60.0), check=False)
    if len(cxx) > 1:  # the words after the program in $CXX (flags, a launcher's compiler)
        version += "\n$CXX: " + shlex.join(cxx[1:])
    errors: list[str] = []
    said: list[str] = []  # "" once a build started here, then each failure said

    def announce(plan: Plan, directory: Path, reason: str) -> None:
        if not said:
            _announce(cxx, plan, directory, reason)
            said.append("")

    waited: list[Path] = []  # one line for this process, however many locks it waits for

    def waiting(lock: Path) -> None:
        if not waited:
            _say_waiting(lock)
        waited.append(lock)

    every = plans()
    for index, plan in enumerate(every):
        try:
            path = _build(cxx, plan, version, announce, waiting)
        except BuildTimeout as error:
            _say_failure(plan, error, said, 0)
            raise  # the next plan would wait as long again
        except LoadFailure:
            raise  # the next plan would be refused alike
        except RuntimeError as error:
            errors.append(str(error))
            _say_failure(plan, error, said, len(every) - index - 1)
            continue
        try:
            return _open_anywhere(path)
        except LoadFailure as error:
            runtime = _missing_cxx_runtime(str(error))
            openmp = _missing_openmp_entry(str(error))
            if openmp:  # built against a runtime the compiler's code does not call (clang++
                # and torch's libgomp): this configuration cannot work, the next may
                _discard(path)
                failure = RuntimeError(
                    f"{path} could not be loaded: undefined symbol: {openmp} (the compiler "
                    "calls another OpenMP runtime's entry points)")
                _remember_failure(_paths(plan, version)[1], failure, shlex.join(cxx))
                errors.append(str(failure))
                _LOG.warning("dynloss: the native CPU kernels built with %s cannot be loaded: "
                             "undefined symbol: %s (the compiler calls another OpenMP "
                             "runtime's entry points)%s", plan.label, openmp,
                             _trying(len(every) - index - 1))
                continue
            if runtime:  # a rebuild here would lack it alike: none now, said why; the library
                _discard(path)  # goes (another $CXX may share its key: the same --version)
                failure = LoadFailure(
                    f"{path} could not be loaded: undefined symbol: {runtime}; "
                    f"{shlex.join(cxx)} linked it without the C++ standard library (a C "
                    "compiler?): set CXX to a C++ compiler such as g++ or clang++")
                _remember_failure(_paths(plan, version)[1], failure, shlex.join(cxx))
                raise failure from None
            _discard(path)  # unloadable (damaged, another ABI): rebuilt once
            why = str(error).split(" could not be loaded: ", 1)[-1].splitlines()[0][:200]
        path = _build(cxx, plan, version, waiting=waiting,
                      reason=f"the cached build could not be loaded ({why})")
        try:
            return _open_anywhere(path)
        except LoadFailure as error:  # built here and still refused: where, not what
            _remember_failure(_paths(plan, version)[1], error)
            raise
    # the full-speed build's message says most
    raise RuntimeError(errors[0] + (f" ({len(errors)} configurations tried)"
                                    if len(errors) > 1 else ""))


def _say_failure(plan: Plan, error: BaseException, said: list[str], left: int) -> None:
    """One line for a configuration that failed to compile here (none for a failure another
    process's note remembers, nor for one like the last said) and what is tried next."""
    seconds = getattr(error, "seconds", None)
    first = (str(error).splitlines() or [""])[0][:300]
    if seconds is None or not said or first in said:
        return
    said.append(first)
    _LOG.warning("dynloss: compiling the native CPU kernels (%s) failed after %.1f s: %s%s",
                 plan.label, seconds, first, _trying(left))


def _trying(left: int) -> str:
    """What a failed configuration's line says comes next: the ``left`` ones still to try."""
    return f"; trying {left} other configuration{'s' if left > 1 else ''}" if left else ""


def library() -> ctypes.CDLL | None:
    """The loaded kernels (built on first call), or None; :func:`status` says why not."""
    global _library, _status
    if _status is not None:
        return _library
    with _lock:
        if _status is not None:
            return _library
        if _disabled():
            _status = f"disabled by DYNLOSS_NATIVE={os.environ.get('DYNLOSS_NATIVE', '').strip()}"
            return None
        try:
            lib = _load()
        except _Ended as ended:  # the compiler killed, its scratch folder removed: now the
            signal.raise_signal(ended.signum)  # signal's default action, as it would have
            raise
        except Exception as error:  # a missing or failing compiler must not break the library
            _status = (f"the native kernels could not be built or loaded: {error}"
                       if compiler() is not None else str(error))
            return None
        _library, _status = lib, ""
        return lib


def status() -> str:
    """``""`` when the kernels are loaded, else why not (builds them on first call)."""
    library()
    return _status or ""
