"""report.md (the paper's Tables 1-4, the experiments beyond it, warnings), runs.csv, figures.

The report warns, above the tables, about what could make its numbers misleading:

- unequal training budgets (single losses trained for fewer epochs than the runs they are
  compared with, as in the paper);
- collapsed models: a run that predicted (almost) no tumour on the test set -- fewer foreground
  pixels than :data:`COLLAPSE_FRACTION` of the true ones -- whose per-slice Dice is then just
  the share of empty slices;
- switching runs that never switched (their trigger did not fire within their epochs): they
  trained their first loss alone, and are not set beside the paper's switching numbers;
- the tables and experiments that were not run.
"""

from __future__ import annotations

import csv
import math
import shlex
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import PAPER_TITLE
from .evaluation import CONVENTIONS, METRIC_KEYS
from .experiments import (
    BEYOND,
    PAPER_TABLE1,
    PAPER_TABLE2,
    PAPER_TABLE3,
    PAPER_TABLE4,
    PAPER_TABLES,
    RunSpec,
    base_spec,
    compare,
    kind,
    mean_std,
    switch_at,
)
from .figures import plot_loss_curves, plot_qualitative, unique

CONVENTION_TITLES = {
    "slice": "per slice (empty=1)",
    "tumour": "tumour slices",
    "global": "global (pixels)",
    "patient": "per patient 3D",
}
ORDER = {
    "table1": list(PAPER_TABLE1),
    "table2": list(PAPER_TABLE2),
    "table3": list(PAPER_TABLE3),
}
SECTION_TITLES = {
    "table1": "Table 1 — single losses",
    "table2": "Table 2 — composite losses (L = L_A + L_B)",
    "table3": "Table 3 — switching (region loss, then distribution loss)",
    "table4": "Table 4 — cross-validation, composite (CF) vs switching (DA)",
    "controls": "Controls — single losses with the switching runs' budget",
    "switchpoints": "Switch points — the switch epoch swept",
    "adaptive": "Adaptive switching — switch when the training loss plateaus",
}
COLLAPSE_FRACTION = 0.01
"""A run predicting fewer foreground pixels than this fraction of the true ones collapsed."""

Runs = Sequence[tuple[RunSpec, dict[str, Any]]]


def _epochs_word(counts: Sequence[int]) -> str:
    """"epoch" after a list of epoch counts that is just 1, else "epochs"."""
    return "epoch" if list(counts) == [1] else "epochs"


def _epochs(count: int) -> str:
    """``3 epochs``, ``1 epoch``."""
    return f"{count} {_epochs_word([count])}"


def _fmt(mean: float, std: float) -> str:
    if mean is None or math.isnan(mean):
        return "—"
    return f"{mean:.4f}" if std is None or math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def _p(p: float) -> str:
    return "—" if p is None or math.isnan(p) else (f"{p:.2e}" if p < 1e-3 else f"{p:.4f}")


def collapsed(res: dict[str, Any]) -> bool:
    """Whether the run predicted (almost) no tumour: fewer foreground pixels on the test set than
    :data:`COLLAPSE_FRACTION` of the true tumour pixels."""
    c = res.get("test_counts")
    if not c:
        return False
    truth, predicted = c["tp"] + c["fn"], c["tp"] + c["fp"]
    return truth > 0 and predicted < COLLAPSE_FRACTION * truth


def switched_at(res: dict[str, Any]) -> int | None:
    """The epoch of the run's first loss switch (None: it never switched)."""
    switches = res.get("switches") or []
    return int(switches[0][2]) if switches else None


def switched_within(spec: RunSpec, res: dict[str, Any]) -> int | None:
    """:func:`switched_at`, None also for a switch after the run's last epoch (the loss is
    stepped after every epoch, the last one included: the next stage then trained no epoch)."""
    at = switched_at(res)
    return at if at is not None and at < spec.epochs else None


