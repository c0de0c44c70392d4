"""The native build (``kernels/native/build.py``) in fresh processes, each with a cache
directory of its own (``DYNLOSS_CACHE_DIR``).

One real compile is shared: four processes start together on an empty cache
(:func:`concurrent_build`), a wrapper ``$CXX`` logs every compiler call, and the library they
build is copied into the caches of the other tests. Those use fake compilers (shell scripts)
that fail, hang, or hand out that library, so that each runs in a few seconds:

* four processes compile once and all load the result; the start and finish lines appear
  once on stderr;
* a cached library that is truncated, zeroed or empty fails its checksum, is rebuilt and
  loaded, and the process does not crash;
* a compiler that hangs hits ``DYNLOSS_NATIVE_BUILD_TIMEOUT``: the build stops there (no other
  plan waits as long again), its processes are killed, and the fallback says why;
* a failed build is remembered for a day, one that ran out of time for 60 s (no compiler
  call from the next process; the note names the message);
* ``backend="auto"`` warns once when the kernels cannot be built, not when they are disabled;
* one OpenMP runtime is mapped in the process after the kernels ran.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

import dynloss
from dynloss.kernels.native import build

SRC = str(Path(dynloss.__file__).resolve().parents[1])
REAL_CXX = build.compiler_command()  # the program, then any words $CXX adds
_REQUIRED = os.environ.get("DYNLOSS_REQUIRE_NATIVE") == "1"

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux builds only"),
    pytest.mark.skipif(REAL_CXX is None and not _REQUIRED, reason="no C++ compiler"),
]

START = "dynloss: compiling the native CPU kernels with"
FINISH = "dynloss: compiled the native CPU kernels in"
WAITING = "dynloss: waiting for another process that is compiling the native CPU kernels"
# The wrappers around the real compiler pass -O0 last (it wins over the build's -O3): these
# tests check how a build is run, locked, cached, loaded and reported, not the optimised code
# (every other test uses the real build), and -O0 compiles in 6 s where -O3 takes 45 s on a
# 2-vCPU CI machine.
UNOPTIMISED = "-O0"

# A process that loads the kernels (or says why not), computes a loss with them and reports.
REPORT = textwrap.dedent("""
    import json, sys, time, warnings
    start = time.perf_counter()
    import torch
    import dynloss.functional as F
    from dynloss.kernels import native_status
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = native_status()
        x = torch.linspace(-3, 3, 60).view(2, 1, 5, 6)
        t = (torch.arange(60).view(2, 1, 5, 6) % 3 == 0).float()
        auto = [F.dice_loss(x, t).item(), F.bce_loss(x, t).item(), F.dice_loss(x, t).item()]
        native = F.dice_loss(x, t, backend="native").item() if status == "" else None
    reference = F.dice_loss(x, t, backend="reference").item()
    print(json.dumps({"status": status, "native": native, "reference": reference,
                      "auto": auto, "seconds": time.perf_counter() - start,
                      "warnings": [[w.category.__name__, str(w.message)] for w in caught]}))
""")


def _environment(cache: Path, cxx: Path | str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DYNLOSS_NATIVE", "DYNLOSS_NATIVE_BUILD_TIMEOUT", "CXX")}
    env.update(PYTHONPATH=SRC, DYNLOSS_CACHE_DIR=str(cache), **extra)
    if cxx is not None:
        env["CXX"] = str(cxx)
    return env


def _start(cache: Path, cxx, code: str = REPORT, **extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], env=_environment(cache, cxx, **extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen, timeout: float = 240) -> tuple[dict, str]:
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr
    return json.loads(stdout.strip().splitlines()[-1]), stderr


def _report(cache: Path, cxx, **extra: str) -> tuple[dict, str]:
    return _finish(_start(cache, cxx, **extra))


def _script(path: Path, body: str) -> Path:
    """An executable shell script (a fake or wrapping compiler) that logs every call."""
    log = path.with_suffix(".log")
    path.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n{textwrap.dedent(body)}')
    path.chmod(0o755)
    return path


def _calls(script: Path) -> list[str]:
    log = script.with_suffix(".log")
    return log.read_text().splitlines() if log.exists() else []


def _compiles(script: Path) -> list[str]:
    return [c for c in _calls(script) if " -c " in f" {c} "]


def _libraries(cache: Path) -> list[Path]:
    return sorted(cache.glob("native_cpu-*.so"))


def test_the_kernels_are_built_here_or_say_why():
    """CI sets ``DYNLOSS_REQUIRE_NATIVE=1``: there a broken build fails this test
    (``test_kernels_native.py`` is skipped as a whole when the kernels are not built, so the
    requirement lives here). Elsewhere the kernels compute the reference's value, or the
    status says why they do not."""
    import torch

    import dynloss.functional as F
    from dynloss.kernels import native_status

    status = native_status()
    if _REQUIRED:
        assert status == ""
    if status:
        assert status.startswith(("disabled by DYNLOSS_NATIVE=0", "no C++ compiler found",
                                  "the native kernels could not be built or loaded: ")), status
        return
    x = torch.linspace(-3, 3, 60).view(2, 1, 5, 6).requires_grad_(True)
    t = (torch.arange(60).view(2, 1, 5, 6) % 3 == 0).float()
    loss = F.dice_loss(x, t)  # "auto" takes the kernels
    assert type(loss.grad_fn).__name__ == "NativeRegionLossBackward"
    torch.testing.assert_close(loss, F.dice_loss(x, t, backend="reference"), rtol=1e-6, atol=0)


# ----------------------------------------------------------------- one real build, shared
@pytest.fixture(scope="module")
def concurrent_build(tmp_path_factory):
    """Four processes that start together on an empty cache, through a logging ``$CXX``."""
    root = tmp_path_factory.mktemp("concurrent")
    log = root / "c++.log"  # the calls _script's wrapper logs
    # the compile waits (at most 60 s) until all four have asked for --version, which each
    # does before it takes the lock: the other three find the build under way
    cxx = _script(root / "c++", f"""
        case "$*" in *" -c "*)
          i=0
          while [ "$(grep -c -- --version "{log}")" -lt 4 ] && [ $i -lt 600 ]; do
            sleep 0.1; i=$((i + 1))
          done ;;
        esac
        exec {shlex.join(REAL_CXX)} "$@" {UNOPTIMISED}
    """)
    cache = root / "cache"
    processes = [_start(cache, cxx) for _ in range(4)]
    results = [_finish(p) for p in processes]
    return {"cxx": cxx, "cache": cache, "results": results}


@pytest.fixture
def built_cache(concurrent_build, tmp_path) -> Path:
    """A fresh cache directory holding a copy of the built library and its checksum."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (library,) = _libraries(concurrent_build["cache"])
    for path in (library, library.with_name(library.name + ".sha256")):
        shutil.copy2(path, cache / path.name)
    return cache


