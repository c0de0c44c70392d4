"""examples/msd_colon report: the warnings above the tables (budgets, collapsed models, tables
not run) on hand-made results."""

from __future__ import annotations

import pytest

from msd_colon_lib.evaluation import METRIC_KEYS
from msd_colon_lib.experiments import RunSpec
from msd_colon_lib.report import collapsed, warnings, write_report


def _res(dice_slice=0.5, tp=50, fp=10, fn=50, epochs=1, switches=None):
    test = {k: 0.3 for k in METRIC_KEYS}
    test["dice_slice"] = dice_slice
    history = [{"epoch": e + 1, "stage": 0, "terms": {"bce": 0.1}, "train_loss": 0.1,
                "seconds": 1.0} for e in range(epochs)]
    return {"test": test, "test_counts": {"tp": tp, "fp": fp, "fn": fn, "tn": 1000},
            "n_train": 10, "n_val": 2, "n_test": 5, "best_val": 0.3, "best_epoch": 1,
            "history": history, **({} if switches is None else {"switches": switches})}


def test_collapsed_means_almost_no_predicted_tumour():
    assert collapsed(_res(tp=0, fp=0, fn=1234))
    assert collapsed(_res(tp=5, fp=6, fn=1200))  # 11 predicted < 1 % of 1205 true
    assert not collapsed(_res(tp=5, fp=8, fn=1200))  # 13 >= 12.05
    assert not collapsed(_res(tp=0, fp=0, fn=0))  # nothing to find, nothing found


DEMO = [
    (RunSpec("table1", "iou", 3, 0), _res()),
    (RunSpec("table1", "bce", 3, 0), _res(dice_slice=0.8912, tp=0, fp=0, fn=321)),
    (RunSpec("table2", "iou+bce", 6, 0), _res()),
    (RunSpec("table3", "iou->bce@3", 6, 0), _res(switches=[[0, 1, 3]])),
]


def test_warnings_of_the_demo_grid():
    assert warnings(DEMO, {"experiments": ["demo"]}) == [
        "- **Unequal training budgets.** The single losses (Table 1) trained for 3 epochs, the "
        "composite and switching runs for 6: 3 of 6 epochs, as in the paper. Tables 1, 2 and 3 "
        "are not a controlled comparison of the losses; `--experiment controls` trains them for "
        "the same budget.",
        "- **Collapsed model:** `bce` (seed 0, 3 epochs) predicted 0 tumour pixels on the test "
        "set, which holds 321. Its per-slice Dice 0.8912 only counts the slices without tumour "
        "(scored 1); read its global and per-patient columns.",
        "- **Not run:** Table 4, Controls, Switch points, Adaptive switching "
        "(`--experiment table4 controls switchpoints adaptive`).",
        "- **Partial tables:** the demo runs one pair (Tables 1-3 hold only its losses); the "
        "paper's grids are `--experiment paper`.",
    ]


def test_no_budget_warning_for_equal_budgets_and_controls_named_when_run():
    equal = [(RunSpec("table1", "iou", 6, 0), _res()), (RunSpec("table3", "iou->bce@3", 6, 0),
                                                        _res())]
    assert not any("Unequal" in w for w in warnings(equal, {"experiments": ["table1"]}))
    with_controls = [*DEMO, (RunSpec("controls", "iou", 6, 0, pair="iou&bce"), _res())]
    assert "the Controls section below trains them for the same budget." in warnings(
        with_controls, {"experiments": ["demo", "controls"]})[0]
    # --loss runs: no "not run" list (nothing was asked for but these specs)
    assert not any("Not run" in w for w in warnings(DEMO, {"experiments": ["--loss"]}))
    # the tables that ran are named; with --loss (which refuses --experiment) the control is
    # a single loss trained as long
    composite_only = [DEMO[0], DEMO[2]]
    assert warnings(composite_only, {"experiments": ["--loss"]})[0].endswith(
        "Tables 1 and 2 are not a controlled comparison of the losses; a single loss trained "
        "for 6 epochs too (`--loss iou --epochs 6`) is the control.")


def test_report_puts_the_warnings_before_the_setup(tmp_path):
    path = write_report(tmp_path, DEMO, setup={"preset": "`demo` (--preset)"},
                        context={"experiments": ["demo"]})
    text = path.read_text()
    assert text.index("## Warnings") < text.index("## Setup") < text.index("## Table 1")
    # the collapsed run is counted in its table row
    assert "| `bce` | 1 | **1 of 1** |" in text and "| `iou` | 1 | 0 |" in text


