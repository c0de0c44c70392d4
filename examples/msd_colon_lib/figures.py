"""The report's figures: training loss per term (the paper's Fig. 2) and one test slice (Fig. 3)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .experiments import RunSpec, kind

REGION = ("dice", "iou", "jaccard", "tversky")
LOSS_CURVE_PANELS = 6
"""Switching and composite losses in the loss-curve figure (one panel each, kinds in turn)."""
QUALITATIVE_PANELS = 6
"""Predictions in the qualitative figure (single, composite and switching losses in turn)."""


def unique(runs: Sequence[tuple[RunSpec, dict[str, Any]]]) -> list[tuple[RunSpec, dict[str, Any]]]:
    """One entry per run folder (a run can serve several sections of the report)."""
    seen: dict[str, tuple[RunSpec, dict[str, Any]]] = {}
    for spec, res in runs:
        seen.setdefault(spec.name, (spec, res))
    return list(seen.values())


def _in_turn(runs: Sequence[tuple[RunSpec, dict[str, Any]]], kinds: Sequence[str],
             limit: int) -> list[tuple[RunSpec, dict[str, Any]]]:
    """Up to ``limit`` runs, the first of each loss, taken from ``kinds`` in turn (so that
    every kind the grid ran is shown, however many losses one kind has)."""
    queues: dict[str, list[tuple[RunSpec, dict[str, Any]]]] = {k: [] for k in kinds}
    seen = set()
    for spec, res in unique(runs):
        if kind(spec.loss) in queues and spec.loss not in seen:
            seen.add(spec.loss)
            queues[kind(spec.loss)].append((spec, res))
    chosen = []
    for group in itertools.zip_longest(*queues.values()):
        chosen.extend(run for run in group if run is not None)
    return chosen[:limit]


def loss_curve_runs(runs: Sequence[tuple[RunSpec, dict[str, Any]]]) -> list[RunSpec]:
    """The runs whose loss curves are drawn (:func:`plot_loss_curves`)."""
    return [spec for spec, _ in _in_turn(runs, ("switch", "composite"), LOSS_CURVE_PANELS)]


def qualitative_runs(runs: Sequence[tuple[RunSpec, dict[str, Any]]]) -> list[RunSpec]:
    """The runs whose predictions are shown (:func:`plot_qualitative`), Table 4's aside."""
    runs = [(spec, res) for spec, res in runs if spec.table != "table4"]
    return [spec for spec, _ in _in_turn(runs, ("single", "composite", "switch"),
                                         QUALITATIVE_PANELS)]


def _has_slice(res: dict[str, Any], slice_index: int) -> bool:
    """Whether the run saved its prediction of test slice ``slice_index``."""
    file = Path(res["_dir"]) / "predictions.npz" if "_dir" in res else None
    if file is None or not file.exists():
        return False
    with np.load(file) as z:
        return f"slice_{slice_index}" in z


def _term_series(history: list[dict], name: str) -> np.ndarray:
    return np.array([h["terms"].get(name, np.nan) if h["terms"].get(name) is not None else np.nan
                     for h in history], dtype=float)


def _switch_epochs(history: list[dict]) -> list[int]:
    return [h["epoch"] - 1 for a, h in itertools.pairwise(history) if h["stage"] != a["stage"]]


