"""examples/msd_colon: Dice/IoU in four conventions against hand-computed cases; t-tests."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from msd_colon_lib.evaluation import METRIC_KEYS, confusion, summarize
from msd_colon_lib.experiments import compare
from msd_colon_lib.report import table4_rows


def test_confusion_counts_at_threshold_half():
    probs = torch.tensor([[[0.9, 0.4], [0.6, 0.1]], [[0.2, 0.2], [0.2, 0.5]]])[:, None]
    masks = torch.tensor([[[1, 1], [0, 0]], [[0, 0], [0, 0]]])[:, None]
    # slice 0: tp=1 (0.9), fn=1 (0.4), fp=1 (0.6), tn=1; slice 1: 0.5 counts as positive
    np.testing.assert_array_equal(confusion(probs, masks), [[1, 1, 1, 1], [0, 1, 0, 3]])


def test_four_conventions_hand_computed():
    # [tp, fp, fn, tn] per slice; patients 0, 0, 1, 1
    counts = np.array([
        [0, 0, 0, 10],  # empty vs empty: Dice 1, IoU 1
        [2, 1, 1, 6],   # Dice 4/6, IoU 2/4
        [0, 3, 0, 7],   # false positives on an empty slice: 0, 0
        [3, 0, 3, 4],   # Dice 6/9, IoU 3/6
    ])
    patients = np.array([0, 0, 1, 1])
    m = summarize(counts, patients)
    assert set(m) == set(METRIC_KEYS)
    assert m["dice_slice"] == pytest.approx((1 + 4 / 6 + 0 + 6 / 9) / 4, abs=1e-6)
    assert m["iou_slice"] == pytest.approx((1 + 0.5 + 0 + 0.5) / 4, abs=1e-6)
    # tumour slices are those with ground truth (tp + fn > 0): slices 1 and 3
    assert m["dice_tumour"] == pytest.approx((4 / 6 + 6 / 9) / 2, abs=1e-6)
    assert m["iou_tumour"] == pytest.approx(0.5, abs=1e-6)
    # global: tp=5, fp=4, fn=4
    assert m["dice_global"] == pytest.approx(10 / 18, abs=1e-6)
    assert m["iou_global"] == pytest.approx(5 / 13, abs=1e-6)
    # per patient: p0 tp=2 fp=1 fn=1 -> 4/6, 2/4; p1 tp=3 fp=3 fn=3 -> 6/12, 3/9
    assert m["dice_patient"] == pytest.approx((4 / 6 + 0.5) / 2, abs=1e-6)
    assert m["iou_patient"] == pytest.approx((0.5 + 1 / 3) / 2, abs=1e-6)


def test_predicting_nothing_scores_high_only_per_slice():
    # 9 empty slices and 1 tumour slice, model predicts nothing anywhere
    counts = np.array([[0, 0, 0, 100]] * 9 + [[0, 0, 20, 80]])
    m = summarize(counts, np.zeros(10, int))
    assert m["dice_slice"] == pytest.approx(0.9)
    assert m["dice_tumour"] == m["dice_global"] == m["dice_patient"] == 0.0


def test_no_tumour_slices_gives_nan_tumour_metric():
    m = summarize(np.array([[0, 0, 0, 5]]), np.array([0]))
    assert math.isnan(m["dice_tumour"]) and m["dice_slice"] == 1.0
    assert math.isnan(m["dice_patient"]) and math.isnan(m["iou_patient"])


def test_per_patient_leaves_out_empty_vs_empty_patients_as_nnunet_does():
    """Under --split slice a patient's test slices may hold no tumour: such a patient with no
    prediction scored 1 (a model predicting nothing got 0.7 per patient where it got 0
    globally). nnU-Net's convention: empty vs empty is left out (NaN), false positives on a
    patient without tumour score 0."""
    counts = np.array([
        [0, 0, 0, 50],  # patient 0: no tumour, nothing predicted -> left out
        [0, 0, 0, 50],
        [0, 4, 0, 46],  # patient 1: no tumour, 4 false positives -> 0
        [3, 1, 1, 45],  # patient 2: Dice 6/8, IoU 3/5
    ])
    m = summarize(counts, np.array([0, 0, 1, 2]))
    assert m["dice_patient"] == pytest.approx((0 + 6 / 8) / 2, abs=1e-6)
    assert m["iou_patient"] == pytest.approx((0 + 3 / 5) / 2, abs=1e-6)
    nothing = np.array([[0, 0, 0, 50]] * 7 + [[0, 0, 9, 41]] * 3)
    assert summarize(nothing, np.arange(10))["dice_patient"] == 0.0


CF = [0.66, 0.64, 0.67, 0.65, 0.68]
DA = [0.78, 0.77, 0.79, 0.76, 0.78]


def test_ttests_match_scipy_on_fixed_numbers():
    r = compare(CF, DA)
    paired = stats.ttest_rel(CF, DA)
    student = stats.ttest_ind(CF, DA, equal_var=True)
    assert r["paired_p"] == pytest.approx(paired.pvalue, rel=1e-12)
    assert r["paired_t"] == pytest.approx(paired.statistic, rel=1e-12)
    assert r["student_p"] == pytest.approx(student.pvalue, rel=1e-12)
    assert r["student_t"] == pytest.approx(student.statistic, rel=1e-12)
    assert r["cf_mean"] == pytest.approx(np.mean(CF)) and r["n"] == 5
    # hand check of the paired statistic: mean difference over its standard error
    diff = np.subtract(CF, DA)
    assert r["paired_t"] == pytest.approx(diff.mean() / (diff.std(ddof=1) / np.sqrt(5)))
    with pytest.raises(ValueError, match="need one score per fold each"):
        compare(CF, DA[:4])


def test_table4_rows_from_runs():
    from msd_colon_lib.experiments import RunSpec

    runs = []
    for f, (a, b) in enumerate(zip(CF, DA, strict=True)):
        other = {k: 0.5 + 0.01 * f * f for k in METRIC_KEYS}
        runs.append((RunSpec("table4", "iou+bce", 2, 0, f, "iou&bce"),
                     {"test": {**other, "dice_global": a}}))
        other = {k: 0.6 - 0.02 * f for k in METRIC_KEYS}
        runs.append((RunSpec("table4", "iou->bce@1", 2, 0, f, "iou&bce"),
                     {"test": {**other, "dice_global": b}}))
    rows = {r["convention"]: r for r in table4_rows(runs)}
    assert rows["global"]["folds"] == 5
    assert rows["global"]["dice"]["paired_p"] == pytest.approx(stats.ttest_rel(CF, DA).pvalue)
    assert rows["global"]["dice"]["student_p"] == pytest.approx(
        stats.ttest_ind(CF, DA, equal_var=True).pvalue)


def test_predict_counts_scores_the_models_probabilities():
    """The model gives logits: the counts threshold their sigmoid (not the logits at 0.5) and
    the kept maps are probabilities. An identity model on hand-picked logits."""
    from msd_colon_lib.evaluation import predict_counts

    logits = torch.tensor([[[[-2.0, 0.25], [3.0, -0.1]]], [[[0.3, 0.6], [-0.4, 5.0]]]])
    masks = torch.tensor([[[[0, 1], [1, 0]]], [[[1, 1], [0, 1]]]])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(logits, masks, torch.tensor([7, 9])), batch_size=2)
    counts, index, kept = predict_counts(torch.nn.Identity(), loader, device=torch.device("cpu"),
                                         keep={9})
    # p > 0.5 where the logit is > 0: slice 7 predicts (0, 1, 1, 0) against (0, 1, 1, 0);
    # slice 9 predicts (1, 1, 0, 1) against (1, 1, 0, 1): every pixel right
    assert counts.tolist() == [[2, 0, 0, 2], [3, 0, 0, 1]]
    assert index.tolist() == [7, 9]
    np.testing.assert_allclose(kept[9], torch.sigmoid(logits[1, 0]).numpy(), rtol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_predict_counts_gives_the_model_back_in_its_mode(training):
    """Evaluation runs in eval mode and leaves the model as it found it: a model left in
    eval mode would train on with frozen BatchNorm statistics (mutation review)."""
    from msd_colon_lib.evaluation import predict_counts

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.BatchNorm2d(1))
    modes = []
    model.register_forward_hook(lambda module, args, out: modes.append(module.training))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(4, 1, 3, 3),
                                       (torch.rand(4, 1, 3, 3) > 0.5).long(), torch.arange(4)),
        batch_size=2)
    model.train(training)
    predict_counts(model, loader, device=torch.device("cpu"))
    assert modes == [False, False] and model.training is training
