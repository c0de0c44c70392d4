"""report.md (tables laid out like the paper's Tables 1-4), runs.csv and the two figures."""

from __future__ import annotations

import csv
import itertools
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import PAPER_TITLE
from .evaluation import CONVENTIONS, METRIC_KEYS
from .experiments import (
    PAPER_TABLE1,
    PAPER_TABLE2,
    PAPER_TABLE3,
    PAPER_TABLE4,
    RunSpec,
    compare,
    kind,
    mean_std,
)

CONVENTION_TITLES = {
    "slice": "per slice (empty=1)",
    "tumour": "tumour slices",
    "global": "global (pixels)",
    "patient": "per patient 3D",
}
REGION = ("dice", "iou", "jaccard", "tversky")
ORDER = {
    "table1": list(PAPER_TABLE1),
    "table2": list(PAPER_TABLE2),
    "table3": list(PAPER_TABLE3),
}


def _fmt(mean: float, std: float) -> str:
    if mean is None or math.isnan(mean):
        return "—"
    return f"{mean:.4f}" if std is None or math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def _p(p: float) -> str:
    return "—" if p is None or math.isnan(p) else (f"{p:.2e}" if p < 1e-3 else f"{p:.4f}")


def write_csv(path: Path, runs: Sequence[tuple[RunSpec, dict[str, Any]]]) -> None:
    fields = ["run", "table", "loss", "kind", "seed", "fold", "epochs", "n_train", "n_val",
              "n_test", *[f"test_{k}" for k in METRIC_KEYS], "best_val", "train_seconds"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for spec, res in runs:
            writer.writerow({
                "run": spec.name, "table": spec.table, "loss": spec.loss, "kind": kind(spec.loss),
                "seed": spec.seed, "fold": "" if spec.fold is None else spec.fold,
                "epochs": spec.epochs, "n_train": res["n_train"], "n_val": res["n_val"],
                "n_test": res["n_test"],
                **{f"test_{k}": res["test"][k] for k in METRIC_KEYS},
                "best_val": res["best_val"],
                "train_seconds": round(sum(h["seconds"] for h in res["history"]), 2),
            })


def _table(rows: dict[str, list[dict]], table: str) -> list[str]:
    head = ["Loss", "runs"]
    for c in CONVENTIONS:
        head += [f"Dice {CONVENTION_TITLES[c]}", f"IoU {CONVENTION_TITLES[c]}"]
    head += ["paper Dice", "paper IoU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = ORDER[table]
    keys = sorted(rows, key=lambda k: (order.index(k) if k in order else len(order), k))
    for key in keys:
        results = rows[key]
        cells = [f"`{results[0]['_spec'].loss}`", str(len(results))]
        for c in CONVENTIONS:
            for m in ("dice", "iou"):
                cells.append(_fmt(*mean_std([r["test"][f"{m}_{c}"] for r in results])))
        paper = {"table1": PAPER_TABLE1, "table2": PAPER_TABLE2, "table3": PAPER_TABLE3}[table]
        if key in paper:
            p = paper[key]
            cells += ([_fmt(p[0], p[1]), _fmt(p[2], p[3])] if len(p) == 4
                      else [f"{p[0]:.4f}", f"{p[1]:.4f}"])
        else:
            cells += ["—", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def table4_rows(runs: Sequence[tuple[RunSpec, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per pair and convention: CF/DA means over folds and both t-tests (Dice and IoU)."""
    by_pair: dict[str, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for spec, res in runs:
        if spec.table == "table4":
            by_pair[spec.pair][kind(spec.loss)][spec.fold] = res["test"]
    out = []
    for pair, groups in by_pair.items():
        folds = sorted(set(groups["composite"]) & set(groups["switch"]))
        for c in CONVENTIONS:
            row: dict[str, Any] = {"pair": pair, "convention": c, "folds": len(folds)}
            for m in ("dice", "iou"):
                cf = [groups["composite"][f][f"{m}_{c}"] for f in folds]
                da = [groups["switch"][f][f"{m}_{c}"] for f in folds]
                row[m] = compare(cf, da) if folds else None
            out.append(row)
    return out


def write_report(
    out_dir: Path,
    runs: Sequence[tuple[RunSpec, dict[str, Any]]],
    *,
    setup: dict[str, Any],
    store: Any = None,
    qualitative_slice: int | None = None,
) -> Path:
    """Write ``report.md``, ``runs.csv``, ``loss_curves.png`` and ``qualitative.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "runs.csv", runs)
    figures = []
    try:
        if plot_loss_curves(out_dir / "loss_curves.png", runs):
            figures.append(("Training loss per term (the paper's Fig. 2)", "loss_curves.png"))
        if store is not None and qualitative_slice is not None and plot_qualitative(
            out_dir / "qualitative.png", runs, store, qualitative_slice
        ):
            figures.append(("One test slice (the paper's Fig. 3)", "qualitative.png"))
    except ImportError as error:  # matplotlib missing: the tables are still written
        figures.append((f"figures skipped: {error}", None))

    lines = ["# MSD Task10_Colon: switching losses, reproduction report", ""]
    if setup.get("synthetic"):
        lines += [
            "> **SYNTHETIC DATA.** These numbers come from the embedded *phantom* "
            "(generated CT-like volumes in the Task10_Colon layout), not from patient data, on a "
            "scaled-down grid. They show that the pipeline runs; they say nothing about the "
            "paper's claims. Run with `--data-dir PATH/Task10_Colon` or `--download` for real "
            "data and `--preset paper` for the paper's protocol.",
            "",
        ]
    lines += [f"Paper: {PAPER_TITLE}.", "", "## Setup", ""]
    lines += [f"- {k}: {v}" for k, v in setup.items()]
    lines += [
        "",
        "Test-set metrics of the final (last-epoch) model at threshold 0.5, mean ± sample std "
        "over seeds (or folds). Four ways to average Dice/IoU (see docs/example.md): per slice "
        "with empty-vs-empty = 1, per slice over tumour slices only, global over all test "
        "pixels, per patient in 3D. The paper does not say which it used; its numbers are "
        "shown beside ours.",
        "",
    ]
    by_table: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for spec, res in runs:
        if spec.table != "table4":
            by_table[spec.table][spec.key].append({**res, "_spec": spec})
    titles = {
        "table1": "Table 1 — single losses",
        "table2": "Table 2 — composite losses (L = L_A + L_B)",
        "table3": "Table 3 — switching (region loss, then distribution loss)",
    }
    for table in ("table1", "table2", "table3"):
        if table in by_table:
            epochs = sorted({r["_spec"].epochs for rs in by_table[table].values() for r in rs})
            lines += [f"## {titles[table]} ({', '.join(map(str, epochs))} epochs)", ""]
            lines += [*_table(by_table[table], table), ""]
    rows4 = table4_rows(runs)
    if rows4:
        lines += [
            "## Table 4 — cross-validation, composite (CF) vs switching (DA)",
            "",
            "Per pair and averaging convention: mean over folds, and two-sided p-values of the "
            "**paired t-test** (`scipy.stats.ttest_rel`; folds are shared, so this is the "
            "appropriate test) and of **Student's two-sample t-test** with equal variances "
            "(`scipy.stats.ttest_ind(equal_var=True)`; ignores the pairing). The paper reports "
            "p < 0.003 for every pair without naming its test.",
            "",
            "| Pair | convention | folds | CF Dice | DA Dice | paired p | Student p | CF IoU | "
            "DA IoU | paired p | Student p | paper Dice CF vs DA | paper IoU CF vs DA |",
            "|" + "---|" * 13,
        ]
        for row in rows4:
            p = PAPER_TABLE4.get(row["pair"])
            d, i = row["dice"], row["iou"]
            if d is None:
                continue
            lines.append(
                f"| {row['pair'].replace('&', ' & ')} | {CONVENTION_TITLES[row['convention']]} | "
                f"{row['folds']} | {d['cf_mean']:.4f} | {d['da_mean']:.4f} | {_p(d['paired_p'])} | "
                f"{_p(d['student_p'])} | {i['cf_mean']:.4f} | {i['da_mean']:.4f} | "
                f"{_p(i['paired_p'])} | {_p(i['student_p'])} | "
                + (f"{p[0]:.2f} vs {p[1]:.2f} | {p[2]:.2f} vs {p[3]:.2f} |" if p else "— | — |")
            )
        lines.append("")
    lines += ["## Figures", ""]
    for caption, name in figures:
        lines += [f"**{caption}**", ""] + ([f"![{caption}]({name})", ""] if name else [])
    lines += [
        "## Files",
        "",
        "- `runs.csv`: one row per run (all metrics).",
        "- `<table>/<loss>/<seed|fold>/`: `config.json`, `log.jsonl` (per epoch: active stage, "
        "each loss term, LR, validation metrics), `last.pt`, `best.pt`, `result.json`.",
        "",
    ]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _term_series(history: list[dict], name: str) -> np.ndarray:
    return np.array([h["terms"].get(name, np.nan) if h["terms"].get(name) is not None else np.nan
                     for h in history], dtype=float)


def _switch_epochs(history: list[dict]) -> list[int]:
    return [h["epoch"] - 1 for a, h in itertools.pairwise(history) if h["stage"] != a["stage"]]


def plot_loss_curves(path: Path, runs: Sequence[tuple[RunSpec, dict[str, Any]]]) -> bool:
    """Per-term training loss of switching and composite runs (first seed/fold of each).

    Region and distribution terms live on different scales (0.3-1 vs < 0.01), so they get
    separate axes: region terms on the top row (linear), distribution terms on the bottom row
    (log scale). The switch is marked by a dashed line. The last panel shows validation Dice.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    chosen: dict[str, tuple[RunSpec, dict]] = {}
    for spec, res in runs:
        if kind(spec.loss) in ("switch", "composite") and spec.loss not in chosen:
            chosen[spec.loss] = (spec, res)
    chosen_list = sorted(chosen.values(), key=lambda sr: kind(sr[0].loss) != "switch")[:4]
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
    seen = set()
    styles = ["-", "--", ":", "-."]
    for spec, res in runs:
        if spec.loss in seen or spec.table == "table4":
            continue
        hist = res["history"]
        ax.plot([h["epoch"] for h in hist], [h.get("val_dice_global") for h in hist],
                marker="os^vD<>"[len(seen) % 7], ms=6 - len(seen) % 3,
                ls=styles[len(seen) % 4], label=spec.loss, alpha=0.85)
        seen.add(spec.loss)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("validation Dice (global); same-seed runs\nshare their first stage", fontsize=9)
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    axes[1, n].axis("off")
    fig.suptitle("Training loss per term; region and distribution losses on separate axes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_qualitative(
    path: Path, runs: Sequence[tuple[RunSpec, dict[str, Any]]], store: Any, slice_index: int
) -> bool:
    """Image, ground truth and the predictions of single, composite and switching runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    seen = set()
    order = {"single": 0, "composite": 1, "switch": 2}
    for spec, _res in sorted(runs, key=lambda sr: order[kind(sr[0].loss)]):
        if spec.table == "table4" or spec.loss in seen:
            continue
        file = Path(_res["_dir"]) / "predictions.npz" if "_dir" in _res else None
        if file is None or not file.exists():
            continue
        with np.load(file) as z:
            key = f"slice_{slice_index}"
            if key not in z:
                continue
            panels.append((spec.loss, np.asarray(z[key], dtype=np.float32)))
        seen.add(spec.loss)
        if len(panels) == 6:
            break
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
    fig.suptitle(f"test slice {slice_index} ({pid}); green: ground-truth outline", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.88))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