def test_four_processes_compile_once_and_all_load_it(concurrent_build):
    cxx, cache = concurrent_build["cxx"], concurrent_build["cache"]
    compiles = _compiles(cxx)
    links = [c for c in _calls(cxx) if c.startswith("-shared ")]
    assert len(compiles) == 1, _calls(cxx)
    assert len(links) == 1, _calls(cxx)
    assert _calls(cxx).count("--version") == 4
    (library,) = _libraries(cache)
    assert build.verified(library)
    for report, _ in concurrent_build["results"]:
        assert report["status"] == ""
        assert report["native"] == pytest.approx(report["reference"], rel=1e-6)
        assert report["warnings"] == []  # "auto" used the kernels: nothing to say


def test_start_and_finish_lines_appear_once(concurrent_build):
    lines = [line for _, stderr in concurrent_build["results"] for line in stderr.splitlines()]
    assert sum(line.startswith(START) for line in lines) == 1, lines
    assert sum(line.startswith(FINISH) for line in lines) == 1, lines
    # the others waited (each said so once) or found the library built; nothing else is said
    assert all(line.startswith((START, FINISH, WAITING)) for line in lines), lines
    for _, stderr in concurrent_build["results"]:
        assert stderr.count(WAITING) <= 1
    assert sum(line.startswith(WAITING) for line in lines) >= 1, lines  # the lock was taken


# ------------------------------------------------------------------------ a corrupted cache
def _handing_out(tmp_path: Path, good: Path) -> Path:
    """A fake ``$CXX`` whose builds (compile, then link) produce a copy of ``good``, and whose
    ``--version`` is the real compiler's (so that the cache keys match the real build's)."""
    real_version = subprocess.run([*REAL_CXX, "--version"], capture_output=True, text=True,
                                  check=True).stdout
    version = tmp_path / "version.txt"
    version.write_text(real_version)
    return _script(tmp_path / "c++", f"""
        for a in "$@"; do out="$a"; done  # the last argument is the output
        case "$*" in
          --version) cat "{version}" ;;
          *" -c "*) : > "$out" ;;
          -shared*) cp "{good}" "$out" ;;
        esac
    """)


def _refusing_to_load(where: str,
                      reason: str = "failed to map segment from shared object") -> str:
    """REPORT in a process whose dynamic loader refuses libraries ``where`` ("cache": in the
    cache directory, as on a file system mounted noexec; "anywhere") for ``reason``."""
    return textwrap.dedent(f"""
        from pathlib import Path
        from dynloss.kernels.native import build
        real = build._open
        def refusing(path):
            if {where!r} == "anywhere" or Path(path).parent == build.cache_dir():
                raise OSError(f"{{path}}: {reason}")
            return real(path)
        build._open = refusing
    """) + REPORT


def _corrupt(library: Path, kind: str) -> None:
    data = library.read_bytes()
    library.write_bytes({"truncated": data[: len(data) // 2], "zeroed": bytes(len(data)),
                         "empty": b""}[kind])


@pytest.mark.parametrize("kind", ["truncated", "zeroed", "empty"])
def test_a_corrupted_library_is_detected_and_never_loaded(built_cache, kind):
    (library,) = _libraries(built_cache)
    assert build.verified(library)
    _corrupt(library, kind)
    assert not build.verified(library)
    library.unlink()  # a checksum with no library
    assert not build.verified(library)


@pytest.mark.parametrize("kind", ["truncated", "zeroed", "empty"])
def test_a_corrupted_library_is_rebuilt(concurrent_build, built_cache, tmp_path, kind):
    """The rebuild runs the whole path (lock, compile, checksum, load) with a compiler that
    hands out the good library; the corrupted one is never loaded, the process lives."""
    (library,) = _libraries(built_cache)
    good = tmp_path / "good.so"
    shutil.copy2(library, good)
    _corrupt(library, kind)
    cxx = _handing_out(tmp_path, good)
    report, stderr = _report(built_cache, cxx)
    assert report["status"] == ""
    assert report["native"] == pytest.approx(report["reference"], rel=1e-6)
    assert len(_compiles(cxx)) == 1
    assert stderr.count(START) == 1 and stderr.count(FINISH) == 1
    # the start line says why a build that was cached is built again (it said only "once per
    # machine", as on a first run: found by a review of the native build)
    (start,) = [line for line in stderr.splitlines() if line.startswith(START)]
    assert start.endswith("; rebuilding: the cached build did not match its checksum (damaged "
                          "or half-written)"), start
    assert _libraries(built_cache) == [library] and build.verified(library)
    assert library.read_bytes() == good.read_bytes()


# ---------------------------------------------------------------------------- the timeout
def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _hanging(tmp_path: Path) -> tuple[Path, Path]:
    """A fake ``$CXX`` that answers ``--version`` and otherwise waits for a child of its own
    (``sleep 60``), whose pid it writes to the file returned second."""
    pids = tmp_path / "pids"
    cxx = _script(tmp_path / "c++", f"""
        case "$*" in --version) echo "hanging compiler 1.0"; exit 0 ;; esac
        sleep 60 &
        echo $! >> "{pids}"
        wait
    """)
    return cxx, pids


def test_a_hanging_compiler_hits_the_timeout_and_is_killed(tmp_path):
    cxx, pids = _hanging(tmp_path)
    start = time.perf_counter()
    report, _ = _report(tmp_path / "cache", cxx, DYNLOSS_NATIVE_BUILD_TIMEOUT="2")
    elapsed = time.perf_counter() - start
    why = "did not finish within 2 s (DYNLOSS_NATIVE_BUILD_TIMEOUT)"
    assert why in report["status"]
    # one attempt: the other plans (no OpenMP, baseline) would wait as long again
    assert len(_compiles(cxx)) == 1, _calls(cxx)
    assert elapsed < 30, elapsed
    # the compiler's own processes were killed with it
    (pid,) = (int(p) for p in pids.read_text().split())
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)
    # and backend="auto" says why it falls back, once
    (warning,) = report["warnings"]
    assert warning[0] == "RuntimeWarning" and why in warning[1]
    assert "backend='auto' cannot use the native kernels" in warning[1]
    # the next process within 60 s does not wait again
    report, _ = _report(tmp_path / "cache", cxx, DYNLOSS_NATIVE_BUILD_TIMEOUT="2")
    assert why in report["status"] and len(_compiles(cxx)) == 1


