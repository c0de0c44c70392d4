"""Train/test splits of the slice store: by patient (default) or by slice; 80/20 or k-fold.

- ``patient``: every patient's slices land on one side only. This is the honest protocol;
  adjacent slices of one patient are nearly identical, so sharing patients inflates scores.
- ``slice``: slices are shuffled independently of their patient. This is what the paper's
  counts imply (10,788 / 2,698 are exactly floor / rest of 0.8 x 13,486).

All functions are pure and seeded: the same inputs give the same split everywhere.
"""

from __future__ import annotations

import math

import numpy as np

SPLITS = ("patient", "slice")


def _check(mode: str) -> None:
    if mode not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {mode!r}")


def train_test_split(
    patients: np.ndarray, mode: str = "patient", test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted slice indices ``(train, test)``.

    ``slice``: ``floor((1 - f) N)`` train slices, the rest test (13,486 -> 10,788 / 2,698).
    ``patient``: ``round(f P)`` (at least 1, at most ``P - 1``) test patients drawn at random.
    """
    _check(mode)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    patients = np.asarray(patients)
    rng = np.random.default_rng(seed)
    if mode == "slice":
        order = rng.permutation(len(patients))
        n_train = math.floor((1.0 - test_fraction) * len(patients) + 1e-9)
        return np.sort(order[:n_train]), np.sort(order[n_train:])
    unique = np.unique(patients)
    if len(unique) < 2:
        raise ValueError("a patient split needs at least 2 patients")
    n_test = min(len(unique) - 1, max(1, round(test_fraction * len(unique))))
    test_patients = rng.permutation(unique)[:n_test]
    is_test = np.isin(patients, test_patients)
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def kfold(
    patients: np.ndarray, k: int = 5, mode: str = "patient", seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` folds ``(train, test)``; every slice is in exactly one test fold."""
    _check(mode)
    patients = np.asarray(patients)
    rng = np.random.default_rng(seed)
    if mode == "slice":
        groups = np.array_split(rng.permutation(len(patients)), k)
        is_test = [np.isin(np.arange(len(patients)), g) for g in groups]
    else:
        unique = np.unique(patients)
        if len(unique) < k:
            raise ValueError(f"{k}-fold by patient needs at least {k} patients, got {len(unique)}")
        groups = np.array_split(rng.permutation(unique), k)
        is_test = [np.isin(patients, g) for g in groups]
    return [(np.flatnonzero(~t), np.flatnonzero(t)) for t in is_test]


def subset_split(
    indices: np.ndarray,
    patients: np.ndarray,
    fraction: float,
    mode: str = "patient",
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` (e.g. a training set) again, e.g. into train / validation.

    ``fraction`` 0 keeps every index on the first side (no validation set).
    """
    indices = np.asarray(indices)
    if fraction == 0:
        return indices, indices[:0]
    inner_train, inner_val = train_test_split(
        np.asarray(patients)[indices], mode=mode, test_fraction=fraction, seed=seed
    )
    return indices[inner_train], indices[inner_val]
