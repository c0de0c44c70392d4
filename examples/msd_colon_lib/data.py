"""Task10_Colon loading: case list, validation, orientation, HU window, a memory-mapped slice store.

Every volume is read in one orientation, whatever its voxel order on disk: image and label are
both reoriented to the axis codes ``("L", "P", "S")`` (nibabel's closest orientation: an axis
permutation and flips, no resampling). The Decathlon stores its volumes so already, so they are
not touched, and an axial slice ``volume[:, :, k]``, transposed, displays radiologically
(anterior up, the patient's right on the left). After reorientation the image's and the label's
voxel grids (shape and affine) must agree; a label stored in mirrored voxel order with a matching
affine is thereby read aligned, and a label on another grid is refused.

Before anything is built, every case listed in ``dataset.json`` is checked from its headers:
both files exist, are readable NIfTI, are 3D, and their grids agree. Errors name the file.

The store is built once per fingerprint (the SHA-256 of every data file used, each case's
image and label, the image size, the HU window, the loading code) and reused by every run:

- ``images.npy``   float16 ``(N, S, S)``, windowed to [0, 1], resized bilinearly
- ``masks.npy``    uint8   ``(N, S, S)``, resized nearest-neighbour
- ``patients.npy`` int32   ``(N,)`` index of the patient (case) every slice comes from
- ``meta.json``    the parameters (the fingerprint), the case list and slice counts; written
  last, so a store whose ``meta.json`` exists and matches the parameters is complete.

Slices are read back with ``numpy.load(mmap_mode="r")``: the 13,486 real slices at 256x256 take
about 2.7 GB on disk (1.8 GB of float16 images, 0.9 GB of uint8 masks) and next to nothing in
memory.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import DataError
from .fingerprint import DigestCache, data_code_version, describe, differences, sha256_json

HU_WINDOW = (-160.0, 240.0)
STORE_VERSION = 2
ORIENTATION = ("L", "P", "S")
AFFINE_ATOL = 1e-3
"""Largest difference (mm) between the image's and the label's affine entries, after both were
reoriented; float32 headers of one grid agree to about 1e-5."""


@dataclass(frozen=True)
class Case:
    """One labelled volume of the dataset."""

    patient: str
    image: Path
    label: Path
    image_name: str = ""
    """The image's path relative to the dataset folder (``imagesTr/colon_001.nii.gz``)."""
    label_name: str = ""


def _relative(name: str) -> str:
    """A listed path as a key: ``./imagesTr/x.nii.gz`` -> ``imagesTr/x.nii.gz``."""
    return os.path.normpath(name).replace(os.sep, "/")


def read_cases(data_dir: str | os.PathLike[str]) -> list[Case]:
    """The labelled cases listed in ``dataset.json`` (never a directory listing).

    The real tar holds macOS ``._colon_NNN.nii.gz`` AppleDouble files beside the volumes;
    globbing ``imagesTr/*.nii.gz`` would pick them up, the dataset.json list does not.
    """
    data_dir = Path(data_dir)
    meta_path = data_dir / "dataset.json"
    if not meta_path.exists():
        raise DataError(
            f"{meta_path} not found: --data-dir must be the Task10_Colon folder "
            "(the one holding dataset.json, imagesTr/ and labelsTr/)"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise DataError(f"{meta_path}: not a readable JSON file ({error})") from error
    entries = meta.get("training") if isinstance(meta, dict) else None
    if not isinstance(entries, list):
        raise DataError(f"{meta_path}: no \"training\" list of cases")
    cases = []
    for i, entry in enumerate(entries):
        if not (isinstance(entry, dict) and isinstance(entry.get("image"), str)
                and isinstance(entry.get("label"), str)):
            raise DataError(f"{meta_path}: training entry {i} needs \"image\" and \"label\" "
                            f"paths, got {entry!r}")
        image = (data_dir / entry["image"]).resolve()
        label = (data_dir / entry["label"]).resolve()
        if image.name.startswith("._") or label.name.startswith("._"):
            continue
        patient = image.name.split(".nii")[0]
        cases.append(Case(patient, image, label, _relative(entry["image"]),
                          _relative(entry["label"])))
    if not cases:
        raise DataError(f"{meta_path} lists no training cases")
    seen: dict[str, str] = {}
    for case in cases:
        if case.patient in seen:
            raise DataError(f"{meta_path}: case {case.patient} is listed twice "
                            f"({seen[case.patient]} and {case.image_name})")
        seen[case.patient] = case.image_name
    return cases


# ----------------------------------------------------------------------------- NIfTI files

_READ_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, ValueError, zlib.error)


def _read_errors() -> tuple[type[BaseException], ...]:
    from nibabel.filebasedimages import ImageFileError

    return (*_READ_ERRORS, ImageFileError)


