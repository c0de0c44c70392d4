"""The Triton path inside graphs: ``torch.compile`` and CUDA graph capture.

* The kernels are ``torch.library`` custom operators with fake implementations and autograd
  (``dynloss.kernels.triton.ops``): ``torch.library.opcheck`` validates them, and
  ``torch.compile(fullgraph=True)`` traces every loss into one graph that calls them, with
  the eager values and gradients. On the CPU (Triton's interpreter) the graph runs through
  ``aot_eager`` (plus one Inductor run); on CUDA through Inductor, also with
  ``mode="reduce-overhead"`` (CUDA graphs).
* A forward+backward step of every loss is captured with ``torch.cuda.graph`` and replayed on
  new data, matching eager (CUDA only: this needs no host synchronisation anywhere).
"""

from __future__ import annotations

import pytest
import torch

import dynloss

from ._kernel_cases import kernel_inputs

# nothing above imports Triton; _triton_env sets TRITON_INTERPRET before anything does
from ._triton_env import CUDA, DEVICE, SKIP, needs_subprocess, run_file_in_interpreter

_SUBPROCESS_FLAG = "DYNLOSS_GRAPH_TESTS_SUBPROCESS"
needs_triton = pytest.mark.skipif(DEVICE is None, reason=SKIP or "no Triton device")
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


def _loss(name: str, mode: str):
    """``loss(x, target)`` on the Triton backend with ``check_values=False``."""
    kw = dict(mode=mode, backend="triton", check_values=False)
    alpha = (0.25 if mode != "multiclass" else [0.5, 1.0, 2.0])
    cases = {
        "dice": dynloss.DiceLoss(**kw),
        "tversky-per-image": dynloss.TverskyLoss(per_image=True, smooth=1.0, **kw),
        "iou-none": dynloss.IoULoss(reduction="none", **kw),
        "bce": dynloss.BCELoss(**kw),
        "bce-weighted": (dynloss.BCELoss(weight=[0.5, 1.0, 2.0], **kw) if mode == "multiclass"
                         else dynloss.BCELoss(pos_weight=2.5, **kw)),
        "focal-alpha": dynloss.FocalLoss(gamma=2.0, alpha=alpha, **kw),
        "focal-none": dynloss.FocalLoss(gamma=2.0, alpha=alpha, reduction="none",
                                        ignore_index=2, **kw),
        "bce-none": dynloss.BCELoss(reduction="none", **kw),
        "topk": dynloss.TopKLoss(k=0.3, **kw),
        "topk-ignore": dynloss.TopKLoss(k=0.3, ignore_index=2, **kw),
        "dice+focal": dynloss.CompositeLoss([dynloss.DiceLoss(**kw),
                                             dynloss.FocalLoss(gamma=2.0, **kw)],
                                            weights=[0.7, 1.3]),
    }
    if mode != "binary":  # a class choice (no background, class weights), in the epilogue
        cases["iou-chosen-none"] = dynloss.IoULoss(reduction="none", per_image=True,
                                                   weight=[2.0, 0.5], include_background=False,
                                                   **kw)
        cases["dice-chosen+bce"] = dynloss.CompositeLoss([
            dynloss.DiceLoss(weight=[0.5, 2.0, 1.0], include_background=False, **kw),
            dynloss.BCELoss(**kw)])
    module = cases[name]
    return lambda x, t: module(x, t)


LOSSES = ("dice", "tversky-per-image", "iou-none", "bce", "bce-weighted", "focal-alpha",
          "focal-none", "bce-none", "topk", "topk-ignore", "dice+focal")
CHOSEN = ("iou-chosen-none", "dice-chosen+bce")
"""Losses with a class choice (multiclass and multilabel mode only)."""


def _inputs(mode: str, seed: int, spatial=(6, 7), n: int = 2):
    x, t = kernel_inputs(mode, spatial, n=n, seed=seed)
    return x.to(DEVICE), t.to(DEVICE)


def _step(fn, x, t):
    x = x.detach().clone().requires_grad_(True)
    value = fn(x, t)
    value.sum().backward()
    return value.detach().clone(), x.grad.detach().clone()


