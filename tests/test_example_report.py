"""examples/msd_colon report: the warnings above the tables (budgets, collapsed models, tables
not run) on hand-made results."""

from __future__ import annotations

from msd_colon_lib.evaluation import METRIC_KEYS
from msd_colon_lib.experiments import RunSpec
from msd_colon_lib.report import collapsed, warnings, write_report


def _res(dice_slice=0.5, tp=50, fp=10, fn=50, epochs=1):
    test = {k: 0.3 for k in METRIC_KEYS}
    test["dice_slice"] = dice_slice
    history = [{"epoch": e + 1, "stage": 0, "terms": {"bce": 0.1}, "train_loss": 0.1,
                "seconds": 1.0} for e in range(epochs)]
    return {"test": test, "test_counts": {"tp": tp, "fp": fp, "fn": fn, "tn": 1000},
            "n_train": 10, "n_val": 2, "n_test": 5, "best_val": 0.3, "best_epoch": 1,
            "history": history}


def test_collapsed_means_almost_no_predicted_tumour():
    assert collapsed(_res(tp=0, fp=0, fn=1234))
    assert collapsed(_res(tp=5, fp=6, fn=1200))  # 11 predicted < 1 % of 1205 true
    assert not collapsed(_res(tp=5, fp=8, fn=1200))  # 13 >= 12.05
    assert not collapsed(_res(tp=0, fp=0, fn=0))  # nothing to find, nothing found


DEMO = [
    (RunSpec("table1", "iou", 3, 0), _res()),
    (RunSpec("table1", "bce", 3, 0), _res(dice_slice=0.8912, tp=0, fp=0, fn=321)),
    (RunSpec("table2", "iou+bce", 6, 0), _res()),
    (RunSpec("table3", "iou->bce@3", 6, 0), _res()),
]


def test_warnings_of_the_demo_grid():
    assert warnings(DEMO, {"experiments": ["demo"]}) == [
        "- **Unequal training budgets.** The single losses (Table 1) trained for 3 epochs, the "
        "composite and switching runs for 6: 3 of 6 epochs, as in the paper. Tables 1 and 3 are "
        "not a controlled comparison of the losses; `--experiment controls` trains them for the "
        "same budget.",
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


def test_report_puts_the_warnings_before_the_setup(tmp_path):
    path = write_report(tmp_path, DEMO, setup={"preset": "`demo` (--preset)"},
                        context={"experiments": ["demo"]})
    text = path.read_text()
    assert text.index("## Warnings") < text.index("## Setup") < text.index("## Table 1")
    # the collapsed run is counted in its table row
    assert "| `bce` | 1 | **1 of 1** |" in text and "| `iou` | 1 | 0 |" in text
