"""The six losses as ``nn.Module`` s: argument checks at construction, then the functional form.

Every loss is called as ``loss(input, target)``. Each module's ``repr`` lists the arguments
that differ from their defaults, e.g. ``TverskyLoss(alpha=0.5, beta=0.5)``, and is valid Python
given ``from dynloss import *``.

:data:`LOSSES` maps the short names that spec strings use to the classes:

>>> from dynloss import LOSSES, IoULoss
>>> sorted(LOSSES)
['bce', 'dice', 'focal', 'iou', 'jaccard', 'topk', 'tversky']
>>> LOSSES["jaccard"] is LOSSES["iou"] is IoULoss
True
"""

from __future__ import annotations

import inspect
import re
import typing
import warnings
from collections.abc import Callable, Sequence
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from . import functional as F
from ._checks import (
    assigned_value,
    check_backend,
    check_bool,
    check_class_weight,
    check_ddp_pool,
    check_focal_alpha,
    check_fraction,
    check_ignore_index,
    check_include_background,
    check_mode,
    check_non_negative,
    check_optional_bool,
    check_pos_weight,
    check_reduction,
    check_region_weight,
    check_smoothing,
)
from ._params import distribution_params, region_params
from .constants import MULTICLASS_MODE, MULTILABEL_MODE
from .functional import _call

__all__ = [
    "LOSSES",
    "BCELoss",
    "DiceLoss",
    "FocalLoss",
    "IoULoss",
    "JaccardLoss",
    "SegmentationLoss",
    "TopKLoss",
    "TverskyLoss",
]


def _as_spec_value(value: Any, as_float: bool) -> Any:
    """``value`` as a spec writes it, the way a constructor keeps it: a number (a NumPy scalar,
    or an int for a float argument: ``as_float``) as a Python int or float, a sequence (a tuple
    of class weights, reassigned) as a list. A constructor normalises its arguments; a
    reassigned one is kept as given, and its repr must still be a spec."""
    if isinstance(value, Integral) and not isinstance(value, bool):
        return float(value) if as_float else int(value)
    if isinstance(value, Real) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_as_spec_value(item, as_float) for item in value]
    return value


def _annotated_types(annotation: Any) -> set[Any]:
    """The classes an annotation names, through unions and containers
    (``float | Sequence[float] | None`` -> ``{float, Sequence, NoneType}``)."""
    arguments = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    found = {annotation} if origin is None else ({origin} if isinstance(origin, type) else set())
    for argument in arguments:
        found |= _annotated_types(argument)
    return found


_FLOAT_ARGUMENTS: dict[type[SegmentationLoss], frozenset[str]] = {}


def _float_arguments(cls: type[SegmentationLoss]) -> frozenset[str]:
    """The constructor arguments of ``cls`` whose numbers are floats: annotated with ``float``
    and not ``int`` (``FocalLoss``'s ``alpha``, default None; an annotation that cannot be
    resolved is read for those two words), or unannotated with a float default."""
    names = _FLOAT_ARGUMENTS.get(cls)
    if names is None:
        hints: dict[type, dict[str, Any]] = {}
        floats = set()
        for name, (parameter, owner) in _constructor_parameters(cls).items():
            if owner not in hints:
                try:
                    hints[owner] = typing.get_type_hints(vars(owner)["__init__"])
                except Exception:  # an annotation its module cannot resolve: each on its own
                    hints[owner] = {}
            if name in hints[owner]:
                types = _annotated_types(hints[owner][name])
            else:
                types = _words_of(parameter.annotation)
            if (float in types and int not in types) or (
                    not types and isinstance(parameter.default, float)):
                floats.add(name)
        names = _FLOAT_ARGUMENTS[cls] = frozenset(floats)
    return names


def _words_of(annotation: Any) -> set[Any]:
    """``float`` and ``int`` as an annotation that could not be resolved names them (the
    string ``"float | Tag"``: ``{float}``); nothing for no annotation."""
    if annotation is inspect.Parameter.empty:
        return set()
    words = set(re.findall(r"[A-Za-z_][A-Za-z_0-9.]*", str(annotation)))
    return {kind for kind in (float, int) if kind.__name__ in words} or {object}