def _close(got, want) -> None:
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    scale = want[1].abs().max().item() + 1e-12
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5 * scale)


class _Recorder:
    """A ``torch.compile`` backend that keeps the FX graphs Dynamo hands it."""

    def __init__(self, inner: str) -> None:
        self.inner = inner
        self.targets: list[str] = []

    def __call__(self, gm, example_inputs):
        self.targets += [str(node.target) for node in gm.graph.nodes]
        if self.inner == "aot_eager":
            from torch._dynamo.backends.common import aot_autograd
            from torch._functorch.aot_autograd import make_boxed_func

            def boxed(graph, _inputs):
                return make_boxed_func(graph.forward)

            return aot_autograd(fw_compiler=boxed, bw_compiler=boxed)(gm, example_inputs)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)


# ------------------------------------------------------------------------------- custom ops


@needs_triton
@pytest.mark.parametrize("mode", ["binary", "multiclass"])
def test_custom_ops_pass_opcheck(mode):
    """Schema, fake implementation, autograd registration and AOT dispatch are consistent."""
    from dynloss._params import composite_params, distribution_params, region_params
    from dynloss.kernels.triton import ops, stream, topk

    assert ops.fused is not None  # importing ops registers the operators
    x, t = _inputs(mode, seed=1)
    common = dict(mode=mode, ignore_index=2 if mode == "multiclass" else None)
    x3 = x.reshape(x.shape[0], x.shape[1], -1).requires_grad_(True)
    t3 = t.reshape(t.shape[0], -1) if mode == "multiclass" else t.reshape(x3.shape)
    region = region_params(alpha=0.3, beta=0.7, per_image=True, reduction="none", **common)
    focal = distribution_params(gamma=2.0, alpha=(0.5, 1.0, 2.0) if mode == "multiclass"
                                else 0.25, **common)
    focal_none = distribution_params(gamma=2.0, reduction="none", **common)
    composite = composite_params(region_params(alpha=0.5, beta=0.5, **common), focal, 0.7, 1.3)
    chosen = [region_params(alpha=0.5, beta=0.5, weight=[0.0, 2.0, 0.5], reduction="none",
                            include_background=False, **common)] if mode != "binary" else []
    for params in (region, focal, focal_none, composite, *chosen):
        spec = stream.build_spec(params)
        torch.library.opcheck(torch.ops.dynloss.triton_fused.default,
                              (x3, t3, spec.ints(), spec.floats()))
    spec_k = topk.build_topk_spec(distribution_params(k=0.3, **common))
    torch.library.opcheck(torch.ops.dynloss.triton_topk.default,
                          (x3, t3, spec_k.ints(), spec_k.floats()))


@needs_triton
def test_fake_implementations_give_the_real_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dynloss._params import distribution_params, region_params
    from dynloss.kernels.triton import ops, stream, topk

    assert ops.topk_loss is not None  # importing ops registers the operators
    x = torch.randn(3, 4, 10, device=DEVICE)
    t = torch.randint(0, 4, (3, 10), device=DEVICE)
    specs = [stream.build_spec(region_params(alpha=0.5, beta=0.5, mode="multiclass",
                                             per_image=per_image, reduction=reduction))
             for per_image in (False, True) for reduction in ("mean", "none")]
    specs.append(stream.build_spec(distribution_params(gamma=1.0, mode="multiclass")))
    specs.append(stream.build_spec(distribution_params(gamma=1.0, mode="multiclass",
                                                       reduction="none")))
    real = [torch.ops.dynloss.triton_fused(x, t, s.ints(), s.floats()) for s in specs]
    spec_k = topk.build_topk_spec(distribution_params(k=0.5, mode="multiclass"))
    real_k = torch.ops.dynloss.triton_topk(x, t, spec_k.ints(), spec_k.floats())
    with FakeTensorMode(allow_non_fake_inputs=True) as fake_mode:
        xf, tf = fake_mode.from_tensor(x), fake_mode.from_tensor(t)
        fake = [torch.ops.dynloss.triton_fused(xf, tf, s.ints(), s.floats()) for s in specs]
        fake_k = torch.ops.dynloss.triton_topk(xf, tf, spec_k.ints(), spec_k.floats())
    for got, want in zip([*fake, fake_k], [*real, real_k], strict=True):
        assert [tuple(g.shape) for g in got] == [tuple(w.shape) for w in want]
        assert [g.dtype for g in got] == [w.dtype for w in want]
    assert tuple(real[1][0].shape) == (4,) and tuple(real[3][0].shape) == (3, 4)
    assert tuple(real[5][0].shape) == (3, 10)  # reduction="none": one loss per pixel
    assert real[5][1].numel() == 0  # and no state (an unwritten one failed opcheck by chance)


