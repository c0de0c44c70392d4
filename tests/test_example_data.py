"""examples/msd_colon: phantom in the Task10 layout, loader, HU window, slice store, splits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from msd_colon_lib import data, splits
from msd_colon_lib.phantom import make_phantom


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("msd") / "Task10_Colon"
    return make_phantom(root, n_patients=4, shape=(40, 48), slices=(10, 14), seed=3)


def test_phantom_has_task10_layout(phantom):
    meta = json.loads((phantom / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "colon cancer primaries"}
    assert meta["numTraining"] == 4 and len(meta["training"]) == 4
    assert (phantom / "imagesTr" / "._colon_001.nii.gz").exists()  # like the real tar
    img = nib.load(phantom / "imagesTr" / "colon_001.nii.gz")
    lab = nib.load(phantom / "labelsTr" / "colon_001.nii.gz")
    assert img.shape[:2] == (48, 40) and img.shape == lab.shape  # (X, Y, Z)
    hu = np.asarray(img.dataobj)
    assert hu.dtype == np.int16 and hu.min() <= -900 and hu.max() >= 300
    labels = np.asarray(lab.dataobj)
    assert set(np.unique(labels)) == {0, 1}
    # one tumour, on a run of max(2, round(10 % of the slices)) consecutive slices
    tumour_slices = np.flatnonzero(labels.sum((0, 1)) > 0)
    run = max(2, round(0.1 * labels.shape[2]))
    np.testing.assert_array_equal(tumour_slices, np.arange(tumour_slices[0],
                                                           tumour_slices[0] + run))


def test_phantom_is_deterministic(tmp_path):
    a = make_phantom(tmp_path / "a", n_patients=2, shape=(32, 32), slices=(6, 8), seed=1)
    b = make_phantom(tmp_path / "b", n_patients=2, shape=(32, 32), slices=(6, 8), seed=1)
    for sub in ("imagesTr", "labelsTr"):
        x = np.asarray(nib.load(a / sub / "colon_002.nii.gz").dataobj)
        y = np.asarray(nib.load(b / sub / "colon_002.nii.gz").dataobj)
        np.testing.assert_array_equal(x, y)


def test_case_list_comes_from_dataset_json_not_a_glob(phantom):
    cases = data.read_cases(phantom)
    assert [c.patient for c in cases] == [f"colon_{i:03d}" for i in range(1, 5)]
    assert not any(c.image.name.startswith("._") for c in cases)
    # a directory glob would have picked up the AppleDouble file
    assert any(p.name.startswith("._") for p in (phantom / "imagesTr").glob("*.nii.gz"))


def test_missing_dataset_json_says_what_to_pass(tmp_path):
    with pytest.raises(data.DataError, match="Task10_Colon folder"):
        data.read_cases(tmp_path)


def test_hu_window():
    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 1000.0])
    np.testing.assert_allclose(data.window(hu), [0.0, 0.0, 0.5, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"HU window must have hi > lo, got \[10, 10\]"):
        data.window(hu, 10, 10)


def test_resize_bilinear_image_nearest_mask():
    image = np.zeros((1, 4, 4), np.float32)
    image[0, :, 2:] = 1.0
    mask = np.zeros((1, 4, 4), np.uint8)
    mask[0, 1:3, 1:3] = 1
    img, msk = data.resize_slices(image, mask, 8)
    assert img.shape == msk.shape == (1, 8, 8)
    assert 0.0 < img[0, 0, 3] < 1.0  # interpolated edge
    assert set(np.unique(msk)) == {0, 1} and msk.dtype == np.uint8
    assert msk.sum() == 16  # nearest: each pixel becomes a 2x2 block


def test_slice_store_matches_direct_loading(phantom, tmp_path):
    store = data.build_slice_store(phantom, tmp_path / "store", size=32, progress=False)
    cases = data.read_cases(phantom)
    counts = [nib.load(c.image).shape[2] for c in cases]
    assert len(store) == sum(counts) == store.meta["n_slices"]
    assert isinstance(store.images, np.memmap) or store.images.base is not None
    assert store.images.shape == (sum(counts), 32, 32) and store.images.dtype == np.float16
    np.testing.assert_array_equal(store.patients, np.repeat(np.arange(4), counts))
    image, mask = data.load_case(cases[1])
    image, mask = data.resize_slices(image, mask, 32)
    at = counts[0]
    np.testing.assert_allclose(store.images[at : at + counts[1]], image, atol=1e-3)
    np.testing.assert_array_equal(store.masks[at : at + counts[1]], mask)
    has_tumour = store.masks.reshape(len(store), -1).max(1) > 0
    np.testing.assert_array_equal(store.has_tumour, has_tumour)
    # every case's run of tumour slices survives the resize to 32 x 32
    runs = [max(2, round(0.1 * n)) for n in counts]
    assert store.meta["n_tumour_slices"] == int(store.has_tumour.sum()) == sum(runs)
    # reused, not rebuilt, when the parameters match
    mtime = (tmp_path / "store" / "images.npy").stat().st_mtime_ns
    again = data.build_slice_store(phantom, tmp_path / "store", size=32, progress=False)
    assert (tmp_path / "store" / "images.npy").stat().st_mtime_ns == mtime
    assert len(again) == len(store)
    ds = data.SliceDataset(store, np.array([0, at]))
    x, y, k = ds[1]
    assert x.shape == (3, 32, 32) and y.shape == (1, 32, 32) and k == at
    assert torch.equal(x[0], x[2]) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_patient_split_has_no_leak_and_is_seeded():
    patients = np.repeat(np.arange(10), 7)
    train, test = splits.train_test_split(patients, "patient", 0.2, seed=5)
    assert set(patients[train]).isdisjoint(patients[test])
    assert len(set(patients[test])) == 2 and len(train) + len(test) == len(patients)
    again = splits.train_test_split(patients, "patient", 0.2, seed=5)
    np.testing.assert_array_equal(train, again[0])
    other = splits.train_test_split(patients, "patient", 0.2, seed=6)
    assert not np.array_equal(test, other[1])


def test_slice_split_gives_the_papers_counts():
    patients = np.repeat(np.arange(126), 108)[:13486]
    train, test = splits.train_test_split(patients, "slice", 0.2, seed=0)
    assert (len(train), len(test)) == (10788, 2698)
    assert not set(patients[train]).isdisjoint(patients[test])  # slice splits share patients
    assert len(np.intersect1d(train, test)) == 0


@pytest.mark.parametrize("mode", ["patient", "slice"])
def test_kfold_partitions(mode):
    patients = np.repeat(np.arange(12), 5)
    folds = splits.kfold(patients, 5, mode, seed=0)
    tests = np.concatenate([t for _, t in folds])
    np.testing.assert_array_equal(np.sort(tests), np.arange(len(patients)))
    for train, test in folds:
        assert len(np.intersect1d(train, test)) == 0
        if mode == "patient":
            assert set(patients[train]).isdisjoint(patients[test])


def test_validation_subset_split_by_patient():
    patients = np.repeat(np.arange(10), 3)
    train, _ = splits.train_test_split(patients, "patient", 0.2, seed=0)
    inner, val = splits.subset_split(train, patients, 0.25, "patient", seed=1)
    assert set(patients[inner]).isdisjoint(patients[val])
    assert np.array_equal(np.sort(np.concatenate([inner, val])), train)


# ----------------------------------------------------------------------------- orientation


@pytest.mark.parametrize("affine", [
    np.diag([-0.7, -0.8, 2.5, 1.0]),  # LPS, like the Decathlon
    np.diag([0.7, 0.8, 2.5, 1.0]),  # RAS
    np.array([[0, 0, 2.5, 3], [0.7, 0, 0, 1], [0, -0.8, 0, 2], [0, 0, 0, 1.0]]),  # permuted
])
def test_reoriented_grid_matches_nibabel(affine):
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    img = nib.Nifti1Image(np.zeros((5, 6, 7), np.float32), affine)
    ornt = ornt_transform(io_orientation(affine), axcodes2ornt(data.ORIENTATION))
    expected = img.as_reoriented(ornt)
    shape, new_affine = data.reoriented_grid(img.shape, img.affine)
    assert shape == expected.shape
    np.testing.assert_allclose(new_affine, expected.affine)
    assert nib.aff2axcodes(new_affine) == data.ORIENTATION


def _write_case(root, name, image, label, image_affine, label_affine=None):
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, image_affine), root / "imagesTr" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(label, image_affine if label_affine is None else label_affine),
             root / "labelsTr" / f"{name}.nii.gz")
    return data.Case(name, root / "imagesTr" / f"{name}.nii.gz",
                     root / "labelsTr" / f"{name}.nii.gz", f"imagesTr/{name}.nii.gz",
                     f"labelsTr/{name}.nii.gz")


def _flip_x(affine, nx):
    """The affine of the same grid stored in mirrored x order."""
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, nx - 1
    return affine @ flip


def _volume(shape=(6, 5, 4), seed=0):
    rng = np.random.default_rng(seed)
    hu = rng.integers(-200, 300, size=shape).astype(np.int16)
    label = np.zeros(shape, np.uint8)
    label[:2, 1:3, 1] = 1  # asymmetric in x: a mirrored read would show
    return hu, label


LPS = np.diag([-0.7, -0.7, 2.5, 1.0])


def test_mirrored_label_with_matching_affine_loads_aligned(tmp_path):
    hu, label = _volume()
    reference = data.load_case(_write_case(tmp_path / "a", "c", hu, label, LPS))
    # the label stored in mirrored voxel order, its affine saying so
    mirrored = _write_case(tmp_path / "b", "c", hu, label[::-1].copy(), LPS,
                           _flip_x(LPS, hu.shape[0]))
    image, mask = data.load_case(mirrored)
    np.testing.assert_array_equal(mask, reference[1])
    np.testing.assert_array_equal(image, reference[0])
    assert mask.sum() == label.sum()


def test_image_and_label_both_in_ras_read_like_lps(tmp_path):
    hu, label = _volume()
    reference = data.load_case(_write_case(tmp_path / "a", "c", hu, label, LPS))
    ras = np.diag([0.7, 0.7, 2.5, 1.0])
    ras[:3, 3] = [-(hu.shape[0] - 1) * 0.7, -(hu.shape[1] - 1) * 0.7, 0]
    flipped = _write_case(tmp_path / "b", "c", hu[::-1, ::-1].copy(), label[::-1, ::-1].copy(),
                          ras)
    image, mask = data.load_case(flipped)
    np.testing.assert_array_equal(image, reference[0])
    np.testing.assert_array_equal(mask, reference[1])


def test_label_on_another_grid_is_refused(tmp_path):
    hu, label = _volume()
    shifted = LPS.copy()
    shifted[0, 3] += 5.0  # 5 mm off
    case = _write_case(tmp_path, "c", hu, label, LPS, shifted)
    with pytest.raises(data.DataError, match=r"labelsTr/c\.nii\.gz: label affine differs from "
                                             r"its image's .* by up to 5 mm"):
        data.check_case(case)
    case = _write_case(tmp_path / "t", "c", hu, label.transpose(1, 0, 2).copy(), LPS)
    with pytest.raises(data.DataError, match=r"label grid \(5, 6, 4\) differs from its image's "
                                             r"\(6, 5, 4\)"):
        data.check_case(case)


# ----------------------------------------------------------------------------- bad files


def _copy_phantom(phantom, tmp_path):
    import shutil

    return Path(shutil.copytree(phantom, tmp_path / "Task10_Colon"))


def test_truncated_volume_error_names_the_file(phantom, tmp_path):
    root = _copy_phantom(phantom, tmp_path)
    path = root / "labelsTr" / "colon_003.nii.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # the header survives, the voxels do not
    with pytest.raises(data.DataError, match=rf"{path}: cannot read the voxels of the label of "
                                             r"colon_003 \(EOFError: .*\); the file is damaged"):
        data.build_slice_store(root, tmp_path / "store", size=32, progress=False)


def _one_case(tmp_path, image, label, affine=LPS):
    root = tmp_path / "Task10_Colon"
    case = _write_case(root, "colon_001", image, label, affine)
    (root / "dataset.json").write_text(json.dumps({"training": [
        {"image": "./imagesTr/colon_001.nii.gz", "label": "./labelsTr/colon_001.nii.gz"}]}))
    return root, case


@pytest.mark.parametrize("kind", ["zero_slices", "rgb", "complex", "singular_affine",
                                  "nan_voxels"])
def test_a_volume_the_store_cannot_use_is_a_one_line_error_naming_it(tmp_path, kind):
    """Found by a review of the example: a volume of 0 slices and an RGB volume crashed inside
    nibabel/numpy, a singular affine in the header check, and NaN voxels went into the store
    and trained a NaN network that the report called "collapsed"."""
    hu, label = _volume(shape=(8, 8, 4))
    affine = LPS
    if kind == "zero_slices":
        hu, label = hu[:, :, :0], label[:, :, :0]
    elif kind == "rgb":
        hu = np.zeros(hu.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    elif kind == "complex":
        hu = hu.astype(np.complex64)
    elif kind == "nan_voxels":
        hu = hu.astype(np.float32)
        hu[2, 3, 1] = np.nan
    root, case = _one_case(tmp_path, hu, label, affine)
    if kind == "singular_affine":  # a header whose sform maps every x to one point
        for path in (case.image, case.label):
            volume = np.asanyarray(nib.load(path).dataobj)
            broken = nib.Nifti1Image(volume, None)
            broken.header.set_qform(None, code=0)
            broken.header.set_sform(np.diag([0.0, 1.0, 1.0, 1.0]), code=1)
            nib.save(broken, path)
    with pytest.raises(data.DataError) as info:
        data.build_slice_store(root, tmp_path / "store", size=8, progress=False)
    message = str(info.value)
    assert "\n" not in message and "colon_001" in message, message
    expected = {"zero_slices": "must be a 3D volume with at least one voxel along each axis",
                "rgb": "voxels of type", "complex": "holds voxels of type complex64",
                "singular_affine": "cannot be oriented",
                "nan_voxels": "1 voxel(s) that are not finite"}[kind]
    assert expected in message, message


def test_a_damaged_file_is_named_in_one_line(phantom, tmp_path):
    """nibabel's message for a truncated uncompressed file spans two lines; the error kept
    both (the example's errors are one line)."""
    hu, label = _volume(shape=(8, 8, 4))
    root, case = _one_case(tmp_path, hu, label)
    path = root / "imagesTr" / "colon_001.nii"
    nib.save(nib.load(case.image), path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 40])
    (root / "dataset.json").write_text(json.dumps({"training": [
        {"image": "./imagesTr/colon_001.nii", "label": "./labelsTr/colon_001.nii.gz"}]}))
    with pytest.raises(data.DataError) as info:
        data.build_slice_store(root, tmp_path / "store", size=8, progress=False)
    assert "\n" not in str(info.value) and "colon_001.nii" in str(info.value), str(info.value)