class SegmentationLoss(nn.Module):
    """Base class of the losses: checked hyper-parameters, then the functional form.

    The constructor checks its arguments (``mode``, ``from_logits``, ``ignore_index``,
    ``reduction``, ``backend``, ``check_values``; each subclass adds its own) and stores each
    under its own name. ``forward(input, target)`` calls the loss's function in
    :mod:`dynloss.functional` with :meth:`hyperparameters`, so a module and its functional
    form give the same value. ``repr`` lists the arguments that differ from their defaults; it
    is valid Python and a spec that :func:`~dynloss.build_loss` rebuilds.

    Examples:
        >>> import torch
        >>> from dynloss import DiceLoss, SegmentationLoss, build_loss
        >>> from dynloss.functional import dice_loss
        >>> loss = DiceLoss(mode="multiclass", ignore_index=255)
        >>> isinstance(loss, SegmentationLoss), loss.name
        (True, 'dice')
        >>> loss
        DiceLoss(mode='multiclass', ignore_index=255)
        >>> loss.hyperparameters()["per_image"]  # a default, stored all the same
        False
        >>> build_loss(repr(loss)).hyperparameters() == loss.hyperparameters()
        True
        >>> logits, labels = torch.zeros(1, 3, 2, 2), torch.tensor([[[0, 1], [2, 255]]])
        >>> bool(loss(logits, labels) == dice_loss(logits, labels, mode="multiclass",
        ...                                       ignore_index=255))
        True
    """

    name: ClassVar[str]
    """Short name used in spec strings (``"dice"``, ``"bce"``, ...)."""
    _function: ClassVar[Callable[..., Tensor]]
    """The functional form (same arguments, same value)."""
    _prepared: tuple[Callable[..., Tensor], Any, Any, dict] | None = None
    """What ``forward`` calls, with the checked parameters and the plans of recent calls
    (:data:`dynloss.functional._call.Plans`); rebuilt after an argument is set, not saved."""

    def __init__(
        self,
        *,
        mode: str = "binary",
        from_logits: bool = True,
        ignore_index: int | None = None,
        reduction: str = "mean",
        backend: str = "auto",
        check_values: bool | None = None,
    ) -> None:
        super().__init__()
        self.mode = check_mode(mode)
        self.from_logits = check_bool("from_logits", from_logits)
        self.ignore_index = check_ignore_index(ignore_index)
        self.reduction = check_reduction(reduction)
        self.backend = check_backend(backend)
        self.check_values = check_optional_bool("check_values", check_values)

    def __setattr__(self, name: str, value: Any) -> None:
        argument = name in _constructor_arguments(type(self))
        if argument and name in _BUILT_IN_ARGUMENTS:  # (a subclass's own: as it stores it)
            value = self._assigned(name, assigned_value(name, value))
        super().__setattr__(name, value)
        if argument:
            self.__dict__["_prepared"] = None
            if self.__dict__.get("_constructed"):  # a reassigned argument: checked again now,
                self._ready(strict=False)  # or, if invalid for now, at the next call

    def _assigned(self, name: str, value: Any) -> Any:
        """The constructor argument ``name`` as this loss keeps it (after
        :func:`~dynloss._checks.assigned_value`): subclasses keep per-class weights as a list
        that refuses changes in place."""
        return value

    def _ready(self, strict: bool = True) -> None:
        """Check every argument together and keep the result (the end of a constructor).

        Done here rather than at the first call, so that ``torch.compile`` never traces the
        checks (with ``dynamic=True`` a check of a float argument broke the graph, and the
        lazily filled state made every compiled loss trace twice). ``strict=False``: an
        invalid combination (one argument of several reassigned) waits for the next call."""
        self.__dict__["_constructed"] = True
        try:
            self.__dict__["_prepared"] = (*self._prepare(), {})
        except (TypeError, ValueError):
            if strict:
                raise

    def hyperparameters(self) -> dict[str, Any]:
        """Every constructor argument and its current value."""
        return {name: getattr(self, name) for name in _constructor_arguments(type(self))}

    def _prepare(self) -> tuple[Callable[..., Tensor], Any, Any]:
        """``(function, params, need)`` for ``forward``: the arguments checked once."""
        raise TypeError(f"{type(self).__name__} is not a loss: subclass one of the six losses "
                        "(DiceLoss, IoULoss, TverskyLoss, BCELoss, FocalLoss, TopKLoss), or "
                        "define _prepare() as docs/adding-a-loss.md describes")

    def _checked(self) -> tuple[Callable[..., Tensor], Any, Any, dict]:
        """``(function, params, need, plans)``: the checked arguments (built on first use)."""
        prepared = self._prepared
        if prepared is None:
            prepared = self.__dict__["_prepared"] = (*self._prepare(), {})
        return prepared

    if TYPE_CHECKING:  # nn.Module types its call as returning Any; a loss returns a Tensor
        def __call__(self, input: Tensor, target: Tensor) -> Tensor: ...

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """Loss of ``input`` (logits or probabilities) against ``target``."""
        function, params, need, plans = self._checked()
        return function(input, target, params, need, plans)

    def __getstate__(self) -> dict[str, Any]:
        # the checked arguments and plans are rebuilt (they hold backends)
        state = dict(self.__dict__)
        state.pop("_prepared", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if state.get("_constructed"):
            self._ready(strict=False)

    def __repr__(self) -> str:
        defaults = _repr_defaults(type(self))
        floats = _float_arguments(type(self))
        changed = []
        for name, value in self.hyperparameters().items():
            value = _as_spec_value(value, name in floats)
            default = _as_spec_value(defaults[name], name in floats)
            if value != default or type(value) is not type(default):
                changed.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(changed)})"