@needs_triton
@pytest.mark.parametrize("name", ["dice", "iou-none", "bce-weighted", "topk", "dice+focal",
                                  "dice-chosen+bce"])
def test_fake_tensors_take_the_custom_operators(name):
    """Under FakeTensorMode (a tracer's, export's) the Triton backend launched its eager
    kernels on fake tensors ("Attempted to set the storage of a tensor on device 'meta'"):
    the custom operators' fake implementations give the real shapes, forward and backward."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fn = _loss(name, "multiclass")
    x, t = _inputs("multiclass", seed=2)
    want = fn(x, t)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        xf = mode.from_tensor(x).requires_grad_(True)
        got = fn(xf, mode.from_tensor(t))
        got.sum().backward()
        assert tuple(xf.grad.shape) == tuple(x.shape)
    assert (tuple(got.shape), got.dtype) == (tuple(want.shape), want.dtype)


# -------------------------------------------------------------------------------- compile


@needs_triton
@pytest.mark.parametrize("mode", ["binary", "multiclass"])
@pytest.mark.parametrize("name", LOSSES)
def test_compile_fullgraph_matches_eager(name, mode):
    """One graph, calling the custom operators, with eager's values and gradients."""
    fn = _loss(name, mode)
    recorder = _Recorder("aot_eager" if DEVICE == "cpu" else "inductor")
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=recorder, fullgraph=True)
    for seed in (0, 1):
        x, t = _inputs(mode, seed)
        _close(_step(compiled, x, t), _step(fn, x, t))
    assert any("dynloss.triton" in target for target in recorder.targets), recorder.targets


@needs_triton
@pytest.mark.parametrize("mode", ["multiclass", "multilabel"])
@pytest.mark.parametrize("name", CHOSEN)
def test_compile_fullgraph_with_a_class_choice_matches_eager(name, mode):
    """A region term leaving class 0 out and weighing the others, alone and fused with BCE:
    the custom operator's class weights and first class, with eager's values and
    gradients."""
    test_compile_fullgraph_matches_eager(name, mode)


@needs_triton
def test_compile_dynamic_shapes():
    """With dynamic shapes the fake implementations take symbolic sizes. (Parameters built
    outside the compiled function: with ``dynamic=True`` Dynamo makes float arguments
    symbolic, which the parameter checks of ``dynloss._checks`` do not trace.)"""
    from dynloss._params import composite_params, distribution_params, region_params
    from dynloss.functional._call import composite_loss, distribution_loss

    common = dict(mode="multiclass", backend="triton", check_values=False)
    params = composite_params(region_params(alpha=0.5, beta=0.5, **common),
                              distribution_params(gamma=2.0, **common), 0.7, 1.0)

    def fn(x, t):
        return composite_loss(x, t, params)[0]

    topk_params = distribution_params(k=0.3, ignore_index=2, **common)

    def topk_fn(x, t):
        return distribution_loss(x, t, topk_params)

    torch._dynamo.reset()
    backend = "aot_eager" if DEVICE == "cpu" else "inductor"
    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=True)
    compiled_topk = torch.compile(topk_fn, backend=backend, fullgraph=True, dynamic=True)
    for spatial, n in (((5, 6), 2), ((7, 4), 3)):
        x, t = _inputs("multiclass", 3, spatial, n)
        _close(_step(compiled, x, t), _step(fn, x, t))
        _close(_step(compiled_topk, x, t), _step(topk_fn, x, t))


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU interpreter run of Inductor")
def test_compile_inductor_on_cpu():
    """Inductor calls the operators as extern kernels (CPU: under the interpreter)."""
    fn = _loss("dice+focal", "multiclass")
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    x, t = _inputs("multiclass", 4)
    _close(_step(compiled, x, t), _step(fn, x, t))


