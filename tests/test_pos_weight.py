"""``pos_weight`` on BCE: the positives' term weighed, as ``torch.nn.BCEWithLogitsLoss`` does.

Against torch's own loss (values and gradients) and an independent float64 formula, on every
backend this process runs; ``pos_weight=1`` is the unweighted loss bit for bit; the errors; the
dispatch; ``reduction``, ``ignore_index``, a composite, a spec, ``repr`` and pickling.
"""

from __future__ import annotations

import math
import pickle
import warnings

import pytest
import torch

import dynloss
import dynloss.functional as F
from dynloss import BCELoss, CompositeLoss, DiceLoss, FocalLoss, build_loss
from dynloss.kernels.dispatch import Need, clear_cache, select

from ._backends import BACKENDS, seeded_case
from ._kernel_cases import graph_nodes


def _independent(logits, target, pos_weight, from_logits=True, kept=None):
    """Per-element ``-(w g log p + (1-g) log(1-p))`` in float64 (logs clamped at -100)."""
    x, g = logits.double(), target.double()
    c = x.shape[1]
    w = torch.as_tensor(pos_weight, dtype=torch.float64).reshape(
        (1, -1) + (1,) * (x.dim() - 2)).expand(1, c, *(1,) * (x.dim() - 2))
    if from_logits:
        log_p, log_q = torch.nn.functional.logsigmoid(x), torch.nn.functional.logsigmoid(-x)
    else:
        log_p, log_q = torch.log(x).clamp_min(-100), torch.log1p(-x).clamp_min(-100)
    loss = -(w * g * log_p + (1 - g) * log_q)
    if kept is not None:
        loss = loss * kept
    return loss