def _load_header(path: Path, what: str) -> Any:
    """``nibabel.load`` (header only; the voxels are read lazily), errors naming the file."""
    import nibabel as nib

    if not path.exists():
        raise DataError(f"{what} {path} is listed in dataset.json but does not exist")
    try:
        img = nib.load(str(path))
    except _read_errors() as error:
        raise DataError(f"{path}: cannot read the NIfTI header of {what} "
                        f"({type(error).__name__}: {_first_line(error)})") from error
    if len(img.shape) != 3 or 0 in img.shape:
        raise DataError(f"{path}: {what} must be a 3D volume with at least one voxel along "
                        f"each axis, got shape {tuple(img.shape)}")
    dtype = np.dtype(img.get_data_dtype())
    if dtype.kind not in "biuf":
        raise DataError(f"{path}: {what} holds voxels of type {dtype} (a CT volume or label "
                        "map holds real numbers)")
    return img


def _orientation(affine: np.ndarray) -> np.ndarray:
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    return ornt_transform(io_orientation(affine), axcodes2ornt(ORIENTATION))


def reoriented_grid(shape: tuple[int, ...], affine: np.ndarray
                    ) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of a volume once reoriented to :data:`ORIENTATION` (no voxel read).

    Equal to ``img.as_reoriented(ornt)``'s shape and affine, computed from the header.
    """
    from nibabel.orientations import inv_ornt_aff

    ornt = _orientation(affine)
    order = np.argsort(ornt[:, 0])
    new_shape = (int(shape[order[0]]), int(shape[order[1]]), int(shape[order[2]]))
    return new_shape, affine @ inv_ornt_aff(ornt, shape)


def _grid(img: Any, path: Path, what: str) -> tuple[tuple[int, int, int], np.ndarray]:
    """:func:`reoriented_grid` of a loaded header, a header whose affine has no orientation
    (a singular sform) named as the file's problem."""
    try:
        return reoriented_grid(img.shape, img.affine)
    except (ValueError, np.linalg.LinAlgError) as error:
        raise DataError(f"{path}: the affine of {what} cannot be oriented "
                        f"({type(error).__name__}: {_first_line(error)}); its header's "
                        "sform/qform is broken") from error


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def check_case(case: Case) -> tuple[int, int, int]:
    """Check one case from its headers; return its reoriented shape ``(X, Y, Z)``.

    Raises :class:`DataError` naming the file when a file is missing or unreadable, not 3D, or
    when image and label do not lie on the same voxel grid once both are reoriented.
    """
    img = _load_header(case.image, f"the image of {case.patient}")
    lab = _load_header(case.label, f"the label of {case.patient}")
    img_shape, img_affine = _grid(img, case.image, f"the image of {case.patient}")
    lab_shape, lab_affine = _grid(lab, case.label, f"the label of {case.patient}")
    if img_shape != lab_shape:
        raise DataError(
            f"{case.label}: label grid {lab_shape} differs from its image's {img_shape} "
            f"({case.image}) after both were reoriented to {''.join(ORIENTATION)}"
        )
    gap = float(np.abs(img_affine - lab_affine).max())
    if gap > AFFINE_ATOL:
        raise DataError(
            f"{case.label}: label affine differs from its image's ({case.image}) by up to "
            f"{gap:.4g} mm after both were reoriented to {''.join(ORIENTATION)}: they are not "
            "on the same voxel grid"
        )
    return img_shape


def validate_cases(cases: list[Case]) -> list[tuple[int, int, int]]:
    """:func:`check_case` for every case, before anything is built; their reoriented shapes.

    Raises one :class:`DataError` naming the first problem and how many cases have one.
    """
    shapes: list[tuple[int, int, int]] = []
    problems: list[str] = []
    for case in cases:
        try:
            shapes.append(check_case(case))
        except DataError as error:
            problems.append(str(error))
    if problems:
        more = f" (and {len(problems) - 1} more case(s) with problems)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)
    return shapes


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


def _voxels(img: Any, path: Path, what: str, dtype: Any = None) -> np.ndarray:
    try:
        return np.asarray(img.dataobj, dtype=dtype)
    except _read_errors() as error:
        raise DataError(
            f"{path}: cannot read the voxels of {what} ({type(error).__name__}: "
            f"{_first_line(error)}); the file is damaged or truncated: download or extract it "
            "again"
        ) from error


def load_case(
    case: Case, hu_window: tuple[float, float] = HU_WINDOW
) -> tuple[np.ndarray, np.ndarray]:
    """Axial slices of one case: ``(image [0,1] float32 (Z, H, W), mask uint8 (Z, H, W))``.

    Both volumes are reoriented to :data:`ORIENTATION` (``(X, Y, Z)`` = towards the patient's
    left, posterior, superior); slice ``k`` is ``volume[:, :, k]``, transposed so that rows run
    along Y (radiological display). Any label value > 0 is tumour.
    """
    from nibabel.orientations import apply_orientation

    check_case(case)
    img = _load_header(case.image, f"the image of {case.patient}")
    lab = _load_header(case.label, f"the label of {case.patient}")
    hu = apply_orientation(_voxels(img, case.image, f"the image of {case.patient}", np.float32),
                           _orientation(img.affine))
    bad = int(np.count_nonzero(~np.isfinite(hu)))
    if bad:  # windowing keeps NaN: it would reach the store and the network
        raise DataError(f"{case.image}: the image of {case.patient} holds {bad} voxel(s) that "
                        "are not finite (NaN or inf); a CT volume holds Hounsfield units")
    mask = apply_orientation(_voxels(lab, case.label, f"the label of {case.patient}") > 0,
                             _orientation(lab.affine))
    return window(hu.transpose(2, 1, 0), *hu_window), mask.transpose(2, 1, 0).astype(np.uint8)