_CONSTRUCTOR_PARAMETERS: dict[type, dict[str, tuple[inspect.Parameter, type]]] = {}


def _constructor_parameters(cls: type) -> dict[str, tuple[inspect.Parameter, type]]:
    """``{name: (parameter, owner)}`` of ``cls``'s constructor arguments, ``owner`` the class
    whose ``__init__`` declares it.

    A constructor that forwards ``**kwargs`` to the next one (``def __init__(self,
    scale=2.0, **kwargs): super().__init__(**kwargs)``) takes that one's arguments too,
    after its own: the next class of ``cls``'s MRO that defines ``__init__``, past mixins
    that forward everything (a mixin's own named arguments are its own business), up to the
    first loss constructor that does not forward. So a reassigned ``smooth`` is read again
    and ``repr`` lists it."""
    found = _CONSTRUCTOR_PARAMETERS.get(cls)
    if found is None:
        found = {}
        mro = cls.__mro__
        owners = [c for c in mro if "__init__" in vars(c)
                  and c not in (nn.Module, object)]
        for index, owner in enumerate(owners):
            parameters = list(inspect.signature(vars(owner)["__init__"]).parameters.items())
            forwards = any(p.kind is p.VAR_KEYWORD for _, p in parameters)
            if index == 0 or issubclass(owner, SegmentationLoss):
                for name, parameter in parameters[1:]:  # (self)
                    if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                        found.setdefault(name, (parameter, owner))
            if not forwards or owner is SegmentationLoss:
                break
        _CONSTRUCTOR_PARAMETERS[cls] = found
    return found


_REPR_DEFAULTS: dict[type, dict[str, Any]] = {}


def _repr_defaults(cls: type) -> dict[str, Any]:
    """The value of each constructor argument that ``repr`` leaves out: its default; for an
    argument a constructor forwards (:func:`_constructor_parameters`), the value a
    default-built ``cls()`` holds (cached), since a subclass may fix it
    (``super().__init__(mode="multilabel", **kwargs)``: its repr must not write that mode,
    which it cannot take again), or the base's default where ``cls()`` cannot be built."""
    found = _REPR_DEFAULTS.get(cls)
    if found is None:
        parameters = _constructor_parameters(cls)
        found = {name: parameter.default for name, (parameter, _) in parameters.items()}
        _REPR_DEFAULTS[cls] = found  # (a repr while cls() is built, below, reads these)
        own = next(c for c in cls.__mro__ if "__init__" in vars(c))
        forwarded = [name for name, (_, owner) in parameters.items() if owner is not own]
        if forwarded:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    built = cls()
            except Exception:  # arguments without defaults, or a constructor that refuses
                built = None
            for name in forwarded if built is not None else ():
                found[name] = getattr(built, name, found[name])
    return found


