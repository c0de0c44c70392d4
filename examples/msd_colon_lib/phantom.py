"""A small deterministic synthetic CT "phantom" in the MSD Task10_Colon layout.

It is *not* patient data. It exists so that the whole pipeline (loader, splits, training,
evaluation, report) runs anywhere in minutes, exactly as it runs on the real data:

- ``dataset.json`` (MSD schema), ``imagesTr/colon_NNN.nii.gz`` (int16 HU) and
  ``labelsTr/colon_NNN.nii.gz`` (uint8, 0 background / 1 tumour), axial slices along the last
  axis, plus a macOS ``._`` AppleDouble file beside the volumes like the real tar has;
- HU-like intensities: air -1000, fat about -100, soft tissue about 40, bone about 700,
  gas-filled bowel lumen about -900 with a soft-tissue wall, image noise;
- bowel-like tubes that wander from slice to slice, and one tumour per patient: an ellipsoidal,
  slightly brighter (contrast-enhancing) blob on a bowel wall spanning about 10 % of the slices.

Everything is drawn from ``numpy.random.default_rng([seed, patient])`` (a seed sequence: no
two (seed, patient) pairs share a stream), so the volumes are the same on every machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .errors import DataError

APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(64)


def _disk(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def make_volume(
    rng: np.random.Generator,
    shape: tuple[int, int] = (128, 128),
    n_slices: int = 32,
    tumour_fraction: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """One patient: ``(image int16 HU (X, Y, Z), label uint8 (X, Y, Z))``."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    image = np.full((n_slices, h, w), -1000.0, dtype=np.float32)
    label = np.zeros((n_slices, h, w), dtype=np.uint8)

    body_ry, body_rx = h * rng.uniform(0.36, 0.42), w * rng.uniform(0.42, 0.47)
    cy, cx = h / 2 + rng.uniform(-2, 2), w / 2 + rng.uniform(-2, 2)
    n_tubes = int(rng.integers(3, 6))
    tube_phase = rng.uniform(0, 2 * np.pi, size=(n_tubes, 2))
    tube_center = np.stack(
        [
            cy + rng.uniform(-0.45, 0.2, n_tubes) * body_ry,
            cx + rng.uniform(-0.6, 0.6, n_tubes) * body_rx,
        ],
        axis=1,
    )
    tube_radius = rng.uniform(0.05, 0.09, n_tubes) * min(h, w)

    # the tumour: a run of about tumour_fraction of the slices, on the wall of one tube
    t_len = max(2, round(tumour_fraction * n_slices))
    t_start = int(rng.integers(1, max(2, n_slices - t_len - 1)))
    t_tube = int(rng.integers(n_tubes))
    t_angle = rng.uniform(0, 2 * np.pi)
    t_radius = rng.uniform(0.07, 0.1) * min(h, w)

    for z in range(n_slices):
        s = image[z]
        scale = 1.0 - 0.15 * abs(z / max(n_slices - 1, 1) - 0.5)
        body = _disk(yy, xx, cy, cx, body_ry * scale, body_rx * scale)
        inner = _disk(yy, xx, cy, cx, body_ry * scale * 0.88, body_rx * scale * 0.9)
        s[body] = -100.0  # subcutaneous fat
        s[inner] = 40.0  # soft tissue
        spine = _disk(yy, xx, cy + body_ry * scale * 0.65, cx, h * 0.06, w * 0.06)
        s[spine] = 700.0
        s[_disk(yy, xx, cy + body_ry * scale * 0.65, cx, h * 0.035, w * 0.035)] = 250.0
        # bowel-like tubes: wall of soft tissue around a gas / fluid lumen, wandering with z
        for i in range(n_tubes):
            ty = tube_center[i, 0] + 4.0 * np.sin(0.25 * z + tube_phase[i, 0])
            tx = tube_center[i, 1] + 4.0 * np.cos(0.2 * z + tube_phase[i, 1])
            r = tube_radius[i] * (1 + 0.15 * np.sin(0.3 * z + i))
            wall = _disk(yy, xx, ty, tx, r, r) & inner
            lumen = _disk(yy, xx, ty, tx, 0.7 * r, 0.7 * r) & inner
            s[wall] = 65.0
            s[lumen] = -900.0 if i % 2 == 0 else 10.0
            if i == t_tube and t_start <= z < t_start + t_len:
                frac = (z - t_start + 0.5) / t_len
                grow = np.sqrt(max(0.0, 1.0 - (2 * frac - 1) ** 2))
                rr = t_radius * (0.45 + 0.55 * grow)
                my = ty + (r * 0.85) * np.sin(t_angle)
                mx = tx + (r * 0.85) * np.cos(t_angle)
                tumour = _disk(yy, xx, my, mx, rr, rr * 1.2) & inner
                texture = rng.normal(0.0, 12.0, size=int(tumour.sum()))
                s[tumour] = 110.0 + texture
                label[z][tumour] = 1
    image += rng.normal(0.0, 18.0, size=image.shape).astype(np.float32)
    image = np.clip(np.round(image), -1024, 3071).astype(np.int16)
    # (Z, H, W) -> (X, Y, Z) like the Decathlon NIfTI volumes
    return np.ascontiguousarray(image.transpose(2, 1, 0)), np.ascontiguousarray(
        label.transpose(2, 1, 0)
    )


