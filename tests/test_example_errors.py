"""examples/msd_colon.py: one --out per invocation at a time (the lock), and input that ended
in a traceback or a misleading message instead of one line naming what failed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

import msd_colon
from msd_colon_lib import outlock

from ._example_helpers import EXAMPLES, TINY, TINY_DATA

pytestmark = pytest.mark.usefixtures("one_thread")

PREFIX = "msd_colon.py: error: "


def test_first_line_reports_the_first_line_of_a_long_message():
    """The one-line reports quote a caught error by its first line (where torch and nibabel
    put what failed; the rest is detail), with its type (mutation review)."""
    from msd_colon_lib.errors import first_line

    error = RuntimeError("could not load the weights\n  missing keys: a, b\n\nlast line")
    assert first_line(error) == "RuntimeError: could not load the weights"
    assert first_line(OSError("  \n")) == "OSError"


def _one_line_error(capsys, argv):
    code = msd_colon.cli(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.err.startswith(PREFIX) and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err + captured.out
    return captured.err[len(PREFIX):].strip()


def _stop_at_the_first_run(monkeypatch):
    """Make the run stop (KeyboardInterrupt) where the first run would train; returns the list
    of the runs that got there."""
    from msd_colon_lib import runner

    trained = []

    def train_run(*args, **kwargs):
        trained.append(args)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "train_run", train_run)
    return trained


# ----------------------------------------------------------------------------- the --out lock

HOLDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, {examples!r})
    from msd_colon_lib import outlock
    {setup}
    with outlock.hold(Path({out!r})):
        print("locked", flush=True)
        sys.stdin.read()
""")


def _holder(out, setup=""):
    """A process holding the lock on ``out`` until its stdin closes (or it is killed)."""
    code = HOLDER.format(examples=str(EXAMPLES), out=str(out), setup=setup)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "locked\n"
    return proc