def plot_loss_curves(path: Path, runs: Sequence[tuple[RunSpec, dict[str, Any]]]) -> bool:
    """Per-term training loss of switching and composite runs (first seed/fold of each; up to
    :data:`LOSS_CURVE_PANELS`, the two kinds in turn).

    Region and distribution terms live on different scales (0.3-1 vs < 0.01), so they get
    separate axes: region terms on the top row (linear), distribution terms on the bottom row
    (log scale). The switch is marked by a dashed line. The last panel shows validation Dice.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    chosen_list = _in_turn(runs, ("switch", "composite"), LOSS_CURVE_PANELS)
    if not chosen_list:
        return False
    n = len(chosen_list)
    fig, axes = plt.subplots(2, n + 1, figsize=(4.2 * (n + 1), 6.4), squeeze=False)
    for j, (spec, res) in enumerate(chosen_list):
        hist = res["history"]
        epochs = np.array([h["epoch"] for h in hist])
        names = sorted({k for h in hist for k in h["terms"]})
        top, bottom = axes[0, j], axes[1, j]
        for name in names:
            y = _term_series(hist, name)
            is_region = any(name.lower().startswith(r) for r in REGION)
            ax = top if is_region else bottom
            ax.plot(epochs, y, marker="o", ms=3, label=name)
        for ax in (top, bottom):
            for s in _switch_epochs(hist):
                ax.axvline(s + 0.5, color="k", ls="--", lw=1, label="switch")
            ax.set_xlim(0.5, len(hist) + 0.5)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
        top.set_title(f"{spec.loss}", fontsize=10)
        top.set_ylabel("region loss (linear)")
        bottom.set_ylabel("distribution loss (log)")
        if any(len(line.get_ydata()) and not np.all(np.isnan(line.get_ydata()))
               for line in bottom.lines if line.get_label() != "switch"):
            bottom.set_yscale("log")
    ax = axes[0, n]
    has_val = any("val_dice_global" in h for _, res in runs for h in res["history"])
    key = "val_dice_global" if has_val else "train_loss"
    seen: set[str] = set()
    styles = ["-", "--", ":", "-."]
    for spec, res in runs:
        if spec.loss in seen or spec.table == "table4":
            continue
        hist = res["history"]
        ax.plot([h["epoch"] for h in hist], [h.get(key) for h in hist],
                marker="os^vD<>"[len(seen) % 7], ms=6 - len(seen) % 3,
                ls=styles[len(seen) % 4], label=spec.loss, alpha=0.85)
        seen.add(spec.loss)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if has_val:
        ax.set_title("validation Dice (global); same-seed runs\nshare their first stage",
                     fontsize=9)
    else:
        ax.set_title("training loss (no validation set)", fontsize=9)
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    if seen:
        ax.legend(fontsize=7)
    else:  # Table 4's folds alone: nothing to compare here (an empty legend warned)
        ax.axis("off")
    axes[1, n].axis("off")
    fig.suptitle("Training loss per term; region and distribution losses on separate axes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_qualitative(
    path: Path, runs: Sequence[tuple[RunSpec, dict[str, Any]]], store: Any, slice_index: int
) -> bool:
    """Image, ground truth and the predictions of single, composite and switching runs (up to
    :data:`QUALITATIVE_PANELS`, the kinds in turn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    # runs whose predictions file lacks the slice are passed over (the next of their kind)
    with_slice = [(spec, res) for spec, res in runs if spec.table != "table4"
                  and _has_slice(res, slice_index)]
    for spec, res in _in_turn(with_slice, ("single", "composite", "switch"),
                              QUALITATIVE_PANELS):
        with np.load(Path(res["_dir"]) / "predictions.npz") as z:
            panels.append((spec.loss, np.asarray(z[f"slice_{slice_index}"], dtype=np.float32)))
    if not panels:
        return False
    image = np.asarray(store.images[slice_index], dtype=np.float32)
    mask = np.asarray(store.masks[slice_index])
    n = len(panels) + 2
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 3.0))
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("image")
    axes[1].imshow(image, cmap="gray", vmin=0, vmax=1)
    axes[1].contour(mask, levels=[0.5], colors="lime", linewidths=1)
    axes[1].imshow(np.ma.masked_where(mask == 0, mask), cmap="autumn", alpha=0.5)
    axes[1].set_title("ground truth")
    for ax, (name, prob) in zip(axes[2:], panels, strict=True):
        pred = prob >= 0.5
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        ax.imshow(np.ma.masked_where(~pred, pred), cmap="cool", alpha=0.6)
        ax.contour(mask, levels=[0.5], colors="lime", linewidths=1)
        tp = float((pred & (mask > 0)).sum())
        dice = 2 * tp / max(pred.sum() + mask.sum(), 1)
        ax.set_title(f"{name}\nDice {dice:.2f}", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    pid = store.patient_names[int(store.patients[slice_index])]
    fig.suptitle(f"test slice {slice_index} ({pid}), the test slice with the most tumour; "
                 "green: ground-truth outline", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.88))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