def test_a_run_asked_for_twice_is_planned_and_counted_once(tmp_path):
    """`--experiment demo table1` (and `demo paper`, `--loss iou --loss iou`) planned the demo's
    table runs twice: the report showed one trained run as "2 runs" with a std of 0."""
    from msd_colon_lib.experiments import plan

    grid = plan(["demo", "table1", "table3"], seeds=[0], epochs=3, long_epochs=6,
                switch_epoch=3)
    assert len(grid) == len(set(grid))
    assert grid.count(RunSpec("table1", "iou", 3, 0)) == 1
    assert plan("demo", losses=["iou", "iou"], seeds=[0]) == [RunSpec("table1", "iou", 50, 0)]
    # specs that differ in spaces alone are one run (one folder): they were two rows of one
    # section with the same numbers, and counted twice (found by a review of the example)
    assert plan("demo", losses=["iou->bce@2", "iou -> bce@2", "iou+bce"], seeds=[0],
                long_epochs=3) == [RunSpec("table3", "iou->bce@2", 3, 0),
                                   RunSpec("table2", "iou+bce", 3, 0)]
    path = write_report(tmp_path, [(spec, _res()) for spec in grid], setup={},
                        context={"experiments": ["demo", "table1", "table3"]})
    assert "| `iou` | 1 | 0 |" in path.read_text()


def test_different_switch_specs_are_rows_of_their_own(tmp_path):
    """`--loss iou->bce@2 --loss iou->bce@4` were one row (mean ± std over both) named after the
    first; neither switches where the paper's do (half of the run: 3 of 6), so neither has the
    paper's numbers beside it."""
    runs = [(RunSpec("table3", spec, 6, seed), _res(dice_slice=dice, switches=[[0, 1, at]]))
            for spec, dice, at in (("iou->bce@2", 0.2, 2), ("iou->bce@4", 0.8, 4))
            for seed in (0, 1)]
    text = write_report(tmp_path, runs, setup={}, context={"experiments": ["--loss"]}
                        ).read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `iou->bce@")]
    assert len(rows) == 2
    assert rows[0].startswith("| `iou->bce@2` | 2 | 0 | 0.2000 ± 0.0000")
    assert rows[1].startswith("| `iou->bce@4` | 2 | 0 | 0.8000 ± 0.0000")
    assert all(row.endswith("| — | — |") for row in rows)


def test_the_base_spec_drops_a_trigger_with_a_minus_sign():
    from msd_colon_lib.experiments import base_spec

    assert base_spec("iou->bce@plateau(threshold=1e-3, patience=2)") == "iou->bce"
    assert base_spec("iou->bce@50") == "iou->bce"
    assert base_spec("dice+bce->focal@10") == "dice+bce->focal"


def test_no_partial_tables_warning_when_the_papers_tables_ran_too():
    """`--experiment demo table1 table2 table3` ran all of Tables 1-3, and the report still said
    the demo's tables hold only its pair's losses."""
    partial = [w for w in warnings(DEMO, {"experiments": ["demo", "table1", "table2",
                                                          "table3"]}) if "Partial" in w]
    assert partial == []
    assert [w for w in warnings(DEMO, {"experiments": ["demo", "table1"]}) if "Partial" in w] == [
        "- **Partial tables:** the demo runs one pair (Tables 2 and 3 hold only its losses); the "
        "paper's grids are `--experiment paper`."]
    assert [w for w in warnings(DEMO, {"experiments": ["demo", "table1", "table3"]})
            if "Partial" in w] == [
        "- **Partial tables:** the demo runs one pair (Table 2 holds only its losses); the "
        "paper's grids are `--experiment paper`."]


def test_a_switching_run_that_never_switched_is_not_presented_as_a_switch(tmp_path):
    """A --loss switch whose trigger never fired within the run trained its first loss alone,
    and the report showed it as a Table 3 switch beside the paper's switching numbers."""
    import csv

    never = "iou->bce@plateau(min_epochs=5)"
    late = "iou->bce@plateau(patience=1, max_epochs=2)"  # fired after the last epoch
    runs = [
        (RunSpec("table3", never, 2, 0), {**_res(epochs=2), "switches": []}),
        (RunSpec("table3", late, 2, 0), {**_res(epochs=2), "switches": [[0, 1, 2]]}),
        (RunSpec("table3", "iou->bce@1", 2, 0), {**_res(epochs=2), "switches": [[0, 1, 1]]}),
    ]
    text = write_report(tmp_path, runs, setup={}, context={"experiments": ["--loss"]}
                        ).read_text()
    rows = {line.split(" | ")[0]: line for line in text.splitlines()
            if line.startswith("| `iou->bce@")}
    assert set(rows) == {f"| `{never}` (**never switched**: 1 of 1)",
                         f"| `{late}` (**never switched**: 1 of 1)", "| `iou->bce@1`"}
    assert rows[f"| `{never}` (**never switched**: 1 of 1)"].endswith("| — | — |")
    assert rows[f"| `{late}` (**never switched**: 1 of 1)"].endswith("| — | — |")
    assert rows["| `iou->bce@1`"].endswith("| 0.7882 | 0.6750 |")
    assert warnings(runs, {"experiments": ["--loss"]}) == [
        f"- **Never switched:** `{never}` (seed 0, 2 epochs) trained `iou` alone: its switch "
        "did not happen within its 2 epochs. It is marked *never switched* (runs.csv: "
        "`switched_at` never) and not set beside the paper's switching numbers.",
        f"- **Never switched:** `{late}` (seed 0, 2 epochs) trained `iou` alone: its switch "
        "did not happen within its 2 epochs. It is marked *never switched* (runs.csv: "
        "`switched_at` never) and not set beside the paper's switching numbers.",
    ]
    rows = list(csv.DictReader((tmp_path / "runs.csv").open()))
    assert [r["switched_at"] for r in rows] == ["never", "never", "1"]
    text = write_report(tmp_path, DEMO, setup={}, context={"experiments": ["demo"]}).read_text()
    assert "never switched" not in text.lower()  # a single loss does not switch
    assert {r["switched_at"] for r in csv.DictReader((tmp_path / "runs.csv").open())
            if r["kind"] != "switch"} == {""}