def test_a_second_invocation_on_the_same_out_is_refused_at_once(tmp_path, capsys):
    """Two invocations on one --out crashed (`FileNotFoundError: .last.pt.tmp -> last.pt`) and
    left a run folder mixing both (config.json of one, result.json of the other)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("the running invocation's report")
    holder = _holder(out)
    try:
        error = _one_line_error(capsys, ["--out", str(out), *TINY, "--loss", "iou",
                                         "--epochs", "1"])
        assert error == (f"--out {out} is in use by another run (pid {holder.pid}); wait for "
                         "it or choose another --out")
        # nothing of the running invocation was touched
        assert sorted(p.name for p in out.iterdir()) == [".lock", "report.md"]
        assert (out / "report.md").read_text() == "the running invocation's report"
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_run_does_not_block_the_next(tmp_path, monkeypatch):
    out = tmp_path / "out"
    holder = _holder(out)
    holder.kill()  # SIGKILL: no cleanup ran
    holder.wait()
    trained = _stop_at_the_first_run(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        msd_colon.main(["--out", str(out), *TINY, "--loss", "iou", "--epochs", "1"])
    assert len(trained) == 1
    # ... and the interrupted invocation released it on its way out
    with outlock.hold(out):
        pass


def test_the_lock_is_per_out(tmp_path):
    holder = _holder(tmp_path / "a")
    try:
        with outlock.hold(tmp_path / "b"):
            pass
        with pytest.raises(outlock.OutInUseError), outlock.hold(tmp_path / "a"):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_without_fcntl_a_pid_file_locks_and_a_dead_pid_is_stale(tmp_path, monkeypatch):
    """Where fcntl is missing (Windows) the lock is OUT/.lock created exclusively, holding the
    pid; a file whose process is gone is stale and taken over."""
    monkeypatch.setattr(outlock, "fcntl", None)
    out = tmp_path / "out"
    with outlock.hold(out):
        assert (out / ".lock").read_text() == str(os.getpid())
        with pytest.raises(outlock.OutInUseError) as info, outlock.hold(out):
            pass
        assert str(info.value) == (f"--out {out} is in use by another run (pid {os.getpid()}); "
                                   "wait for it or choose another --out")
    assert not (out / ".lock").exists()
    # a live process of another run holds it
    sleeper = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                               stdin=subprocess.PIPE)
    try:
        (out / ".lock").write_text(str(sleeper.pid))
        with pytest.raises(outlock.OutInUseError, match=f"in use by another run \\(pid "
                                                        f"{sleeper.pid}\\)"), outlock.hold(out):
            pass
    finally:
        sleeper.kill()
        sleeper.wait()
    # the same pid, once its process is gone, is stale
    with outlock.hold(out):
        assert (out / ".lock").read_text() == str(os.getpid())
    assert not (out / ".lock").exists()
    # an empty or garbled file is another run's, being written; stale (a process killed while
    # writing it) once older than a few seconds
    (out / ".lock").write_text("")
    with pytest.raises(outlock.OutInUseError) as info, outlock.hold(out):
        pass
    assert str(info.value) == (f"--out {out} is in use by another run; wait for it or choose "
                               "another --out")
    old = time.time() - outlock.UNWRITTEN_GRACE_S - 1
    os.utime(out / ".lock", (old, old))
    with outlock.hold(out):
        assert (out / ".lock").read_text() == str(os.getpid())


def test_a_file_system_without_flock_falls_back_to_the_pid_file(tmp_path, monkeypatch):
    """flock fails with ENOLCK on some network file systems: the lock is then the pid file
    (not .lock, which the flock attempt created empty)."""
    import errno
    from types import SimpleNamespace

    def flock(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(outlock, "fcntl", SimpleNamespace(LOCK_EX=2, LOCK_NB=4, flock=flock))
    out = tmp_path / "out"
    with outlock.hold(out):
        assert (out / ".lock.pid").read_text() == str(os.getpid())
        with pytest.raises(outlock.OutInUseError, match=f"\\(pid {os.getpid()}\\)"), \
                outlock.hold(out):
            pass
    assert not (out / ".lock.pid").exists()


def test_without_fcntl_a_lock_of_another_process_is_refused_in_one_line(tmp_path, capsys,
                                                                         monkeypatch):
    out = tmp_path / "out"
    holder = _holder(out, setup="outlock.fcntl = None")
    try:
        assert (out / ".lock").read_text() == str(holder.pid)
        monkeypatch.setattr(outlock, "fcntl", None)
        error = _one_line_error(capsys, ["--out", str(out), *TINY, "--loss", "iou"])
        assert error == (f"--out {out} is in use by another run (pid {holder.pid}); wait for "
                         "it or choose another --out")
    finally:
        holder.kill()
        holder.wait()


def test_a_dry_run_takes_no_lock(tmp_path):
    """--dry-run writes nothing: it lists the runs even while another run uses --out."""
    out = tmp_path / "out"
    holder = _holder(out)
    try:
        assert msd_colon.cli(["--out", str(out), "--dry-run"]) == 0
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------- tracebacks


def test_out_that_is_a_file_is_one_line(capsys, tmp_path):
    """--out naming a file ended in NotADirectoryError."""
    out = tmp_path / "results.txt"
    out.write_text("mine")
    assert _one_line_error(capsys, ["--out", str(out), *TINY, "--loss", "iou"]) == (
        f"--out {out} is a file; --out must be a folder (it is created if missing)")
    assert out.read_text() == "mine"
    below = out / "sub"
    assert _one_line_error(capsys, ["--out", str(below), *TINY, "--loss", "iou"]).startswith(
        f"--out {below}: cannot create the folder (")


@pytest.fixture(scope="module")
def encoder_files(tmp_path_factory):
    import segmentation_models_pytorch as smp
    import torch

    root = tmp_path_factory.mktemp("weights")
    encoder = smp.Unet("efficientnet-b0", encoder_weights=None, in_channels=3, classes=1).encoder
    torch.save(encoder, root / "module.pt")  # the whole module, not its state_dict
    (root / "empty.pt").write_bytes(b"")
    torch.save(torch.zeros(3), root / "tensor.pt")
    (root / "notes.txt").write_text("encoder weights: see the wiki\n")
    other = smp.Unet("resnet18", encoder_weights=None, in_channels=3, classes=1).encoder
    torch.save(other.state_dict(), root / "resnet18.pt")  # another encoder's state_dict
    return root


@pytest.mark.parametrize("name, reason", [
    ("module.pt", "it holds pickled objects other than tensors, such as a whole module saved by "
                  "torch.save(model, path); save model.encoder.state_dict() instead"),
    ("empty.pt", "the file is empty"),
    ("tensor.pt", "it holds a Tensor, not a state_dict of parameter names and tensors"),
    # a text file was "KeyError: 101"; another encoder's weights were cut to "Error(s) in
    # loading state_dict for EfficientNetEncoder:", without the keys
    ("notes.txt", "not a file saved by torch.save"),
    ("resnet18.pt", "its keys are another model's: 358 of the encoder's are missing (e.g. "
                    "'_conv_stem.weight') and 120 are not the encoder's (e.g. 'conv1.weight')"),
])
def test_encoder_weights_that_are_no_state_dict_are_one_line(capsys, tmp_path, encoder_files,
                                                              name, reason):
    """A pickled module ended in UnpicklingError, an empty file in EOFError, a tensor in
    AttributeError."""
    path = encoder_files / name
    error = _one_line_error(capsys, ["--out", str(tmp_path), *TINY, "--loss", "iou",
                                     "--encoder-weights", str(path)])
    assert error == (f"--encoder-weights {path}: not an efficientnet-b0 encoder state_dict "
                     f"({reason})")


@pytest.mark.parametrize("refusal", ["data-dir", "encoder-weights", "split"])
def test_an_invocation_refused_before_any_run_keeps_the_previous_report(
        capsys, tmp_path, monkeypatch, encoder_files, refusal):
    """The previous report went as soon as the lock was taken: a mistyped --data-dir, an
    encoder file that is no state_dict, or a split that cannot be made (each refused before
    anything trains, in one line) deleted a finished run's report.md, runs.csv and figures.
    Found by a review."""
    trained = _stop_at_the_first_run(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("report.md", "runs.csv", "loss_curves.png", "qualitative.png"):
        (out / name).write_text("the finished run's")
    argv = {"data-dir": [*TINY_DATA, "--data-dir", str(tmp_path / "Task10_Colon")],
            "encoder-weights": [*TINY, "--encoder-weights", str(encoder_files / "empty.pt")],
            "split": [*TINY, "--phantom-patients", "2"]}[refusal]
    _one_line_error(capsys, ["--out", str(out), *argv, "--loss", "iou", "--epochs", "1"])
    assert trained == []
    for name in ("report.md", "runs.csv", "loss_curves.png", "qualitative.png"):
        assert (out / name).read_text() == "the finished run's"


@pytest.mark.parametrize("code", ["ENOSPC", "EDQUOT"])
def test_a_full_disk_is_one_line_that_says_how_to_go_on(capsys, tmp_path, monkeypatch, code):
    """A full disk (or quota) under --out ended in a traceback (from the lock file's flush, or
    from writing a checkpoint). Found by a review."""
    import errno

    from msd_colon_lib import runner

    full = str(tmp_path / "out" / "runs" / "iou" / "last.pt")

    def train_run(*args, **kwargs):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), full)

    monkeypatch.setattr(runner, "train_run", train_run)
    error = _one_line_error(capsys, ["--out", str(tmp_path / "out"), *TINY, "--loss", "iou",
                                     "--epochs", "1"])
    assert error == (f"{os.strerror(getattr(errno, code))}: {full}; free some space (or choose "
                     "another --out) and rerun: --resume continues a run cut short")


def test_download_root_that_is_a_file_is_one_line(capsys, tmp_path, monkeypatch):
    """--download --download-root FILE ended in FileExistsError."""
    import urllib.request

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("downloads"))
    root = tmp_path / "data"
    root.write_text("mine")
    error = _one_line_error(capsys, ["--out", str(tmp_path / "out"), *TINY_DATA,
                                     "--encoder-weights", "none", "--download",
                                     "--download-root", str(root), "--loss", "iou"])
    assert error == (f"--download-root {root} is a file; --download-root must be a folder "
                     "(it is created if missing)")
    assert root.read_text() == "mine"


# ----------------------------------------------------------------------------- splits


@pytest.mark.parametrize("argv", [
    ["--phantom-patients", "2"],
    ["--phantom-patients", "3", "--max-cases", "2"],
])
def test_a_validation_split_without_two_training_patients_says_so(capsys, tmp_path,
                                                                  monkeypatch, argv):
    """2 patients: the test split leaves 1 training patient, which the validation split (the
    demo's --val-fraction 0.1) cannot split; the message blamed the 2 patients."""
    trained = _stop_at_the_first_run(monkeypatch)
    base = ["--out", str(tmp_path), *TINY, "--loss", "iou", "--epochs", "1"]
    error = _one_line_error(capsys, [*base, *argv])
    assert error == ("--val-fraction 0.1 needs at least 2 training patients; the test split "
                     "left 1: use --val-fraction 0 or more cases")
    assert trained == []
    # as it says: without a validation set the 2 patients suffice
    with pytest.raises(KeyboardInterrupt):
        msd_colon.main([*base, *argv, "--val-fraction", "0"])
    assert len(trained) == 1


def test_a_fold_without_two_training_patients_for_validation_says_so(capsys, tmp_path,
                                                                     monkeypatch):
    trained = _stop_at_the_first_run(monkeypatch)
    error = _one_line_error(capsys, ["--out", str(tmp_path), *TINY, "--epochs", "1",
                                     "--long-epochs", "2", "--experiment", "table4",
                                     "--folds", "2", "--max-cases", "2"])
    assert error == ("--val-fraction 0.1 needs at least 2 training patients; fold 0 of --folds "
                     "2 left 1: use --val-fraction 0 or more cases")
    assert trained == []
