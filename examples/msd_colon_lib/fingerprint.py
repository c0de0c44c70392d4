"""Fingerprints: everything that determines a result, so that a result is reused only when it
still describes the same experiment.

A fingerprint is a JSON-able dict (nested), stored with each run (``config.json``, ``last.pt``,
``result.json``) and with the slice store (``meta.json``). Two fingerprints are compared key by
key; :func:`differences` names what changed in words a user recognises (``lr: 0.001 ->
0.0001``, ``data file labelsTr/colon_001.nii.gz changed``).

- Data files are identified by the SHA-256 of their bytes. Hashing the 5.8 GB of Task10_Colon
  takes a while, so digests are cached (:class:`DigestCache`) under the file's size,
  modification time, change time and inode: editing a file in place changes its change time
  (``st_ctime_ns``, which no user tool can set back), so the file is hashed again.
- Code: the SHA-256 of the example modules that compute a result and of the installed dynloss
  package's source, hashed once when this module is imported (the code the process runs, not
  what the files hold later), and the versions of torch, segmentation-models-pytorch, nibabel
  and numpy.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20
HERE = Path(__file__).resolve().parent


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex SHA-256 of ``obj`` as canonical JSON (sorted keys)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class DigestCache:
    """File digests cached in a JSON file, keyed by path and invalidated by any change of the
    file's size, modification time, change time or inode."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = None if path is None else Path(path)
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path is not None and self.path.exists():
            try:
                self.entries = json.loads(self.path.read_text())
            except (OSError, ValueError):  # a damaged cache is only a cache: start afresh
                self.entries = {}
        self.hashed: list[str] = []  # files hashed (not taken from the cache) by this object

    @staticmethod
    def _stamp(path: Path) -> list[int]:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]

    def digest(self, path: str | os.PathLike[str]) -> str:
        path = Path(path).resolve()
        stamp = self._stamp(path)
        entry = self.entries.get(str(path))
        if entry is not None and entry.get("stamp") == stamp:
            return str(entry["sha256"])
        value = sha256_file(path)
        self.entries[str(path)] = {"stamp": stamp, "sha256": value}
        self.hashed.append(str(path))
        return value

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.entries))
        os.replace(tmp, self.path)


def source_digest(paths: Iterable[Path], root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of source files."""
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(paths)}


# The example modules whose code decides a run's numbers (not the report, figures or CLI).
RESULT_MODULES = ("training.py", "model.py", "evaluation.py", "splits.py", "distributed.py")
DATA_MODULES = ("data.py",)


@functools.cache
def _package_digest(root: str) -> str:
    base = Path(root)
    files = [p for p in base.rglob("*") if p.suffix in (".py", ".cpp") and p.is_file()]
    return sha256_json(source_digest(files, base))


def _version(module: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return "not installed"


def _dynloss_root() -> str:
    import dynloss

    return str(Path(dynloss.__file__).resolve().parent)


# The code this process runs, hashed once as it is imported (this module is imported with the
# others, at start-up): a file edited while a long grid runs must not be taken for the code
# of the runs that start after the edit, which still run what was imported.
_IMPORTED_CODE = {name: sha256_file(HERE / name)[:16] for name in RESULT_MODULES + DATA_MODULES}
_IMPORTED_DYNLOSS = _package_digest(_dynloss_root())[:16]


def _imported(name: str) -> str:
    digest = _IMPORTED_CODE.get(name)
    return digest if digest is not None else sha256_file(HERE / name)[:16]


def code_version(modules: Iterable[str] = RESULT_MODULES) -> dict[str, Any]:
    """The code that computes a result: example modules and dynloss's source as this process
    imported them, library versions."""
    import numpy
    import torch

    import dynloss

    return {
        "example": {name: _imported(name) for name in modules},
        "dynloss": dynloss.__version__,
        "dynloss_source": _IMPORTED_DYNLOSS,
        "torch": torch.__version__,
        "segmentation_models_pytorch": _version("segmentation-models-pytorch"),
        "numpy": numpy.__version__,
    }


def data_code_version() -> dict[str, Any]:
    """The code that turns the NIfTI files into the slice store."""
    import nibabel
    import numpy
    import torch

    return {
        "example": {name: _imported(name) for name in DATA_MODULES},
        "nibabel": nibabel.__version__,
        "numpy": numpy.__version__,
        "torch": torch.__version__,
    }


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b.c": value}`` (lists and empty dicts are values)."""
    if isinstance(obj, Mapping) and obj:
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: obj}


# How a flattened key is shown to the user: the first matching prefix is replaced.
_LABELS = (
    ("config.extra.", ""),
    ("config.", ""),
    ("data.files.", "data file "),
    ("data.code.example.", "code of msd_colon_lib/"),
    ("data.code.", "slice-store code: "),
    ("data.", "data: "),
    ("code.example.", "code of msd_colon_lib/"),
    ("code.", "code: "),
    ("split.", "split: "),
    ("precision.", "precision: "),
)


def _label(key: str) -> str:
    for prefix, label in _LABELS:
        if key.startswith(prefix):
            return label + key[len(prefix):]
    return key


def _show(value: Any) -> str:
    if isinstance(value, str):
        return value[:12] + "…" if len(value) > 24 else value
    if isinstance(value, list) and len(value) > 4:
        return f"[{len(value)} entries]"
    return json.dumps(value)


def differences(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """What changed from ``old`` to ``new``, one phrase per key (empty: they match).

    The run's options come first, by name; data files are *added*, *removed* or *changed*.
    """
    if old is None:
        return ["no fingerprint (written by an older version of this example)"]
    a, b = flatten(old), flatten(new)
    out = []
    for key in sorted(set(a) | set(b), key=lambda k: (not k.startswith("config."), _label(k))):
        if key.startswith("data.files.") and (key not in a or key not in b or a[key] != b[key]):
            state = "added" if key not in a else "removed" if key not in b else "changed"
            out.append(f"{_label(key)} {state}")
        elif key not in a:
            out.append(f"{_label(key)}: (absent) -> {_show(b[key])}")
        elif key not in b:
            out.append(f"{_label(key)}: {_show(a[key])} -> (absent)")
        elif a[key] != b[key]:
            out.append(f"{_label(key)}: {_show(a[key])} -> {_show(b[key])}")
    return out


def describe(changes: list[str], limit: int = 8) -> str:
    """The changes as one line."""
    shown = "; ".join(changes[:limit])
    more = len(changes) - limit
    return shown + (f"; and {more} more" if more > 0 else "")