# ----------------------------------------------------------------------------- missing metrics


def _with(res, **test):
    return {**res, "test": {**res["test"], **test}}


def _controls(tumour_a, tumour_b):
    """Controls of iou & bce over seeds 0-2: the switch (per-seed tumour Dice ``tumour_a``)
    against iou (``tumour_b``); every other metric 0.3."""
    runs = []
    for seed, (x, y) in enumerate(zip(tumour_a, tumour_b, strict=True)):
        runs += [(RunSpec("controls", "iou->bce@3", 6, seed, pair="iou&bce"),
                  _with(_res(), dice_tumour=x, iou_tumour=x)),
                 (RunSpec("controls", "iou", 6, seed, pair="iou&bce"),
                  _with(_res(), dice_tumour=y, iou_tumour=y)),
                 (RunSpec("controls", "bce", 6, seed, pair="iou&bce"), _res())]
    return runs


def _line(text, start, convention):
    (line,) = [row for row in text.splitlines() if row.startswith(start)
               and f"| {convention} |" in row]
    return line


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")  # equal scores: p is NaN
def test_paired_rows_leave_out_pairs_with_a_missing_metric(tmp_path):
    """A NaN (saved as None: no tumour slice in a test set) reached the t-test, and the paired
    table printed nan where the results table above it, skipping NaNs, printed a mean."""
    from msd_colon_lib.report import paired_rows

    a = {s.seed: r for s, r in _controls([0.5, None, 0.7], [0.4, 0.6, float("nan")])
         if s.loss == "iou->bce@3"}
    b = {s.seed: r for s, r in _controls([0.5, None, 0.7], [0.4, 0.6, float("nan")])
         if s.loss == "iou"}
    rows = {row["convention"]: row for row in paired_rows(a, b)}
    assert (rows["tumour"]["n"], rows["tumour"]["of"]) == (1, 3)  # seed 0 only
    assert rows["tumour"]["dice"]["cf_mean"] == 0.5 and rows["tumour"]["dice"]["da_mean"] == 0.4
    assert (rows["global"]["n"], rows["global"]["of"]) == (3, 3)
    text = write_report(tmp_path, _controls([0.5, None, 0.7], [0.4, 0.6, float("nan")]),
                        setup={}, context={"experiments": ["controls"]}).read_text()
    assert "nan" not in text
    start = "| `iou->bce@3` | `iou` (6 ep) |"
    assert _line(text, start, "tumour slices") == (
        f"{start} tumour slices | 1 of 3 | 0.5000 | 0.4000 | — | 0.5000 | 0.4000 | — |")
    assert _line(text, start, "global (pixels)") == (
        f"{start} global (pixels) | 3 | 0.3000 | 0.3000 | — | 0.3000 | 0.3000 | — |")
    assert "pairs with a metric missing (NaN) on either side are left out" in text
    # no pair with the metric on both sides: the row says so instead of printing nan
    text = write_report(tmp_path, _controls([None, 0.5, 0.6], [0.4, None, None]), setup={},
                        context={"experiments": ["controls"]}).read_text()
    assert "nan" not in text
    assert _line(text, start, "tumour slices") == (
        f"{start} tumour slices | 0 of 3 | — | — | — | — | — | — |")


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:No artists with labels:UserWarning")  # no loss terms
def test_table4_leaves_out_folds_with_a_missing_metric(tmp_path):
    from msd_colon_lib.report import table4_rows

    def fold(loss, k, value):
        return (RunSpec("table4", loss, 6, 0, fold=k, pair="iou&bce"),
                _with(_res(), dice_patient=value, iou_patient=value))

    runs = [fold("iou+bce", 0, 0.2), fold("iou->bce@3", 0, 0.3),
            fold("iou+bce", 1, None), fold("iou->bce@3", 1, 0.9),
            fold("iou+bce", 2, 0.4), fold("iou->bce@3", 2, 0.5)]
    rows = {row["convention"]: row for row in table4_rows(runs)}
    assert (rows["patient"]["folds"], rows["patient"]["of"]) == (2, 3)
    d = rows["patient"]["dice"]
    assert abs(d["cf_mean"] - 0.3) < 1e-12
    assert abs(d["da_mean"] - 0.4) < 1e-12 and d["paired_p"] == d["paired_p"]  # not NaN
    assert (rows["global"]["folds"], rows["global"]["of"]) == (3, 3)
    text = write_report(tmp_path, runs, setup={}, context={"experiments": ["table4"]}
                        ).read_text()
    assert "nan" not in text
    line = _line(text, "| iou & bce |", "per patient 3D")
    assert line.startswith("| iou & bce | per patient 3D | 2 of 3 | 0.3000 | 0.4000 | ")
    assert "folds with a metric missing (NaN) on either side are left out" in text


