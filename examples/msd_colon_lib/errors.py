"""The errors the command line reports in one line (bad input or a refused action, not a bug)."""

from __future__ import annotations

from pathlib import Path


class ExampleError(Exception):
    """Base class: ``msd_colon.py`` prints ``msd_colon.py: error: <message>`` and exits 2.

    Messages are one line and name the file, option or run they are about.
    """


class DataError(ExampleError, ValueError):
    """A data file is missing, unreadable, damaged or inconsistent with its partner file."""


class OptionsError(ExampleError, ValueError):
    """A command-line option is invalid or contradicts another one."""


class MismatchError(ExampleError):
    """``--resume`` of a run whose inputs (options, data, code) changed since it was started."""


class WeightsError(ExampleError, RuntimeError):
    """Encoder weights could not be loaded (typically: ImageNet weights without network)."""


class OutInUseError(ExampleError, RuntimeError):
    """Another invocation is running on the same ``--out`` now (see :mod:`.outlock`)."""


def first_line(error: BaseException) -> str:
    """``"TypeName: first line of the message"`` (for one-line reports of a caught error)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def make_folder(path: Path, option: str, error: type[ExampleError]) -> None:
    """Create the folder ``path`` that ``option`` names if missing; ``error`` (one line) when
    it is a file or cannot be created."""
    if path.exists() and not path.is_dir():
        raise error(f"{option} {path} is a file; {option} must be a folder (it is created if "
                    "missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as caught:
        raise error(f"{option} {path}: cannot create the folder ({first_line(caught)})"
                    ) from caught