def never_switched(spec: RunSpec, res: dict[str, Any]) -> bool:
    """Whether a switching run trained its first loss alone (its switch never came in time)."""
    return kind(spec.loss) == "switch" and switched_within(spec, res) is None


def write_csv(path: Path, runs: Runs) -> None:
    """One row per run and report section (a run serving two sections has two rows)."""
    fields = ["run", "section", "loss", "kind", "seed", "fold", "epochs", "n_train", "n_val",
              "n_test", *[f"test_{k}" for k in METRIC_KEYS], "predicted_pixels",
              "tumour_pixels", "collapsed", "switched_at", "lr_restarts", "monitor",
              "best_val", "best_epoch", "train_seconds"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for spec, res in runs:
            c = res.get("test_counts") or {}
            writer.writerow({
                "run": spec.name, "section": spec.table, "loss": spec.loss,
                "kind": kind(spec.loss), "seed": spec.seed,
                "fold": "" if spec.fold is None else spec.fold,
                "epochs": spec.epochs, "n_train": res["n_train"], "n_val": res["n_val"],
                "n_test": res["n_test"],
                **{f"test_{k}": res["test"][k] for k in METRIC_KEYS},
                "predicted_pixels": c.get("tp", 0) + c.get("fp", 0),
                "tumour_pixels": c.get("tp", 0) + c.get("fn", 0),
                "collapsed": collapsed(res),
                "switched_at": "never" if never_switched(spec, res)
                else "" if switched_at(res) is None else switched_at(res),
                "lr_restarts": " ".join(map(str, res.get("lr_restarts") or [])),
                "monitor": res.get("monitor", ""),  # what best_val is the best of
                "best_val": res["best_val"], "best_epoch": res.get("best_epoch", ""),
                "train_seconds": round(sum(h["seconds"] for h in res["history"]), 2),
            })


def _metric_head() -> list[str]:
    head = []
    for c in CONVENTIONS:
        head += [f"Dice {CONVENTION_TITLES[c]}", f"IoU {CONVENTION_TITLES[c]}"]
    return head


def _metric_cells(results: list[dict[str, Any]]) -> list[str]:
    cells = []
    for c in CONVENTIONS:
        for m in ("dice", "iou"):
            cells.append(_fmt(*mean_std([r["test"][f"{m}_{c}"] for r in results])))
    return cells


def _collapsed_cell(results: list[dict[str, Any]]) -> str:
    n = sum(collapsed(r) for r in results)
    return f"**{n} of {len(results)}**" if n else "0"


def _table(rows: dict[str, list[dict]], table: str) -> list[str]:
    head = ["Loss", "runs", "collapsed", *_metric_head(), "paper Dice", "paper IoU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = ORDER[table]

    def place(loss: str) -> tuple[int, str]:
        key = base_spec(loss)
        return (order.index(key) if key in order else len(order), loss)

    paper = {"table1": PAPER_TABLE1, "table2": PAPER_TABLE2, "table3": PAPER_TABLE3}[table]
    for loss in sorted(rows, key=place):  # one row per spec; the paper's row per pair
        results = rows[loss]
        key = base_spec(loss)
        never = sum(never_switched(r["_spec"], r) for r in results)
        label = f"`{loss}`" + (f" (**never switched**: {never} of {len(results)})" if never
                               else "")
        cells = [label, str(len(results)), _collapsed_cell(results), *_metric_cells(results)]
        # a run that never switched is no switch of the paper's, nor one at another point
        if key in paper and not never and (table != "table3" or all(
                _papers_switch_point(r["_spec"]) for r in results)):
            p = paper[key]
            cells += ([_fmt(p[0], p[1]), _fmt(p[2], p[3])] if len(p) == 4
                      else [f"{p[0]:.4f}", f"{p[1]:.4f}"])
        else:
            cells += ["—", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _papers_switch_point(spec: Any) -> bool:
    """Whether a switching run switches where the paper's Tables 3-4 runs do: at one fixed epoch,
    half of the run (50 of 100; the demo's 3 of 6), not by a trigger nor elsewhere."""
    at = switch_at(spec.loss)  # (of several stages: not digits alone)
    return at.isdigit() and 2 * int(at) == spec.epochs


def _missing(value: Any) -> bool:
    """A metric that is not there: None (as saved) or NaN (e.g. the tumour-slice Dice of a test
    set without tumour)."""
    return value is None or value != value  # NaN is the one value unequal to itself


def _paired_metrics(a: dict[Any, dict[str, Any]], b: dict[Any, dict[str, Any]],
                    keys: list[Any], convention: str) -> tuple[int, dict[str, Any]]:
    """:func:`compare` of Dice and of IoU of ``convention`` over the ``keys`` (seeds or folds)
    whose metrics are there on both sides; a pair with a metric missing on either side is left
    out, as :func:`mean_std` leaves out missing values. Returns the number of pairs used and
    ``{"dice": ..., "iou": ...}`` (None: no pair left)."""
    names = [f"{m}_{convention}" for m in ("dice", "iou")]
    used = [k for k in keys if not any(_missing(side[k][n]) for side in (a, b) for n in names)]
    return len(used), {
        m: compare([a[k][n] for k in used], [b[k][n] for k in used]) if used else None
        for m, n in zip(("dice", "iou"), names, strict=True)
    }


def table4_rows(runs: Runs) -> list[dict[str, Any]]:
    """Per pair and convention: CF/DA means over folds and both t-tests (Dice and IoU).

    ``folds``: the folds used (those with the metrics on both sides), of ``of`` that both ran;
    ``papers_switch``: whether every switching run switches where the paper's do.
    """
    by_pair: dict[str, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    papers_switch: dict[str, bool] = defaultdict(lambda: True)
    for spec, res in runs:
        if spec.table == "table4":
            by_pair[spec.pair][kind(spec.loss)][spec.fold] = res["test"]
            if kind(spec.loss) == "switch" and not _papers_switch_point(spec):
                papers_switch[spec.pair] = False
    out = []
    for pair, groups in by_pair.items():
        folds = sorted(set(groups["composite"]) & set(groups["switch"]))
        for c in CONVENTIONS:
            used, metrics = _paired_metrics(groups["composite"], groups["switch"], folds, c)
            out.append({"pair": pair, "convention": c, "folds": used, "of": len(folds),
                        "papers_switch": papers_switch[pair], **metrics})
    return out


def paired_rows(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]]
                ) -> list[dict[str, Any]]:
    """``a`` vs ``b`` (results keyed by seed or fold), paired on the keys both have: per
    convention, the means and the paired t-test of Dice and of IoU over the pairs whose
    metrics are there on both sides (``n`` of ``of``)."""
    keys = sorted(set(a) & set(b))
    tests_a = {k: a[k]["test"] for k in keys}
    tests_b = {k: b[k]["test"] for k in keys}
    out = []
    for c in CONVENTIONS:
        used, metrics = _paired_metrics(tests_a, tests_b, keys, c)
        out.append({"convention": c, "n": used, "of": len(keys), **metrics})
    return out


def _used(n: int, of: int) -> str:
    """How many pairs (or folds) a row used: ``3``, or ``2 of 3`` when some were left out."""
    return str(n) if n == of else f"{n} of {of}"


def _cells(result: dict[str, Any] | None, *keys: str) -> list[str]:
    """The means (``*_mean`` keys, 4 decimals) and p-values of a :func:`compare` result; a
    dash each where no pair was left."""
    if result is None:
        return ["—"] * len(keys)
    return [_p(result[k]) if k.endswith("_p") else f"{result[k]:.4f}" for k in keys]


def _paired_table(comparisons: list[tuple[str, str, dict, dict]]) -> list[str]:
    """``(label A, label B, results A by seed, results B by seed)`` -> markdown lines."""
    lines = [
        "| A | B | convention | pairs | Dice A | Dice B | paired p | IoU A | IoU B | paired p |",
        "|" + "---|" * 10,
    ]
    for label_a, label_b, a, b in comparisons:
        for row in paired_rows(a, b):
            if not row["of"]:  # no seed of A is a seed of B
                continue
            cells = [label_a, label_b, CONVENTION_TITLES[row["convention"]],
                     _used(row["n"], row["of"])]
            for m in ("dice", "iou"):
                cells += _cells(row[m], "cf_mean", "da_mean", "paired_p")
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _by_seed(runs: Runs, section: str, loss: str) -> dict[int, dict[str, Any]]:
    return {s.seed: r for s, r in runs if s.table == section and s.loss == loss}


def _results_table(rows: list[tuple[str, int, list[dict[str, Any]], list[str]]],
                   extra_head: list[str]) -> list[str]:
    head = ["Run", "epochs", "runs", "collapsed", *extra_head, *_metric_head()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, epochs, results, extra in rows:
        lines.append("| " + " | ".join([label, str(epochs), str(len(results)),
                                        _collapsed_cell(results), *extra,
                                        *_metric_cells(results)]) + " |")
    return lines


PAIRED_NOTE = (
    "Paired by seed: two-sided paired t-tests (`scipy.stats.ttest_rel`) of A against B per "
    "averaging convention; a p-value needs at least two seeds (`--seeds 0 1 2`); pairs with a "
    "metric missing (NaN) on either side are left out of that convention's row (*pairs*: "
    "those used)."
)


def _controls_section(runs: Runs) -> list[str]:
    specs = [(s, r) for s, r in runs if s.table == "controls"]
    lines: list[str] = []
    for pair in sorted({s.pair for s, _ in specs if s.pair}):
        region, distribution = pair.split("&")
        switch = next(s.loss for s, _ in specs if s.pair == pair and kind(s.loss) == "switch")
        long_epochs = next(s.epochs for s, _ in specs if s.pair == pair)
        rows = []
        for loss in (region, distribution, switch):
            results = list(_by_seed(runs, "controls", loss).values())
            rows.append((f"`{loss}`", long_epochs, results, []))
        for loss in (region, distribution):  # the paper's shorter single-loss budget, if run
            short = [(s, r) for s, r in runs if s.table == "table1" and s.loss == loss]
            if short and short[0][0].epochs != long_epochs:
                rows.append((f"`{loss}` (Table 1)", short[0][0].epochs, [r for _, r in short],
                             []))
        lines += [f"#### {region} & {distribution}", "",
                  *_results_table(rows, []), "", PAIRED_NOTE, "",
                  *_paired_table([
                      (f"`{switch}`", f"`{region}` ({long_epochs} ep)",
                       _by_seed(runs, "controls", switch), _by_seed(runs, "controls", region)),
                      (f"`{switch}`", f"`{distribution}` ({long_epochs} ep)",
                       _by_seed(runs, "controls", switch),
                       _by_seed(runs, "controls", distribution)),
                  ]), ""]
    return lines


def _switchpoints_section(runs: Runs, switch_epoch: int) -> list[str]:
    specs = [(s, r) for s, r in runs if s.table == "switchpoints"]
    lines: list[str] = []
    for pair in sorted({s.pair for s, _ in specs if s.pair}):
        losses = sorted({s.loss for s, _ in specs if s.pair == pair},
                        key=lambda spec: int(switch_at(spec)))
        long_epochs = next(s.epochs for s, _ in specs if s.pair == pair)
        reference = next((x for x in losses if int(switch_at(x)) == switch_epoch), None)
        rows = []
        for loss in losses:
            e = int(switch_at(loss))
            results = list(_by_seed(runs, "switchpoints", loss).values())
            share = f"{e} ({100 * e / long_epochs:.0f} %)"
            rows.append((f"`{loss}`", long_epochs, results, [share]))
        comparisons = [
            (f"`{loss}`", f"`{reference}`", _by_seed(runs, "switchpoints", loss),
             _by_seed(runs, "switchpoints", reference))
            for loss in losses if reference is not None and loss != reference
        ]
        lines += [f"#### {pair.replace('&', ' -> ')}", "",
                  *_results_table(rows, ["switch epoch (of the budget)"]), "",
                  f"Each switch point against the fixed switch at epoch {switch_epoch} "
                  "(`--switch-epoch`; the paper switches at 50 of 100). " + PAIRED_NOTE, "",
                  *_paired_table(comparisons), ""]
    return lines


def _adaptive_section(runs: Runs) -> list[str]:
    specs = [(s, r) for s, r in runs if s.table == "adaptive"]
    lines: list[str] = []
    for pair in sorted({s.pair for s, _ in specs if s.pair}):
        losses = {s.loss for s, _ in specs if s.pair == pair}
        adaptive = next(x for x in losses if not switch_at(x).isdigit())
        fixed = next(x for x in losses if switch_at(x).isdigit())
        long_epochs = next(s.epochs for s, _ in specs if s.pair == pair)
        rows = []
        for loss in (adaptive, fixed):
            by_seed = _by_seed(runs, "adaptive", loss)
            spec = next(s for s, _ in specs if s.pair == pair and s.loss == loss)
            at = [switched_within(spec, r) for _, r in sorted(by_seed.items())]
            shown = ", ".join("never" if e is None else str(e) for e in at)
            mean, std = mean_std([e for e in at if e is not None])
            summary = f"{shown} (mean {_fmt(mean, std).replace('.0000', '')})" if len(at) > 1 \
                else shown
            rows.append((f"`{loss}`", long_epochs, list(by_seed.values()), [summary]))
        lines += [f"#### {pair.replace('&', ' -> ')}", "",
                  *_results_table(rows, ["switched at epoch (per seed)"]), "",
                  "The adaptive run switches once its epoch's mean training loss has not improved "
                  "for `patience` epochs (within `min_epochs` .. `max_epochs` of the budget). "
                  + PAIRED_NOTE, "",
                  *_paired_table([(f"`{adaptive}`", f"`{fixed}`",
                                   _by_seed(runs, "adaptive", adaptive),
                                   _by_seed(runs, "adaptive", fixed))]), ""]
    return lines


def warnings(runs: Runs, context: dict[str, Any]) -> list[str]:
    """The warnings above the tables (markdown bullet lines; empty: none)."""
    out = []
    deviations = context.get("deviations")
    if deviations:
        out.append(f"- **Not the paper's protocol:** {', '.join(deviations)}: the paper's "
                   "numbers beside these runs are not a like-for-like comparison.")
    sections = {s.table for s, _ in runs}
    single = sorted({s.epochs for s, _ in runs if s.table == "table1"})
    others = sorted({s.epochs for s, _ in runs if s.table in ("table2", "table3", "table4")})
    if single and others and max(single) < max(others):
        if "controls" in sections:
            follow = "the Controls section below trains them for the same budget"
        elif context.get("experiments") == ["--loss"]:  # (--experiment is refused with it)
            first = next(s.loss for s, _ in runs if s.table == "table1")
            follow = (f"a single loss trained for {max(others)} epochs too (`--loss "
                      f"{shlex.quote(first)} --epochs {max(others)}`) is the control")
        else:
            follow = "`--experiment controls` trains them for the same budget"
        numbers = ["1", *sorted({s.table[-1] for s, _ in runs
                                 if s.table in ("table2", "table3", "table4")})]
        named = f"{', '.join(numbers[:-1])} and {numbers[-1]}"
        out.append(
            f"- **Unequal training budgets.** The single losses (Table 1) trained for "
            f"{'/'.join(map(str, single))} {_epochs_word(single)}, the composite and switching "
            f"runs for {'/'.join(map(str, others))}: {min(single)} of {max(others)} epochs, as "
            f"in the paper. Tables {named} are not a controlled comparison of the losses; "
            f"{follow}."
        )
    for spec, res in unique(runs):
        if collapsed(res):
            c = res["test_counts"]
            part = f"fold {spec.fold}" if spec.fold is not None else f"seed {spec.seed}"
            out.append(
                f"- **Collapsed model:** `{spec.loss}` ({part}, {_epochs(spec.epochs)}) predicted "
                f"{c['tp'] + c['fp']} tumour pixels on the test set, which holds "
                f"{c['tp'] + c['fn']}. Its per-slice Dice {res['test']['dice_slice']:.4f} only "
                "counts the slices without tumour (scored 1); read its global and per-patient "
                "columns."
            )
    for spec, res in unique(runs):
        if never_switched(spec, res):
            part = f"fold {spec.fold}" if spec.fold is not None else f"seed {spec.seed}"
            first = base_spec(spec.loss).split("->")[0]
            out.append(
                f"- **Never switched:** `{spec.loss}` ({part}, {_epochs(spec.epochs)}) trained "
                f"`{first}` alone: its switch did not happen within its "
                f"{_epochs(spec.epochs)}. It "
                "is marked *never switched* (runs.csv: `switched_at` never) and not set beside "
                "the paper's switching numbers."
            )
    ran = context.get("experiments", [])
    if ran != ["--loss"]:
        missing = [s for s in (*PAPER_TABLES, *BEYOND) if s not in sections]
        if missing:
            names = ", ".join(SECTION_TITLES[s].split(" — ")[0] for s in missing)
            out.append(f"- **Not run:** {names} (`--experiment {' '.join(missing)}`).")
        partial = [t[-1] for t in ("table1", "table2", "table3") if t not in ran]
        if "demo" in ran and partial:  # the tables that hold only the demo's pair
            tables = ("Tables 1-3 hold" if len(partial) == 3 else
                      f"Tables {' and '.join(partial)} hold" if len(partial) == 2 else
                      f"Table {partial[0]} holds")
            out.append(f"- **Partial tables:** the demo runs one pair ({tables} only its "
                       "losses); the paper's grids are `--experiment paper`.")
    return out


def write_report(
    out_dir: Path,
    runs: Runs,
    *,
    setup: dict[str, Any],
    store: Any = None,
    qualitative: dict[str, Any] | None = None,
    context: dict[str, Any] | None = None,
) -> Path:
    """Write ``report.md``, ``runs.csv``, ``loss_curves.png`` and ``qualitative.png``.

    ``qualitative``: the test slice of the qualitative figure (``slice``, ``patient``,
    ``tumour_pixels``, ``test_slices``); ``context``: ``epochs``, ``long_epochs``,
    ``switch_epoch``, ``experiments`` (what was asked for).
    """
    context = context or {}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "runs.csv", runs)
    figures = []
    try:
        if plot_loss_curves(out_dir / "loss_curves.png", runs):
            figures.append(("Training loss per term (the paper's Fig. 2)", "loss_curves.png"))
        if store is not None and qualitative is not None and plot_qualitative(
            out_dir / "qualitative.png", runs, store, qualitative["slice"]
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
            "data (the `paper` preset is then the default).",
            "",
        ]
    lines += [f"Paper: {PAPER_TITLE}.", ""]
    warn = warnings(runs, context)
    if warn:
        lines += ["## Warnings", "", *warn, ""]
    lines += ["## Setup", ""]
    lines += [f"- {k}: {v}" for k, v in setup.items() if k != "synthetic"]
    lines += [
        "",
        "Test-set metrics of the final (last-epoch) model at threshold 0.5, mean ± sample std "
        "over seeds (or folds). Four ways to average Dice/IoU (see docs/example.md): per slice "
        "with empty-vs-empty = 1, per slice over tumour slices only, global over all test "
        "pixels, per patient in 3D. The paper does not say which it used; its numbers are "
        "shown beside ours. *collapsed*: runs that predicted fewer tumour pixels than "
        f"{COLLAPSE_FRACTION:.0%} of the true ones.",
        "",
    ]
    by_table: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for spec, res in runs:
        if spec.table in ORDER:
            by_table[spec.table][spec.loss].append({**res, "_spec": spec})
    for table in ("table1", "table2", "table3"):
        if table in by_table:
            epochs = sorted({r["_spec"].epochs for rs in by_table[table].values() for r in rs})
            lines += [f"## {SECTION_TITLES[table]} ({', '.join(map(str, epochs))} "
                      f"{_epochs_word(epochs)})", ""]
            lines += [*_table(by_table[table], table), ""]
    lines += _table4_section(runs)
    beyond = [
        ("controls", _controls_section(runs)),
        ("switchpoints", _switchpoints_section(runs, int(context.get("switch_epoch", 0)))),
        ("adaptive", _adaptive_section(runs)),
    ]
    if any(body for _, body in beyond):
        lines += ["## Beyond the paper", "",
                  "Experiments on the paper's own stated limitations and future work, with the "
                  "same statistics (see docs/example.md).", ""]
        for section, body in beyond:
            if body:
                lines += [f"### {SECTION_TITLES[section]}", "", *body]
    lines += ["## Figures", ""]
    for caption, name in figures:
        lines += [f"**{caption}**", ""] + ([f"![{caption}]({name})", ""] if name else [])
    if qualitative is not None and any(name == "qualitative.png" for _, name in figures):
        q = qualitative
        lines += [
            f"The qualitative slice is test slice {q['slice']} ({q['patient']}): of the "
            f"{q['test_slices']} test slices, the one with the most tumour pixels in the ground "
            f"truth ({q['tumour_pixels']} at the stored size). It is chosen from the labels alone, "
            "before and independently of any prediction, and is the same for every run; each "
            "panel is the first seed of one loss.",
            "",
        ]
    lines += [
        "## Files",
        "",
        "- `runs.csv`: one row per run and report section (all metrics, predicted and true "
        "tumour pixels, switch epoch, LR restarts, the monitored value and its best).",
        "- `runs/<loss>/e<epochs>/<seed|fold>/`: `config.json` (options and fingerprint), "
        "`log.jsonl` (per epoch: active stage, each loss term, LR, validation metrics), "
        "`last.pt`, `best.pt`, `result.json`. A run used by several sections is trained once.",
        "",
    ]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _table4_section(runs: Runs) -> list[str]:
    rows4 = table4_rows(runs)
    if not rows4:
        return []
    lines = [
        f"## {SECTION_TITLES['table4']}",
        "",
        "Per pair and averaging convention: mean over folds, and two-sided p-values of the "
        "**paired t-test** (`scipy.stats.ttest_rel`; folds are shared, so this is the "
        "appropriate test) and of **Student's two-sample t-test** with equal variances "
        "(`scipy.stats.ttest_ind(equal_var=True)`; ignores the pairing); folds with a metric "
        "missing (NaN) on either side are left out of that row (*folds*: those used). The "
        "paper reports p < 0.003 for every pair without naming its test.",
        "",
        "| Pair | convention | folds | CF Dice | DA Dice | paired p | Student p | CF IoU | "
        "DA IoU | paired p | Student p | paper Dice CF vs DA | paper IoU CF vs DA |",
        "|" + "---|" * 13,
    ]
    for row in rows4:
        if not row["of"]:  # no fold ran both arms
            continue
        p = PAPER_TABLE4.get(row["pair"]) if row["papers_switch"] else None
        cells = [row["pair"].replace("&", " & "), CONVENTION_TITLES[row["convention"]],
                 _used(row["folds"], row["of"])]
        for m in ("dice", "iou"):
            cells += _cells(row[m], "cf_mean", "da_mean", "paired_p", "student_p")
        cells += ([f"{p[0]:.2f} vs {p[1]:.2f}", f"{p[2]:.2f} vs {p[3]:.2f}"] if p
                  else ["—", "—"])
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines
