"""The experiment grids: the paper's Tables 1-4, three experiments beyond it, the t-tests.

The paper's:

- table1: the six single losses for ``epochs`` epochs;
- table2: the four composites ``L_A + L_B`` for ``long_epochs`` epochs;
- table3: the nine switches region -> distribution at ``switch_epoch``, ``long_epochs`` in all;
- table4: k-fold cross-validation of four composite (CF) vs switching (DA) pairs, compared per
  fold with a paired t-test *and* Student's two-sample t-test (equal variances), two-sided;
- demo: the embedded default -- one region loss, one distribution loss, their composite and the
  switch between them (laid out as rows of Tables 1-3).

Beyond the paper (its stated limitations and future work), for one ``pair`` (region,
distribution), default IoU -> BCE (the paper's best switch):

- controls: both single losses trained for ``long_epochs`` (the switching run's budget), beside
  the switch, so that switching is compared with equal training length;
- switchpoints: the switch epoch swept over ``SWITCH_FRACTIONS`` of ``long_epochs`` (10, 25,
  50, 75 %) and ``switch_epoch``, each compared with the switch at ``switch_epoch``;
- adaptive: the switch triggered when the training loss plateaus
  (``iou->bce@plateau(...)``, see :func:`default_trigger`) against the fixed switch.

Every comparison is paired by seed (or fold): mean ± sample std, and two-sided paired t-tests.
A run needed by several experiments (e.g. the fixed switch of table3, controls and adaptive) is
trained once: its folder ``runs/<loss>/e<epochs>/<seed|fold>`` depends on what it is, not on
which table asked for it.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import OptionsError

SINGLE = ("focal", "topk", "bce", "dice", "iou", "tversky")
COMPOSITE = ("tversky+bce", "iou+bce", "iou+topk", "dice+focal")
REGION = ("dice", "iou", "tversky")
DISTRIBUTION = ("focal", "topk", "bce")
TABLE4_PAIRS = (("tversky", "bce"), ("iou", "bce"), ("iou", "topk"), ("dice", "focal"))
PAPER_TABLES = ("table1", "table2", "table3", "table4")
BEYOND = ("controls", "switchpoints", "adaptive")
SECTIONS = (*PAPER_TABLES, *BEYOND)
GROUPS = {"paper": PAPER_TABLES, "beyond": BEYOND, "all": SECTIONS}
EXPERIMENTS = ("demo", *SECTIONS, *GROUPS)
SWITCH_FRACTIONS = (0.1, 0.25, 0.5, 0.75)

# The paper's numbers: mean (std) Dice and IoU.
PAPER_TABLE1 = {
    "focal": (0.7538, 0.0062, 0.6342, 0.0060),
    "topk": (0.7465, 0.0142, 0.6265, 0.0154),
    "bce": (0.7462, 0.0111, 0.6324, 0.0140),
    "dice": (0.6976, 0.0132, 0.5792, 0.0134),
    "iou": (0.6759, 0.0151, 0.5582, 0.0164),
    "tversky": (0.6740, 0.0290, 0.5469, 0.0329),
}
PAPER_TABLE2 = {
    "tversky+bce": (0.7153, 0.5985),
    "iou+bce": (0.7060, 0.5912),
    "iou+topk": (0.7034, 0.5897),
    "dice+focal": (0.6983, 0.5828),
}
PAPER_TABLE3 = {
    "dice->focal": (0.7642, 0.6507), "dice->topk": (0.7734, 0.6608), "dice->bce": (0.7758, 0.6574),
    "iou->focal": (0.7769, 0.6558), "iou->topk": (0.7851, 0.6689), "iou->bce": (0.7882, 0.6750),
    "tversky->focal": (0.7583, 0.6426), "tversky->topk": (0.7842, 0.6667),
    "tversky->bce": (0.7866, 0.6754),
}
# pair: (CF Dice, DA Dice, CF IoU, DA IoU); all p < 0.003 in the paper (test not stated)
PAPER_TABLE4 = {
    "tversky&bce": (0.66, 0.78, 0.54, 0.67),
    "iou&bce": (0.65, 0.77, 0.56, 0.67),
    "iou&topk": (0.63, 0.78, 0.54, 0.67),
    "dice&focal": (0.67, 0.76, 0.57, 0.65),
}


@dataclass(frozen=True)
class RunSpec:
    """One run of a grid, as one section of the report (``table``) sees it."""

    table: str
    loss: str
    epochs: int
    seed: int
    fold: int | None = None
    pair: str | None = None  # table4 and the experiments beyond the paper: "iou&bce"

    @property
    def name(self) -> str:
        """The run's folder under ``--out``; equal for equal runs of different sections."""
        part = f"fold{self.fold}" if self.fold is not None else f"seed{self.seed}"
        return f"runs/{slug(self.loss)}/e{self.epochs}/{part}"


