"""``torch.compile`` on the CPU runs the native kernels, as custom operators.

Inside a graph the native backend calls ``dynloss::native_loss`` and its backward operator
(:mod:`dynloss.kernels.native.ops`) instead of tracing the reference. Each case compiles the
loss with ``fullgraph=True``, records that the kernels' entry points ran, and compares the
value and the input gradient bitwise with the eager native backend (the same kernels and host
arithmetic). Found by timing: the traced reference was 2.2x (Dice) to 32x (TopK) slower than
the eager kernels at (32, 1, 256, 256). Inside a graph ``backend="auto"`` takes the operators
for BCE/Focal/TopK and the composites only (the compiler fuses Dice/IoU/Tversky from the
reference as fast): the region cases name ``backend="native"``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo.utils

import dynloss
from dynloss import BCELoss, CompositeLoss, DiceLoss, FocalLoss, TopKLoss, build_loss
from dynloss.kernels import dispatch
from dynloss.kernels.dispatch import Need
from dynloss.kernels.native import ffi, ops
from dynloss.kernels.native.ffi import recorded_calls

from ._backends import FUSED

pytestmark = [pytest.mark.skipif("native" not in FUSED, reason="native kernels not built"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(mode: str, seed: int = 0, dtype: torch.dtype = torch.float32, n: int = 2
            ) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    c = 1 if mode == "binary" else 3
    x = (torch.randn(n, c, 6, 7, generator=gen) * 3).to(dtype)
    if mode == "multiclass":
        return x, torch.randint(0, c, (n, 6, 7), generator=gen)
    return x, (torch.rand(n, c, 6, 7, generator=gen) > 0.6).to(dtype)


def _run(loss, x: torch.Tensor, t: torch.Tensor, upstream: float = 1.0
         ) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = x.clone().requires_grad_(True)
    value = loss(leaf, t)
    (value * upstream).sum().backward()  # (a composite pair: every term's gradient)
    assert leaf.grad is not None
    return value.detach(), leaf.grad


def _assert_same(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.isnan(), b.isnan()), (a, b)
        assert torch.equal(a.nan_to_num(), b.nan_to_num()), (a - b).abs().max()


def _compiled_matches_eager(loss, x: torch.Tensor, t: torch.Tensor, backend: str = "aot_eager",
                            upstream: float = 1.0) -> list[str]:
    """The compiled loss's value and gradient are the eager native backend's, bitwise; the
    kernels' entry points called by the compiled forward+backward."""
    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    with recorded_calls() as calls:
        got = _run(compiled, x, t, upstream)
    _assert_same(got, _run(loss, x, t, upstream))
    assert any(call.endswith("_forward") for call in calls), calls
    return calls


class _FusedPair(torch.nn.Module):
    """A region and a distribution term from one pass, as the functional composite computes
    them (``CompositeLoss`` in eager mode): ``(combined, region, distribution)``."""

    def __init__(self, mode: str = "binary", region: tuple[float, float] = (0.5, 0.5),
                 weights: tuple[float, float] = (1.0, 1.0), per_image: bool = False,
                 **distribution: object) -> None:
        from dynloss._params import composite_params, distribution_params, region_params

        super().__init__()
        self.params = composite_params(
            region_params(alpha=region[0], beta=region[1], mode=mode, per_image=per_image,
                          backend="native"),
            distribution_params(mode=mode, backend="native", **distribution), *weights)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        from dynloss.functional._call import composite_loss

        return torch.stack(composite_loss(x, t, self.params))


