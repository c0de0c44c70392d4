"""examples/msd_colon beyond the paper: controls (equal budgets), switch points, adaptive
switching -- the grids, and all three end to end at tiny scale with their statistics."""

from __future__ import annotations

import csv

import pytest
from scipy import stats

import msd_colon
from msd_colon_lib import experiments
from msd_colon_lib.report import CONVENTION_TITLES, _p

from ._example_helpers import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def test_switch_points_and_default_trigger():
    assert experiments.switch_points(100, 50) == [10, 25, 50, 75]
    assert experiments.switch_points(100, 40) == [10, 25, 40, 50, 75]
    assert experiments.switch_points(3, 1) == [1, 2]
    assert experiments.default_trigger(100) == "plateau(patience=5, min_epochs=10, max_epochs=75)"
    assert experiments.default_trigger(3) == "plateau(patience=1, min_epochs=1, max_epochs=2)"


def test_paper_scale_beyond_grids_share_the_fixed_switch():
    grid = experiments.plan("beyond", seeds=[0, 1, 2], epochs=50, long_epochs=100,
                            switch_epoch=50)
    by_table = {t: [s for s in grid if s.table == t] for t in experiments.BEYOND}
    assert {s.loss for s in by_table["controls"]} == {"iou", "bce", "iou->bce@50"}
    assert {s.epochs for s in grid} == {100}  # controls: the single losses get 100 epochs too
    assert sorted({s.loss for s in by_table["switchpoints"]}) == [
        "iou->bce@10", "iou->bce@25", "iou->bce@50", "iou->bce@75"]
    assert {s.loss for s in by_table["adaptive"]} == {
        "iou->bce@plateau(patience=5, min_epochs=10, max_epochs=75)", "iou->bce@50"}
    # the fixed switch serves three sections and table3, and is trained once per seed
    fixed = {s.name for s in grid if s.loss == "iou->bce@50"}
    assert fixed == {f"runs/iou_to_bce_at_50/e100/seed{k}" for k in range(3)}
    both = experiments.plan(["table3", "beyond"], seeds=[0, 1, 2], epochs=50, long_epochs=100,
                            switch_epoch=50)
    assert len(experiments.unique_runs(both)) == 9 * 3 + (2 + 3 + 1) * 3
    with pytest.raises(ValueError, match="experiment must be one of"):
        experiments.plan("table5")


def _by_seed(results, table, loss):
    return {s.seed: r for s, r in results if s.table == table and s.loss == loss}


def _line(a_label, b_label, a, b, convention="global"):
    seeds = sorted(set(a) & set(b))
    cells = []
    for m in ("dice", "iou"):
        xs = [a[k]["test"][f"{m}_{convention}"] for k in seeds]
        ys = [b[k]["test"][f"{m}_{convention}"] for k in seeds]
        cells += [f"{sum(xs) / len(xs):.4f}", f"{sum(ys) / len(ys):.4f}",
                  _p(stats.ttest_rel(xs, ys).pvalue)]
    return (f"| {a_label} | {b_label} | {CONVENTION_TITLES[convention]} | {len(seeds)} | "
            + " | ".join(cells) + " |")


def test_beyond_the_paper_end_to_end(tmp_path):
    out = tmp_path / "out"
    result = msd_colon.main(["--out", str(out), *TINY, "--experiment", "controls",
                             "switchpoints", "adaptive", "--long-epochs", "3",
                             "--switch-epoch", "1", "--seeds", "0", "1"])
    results = result["results"]
    adaptive = "iou->bce@plateau(patience=1, min_epochs=1, max_epochs=2)"
    # 5 distinct runs per seed: iou, bce (3 epochs each), the switches at 1 and 2, the adaptive
    folders = sorted(str(p.relative_to(out)) for p in out.glob("runs/*/*/seed*"))
    assert len(folders) == 10 and len(results) == (3 + 2 + 2) * 2
    assert {r["epochs"] for _, r in results} == {3}
    # the trigger: patience 1 cannot fire at epoch 1 (the first value is the best so far);
    # max_epochs=2 forces the switch at 2 at the latest -- so it switches at 2, and then it is
    # the fixed switch at 2, bit for bit
    ada = _by_seed(results, "adaptive", adaptive)
    at2 = _by_seed(results, "switchpoints", "iou->bce@2")
    for seed in (0, 1):
        assert ada[seed]["switches"] == [[0, 1, 2]]
        assert [h["stage"] for h in ada[seed]["history"]] == [0, 0, 1]
        assert ada[seed]["test"] == at2[seed]["test"]
    report = (out / "report.md").read_text()
    for title in ("### Controls — single losses with the switching runs' budget",
                  "### Switch points — the switch epoch swept",
                  "### Adaptive switching — switch when the training loss plateaus"):
        assert title in report
    fixed = _by_seed(results, "controls", "iou->bce@1")
    assert _line("`iou->bce@1`", "`iou` (3 ep)", fixed,
                 _by_seed(results, "controls", "iou")) in report
    assert _line("`iou->bce@1`", "`bce` (3 ep)", fixed,
                 _by_seed(results, "controls", "bce"), "patient") in report
    assert _line("`iou->bce@2`", "`iou->bce@1`", at2,
                 _by_seed(results, "switchpoints", "iou->bce@1"), "slice") in report
    assert _line(f"`{adaptive}`", "`iou->bce@1`", ada,
                 _by_seed(results, "adaptive", "iou->bce@1")) in report
    assert f"| `{adaptive}` | 3 | 2 | " in report and "| 2, 2 (mean 2 ± 0) |" in report
    assert "| `iou->bce@2` | 3 | 2 | " in report and "| 2 (67 %) |" in report
    assert ("- **Not run:** Table 1, Table 2, Table 3, Table 4 "
            "(`--experiment table1 table2 table3 table4`).") in report
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert len(rows) == 14
    assert {r["section"] for r in rows} == {"controls", "switchpoints", "adaptive"}
    assert {r["switched_at"] for r in rows if r["loss"] == adaptive} == {"2"}
