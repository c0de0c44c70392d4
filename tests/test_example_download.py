"""examples/msd_colon: download (file:// URL, md5 check) and safe tar extraction."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile

import pytest

from msd_colon_lib import download


def _tar(path, members):
    with tarfile.open(path, "w") as archive:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return path


def _task10_tar(path):
    meta = json.dumps({"training": [], "labels": {"0": "background"}}).encode()
    return _tar(path, [("Task10_Colon/dataset.json", meta),
                       ("Task10_Colon/imagesTr/._colon_001.nii.gz", b"junk")])


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["../evil.txt", "Task10_Colon/../../evil.txt", "/tmp/evil.txt"])
def test_safe_extract_refuses_path_traversal(tmp_path, name):
    tar = _tar(tmp_path / "bad.tar", [("Task10_Colon/ok.txt", b"ok"), (name, b"evil")])
    target = tmp_path / "out"
    with pytest.raises(ValueError, match="outside"):
        download.safe_extract(tar, target, progress=False)
    assert not (tmp_path / "evil.txt").exists()
    assert not (target / "Task10_Colon" / "ok.txt").exists()  # nothing extracted at all


def test_safe_extract_refuses_links_out(tmp_path):
    tar = tmp_path / "link.tar"
    with tarfile.open(tar, "w") as archive:
        info = tarfile.TarInfo("Task10_Colon/link")
        info.type = tarfile.SYMTYPE
        info.linkname = "../../etc/passwd"
        archive.addfile(info)
    with pytest.raises(ValueError, match="outside"):
        download.safe_extract(tar, tmp_path / "out", progress=False)


def test_safe_extract_extracts_good_tar(tmp_path):
    tar = _task10_tar(tmp_path / "good.tar")
    out = download.safe_extract(tar, tmp_path / "out", progress=False)
    assert (out / "Task10_Colon" / "dataset.json").exists()


def test_download_file_url_with_md5(tmp_path):
    src = _task10_tar(tmp_path / "src.tar")
    dest = download.download(src.as_uri(), tmp_path / "dl" / "x.tar", md5=_md5(src),
                             progress=False)
    assert dest.read_bytes() == src.read_bytes()
    assert not (tmp_path / "dl" / "x.tar.part").exists()


def test_download_wrong_md5_raises_and_leaves_nothing(tmp_path):
    src = _task10_tar(tmp_path / "src.tar")
    dest = tmp_path / "dl" / "x.tar"
    with pytest.raises(download.DownloadError, match="md5 mismatch"):
        download.download(src.as_uri(), dest, md5="0" * 32, progress=False)
    assert not dest.exists() and not (tmp_path / "dl" / "x.tar.part").exists()


def test_download_failure_says_what_to_do(tmp_path):
    with pytest.raises(download.DownloadError, match="--data-dir"):
        download.download((tmp_path / "missing.tar").as_uri(), tmp_path / "x.tar", progress=False)


def test_fetch_task10_end_to_end_from_local_mirror(tmp_path):
    src = _task10_tar(tmp_path / "mirror.tar")
    root = tmp_path / "data"
    data_dir = download.fetch_task10(root, url=src.as_uri(), md5=_md5(src), progress=False)
    assert data_dir == root / "Task10_Colon" and (data_dir / "dataset.json").exists()
    # second call: already there, no download
    again = download.fetch_task10(root, url="file:///nonexistent", md5="x", progress=False)
    assert again == data_dir
    with pytest.raises(download.DownloadError, match=f"md5 mismatch for {re.escape(src.as_uri())}: "
                       f"expected {'f' * 32}, got {_md5(src)}; the partial file was deleted"):
        download.fetch_task10(tmp_path / "other", url=src.as_uri(), md5="f" * 32, progress=False)


def test_task10_constants():
    assert download.TASK10_MD5 == "bad7a188931dc2f6acf72b08eb6202d0"
    assert download.TASK10_URL.endswith("/Task10_Colon.tar")


def _link_tar(path, members):
    """A tar of ``(name, kind, payload_or_linkname)`` with kind ``file``, ``sym``, ``hard``."""
    with tarfile.open(path, "w") as archive:
        for name, kind, value in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(value)
                archive.addfile(info, io.BytesIO(value))
            else:
                info.type = tarfile.SYMTYPE if kind == "sym" else tarfile.LNKTYPE
                info.linkname = value
                archive.addfile(info)
    return path


CHAIN = [("a", "sym", "."), ("a/b", "sym", ".."), ("a/b/FILE", "file", b"escaped")]


@pytest.mark.parametrize("data_filter", [True, False])
def test_safe_extract_refuses_symlink_chains_before_writing(tmp_path, monkeypatch, data_filter):
    """``a -> .``, ``a/b -> ..``, ``a/b/FILE``: every link looks harmless on its own, but
    ``a/b`` is created *through* ``a`` and points one level above the target. The check must
    follow the archive's own earlier links, with or without Python's ``data`` filter (absent on
    Python 3.10.0-3.10.11 and 3.11.0-3.11.3)."""
    if not data_filter:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    tar = _link_tar(tmp_path / "chain.tar", CHAIN)
    target = tmp_path / "deep" / "out"
    with pytest.raises(ValueError, match=r"refusing to extract link 'a/b' -> '\.\.'"):
        download.safe_extract(tar, target, progress=False)
    assert list(target.iterdir()) == []  # nothing written, not even the harmless first link
    assert not (tmp_path / "deep" / "FILE").exists()


@pytest.mark.parametrize("members, message", [
    # a file written through a link to a directory outside
    ([("d", "sym", "../.."), ("d/x", "file", b"x")], r"refusing to extract link 'd'"),
    # a link to a link that leaves the target
    ([("up", "sym", ".."), ("x", "sym", "up/y")], r"refusing to extract link 'up'"),
    # a hard link through an earlier symlink
    ([("s", "sym", "."), ("h", "hard", "s/../../etc/passwd")], r"refusing to extract link 'h'"),
    # a hard link whose own name is an earlier link out (tarfile may copy the data through it)
    ([("s", "sym", "."), ("s/h", "sym", "../x"), ("t", "file", b"t"), ("h", "hard", "t")],
     r"refusing to extract link 's/h' -> '\.\./x'"),
    # a file member under a name that an earlier member made a link pointing outside
    ([("dir/", "sym", "sub/../.."), ("dir/f", "file", b"x")], r"refusing to extract link 'dir/'"),
    # a link cycle: harmless until something is written through it
    ([("p", "sym", "q"), ("q", "sym", "p"), ("p/f", "file", b"x")], r"'p/f': too many levels"),
    # found by review: the next two left a link pointing outside in the extracted tree
    # (nothing was written outside during extraction; a later reader follows it), the two
    # after them write outside on a case-insensitive file system or on Windows
    # `x -> y/..` is inside when checked (y is a folder then); `y -> .` later makes it `..`
    ([("x", "sym", "y/.."), ("y", "sym", ".")],
     r"refusing to extract link 'x' -> 'y/\.\.': through the archive's later links it "
     r"points outside"),
    ([("T/x", "sym", "y/../.."), ("T/y", "sym", "."), ("T/f", "file", b"f")],
     r"refusing to extract link 'T/x' -> 'y/\.\./\.\.': through the archive's later links"),
    # case aliases: on a case-insensitive file system `A/b` is created through the link `a`
    ([("a", "sym", "."), ("A/b", "sym", ".."), ("A/b/FILE", "file", b"escaped")],
     r"refusing to extract 'A/b': 'A' differs from the link 'a' only in case"),
    # a backslash is a separator on Windows
    ([("x\\..\\..\\evil", "file", b"evil")], r"refusing to extract 'x\\\\\.\.\\\\\.\.\\\\evil': "
                                             r"a backslash in a name"),
])
def test_safe_extract_refuses_links_resolved_through_the_archive(tmp_path, monkeypatch, members,
                                                                 message):
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    tar = _link_tar(tmp_path / "links.tar", members)
    target = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        download.safe_extract(tar, target, progress=False)
    assert list(target.iterdir()) == []


def test_safe_extract_keeps_links_that_stay_inside(tmp_path, monkeypatch):
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    tar = _link_tar(tmp_path / "ok.tar", [
        ("T/v1/data.txt", "file", b"payload"), ("T/latest", "sym", "v1"),
        ("T/alias", "sym", "latest/data.txt"), ("T/hard", "hard", "T/v1/data.txt"),
    ])
    out = download.safe_extract(tar, tmp_path / "out", progress=False)
    assert (out / "T" / "alias").read_bytes() == b"payload"
    assert (out / "T" / "hard").read_bytes() == b"payload"
    assert (out / "T" / "latest").is_symlink()


def test_fetch_task10_refuses_an_unsafe_tar_in_one_line(tmp_path):
    src = _link_tar(tmp_path / "mirror.tar", [*CHAIN, ("Task10_Colon/dataset.json", "file",
                                                       b"{}")])
    root = tmp_path / "data"
    with pytest.raises(download.DownloadError) as info:
        download.fetch_task10(root, url=src.as_uri(), md5=_md5(src), progress=False)
    assert str(info.value) == (f"{root / 'Task10_Colon.tar'}: refusing to extract link 'a/b' -> "
                               f"'..': it points outside {root / '.extract-tmp'}")
    assert not (root / ".extract-tmp").exists() and not (root / "Task10_Colon").exists()



def test_fetch_task10_without_dataset_json_leaves_no_temporary_folder(tmp_path):
    src = _tar(tmp_path / "mirror.tar", [("Task10_Colon/imagesTr/a.nii.gz", b"x")])
    root = tmp_path / "data"
    with pytest.raises(download.DownloadError, match="does not contain Task10_Colon/dataset"):
        download.fetch_task10(root, url=src.as_uri(), md5=_md5(src), progress=False)
    assert sorted(p.name for p in root.iterdir()) == ["Task10_Colon.tar"]


def test_fetch_task10_into_a_folder_that_holds_other_files_is_one_line(tmp_path):
    src = _task10_tar(tmp_path / "mirror.tar")
    root = tmp_path / "data"
    (root / "Task10_Colon").mkdir(parents=True)
    (root / "Task10_Colon" / "notes.txt").write_text("mine")
    with pytest.raises(download.DownloadError, match=r"Task10_Colon exists without a "
                                                     r"dataset\.json: move it away"):
        download.fetch_task10(root, url=src.as_uri(), md5=_md5(src), progress=False)
    assert (root / "Task10_Colon" / "notes.txt").read_text() == "mine"
    assert not (root / ".extract-tmp").exists()


def test_fetch_task10_refuses_a_task10_folder_without_dataset_json_before_downloading(tmp_path):
    """A Task10_Colon folder without dataset.json was refused only after the 5.8 GB download
    and its extraction."""
    root = tmp_path / "data"
    (root / "Task10_Colon").mkdir(parents=True)
    (root / "Task10_Colon" / "notes.txt").write_text("mine")
    with pytest.raises(download.DownloadError) as info:
        download.fetch_task10(root, url="file:///nonexistent/Task10_Colon.tar", md5="0" * 32,
                              progress=False)
    assert str(info.value) == (f"{root / 'Task10_Colon'} exists without a dataset.json: move it "
                               "away (or pass --data-dir for a complete Task10_Colon) and "
                               "download again")
    assert sorted(p.name for p in root.iterdir()) == ["Task10_Colon"]  # nothing downloaded


def test_fetch_task10_refuses_a_task10_file_before_downloading(tmp_path):
    """ROOT/Task10_Colon as a plain file ended in NotADirectoryError after the download."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "Task10_Colon").write_text("mine")
    with pytest.raises(download.DownloadError) as info:
        download.fetch_task10(root, url="file:///nonexistent/Task10_Colon.tar", md5="0" * 32,
                              progress=False)
    assert str(info.value) == (f"{root / 'Task10_Colon'} is a file, not the Task10_Colon "
                               "folder: move it away and download again")
    assert sorted(p.name for p in root.iterdir()) == ["Task10_Colon"]
    assert (root / "Task10_Colon").read_text() == "mine"