CASES = {
    # (Dice/IoU/Tversky named: "auto" takes the reference in a graph, see below)
    "dice": (DiceLoss(backend="native"), "binary"),
    "iou-per-image-none": (dynloss.IoULoss(per_image=True, reduction="none", backend="native"),
                           "binary"),
    "tversky-multilabel": (dynloss.TverskyLoss(mode="multilabel", alpha=0.3, beta=0.7,
                                               backend="native"), "multilabel"),
    "dice-ignore": (DiceLoss(mode="multiclass", ignore_index=1, backend="native"),
                    "multiclass"),
    "dice-multiclass-weights": (DiceLoss(mode="multiclass", include_background=False,
                                         weight=[2.0, 0.5], backend="native"), "multiclass"),
    "iou-multiclass-none": (dynloss.IoULoss(mode="multiclass", reduction="none",
                                            per_image=True, backend="native"), "multiclass"),
    # (binary and multilabel BCE/Focal named: "auto" takes the reference in a graph below a
    # size, see below)
    "bce": (BCELoss(backend="native"), "binary"),
    "bce-pos-weight-channels": (BCELoss(mode="multilabel", pos_weight=[2.0, 0.5, 3.0],
                                        backend="native"), "multilabel"),
    "ce-class-weights": (BCELoss(mode="multiclass", weight=[0.2, 1.0, 3.0]), "multiclass"),
    "focal": (FocalLoss(backend="native"), "binary"),
    "focal-gamma-alpha": (FocalLoss(gamma=1.5, alpha=0.25, reduction="sum", backend="native"),
                          "binary"),
    "focal-multiclass-alpha": (FocalLoss(mode="multiclass", alpha=[0.2, 0.3, 0.5]),
                               "multiclass"),
    "topk": (TopKLoss(k=0.2), "binary"),
    "topk-multiclass-ignore": (TopKLoss(mode="multiclass", k=0.3, ignore_index=2),
                               "multiclass"),
    "bce-none": (BCELoss(reduction="none", backend="native"), "binary"),
    "focal-none-multiclass": (FocalLoss(mode="multiclass", reduction="none"), "multiclass"),
    "topk-none": (TopKLoss(k=0.25, reduction="none"), "multilabel"),
    # the fused composite of one pass (a compiled CompositeLoss sums its terms: below)
    "composite": (_FusedPair(), "binary"),
    "composite-multiclass": (_FusedPair(mode="multiclass", weights=(0.5, 2.0), gamma=2.0,
                                        alpha=[0.2, 0.3, 0.5]), "multiclass"),
    "composite-topk": (_FusedPair(mode="multilabel", region=(0.3, 0.7), k=0.3),
                       "multilabel"),
}


@pytest.mark.parametrize("case", CASES)
def test_compiled_native_is_the_eager_native(case):
    loss, mode = CASES[case]
    calls = _compiled_matches_eager(loss, *_inputs(mode))
    if "none" not in case:  # (per-element losses: backward multiplies the slopes in torch)
        assert any(call.endswith("_backward") for call in calls), calls
    if case.startswith("topk"):
        assert any(call.endswith("_topk") for call in calls), calls


@pytest.mark.parametrize("loss, native_terms", [
    (CompositeLoss([DiceLoss(backend="native"), BCELoss(backend="native")]), 2),
    (CompositeLoss([DiceLoss(mode="multiclass"), FocalLoss(mode="multiclass")], [0.5, 2.0]), 1),
    (build_loss("dice + 0.5*topk"), 1),
], ids=repr)
def test_compiled_composites_sum_their_terms(loss, native_terms):
    """A compiled ``CompositeLoss`` sums its terms (weights read from a buffer), each on its
    own backend (``"auto"``: BCE/Focal/TopK on the native operators, Dice on the reference);
    eager mode fuses the pair into one pass: the same value and gradient to rounding."""
    mode = loss.terms["dice"].mode
    x, t = _inputs(mode)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    with recorded_calls() as calls:
        got = _run(compiled, x, t)
    assert sum(call.endswith("_forward") for call in calls) == native_terms, calls
    want = _run(loss, x, t)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("case", ["dice", "topk", "composite", "bce-none"])
def test_inductor_calls_the_operators(case):
    """The default compiler (Inductor) runs the operators as extern kernels."""
    loss, mode = CASES[case]
    _compiled_matches_eager(loss, *_inputs(mode), backend="inductor")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["dice", "bce"])