def test_missing_label_is_found_before_anything_is_built(phantom, tmp_path):
    root = _copy_phantom(phantom, tmp_path)
    (root / "labelsTr" / "colon_004.nii.gz").unlink()
    (root / "imagesTr" / "colon_002.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(data.DataError) as info:
        data.build_slice_store(root, tmp_path / "store", size=32, progress=False)
    message = str(info.value)
    assert message.startswith(f"{root / 'imagesTr' / 'colon_002.nii.gz'}: cannot read the NIfTI "
                              "header of the image of colon_002")
    assert message.endswith("(and 1 more case(s) with problems)") and "\n" not in message
    assert not (tmp_path / "store").exists() and not (tmp_path / "store.tmp").exists()
    (root / "imagesTr" / "colon_002.nii.gz").unlink()
    with pytest.raises(data.DataError, match=r"the image of colon_002 .* is listed in "
                                             r"dataset.json but does not exist"):
        data.validate_cases(data.read_cases(root))


@pytest.mark.parametrize("text, message", [
    ("{", r"dataset.json: not a readable JSON file"),
    ('{"numTraining": 1}', r'dataset.json: no "training" list of cases'),
    ('{"training": [{"image": "a.nii.gz"}]}', r'training entry 0 needs "image" and "label"'),
    ('{"training": [{"image": "x/c.nii.gz", "label": "l/c.nii.gz"},'
     ' {"image": "y/c.nii.gz", "label": "m/c.nii.gz"}]}',
     r"case c is listed twice \(x/c.nii.gz and y/c.nii.gz\)"),
])
def test_bad_dataset_json_is_named(tmp_path, text, message):
    (tmp_path / "dataset.json").write_text(text)
    with pytest.raises(data.DataError, match=message):
        data.read_cases(tmp_path)


# ----------------------------------------------------------------------------- fingerprints


def test_store_rebuilt_when_a_label_is_edited_in_place(phantom, tmp_path):
    root = _copy_phantom(phantom, tmp_path)
    digests = tmp_path / "digests.json"
    store = data.build_slice_store(root, tmp_path / "store", size=32, progress=False,
                                   digest_cache=digests)
    before = np.asarray(store.masks).copy()
    path = root / "labelsTr" / "colon_002.nii.gz"
    img = nib.load(path)
    label = np.asarray(img.dataobj).copy()
    label[...] = 0  # the tumour of colon_002 erased, same file name, same shape
    stat = path.stat()
    nib.save(nib.Nifti1Image(label, img.affine, img.header), path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime
    lines = []
    again = data.build_slice_store(root, tmp_path / "store", size=32, progress=False,
                                   digest_cache=digests, log=lines.append)
    assert lines == [f"slice store {tmp_path / 'store'}: rebuilding "
                     "(data file labelsTr/colon_002.nii.gz changed)"]
    rows = again.patients == 1
    assert before[rows].sum() > 0 and np.asarray(again.masks)[rows].sum() == 0
    np.testing.assert_array_equal(np.asarray(again.masks)[~rows], before[~rows])
    # unchanged files: reused, nothing hashed again
    third = []
    data.build_slice_store(root, tmp_path / "store", size=32, progress=False,
                           digest_cache=digests, log=third.append)
    assert third == []


def test_store_rebuilt_when_dataset_json_pairs_images_with_other_labels(tmp_path):
    """Two labels swapped in ``dataset.json`` (same files, same digests, same case names):
    the store and every run on it were reused with the old pairing. Found by a review of the
    example."""
    root = tmp_path / "Task10_Colon"
    hu, label = _volume(shape=(16, 16, 6))
    _write_case(root, "colon_001", hu, label, LPS)
    _write_case(root, "colon_002", hu, np.zeros_like(label), LPS)
    training = [{"image": f"./imagesTr/colon_00{i}.nii.gz",
                 "label": f"./labelsTr/colon_00{i}.nii.gz"} for i in (1, 2)]
    (root / "dataset.json").write_text(json.dumps({"training": training}))
    store = data.build_slice_store(root, tmp_path / "store", size=16, progress=False)
    masks = np.asarray(store.masks)
    first = np.asarray(store.patients) == 0
    assert masks[first].sum() > 0 and masks[~first].sum() == 0
    training[0]["label"], training[1]["label"] = training[1]["label"], training[0]["label"]
    (root / "dataset.json").write_text(json.dumps({"training": training}))
    lines = []
    again = data.build_slice_store(root, tmp_path / "store", size=16, progress=False,
                                   log=lines.append)
    assert len(lines) == 1 and "rebuilding" in lines[0], lines
    swapped = np.asarray(again.masks)
    assert swapped[first].sum() == 0 and swapped[~first].sum() > 0
    assert again.fingerprint != store.fingerprint


def test_digest_cache_rehashes_a_file_edited_in_place(tmp_path):
    from msd_colon_lib.fingerprint import DigestCache, sha256_file

    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 100)
    cache = DigestCache(tmp_path / "cache.json")
    first = cache.digest(path)
    cache.save()
    stat = path.stat()
    path.write_bytes(b"b" * 100)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = DigestCache(tmp_path / "cache.json")
    assert again.digest(path) == sha256_file(path) != first
    assert again.hashed == [str(path.resolve())]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_an_interrupted_rebuild_of_the_phantom_is_never_reused(tmp_path, monkeypatch):
    """The stamp of the old phantom stayed while its volumes were overwritten: a run killed
    during a rebuild with another seed left a mix that the next run took as complete."""
    from msd_colon_lib import phantom as phantom_module

    kwargs = dict(n_patients=3, shape=(32, 32), slices=(6, 8))
    clean = _files(make_phantom(tmp_path / "clean", seed=0, **kwargs))
    root = tmp_path / "Task10_Colon"
    make_phantom(root, seed=0, **kwargs)
    made = []
    real = phantom_module.make_volume

    def dies_on_the_second(*args, **kw):
        if len(made) == 1:
            raise KeyboardInterrupt  # the run is killed here
        made.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(phantom_module, "make_volume", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        make_phantom(root, seed=1, **kwargs)
    monkeypatch.setattr(phantom_module, "make_volume", real)
    make_phantom(root, seed=0, **kwargs)
    assert _files(root) == clean


def test_a_smaller_phantom_leaves_no_volumes_of_the_larger_one(tmp_path):
    root = tmp_path / "Task10_Colon"
    make_phantom(root, n_patients=3, shape=(32, 32), slices=(6, 8), seed=0)
    make_phantom(root, n_patients=2, shape=(32, 32), slices=(6, 8), seed=0)
    names = sorted(p.name for p in (root / "labelsTr").iterdir())
    assert names == ["colon_001.nii.gz", "colon_002.nii.gz"]


def test_a_phantom_left_without_its_stamp_by_an_older_version_is_rebuilt(tmp_path):
    """An older version wrote the volumes first and its stamp last: a first build killed under
    it leaves volumes and no stamp nor dataset.json, which must be rebuilt, not refused."""
    root = tmp_path / "Task10_Colon"
    (root / "imagesTr").mkdir(parents=True)
    (root / "imagesTr" / "colon_001.nii.gz").write_bytes(b"half")
    make_phantom(root, n_patients=2, shape=(32, 32), slices=(6, 8), seed=0)
    assert _files(root) == _files(make_phantom(tmp_path / "clean", n_patients=2,
                                               shape=(32, 32), slices=(6, 8), seed=0))


def test_a_real_dataset_is_never_overwritten_by_the_phantom(tmp_path):
    from msd_colon_lib.errors import DataError

    root = tmp_path / "Task10_Colon"
    root.mkdir()
    (root / "dataset.json").write_text('{"description": "Colon cancer segmentation"}')
    with pytest.raises(DataError, match="not overwritten"):
        make_phantom(root, n_patients=2, shape=(32, 32), slices=(6, 8), seed=0)
    assert (root / "dataset.json").exists()


def test_a_phantom_behind_a_symlink_is_rebuilt_where_the_link_points(tmp_path):
    target = tmp_path / "elsewhere"
    make_phantom(target, n_patients=2, shape=(32, 32), slices=(6, 8), seed=0)
    link = tmp_path / "Task10_Colon"
    link.symlink_to(target)
    make_phantom(link, n_patients=2, shape=(32, 32), slices=(6, 8), seed=1)
    assert link.is_symlink()
    assert _files(link) == _files(make_phantom(tmp_path / "clean", n_patients=2,
                                               shape=(32, 32), slices=(6, 8), seed=1))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_the_store_names_its_patients(phantom, tmp_path):
    """``patient_names`` held each case's [patient, image, label] entry, which the report and
    the qualitative figure printed as the patient."""
    store = data.build_slice_store(phantom, tmp_path / "store", size=32, progress=False)
    names = [f"colon_{i:03d}" for i in range(1, 5)]
    assert store.patient_names == names
    assert data.open_store(tmp_path / "store").patient_names == names
    assert [store.patient_names[p] for p in np.unique(store.patients)] == names


@pytest.mark.parametrize(("n", "fraction", "train"), [(10, 0.9, 1), (90, 0.3, 63), (170, 0.3, 119),
                                                      (10, 0.2, 8)])
def test_slice_split_is_floor_of_the_train_fraction(n, fraction, train):
    """``floor((1 - f) N)`` train slices as the docstring says, where ``(1 - f) N`` is an
    integer that float arithmetic puts just below it (``(1 - 0.3) * 90 = 62.99999999999999``)."""
    got_train, got_test = splits.train_test_split(np.arange(n), "slice", fraction, seed=0)
    assert (len(got_train), len(got_test)) == (train, n - train)
    assert sorted([*got_train, *got_test]) == list(range(n))


def test_patient_split_keeps_a_training_patient():
    """``round(f P)`` test patients, at least one and at most ``P - 1``: a large fraction of
    two patients still trains on one."""
    patients = np.array(["a", "a", "b", "b"])
    train, test = splits.train_test_split(patients, "patient", 0.8, seed=0)
    assert len(train) == 2 and len(test) == 2
    assert len(set(patients[train])) == 1 and set(patients[train]).isdisjoint(patients[test])


def test_a_damaged_slice_store_is_rebuilt_and_refused_when_opened_alone(phantom, tmp_path):
    """A truncated ``images.npy`` (a full disk, a copy cut short) under an intact
    ``meta.json``: the next run crashed with numpy's "mmap length is greater than file size"
    at its first batch, and never rebuilt the store. It is rebuilt now, saying why; opened
    alone it is a DataError naming the store. Found by a review."""
    cache = tmp_path / "store"
    store = data.build_slice_store(phantom, cache, size=32, progress=False)
    want = np.asarray(store.images[3], dtype=np.float32)
    with open(cache / "images.npy", "r+b") as f:
        f.truncate(5000)
    with pytest.raises(data.DataError, match=rf"{cache}: the slice store is damaged \(.*\); "
                       r"delete it and run again"):
        data.open_store(cache)
    said = []
    rebuilt = data.build_slice_store(phantom, cache, size=32, progress=False, log=said.append)
    assert np.array_equal(np.asarray(rebuilt.images[3], dtype=np.float32), want)
    assert len(said) == 1 and said[0].startswith(f"slice store {cache}: rebuilding (damaged:")