def test_the_qualitative_slice_is_named_by_its_patient(tmp_path, monkeypatch):
    """The report and the figure printed the store's case entry, a list
    ``['colon_003', 'imagesTr/colon_003.nii.gz', 'labelsTr/colon_003.nii.gz']``, as the
    patient."""
    from types import SimpleNamespace

    import matplotlib.figure
    import numpy as np

    from msd_colon_lib.data import build_slice_store
    from msd_colon_lib.phantom import make_phantom
    from msd_colon_lib.runner import _qualitative_info

    titles = []
    save = matplotlib.figure.Figure.savefig

    def capture(self, path, *args, **kwargs):
        if self._suptitle is not None:
            titles.append(self._suptitle.get_text())
        return save(self, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    data = make_phantom(tmp_path / "Task10_Colon", n_patients=4, shape=(48, 48), slices=(10, 12))
    store = build_slice_store(data, tmp_path / "store", size=32, progress=False)
    spec = RunSpec("table1", "iou", 3, 0)
    args = SimpleNamespace(split="patient", split_seed=0, test_fraction=0.2, val_fraction=0.0,
                           folds=5)
    q = _qualitative_info(args, store, [(spec, {})])
    k = q["slice"]
    patient = f"colon_{int(store.patients[k]) + 1:03d}"
    assert q["patient"] == patient
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    np.savez_compressed(run_dir / "predictions.npz",
                        **{f"slice_{k}": np.zeros((32, 32), np.float16)})
    text = write_report(tmp_path / "out", [(spec, {**_res(), "_dir": str(run_dir)})], setup={},
                        store=store, qualitative=q, context={"experiments": ["--loss"]}
                        ).read_text()
    assert f"The qualitative slice is test slice {k} ({patient}): of the " in text
    assert titles[-1].startswith(f"test slice {k} ({patient}), the test slice with the most "
                                 "tumour")


def test_the_figures_show_every_kind_of_run_of_the_papers_grid():
    """The figures of the paper's grid (Tables 1-3) showed single losses only in the
    qualitative panels (six singles sorted first, then a stop at six) and switching runs only
    in the loss curves (four, switches first): Fig. 3's stand-in held no switching run."""
    from msd_colon_lib import experiments, figures

    grid = experiments.plan(["table1", "table2", "table3"], seeds=[0], epochs=2,
                            long_epochs=4, switch_epoch=2)
    runs = [(spec, {}) for spec in grid]
    panels = [experiments.kind(spec.loss) for spec in figures.qualitative_runs(runs)]
    assert len(panels) == figures.QUALITATIVE_PANELS
    assert {"single", "composite", "switch"} <= set(panels)
    curves = [experiments.kind(spec.loss) for spec in figures.loss_curve_runs(runs)]
    assert len(curves) == figures.LOSS_CURVE_PANELS
    assert {"composite", "switch"} == set(curves)


def test_a_paper_preset_with_other_settings_says_so():
    """A `paper` run with overrides (32x32 images, one epoch) printed the paper's 50-epoch
    numbers beside its own with no word that its protocol differs."""
    context = {"experiments": ["table1"], "preset": "paper",
               "deviations": ["--image-size 32 (the paper's 256)", "--epochs 1 (50)"]}
    equal = [(RunSpec("table1", "iou", 1, 0), _res())]
    assert warnings(equal, context)[0] == (
        "- **Not the paper's protocol:** --image-size 32 (the paper's 256), --epochs 1 (50): "
        "the paper's numbers beside these runs are not a like-for-like comparison.")
    assert not any("protocol" in w for w in warnings(equal, {**context, "deviations": []}))


def test_the_deviations_from_the_paper_preset_are_the_options_changed():
    import argparse

    from msd_colon_lib.options import apply_preset
    from msd_colon_lib.runner import paper_deviations

    args = argparse.Namespace(
        data_dir="x", download=False, preset="paper", image_size=32, batch_size=None,
        lr=None, epochs=1, long_epochs=None, experiment=None, seeds=None, folds=None,
        plateau_patience=None, precise_bn=None, val_fraction=None, encoder_weights="none",
        switch_epoch=None, switch_lr=None, monitor=None, pair=None, switch_fractions=None,
        phantom_patients=None, phantom_size=None, phantom_slices=None, phantom_seed=None,
        adaptive_trigger="plateau(patience=5)")
    apply_preset(args)
    assert paper_deviations(args) == ["--image-size 32 (the paper's 256)",
                                      "--epochs 1 (the paper's 50)",
                                      "--encoder-weights none (the paper's imagenet)"]
    args.preset = "demo"
    assert paper_deviations(args) == []


def test_the_papers_numbers_stand_only_beside_the_papers_switch_point(tmp_path):
    """Table 3's switches happen at half of the run (50 of 100 epochs; the demo's 3 of 6): a
    switch at another epoch, or by a trigger, was set beside the paper's @50 numbers."""
    runs = [
        (RunSpec("table3", "iou->bce@3", 6, 0), _res(epochs=6, switches=[[0, 1, 3]])),
        (RunSpec("table3", "dice->bce@2", 6, 0), _res(epochs=6, switches=[[0, 1, 2]])),
        (RunSpec("table3", "iou->focal@plateau(patience=1)", 6, 0),
         _res(epochs=6, switches=[[0, 1, 4]])),
    ]
    text = write_report(tmp_path, runs, setup={}, context={"experiments": ["--loss"]}
                        ).read_text()
    rows = {line.split(" | ")[0]: line for line in text.splitlines()
            if line.startswith("| `") and "->" in line.split(" | ")[0]}
    assert not rows["| `iou->bce@3`"].endswith("| — | — |")
    assert rows["| `dice->bce@2`"].endswith("| — | — |")
    assert rows["| `iou->focal@plateau(patience=1)`"].endswith("| — | — |")


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:No artists with labels:UserWarning")  # no loss terms
def test_table4_sets_the_papers_numbers_only_beside_the_papers_switch_point(tmp_path):
    """Table 4's switching arm at 2 of 6 epochs (the paper's: half of the run) was printed beside
    the paper's "0.65 vs 0.77", as Table 3's was before it checked the switch point."""
    def fold(loss, k, value):
        return (RunSpec("table4", loss, 6, 0, fold=k, pair="iou&bce"),
                _with(_res(epochs=6), dice_global=value, iou_global=value))

    def paper_cells(switch):
        runs = [fold(loss, k, 0.3 + 0.1 * k + 0.05 * (loss != "iou+bce"))
                for k in range(3) for loss in ("iou+bce", switch)]
        text = write_report(tmp_path, runs, setup={}, context={"experiments": ["table4"]}
                            ).read_text()
        return _line(text, "| iou & bce |", "global (pixels)").split(" | ")[-2:]

    assert paper_cells("iou->bce@3") == ["0.65 vs 0.77", "0.56 vs 0.67 |"]
    assert paper_cells("iou->bce@2") == ["—", "— |"]
    assert paper_cells("iou->bce@plateau(patience=1)") == ["—", "— |"]


@pytest.mark.parametrize("extra, deviation", [
    (["--switch-epoch", "30"], "--switch-epoch 30 (the paper's 50)"),
    (["--switch-lr", "restart"], "--switch-lr restart (the paper's keep)"),
    (["--max-cases", "5"], "--max-cases 5 (the paper's all 126 cases)"),
    (["--test-fraction", "0.5"], "--test-fraction 0.5 (the paper's 0.2)"),
])
def test_the_paper_preset_names_every_protocol_option_changed(extra, deviation):
    """Only the preset's own keys were compared: a `paper` run switching at epoch 30, restarting
    its LR, on 5 cases or on another split had no warning, and Tables 3-4 printed the paper's
    numbers beside it."""
    import msd_colon
    from msd_colon_lib.options import apply_preset, validate
    from msd_colon_lib.runner import paper_deviations

    def deviations(more):
        args = msd_colon.parser().parse_args(["--data-dir", "x", "--preset", "paper", *more])
        apply_preset(args)
        validate(args)
        return paper_deviations(args)

    assert deviations([]) == []
    assert deviations(extra) == [deviation]
    # the paper's own values are no deviation, given or not
    assert deviations(["--switch-epoch", "50", "--switch-lr", "keep",
                       "--test-fraction", "0.2"]) == []


def test_report_numbers_small_helpers():
    """The sweep never switches at the last epoch (the second stage would train none); the
    tables' ± is the sample standard deviation; p-values below 1e-3 in scientific notation."""
    from msd_colon_lib.experiments import mean_std, switch_points
    from msd_colon_lib.report import _p

    assert switch_points(2, 1) == [1]
    assert max(switch_points(4, 3, fractions=(0.9, 1.0))) == 3
    mean, std = mean_std([0.8, 0.9])
    assert mean == pytest.approx(0.85) and std == pytest.approx(0.1 / 2**0.5)
    assert (_p(5e-4), _p(2e-3)) == ("5.00e-04", "0.0020")


def test_one_epoch_is_singular_and_the_control_hint_pastes_into_a_shell(tmp_path):
    """"(seed 0, 1 epochs)" and "## Table 1 ... (1 epochs)"; the hint `--loss
    TverskyLoss(alpha=0.2) --epochs 2` could not be pasted into a shell as it stood (found by
    a review of the example)."""
    runs = [(RunSpec("table1", "TverskyLoss(alpha=0.2)", 1, 0), _res(tp=0, fp=0, fn=321)),
            (RunSpec("table3", "iou->bce@1", 2, 0), _res(epochs=2, switches=[[0, 1, 1]]))]
    lines = warnings(runs, {"experiments": ["--loss"]})
    assert ("a single loss trained for 2 epochs too (`--loss 'TverskyLoss(alpha=0.2)' --epochs "
            "2`) is the control.") in lines[0]
    assert lines[0].startswith("- **Unequal training budgets.** The single losses (Table 1) "
                               "trained for 1 epoch, the composite and switching runs for 2:")
    assert lines[1].startswith("- **Collapsed model:** `TverskyLoss(alpha=0.2)` (seed 0, "
                               "1 epoch) predicted 0 tumour pixels")
    text = write_report(tmp_path, runs, setup={}, context={"experiments": ["--loss"]}
                        ).read_text()
    assert "(1 epoch)\n" in text and "(2 epochs)\n" in text and "1 epochs" not in text


def test_the_loss_curves_of_table4_alone_draw_without_a_warning(tmp_path):
    """A table4-only run printed matplotlib's "No artists with labels found to put in legend"
    to stderr: its summary panel (runs outside Table 4) was empty (found by a review)."""
    import warnings as python_warnings

    from msd_colon_lib.figures import plot_loss_curves

    runs = [(RunSpec("table4", spec, 2, 0, fold, "iou&bce"), _res(epochs=2))
            for spec in ("iou+bce", "iou->bce@1") for fold in (0, 1)]
    with python_warnings.catch_warnings():
        python_warnings.simplefilter("error")
        assert plot_loss_curves(tmp_path / "curves.png", runs)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