def test_a_16_bit_nan_input_under_inductor(case, dtype):
    """A 16-bit input whose backward goes through the reference (a NaN logit) gave the
    reference's gradient in the input's dtype where the fake implementation says float32:
    Inductor raised "expected dtype torch.float32 but got torch.float16" (found by a
    review)."""
    loss, mode = CASES[case]
    x, t = _inputs(mode, dtype=dtype)
    x[0, 0, 1, 2] = math.nan
    _compiled_matches_eager(loss, x, t, backend="inductor")
    _compiled_matches_eager(loss, *_inputs(mode, dtype=dtype), backend="inductor",
                            upstream=math.inf)


def test_inductors_cpp_wrapper_builds_the_graph():
    """``cpp_wrapper=True`` pastes the operator's string argument into C++ unescaped: the
    JSON spec's double quotes broke every graph with the operators (found by a review)."""
    import torch._inductor.config

    x, t = _inputs("binary")
    with torch._inductor.config.patch(cpp_wrapper=True):
        _compiled_matches_eager(BCELoss(backend="native"), x, t, backend="inductor")


def test_float_hyperparameters_are_inputs_of_the_graph():
    """Ten TopK losses with ten ``k``: one graph after the first change, as with the
    reference (a ``float[]`` argument fixed each value in the graph: the 9th new value failed
    ``fullgraph=True`` at Dynamo's recompile limit; found by a review)."""
    x, t = _inputs("binary")
    torch._dynamo.utils.counters.clear()
    for k in range(1, 11):
        loss = TopKLoss(k=k / 20)
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
        _assert_same(_run(compiled, x, t), _run(loss, x, t))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2


def test_an_exported_loss_loads_in_a_fresh_process(tmp_path):
    """``import dynloss`` registers the operators that an exported program calls (they were
    registered on the first traced call: a fresh process could not load the program)."""
    import subprocess
    import sys

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.loss = BCELoss(backend="native")

        def forward(self, x, t):
            return self.loss(x, t)

    x, t = _inputs("binary")
    program = torch.export.export(Wrapped(), (x, t), strict=False)
    assert any("dynloss.native_loss" in str(node.target) for node in program.graph.nodes)
    path = tmp_path / "bce.pt2"
    torch.export.save(program, path)
    torch.save((x, t), tmp_path / "inputs.pt")
    code = ("import sys, torch, dynloss\n"
            "x, t = torch.load(sys.argv[2])\n"
            "print(float(torch.export.load(sys.argv[1]).module()(x, t)))\n")
    out = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "inputs.pt")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split()[-1]) == float(BCELoss()(x, t))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["dice", "focal", "composite"])
def test_compiled_native_other_dtypes(case, dtype):
    """float64 computed in double, 16-bit read as a float32 copy: the gradient comes back in
    the input's dtype, as in eager mode."""
    loss, mode = CASES[case]
    _compiled_matches_eager(loss, *_inputs(mode, dtype=dtype))


def test_dynamic_sizes_one_graph():
    """Sizes are read from the tensors, never baked into the operator's arguments: one
    graph with ``dynamic=True`` serves other batch and image sizes."""
    loss = _FusedPair(per_image=True, k=0.1)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager", dynamic=True)
    torch._dynamo.utils.counters.clear()
    for n in (2, 3, 5):
        x, t = _inputs("binary", seed=n, n=n)
        _assert_same(_run(compiled, x, t), _run(loss, x, t))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("case", ["dice", "bce", "topk", "bce-none", "composite",
                                  "composite-topk"])
def test_a_nan_input_in_a_graph(case):
    """A NaN logit: the loss NaN, the gradient the reference's NaN pattern (0 on ignored or
    unselected elements), formed by the backward operator through the reference as the eager
    backward does."""
    loss, mode = CASES[case]
    x, t = _inputs(mode)
    x[0, 0, 1, 2] = math.nan
    _compiled_matches_eager(loss, x, t)


@pytest.mark.parametrize("case", ["dice-multiclass-weights", "focal", "composite"])
def test_a_non_finite_upstream_gradient_in_a_graph(case):
    loss, mode = CASES[case]
    _compiled_matches_eager(loss, *_inputs(mode), upstream=math.inf)


