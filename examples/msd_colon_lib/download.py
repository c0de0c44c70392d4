"""Fetch the Medical Segmentation Decathlon Task10_Colon tar, verify it, extract it safely.

The tar is the one MONAI's ``DecathlonDataset`` uses. It is about 5.8 GB, licensed CC-BY-SA 4.0.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from .errors import ExampleError, make_folder

TASK10_URL = "https://msd-for-monai.s3-us-west-2.amazonaws.com/Task10_Colon.tar"
TASK10_MD5 = "bad7a188931dc2f6acf72b08eb6202d0"

_CHUNK = 1 << 20


class DownloadError(ExampleError, RuntimeError):
    """The download failed, the file does not match its checksum, or the tar is unsafe."""


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
    if dest.exists():
        if md5 is None or md5sum(dest, progress=progress) == md5:
            return dest
        print(f"{dest} does not match its md5 (a damaged or partial download): downloading it "
              "again", file=sys.stderr)
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


_MAX_LINK_HOPS = 40  # like the kernel's limit on symbolic links followed in one path


class _Outside(ValueError):
    """A path that leaves the extraction target."""


class _ArchiveTree:
    """The links an archive creates, to resolve member paths *before* anything is written.

    A link can be harmless on its own and dangerous through an earlier one: ``a -> .`` and
    ``a/b -> ..`` (created through ``a``, so it is ``b -> ..`` one level above the target), then
    ``a/b/FILE``. Resolving each name on the real disk (as a plain ``Path.resolve`` check does)
    misses this, because nothing is extracted yet when the members are checked. This resolves
    every path through the links created by earlier members of the same archive (and links
    already inside the target), like the kernel would, and writes nothing.
    """

    def __init__(self, target: Path) -> None:
        self.target = target
        self.links: dict[tuple[str, ...], str] = {}
        self.folded: dict[tuple[str, ...], tuple[str, ...]] = {}  # casefolded -> link path

    def resolve(self, path: str, *, follow_last: bool = True, start: tuple[str, ...] = ()
                ) -> tuple[str, ...]:
        """``path`` (relative to ``start``) as components below the target, links followed.

        Raises ``_Outside`` when it leaves the target and ``ValueError`` on a link loop.
        """
        if os.path.isabs(path):
            raise _Outside(path)
        pending = [p for p in reversed(path.split("/")) if p not in ("", ".")]
        done = list(start)
        hops = 0
        while pending:
            part = pending.pop()
            if part == "..":
                if not done:
                    raise _Outside(path)
                done.pop()
                continue
            candidate = (*done, part)
            alias = self.folded.get(tuple(p.casefold() for p in candidate))
            if alias is not None and alias != candidate:
                raise ValueError(
                    f"{'/'.join(candidate)!r} differs from the link {'/'.join(alias)!r} only in "
                    "case (the same path on a case-insensitive file system)"
                )
            link = None
            if pending or follow_last:
                link = self.links.get(candidate)
                disk = self.target.joinpath(*candidate)
                if link is None and disk.is_symlink():
                    link = os.readlink(disk)
            if link is None:
                done.append(part)
                continue
            hops += 1
            if hops > _MAX_LINK_HOPS:
                raise ValueError("too many levels of symbolic links")
            if os.path.isabs(link):
                raise _Outside(path)
            # the link's target is relative to the folder holding the link: ``done``
            pending.extend(p for p in reversed(link.split("/")) if p not in ("", "."))
        return tuple(done)

    def check(self, member: tarfile.TarInfo) -> None:
        """Raise ``ValueError`` if extracting ``member`` would write or point outside."""
        name = member.name
        if "\\" in name or ((member.issym() or member.islnk()) and "\\" in member.linkname):
            raise ValueError(f"refusing to extract {name!r}: a backslash in a name (a "
                             "separator on Windows)")
        try:
            parts = [p for p in name.split("/") if p not in ("", ".")]
            if os.path.isabs(name) or not parts:
                raise _Outside(name)
            parent = self.resolve("/".join(parts[:-1]))
            final = (*parent, parts[-1])
            if not member.issym():
                # a file (or a hard link, which tarfile may fall back to copying) is written
                # through a link already at its name
                self.resolve("/".join(parts))
        except _Outside:
            raise ValueError(
                f"refusing to extract {name!r}: it would land outside {self.target}"
            ) from None
        except ValueError as error:
            raise ValueError(f"refusing to extract {name!r}: {error}") from None
        if member.issym() or member.islnk():
            try:
                if member.issym():
                    self.resolve(member.linkname, start=parent)
                else:  # a hard link names its source relative to the archive root
                    self.resolve(member.linkname)
            except _Outside:
                raise ValueError(
                    f"refusing to extract link {name!r} -> {member.linkname!r}: it points "
                    f"outside {self.target}"
                ) from None
            except ValueError as error:
                raise ValueError(f"refusing to extract {name!r}: {error}") from None
            if member.issym():  # tarfile replaces whatever was at that name
                self.links[final] = member.linkname
                self.folded[tuple(p.casefold() for p in final)] = final
        if member.isdev() or member.isfifo():
            raise ValueError(f"refusing to extract special file {name!r}")

    def check_final_links(self) -> None:
        """Raise ``ValueError`` for a link that points outside through links created *after*
        it (``x -> y/..``, then ``y -> .``): a link is followed when it is used, after the
        whole archive is extracted, so each is resolved again through the final set."""
        for final, linkname in self.links.items():
            try:
                self.resolve(linkname, start=final[:-1])
            except _Outside:
                raise ValueError(
                    f"refusing to extract link {'/'.join(final)!r} -> {linkname!r}: through "
                    f"the archive's later links it points outside {self.target}"
                ) from None
            except ValueError as error:
                raise ValueError(f"refusing to extract {'/'.join(final)!r}: {error}") from None


def safe_extract(
    tar_path: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    progress: bool = True,
) -> Path:
    """Extract ``tar_path`` into ``target``; refuse any member that would land outside it.

    Every member is checked *before* anything is written: absolute names, ``..`` components,
    links pointing outside ``target`` -- resolved through the links that earlier members of the
    same archive create (``a -> .`` then ``a/b -> ..`` is refused), so this does not depend on
    Python's extraction filters -- and device/FIFO members raise ``ValueError``, and nothing is
    extracted. Where Python has tar extraction filters, the ``"data"`` filter is applied as a
    second line of defence.
    """
    target = Path(target).resolve()
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path) as archive:
        members = archive.getmembers()
        tree = _ArchiveTree(target)
        for member in members:
            tree.check(member)
        tree.check_final_links()
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        for member in tqdm(members, desc="extract", unit="file", disable=not progress):
            archive.extract(member, target, **kwargs)
    return target


def _check_dataset_links(extracted: Path) -> None:
    """Raise ``ValueError`` if ``extracted`` (the Task10_Colon folder, to be moved out of the
    extraction folder) is a link, or holds a link that leads outside it: :func:`safe_extract`
    checked the links against the whole extraction folder, which also holds its siblings."""
    if extracted.is_symlink():
        raise ValueError("Task10_Colon is a link, not a folder")
    if not extracted.is_dir():
        return  # (the caller says that dataset.json is missing)
    tree = _ArchiveTree(extracted.resolve())
    for folder, names, files in os.walk(extracted):  # (links to folders are not entered)
        here = Path(folder).relative_to(extracted).parts
        for name in (*names, *files):
            path = Path(folder, name)
            if not path.is_symlink():
                continue
            linkname = os.readlink(path)
            try:
                tree.resolve(linkname, start=here)
            except _Outside:
                shown = "/".join(("Task10_Colon", *here, name))
                raise ValueError(f"refusing the link {shown!r} -> {linkname!r}: it points "
                                 "outside Task10_Colon") from None


def _occupied(data_dir: Path) -> DownloadError:
    return DownloadError(f"{data_dir} exists without a dataset.json: move it away (or pass "
                         "--data-dir for a complete Task10_Colon) and download again")


def _check_destination(root: Path, data_dir: Path) -> None:
    """Raise :class:`DownloadError` unless ``root`` is (or can be made) a folder and
    ``data_dir`` is missing or an empty folder: the extracted tar can then be put there."""
    make_folder(root, "--download-root", DownloadError)
    if data_dir.exists() and not data_dir.is_dir():
        raise DownloadError(f"{data_dir} is a file, not the Task10_Colon folder: move it away "
                            "and download again")
    if data_dir.is_dir() and any(data_dir.iterdir()):
        raise _occupied(data_dir)


def fetch_task10(
    root: str | os.PathLike[str],
    *,
    url: str = TASK10_URL,
    md5: str = TASK10_MD5,
    progress: bool = True,
    keep_tar: bool = True,
) -> Path:
    """Download + verify + extract Task10_Colon under ``root``; return ``root/Task10_Colon``.

    A ``root`` that is a file, and a ``root/Task10_Colon`` that is a file or a folder holding
    files but no ``dataset.json`` (an empty one is filled), are refused before the download;
    so is one holding this example's phantom (taken as downloaded, it was reported as real).
    """
    root = Path(root)
    data_dir = root / "Task10_Colon"
    if (data_dir / "dataset.json").exists():
        from .phantom import is_phantom

        if is_phantom(data_dir):  # (never the download: its report would call it real data)
            raise DownloadError(
                f"{data_dir} holds this example's synthetic phantom, not the downloaded data: "
                "pass it as --data-dir, or choose another --download-root")
        return data_dir
    _check_destination(root, data_dir)  # before the 5.8 GB download, not after it
    tar_path = download(url, root / "Task10_Colon.tar", md5=md5, progress=progress)
    tmp = root / ".extract-tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        safe_extract(tar_path, tmp, progress=progress)
    except (ValueError, tarfile.TarError, OSError) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DownloadError(f"{tar_path}: {error}") from error
    extracted = tmp / "Task10_Colon"
    try:  # what is moved up is Task10_Colon: its links must stay inside it, not the tar's
        _check_dataset_links(extracted)
    except ValueError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DownloadError(f"{tar_path}: {error}") from None
    if not (extracted / "dataset.json").exists():
        shutil.rmtree(tmp, ignore_errors=True)
        raise DownloadError(f"{tar_path} does not contain Task10_Colon/dataset.json")
    if data_dir.exists() and any(data_dir.iterdir()):  # (appeared during the download)
        shutil.rmtree(tmp, ignore_errors=True)
        raise _occupied(data_dir)
    if data_dir.exists():
        data_dir.rmdir()  # empty: os.replace cannot put a folder over it on every platform
    os.replace(extracted, data_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    if not keep_tar:
        tar_path.unlink()
    return data_dir