_CONSTRUCTOR_ARGUMENTS: dict[type, tuple[str, ...]] = {}


def _constructor_arguments(cls: type) -> tuple[str, ...]:
    """The names of ``cls``'s constructor arguments (:func:`_constructor_parameters`; cached:
    ``forward`` needs them every call)."""
    names = _CONSTRUCTOR_ARGUMENTS.get(cls)
    if names is None:
        names = _CONSTRUCTOR_ARGUMENTS[cls] = tuple(_constructor_parameters(cls))
    return names


def _common_doc(extra: str = "") -> str:
    return f"""
    Args:{extra}
        mode: ``"binary"`` (default; C == 1, sigmoid), ``"multilabel"`` (sigmoid per channel) or
            ``"multiclass"`` (C >= 2, softmax; the target holds class indices).
        from_logits: input holds logits (default True) or probabilities (multiclass: each
            pixel's class probabilities, a softmax output; their sum over the classes is not
            checked, as torch's ``NLLLoss`` does not check it).
        ignore_index: target value whose pixels are left out of the loss, its normaliser and
            the gradient (default None).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (see the functional form for
            the shape).
        backend: ``"auto"`` (default), ``"torch"``, ``"native"``, ``"triton"`` or
            ``"reference"`` (see :mod:`dynloss.kernels`).
        check_values: check target/probability values (reads the data). Default None: only
            for CPU tensors, where it costs no device synchronisation.

    Shapes:
        input ``(N, C, *spatial)`` (binary also ``(N, *spatial)``); target: the input's shape
        (binary also without the channel dim) or, multiclass, ``(N, *spatial)`` integers.
    """


class _DistributionLoss(SegmentationLoss):
    _own_arguments: ClassVar[tuple[str, ...]] = ()
    """The arguments of this loss beyond the common ones (``gamma``/``alpha``, ``k``): these
    and those a subclass's constructor declares are read, so an attribute of another loss's
    argument name merely set on it changes nothing."""

    def _prepare(self) -> tuple[Callable[..., Tensor], Any, Any]:
        declared = _constructor_arguments(type(self))
        own: dict[str, Any] = {name: getattr(self, name, default)
               for name, default in (("gamma", 0.0), ("alpha", None), ("k", None),
                                     ("pos_weight", None), ("weight", None))
               if name in self._own_arguments or name in declared}
        if "k" in self._own_arguments:  # TopK's k: None would mean "not TopK" below (a
            own["k"] = check_fraction("k", own["k"])  # subclass's own k may be None: BCE)
        params = distribution_params(
            **own, mode=self.mode, from_logits=self.from_logits,
            ignore_index=self.ignore_index, reduction=self.reduction, backend=self.backend,
            check_values=self.check_values,
        )
        return _call.distribution_loss, params, _call.distribution_need(params)