def test_an_overflowed_slope_in_a_graph():
    """A probability whose ``1/p`` is beyond float32: the backward operator forms the
    gradient as autograd does, as the eager backward."""
    loss = BCELoss(from_logits=False, backend="native")
    p = torch.full((1, 1, 4, 4), 0.5)
    p[0, 0, 0, 0] = 1e-40
    t = torch.ones(1, 1, 4, 4)
    _compiled_matches_eager(loss, p, t)


def test_invalid_targets_make_nan_in_a_graph():
    """As documented for every backend inside a graph: NaN, no error (eager raises); a class
    index out of range too, whose gradient is the compiled reference's."""
    x, t = _inputs("binary")
    t[0, 0, 0, 0] = 3.0
    with pytest.raises(ValueError, match=r"target values must lie in \[0, 1\]"):
        DiceLoss()(x, t)
    assert torch.isnan(torch.compile(DiceLoss(), fullgraph=True, backend="aot_eager")(x, t))
    x, t = _inputs("multiclass")
    t[0, 0, 0] = 3
    for name in ("dice", "bce", "bce-none"):
        kwargs = {"reduction": "none"} if name.endswith("none") else {}
        cls = DiceLoss if name == "dice" else BCELoss
        with recorded_calls() as calls:
            got = _run(torch.compile(cls(mode="multiclass", backend="native", **kwargs),
                                     fullgraph=True,
                                     backend="aot_eager"), x, t)
        assert calls, "the native kernels did not run"
        want = _run(torch.compile(cls(mode="multiclass", backend="reference", **kwargs),
                                  fullgraph=True, backend="aot_eager"), x, t)
        assert bool(got[0].isnan().any())
        _assert_same((got[1].isnan(),), (want[1].isnan(),))


def test_no_gradient_wanted_keeps_no_buffer():
    """Under ``torch.no_grad`` the operator is traced without a gradient: it saves nothing."""
    gen = torch.Generator().manual_seed(0)  # 2 MiB, over the pool's smallest buffer (1 MiB)
    x = torch.randn(8, 1, 256, 256, generator=gen)
    t = (torch.rand(8, 1, 256, 256, generator=gen) > 0.5).float()
    compiled = torch.compile(DiceLoss(backend="native"), fullgraph=True, backend="aot_eager")
    ffi.POOL.clear()
    with torch.no_grad():
        value = compiled(x.requires_grad_(True), t)
    assert torch.equal(value, DiceLoss()(x.detach(), t))
    assert len(ffi.POOL) == 0
    _run(compiled, x.detach(), t)  # with a gradient: the saved buffer and the gradient's
    assert len(ffi.POOL) == 2


def test_the_operator_arguments_hold_every_value():
    """The operator's ``spec`` is JSON of the parameters' structure and its numbers are
    arguments of their own (no handle into this process): read back exactly, tuples, floats
    that are not short in binary and None included."""
    from dynloss._params import composite_params, distribution_params, region_params

    region = region_params(mode="multiclass", alpha=0.1, beta=0.7, weight=[0.1, 1 / 3, 2.0],
                           ignore_index=255)
    distribution = distribution_params(mode="multiclass", gamma=1.5, alpha=[0.2, 0.3, 1 / 7],
                                       k=0.1, ignore_index=255)
    composite = composite_params(region, distribution, region_weight=1 / 3,
                                 distribution_weight=0.1)
    for kind, params in [("region", region), ("distribution", distribution),
                         ("elements", distribution), ("composite", composite)]:
        spec, ints, floats = ops.operator_arguments(kind, params, True, False)
        assert "255" not in spec and "0.1" not in spec  # (numbers are arguments)
        # (Inductor's C++ wrapper pastes a string argument into C++ unescaped)
        assert '"' not in spec and "\\" not in spec
        assert floats.dtype == torch.float64
        call = ops._decode(spec, ints, floats)
        assert (call.kind, call.params, call.checked, call.needs_grad) == (
            kind, params, True, False)
    spec, ints, floats = ops.operator_arguments("distribution", distribution, False, True)
    assert ints == [255]
    spec, ints, floats = ops.operator_arguments("distribution", distribution_params(k=0.5),
                                                False, True)
    assert ints == [] and ops._decode(spec, None, floats).params.k == 0.5  # (AOTInductor's
    # runtime passes an empty int list as None)
    with pytest.raises(ValueError, match="kind must be one of"):
        ops.operator_arguments("pixel", region, True, False)