def test_fetch_task10_into_a_root_that_is_a_file_is_one_line(tmp_path):
    """A download folder that is a file ended in FileExistsError."""
    root = tmp_path / "data"
    root.write_text("mine")
    with pytest.raises(download.DownloadError) as info:
        download.fetch_task10(root, url="file:///nonexistent/Task10_Colon.tar", md5="0" * 32,
                              progress=False)
    assert str(info.value) == (f"--download-root {root} is a file; --download-root must be "
                               "a folder (it is created if missing)")
    assert root.read_text() == "mine"
    with pytest.raises(download.DownloadError) as info:
        download.fetch_task10(root / "below", url="file:///nonexistent/Task10_Colon.tar",
                              md5="0" * 32, progress=False)
    assert str(info.value).startswith(f"--download-root {root / 'below'}: cannot create the "
                                      "folder (")


def test_an_empty_task10_folder_is_filled(tmp_path):
    src = _task10_tar(tmp_path / "mirror.tar")
    root = tmp_path / "data"
    (root / "Task10_Colon").mkdir(parents=True)
    data_dir = download.fetch_task10(root, url=src.as_uri(), md5=_md5(src), progress=False)
    assert (data_dir / "dataset.json").exists()


@pytest.mark.parametrize(("members", "message"), [
    # a link inside Task10_Colon to a sibling of it: inside the extraction folder, outside the
    # dataset once Task10_Colon is moved up
    ([("Task10_Colon/dataset.json", "file", b"{}"), ("sibling", "file", b"x"),
      ("Task10_Colon/link", "sym", "../sibling")],
     "refusing the link 'Task10_Colon/link' -> '../sibling': it points outside Task10_Colon"),
    # Task10_Colon itself a link to another folder of the archive (deleted with the temporary
    # folder: the dataset would be a dangling link)
    ([("real/dataset.json", "file", b"{}"), ("Task10_Colon", "sym", "real")],
     "Task10_Colon is a link, not a folder"),
])
def test_fetch_task10_checks_links_against_the_dataset_folder(tmp_path, members, message):
    """Links were checked against the temporary extraction folder, then Task10_Colon was
    moved up a level: a link to its sibling (or the downloaded tar) then led outside the
    dataset, and a Task10_Colon that was itself a link was returned as a success."""
    src = _link_tar(tmp_path / "mirror.tar", members)
    root = tmp_path / "data"
    with pytest.raises(download.DownloadError) as info:
        download.fetch_task10(root, url=src.as_uri(), md5=_md5(src), progress=False)
    assert str(info.value) == f"{root / 'Task10_Colon.tar'}: {message}"
    assert not (root / ".extract-tmp").exists() and not (root / "Task10_Colon").exists()