class BCELoss(_DistributionLoss):
    _own_arguments = ("pos_weight", "weight")
    pos_weight: float | list[float] | None = None
    weight: list[float] | None = None
    """(Class defaults: a BCELoss pickled before ``pos_weight`` and ``weight`` existed has
    neither.)"""
    __doc__ = (
        r"""Binary cross-entropy from logits; softmax cross-entropy in multiclass mode.

    :math:`\frac1M \sum_i (1-g_i)\,\mathrm{softplus}(x_i) + w\,g_i\,\mathrm{softplus}(-x_i)`
    over the :math:`M` kept elements (the form that keeps the digits of tiny losses;
    algebraically :math:`\max(x,0) - x g + \log(1+e^{-|x|})` for :math:`w = 1`), :math:`w`
    the ``pos_weight`` of the element's channel. Equals ``torch.nn.BCEWithLogitsLoss``, also
    with its ``pos_weight`` (and ``torch.nn.CrossEntropyLoss`` in multiclass mode); unlike smp,
    ignored pixels are not counted in the mean.
    """
        + _common_doc(
            """
        pos_weight: None (default: 1), the weight >= 0 of the positives' term (binary and
            multilabel mode), one number for every channel or a sequence of ``C``
            per-channel weights, kept as a list that refuses changes in place; a tensor
            or NumPy array (``(C, 1, 1)`` as ``BCEWithLogitsLoss`` takes per-channel weights
            of images, or ``(C,)``) is read as its values; one value serves every channel.
            Computed by every backend.
        weight: None (default), or ``C`` per-class weights >= 0 of the cross-entropy
            (multiclass mode), as ``CrossEntropyLoss(weight=...)``: the mean divides by the
            kept pixels' class weights; kept as a list that refuses changes in place; a 1-D
            tensor or NumPy array is read as its values."""
        )
        + """
    Examples:
        >>> import torch
        >>> from dynloss import BCELoss
        >>> loss = BCELoss()
        >>> round(loss(torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)).item(), 4)
        0.6931
        >>> weighted = BCELoss(pos_weight=3.0)  # 3 log 2
        >>> round(weighted(torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)).item(), 4)
        2.0794
    """
    )
    name = "bce"
    _function = staticmethod(F.bce_loss)

    def __init__(
        self,
        mode: str = "binary",
        *,
        from_logits: bool = True,
        pos_weight: float | Sequence[float] | Tensor | None = None,
        weight: Sequence[float] | Tensor | None = None,
        ignore_index: int | None = None,
        reduction: str = "mean",
        backend: str = "auto",
        check_values: bool | None = None,
    ) -> None:
        super().__init__(mode=mode, from_logits=from_logits, ignore_index=ignore_index,
                         reduction=reduction, backend=backend, check_values=check_values)
        checked = check_pos_weight(pos_weight, self.mode)
        self.pos_weight = list(checked) if isinstance(checked, tuple) else checked
        classes = check_class_weight(weight, self.mode)
        self.weight = None if classes is None else list(classes)
        self._ready()

    def _assigned(self, name: str, value: Any) -> Any:
        if name in ("pos_weight", "weight"):
            if isinstance(value, Tensor):  # read once, as the constructor does
                value = (check_pos_weight(value, MULTILABEL_MODE) if name == "pos_weight"
                         else check_class_weight(value, MULTICLASS_MODE))
            if isinstance(value, (list, tuple)) and not isinstance(value, _Weights):
                value = _Weights(value, f"BCELoss.{name}")
        return value


class FocalLoss(_DistributionLoss):
    _own_arguments = ("gamma", "alpha")
    __doc__ = (
        r"""Focal loss :math:`\frac1M \sum_i a_i (1 - p_{t,i})^\gamma (-\log p_{t,i})`.

    :math:`p_t = e^{-b}` with :math:`b` the per-element cross-entropy (smp's form, also defined
    for soft labels). Equals smp's ``FocalLoss("binary")`` (for probabilities, where they lie in
    smp's clip range [1e-7, 1 - 1e-7]); in multiclass mode uses the softmax probability of the
    true class (smp 0.6 averages one-vs-rest sigmoid focal losses over the classes instead:
    that is ``mode="multilabel"`` on the one-hot target, from logits).
    """
        + _common_doc(
            """
        gamma: focusing exponent >= 0 (default 2.0, the paper's); 0 gives BCE.
        alpha: None (default), the weight in [0, 1] of positives (binary/multilabel), or a
            sequence (or 1-D tensor or NumPy array) of C per-class weights (multiclass),
            kept as a list that refuses changes in place (assign a new list to change
            them)."""
        )
        + """
    Examples:
        >>> import torch
        >>> from dynloss import FocalLoss
        >>> loss = FocalLoss(gamma=2.0)
        >>> round(loss(torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)).item(), 4)
        0.1733
    """
    )
    name = "focal"
    _function = staticmethod(F.focal_loss)

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float | Sequence[float] | Tensor | None = None,
        *,
        mode: str = "binary",
        from_logits: bool = True,
        ignore_index: int | None = None,
        reduction: str = "mean",
        backend: str = "auto",
        check_values: bool | None = None,
    ) -> None:
        super().__init__(mode=mode, from_logits=from_logits, ignore_index=ignore_index,
                         reduction=reduction, backend=backend, check_values=check_values)
        self.gamma = check_non_negative("gamma", gamma)
        checked = check_focal_alpha(alpha, self.mode)
        self.alpha = list(checked) if isinstance(checked, tuple) else checked
        self._ready()

    def _assigned(self, name: str, value: Any) -> Any:
        if (name == "alpha" and isinstance(value, Tensor) and value.dim() == 1
                and getattr(self, "mode", None) == MULTICLASS_MODE):
            value = list(check_focal_alpha(value, MULTICLASS_MODE))  # type: ignore[arg-type]
        if name == "alpha" and isinstance(value, list) and not isinstance(value, _Weights):
            value = _Weights(value)  # checked once: an edit in place would go unseen
        return value