@needs_cuda
@pytest.mark.parametrize("mode", ["binary", "multiclass"])
@pytest.mark.parametrize("name", ["dice", "focal-alpha", "topk-ignore", "dice+focal"])
def test_compile_reduce_overhead_matches_eager(name, mode):
    fn = _loss(name, mode)
    torch._dynamo.reset()
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    for seed in range(4):  # warm-up, recording, then replays
        torch.compiler.cudagraph_mark_step_begin()
        x, t = _inputs(mode, seed, spatial=(32, 32))
        _close(_step(compiled, x, t), _step(fn, x, t))


# ------------------------------------------------------------------------ CUDA graph capture


@needs_cuda
@pytest.mark.parametrize("mode", ["binary", "multilabel", "multiclass"])
@pytest.mark.parametrize("name", LOSSES)
def test_cuda_graph_capture_and_replay(name, mode):
    """Capture forward+backward once, replay it on new data: eager's values and gradients."""
    fn = _loss(name, mode)
    x0, t0 = _inputs(mode, 0, spatial=(64, 48), n=3)
    x_static = x0.clone().requires_grad_(True)
    t_static = t0.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up: compilation, caches
        for _ in range(2):
            x_static.grad = None
            fn(x_static, t_static).sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    x_static.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss_static = fn(x_static, t_static)
        loss_static.sum().backward()
    grad_static = x_static.grad
    for seed in (1, 2, 3):
        x, t = _inputs(mode, seed, spatial=(64, 48), n=3)
        with torch.no_grad():
            x_static.copy_(x)
        t_static.copy_(t)
        graph.replay()
        torch.cuda.synchronize()
        _close((loss_static.detach(), grad_static), _step(fn, x, t))


@needs_cuda
def test_every_loss_runs_without_host_sync():
    x, t = _inputs("multiclass", 5, spatial=(32, 32))
    fns = [_loss(name, mode) for name in LOSSES for mode in ("binary", "multiclass")]
    inputs = {mode: _inputs(mode, 5, spatial=(32, 32)) for mode in ("binary", "multiclass")}
    for i, fn in enumerate(fns):  # warm up
        x, t = inputs["binary" if i % 2 == 0 else "multiclass"]
        _step(fn, x, t)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, fn in enumerate(fns):
            x, t = inputs["binary" if i % 2 == 0 else "multiclass"]
            xg = x.detach().clone().requires_grad_(True)
            fn(xg, t).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_the_kernels_run_on_the_device_the_environment_names():
    """``DEVICE`` (where every test here runs the kernels) is where they do run: the loss of
    a tensor there is the Triton kernels' (not a fallback), on the same device."""
    if DEVICE is None:  # Triton imported before the interpreter was switched on: a fresh
        assert not CUDA  # process runs this module (test_interpreter_subprocess)
        return
    x = torch.tensor([[[2.0, -1.0, 0.5]]], device=DEVICE, requires_grad=True)
    t = torch.tensor([[[1.0, 0.0, 1.0]]], device=DEVICE)
    loss = dynloss.functional.dice_loss(x, t, backend="triton")
    assert type(loss.grad_fn).__name__ == "TritonFusedLossBackward"
    assert loss.device.type == DEVICE


@pytest.mark.skipif(not needs_subprocess(_SUBPROCESS_FLAG),
                    reason="the graph tests already run in this process")
def test_interpreter_subprocess():
    """Triton was imported without the interpreter here: run this file in a fresh process."""
    run_file_in_interpreter(__file__, _SUBPROCESS_FLAG, timeout=900)