@dataclass
class SliceStore:
    """The memory-mapped slice store; ``images``/``masks`` are opened lazily (fork-safe)."""

    root: Path
    patients: np.ndarray
    """``(N,)``: the index into :attr:`patient_names` of each slice's patient."""
    patient_names: list[str]
    """The patients (cases) in store order: ``colon_001``, ..."""
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
    def fingerprint(self) -> dict[str, Any]:
        """What the store was built from (see :func:`build_slice_store`)."""
        return dict(self.meta["params"])

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
    digest_cache: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> SliceStore:
    """Build (or reuse) the slice store of ``data_dir`` in ``cache_dir``.

    Every case of ``dataset.json`` is validated first (:func:`validate_cases`). The store is
    reused only when its fingerprint (every data file's SHA-256, ``size``, ``hu_window``, the
    loading code) matches; otherwise it is rebuilt and ``log`` is told what changed.
    ``digest_cache``: a JSON file caching the files' digests (see
    :class:`~.fingerprint.DigestCache`).
    """
    all_cases = read_cases(data_dir)
    all_shapes = validate_cases(all_cases)
    if max_cases is not None:
        if max_cases < 1:
            raise DataError(f"max_cases must be >= 1, got {max_cases}")
        all_cases, all_shapes = all_cases[:max_cases], all_shapes[:max_cases]
    cases, shapes = all_cases, all_shapes
    cache_dir = Path(cache_dir)
    digests = DigestCache(digest_cache)
    files: dict[str, str] = {}
    for case in tqdm(cases, desc="data fingerprint", unit="case", disable=not progress):
        files[case.image_name] = digests.digest(case.image)
        files[case.label_name] = digests.digest(case.label)
    digests.save()
    params = {
        "version": STORE_VERSION,
        # each case with its files: dataset.json may pair the same files otherwise
        "cases": [[c.patient, c.image_name, c.label_name] for c in cases],
        "files": files,
        "size": size,
        "hu_window": [float(v) for v in hu_window],
        "orientation": "".join(ORIENTATION),
        "code": data_code_version(),
    }
    meta_path = cache_dir / "meta.json"
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text()).get("params")
        except (OSError, ValueError):
            old = {}
        damaged = None
        if old == params:
            try:
                return open_store(cache_dir)
            except DataError as error:  # (a file cut short under an intact meta.json)
                damaged = error.__cause__ or error
        if log is not None:
            changes = (f"damaged: {damaged}" if damaged is not None
                       else describe(differences({"data": old}, {"data": params})))
            log(f"slice store {cache_dir}: rebuilding ({changes})")
    tmp = cache_dir.with_name(cache_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    counts = [shape[2] for shape in shapes]
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
            raise DataError(
                f"{case.image}: header says {counts[index]} slices, read {len(image)}"
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
        "fingerprint": sha256_json(params),
        "data_dir": str(Path(data_dir).resolve()),
        "n_slices": n,
        "n_tumour_slices": int((tumour_pixels > 0).sum()),
        "slices_per_case": counts,
        "tumour_pixels": tumour_pixels.tolist(),
    }
    (tmp / "meta.json").write_text(json.dumps(meta))
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
    os.replace(tmp, cache_dir)
    return open_store(cache_dir)


def open_store(root: str | os.PathLike[str]) -> SliceStore:
    """Open a complete slice store (``meta.json`` present); a :class:`DataError` where one
    of its files cannot be read whole (its arrays are checked here, then opened lazily)."""
    root = Path(root)
    try:
        meta = json.loads((root / "meta.json").read_text())
        patients = np.load(root / "patients.npy")
        for name in ("images.npy", "masks.npy"):
            array = np.load(root / name, mmap_mode="r")
            if len(array) != len(patients) or len(array) != meta["n_slices"]:
                raise ValueError(f"{name} holds {len(array)} slices, patients.npy "
                                 f"{len(patients)}, meta.json {meta['n_slices']}")
            del array
    except (OSError, ValueError, KeyError, EOFError) as error:
        raise DataError(f"{root}: the slice store is damaged ({error}); delete it and run "
                        "again") from error
    # (the cases are [patient, image, label] entries: the fingerprint pairs files with names)
    names = [str(case[0]) for case in meta["params"]["cases"]]
    return SliceStore(root, patients, names, meta)


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