def test_a_compiler_that_hangs_on_everything_is_bounded_by_the_timeout(tmp_path):
    cxx = _script(tmp_path / "c++", "exec sleep 60\n")
    start = time.perf_counter()
    report, _ = _report(tmp_path / "cache", cxx, DYNLOSS_NATIVE_BUILD_TIMEOUT="2")
    assert time.perf_counter() - start < 30
    assert "--version did not finish within 2 s (DYNLOSS_NATIVE_BUILD_TIMEOUT)" in (
        report["status"])
    assert _compiles(cxx) == []


# ---------------------------------------------------------------------- failures remembered
FAILING = """
    case "$*" in --version) echo "failing compiler 1.0"; exit 0 ;; esac
    echo "fake compiler: no" >&2
    exit 1
"""


def test_a_failed_build_is_remembered(tmp_path):
    cxx = _script(tmp_path / "c++", FAILING)
    cache = tmp_path / "cache"
    first, _ = _report(cache, cxx)
    attempts = len(_compiles(cxx))
    assert attempts == len(build.plans())  # every plan was tried once
    assert "could not be built or loaded" in first["status"]
    assert "fake compiler: no" in first["status"]
    notes = sorted(cache.glob("*.failed"))
    assert len(notes) == attempts
    for note in notes:
        assert "fake compiler: no" in json.loads(note.read_text())["message"]
    second, second_err = _report(cache, cxx)
    assert len(_compiles(cxx)) == attempts  # no compiler call from the second process
    assert _calls(cxx).count("--version") == 2
    assert "fake compiler: no" in second["status"]
    assert "not retried" in second["status"]
    assert START not in second_err  # no build started, nothing announced


def test_a_broken_compiler_says_so_in_two_lines(tmp_path):
    """Each of the four build configurations announced itself and its failure: nine lines
    for one broken compiler. Now one line starts the build and one gives the failure and what
    is tried next; configurations that fail alike add nothing."""
    cxx = _script(tmp_path / "c++", FAILING)
    report, stderr = _report(tmp_path / "cache", cxx)
    assert len(_compiles(cxx)) == len(build.plans())
    lines = stderr.splitlines()
    first = build.plans()[0].label
    assert lines[0].startswith(f"{START} {cxx}, {first} (once per machine"), lines
    more = len(build.plans()) - 1
    assert lines[1:] == [
        f"dynloss: compiling the native CPU kernels ({first}) failed after "
        f"{lines[1].split('failed after ')[1].split(' s:')[0]} s: {cxx} failed: fake compiler: "
        f"no; trying {more} other configuration{'s' if more > 1 else ''}"], lines
    assert report["status"].endswith(f"({len(build.plans())} configurations tried)")


def test_a_process_that_waits_through_every_failing_configuration_says_so_once(tmp_path):
    """Two processes start together (torchrun ranks) with a compiler that fails: the one that
    waited for the other's build said it waited once per configuration (a lock each), four
    lines where the module promises one. Found by a review."""
    log = tmp_path / "c++.log"
    cxx = _script(tmp_path / "c++", f"""
        case "$*" in --version) echo "slowly failing compiler 1.0"; exit 0 ;; esac
        i=0
        while [ "$(grep -c -- --version "{log}")" -lt 2 ] && [ $i -lt 600 ]; do
          sleep 0.1; i=$((i + 1))
        done
        sleep 1.5
        echo "fake compiler: no" >&2
        exit 1
    """)
    processes = [_start(tmp_path / "cache", cxx) for _ in range(2)]
    waited = [stderr.count(WAITING) for _, stderr in (_finish(p) for p in processes)]
    assert len(_compiles(cxx)) == len(build.plans())  # each configuration failed once
    assert max(waited) == 1 and sum(waited) >= 1, waited


def test_a_compiler_that_fails_without_a_word_is_said_to_by_its_exit_status(tmp_path):
    """``CXX=false``: the failure read "/usr/bin/false failed: " and gave no reason."""
    cxx = _script(tmp_path / "c++", """
        case "$*" in --version) echo "silent compiler 1.0"; exit 0 ;; esac
        exit 3
    """)
    report, stderr = _report(tmp_path / "cache", cxx)
    assert f"{cxx} failed with exit status 3 and printed nothing" in report["status"]
    assert len(stderr.splitlines()) == 2, stderr  # the start, one failure: the others alike