def slug(spec: str) -> str:
    """A folder name for a loss spec: the spec in words, and where that drops or merges some of
    its characters (parentheses, commas), the first 8 hex digits of its SHA-1 (spaces aside),
    so that different losses never share a folder.

    >>> slug("iou->bce@50"), slug("iou->bce@plateau(patience=5, max_epochs=75)")
    ('iou_to_bce_at_50', 'iou_to_bce_at_plateau_patience=5_max_epochs=75-7ee212fa')
    """
    spec = spec.replace(" ", "")
    s = spec.replace("->", "_to_").replace("+", "_plus_").replace("@", "_at_").replace("*", "x")
    words = re.sub(r"[^A-Za-z0-9_.=-]+", "", s.replace("(", "_").replace(",", "_"))
    if words == s:
        return words
    return f"{words}-{hashlib.sha1(spec.encode()).hexdigest()[:8]}"


def base_spec(spec: str) -> str:
    """The spec without its switch points: each ``@...`` up to the next ``->`` or ``+`` outside
    parentheses.

    >>> base_spec("iou->bce@50"), base_spec("iou->bce@plateau(threshold=1e-3)")
    ('iou->bce', 'iou->bce')
    """
    out, depth, skipping, i = [], 0, False, 0
    while i < len(spec):
        ch = spec[i]
        depth += (ch == "(") - (ch == ")")
        if ch == "@" and depth == 0:
            skipping = True
        elif depth == 0 and (spec.startswith("->", i) or ch == "+"):
            skipping = False
        if not skipping:
            out.append(ch)
        i += 1
    return "".join(out)


def switch_at(spec: str) -> str:
    """What follows the ``@`` of a two-stage switch: ``"50"``, ``"plateau(...)"`` or ``""``."""
    return spec.split("@", 1)[1] if "@" in spec else ""


def kind(spec: str) -> str:
    """``single``, ``composite`` or ``switch``."""
    if "->" in spec:
        return "switch"
    return "composite" if "+" in spec else "single"


def _round(x: float) -> int:
    return math.floor(x + 0.5)


def switch_points(long_epochs: int, switch_epoch: int,
                  fractions: Sequence[float] = SWITCH_FRACTIONS) -> list[int]:
    """The swept switch epochs: ``fractions`` of ``long_epochs`` (rounded half up, kept within
    1 .. long_epochs - 1) and ``switch_epoch``, sorted and unique.

    >>> switch_points(100, 50), switch_points(6, 3)
    ([10, 25, 50, 75], [1, 2, 3, 5])
    """
    points = {min(max(1, _round(f * long_epochs)), long_epochs - 1) for f in fractions}
    return sorted(points | {switch_epoch})


def default_trigger(long_epochs: int) -> str:
    """The adaptive switch's trigger: the training loss has not improved for ``patience`` epochs
    (5 % of the budget, at least 1), not before 10 % and at the latest at 75 % of the budget (so
    the distribution loss always gets a quarter of it).

    >>> default_trigger(100)
    'plateau(patience=5, min_epochs=10, max_epochs=75)'
    >>> default_trigger(6)
    'plateau(patience=1, min_epochs=1, max_epochs=5)'
    """
    patience = max(1, _round(0.05 * long_epochs))
    low = max(1, _round(0.1 * long_epochs))
    high = min(max(low, _round(0.75 * long_epochs)), max(1, long_epochs - 1))
    return f"plateau(patience={patience}, min_epochs={low}, max_epochs={high})"


def expand(experiments: str | Sequence[str]) -> list[str]:
    """Experiment names with the groups (``paper``, ``beyond``, ``all``) expanded, in order."""
    names = [experiments] if isinstance(experiments, str) else list(experiments)
    out: list[str] = []
    for name in names:
        if name not in EXPERIMENTS:
            raise ValueError(f"experiment must be one of {EXPERIMENTS}, got {name!r}")
        for item in GROUPS.get(name, (name,)):
            if item not in out:
                out.append(item)
    return out