def _torch_weight(pos_weight, c, spatial_dims):
    """``pos_weight`` shaped as ``BCEWithLogitsLoss`` broadcasts it along the channels."""
    ones = (1,) * spatial_dims
    return torch.as_tensor(pos_weight, dtype=torch.float32).reshape(-1, *ones).expand(c, *ones)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize(("mode", "pos_weight"), [
    ("binary", 3.0), ("binary", [0.25]), ("multilabel", 2.5), ("multilabel", [0.5, 4.0, 1.0]),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_torch_bce_with_logits(backend, mode, pos_weight, soft):
    logits, target = seeded_case(mode, (2, 7, 5), seed=3, soft=soft, scale=4.0)
    c = logits.shape[1]
    torch_loss = torch.nn.BCEWithLogitsLoss(pos_weight=_torch_weight(pos_weight, c, 2))
    loss = BCELoss(mode, pos_weight=pos_weight, backend=backend)
    x, xt = (logits.clone().requires_grad_() for _ in range(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # native/triton: the fallback's note
        got = loss(x, target)
    want = torch_loss(xt, target)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(got.double(), _independent(logits, target, pos_weight).mean(),
                               rtol=1e-6, atol=1e-8)
    got.backward()
    want.backward()
    # torch forms sigmoid(x) - 1, which loses digits where the sigmoid saturates
    torch.testing.assert_close(x.grad, xt.grad, rtol=1e-4, atol=1e-8)
    xd = logits.double().requires_grad_()
    _independent(xd, target, pos_weight).mean().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=2e-9)  # float32 ulps


@pytest.mark.parametrize("backend", BACKENDS)
def test_probabilities_clamped_logs(backend):
    logits, target = seeded_case("multilabel", (2, 4, 3), seed=5, soft=True, scale=6.0)
    p = torch.sigmoid(logits)
    p[0, 0, 0, 0], p[1, 2, 1, 1] = 0.0, 1.0  # clamped logs: a term of -100
    weights = [2.0, 0.5, 3.0]
    reference = BCELoss("multilabel", from_logits=False, pos_weight=weights, backend="reference")
    loss = BCELoss("multilabel", from_logits=False, pos_weight=weights, backend=backend)
    x, xr = (p.clone().requires_grad_() for _ in range(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = loss(x, target)
    want = _independent(p, target, weights, from_logits=False).mean()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-8)
    got.backward()
    reference(xr, target).backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-9)
    # the independent gradient: -(w g / p - (1 - g) / (1 - p)) / M, 0 where a log is clamped
    w = torch.tensor(weights).view(1, 3, 1, 1)
    slope = -(w * target * torch.where(p > 0, 1 / p, 0.0)
              - (1 - target) * torch.where(p < 1, 1 / (1 - p), 0.0))
    torch.testing.assert_close(x.grad, slope / p.numel(), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_and_reductions(backend):
    logits, target = seeded_case("multilabel", (2, 6, 4), seed=7, classes=2)
    target[0, 1, :3] = 255
    kept = (target != 255).double()
    g = torch.where(target == 255, 0.0, target)
    per_element = _independent(logits, g, [3.0, 0.5], kept=kept)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for reduction, want in (("mean", per_element.sum() / kept.sum()),
                                ("sum", per_element.sum()), ("none", per_element)):
            got = F.bce_loss(logits, target, mode="multilabel", pos_weight=[3.0, 0.5],
                             ignore_index=255, reduction=reduction, backend=backend)
            torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_weight_of_one_is_the_unweighted_loss_bit_for_bit(backend):
    logits, target = seeded_case("multilabel", (2, 8, 8), seed=2, soft=True)
    plain = BCELoss("multilabel", backend=backend)
    for weight in (1.0, 1, [1.0, 1.0, 1.0]):
        x, xp = (logits.clone().requires_grad_() for _ in range(2))
        got = BCELoss("multilabel", pos_weight=weight, backend=backend)(x, target)
        want = plain(xp, target)
        assert torch.equal(got, want)
        got.backward()
        want.backward()
        assert torch.equal(x.grad, xp.grad)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_gradcheck_input_and_target(backend):
    logits, target = seeded_case("multilabel", (2, 3, 2), seed=1, classes=2, soft=True,
                                 dtype=torch.float64)
    x = logits.requires_grad_()
    g = target.clone().requires_grad_(backend == "reference")  # torch: no target gradient
    for from_logits in (True, False):
        inp = x if from_logits else torch.sigmoid(x.detach()).requires_grad_()

        def fn(a, b, from_logits=from_logits):
            return F.bce_loss(a, b, mode="multilabel", pos_weight=[2.0, 0.3],
                              from_logits=from_logits, backend=backend)

        assert torch.autograd.gradcheck(fn, (inp, g))
        assert torch.autograd.gradgradcheck(fn, (inp, g))


def test_target_gradient_matches_torch():
    logits, target = seeded_case("binary", (2, 5, 5), seed=9, soft=True, dtype=torch.float64)
    g, gt = (target.clone().requires_grad_() for _ in range(2))
    F.bce_loss(logits, g, pos_weight=4.0).backward()
    torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([4.0], dtype=torch.float64))(
        logits, gt).backward()
    torch.testing.assert_close(g.grad, gt.grad, rtol=1e-10, atol=1e-14)


def test_dispatch_takes_the_backends_that_have_it():
    clear_cache()
    x = torch.zeros(2, 1, 64, 64)
    weighted = Need("distribution", "binary", pos_weight=True)
    if "native" in BACKENDS:  # the C++ kernels weigh the positives
        assert select("auto", x, weighted).name == "native"
    if "native" in BACKENDS:  # float64 computed in double by the C++ kernels too
        assert select("auto", x.double(), weighted).name == "native"
        topk = Need("distribution", "binary", topk=True, pos_weight=True)
        assert select("auto", x.double(), topk).name == "native"
    else:
        assert select("auto", x.double(), weighted).name == "torch"
    assert select("auto", x, weighted, target_grad=True).name == "reference"
    if "triton" in BACKENDS:  # the Triton kernels weigh the positives and the classes
        assert select("triton", x, weighted).name == "triton"
        class_weighted = Need("distribution", "multiclass", weighted_mean=True)
        assert select("triton", x, class_weighted).name == "triton"
    assert BCELoss(pos_weight=2.0)._checked()[2] == weighted
    assert BCELoss(pos_weight=1.0)._checked()[2] == Need("distribution", "binary")


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"pos_weight": -1.0}, ValueError, "pos_weight must be >= 0; got -1.0"),
    ({"pos_weight": float("nan")}, ValueError, "pos_weight must be finite"),
    ({"pos_weight": "3"}, TypeError, "pos_weight must be a real number or a sequence"),
    ({"pos_weight": [1.0, -2.0], "mode": "multilabel"}, ValueError,
     r"pos_weight\[1\] must be >= 0; got -2.0"),
    ({"pos_weight": [], "mode": "multilabel"}, ValueError, "pos_weight must not be empty"),
    ({"pos_weight": torch.ones(2, 3), "mode": "multilabel"}, ValueError,
     r"pos_weight must hold one weight per channel: a tensor of shape \(C,\)"),
    ({"pos_weight": 2.0, "mode": "multiclass"}, ValueError,
     "pos_weight weighs the positives of binary and multilabel targets"),
])
def test_bad_pos_weight_is_refused_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        BCELoss(**kwargs)
    with pytest.raises(error, match=message):
        F.bce_loss(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), **kwargs)


