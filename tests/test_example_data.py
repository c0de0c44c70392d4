"""examples/msd_colon: phantom in the Task10 layout, loader, HU window, slice store, splits."""

from __future__ import annotations

import json

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
    with pytest.raises(FileNotFoundError, match="Task10_Colon folder"):
        data.read_cases(tmp_path)


def test_hu_window():
    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 1000.0])
    np.testing.assert_allclose(data.window(hu), [0.0, 0.0, 0.5, 1.0, 1.0])
    with pytest.raises(ValueError):
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
