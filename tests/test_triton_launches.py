"""How many launches one forward+backward of each loss costs on the Triton path.

Counted with ``check_values=False`` (as on CUDA): Triton kernels plus aten operations that
launch work (views and empty allocations excluded; the autograd seed is made outside the
count). The goals: at most 4 for Dice, IoU, Tversky, BCE, Focal and fused composites, at most
6 for TopK, in binary, multilabel and multiclass mode. The tests pin the exact numbers so that
they cannot creep back up unnoticed.

On the CPU the kernels run in Triton's interpreter (see ``tests/test_kernels_triton.py`` for
how ``TRITON_INTERPRET=1`` is set); a fresh interpreter process runs this file when Triton was
imported without it.
"""

from __future__ import annotations

import pytest

import dynloss
import dynloss.functional as F
from dynloss.functional import _call

from ._kernel_cases import kernel_inputs
from ._launches import count_step, not_counted

# nothing above imports Triton; _triton_env sets TRITON_INTERPRET before anything does
from ._triton_env import DEVICE, SKIP, needs_subprocess, run_file_in_interpreter

_SUBPROCESS_FLAG = "DYNLOSS_LAUNCH_TESTS_SUBPROCESS"

needs_triton = pytest.mark.skipif(DEVICE is None, reason=SKIP or "no Triton device")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

GOAL = {"stream": 4, "topk": 6}
"""The issue's limits on launches per forward+backward."""
EXPECTED = {"stream": 3, "topk": 6}
"""What the kernels take now: forward = streaming pass + epilogue, backward = one pass;
TopK = a zero fill + four radix passes, backward = one pass."""

MODES = ("binary", "multilabel", "multiclass")


def _loss(name: str, mode: str, **kw):
    common = dict(mode=mode, backend="triton", check_values=False, **kw)
    if name in ("dice", "iou", "tversky", "bce", "focal", "topk"):
        fn = {"dice": F.dice_loss, "iou": F.iou_loss, "tversky": F.tversky_loss,
              "bce": F.bce_loss, "focal": F.focal_loss, "topk": F.topk_loss}[name]
        return lambda x, t: fn(x, t, **common)
    region, pixel = name.split("+")
    region_cls = {"dice": dynloss.DiceLoss, "iou": dynloss.IoULoss,
                  "tversky": dynloss.TverskyLoss}[region]
    pixel_cls = {"bce": dynloss.BCELoss, "focal": dynloss.FocalLoss}[pixel]
    region_only = {"per_image"}
    pixel_kw = {k: v for k, v in common.items() if k not in region_only}
    region_kw = {k: v for k, v in common.items() if k not in {"gamma", "alpha"}}
    return dynloss.CompositeLoss([region_cls(**region_kw), pixel_cls(**pixel_kw)])


def _kernel_class() -> type:
    from dynloss.kernels.triton import stream

    return type(stream._binary_fwd_kernel)


def _count(name: str, mode: str, **kw) -> tuple[list[str], list[str]]:
    x, t = kernel_inputs(mode, (6, 5), seed=3)
    x, t = x.to(DEVICE), t.to(DEVICE)
    fn = _loss(name, mode, **kw)
    fn(x, t)  # warm up: kernel compilation, the dispatch cache
    return count_step(lambda xs: fn(xs, t), x, _kernel_class())


@pytest.fixture(autouse=True)
def _class_index_check_not_counted(monkeypatch):
    """The multiclass index check of ``_call`` reads the labels on the host; it runs for CPU
    tensors only (on CUDA the kernels count invalid labels), so it is not counted here."""
    monkeypatch.setattr(_call, "check_class_indices", not_counted(_call.check_class_indices))


def _kinds(launches: list[str]) -> str:
    return ", ".join(launches)


@needs_triton
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["dice", "iou", "tversky", "bce", "focal", "dice+bce",
                                  "dice+focal", "iou+bce", "tversky+focal"])
def test_stream_losses_launch_three_times(name, mode):
    forward, backward = _count(name, mode)
    total = len(forward) + len(backward)
    assert total <= GOAL["stream"], _kinds(forward + backward)
    assert total == EXPECTED["stream"], _kinds(forward + backward)
    assert len(backward) == 1 and backward[0].startswith("triton."), _kinds(backward)
    assert all(launch.startswith("triton.") for launch in forward), _kinds(forward)


@needs_triton
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["dice", "tversky", "dice+focal"])
def test_per_image_and_sum_launch_three_times(name, mode):
    forward, backward = _count(name, mode, per_image=True)
    assert len(forward) + len(backward) == EXPECTED["stream"], _kinds(forward + backward)
    if "+" not in name:
        forward, backward = _count(name, mode, reduction="sum")
        assert len(forward) + len(backward) == EXPECTED["stream"], _kinds(forward + backward)


@needs_triton
@pytest.mark.parametrize("mode", MODES)
def test_weighted_bce_launches_three_times(mode):
    """``pos_weight`` and the class ``weight``: the same three launches (their tables are
    copied to the device once, in the warm-up call)."""
    kw = {"multiclass": {"weight": [0.5, 1.0, 2.0]}, "multilabel": {"pos_weight": [2.0, 0.5, 3.0]},
          "binary": {"pos_weight": 2.0}}[mode]
    forward, backward = _count("bce", mode, **kw)
    assert len(forward) + len(backward) == EXPECTED["stream"], _kinds(forward + backward)
    assert all(launch.startswith("triton.") for launch in forward + backward), (
        _kinds(forward + backward))