def test_a_weight_per_channel_must_match_the_channels():
    logits, target = seeded_case("multilabel", (1, 2, 2), classes=3)
    with pytest.raises(ValueError, match="pos_weight must hold one weight per channel: 3 "
                                         "values for an input with C=3; got 2"):
        BCELoss("multilabel", pos_weight=[1.0, 2.0])(logits, target)


def test_a_tensor_is_read_as_its_values():
    """``BCEWithLogitsLoss`` users pass a tensor, of shape (C,) or (C, 1, 1): the loss takes its
    values (it is a hyper-parameter, read once) as a list."""
    loss = BCELoss("multilabel", pos_weight=torch.tensor([2.0, 3.0]).view(2, 1, 1))
    assert loss.pos_weight == [2.0, 3.0]
    assert BCELoss(pos_weight=torch.tensor(4.0)).pos_weight == 4.0
    logits, target = seeded_case("multilabel", (2, 3, 3), classes=2)
    want = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0, 3.0]).view(2, 1, 1))(
        logits, target)
    torch.testing.assert_close(loss(logits, target), want, rtol=2e-6, atol=1e-7)


def test_module_repr_spec_pickle_and_state():
    loss = BCELoss("multilabel", pos_weight=[2, 0.5])
    assert repr(loss) == "BCELoss(mode='multilabel', pos_weight=[2.0, 0.5])"
    rebuilt = build_loss(repr(loss))
    assert rebuilt.hyperparameters() == loss.hyperparameters()
    spec = build_loss("bce(pos_weight=3)")
    assert spec.pos_weight == 3.0 and repr(spec) == "BCELoss(pos_weight=3.0)"
    copy = pickle.loads(pickle.dumps(loss))
    logits, target = seeded_case("multilabel", (2, 3, 3), classes=2)
    assert torch.equal(copy(logits, target), loss(logits, target))
    with pytest.raises(TypeError, match=r"BCELoss.pos_weight cannot be changed in place"):
        loss.pos_weight[0] = 5.0
    loss.pos_weight = [5.0, 0.5]  # reassigned: taken at once
    want = F.bce_loss(logits, target, mode="multilabel", pos_weight=[5.0, 0.5])
    assert torch.equal(loss(logits, target), want)
    with pytest.raises(ValueError, match="pos_weight must be >= 0"):
        loss.pos_weight = -1.0
        loss(logits, target)


def test_composite_with_a_weighted_bce_term():
    logits, target = seeded_case("binary", (2, 6, 6), seed=4)
    composite = CompositeLoss([DiceLoss(), BCELoss(pos_weight=3.0)], weights=[0.5, 2.0])
    x, xs = (logits.clone().requires_grad_() for _ in range(2))
    got = composite(x, target)
    want = 0.5 * DiceLoss()(xs, target) + 2.0 * BCELoss(pos_weight=3.0)(xs, target)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    got.backward()
    want.backward()
    torch.testing.assert_close(x.grad, xs.grad, rtol=1e-5, atol=1e-9)
    spec = build_loss("dice + bce(pos_weight=3)")
    torch.testing.assert_close(spec(logits, target), DiceLoss()(logits, target)
                               + BCELoss(pos_weight=3.0)(logits, target), rtol=1e-6, atol=1e-8)
    assert set(composite.last_terms) == {"dice", "bce"}