@pytest.mark.parametrize("case", ["dice-multiclass-weights", "iou-per-image-none", "topk",
                                  "focal-none-multiclass", "composite-multiclass"])
def test_opcheck(case, monkeypatch):
    """torch's own checks of the custom operator as the losses call it: schema, fake
    implementation (also with dynamic sizes), autograd registration."""
    loss, mode = CASES[case]
    x, t = _inputs(mode)
    arguments: list[tuple] = []
    decode = ops._decode

    def recording(spec, ints, floats):
        if floats is not None:  # (a real call, not the fake implementation's)
            arguments.append((spec, list(ints), floats.clone()))
        return decode(spec, ints, floats)

    monkeypatch.setattr(ops, "_decode", recording)
    _run(torch.compile(loss, fullgraph=True, backend="aot_eager"), x, t)
    assert arguments
    torch.library.opcheck(torch.ops.dynloss.native_loss.default,
                          (x.requires_grad_(True), t, *arguments[0]))


@pytest.mark.parametrize("name, native", [("dice", False), ("iou", False), ("tversky", False),
                                          ("bce", False), ("focal", False), ("topk", True)])
def test_auto_in_a_graph_takes_the_faster_of_native_and_the_compilers_fusion(name, native):
    """Inside ``torch.compile`` on a small input ``"auto"`` takes the reference, which
    Inductor fuses, for every loss but TopK (whose compiled reference is 4x slower than the
    operators at (8, 1, 64, 64)): the operators' fixed cost of about 0.3 ms a call loses
    there (``bench_cpu.py --compile``); see the size rules below."""
    from dynloss.kernels.dispatch import select

    x, t = _inputs("binary")
    loss = dynloss.LOSSES[name]()
    with recorded_calls() as calls:
        got = _run(torch.compile(loss, fullgraph=True, backend="aot_eager"), x, t)
    assert bool(calls) == native, calls
    torch.testing.assert_close(got, _run(loss, x, t), rtol=1e-5, atol=1e-7)
    need = (Need("region") if name in ("dice", "iou", "tversky")
            else Need("distribution", topk=name == "topk", focal=name == "focal"))
    fake = torch._subclasses.fake_tensor.FakeTensorMode().from_tensor(x)
    assert select("auto", fake, need).name == ("native" if native else "reference")
    assert select("native", fake, need).name == "native"  # (named: no fallback)


# (mode, input shape, per_image, the backend "auto" takes in a graph)
@pytest.mark.parametrize("mode, shape, per_image, backend", [
    ("binary", (64, 1, 256, 256), False, "reference"),  # one row: one fused pass, any size
    ("binary", (64, 1, 256, 256), True, "reference"),  # per row: measured faster too
    ("multilabel", (16, 4, 256, 256), False, "reference"),
    ("multiclass", (4, 4, 64, 64), False, "native"),  # from 2**16 elements
    ("multiclass", (4, 4, 63, 64), False, "reference"),
])
def test_auto_in_a_graph_takes_native_region_kernels_for_multiclass_from_a_size(
        mode, shape, per_image, backend):
    """Inside ``torch.compile`` a multiclass region term compiles to a slow graph: from 2**16
    input elements the native operators are faster (``bench_cpu.py --compile --mode
    multiclass``: 4.3-4.8 ms against the compiled reference's 18-21 ms at (8, 4, 256, 256));
    below, the compiler's fusion of the reference, which has no fixed cost per call. A binary
    or multilabel one always takes the reference: pooled over a binary batch it compiles to
    one fused pass each way; per image or with several channels Inductor stores the
    probabilities, and yet the compiled reference was the faster in the benchmark."""
    from dynloss.kernels.dispatch import select

    with torch._subclasses.fake_tensor.FakeTensorMode():
        x = torch.empty(shape)
    need = Need("region", mode=mode, per_image=per_image)
    assert select("auto", x, need).name == backend
    assert select("native", x, need).name == "native"