class _Weights(list):
    """Per-class weights (``FocalLoss.alpha``, ``BCELoss.pos_weight``): a list that refuses
    changes in place (the loss checked and took the weights when they were set; it would not
    see an edit). ``owner`` names the attribute in the error."""

    def __init__(self, values: Any = (), owner: str = "FocalLoss.alpha") -> None:
        super().__init__(values)
        self._owner = owner

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        attribute = self._owner.rsplit(".", 1)[-1]
        raise TypeError(f"{self._owner} cannot be changed in place; assign a new list: "
                        f"loss.{attribute} = [...]")

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse

    def __reduce__(self) -> tuple:
        # (pickle would rebuild it with append); FocalLoss's as dynloss 0.1 wrote them, so
        # that an older dynloss reads a FocalLoss pickled by this one
        if self._owner == "FocalLoss.alpha":
            return (_Weights, (list(self),))
        return (_Weights, (list(self), self._owner))

    def __deepcopy__(self, memo: dict) -> _Weights:
        return _Weights(self, self._owner)


class TopKLoss(_DistributionLoss):
    _own_arguments = ("k",)
    __doc__ = (
        r"""TopK loss: mean cross-entropy over the ``k`` fraction of worst-scored elements.

    The :math:`\lceil kM \rceil` largest per-element losses of the whole batch are averaged
    (ties at the threshold taken by flat index, deterministically). ``k`` is a fraction:
    nnU-Net's ``k=10`` (percent) is ``k=0.1`` here, its ``k=1`` (1 %) is ``k=0.01``.
    """
        + _common_doc(
            """
        k: fraction of elements kept, 0 < k <= 1 (default 0.6, the paper's value)."""
        )
        + """
    Examples:
        >>> import torch
        >>> from dynloss import TopKLoss
        >>> loss = TopKLoss(k=0.5)
        >>> logits = torch.tensor([[[[3.0, -3.0, 0.0, 1.0]]]])
        >>> target = torch.tensor([[[[1.0, 0.0, 1.0, 0.0]]]])
        >>> round(loss(logits, target).item(), 4)
        1.0032
    """
    )
    name = "topk"
    _function = staticmethod(F.topk_loss)

    def __init__(
        self,
        k: float = 0.6,
        *,
        mode: str = "binary",
        from_logits: bool = True,
        ignore_index: int | None = None,
        reduction: str = "mean",
        backend: str = "auto",
        check_values: bool | None = None,
    ) -> None:
        super().__init__(mode=mode, from_logits=from_logits, ignore_index=ignore_index,
                         reduction=reduction, backend=backend, check_values=check_values)
        self.k = check_fraction("k", k)
        self._ready()


_REGION_ARGS = """
        smooth: additive smoothing s >= 0 in numerator and denominator (default 0).
        eps: numerical floor added to the smoothing (default 1e-7); empty target and empty
            prediction then score 1 (loss 0).
        per_image: one score per sample and class, then averaged (True; MONAI's default), or
            sums pooled over the batch (False, default; smp's and the paper's).
        ddp_pool: with ``per_image=False``, also pool the sums over all ``torch.distributed``
            ranks, gradients flowing back to every rank, so the loss equals the single-process
            loss on the concatenated batch (default False).
        include_background: False leaves class 0's score out (MONAI's
            ``include_background=False``, nnU-Net's ``do_bg=False``; multiclass and multilabel
            mode, C >= 2; default True).
        weight: None (default), or one weight >= 0 per class multiplying each class's loss
            before the reduction, as MONAI's ``weight`` where it scores two classes or more
            (multiclass and multilabel mode; ``C`` values, or MONAI's ``C - 1`` with
            ``include_background=False``); kept as a list that refuses changes in place; a
            1-D tensor or NumPy array is read as its values."""


