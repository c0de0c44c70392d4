"""Fetch the Medical Segmentation Decathlon Task10_Colon tar, verify it, extract it safely.

The tar is the one MONAI's ``DecathlonDataset`` uses. It is about 5.8 GB, licensed CC-BY-SA 4.0.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

TASK10_URL = "https://msd-for-monai.s3-us-west-2.amazonaws.com/Task10_Colon.tar"
TASK10_MD5 = "bad7a188931dc2f6acf72b08eb6202d0"

_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """The download failed or the file does not match its checksum."""


def md5sum(path: str | os.PathLike[str], *, progress: bool = False) -> str:
    """Hex md5 of a file, read in 1 MiB chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    size = os.path.getsize(path)
    with (
        open(path, "rb") as handle,
        tqdm(total=size, unit="B", unit_scale=True, desc="md5", disable=not progress) as bar,
    ):
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def download(
    url: str,
    dest: str | os.PathLike[str],
    *,
    md5: str | None = None,
    progress: bool = True,
) -> Path:
    """Download ``url`` (http(s):// or file://) to ``dest`` with a progress bar.

    The bytes go to ``dest + ".part"`` and are renamed only after the md5 matched, so a
    crash never leaves a half-written file under the final name. An existing ``dest`` whose
    md5 matches is reused. A mismatch deletes the partial file and raises
    :class:`DownloadError`.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and (md5 is None or md5sum(dest, progress=progress) == md5):
        return dest
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            total = response.headers.get("Content-Length")
            with (
                open(part, "wb") as out,
                tqdm(
                    total=int(total) if total else None,
                    unit="B",
                    unit_scale=True,
                    desc=f"download {dest.name}",
                    disable=not progress,
                ) as bar,
            ):
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except OSError as error:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"could not download {url}: {error}. Download it by hand (e.g. with a browser or "
            f"`curl -L -o {dest} {url}`) and pass the extracted folder with --data-dir."
        ) from error
    got = digest.hexdigest()
    if md5 is not None and got != md5:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"md5 mismatch for {url}: expected {md5}, got {got}; the partial file was deleted. "
            "Retry, or fetch the tar by hand and check it with `md5sum`."
        )
    os.replace(part, dest)
    return dest


def _is_within(base: Path, target: Path) -> bool:
    try:
        target.relative_to(base)
    except ValueError:
        return False
    return True


def safe_extract(
    tar_path: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    progress: bool = True,
) -> Path:
    """Extract ``tar_path`` into ``target``; refuse any member that would land outside it.

    Every member is checked *before* anything is written: absolute names, ``..`` components,
    links pointing outside ``target`` and device/FIFO members raise ``ValueError`` and nothing
    is extracted. On Python versions with tar extraction filters the ``"data"`` filter is
    applied as a second line of defence.
    """
    target = Path(target).resolve()
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path) as archive:
        members = archive.getmembers()
        for member in members:
            name = member.name
            dest = (target / name).resolve()
            if os.path.isabs(name) or not _is_within(target, dest):
                raise ValueError(f"refusing to extract {name!r}: it would land outside {target}")
            if member.issym() or member.islnk():
                link_base = dest.parent if member.issym() else target
                link_dest = (link_base / member.linkname).resolve()
                if os.path.isabs(member.linkname) or not _is_within(target, link_dest):
                    raise ValueError(
                        f"refusing to extract link {name!r} -> {member.linkname!r}: "
                        f"it points outside {target}"
                    )
            if member.isdev() or member.isfifo():
                raise ValueError(f"refusing to extract special file {name!r}")
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        for member in tqdm(members, desc="extract", unit="file", disable=not progress):
            archive.extract(member, target, **kwargs)
    return target


def fetch_task10(
    root: str | os.PathLike[str],
    *,
    url: str = TASK10_URL,
    md5: str = TASK10_MD5,
    progress: bool = True,
    keep_tar: bool = True,
) -> Path:
    """Download + verify + extract Task10_Colon under ``root``; return ``root/Task10_Colon``."""
    root = Path(root)
    data_dir = root / "Task10_Colon"
    if (data_dir / "dataset.json").exists():
        return data_dir
    tar_path = download(url, root / "Task10_Colon.tar", md5=md5, progress=progress)
    tmp = root / ".extract-tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    safe_extract(tar_path, tmp, progress=progress)
    extracted = tmp / "Task10_Colon"
    if not (extracted / "dataset.json").exists():
        raise DownloadError(f"{tar_path} does not contain Task10_Colon/dataset.json")
    os.replace(extracted, data_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    if not keep_tar:
        tar_path.unlink()
    return data_dir