def is_phantom(root: str | os.PathLike[str]) -> bool:
    """Whether ``root`` holds a phantom (complete or not) that :func:`make_phantom` wrote: its
    ``phantom.json``, or a ``dataset.json`` that says SYNTHETIC."""
    root = Path(root)
    if (root / "phantom.json").is_file():
        return True
    try:
        description = json.loads((root / "dataset.json").read_text()).get("description", "")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(description, str) and description.startswith("SYNTHETIC")


def make_phantom(
    root: str | os.PathLike[str],
    *,
    n_patients: int = 10,
    shape: tuple[int, int] = (128, 128),
    slices: tuple[int, int] = (24, 32),
    tumour_fraction: float = 0.1,
    seed: int = 0,
) -> Path:
    """Write the phantom dataset to ``root`` (the ``Task10_Colon`` folder) and return it.

    An existing, complete phantom written with the same parameters by the same generator (this
    module's source) is reused. Otherwise the phantom is written whole into a folder beside
    ``root`` and moved into its place, so that a run killed while writing leaves either the
    old phantom or none, never a mix, and a smaller phantom leaves no volumes of a larger one.
    """
    root = Path(root)
    params = {
        "n_patients": n_patients,
        "shape": list(shape),
        "slices": list(slices),
        "tumour_fraction": tumour_fraction,
        "seed": seed,
        "generator": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16],
    }
    stamp = root / "phantom.json"
    try:
        if json.loads(stamp.read_text()) == params:
            return root
    except (OSError, ValueError):
        pass
    if (root / "dataset.json").exists() and not is_phantom(root):
        raise DataError(f"{root} holds a dataset that this example did not write as a "
                        "phantom; not overwritten (choose another --out)")
    place = root.resolve()  # (a symlink: the phantom goes where it points)
    place.parent.mkdir(parents=True, exist_ok=True)
    for leftover in place.parent.glob(f".{place.name}.*-*"):  # of a killed earlier build
        shutil.rmtree(leftover, ignore_errors=True)
    building = Path(tempfile.mkdtemp(prefix=f".{place.name}.building-", dir=place.parent))
    old = place.parent / f".{place.name}.old-{os.getpid()}"
    try:
        _write_phantom(building, params, n_patients, shape, slices, tumour_fraction, seed)
        if place.exists():  # two renames: a kill between them leaves no phantom, not a mix
            place.rename(old)
        building.rename(place)
    finally:
        shutil.rmtree(building, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return root


def _write_phantom(root: Path, params: dict, n_patients: int, shape: tuple[int, int],
                   slices: tuple[int, int], tumour_fraction: float, seed: int) -> None:
    import nibabel as nib

    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for p in range(n_patients):
        rng = np.random.default_rng([seed, p])
        n_slices = int(rng.integers(slices[0], slices[1] + 1))
        image, label = make_volume(rng, shape, n_slices, tumour_fraction)
        spacing = (float(rng.uniform(0.6, 0.95)),) * 2 + (float(rng.choice([2.5, 5.0])),)
        affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
        name = f"colon_{p + 1:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    # the real tar ships AppleDouble files like this one beside the volumes
    (root / "imagesTr" / "._colon_001.nii.gz").write_bytes(APPLEDOUBLE)
    dataset = {
        "name": "Colon (synthetic phantom)",
        "description": "SYNTHETIC phantom in the MSD Task10_Colon layout; not patient data",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "colon cancer primaries"},
        "numTraining": n_patients,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(dataset, indent=2))
    (root / "phantom.json").write_text(json.dumps(params))