class _RegionLoss(SegmentationLoss):
    _tversky_weights: ClassVar[tuple[float, float] | None] = None
    """``(alpha, beta)`` of Dice (1/2, 1/2) and IoU (1, 1); Tversky reads its own."""
    include_background: bool = True
    """(A class default as well: a loss pickled before the argument existed keeps class 0.)"""
    weight: list[float] | None = None
    """(Class default: a loss pickled before the argument existed is unweighted.)"""

    def _init_region(self, smooth: float, eps: float, per_image: bool, ddp_pool: bool,
                     include_background: bool = True,
                     weight: Sequence[float] | Tensor | None = None) -> None:
        self.smooth, self.eps = check_smoothing(smooth, eps)
        self.per_image = check_bool("per_image", per_image)
        self.ddp_pool = check_ddp_pool(ddp_pool, self.per_image)
        self.include_background = check_include_background(include_background, self.mode)
        classes = check_region_weight(weight, self.mode)
        self.weight = None if classes is None else list(classes)
        self._ready()  # every argument checked together, once

    def _assigned(self, name: str, value: Any) -> Any:
        if name == "weight":
            if isinstance(value, Tensor):  # read once, as the constructor does
                value = check_region_weight(value, getattr(self, "mode", MULTILABEL_MODE))
            if isinstance(value, (list, tuple)) and not isinstance(value, _Weights):
                value = _Weights(value, f"{type(self).__name__}.weight")
        return value

    def _weights(self) -> tuple[float, float]:
        assert self._tversky_weights is not None
        return self._tversky_weights

    def _prepare(self) -> tuple[Callable[..., Tensor], Any, Any]:
        alpha, beta = self._weights()
        params = region_params(
            alpha=alpha, beta=beta, mode=self.mode, from_logits=self.from_logits,
            smooth=self.smooth, eps=self.eps, per_image=self.per_image,
            ignore_index=self.ignore_index, reduction=self.reduction, backend=self.backend,
            check_values=self.check_values, ddp_pool=self.ddp_pool,
            include_background=self.include_background, weight=self.weight,
        )
        return _call.region_loss, params, _call.region_need(params)


class DiceLoss(_RegionLoss):
    __doc__ = (
        r"""Dice loss :math:`1 - (2I + 2s)/(P + G + 2s)`, :math:`s` = smooth + eps.

    :math:`I = \sum p g`, :math:`P = \sum p`, :math:`G = \sum g` per class (pooled over the
    batch unless ``per_image``). Equals smp's ``DiceLoss(mode)`` whenever every class has a
    positive pixel in the batch. smp scores a class absent from the batch as 0, so its false
    positives go unpunished; here its loss is ``P / (P + 2s)`` (use ``smooth > 0`` for a useful
    gradient there).
    """
        + _common_doc(_REGION_ARGS)
        + """
    Examples:
        >>> import torch
        >>> from dynloss import DiceLoss
        >>> target = torch.zeros(2, 1, 8, 8); target[:, :, 2:6, 2:6] = 1
        >>> perfect = (target * 2 - 1) * 100  # logits
        >>> DiceLoss()(perfect, target).item()
        0.0
    """
    )
    name = "dice"
    _function = staticmethod(F.dice_loss)
    _tversky_weights = (0.5, 0.5)

    def __init__(
        self,
        mode: str = "binary",
        *,
        from_logits: bool = True,
        smooth: float = 0.0,
        eps: float = 1e-7,
        per_image: bool = False,
        ignore_index: int | None = None,
        reduction: str = "mean",
        backend: str = "auto",
        check_values: bool | None = None,
        ddp_pool: bool = False,
        include_background: bool = True,
        weight: Sequence[float] | Tensor | None = None,
    ) -> None:
        super().__init__(mode=mode, from_logits=from_logits, ignore_index=ignore_index,
                         reduction=reduction, backend=backend, check_values=check_values)
        self._init_region(smooth, eps, per_image, ddp_pool, include_background, weight)


