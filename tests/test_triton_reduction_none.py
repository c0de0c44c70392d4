"""``reduction="none"`` of BCE and Focal on the Triton kernels: one launch forward writes
every element's loss, one launch backward reads each element's upstream gradient.

Each case runs the Triton backend and the reference in the same test and compares the
per-element values and the gradients under a weight map (also NaN or infinite), with
``ignore_index``, ``pos_weight``, ``alpha``, ``gamma``, probabilities, bad values marked NaN
in the kernels (no host read), 16-bit and non-contiguous inputs and a recorded backward. On
the CPU the kernels run in Triton's interpreter (see ``tests/_triton_env.py``).
"""

from __future__ import annotations

import math

import pytest
import torch

from dynloss.functional import _call

from ._backends import (
    MODES,
    assert_second_order_is_the_references,
    elementwise_case,
    elementwise_options,
    make_loss,
    weight_map,
    with_nan_and_inf,
)
from ._launches import count_step, not_counted

# nothing above imports Triton; _triton_env sets TRITON_INTERPRET before anything does
from ._triton_env import DEVICE, SKIP, needs_subprocess, run_file_in_interpreter

_SUBPROCESS_FLAG = "DYNLOSS_TRITON_NONE_TESTS_SUBPROCESS"
needs_triton = pytest.mark.skipif(DEVICE is None, reason=SKIP or "no Triton device")
pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _case(mode: str, from_logits: bool, ignore: bool):
    # (float32 targets: a float64 one is converted first, launches of its own)
    return elementwise_case(mode, from_logits, ignore, spatial=(4, 5), device=DEVICE or "cpu")


_weights = weight_map


def _run(loss_fn, x, target, upstream):
    leaf = x.detach().clone().requires_grad_(True)
    loss = loss_fn(leaf, target)
    (loss * upstream).sum().backward()
    return loss.detach(), leaf.grad, loss


def _compare(name, mode, x, target, upstream, **kwargs):
    got = _run(make_loss(name, mode, "triton", reduction="none", **kwargs), x, target,
               upstream)
    want = _run(make_loss(name, mode, "reference", reduction="none", **kwargs), x, target,
                upstream)
    node = got[2].grad_fn.next_functions[0][0] if got[2].grad_fn.next_functions else None
    assert "TritonFusedLossBackward" in {type(got[2].grad_fn).__name__,
                                         type(node).__name__}
    assert got[0].shape == want[0].shape and got[0].dtype == want[0].dtype
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-6, equal_nan=True)
    return got[0], got[1]


@needs_triton
@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probabilities"])
@pytest.mark.parametrize("ignore", [False, True], ids=["all", "ignore"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,kwargs", [("bce", {}), ("focal", {"gamma": 0.5}),
                                         ("focal", {"gamma": 1.5, "alpha": "weights"})],
                         ids=["bce", "focal-0.5", "focal-alpha"])
def test_values_and_gradients_are_the_references(name, kwargs, mode, ignore, from_logits):
    x, target = _case(mode, from_logits, ignore)
    kwargs = elementwise_options(kwargs, mode, from_logits, ignore, check_values=False)
    weights = _weights(x, mode)
    bad = x.clone()
    bad[1, 0, 2, 3] = math.nan  # that element's (multiclass: pixel's) loss alone is NaN
    for inputs, upstream in ((x, weights), (x, with_nan_and_inf(weights)), (bad, weights)):
        loss, _ = _compare(name, mode, inputs, target, upstream, **kwargs)
    assert torch.isnan(loss).sum().item() == 1
    if ignore:  # an ignored element's loss is 0
        at = (0, 1, slice(0, 3)) if mode == "multiclass" else (0, slice(None), 1, slice(0, 3))
        assert loss[at].abs().max().item() == 0.0


@needs_triton
@pytest.mark.parametrize("mode", MODES)
def test_invalid_targets_are_nan_in_the_kernels(mode, monkeypatch):
    """Unchecked (as on CUDA, where no value is read on the host): a binary target of 2, a
    class index out of range: that element's loss is NaN, as the reference's. (On the CPU a
    class index out of range is always an error, read on the host before any backend: that
    check is switched off here to reach the kernels.)"""
    monkeypatch.setattr(_call, "check_class_indices", lambda *args, **kwargs: None)
    x, target = _case(mode, True, False)
    target = target.clone()
    target.view(-1)[4] = 7 if mode == "multiclass" else 2.0
    loss, _ = _compare("focal", mode, x, target, _weights(x, mode), check_values=False)
    assert torch.isnan(loss).sum().item() == 1 and math.isnan(loss.view(-1)[4].item())


@needs_triton
@pytest.mark.parametrize("pos_weight", [2.5, (0.5, 1.0, 3.0, 2.0)], ids=["one", "per-channel"])
def test_pos_weight(pos_weight):
    x, target = _case("multilabel", True, True)
    _compare("bce", "multilabel", x, target, _weights(x, "multilabel"), pos_weight=pos_weight,
             ignore_index=255, check_values=False)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_inputs(dtype):
    x, target = _case("multiclass", True, False)
    x = x.to(dtype)
    got = _run(make_loss("focal", "multiclass", "triton", reduction="none"), x, target,
               _weights(x, "multiclass"))
    want = _run(make_loss("focal", "multiclass", "reference", reduction="none"), x, target,
                _weights(x, "multiclass"))
    assert got[0].dtype == want[0].dtype == torch.float32 and got[1].dtype == dtype
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1].float(), want[1].float(), rtol=2e-2, atol=2e-3)


@needs_triton
def test_non_contiguous_input_and_upstream():
    x, target = _case("multilabel", True, False)
    view = x.transpose(2, 3)
    upstream = _weights(x, "multilabel").transpose(2, 3)  # (not contiguous either)
    _compare("bce", "multilabel", view, target.transpose(2, 3), upstream, check_values=False)


@needs_triton
@pytest.mark.parametrize("mode", MODES)
def test_second_order_is_the_references(mode):
    """A recorded backward (``create_graph=True``) goes through the reference maths."""
    x, target = _case(mode, True, False)
    assert_second_order_is_the_references("triton", mode, x, target, _weights(x, mode))


@needs_triton
@pytest.mark.parametrize("mode", MODES)
def test_one_launch_each_way(mode, monkeypatch):
    """Forward: one streaming pass writing the losses (no epilogue, no host read); backward:
    one pass reading the (contiguous) upstream gradient."""
    from dynloss.kernels.triton import stream

    monkeypatch.setattr(_call, "check_class_indices", not_counted(_call.check_class_indices))
    x, target = _case(mode, True, True)
    fn = make_loss("bce", mode, "triton", reduction="none", ignore_index=255,
                   check_values=False)
    fn(x, target)  # warm up
    forward, backward = count_step(lambda xs: fn(xs, target), x,
                                   type(stream._binary_fwd_kernel))
    assert len(forward) == 1 and forward[0].startswith("triton."), forward
    assert len(backward) == 1 and backward[0].startswith("triton."), backward


@pytest.mark.skipif(not needs_subprocess(_SUBPROCESS_FLAG),
                    reason="the kernels already run in this process")
def test_interpreter_subprocess():
    """Triton was imported without the interpreter here: run this file in a fresh process."""
    run_file_in_interpreter(__file__, _SUBPROCESS_FLAG, timeout=900)