FUSED_NODES = {"native": "NativeCompositeLossBackward", "triton": "TritonFusedLossBackward"}
"""The autograd node of a backend's one-pass composite (the torch backend's is two sums)."""


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize(("mode", "pos_weight"), [
    ("binary", 3.0), ("multilabel", [0.5, 4.0, 2.0]),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_fused_pass_weighs_the_positives(backend, mode, pos_weight, soft):
    """Dice + BCE(pos_weight) in one pass: the two terms computed apart, term by term, values
    and gradients, with ignored elements."""
    logits, target = seeded_case(mode, (2, 6, 5), seed=8, soft=soft, scale=3.0)
    target[0, 0, :2] = 7
    kw = dict(mode=mode, backend=backend, ignore_index=7)
    composite = CompositeLoss([DiceLoss(**kw), BCELoss(pos_weight=pos_weight, **kw)],
                              weights=[0.5, 2.0])
    assert composite._fused_params([0.5, 2.0]) is not None
    x, xs = (logits.clone().requires_grad_() for _ in range(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = composite(x, target)
        dice = DiceLoss(**kw)(xs, target)
        bce = BCELoss(pos_weight=pos_weight, **kw)(xs, target)
    if backend in FUSED_NODES:
        assert FUSED_NODES[backend] in graph_nodes(got)
    torch.testing.assert_close(composite.last_terms["bce"], bce.detach(), rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(got, 0.5 * dice + 2.0 * bce, rtol=2e-6, atol=1e-7)
    got.backward()
    (0.5 * dice + 2.0 * bce).backward()
    torch.testing.assert_close(x.grad, xs.grad, rtol=1e-4, atol=1e-8)


def test_a_loss_pickled_before_pos_weight_existed_loads_unweighted():
    loss = BCELoss("multilabel")
    state = loss.__getstate__()
    del state["pos_weight"], state["weight"]  # as a BCELoss of 0.1 pickled it
    old = BCELoss.__new__(BCELoss)
    old.__setstate__(state)
    assert old.hyperparameters()["pos_weight"] is None
    assert repr(old) == "BCELoss(mode='multilabel')"
    logits, target = seeded_case("multilabel", (2, 3, 3))
    assert torch.equal(old(logits, target), loss(logits, target))


@pytest.mark.parametrize("shape", [(3, 5), (2, 40, 40), (1, 300, 300)],
                         ids=["short-rows", "rows", "chunks"])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_native_weighs_each_row_by_its_channel(shape, soft):
    """The kernels read a row's channel for its weight: rows kept apart (not read as one), of
    every length the kernels cut differently (short rows grouped, rows, chunks of long rows);
    ignore_index and probabilities too."""
    if "native" not in BACKENDS:
        pytest.skip("no native kernels here")
    logits, target = seeded_case("multilabel", shape, seed=8, classes=3, soft=soft)
    target[0, 1, 0] = 255
    weights = [0.5, 7.0, 2.0]
    for from_logits in (True, False):
        x = logits if from_logits else torch.sigmoid(logits)
        got_x, want_x = (x.clone().requires_grad_() for _ in range(2))
        got = F.bce_loss(got_x, target, mode="multilabel", pos_weight=weights, ignore_index=255,
                         from_logits=from_logits, backend="native")
        want = F.bce_loss(want_x, target, mode="multilabel", pos_weight=weights,
                          ignore_index=255, from_logits=from_logits, backend="reference")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        got.backward()
        want.backward()
        torch.testing.assert_close(got_x.grad, want_x.grad, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("weight", [[2.0], torch.tensor([2.0]), torch.full((1, 1, 1), 2.0)],
                         ids=["list", "(1,)", "(1, 1, 1)"])
def test_one_weight_in_a_sequence_serves_every_channel(weight):
    """As torch broadcasts a one-element ``pos_weight``; it was refused in multilabel mode
    ("3 values for an input with C=3; got 1")."""
    logits, target = seeded_case("multilabel", (2, 4, 4), seed=12)
    loss = BCELoss("multilabel", pos_weight=weight)
    assert loss.pos_weight == 2.0
    want = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0]))(logits, target)
    torch.testing.assert_close(loss(logits, target), want, rtol=2e-6, atol=1e-7)


def test_focal_weights_pickle_as_an_older_dynloss_reads_them():
    """A FocalLoss's alpha list pickles as dynloss 0.1 wrote it (one argument), so that an
    older dynloss still loads a FocalLoss pickled by this one."""
    from dynloss.losses import _Weights

    alpha = FocalLoss(mode="multiclass", alpha=[0.2, 0.8]).alpha
    assert alpha.__reduce__() == (_Weights, ([0.2, 0.8],))
    weights = BCELoss("multilabel", pos_weight=[1.0, 2.0]).pos_weight
    copy = pickle.loads(pickle.dumps(weights))
    with pytest.raises(TypeError, match=r"BCELoss\.pos_weight cannot be changed in place"):
        copy.append(3.0)



@pytest.mark.parametrize("weight", [[1.0] * 5, [1.0, 1.0], torch.ones(2)],
                         ids=["five", "two", "tensor"])
def test_ones_of_the_wrong_number_are_refused(weight):
    """Weights of 1 are the unweighted loss, but their number is still checked against C
    (they became None before the check, and a wrong number passed silently)."""
    logits, target = seeded_case("multilabel", (2, 3, 3))
    count = len(weight)
    with pytest.raises(ValueError, match=f"pos_weight must hold one weight per channel: 3 "
                                         f"values for an input with C=3; got {count}"):
        F.bce_loss(logits, target, mode="multilabel", pos_weight=weight)
    with pytest.raises(ValueError, match="one weight per channel"):
        CompositeLoss([DiceLoss("multilabel"), BCELoss("multilabel", pos_weight=weight)])(
            logits, target)


class _WeightedTopK(dynloss.TopKLoss):
    """TopK of BCE with ``pos_weight``: a subclass declaring the argument (the mechanism
    ``_DistributionLoss._own_arguments`` documents)."""

    _own_arguments = ("k", "pos_weight")

    def __init__(self, k=0.3, pos_weight=None, **kwargs):
        self.pos_weight = pos_weight
        super().__init__(k, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_with_pos_weight_is_weighted_on_every_backend(backend):
    """TopK's per-element losses weighed by ``pos_weight``: the Triton TopK kernels do not
    weigh them, so dispatch must not choose them (they were chosen, silently unweighted)."""
    logits, target = seeded_case("multilabel", (2, 6, 5), seed=12, scale=3.0)
    weights = [4.0, 0.5, 2.0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = _WeightedTopK(0.3, weights, mode="multilabel", backend=backend)(logits, target)
    per_element = _independent(logits, target, weights).flatten()
    count = math.ceil(0.3 * per_element.numel())
    want = per_element.topk(count).values.mean()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-8)


@pytest.mark.skipif("native" not in BACKENDS, reason="the native kernels are not built here")
def test_the_native_kernels_weigh_topk_themselves():
    """The native kernels declare TopK with ``pos_weight`` and compute it: ``backend="native"``
    runs them without a fallback warning (the test above silences warnings, so a declaration
    turned off survived it; mutation review)."""
    from ._kernel_cases import assert_ran_on

    logits, target = seeded_case("multilabel", (2, 6, 5), seed=12, scale=3.0)
    logits = logits.float().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = _WeightedTopK(0.3, [4.0, 0.5, 2.0], mode="multilabel", backend="native")(
            logits, target)
    assert_ran_on(got, "native")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probabilities"])
def test_a_large_weight_leaves_the_negatives_finite(backend, from_logits):
    """The positives' term weighed by a large ``pos_weight`` overflows float32 (``w *
    softplus(-x)``, ``w * log(p)``), but a negative element does not read it: its loss is
    ``softplus(x)`` (``-log(1 - p)``), whatever the weight. The reference and torch backends
    gave NaN there (``lerp(a, inf, 0)``, ``0 * -inf``) where the native kernels gave the
    value. A positive element's loss is +inf on every backend. Found by a review."""
    x = torch.tensor([[[-2.0, 3.0, -1e37, -2.0]]])
    if not from_logits:
        x = torch.tensor([[[0.25, 0.75, 0.0, 0.25]]])
    target = torch.tensor([[[0.0, 0.0, 0.0, 1.0]]])
    loss = BCELoss(pos_weight=3e38, reduction="none", from_logits=from_logits,
                   backend=backend)(x, target)
    negatives = (torch.nn.functional.softplus(x[..., :3]) if from_logits
                 else -torch.log1p(-x[..., :3]))
    torch.testing.assert_close(loss[..., :3], negatives, rtol=1e-6, atol=0.0)
    assert loss[..., 3].item() == math.inf
    mean = BCELoss(pos_weight=100.0, from_logits=from_logits, backend=backend)(
        x[..., :3], target[..., :3])
    torch.testing.assert_close(mean, negatives.mean(), rtol=1e-6, atol=0.0)