def test_a_compiler_that_succeeds_without_writing_its_output_says_so(tmp_path):
    """``CXX=true`` exits 0 and writes nothing: the failure named a missing file in a random
    scratch folder (gone by then), one line per configuration since no two were alike."""
    cxx = _script(tmp_path / "c++", """
        case "$*" in --version) echo "idle compiler 1.0"; exit 0 ;; esac
        exit 0
    """)
    report, stderr = _report(tmp_path / "cache", cxx)
    assert f"{cxx} exited with status 0 but wrote no native_cpu.o" in report["status"]
    assert ".build-" not in report["status"]
    assert len(stderr.splitlines()) == 2, stderr
    assert len(_compiles(cxx)) == len(build.plans())


def test_a_later_configuration_that_builds_says_which(tmp_path):
    """A compiler without OpenMP: the single-threaded build works, and the finish line says
    it is the one in use."""
    assert REAL_CXX is not None
    cxx = _script(tmp_path / "c++", f"""
        case "$*" in *"-fopenmp "*|*-fopenmp) echo "no omp.h" >&2; exit 1 ;; esac
        exec {' '.join(REAL_CXX)} "$@" {UNOPTIMISED}
    """)
    report, stderr = _report(tmp_path / "cache", cxx)
    assert report["status"] == ""
    lines = stderr.splitlines()
    assert len(lines) == 3, lines
    assert "failed after" in lines[1] and lines[1].endswith("no omp.h; trying "
                                                           f"{len(build.plans()) - 1} other "
                                                           "configurations")
    assert lines[2].startswith(FINISH) and lines[2].endswith(
        "(single-threaded (-fopenmp-simd))"), lines


def _fail_once(tmp_path: Path, note_age: float) -> tuple[int, int]:
    """Compiler calls of a build with a failure note ``note_age`` seconds old (negative: a
    note from the future, e.g. another machine's clock), before and after."""
    cxx = _script(tmp_path / "c++", FAILING)
    plan = build.plans()[-1]
    version = "failing compiler 1.0\n"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DYNLOSS_CACHE_DIR", str(tmp_path / "cache"))
        with pytest.raises(RuntimeError, match="fake compiler: no"):
            build._build([str(cxx)], plan, version)
        (note,) = (tmp_path / "cache").glob("*.failed")
        data = json.loads(note.read_text())
        note.write_text(json.dumps(dict(data, time=time.time() - note_age)))
        before = len(_compiles(cxx))
        with pytest.raises(RuntimeError, match="fake compiler: no"):
            build._build([str(cxx)], plan, version)
    return before, len(_compiles(cxx))


@pytest.mark.parametrize(("age", "retried"), [(30.0, False), (3600.0, False), (86401.0, True),
                                            (-3600.0, True)],
                         ids=["recent", "an-hour-old", "expired", "from-the-future"])
def test_a_failure_note_is_trusted_for_a_day(tmp_path, age, retried):
    """A failed configuration was retried by every process started more than 60 s after it
    failed: each paid the failing compile again (30 s a process, where a slower configuration
    was cached and loaded after it; found by a review of the native build). A failure is the
    compiler's, the flags' and the source's (all in the note's name): remembered for a day."""
    before, after = _fail_once(tmp_path, age)
    assert after == before + (1 if retried else 0)


@pytest.mark.parametrize(("age", "trusted"), [(30.0, True), (61.0, False)])
def test_a_timed_out_build_is_trusted_for_60_seconds(monkeypatch, tmp_path, age, trusted):
    """A build that ran out of time may have met a busy machine: tried again after 60 s."""
    note = tmp_path / "x.failed"
    build._remember_failure(note, build.BuildTimeout("the compiler ran past 300 s"))
    note.write_text(json.dumps(dict(json.loads(note.read_text()), time=time.time() - age)))
    if trusted:
        with pytest.raises(build.BuildTimeout, match="not retried for 60 s"):
            build._raise_recent_failure(note, "c++")
    else:
        build._raise_recent_failure(note, "c++")


@pytest.mark.parametrize("message", [
    "c++ failed with signal SIGKILL and printed nothing",
    "c++ failed: c++: fatal error: Killed signal terminated program cc1plus",
    "c++ failed: /tmp/x.o: No space left on device",
    "c++ failed: virtual memory exhausted: Cannot allocate memory",
])
def test_a_failure_of_the_machine_is_remembered_for_60_seconds(tmp_path, message):
    """A compiler killed by a signal (the OOM killer), a full disk or exhausted memory is the
    machine's state, not the build's: remembered for a day, they kept the full-speed build
    away for a day (found by a review of the change). Trusted for 60 s, as a timeout."""
    note = tmp_path / "x.failed"
    build._remember_failure(note, build._failure(RuntimeError(message)))
    data = json.loads(note.read_text())
    assert data["kind"] == "transient"
    note.write_text(json.dumps(dict(data, time=time.time() - 30)))
    with pytest.raises(RuntimeError, match="not retried for 60 s"):
        build._raise_recent_failure(note, "")
    note.write_text(json.dumps(dict(data, time=time.time() - 61)))
    build._raise_recent_failure(note, "")
    build._remember_failure(note, build._failure(OSError(28, "No space left on device")))
    assert json.loads(note.read_text())["kind"] == "transient"
    build._remember_failure(note, build._failure(RuntimeError("c++ failed: no omp.h")))
    assert json.loads(note.read_text())["kind"] == ""


def test_a_remembered_failure_says_how_to_retry_sooner(tmp_path):
    note = tmp_path / "x.failed"
    build._remember_failure(note, RuntimeError("fake compiler: no"))
    with pytest.raises(RuntimeError) as caught:
        build._raise_recent_failure(note, "")
    assert str(caught.value).startswith("fake compiler: no (a build 0 s ago failed; not retried "
                                        f"for a day: delete {note} to try again sooner)")