# (need, input shape, the backend "auto" takes in a graph)
@pytest.mark.parametrize("need, shape, backend", [
    (Need("distribution"), (8, 1, 128, 128), "reference"),  # BCE: from 2**18 elements
    (Need("distribution"), (16, 1, 128, 128), "native"),
    (Need("distribution", pos_weight=True, reduction_none=True), (8, 1, 128, 128),
     "reference"),
    (Need("distribution", focal=True), (4, 1, 128, 128), "native"),  # Focal: from 2**16
    (Need("distribution", focal=True), (4, 1, 127, 128), "reference"),
    (Need("distribution", mode="multilabel", focal=True), (2, 2, 127, 128), "reference"),
    (Need("distribution", topk=True), (1, 1, 4, 4), "native"),  # TopK: any size
    (Need("distribution", focal=True, topk=True), (1, 1, 4, 4), "native"),
    (Need("distribution", mode="multiclass"), (1, 4, 4, 4), "native"),  # multiclass: any
    (Need("composite"), (1, 1, 4, 4), "native"),
])
def test_auto_in_a_graph_takes_the_native_distribution_kernels_from_a_size(need, shape,
                                                                           backend):
    """BCE and Focal inside ``torch.compile``: the compiled reference has no fixed cost per
    call and was faster than the operators below 2**18 input elements for BCE (0.27 against
    0.45 ms at (8, 1, 80, 80), a tie at (8, 1, 181, 181)) and below 2**16 for Focal (a tie at
    (8, 1, 96, 96), the operators faster from (8, 1, 128, 128)), in ``bench_cpu.py
    --compile``; TopK, multiclass and composites take the operators at every size."""
    from dynloss.kernels.dispatch import select

    with torch._subclasses.fake_tensor.FakeTensorMode():
        x = torch.empty(shape)
    assert select("auto", x, need).name == backend
    assert select("native", x, need).name == "native"


def test_a_small_compiled_bce_runs_the_reference_and_a_large_one_the_kernels():
    gen = torch.Generator().manual_seed(7)
    for shape, native in (((2, 1, 16, 16), False), ((4, 1, 256, 256), True)):
        x = torch.randn(shape, generator=gen) * 3
        t = (torch.rand(shape, generator=gen) > 0.7).float()
        loss = BCELoss()
        with recorded_calls() as calls:
            got = _run(torch.compile(loss, fullgraph=True), x, t)
        assert bool(calls) == native
        want = _run(loss, x, t)
        torch.testing.assert_close(got, want, rtol=0 if native else 1e-5,
                                   atol=0 if native else 1e-7)


def test_a_symbolic_size_in_a_graph_takes_the_native_region_kernels_without_a_guard():
    """With ``dynamic=True`` (or ``torch.export``) the input's size is symbolic: comparing it
    with the threshold would guard on it (and narrow an exported dimension); it counts as
    large, and the native operators run."""
    gen = torch.Generator().manual_seed(5)
    loss = DiceLoss(mode="multiclass")
    compiled = torch.compile(loss, fullgraph=True, dynamic=True)
    for batch in (2, 3):
        x = torch.randn(batch, 3, 4, 5, generator=gen)
        t = torch.randint(0, 3, (batch, 4, 5), generator=gen)
        with recorded_calls() as calls:
            got = _run(compiled, x, t)
        assert calls
        torch.testing.assert_close(got, _run(loss, x, t), rtol=1e-5, atol=1e-7)


def test_a_compiled_multiclass_dice_of_a_training_size_runs_the_native_kernels():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 128, 128, generator=gen) * 3
    t = torch.randint(0, 4, (2, 128, 128), generator=gen)
    loss = DiceLoss(mode="multiclass")
    with recorded_calls() as calls:
        got = _run(torch.compile(loss, fullgraph=True), x, t)
    assert calls
    want = _run(loss, x, t)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_a_named_native_backend_runs_in_a_graph_without_a_warning():
    import warnings

    dispatch.clear_cache()
    x, t = _inputs("binary")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _compiled_matches_eager(DiceLoss(backend="native"), x, t)
    assert not [w for w in caught if "backend='native'" in str(w.message)]
