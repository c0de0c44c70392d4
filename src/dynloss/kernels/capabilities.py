"""What a backend declares: its :class:`Capabilities`, and what a call needs (:class:`Need`).

Shared by :mod:`dynloss.kernels.dispatch` (which compares the two) and the backends (which
declare theirs); it imports nothing from either.

>>> import torch
>>> from dynloss.kernels.capabilities import Capabilities, Need
>>> cpu_float32 = Capabilities(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}))
>>> cpu_float32.missing(torch.zeros(1, 1, 4, dtype=torch.float64), Need("region"), False, None)
'torch.float64 input'
>>> cpu_float32.missing(torch.zeros(1, 1, 4), Need("distribution", topk=True), False, None)
'TopK'
>>> cpu_float32.missing(torch.zeros(1, 1, 4), Need("region"), False, "torch.jit.trace")
'recording by torch.jit.trace'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from ..constants import MODES, MULTICLASS_MODE

if TYPE_CHECKING:
    from .._layout import Layout
    from .._params import CompositeParams, DistributionParams, RegionParams

__all__ = ["OPS", "Backend", "Capabilities", "Need", "row_length", "sums_per_row"]

OPS = ("region", "distribution", "composite")
"""The ops of the six losses: ``region`` (Dice/IoU/Tversky), ``distribution``
(BCE/Focal/TopK), ``composite`` (a region and a distribution term over one input in one
pass). A new loss may add its own op (see the docs' "Adding a loss")."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend can compute. Dispatch never picks a backend for a call it does not cover."""

    devices: frozenset[str] | None
    """Device types (``"cpu"``, ``"cuda"``) it runs on; None: any."""
    dtypes: frozenset[torch.dtype] | None
    """Input dtypes it computes in (the target may have any dtype); None: any float dtype."""
    ops: frozenset[str] | None = frozenset(OPS)
    """The ops it implements (a method of that name); None: every op, also one added later
    (the reference). A loss whose op a kernel backend does not list never runs there."""
    modes: frozenset[str] = frozenset(MODES)
    topk: bool = False
    """The TopK selection (``distribution`` with ``k``)."""
    reduction_none: bool = False
    """``reduction="none"`` of the distribution losses (per-element values)."""
    reduction_none_devices: frozenset[str] | None = None
    """The device types on which it computes :attr:`reduction_none` (None: every device it
    runs on)."""
    topk_reduction_none: bool = False
    """:attr:`reduction_none` of TopK too (its per-element losses, 0 outside the selection;
    with :attr:`topk` and :attr:`reduction_none`)."""
    pos_weight: bool = False
    """BCE's ``pos_weight``: the positives' term of the cross-entropy weighed."""
    topk_pos_weight: bool = False
    """``pos_weight`` in the TopK selection's per-element losses too (with :attr:`topk` and
    :attr:`pos_weight`)."""
    weighted_mean: bool = False
    """BCE's multiclass ``weight``: a mean divided by the kept pixels' class weights."""
    class_choice: bool = False
    """A region term that leaves out class 0 (``include_background=False``) or weighs its
    classes (``weight=``), in its ``region`` and ``composite`` ops. Not a reason to pass a
    backend over: for one without it, every class's score comes from it
    (``reduction="none"``) and :mod:`dynloss.functional` weighs and cuts them."""
    target_grad: bool = False
    """A gradient for a target that requires one (soft labels from a teacher)."""
    double_backward: bool = True
    """Its backward is differentiable (``create_graph=True``); required of every backend."""
    ddp_pool: bool = False
    """Region sums all-reduced across ranks before the score (``ddp_pool=True``)."""
    compilable: bool = False
    """Traced by ``torch.compile`` without a graph break."""
    in_graphs_from: tuple[tuple[str, int | None], ...] = ()
    """Inside ``torch.compile``: for each kind of call (:func:`kind_in_graphs`), the input
    size in elements from which ``backend="auto"`` takes it (None: at no size), where below
    it the compiler's fusion of a later backend was measured as fast or faster; a kind not
    listed: at any size. A speed choice, as :attr:`min_row_length` (a backend named
    explicitly still runs them). A symbolic size (``dynamic=True``, ``torch.export``) counts
    as large unless its range proves it small: comparing it would guard on it."""
    traceable: bool = False
    """Recorded by ``torch.jit.trace`` (plain aten ops that replay on new inputs)."""
    func_transforms: bool = False
    """Runs under the transforms of :mod:`torch.func` (``grad``, ``vmap``, ``jvp``,
    ``jacrev``, ``hessian``, ...): plain aten ops, or Functions with the rules they need."""
    forward_ad: bool = False
    """Runs under forward-mode AD (:mod:`torch.autograd.forward_ad`): a tangent for the loss."""
    checks_values: bool = False
    """Checks target (and probability) values in its own forward pass, at no extra cost."""
    max_classes: int | None = None
    """Largest ``C`` it handles (None: any)."""
    max_rows: int | None = None
    """Largest ``N x C`` (rows of per-sample, per-class sums) it handles (None: any)."""
    min_row_length: int | None = None
    """Shortest rows (``M`` pixels per sample and class) it is the fastest for, in the calls
    whose sums it keeps per row (:meth:`short_rows`): ``backend="auto"`` passes it over for
    shorter ones (a speed choice: a backend named explicitly still runs them)."""

    def missing(self, x: Tensor, need: Need, target_grad: bool, tracing: str | None,
                classes: int = 1) -> str | None:
        """What this call needs that the backend cannot do (None when it covers the call);
        ``tracing``: what records or transforms the call, as
        :func:`dynloss._recorder.recorder` names it (None: an eager call), ``classes``: the
        number of channels ``C``."""
        if self.devices is not None and x.device.type not in self.devices:
            return f"{x.device.type} tensors"
        if self.dtypes is not None and x.dtype not in self.dtypes:
            return f"{x.dtype} input"
        if self.ops is not None and need.op not in self.ops:
            return f"the {need.op} op"
        if need.mode not in self.modes:
            return f"mode={need.mode!r}"
        if need.topk and not self.topk:
            return "TopK"
        if need.reduction_none and not (
                self.reduction_none and (self.reduction_none_devices is None
                                         or x.device.type in self.reduction_none_devices)):
            return "reduction='none'" + ("" if not self.reduction_none
                                         else f" on {x.device.type} tensors")
        if need.reduction_none and need.topk and not self.topk_reduction_none:
            return "reduction='none' with TopK"
        if need.pos_weight and not (self.topk_pos_weight if need.topk else self.pos_weight):
            return "pos_weight" + (" with TopK" if need.topk else "")
        if need.weighted_mean and not self.weighted_mean:
            return "class weights (weight=)"
        if need.ddp_pool and not self.ddp_pool:
            return "ddp_pool=True"
        if target_grad and not self.target_grad:
            return "a gradient for the target"
        if tracing == "torch.compile" and not self.compilable:
            return "tracing by torch.compile"
        if tracing == "torch.jit.trace" and not self.traceable:
            return "recording by torch.jit.trace"
        if tracing == "torch.func" and not self.func_transforms:
            return "a torch.func transform (grad, vmap, jvp, ...)"
        if tracing == "forward-mode AD" and not self.forward_ad:
            return "forward-mode AD"
        if self.max_classes is not None and classes > self.max_classes:
            return f"more than {self.max_classes} classes"
        if (self.max_rows is not None and x.dim()
                and x.shape[0] * classes > self.max_rows):
            return f"more than {self.max_rows} rows (N x C)"
        return None

    def passed_over_in_graphs(self, x: Tensor, need: Need, tracing: str | None,
                              classes: int = 1) -> bool:
        """Whether ``backend="auto"`` passes it over for this call inside ``torch.compile``
        (:attr:`in_graphs_from`)."""
        if tracing != "torch.compile" or not self.in_graphs_from:
            return False
        limits = dict(self.in_graphs_from)
        kind = kind_in_graphs(need, classes)
        if kind not in limits:
            return False
        limit = limits[kind]
        if limit is None:
            return True
        # a symbolic size is small only where its range proves it: no guard on it (a guard
        # would narrow an exported dimension). (Imported here: sympy, 0.1 s, and only
        # torch.compile asks, which has imported it.)
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return statically_known_true(x.numel() < limit)

    def short_rows(self, x: Tensor, need: Need, classes: int = 1) -> bool:
        """Whether this call's rows are shorter than :attr:`min_row_length` where the sums are
        kept per row: a region loss per image or of several classes, any multiclass loss (a
        binary or multilabel pixel loss and a one-class region loss pooled over the batch read
        their rows as one)."""
        if self.min_row_length is None:
            return False
        length = row_length(x, classes)
        return (sums_per_row(need.mode, need.op, need.per_image, classes)
                and length is not None and length < self.min_row_length)


def kind_in_graphs(need: Need, classes: int) -> str:
    """What a call is, for :attr:`Capabilities.in_graphs_from`: ``"composite"``; for a
    distribution term ``"distribution"`` (binary or multilabel BCE), ``"distribution,
    focal"``, ``"distribution, topk"`` (with or without the focal modulation) or
    ``"distribution, multiclass"``; for a region term ``"region, one row"`` (a binary or
    multilabel one whose sums :func:`sums_per_row` reads as one row: the compiler fuses it
    into one pass each way), ``"region, per row"`` (per image, several channels: the compiler
    stores the probabilities) or ``"region, multiclass"``."""
    if need.op == "distribution":
        if need.topk:
            return "distribution, topk"
        if need.mode == MULTICLASS_MODE:
            return "distribution, multiclass"
        return "distribution, focal" if need.focal else "distribution"
    if need.op != "region":
        return need.op
    if need.mode == MULTICLASS_MODE:
        return "region, multiclass"
    if sums_per_row(need.mode, need.op, need.per_image, classes):
        return "region, per row"
    return "region, one row"


def sums_per_row(mode: str, op: str, per_image: bool, classes: int) -> bool:
    """Whether a call's sums are kept per row (per sample and class): a region term per image
    or of several classes, and any multiclass loss. The others (a binary or multilabel pixel
    loss, a one-class region loss pooled over the batch) may read all rows as one."""
    return mode == MULTICLASS_MODE or (op != "distribution" and (per_image or classes > 1))


def row_length(x: Tensor, classes: int) -> int | None:
    """``M``, the pixels per sample and class of the input ``x`` with ``classes`` channels
    (None for an empty batch or a 0-dim tensor: no rows)."""
    rows = x.shape[0] * classes if x.dim() else 0
    return x.numel() // rows if rows else None


@dataclass(frozen=True)
class Need:
    """What a call asks of its backend, besides the tensors."""

    op: str
    mode: str = "binary"
    topk: bool = False
    reduction_none: bool = False
    pos_weight: bool = False
    weighted_mean: bool = False
    ddp_pool: bool = False
    per_image: bool = False
    """A region term's scores per image (its sums kept per sample and class)."""
    focal: bool = False
    """A distribution term with the focal modulation (``gamma > 0``): a choice of speed
    inside ``torch.compile`` (:attr:`Capabilities.in_graphs_from`), no backend lacks it."""


class Backend(Protocol):
    """A backend: its name, capabilities, availability and the three ops.

    Each op receives the tensors in the canonical layout and checked parameters, computes in
    float32 at least (float64 stays float64) and returns the reduced loss (region: ``(C,)`` /
    ``(N, C)`` for ``reduction="none"``; distribution: per-element values for ``"none"``).
    ``checked`` is True when the value checks are due on the host (CPU by default): a backend
    that ``checks_values`` raises for bad targets, the others find them already checked.
    Otherwise invalid targets and non-finite kept inputs make the loss NaN (no host read).
    """

    name: str
    capabilities: Capabilities

    def unavailable(self, x: Tensor) -> str | None:
        """Why it cannot run on ``x``'s device in this process (None when it can)."""

    def region(self, layout: Layout, params: RegionParams, checked: bool) -> Tensor:
        """Dice/IoU/Tversky ``1 - T``, reduced."""

    def distribution(self, layout: Layout, params: DistributionParams, checked: bool
                     ) -> Tensor:
        """BCE/Focal/TopK, reduced."""

    def composite(self, layout: Layout, params: CompositeParams, checked: bool
                  ) -> tuple[Tensor, Tensor, Tensor]:
        """``(weighted sum, region term, distribution term)``, both terms with ``"mean"``."""