@pytest.mark.parametrize(("failed_under", "now", "trusted"), [
    ("1", "300", False), ("300", "300", True), ("300", "1", True)])
def test_a_timed_out_build_is_retried_by_a_process_with_more_time(monkeypatch, tmp_path,
                                                                  failed_under, now, trusted):
    """A build killed at DYNLOSS_NATIVE_BUILD_TIMEOUT=1 kept a process that allows 300 s from
    building for 60 s (it used the torch backend instead). Found by a review."""
    note = tmp_path / "x.failed"
    monkeypatch.setenv("DYNLOSS_NATIVE_BUILD_TIMEOUT", failed_under)
    build._remember_failure(note, build.BuildTimeout("the compiler ran past 1 s"))
    monkeypatch.setenv("DYNLOSS_NATIVE_BUILD_TIMEOUT", now)
    if trusted:
        with pytest.raises(build.BuildTimeout, match="not retried for 60 s"):
            build._raise_recent_failure(note, "c++")
    else:
        build._raise_recent_failure(note, "c++")


# ------------------------------------------------------------------------------ the fallback
def test_auto_warns_once_when_the_kernels_cannot_be_built(tmp_path):
    cxx = _script(tmp_path / "c++", FAILING)
    report, _ = _report(tmp_path / "cache", cxx)
    (warning,) = report["warnings"]  # three "auto" calls, one warning
    assert warning[0] == "RuntimeWarning"
    assert warning[1].startswith("dynloss: backend='auto' cannot use the native kernels (the "
                                 "native kernels could not be built or loaded: ")
    assert "fake compiler: no" in warning[1]
    assert warning[1].endswith("); falling back to a slower backend")
    assert report["auto"][0] == pytest.approx(report["reference"], rel=1e-6)


@pytest.mark.parametrize("value", ["0", "off"])
def test_auto_does_not_warn_when_the_kernels_are_disabled(tmp_path, value):
    """The status names the value that switched them off (it said "=0" for "off")."""
    cxx = _script(tmp_path / "c++", FAILING)
    report, stderr = _report(tmp_path / "cache", cxx, DYNLOSS_NATIVE=value)
    assert report["status"] == f"disabled by DYNLOSS_NATIVE={value}"
    assert report["warnings"] == []
    assert _calls(cxx) == [] and stderr == ""


# ---------------------------------------------------------------------------------- OpenMP
OPENMP = textwrap.dedent("""
    import json, os, re
    import torch
    import dynloss.functional as F
    from dynloss.kernels import native_status

    def runtimes():
        found = set()
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split(maxsplit=5)[-1].strip()
                if re.search(r"/lib(gomp|omp|iomp5)[^/]*\\.so", path):
                    found.add(os.path.realpath(path))
        return sorted(found)

    before = runtimes()
    assert native_status() == "", native_status()
    torch.set_num_threads(2)
    x = torch.randn(4, 3, 64, 64)
    t = torch.randint(0, 3, (4, 64, 64))
    F.dice_loss(x, t, mode="multiclass", backend="native")
    print(json.dumps({"before": before, "after": runtimes()}))
""")


def test_one_openmp_runtime_after_the_kernels_ran(concurrent_build, built_cache):
    report, _ = _finish(_start(built_cache, concurrent_build["cxx"], code=OPENMP))
    assert len(report["after"]) == 1, report
    assert report["after"] == report["before"]  # torch's own runtime, no second one


# ------------------------------------------------------------- a library that cannot be loaded
def test_a_cache_on_a_noexec_file_system_loads_a_copy_without_rebuilding(built_cache, tmp_path):
    """A cache directory whose files cannot be mapped (mounted noexec): each of the four plans
    was built twice per process (compiled, refused, deleted, rebuilt, refused), a minute or
    more per process, then the torch fallback. Found by a review; simulated here by a loader
    that refuses the cache directory."""
    (library,) = _libraries(built_cache)
    cxx = _handing_out(tmp_path, library)
    report, stderr = _finish(_start(built_cache, cxx, code=_refusing_to_load("cache")))
    assert report["status"] == ""
    assert report["native"] == pytest.approx(report["reference"], rel=1e-6)
    assert _compiles(cxx) == []
    assert stderr.count("could not be loaded there") == 1
    assert f"loaded a copy from {tempfile.gettempdir()}" in stderr
    assert _libraries(built_cache) == [library] and build.verified(library)


def test_a_library_that_never_loads_is_rebuilt_once_and_remembered(built_cache, tmp_path):
    (library,) = _libraries(built_cache)
    good = tmp_path / "good.so"
    shutil.copy2(library, good)
    cxx = _handing_out(tmp_path, good)
    first, stderr = _finish(_start(built_cache, cxx, code=_refusing_to_load("anywhere")))
    assert "could not be loaded" in first["status"]
    assert len(_compiles(cxx)) == 1  # one rebuild; no other plan (each would be refused)
    assert stderr.count(START) == 1
    (start,) = [line for line in stderr.splitlines() if line.startswith(START)]
    assert "; rebuilding: the cached build could not be loaded (" in start, start
    notes = sorted(built_cache.glob("*.failed"))
    assert len(notes) == 1 and json.loads(notes[0].read_text())["kind"] == "load"
    second, second_err = _finish(_start(built_cache, cxx, code=_refusing_to_load("anywhere")))
    assert len(_compiles(cxx)) == 1 and START not in second_err
    assert "not retried" in second["status"]




