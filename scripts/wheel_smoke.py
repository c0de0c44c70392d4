"""Import and use every public name of an installed dynloss (run by scripts/check_wheel.sh).

Run from outside the repository, in a virtual environment that has only torch and the
dynloss wheel: it fails if dynloss is imported from a source tree, if a name in any
``__all__`` is missing, or if a public name does not work.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import typing
import warnings
from pathlib import Path

import torch

import dynloss

MODULES = ["dynloss", "dynloss.functional", "dynloss.schedules", "dynloss.kernels",
           "dynloss.distributed", "dynloss.constants"]


def main() -> int:
    location = Path(dynloss.__file__).resolve()
    if "site-packages" not in location.parts:
        print(f"dynloss imported from {location}, not from an installed wheel", file=sys.stderr)
        return 1
    extras = [name for name in ("segmentation_models_pytorch", "monai", "hypothesis", "scipy")
              if importlib.util.find_spec(name) is not None]
    if extras:
        print(f"not a torch-only environment: {extras} importable", file=sys.stderr)
        return 1
    if not (location.parent / "py.typed").is_file():
        print("py.typed is missing from the wheel", file=sys.stderr)
        return 1

    used: set[str] = set()

    def use(name: str) -> None:
        used.add(name)

    public: set[str] = set()
    for modname in MODULES:
        module = importlib.import_module(modname)
        for name in getattr(module, "__all__", []):
            getattr(module, name)  # AttributeError if __all__ lies
            public.add(name)

    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    y = (torch.rand(2, 1, 8, 8) > 0.5).float()
    xm = torch.randn(2, 3, 8, 8, requires_grad=True)
    ym = torch.randint(0, 3, (2, 8, 8))

    # The losses, as modules and functions, in every mode.
    from dynloss import (
        BINARY_MODE,
        LOSSES,
        MULTICLASS_MODE,
        MULTILABEL_MODE,
        BCELoss,
        DiceLoss,
        FocalLoss,
        IoULoss,
        JaccardLoss,
        SegmentationLoss,
        TopKLoss,
        TverskyLoss,
    )
    classes = {"BCELoss": BCELoss, "FocalLoss": FocalLoss, "TopKLoss": TopKLoss,
               "DiceLoss": DiceLoss, "IoULoss": IoULoss, "JaccardLoss": JaccardLoss,
               "TverskyLoss": TverskyLoss}
    for public_name, cls in classes.items():
        assert issubclass(cls, SegmentationLoss)
        for mode, inp, tgt in ((BINARY_MODE, x, y), (MULTILABEL_MODE, x, y),
                               (MULTICLASS_MODE, xm, ym)):
            value = cls(mode=mode)(inp, tgt)
            value.backward()
            assert torch.isfinite(value), (cls, mode)
        use(public_name)
        assert LOSSES[cls.name] in (cls, IoULoss)
    from dynloss import constants
    assert constants.MODES == (BINARY_MODE, MULTILABEL_MODE, MULTICLASS_MODE)
    for values, alias in ((constants.MODES, constants.Mode),
                          (constants.REDUCTIONS, constants.Reduction),
                          (constants.BACKENDS, constants.Backend)):
        assert typing.get_args(alias) == values, (alias, values)
    for reduction in constants.REDUCTIONS:
        assert torch.isfinite(DiceLoss(reduction=reduction)(x, y)).all()
    for backend in ("auto", "torch", "reference"):
        assert backend in constants.BACKENDS
        assert torch.isfinite(BCELoss(backend=backend)(x, y))
    for name in ("BINARY_MODE", "MULTILABEL_MODE", "MULTICLASS_MODE", "LOSSES",
                 "SegmentationLoss", "BACKENDS", "MODES", "REDUCTIONS", "Mode", "Reduction",
                 "Backend"):
        use(name)

    from dynloss import functional as F
    for public_name in ("bce_loss", "focal_loss", "topk_loss", "dice_loss", "iou_loss",
                        "jaccard_loss", "tversky_loss"):
        assert torch.isfinite(getattr(F, public_name)(x, y))
        use(public_name)
    ones = torch.ones(1, 1)
    assert F.tversky_index(ones, ones, ones, 0.5, 0.5, 0.0).item() == 1.0
    use("tversky_index")

    # Composite, switching, schedules, triggers, specs, callbacks.
    from dynloss import (
        CompositeLoss,
        Constant,
        Cosine,
        LinearRamp,
        Milestone,
        Plateau,
        RampCosine,
        RelativeImprovement,
        SpecError,
        Step,
        SwitchEvent,
        SwitchingLoss,
        Trigger,
        WeightSchedule,
        build_loss,
        reset_plateau_scheduler,
    )
    for schedule in (Constant(0.5), Step([2], [1.0, 0.0]), LinearRamp(0, 4),
                     Cosine(0, 4), RampCosine(0, 2, 4)):
        assert isinstance(schedule, WeightSchedule)
        assert 0.0 <= schedule.value_at(1) <= 1.0
        use(type(schedule).__name__)
    use("WeightSchedule")
    composite = CompositeLoss([DiceLoss(), BCELoss()], weights=[1.0, LinearRamp(0, 2)])
    composite(x, y).backward()
    composite.step()
    use("CompositeLoss")

    model = torch.nn.Conv2d(1, 1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    events: list[SwitchEvent] = []
    switching = SwitchingLoss([IoULoss(), BCELoss()], milestones=[1])
    switching.on_switch(reset_plateau_scheduler(scheduler))
    switching.on_switch(events.append)
    switching(model(x), y).backward()
    switching.step()
    assert switching.active_index == 1 and isinstance(events[0], SwitchEvent)
    state = switching.state_dict()
    try:  # a repr that names callbacks is not rebuilt without them
        build_loss(repr(switching))
        raise AssertionError("build_loss rebuilt a SwitchingLoss without its callbacks")
    except SpecError as err:
        assert "on_switch" in str(err), err
    again = build_loss("iou->bce@1")
    again.load_state_dict(state)
    assert again.active_index == 1
    use("SwitchingLoss")
    use("SwitchEvent")
    use("reset_plateau_scheduler")
    use("build_loss")
    for trigger in (Milestone(2), Plateau(patience=1), RelativeImprovement(threshold=0.5)):
        assert isinstance(trigger, Trigger)
        trigger.update(1, 1, 1.0)
        use(type(trigger).__name__)
    use("Trigger")
    try:
        build_loss("dice+")
    except SpecError:
        use("SpecError")
    assert isinstance(build_loss("iou->bce@plateau(patience=5)"), SwitchingLoss)

    # Kernels and dispatch (CPU: the native C++ kernels, built from the wheel's source, or
    # the fused eager path where no compiler is found).
    from dynloss import kernels
    status = kernels.native_status()
    if os.environ.get("DYNLOSS_REQUIRE_NATIVE") == "1":
        assert status == "", f"the native kernels did not build from the wheel: {status}"
    assert kernels.native_available() == (status == "")
    assert kernels.resolve_backend(x, "auto") == ("native" if status == "" else "torch")
    assert kernels.native_runs(x, "auto") == (status == "")
    assert kernels.resolve_backend(x.double(), "auto") == ("native" if status == "" else "torch")
    # float64 in double on the native kernels: the reference's digits
    wide = DiceLoss()(x.double(), y.double())
    assert wide.dtype == torch.float64
    assert torch.allclose(wide, DiceLoss(backend="reference")(x.double(), y.double()),
                          rtol=1e-12, atol=0), wide
    for name in ("native_status", "native_available", "native_runs"):
        use(name)
    assert isinstance(kernels.triton_available(), bool)
    assert isinstance(kernels.interpreter_active(), bool)
    # The paper's pairs as a CompositeLoss run one fused pass; the deprecated composite API
    # still gives the same value (and warns).
    reference = DiceLoss()(x, y) + BCELoss()(x, y)
    fused = CompositeLoss([DiceLoss(), BCELoss()])(x, y)
    assert torch.allclose(fused, reference, atol=1e-6), (fused, reference)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = kernels.region_pixel_loss(x, y, region="dice", pixel="bce")
        module_value = kernels.RegionPixelLoss(region="dice", pixel="bce")(x, y)
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    assert torch.allclose(old, reference, atol=1e-5), (old, reference)
    assert torch.allclose(module_value, reference, atol=1e-5)
    for name in ("resolve_backend", "triton_available", "interpreter_active"):
        use(name)

    # Distributed helpers without a process group are identities.
    from dynloss import distributed
    t = torch.arange(3.0)
    assert distributed.is_distributed() is False and distributed.world_size() == 1
    assert torch.equal(distributed.all_reduce_with_grad(t), t)
    assert torch.equal(distributed.all_gather_with_grad(t), t.unsqueeze(0))
    assert torch.equal(distributed.pool_across_ranks(t)[0], t)
    assert distributed.reduce_mean(2.0) == 2.0
    assert distributed.reduce_mean_comparing(2.0, (3, 0)) == (2.0, (True, True))
    assert distributed.metric_value(torch.tensor([0.5])) == 0.5
    distributed.check_metric(1.0)
    try:
        distributed.check_metric("0.5")
    except ValueError:
        pass
    else:
        raise AssertionError("check_metric accepted a string")
    for name in ("is_distributed", "world_size", "all_reduce_with_grad", "all_gather_with_grad",
                 "pool_across_ranks", "reduce_mean", "reduce_mean_comparing", "metric_value",
                 "check_metric"):
        use(name)

    for name in ("__version__", "distributed", "functional", "schedules"):
        use(name)
    missing = sorted(public - used)
    if missing:
        print(f"public names not exercised: {missing}", file=sys.stderr)
        return 1
    print(f"dynloss {dynloss.__version__} wheel: {len(public)} public names imported and used")
    return 0


if __name__ == "__main__":
    sys.exit(main())