def test_fetch_task10_keeps_links_inside_the_dataset(tmp_path):
    src = _link_tar(tmp_path / "mirror.tar", [
        ("Task10_Colon/dataset.json", "file", b"{}"), ("Task10_Colon/a/x", "file", b"x"),
        ("Task10_Colon/latest", "sym", "a/x")])
    data_dir = download.fetch_task10(tmp_path / "data", url=src.as_uri(), md5=_md5(src),
                                     progress=False)
    assert (data_dir / "latest").is_symlink() and (data_dir / "latest").read_bytes() == b"x"


def test_a_cached_tar_that_fails_its_md5_is_downloaded_again_saying_why(tmp_path, capsys):
    """A damaged tar left from an earlier download was replaced by a new 5.8 GB download
    without a word."""
    src = _task10_tar(tmp_path / "mirror.tar")
    dest = tmp_path / "data" / "Task10_Colon.tar"
    dest.parent.mkdir()
    dest.write_bytes(b"half a download")
    got = download.download(src.as_uri(), dest, md5=_md5(src), progress=False)
    assert got.read_bytes() == src.read_bytes()
    err = capsys.readouterr().err
    assert err.strip() == (f"{dest} does not match its md5 (a damaged or partial download): "
                           "downloading it again")


def test_fetch_task10_refuses_the_examples_phantom_as_downloaded_data(tmp_path):
    """``--download --download-root R`` where ``R/Task10_Colon`` is this example's phantom:
    the folder was taken as the verified download (no SYNTHETIC note, the paper preset, "data:
    downloaded Task10_Colon" in the report). Found by a review."""
    from msd_colon_lib.phantom import make_phantom

    make_phantom(tmp_path / "Task10_Colon", n_patients=2, seed=0, shape=(16, 16), slices=(4, 5))
    with pytest.raises(download.DownloadError, match=r"Task10_Colon holds this example's "
                       r"synthetic phantom, not the downloaded data: pass it as --data-dir"):
        download.fetch_task10(tmp_path, url="file:///nonexistent", md5="x", progress=False)