def test_a_library_that_needs_another_openmp_runtime_tries_the_next_configuration(
        built_cache, tmp_path):
    """clang++ builds the first configuration against the libgomp torch loaded, and the loader
    refuses it for clang's own OpenMP entry points (``undefined symbol:
    __kmpc_for_static_init_8``): the same configuration was rebuilt, refused again, and no
    other was tried, so clang++ users never had the kernels (found by a review of the native
    build). The next configuration is tried now, without a rebuild, and the refusal is
    remembered, so the next process loads the configuration that worked."""
    (library,) = _libraries(built_cache)
    good = tmp_path / "good.so"
    shutil.copy2(library, good)
    cxx = _handing_out(tmp_path, good)
    code = textwrap.dedent(f"""
        from pathlib import Path
        from dynloss.kernels.native import build
        real = build._open_anywhere
        def refusing(path):
            if Path(path).name == {library.name!r}:
                raise build.LoadFailure(f"{{path}} could not be loaded: {{path}}: undefined "
                                        "symbol: __kmpc_for_static_init_8")
            return real(path)
        build._open_anywhere = refusing
    """) + REPORT
    first, stderr = _finish(_start(built_cache, cxx, code=code))
    assert first["status"] == "", first["status"]
    assert first["native"] == pytest.approx(first["reference"], rel=1e-6)
    assert len(_compiles(cxx)) == 1  # the next configuration only: no rebuild of the first
    lines = stderr.splitlines()
    first_plan, second_plan = build.plans()[:2]
    assert lines[0] == (
        f"dynloss: the native CPU kernels built with {first_plan.label} cannot be loaded: "
        "undefined symbol: __kmpc_for_static_init_8 (the compiler calls another OpenMP "
        f"runtime's entry points); trying {len(build.plans()) - 1} other configurations"), lines
    assert lines[1].startswith(START) and lines[2].startswith(FINISH)
    assert lines[2].endswith(f"({second_plan.label})") and len(lines) == 3, lines
    assert not library.exists()
    second, second_err = _finish(_start(built_cache, cxx, code=code))
    assert second["status"] == "" and len(_compiles(cxx)) == 1 and second_err == ""


def _another_openmp_runtime() -> str | None:
    """A system OpenMP runtime that is not the one torch loaded (another file), if any."""
    import glob

    torch_runtime = build.loaded_openmp_runtime()
    for path in sorted(glob.glob("/usr/lib*/lib*omp*.so*") + glob.glob("/usr/lib/*/lib*omp*.so*")):
        if (build._OPENMP.search(path) and torch_runtime is not None
                and os.path.realpath(path) != os.path.realpath(torch_runtime)):
            return path
    return None


@pytest.mark.skipif(_another_openmp_runtime() is None, reason="no second OpenMP runtime here")
def test_the_runtime_linked_is_torchs_also_after_another_was_loaded():
    """The runtime was the first OpenMP library in /proc/self/maps, which is ordered by
    address, not by load: after `import torch` another package's runtime (scikit-learn's
    bundled libgomp) came first, and the kernels were rebuilt against it, a second thread
    pool, under a line that called it "the runtime torch loaded". Found by a review."""
    code = textwrap.dedent(f"""
        import ctypes, torch
        from dynloss.kernels.native import build
        before = build.loaded_openmp_runtime()
        ctypes.CDLL({_another_openmp_runtime()!r})
        for line in (before, build.loaded_openmp_runtime(), build.plans()[0].label):
            print(line)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": SRC}, check=True).stdout
    before, after, label = out.strip().splitlines()
    assert after == before, out
    import torch

    assert Path(before).resolve().is_relative_to(Path(torch.__file__).resolve().parents[1]), out
    assert f"OpenMP ({Path(before).name}, the runtime torch loaded)" == label


def test_without_dladdr_the_runtime_in_torchs_own_folders_is_taken(monkeypatch, tmp_path):
    """The fallback took any runtime under site-packages (scikit-learn's too) as torch's."""
    import torch

    package = Path(torch.__file__).resolve().parent
    other = package.parent / "scikit_learn.libs" / "libgomp-e985bcbb.so.1.0.0"
    for torchs in (package / "lib" / "libgomp.so.1", package.parent / "torch.libs" / "libgomp.so"):
        monkeypatch.setattr(build, "_mapped_openmp_runtimes", lambda t=torchs: [other, t])
        monkeypatch.setattr(build, "_defining_library", lambda *args: None)
        assert build.loaded_openmp_runtime() == torchs


def test_a_library_linked_without_the_cxx_runtime_says_to_set_cxx(built_cache, tmp_path):
    """``CXX=gcc`` (a C driver: compiles the .cpp, links without libstdc++) compiled twice,
    about a minute, then said only "undefined symbol: _ZTISt9bad_alloc". The rebuild would be
    refused alike: none, and the status says what to do."""
    (library,) = _libraries(built_cache)
    good = tmp_path / "good.so"
    shutil.copy2(library, good)
    cxx = _handing_out(tmp_path, good)
    # every library refused as the loader refuses one a C compiler driver linked (CXX=gcc)
    missing = _refusing_to_load("anywhere", "undefined symbol: _ZTISt9bad_alloc")
    first, _ = _finish(_start(built_cache, cxx, code=missing))
    assert "undefined symbol: _ZTISt9bad_alloc" in first["status"]
    assert ("linked it without the C++ standard library (a C compiler?): set CXX to a C++ "
            "compiler such as g++ or clang++") in first["status"], first["status"]
    assert _compiles(cxx) == []  # the cached library was refused: no rebuild either
    # nor kept: CXX=clang and clang++ print the same --version, so share the cache key, and a
    # kept library kept clang++ refused for good (found by a review of the diff)
    assert _libraries(built_cache) == []
    # the C++ driver the status asks for, at once (clang++ after clang: the same --version,
    # so the same cache key): not refused by the note the C driver's failure left
    (tmp_path / "cxx").mkdir()
    other = _handing_out(tmp_path / "cxx", good)
    second, _ = _finish(_start(built_cache, other))
    assert second["status"] == "", second["status"]
    assert len(_compiles(other)) == 1
    assert "undefined symbol: _ZNKSt9bad_alloc4whatEv" in (
        "x: undefined symbol: " + build._missing_cxx_runtime(
            "x: undefined symbol: _ZNKSt9bad_alloc4whatEv"))  # const members of std classes


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_cxx_naming_a_c_compiler_is_said_after_one_build(tmp_path):
    gcc = _script(tmp_path / "gcc", f'exec {shutil.which("gcc")} "$@" {UNOPTIMISED}\n')
    report, stderr = _report(tmp_path / "cache", gcc)
    assert "set CXX to a C++ compiler such as g++ or clang++" in report["status"]
    assert len(_compiles(gcc)) == 1 and stderr.count(START) == 1, _calls(gcc)
    assert report["auto"][0] == pytest.approx(report["reference"], rel=1e-6)


@pytest.mark.parametrize("env, want", [
    ({"DYNLOSS_CACHE_DIR": "~/dl"}, "{home}/dl"),  # was ./~/dl under the working directory
    ({"XDG_CACHE_HOME": "relative/cache"}, "{home}/.cache/dynloss"),  # XDG: ignore relative
    ({"XDG_CACHE_HOME": "/abs/cache"}, "/abs/cache/dynloss"),
    ({}, "{home}/.cache/dynloss"),
])
def test_the_cache_directory_follows_the_conventions(monkeypatch, tmp_path, env, want):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("DYNLOSS_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert build.cache_dir() == Path(want.format(home=tmp_path))


def test_an_interrupted_build_takes_its_compiler_with_it(monkeypatch):
    """Ctrl-C during a build: Python exited, the compiler (in a session of its own, so that a
    timeout can kill its whole group) ran on to the end of its compile."""
    started = []
    real = subprocess.Popen.communicate

    def interrupted(self, *args, **kwargs):
        started.append(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess.Popen, "communicate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build._run(["sleep", "30"])
    monkeypatch.setattr(subprocess.Popen, "communicate", real)
    (process,) = started
    assert process.wait(timeout=5) == -9  # killed, not left running


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_a_process_ended_by_a_signal_during_a_build_takes_its_compiler_with_it(tmp_path, name):
    """torchrun and job schedulers stop a rank with SIGTERM: the process ended, but its
    compiler (in a session of its own) ran on as an orphan, and the build's scratch folder
    stayed in the cache. The process still ends by the signal. Found by a review."""
    cxx, pids = _hanging(tmp_path)
    cache = tmp_path / "cache"
    process = _start(cache, cxx)
    deadline = time.monotonic() + 60
    while not pids.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    (pid,) = (int(p) for p in pids.read_text().split())
    try:
        process.send_signal(getattr(signal, name))
        process.communicate(timeout=30)
        assert process.returncode == -getattr(signal, name)
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid)
        assert list(cache.glob(".build-*")) == []
    finally:  # no orphan left behind by a failure here
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def test_a_signal_with_a_handler_of_the_users_is_left_to_it(monkeypatch):
    """Where the program handles SIGTERM itself (a graceful shutdown), the build leaves the
    handler alone."""
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    seen = []
    real = subprocess.Popen.communicate

    def communicate(self, *args, **kwargs):
        seen.append(signal.getsignal(signal.SIGTERM))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "communicate", communicate)
    try:
        build._run(["true"])
        assert seen == [mine]
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_signal_handler_installed_in_c_is_left_to_it():
    """A SIGTERM handler installed by C code (torch's DataLoader workers install one) is not
    Python's: ``signal.getsignal`` reports the default action for it, so the build replaced
    it for the compiler's run and then "restored" the default, which ended the handler. A
    persistent worker computing a loss then died by SIGTERM at the program's exit ("DataLoader
    worker is killed by signal: Terminated"; found by a review of training loops)."""
    code = textwrap.dedent("""
        import signal, torch
        from dynloss.kernels.native import build

        def caught():
            with open("/proc/self/status") as status:
                mask = next(line for line in status if line.startswith("SigCgt:"))
            return bool(int(mask.split()[1], 16) >> (signal.SIGTERM - 1) & 1)

        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and not caught()
        torch._C._set_worker_signal_handlers()  # C's own handler: Python still says SIG_DFL
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and caught()
        build._run(["true"])
        print(caught())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_environment(Path(tempfile.gettempdir()), None), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize("value, disabled", [("0", True), ("off", True), ("disabled", True),
                                             ("none", True), ("1", False), ("", False)])
def test_the_kernels_can_be_switched_off_in_the_usual_words(monkeypatch, value, disabled):
    monkeypatch.setenv("DYNLOSS_NATIVE", value)
    assert build._disabled() is disabled


@pytest.mark.parametrize("case", ["cannot be made", "exists, not writable"])
def test_a_cache_directory_that_cannot_be_written_says_how_to_choose_another(tmp_path, case):
    """A read-only home: the fallback's warning gave the OS error alone, not the setting that
    moves the cache (simulated with a file where a parent directory should be, and with
    /proc, where no file can be made: the tests may run as root, whom permissions do not
    stop)."""
    if case == "cannot be made":
        blocker = tmp_path / "file"
        blocker.write_text("")
        cache = blocker / "cache"
    else:
        cache = Path("/proc")
        if not cache.is_dir():
            pytest.skip("needs /proc")
    report, _ = _report(cache, None)
    assert report["status"].startswith("the native kernels could not be built or loaded: ")
    assert (f"cannot write to the cache directory {cache}" in report["status"]
            and "set DYNLOSS_CACHE_DIR (or XDG_CACHE_HOME) to a writable directory"
            in report["status"]), report["status"]


def test_cxx_with_a_launcher_compiles_through_it(tmp_path):
    """``CXX="ccache g++"`` (a launcher and its compiler, as make and CMake take it): the
    build ran ``c++`` instead, silently, since no program is called "ccache g++"."""
    compiler = _script(tmp_path / "fakecc", "echo 'fake compiler: no' >&2\nexit 1\n")
    launcher = _script(tmp_path / "launcher", 'exec "$@"\n')
    report, _ = _report(tmp_path / "cache", f"{launcher} {compiler} -DFROM_CXX")
    assert "fake compiler: no" in report["status"]
    compile_line = next(c for c in _calls(launcher) if " -c " in f" {c} ")
    assert compile_line.startswith(f"{compiler} -DFROM_CXX ")
    assert any(c.startswith("-DFROM_CXX ") for c in _calls(compiler))


def test_cxx_naming_no_program_is_said_and_the_defaults_are_tried(monkeypatch, caplog):
    monkeypatch.setenv("CXX", "/nonexistent/c++ -O2")
    with caplog.at_level(logging.WARNING, logger="dynloss"):
        command = build.compiler_command()
    assert command is None or command[0] != "/nonexistent/c++"
    assert "$CXX='/nonexistent/c++ -O2' names no program found" in caplog.text
    monkeypatch.setenv("CXX", "'unbalanced")
    with caplog.at_level(logging.WARNING, logger="dynloss"):
        build.compiler_command()
    assert "$CXX=\"'unbalanced\"" in caplog.text and "cannot be split" in caplog.text


def test_cxx_an_unquoted_path_with_spaces_is_still_one_program(monkeypatch, tmp_path):
    """``CXX=/opt/my tools/g++`` (no quotes) named the program before ``$CXX`` was split into
    words; a value that is itself a program is taken whole."""
    folder = tmp_path / "my tools"
    folder.mkdir()
    program = _script(folder / "g++", "exit 0\n")
    monkeypatch.setenv("CXX", str(program))
    assert build.compiler_command() == [str(program)]
    monkeypatch.setenv("CXX", f"{program} -DX")  # not a program: split, which fails here
    assert build.compiler_command() != [str(program), "-DX"]
    monkeypatch.setenv("CXX", f"'{program}' -DX")
    assert build.compiler_command() == [str(program), "-DX"]


# ------------------------------------------------------------ found by a review as a new user
def test_a_cached_library_loads_without_a_usable_temporary_directory(built_cache, tmp_path):
    """A read-only root file system (a container) with a writable cache: the temporary
    directory, only needed for the last way of opening a library, was looked up first, and its
    FileNotFoundError turned a valid cached build into the torch fallback."""
    (library,) = _libraries(built_cache)
    cxx = _handing_out(tmp_path, library)
    code = textwrap.dedent("""
        import tempfile
        import torch
        def nowhere():
            raise FileNotFoundError(2, "No usable temporary directory found in ['/tmp']")
        tempfile.gettempdir = nowhere
    """) + REPORT
    report, _ = _finish(_start(built_cache, cxx, code=code))
    assert report["status"] == ""
    assert report["native"] == pytest.approx(report["reference"], rel=1e-6)
    assert _compiles(cxx) == []


def test_without_a_home_directory_the_cache_says_how_to_choose_one(monkeypatch, tmp_path):
    """No $HOME and no passwd entry (an arbitrary-UID container): the cache went to a folder
    named "~" under the working directory. A relative DYNLOSS_CACHE_DIR is taken from the
    working directory once, as an absolute path."""
    for name in ("HOME", "DYNLOSS_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os.path, "expanduser", lambda path: path)
    with pytest.raises(RuntimeError, match=r"no home directory to keep the native build in "
                       r"\(\$HOME is not set\): set DYNLOSS_CACHE_DIR"):
        build.cache_dir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DYNLOSS_CACHE_DIR", "relative/cache")
    assert build.cache_dir() == tmp_path / "relative" / "cache"


@pytest.mark.parametrize("value", ["flase", "garbage", "2"])
def test_an_unknown_dynloss_native_value_is_said(monkeypatch, value):
    monkeypatch.setenv("DYNLOSS_NATIVE", value)
    with pytest.warns(RuntimeWarning, match=f"DYNLOSS_NATIVE={value!r} is neither on "
                      r"\(1, true, on, yes, enable, enabled\) nor off \(0, false, off, no, "
                      r"none, disable, disabled\): the native kernels stay on"):
        assert build._disabled() is False


@pytest.mark.parametrize("value", ["abc", "-5", "inf", "0"])
def test_a_build_timeout_that_is_no_positive_number_is_said(monkeypatch, value):
    """It silently became 300 s (the docs did not say); said once (a build reads it several
    times)."""
    import warnings

    monkeypatch.setattr(build, "_TIMEOUTS_SAID", set())
    monkeypatch.setenv("DYNLOSS_NATIVE_BUILD_TIMEOUT", value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [build._timeout() for _ in range(3)] == [300.0] * 3
    assert [str(w.message) for w in caught] == [
        f"dynloss: DYNLOSS_NATIVE_BUILD_TIMEOUT={value!r} is not a positive number of seconds: "
        "the build gets 300"]
    monkeypatch.setenv("DYNLOSS_NATIVE_BUILD_TIMEOUT", "12.5")
    assert build._timeout() == 12.5


def test_without_a_home_directory_the_fallback_says_so_once(tmp_path):
    """The status names the setting, and no configuration is compiled or reported as failed."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HOME", "DYNLOSS_CACHE_DIR", "XDG_CACHE_HOME", "DYNLOSS_NATIVE")}
    env["PYTHONPATH"] = SRC
    code = textwrap.dedent("""
        import json, os, warnings
        os.path.expanduser = lambda path: path  # no $HOME, no passwd entry
        from dynloss.kernels import native_status
        print(json.dumps({"status": native_status()}))
    """)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout.strip().splitlines()[-1])["status"]
    assert status.endswith("no home directory to keep the native build in ($HOME is not set): "
                           "set DYNLOSS_CACHE_DIR to a writable directory"), status
    assert "failed" not in done.stderr and START not in done.stderr, done.stderr
    assert not (tmp_path / "~").exists()