class IoULoss(_RegionLoss):
    __doc__ = (
        r"""IoU (Jaccard) loss :math:`1 - (I + s)/(P + G - I + s)`, :math:`s` = smooth + eps.

    Equals smp's ``JaccardLoss(mode)`` whenever every class has a positive pixel in the batch.
    ``JaccardLoss`` is the same class.
    """
        + _common_doc(_REGION_ARGS)
        + """
    Examples:
        >>> import torch
        >>> from dynloss import IoULoss
        >>> logits = torch.tensor([[[[4.0, -4.0], [4.0, -4.0]]]])
        >>> target = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])
        >>> round(IoULoss()(logits, target).item(), 4)
        0.3433
    """
    )
    name = "iou"
    _function = staticmethod(F.iou_loss)
    _tversky_weights = (1.0, 1.0)

    def __init__(
        self,
        mode: str = "binary",
        *,
        from_logits: bool = True,
        smooth: float = 0.0,
        eps: float = 1e-7,
        per_image: bool = False,
        ignore_index: int | None = None,
        reduction: str = "mean",
        backend: str = "auto",
        check_values: bool | None = None,
        ddp_pool: bool = False,
        include_background: bool = True,
        weight: Sequence[float] | Tensor | None = None,
    ) -> None:
        super().__init__(mode=mode, from_logits=from_logits, ignore_index=ignore_index,
                         reduction=reduction, backend=backend, check_values=check_values)
        self._init_region(smooth, eps, per_image, ddp_pool, include_background, weight)


JaccardLoss = IoULoss


class TverskyLoss(_RegionLoss):
    __doc__ = (
        r"""Tversky loss :math:`1 - (TP + s)/(TP + \alpha FP + \beta FN + s)`.

    :math:`TP = \sum pg`, :math:`FP = \sum p(1-g)`, :math:`FN = \sum (1-p)g`, :math:`s` =
    smooth + eps. ``alpha`` weighs false positives, ``beta`` false negatives. (0.5, 0.5) is
    :class:`DiceLoss`, (1, 1) is :class:`IoULoss`, exactly. Equals smp's
    ``TverskyLoss("binary", alpha=a, beta=b)`` when the batch has a positive pixel (smp's
    defaults are 0.5 / 0.5, the paper's and ours 0.3 / 0.7: name them when porting).
    """
        + _common_doc(
            """
        alpha: weight of false positives, >= 0 (default 0.3, the paper's).
        beta: weight of false negatives, >= 0 (default 0.7, the paper's)."""
            + _REGION_ARGS
        )
        + """
    Examples:
        >>> import torch
        >>> from dynloss import TverskyLoss
        >>> logits = torch.tensor([[[[4.0, -4.0], [4.0, -4.0]]]])
        >>> target = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])
        >>> round(TverskyLoss(0.3, 0.7)(logits, target).item(), 4)
        0.2659
    """
    )
    name = "tversky"
    _function = staticmethod(F.tversky_loss)

    def __init__(
        self,
        alpha: float = 0.3,
        beta: float = 0.7,
        *,
        mode: str = "binary",
        from_logits: bool = True,
        smooth: float = 0.0,
        eps: float = 1e-7,
        per_image: bool = False,
        ignore_index: int | None = None,
        reduction: str = "mean",
        backend: str = "auto",
        check_values: bool | None = None,
        ddp_pool: bool = False,
        include_background: bool = True,
        weight: Sequence[float] | Tensor | None = None,
    ) -> None:
        super().__init__(mode=mode, from_logits=from_logits, ignore_index=ignore_index,
                         reduction=reduction, backend=backend, check_values=check_values)
        self.alpha = check_non_negative("alpha", alpha)
        self.beta = check_non_negative("beta", beta)
        self._init_region(smooth, eps, per_image, ddp_pool, include_background, weight)

    def _weights(self) -> tuple[float, float]:
        return self.alpha, self.beta


LOSSES: dict[str, type[SegmentationLoss]] = {
    "bce": BCELoss,
    "focal": FocalLoss,
    "topk": TopKLoss,
    "dice": DiceLoss,
    "iou": IoULoss,
    "jaccard": IoULoss,
    "tversky": TverskyLoss,
}
"""Spec-string names of the losses (``"jaccard"`` is an alias of ``"iou"``)."""

_BUILT_IN_ARGUMENTS = frozenset().union(*map(_constructor_arguments, LOSSES.values()))
"""The constructor arguments of the six losses (read as their constructors read them when
reassigned); a subclass's own arguments are not among them."""
