"""Link torch and what it needs, and nothing else, from this environment into one folder.

Usage: python scripts/torch_only_site.py FOLDER

Run by scripts/check_wheel.sh. The release check installs the dynloss wheel into a fresh
virtual environment that must hold torch and nothing more. Installing torch a second time
costs about 5.5 GB of disk (the CUDA build and its nvidia-* libraries), more than a CI machine
may have free; so the check links the already installed torch instead. This script walks
torch's requirements (with their environment markers) from the installed metadata, and
symlinks every top-level file and folder those distributions installed, and their
``.dist-info`` folders (so pip and importlib.metadata see them as installed), into FOLDER.
The fresh environment gets FOLDER through a ``.pth`` file. Extras (smp, MONAI, hypothesis,
numpy unless torch needs it) are not linked, so an import of them from the wheel fails there.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # pip always vendors packaging
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(dist: metadata.Distribution, extras: set[str]) -> list[tuple[str, set[str]]]:
    """(name, extras) of each requirement of ``dist`` that applies here with ``extras`` asked."""
    out = []
    for line in dist.requires or []:
        requirement = Requirement(line)
        marker = requirement.marker
        if marker is not None and not any(
            marker.evaluate({"extra": extra}) for extra in (extras or {""})
        ):
            continue
        out.append((requirement.name, set(requirement.extras)))
    return out


def closure(root: str) -> list[metadata.Distribution]:
    """``root`` and every distribution it requires here (extras included), recursively."""
    seen: dict[str, metadata.Distribution] = {}
    done: set[tuple[str, str]] = set()
    pending: list[tuple[str, set[str]]] = [(root, set())]
    while pending:
        raw, extras = pending.pop()
        name = _canonical(raw)
        key = (name, ",".join(sorted(extras)))
        if key in done:
            continue
        done.add(key)
        try:
            dist = seen.get(name) or metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # not installed here: pip's --no-index install then says what is missing
        seen[name] = dist
        pending.extend(_requirements(dist, extras))
    return list(seen.values())


def link(dists: list[metadata.Distribution], folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    linked = 0
    for dist in dists:
        site = Path(str(dist.locate_file("")))
        tops = {Path(str(f)).parts[0] for f in dist.files or []}
        for top in sorted(tops):
            if top in ("..", "__pycache__") or top.endswith(".pth"):
                continue  # scripts in bin/, byte code, and path hooks stay behind
            source, target = site / top, folder / top
            if source.exists() and not target.exists():
                target.symlink_to(source)
                linked += 1
    return linked


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    dists = closure("torch")
    if not dists:
        print("torch is not installed in this environment", file=sys.stderr)
        return 1
    count = link(dists, Path(sys.argv[1]))
    names = sorted(d.metadata["Name"] for d in dists)
    print(f"linked {count} entries of {len(names)} distributions: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