def plan(
    experiment: str | Sequence[str],
    *,
    seeds: Sequence[int] = (0,),
    epochs: int = 50,
    long_epochs: int = 100,
    switch_epoch: int = 50,
    folds: int = 5,
    demo_pair: tuple[str, str] = ("iou", "bce"),
    losses: Sequence[str] | None = None,
    fractions: Sequence[float] = SWITCH_FRACTIONS,
    trigger: str | None = None,
) -> list[RunSpec]:
    """The runs of ``experiment`` (a name or several); ``losses`` replaces the grid by the given
    specs. ``demo_pair`` is the pair of the demo and of the experiments beyond the paper.

    The same run may appear in several sections (as several specs with one :attr:`RunSpec.name`),
    but once per section: a spec that two experiments (or two ``losses``) ask for in one
    section is planned once.
    """
    wanted = expand(experiment)
    runs: list[RunSpec] = []
    if losses:
        for spec in losses:
            table = {"single": "table1", "composite": "table2", "switch": "table3"}[kind(spec)]
            n = epochs if kind(spec) == "single" else long_epochs
            runs += [RunSpec(table, spec, n, s) for s in seeds]
        return _once_per_section(runs)  # a spec given twice is one run
    region, distribution = demo_pair
    pair = f"{region}&{distribution}"
    fixed = f"{region}->{distribution}@{switch_epoch}"
    if "demo" in wanted:
        for s in seeds:
            runs.append(RunSpec("table1", region, epochs, s))
            runs.append(RunSpec("table1", distribution, epochs, s))
            runs.append(RunSpec("table2", f"{region}+{distribution}", long_epochs, s))
            runs.append(RunSpec("table3", fixed, long_epochs, s))
    if "table1" in wanted:
        runs += [RunSpec("table1", spec, epochs, s) for spec in SINGLE for s in seeds]
    if "table2" in wanted:
        runs += [RunSpec("table2", spec, long_epochs, s) for spec in COMPOSITE for s in seeds]
    if "table3" in wanted:
        runs += [
            RunSpec("table3", f"{r}->{d}@{switch_epoch}", long_epochs, s)
            for r in REGION for d in DISTRIBUTION for s in seeds
        ]
    if "table4" in wanted:
        for r, d in TABLE4_PAIRS:
            for f in range(folds):
                p = f"{r}&{d}"
                runs.append(RunSpec("table4", f"{r}+{d}", long_epochs, seeds[0], f, p))
                runs.append(
                    RunSpec("table4", f"{r}->{d}@{switch_epoch}", long_epochs, seeds[0], f, p)
                )
    if "controls" in wanted:
        for spec in (region, distribution, fixed):
            runs += [RunSpec("controls", spec, long_epochs, s, pair=pair) for s in seeds]
    if "switchpoints" in wanted:
        for e in switch_points(long_epochs, switch_epoch, fractions):
            spec = f"{region}->{distribution}@{e}"
            runs += [RunSpec("switchpoints", spec, long_epochs, s, pair=pair) for s in seeds]
    if "adaptive" in wanted:
        adaptive = f"{region}->{distribution}@{trigger or default_trigger(long_epochs)}"
        for spec in (adaptive, fixed):
            runs += [RunSpec("adaptive", spec, long_epochs, s, pair=pair) for s in seeds]
    # a run that two experiments put in one section (the demo's and table1's `iou`) is one run
    return _once_per_section(runs)


def _once_per_section(runs: Sequence[RunSpec]) -> list[RunSpec]:
    """``runs`` without repeats of a run within a section, the first kept: equal specs, or
    specs that differ in spaces alone (one folder, as :func:`unique_runs` sees them)."""
    kept: dict[tuple[str, str, str, str | None], RunSpec] = {}
    for run in runs:  # (two losses that share a folder are refused by unique_runs)
        kept.setdefault((run.table, run.name, run.loss.replace(" ", ""), run.pair), run)
    return list(kept.values())


def unique_runs(specs: Sequence[RunSpec]) -> list[RunSpec]:
    """One spec per run folder, in the order of first appearance (specs that differ in spaces
    alone are one run); two different losses for one folder are refused (:class:`OptionsError`)."""
    seen: dict[str, RunSpec] = {}
    for spec in specs:
        first = seen.setdefault(spec.name, spec)
        if first.loss.replace(" ", "") != spec.loss.replace(" ", ""):
            raise OptionsError(f"the losses {first.loss!r} and {spec.loss!r} would share the run "
                             f"folder {spec.name}")
    return list(seen.values())


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN for a single value), NaNs ignored."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan


def compare(composite: Sequence[float], switching: Sequence[float]) -> dict[str, float]:
    """Two-sided t-tests of per-fold scores, composite (CF) vs switching (DA).

    ``paired_p``: paired t-test (``scipy.stats.ttest_rel``) -- the folds are shared, so this is
    the appropriate test. ``student_p``: Student's two-sample t-test with equal variances
    (``scipy.stats.ttest_ind(equal_var=True)``), which ignores the pairing.
    """
    from scipy import stats

    a = np.asarray(composite, dtype=float)
    b = np.asarray(switching, dtype=float)
    if len(a) != len(b):
        raise ValueError("composite and switching need one score per fold each")
    out = {"n": len(a), "cf_mean": float(a.mean()), "da_mean": float(b.mean())}
    if len(a) < 2:
        return {**out, "paired_t": math.nan, "paired_p": math.nan,
                "student_t": math.nan, "student_p": math.nan}
    paired = stats.ttest_rel(a, b)
    student = stats.ttest_ind(a, b, equal_var=True)
    return {
        **out,
        "paired_t": float(paired.statistic),
        "paired_p": float(paired.pvalue),
        "student_t": float(student.statistic),
        "student_p": float(student.pvalue),
    }
