"""Task10_Colon loading: case list, NIfTI reading, HU window, a memory-mapped 2D slice store.

The store is built once per (data folder, image size, HU window) and reused by every run:

- ``images.npy``   float16 ``(N, S, S)``, windowed to [0, 1], resized bilinearly
- ``masks.npy``    uint8   ``(N, S, S)``, resized nearest-neighbour
- ``patients.npy`` int32   ``(N,)`` index of the patient (case) every slice comes from
- ``meta.json``    the case list, parameters and slice counts; written last, so a store whose
  ``meta.json`` exists and matches the parameters is complete.

Slices are read back with ``numpy.load(mmap_mode="r")``: the 13,486 real slices at 256x256 take
about 1.8 GB on disk and next to nothing in memory.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

HU_WINDOW = (-160.0, 240.0)
STORE_VERSION = 1


@dataclass(frozen=True)
class Case:
    """One labelled volume of the dataset."""

    patient: str
    image: Path
    label: Path


def read_cases(data_dir: str | os.PathLike[str]) -> list[Case]:
    """The labelled cases listed in ``dataset.json`` (never a directory listing).

    The real tar holds macOS ``._colon_NNN.nii.gz`` AppleDouble files beside the volumes;
    globbing ``imagesTr/*.nii.gz`` would pick them up, the dataset.json list does not.
    """
    data_dir = Path(data_dir)
    meta_path = data_dir / "dataset.json"
    if not meta_path.exists():
        raise FileNotFoundError(
            f"{meta_path} not found: --data-dir must be the Task10_Colon folder "
            "(the one holding dataset.json, imagesTr/ and labelsTr/)"
        )
    meta = json.loads(meta_path.read_text())
    cases = []
    for entry in meta["training"]:
        image = (data_dir / entry["image"]).resolve()
        label = (data_dir / entry["label"]).resolve()
        if image.name.startswith("._") or label.name.startswith("._"):
            continue
        patient = image.name.split(".nii")[0]
        cases.append(Case(patient, image, label))
    if not cases:
        raise ValueError(f"{meta_path} lists no training cases")
    return cases


def window(hu: np.ndarray, lo: float = HU_WINDOW[0], hi: float = HU_WINDOW[1]) -> np.ndarray:
    """Clip Hounsfield units to [lo, hi] and scale linearly to [0, 1] (float32)."""
    if not hi > lo:
        raise ValueError(f"HU window must have hi > lo, got [{lo}, {hi}]")
    out = (np.asarray(hu, dtype=np.float32) - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0)


def resize_slices(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize ``(Z, H, W)`` slices to ``(Z, size, size)``: image bilinear, mask nearest."""
    img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[:, None]
    msk = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[:, None]
    if img.shape[-2:] != (size, size):
        img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)
        msk = F.interpolate(msk, size=(size, size), mode="nearest")
    return img[:, 0].numpy(), (msk[:, 0].numpy() > 0.5).astype(np.uint8)


def load_case(
    case: Case, hu_window: tuple[float, float] = HU_WINDOW
) -> tuple[np.ndarray, np.ndarray]:
    """Axial slices of one case: ``(image [0,1] float32 (Z, H, W), mask uint8 (Z, H, W))``.

    Task10 volumes are stored ``(X, Y, Z)``; slice ``k`` is ``volume[:, :, k]``, transposed so
    that rows run along Y (the usual radiological display).
    """
    import nibabel as nib

    img = nib.load(str(case.image))
    lab = nib.load(str(case.label))
    if img.shape != lab.shape:
        raise ValueError(f"{case.patient}: image {img.shape} and label {lab.shape} differ")
    hu = np.asarray(img.dataobj, dtype=np.float32)
    mask = np.asarray(lab.dataobj) > 0
    return window(hu.transpose(2, 1, 0), *hu_window), mask.transpose(2, 1, 0).astype(np.uint8)


@dataclass
class SliceStore:
    """The memory-mapped slice store; ``images``/``masks`` are opened lazily (fork-safe)."""

    root: Path
    patients: np.ndarray
    patient_names: list[str]
    meta: dict

    _images: np.ndarray | None = None
    _masks: np.ndarray | None = None

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.root / "images.npy", mmap_mode="r")
        return self._images

    @property
    def masks(self) -> np.ndarray:
        if self._masks is None:
            self._masks = np.load(self.root / "masks.npy", mmap_mode="r")
        return self._masks

    def __len__(self) -> int:
        return len(self.patients)

    @property
    def has_tumour(self) -> np.ndarray:
        return np.asarray(self.meta["tumour_pixels"]) > 0

    def __getstate__(self) -> dict:  # never pickle open memmaps into worker processes
        state = self.__dict__.copy()
        state["_images"] = state["_masks"] = None
        return state


def build_slice_store(
    data_dir: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    *,
    size: int = 256,
    hu_window: tuple[float, float] = HU_WINDOW,
    max_cases: int | None = None,
    progress: bool = True,
) -> SliceStore:
    """Build (or reuse) the slice store of ``data_dir`` in ``cache_dir``."""
    import nibabel as nib

    cases = read_cases(data_dir)
    if max_cases is not None:
        cases = cases[:max_cases]
    cache_dir = Path(cache_dir)
    params = {
        "version": STORE_VERSION,
        "data_dir": str(Path(data_dir).resolve()),
        "cases": [c.patient for c in cases],
        "size": size,
        "hu_window": list(hu_window),
    }
    meta_path = cache_dir / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("params") == params:
            return _open(cache_dir, meta)
    tmp = cache_dir.with_name(cache_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    counts = [int(nib.load(str(c.image)).shape[2]) for c in cases]
    n = sum(counts)
    images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.float16, (n, size, size))
    masks = np.lib.format.open_memmap(tmp / "masks.npy", "w+", np.uint8, (n, size, size))
    patients = np.empty(n, dtype=np.int32)
    tumour_pixels = np.empty(n, dtype=np.int64)
    at = 0
    bar = tqdm(cases, desc="slice store", unit="case", disable=not progress)
    for index, case in enumerate(bar):
        image, mask = load_case(case, hu_window)
        if image.shape[0] != counts[index]:
            raise ValueError(
                f"{case.patient}: header says {counts[index]} slices, read {len(image)}"
            )
        image, mask = resize_slices(image, mask, size)
        k = len(image)
        images[at : at + k] = image.astype(np.float16)
        masks[at : at + k] = mask
        patients[at : at + k] = index
        tumour_pixels[at : at + k] = mask.reshape(k, -1).sum(1)
        at += k
    images.flush()
    masks.flush()
    del images, masks
    np.save(tmp / "patients.npy", patients)
    meta = {
        "params": params,
        "n_slices": n,
        "n_tumour_slices": int((tumour_pixels > 0).sum()),
        "slices_per_case": counts,
        "tumour_pixels": tumour_pixels.tolist(),
    }
    (tmp / "meta.json").write_text(json.dumps(meta))
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
    os.replace(tmp, cache_dir)
    return _open(cache_dir, meta)


def _open(root: Path, meta: dict) -> SliceStore:
    patients = np.load(root / "patients.npy")
    return SliceStore(root, patients, list(meta["params"]["cases"]), meta)


class SliceDataset(torch.utils.data.Dataset):
    """``(image (3, S, S) float32, mask (1, S, S) float32, slice index)`` for chosen slices.

    The single CT channel is repeated to the three channels the ImageNet-style encoder expects.
    """

    def __init__(self, store: SliceStore, indices: np.ndarray) -> None:
        self.store = store
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        k = int(self.indices[i])
        image = torch.from_numpy(np.asarray(self.store.images[k], dtype=np.float32))
        mask = torch.from_numpy(np.asarray(self.store.masks[k], dtype=np.float32))
        return image.expand(3, -1, -1).contiguous(), mask[None], k