@needs_triton
@pytest.mark.parametrize("mode", ["multilabel", "multiclass"])
@pytest.mark.parametrize("name", ["dice", "dice+bce", "tversky+focal"])
@pytest.mark.parametrize("kw", [{"include_background": False},
                                {"weight": [0.5, 2.0, 1.0], "per_image": True},
                                {"weight": [2.0, 1.0], "include_background": False}],
                         ids=["no-background", "weights", "both"])
def test_a_class_choice_launches_three_times(name, mode, kw):
    """A region term leaving class 0 out or weighing its classes, alone or fused with a
    distribution term: the same three launches (the composite ran its terms apart: six)."""
    x, t = (v.to(DEVICE) for v in kernel_inputs(mode, (6, 5), seed=3))
    common = dict(mode=mode, backend="triton", check_values=False)
    region, _, pixel = name.partition("+")
    loss = {"dice": dynloss.DiceLoss, "tversky": dynloss.TverskyLoss}[region](**kw, **common)
    if pixel:
        loss = dynloss.CompositeLoss([loss, {"bce": dynloss.BCELoss,
                                             "focal": dynloss.FocalLoss}[pixel](**common)])
    loss(x, t)  # warm up: compilation, the class weights' table
    forward, backward = count_step(lambda xs: loss(xs, t), x, _kernel_class())
    assert len(forward) + len(backward) == EXPECTED["stream"], _kinds(forward + backward)
    assert all(launch.startswith("triton.") for launch in forward + backward), (
        _kinds(forward + backward))


@needs_triton
def test_unreduced_scores_without_the_background_add_one_copy():
    """``reduction="none"`` without class 0: its scores are cut from the kernels' every-class
    output, whose gradient is one zero-padded copy besides the three launches."""
    x, t = (v.to(DEVICE) for v in kernel_inputs("multiclass", (6, 5), seed=3))
    loss = dynloss.DiceLoss(mode="multiclass", backend="triton", check_values=False,
                            include_background=False, reduction="none", per_image=True)
    loss(x, t)
    forward, backward = count_step(lambda xs: loss(xs, t), x, _kernel_class())
    assert forward + backward == ["triton._multiclass_fwd_kernel", "triton._epilogue_kernel",
                                  "aten.slice_backward", "triton._multiclass_bwd_kernel"], (
        _kinds(forward + backward))


@needs_triton
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kw", [{}, {"ignore_index": 2, "k": 0.3}],
                         ids=["plain", "ignore"])
def test_topk_launches_six_times(mode, kw):
    forward, backward = _count("topk", mode, **kw)
    total = len(forward) + len(backward)
    assert total <= GOAL["topk"], _kinds(forward + backward)
    assert total == EXPECTED["topk"], _kinds(forward + backward)
    assert forward[0] == "aten.zeros" and backward == ["triton._topk_bwd_kernel"], (
        _kinds(forward + backward))


@needs_triton
@pytest.mark.parametrize("name", ["dice", "focal", "topk", "dice+bce"])
def test_no_host_read(name):
    """Nothing is read back to the host (no ``item``/``_local_scalar_dense``, no ``nonzero``)
    in forward or backward, in multiclass mode with ``ignore_index`` (the hardest case)."""
    kw = {} if "+" in name else {"ignore_index": 1}
    forward, backward = _count(name, "multiclass", **kw)
    host_reads = {"aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.equal",
                  "aten.is_nonzero"}
    assert not host_reads & set(forward + backward), _kinds(forward + backward)


@pytest.mark.skipif(not needs_subprocess(_SUBPROCESS_FLAG),
                    reason="the launch tests already run in this process")
def test_interpreter_subprocess():
    """Triton was imported without the interpreter here: run this file in a fresh process."""
    run_file_in_interpreter(__file__, _SUBPROCESS_FLAG)


@needs_triton
@pytest.mark.parametrize("name, mode", [("dice", "binary"), ("dice+focal", "multiclass"),
                                        ("bce", "multilabel"), ("topk", "multiclass")])
def test_every_launch_runs_on_the_inputs_device(name, mode, monkeypatch):
    """Triton launches on the current CUDA device, not the tensors': with the batch on
    ``cuda:1`` and the current device 0, the kernels would be refused ("cannot be accessed
    from Triton") or race device 1's stream. Every launch (forward and backward) must run
    inside the guard that makes the input's device current."""
    import contextlib

    from dynloss.kernels.triton import stream

    entered: list[object] = []
    outside: list[str] = []

    @contextlib.contextmanager
    def guard(device):
        entered.append(device)
        try:
            yield
        finally:
            entered.append(None)

    monkeypatch.setattr(stream, "launch_device", guard)
    kernel_class = _kernel_class()
    original = kernel_class.run

    def run(self, *args, **kwargs):
        if not entered or entered[-1] is None:
            outside.append(getattr(self, "__name__", repr(self)))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(kernel_class, "run", run)
    x, t = kernel_inputs(mode, (6, 5), seed=3)
    x = x.to(DEVICE).requires_grad_(True)
    _loss(name, mode)(x, t.to(DEVICE)).backward()
    assert not outside, outside
    assert entered and {d for d in entered if d is not None} == {x.device}


def test_the_launch_guard_makes_a_cuda_device_current(monkeypatch):
    import contextlib

    import torch

    from dynloss.kernels.triton import stream

    made = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: made.append(d) or contextlib.nullcontext())
    with stream.launch_device(torch.device("cuda", 1)):
        pass
    with stream.launch_device(torch.device("cpu")):  # the interpreter: nothing to switch
        pass
    assert made == [torch.device("cuda", 1)]
