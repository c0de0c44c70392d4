r"""CompositeLoss: a weighted sum of losses, :math:`L = \sum_k w_k L_k`."""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .._checks import as_array, tensor_values
from .._math import scaled
from .._params import CompositeParams, DistributionParams, RegionParams, composite_params
from ..functional._call import composite_loss, distribution_loss, region_loss
from ..losses import SegmentationLoss
from ._base import (
    check_same_targets,
    check_weight,
    losses_repr,
    named_losses,
    set_last_terms,
    term_value,
)
from ._state import dry_run_load, load_all_or_nothing, load_parts, state_error, state_int
from ._steps import (
    check_next_weights_child,
    check_parts,
    count_step,
    in_use,
    metric_triggers,
    reads_metric_later,
    record,
    record_added,
    record_tree,
    step_child,
    stepped_losses,
    top_level_step,
    warn_if_started,
)
from .weights import Constant, WeightSchedule, hold

__all__ = ["CompositeLoss"]

Weight = float | WeightSchedule


def _check_one_unit(terms: nn.ModuleDict) -> None:
    """Raise ``ValueError`` where the SwitchingLosses that the composite's ``step()`` reaches
    count different units (``step`` and ``epoch``): one step steps them all."""
    first: tuple[str, str] | None = None
    for name, term in terms.items():
        for nested in stepped_losses(term):
            unit = getattr(nested, "unit", None)
            if not isinstance(unit, str):
                continue
            if first is None:
                first = (name, unit)
            elif unit != first[1]:
                raise ValueError(
                    f"CompositeLoss: term {name!r} holds a SwitchingLoss with unit={unit!r} "
                    f"and term {first[0]!r} one with unit={first[1]!r}; one step() steps them "
                    "all, so they count the same (give them one unit)")


def _check_term_shape(terms: dict[str, Tensor], name: str, value: Tensor) -> None:
    """The terms are added: a term whose value has another shape than the first's (a
    ``reduction="none"`` term beside a reduced one, or two unreduced terms of different
    shapes, such as Dice's per-class scores and BCE's per-pixel map) would be broadcast into a
    wrong number."""
    if terms:
        first, shape = next(iter(terms.items()))
        if value.shape != shape.shape:
            raise ValueError(
                f"CompositeLoss adds its terms, so their values must have one shape: term "
                f"{first!r} gave {tuple(shape.shape)} and term {name!r} gave "
                f"{tuple(value.shape)} (check their reduction= arguments)"
            )


class CompositeLoss(nn.Module):
    r"""Weighted sum of losses :math:`L = \sum_k w_k L_k`, each weight a constant or a schedule.

    The paper's composites are :math:`L_A + L_B` (Dice+Focal, IoU+BCE, Tversky+BCE,
    IoU+TopK); any number of terms works, and a term may itself be a
    :class:`CompositeLoss` or a :class:`~dynloss.SwitchingLoss`.

    Args:
        losses: a sequence of loss modules (each called ``loss(input, target)``), or a
            ``{name: module}`` mapping. Names of a sequence are the losses' short names
            (``"dice"``, ``"bce"``; ``"dice_2"`` for a repeat).
        weights: one weight per loss, in the same order (or a mapping by name): a number
            >= 0 or a :class:`~dynloss.schedules.WeightSchedule`; a 1-D tensor or NumPy
            array is read as its numbers. Default: all 1.0.

    After every call, :attr:`last_terms` maps each term's name to its *unweighted* value as a
    detached tensor (nested composites add ``"outer.inner"`` entries), for logging without a
    device synchronisation; it is the module's, so one module called from several threads at
    once holds the terms of whichever call ended last. :meth:`step` advances the weight
    schedules (and nested schedules); call it once per epoch, or per optimizer step, like an LR
    scheduler. A weight of exactly 1.0 adds the term unchanged; every term is computed even
    when its weight is 0, so ``last_terms`` is always complete.

    ``state_dict()`` holds the counter and the schedules' counters; ``repr()`` is a
    :func:`~dynloss.build_loss` spec of the same loss.

    **One pass for the paper's pairs.** When the composite has exactly two terms, a region
    loss (Dice, IoU, Tversky) and BCE or Focal, that agree on ``mode``, ``from_logits``,
    ``ignore_index``, ``backend`` and ``check_values`` and use ``reduction="mean"`` (and no
    ``ddp_pool``), both terms come from one fused forward pass and one backward pass over the
    input (native and Triton kernels); the value, the gradient and :attr:`last_terms` are those
    of the separate terms to float32 rounding (the pass sums in another order than a single
    loss's).

    Examples:
        >>> import torch
        >>> from dynloss import BCELoss, CompositeLoss, DiceLoss
        >>> from dynloss.schedules import LinearRamp
        >>> loss = CompositeLoss([DiceLoss(), BCELoss()], weights=[1.0, LinearRamp(0, 2)])
        >>> logits, target = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
        >>> round(loss(logits, target).item(), 4)  # weights 1 and 0
        0.3333
        >>> sorted(loss.last_terms)
        ['bce', 'dice']
        >>> loss.step(); loss.current_weights()
        {'dice': 1.0, 'bce': 0.5}
    """

    _weight_values: Tensor

    def __init__(
        self,
        losses: Sequence[nn.Module] | Mapping[str, nn.Module],
        weights: Sequence[Weight] | Mapping[str, Weight] | Tensor | None = None,
    ) -> None:
        super().__init__()
        names, modules, explicit = named_losses("CompositeLoss", losses)
        check_same_targets("term", names, modules)
        self.terms = nn.ModuleDict(dict(zip(names, modules, strict=True)))
        _check_one_unit(self.terms)
        self._explicit_names = explicit
        self._weights = _Weights(self._check_weights(names, weights))
        warn_if_started("CompositeLoss", self._parts())
        # the weights as a tensor, read inside torch.compile (a float would be a constant of
        # the graph: every new scheduled value would recompile); refreshed by step() and
        # load_state_dict(), not saved
        self.register_buffer("_weight_values", torch.zeros(len(names), dtype=torch.float64),
                             persistent=False)
        self._refresh_weight_values()
        self.count = 0
        """Number of :meth:`step` calls so far."""
        self.last_terms: dict[str, Tensor] = {}
        """Unweighted value of every term at the last call, detached."""
        record_tree(self)

    @property
    def weights(self) -> list[Weight]:
        """The weights, one per term in order (numbers and schedules). Read-only in place;
        assign new ones (a list, or a mapping by name), which are checked as the
        constructor's are and read by a compiled loss from then on: ``loss.weights = [1.0,
        0.25]``."""
        return self._weights

    @weights.setter
    def weights(self, weights: Sequence[Weight] | Mapping[str, Weight] | Tensor | None) -> None:
        checked = _Weights(self._check_weights(self.names, weights))
        added: list[tuple[str, object]] = []
        for name, weight in zip(self.names, checked, strict=True):
            if isinstance(weight, WeightSchedule):
                _scheduled(name, weight)  # its value now: refused before anything changes
                if (not any(weight is old for old in self._weights)
                        and type(weight).value_at is not Constant.value_at):
                    added.append((f"the weight schedule of {name!r}", weight))
        warn_if_started("CompositeLoss", added)
        self._weights = checked
        self._refresh_weight_values()
        # the schedules kept keep their record: a step taken elsewhere is still refused
        record_added(self, self._parts())

    def __getstate__(self) -> dict[str, Any]:
        # the fused pass's plans are rebuilt (they hold backends), as a single loss's are
        state = dict(super().__getstate__())
        state.pop("_fused", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "weights" in state and "_weights" not in state:  # pickled by dynloss 0.1.0
            state = dict(state)
            state["_weights"] = _Weights(state.pop("weights"))
        super().__setstate__(state)
        # a buffer of its own: torch.multiprocessing hands a module's buffers over in shared
        # memory, and this one is written in place at every step (another process's steps
        # would change the weights a compiled loss reads here); 0.1.0 had none
        buffer = self._buffers.get("_weight_values")
        if buffer is None:
            self.register_buffer("_weight_values",
                                 torch.zeros(len(self._weights), dtype=torch.float64),
                                 persistent=False)
        else:
            self._weight_values = buffer.clone()
        if not self._weight_values.is_meta:
            self._refresh_weight_values()

    @staticmethod
    def _check_weights(names: list[str], weights: object) -> list[Weight]:
        if weights is None:
            return [1.0] * len(names)
        if isinstance(weights, Mapping):
            if set(weights) != set(names):
                raise ValueError(
                    f"CompositeLoss: weights must name the same terms as losses {names}; got "
                    f"{sorted(weights)}"
                )
            weights = [weights[name] for name in names]
        elif (array := as_array(weights)) is not None and array.dim() == 1:
            weights = tensor_values("weights", array)  # a 1-D tensor or NumPy array
        elif isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
            raise TypeError(
                "CompositeLoss: weights must be a list of numbers or schedules (one per loss); "
                f"got {type(weights).__name__}"
            )
        if len(weights) != len(names):
            raise ValueError(
                f"CompositeLoss: got {len(weights)} weights for {len(names)} losses {names}"
            )
        checked: list[Weight] = []
        for name, weight in zip(names, weights, strict=True):
            if isinstance(weight, WeightSchedule):
                if any(weight is other for other in checked):
                    raise ValueError(
                        "CompositeLoss: the same schedule object is used for two terms; it "
                        "would be stepped twice. Pass a separate schedule per term."
                    )
                checked.append(weight)
            elif ((isinstance(weight, Real) and not isinstance(weight, bool))
                  or ((array := as_array(weight)) is not None and array.dim() == 0)):
                checked.append(check_weight(f"weight of {name!r}", weight))  # (0-d: its value)
            else:  # a function, a trigger, a string, ...
                raise TypeError(
                    f"weight of {name!r} must be a real number or a WeightSchedule (Constant, "
                    "Step, LinearRamp, RampCosine, Cosine, or a subclass with value_at(t)); got "
                    f"{type(weight).__name__} {weight!r}"
                )
        return checked

    def _parts(self) -> list[tuple[str, object]]:
        """What this loss steps and another must not (see :func:`check_parts`): its weight
        schedules (a :class:`~dynloss.schedules.Constant` has one value at every count) and
        nested losses."""
        parts: list[tuple[str, object]] = [
            (f"the weight schedule of {name!r}", weight)
            for name, weight in zip(self.terms, self.weights, strict=True)
            if isinstance(weight, WeightSchedule)
            and type(weight).value_at is not Constant.value_at]
        parts += [(f"term {name!r}", loss) for name, loss in self.terms.items()
                  if hasattr(loss, "_dynloss_children")]
        return parts

    def _dynloss_children(self) -> list[nn.Module]:
        """The losses a step of this one steps in turn (see ``stepped_losses``)."""
        return list(self.terms.values())

    def _dynloss_record(self, used: Mapping[int, Any]) -> None:
        record(self, self._parts())

    @property
    def names(self) -> list[str]:
        """The terms' names, in order."""
        return list(self.terms.keys())

    def current_weights(self) -> dict[str, float]:
        """Every term's weight at the current counter, as Python floats."""
        return {
            name: _scheduled(name, weight) if isinstance(weight, WeightSchedule) else weight
            for name, weight in zip(self.terms.keys(), self.weights, strict=True)
        }

    def _fused_plan(self, weights: list[float]
                    ) -> tuple[CompositeParams, bool, dict] | None:
        """:meth:`_fused_params` and the plans of its recent calls
        (:data:`dynloss.functional._call.Plans`). The parameters are kept while the weights,
        the terms and their checked arguments (rebuilt when one is reassigned) stay the same
        objects, the plans while the terms and their arguments do (a plan does not depend on
        the weights, which a schedule may change at every step)."""
        modules = tuple(self.terms.values())
        kept = self.__dict__.get("_fused")
        plans: dict = {}
        if (kept is not None and len(kept[0]) == len(modules)
                and all(a is b for a, b in zip(kept[0], modules, strict=True))
                and all(getattr(m, "_prepared", None) is p
                        for m, p in zip(modules, kept[1], strict=True))):
            if kept[2] == weights:
                return kept[3]
            if kept[3] is not None:
                plans = kept[3][2]
        fused = self._fused_params(weights)
        plan: tuple[CompositeParams, bool, dict] | None = (
            None if fused is None else (*fused, plans))
        # (after _fused_params, which builds the terms' checked arguments where missing)
        self.__dict__["_fused"] = (modules, tuple(getattr(m, "_prepared", None)
                                                  for m in modules), list(weights), plan)
        return plan

    def _fused_params(self, weights: list[float]) -> tuple[CompositeParams, bool] | None:
        """The parameters of the one-pass composite and whether the terms come in the order
        (distribution, region); None when the terms do not allow it."""
        if len(weights) != 2:
            return None
        modules = list(self.terms.values())
        params = []
        for module in modules:
            if not isinstance(module, SegmentationLoss) or (
                    type(module).forward is not SegmentationLoss.forward):
                return None
            function, checked = module._checked()[:2]
            # only the six losses' own functions and parameters: a loss added later may reuse
            # RegionParams/DistributionParams (a subclass) for an op of its own
            if not ((function is region_loss and type(checked) is RegionParams)
                    or (function is distribution_loss and type(checked) is DistributionParams)):
                return None
            params.append(checked)
        swapped = isinstance(params[0], DistributionParams)
        region, distribution = (params[1], params[0]) if swapped else (params[0], params[1])
        if not (isinstance(region, RegionParams) and isinstance(distribution, DistributionParams)
                and region.reduction == "mean" and distribution.reduction == "mean"
                and not region.ddp_pool and distribution.k is None
                and (region.mode, region.from_logits, region.ignore_index, region.backend,
                     region.check_values)
                == (distribution.mode, distribution.from_logits, distribution.ignore_index,
                    distribution.backend, distribution.check_values)):
            return None
        w_region, w_distribution = (weights[1], weights[0]) if swapped else weights
        return composite_params(region, distribution, w_region, w_distribution), swapped

    if TYPE_CHECKING:  # nn.Module types its call as returning Any; a loss returns a Tensor
        def __call__(self, input: Tensor, target: Tensor) -> Tensor: ...

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """:math:`\\sum_k w_k L_k(\\text{input}, \\text{target})`; fills :attr:`last_terms`."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return self._compiled_forward(input, target)
        weights = list(self.current_weights().values())
        fused = self._fused_plan(weights)
        if fused is not None:
            params, swapped, plans = fused
            try:
                combined, region, distribution = composite_loss(input, target, params, plans)
            except (ValueError, TypeError):  # the terms one by one: the error names its term
                self._sum_of_terms(input, target, weights)
                raise
            values = (distribution, region) if swapped else (region, distribution)
            set_last_terms(self, {name: value.detach() for name, value
                                  in zip(self.terms, values, strict=True)}, input)
            return combined
        return self._sum_of_terms(input, target, weights)

    def _sum_of_terms(self, input: Tensor, target: Tensor, weights: list[float]) -> Tensor:
        """The weighted sum of the terms, each called in turn (an error raised by a term
        carries a note naming it: two terms may refuse an input alike)."""
        total: Tensor | None = None
        terms: dict[str, Tensor] = {}
        for (name, loss), weight in zip(self.terms.items(), weights, strict=True):
            try:
                value = loss(input, target)
            except (ValueError, TypeError) as error:  # (two terms may refuse alike)
                add_note = getattr(error, "add_note", None)  # (Python >= 3.11)
                if add_note is not None:
                    add_note(f"in term {name!r} of the CompositeLoss of terms "
                             f"{', '.join(self.terms)}")
                raise
            value = term_value("CompositeLoss", f"term {name!r}", loss, value)
            _check_term_shape(terms, name, value)
            terms[name] = value.detach()
            nested = getattr(loss, "last_terms", None)
            if isinstance(nested, dict):
                terms.update({f"{name}.{key}": term for key, term in nested.items()})
            weighted = scaled(weight, value)
            total = weighted if total is None else total + weighted
        set_last_terms(self, terms, input)
        assert total is not None
        return total

    def _apply(self, fn: Any, recurse: bool = True) -> CompositeLoss:
        """``.to()``, ``.cuda()``, ``.half()``, ...: the weights' buffer follows the device but
        stays float64 with the exact weights (``.to(torch.bfloat16)`` rounded 0.3 to 0.3008
        in the compiled forward), refilled from the weights after every move (``to_empty``
        leaves it uninitialised)."""
        super()._apply(fn, recurse)
        if self._weight_values.dtype != torch.float64:
            self._weight_values = self._weight_values.to(torch.float64)
        if not self._weight_values.is_meta:
            self._refresh_weight_values()
        return self

    def _dynloss_weights_changed(self) -> None:
        """A schedule it holds changed (stepped by another loss that shares it, loaded, set by
        hand): the buffer a compiled forward reads takes the new weights. Where they cannot
        be formed now (a custom schedule's value, or one of two attributes set by hand, in
        between) the buffer holds NaN until they can: a compiled loss is NaN, never computed
        with stale weights; the eager forward and ``step()`` raise as they did."""
        buffer = self._buffers.get("_weight_values")
        refreshing = _REFRESHING.__dict__.setdefault("ids", set())
        if buffer is None or buffer.is_meta or id(self) in refreshing:
            return  # (a schedule whose value_at sets an attribute: told while read)
        with _REFRESH_LOCK:  # another thread's news waits for a refresh in progress
            refreshing.add(id(self))
            try:
                self._refresh_weight_values()
            except Exception:
                buffer = self._weight_values
                if buffer.is_inference() and not torch.is_inference_mode_enabled():
                    self._weight_values = torch.full_like(buffer, math.nan)  # (built there)
                else:
                    with torch.no_grad():
                        buffer.fill_(math.nan)
            finally:
                refreshing.discard(id(self))

    def _refresh_weight_values(self) -> None:
        for weight in self._weights:  # told of their changes from now on
            if isinstance(weight, WeightSchedule):
                hold(weight, self)
        buffer = self._weight_values
        values = torch.tensor(list(self.current_weights().values()), dtype=torch.float64,
                              device=buffer.device)
        if buffer.is_inference() and not torch.is_inference_mode_enabled():
            # built under torch.inference_mode: an inference tensor is not written in place
            # outside it (the step would raise after its counters moved)
            self._weight_values = values.to(buffer.device)
            return
        with torch.no_grad():
            buffer.copy_(values)

    def _compiled_forward(self, input: Tensor, target: Tensor) -> Tensor:
        """The weighted sum inside ``torch.compile`` (and ``torch.jit.trace``): weights from
        the buffer, so a schedule's new value does not recompile the graph (a trace replays
        with it); the compiler fuses the terms itself."""
        total: Tensor | None = None
        terms: dict[str, Tensor] = {}
        for (name, loss), weight in zip(self.terms.items(), self._weight_values.unbind(0),
                                        strict=True):
            value = term_value("CompositeLoss", f"term {name!r}", loss, loss(input, target))
            _check_term_shape(terms, name, value)
            terms[name] = value.detach()
            nested = getattr(loss, "last_terms", None)
            if isinstance(nested, dict):
                terms.update({f"{name}.{key}": term for key, term in nested.items()})
            weighted = value * weight.to(value.dtype)
            total = weighted if total is None else total + weighted
        set_last_terms(self, terms, input)
        assert total is not None
        return total

    def step(self, metric: float | Tensor | None = None) -> None:
        """Advance the weight schedules (and nested composite/switching losses) by one.

        ``metric`` is passed on to nested :class:`~dynloss.SwitchingLoss` terms with adaptive
        triggers; a CompositeLoss itself does not use it, but checks it whenever given (a
        number, or a one-element tensor or array).

        Raises:
            ValueError: a nested trigger needs a metric and none was given, the metric given
                is not a number or a one-element tensor or array, a weight
                schedule's value at the next step is not finite and >= 0 (a custom
                ``value_at``), or something this loss steps (a schedule, a nested loss) was
                stepped elsewhere since it was built or last stepped (by another live loss that
                holds it too, or by hand); the step is then not taken: no counter changes.
        """
        top_level_step(self, metric)

    def _dynloss_check_next_weights(self, seen: set[int], used: Mapping[int, Any]) -> None:
        seen.add(id(self))
        check_parts("CompositeLoss", self, self._parts())
        for name, weight in zip(self.terms.keys(), self.weights, strict=True):
            if isinstance(weight, WeightSchedule) and id(weight) not in seen:
                seen.add(id(weight))
                _check_upcoming(name, weight)
        for loss in self.terms.values():
            check_next_weights_child(loss, seen, used)

    def _metric_triggers(self) -> list:
        return [t for loss in self.terms.values() for t in metric_triggers(loss)]

    def _dynloss_reads_metric_later(self) -> bool:
        """Whether a term's trigger reads the metric now or later (see
        :func:`~dynloss.schedules._steps.reads_metric_later`)."""
        return any(reads_metric_later(loss) for loss in self.terms.values())

    def _dynloss_in_use(self, found: dict[int, Any]) -> None:
        for loss in self.terms.values():
            in_use(loss, found)

    def _dynloss_step(self, metric: object, synced: bool, seen: set[int],
                      used: Mapping[int, Any]) -> None:
        seen.add(id(self))
        count_step(self)
        self.count += 1
        try:
            for weight in self.weights:
                # a schedule shared with another composite (of another stage) steps once per
                # step
                if isinstance(weight, WeightSchedule) and id(weight) not in seen:
                    seen.add(id(weight))
                    if type(weight).step is not WeightSchedule.step:
                        count_step(weight)  # (its own step may not count itself)
                    weight.step()
            for loss in self.terms.values():
                step_child(loss, metric, synced, seen, used)
        finally:
            self._refresh_weight_values()

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "names": self.names,
            "schedules": [
                weight.state_dict() if isinstance(weight, WeightSchedule) else None
                for weight in self.weights
            ],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, all or nothing: a state that fails anywhere in the
        tree (a nested loss's state, a missing or unexpected key) leaves this loss as it was."""
        return load_all_or_nothing(self, state_dict, strict, assign)

    def set_extra_state(self, state: Any) -> None:
        owner = "CompositeLoss"
        if not isinstance(state, Mapping) or set(state) != {"count", "names", "schedules"}:
            raise ValueError("CompositeLoss: this state was not saved from a CompositeLoss")
        # check everything first: a failed load changes nothing
        count = state_int(owner, "count", state["count"])
        names = state["names"]
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{owner}: invalid names in the state: names must be a list of "
                             f"str; got {type(names).__name__}")
        names = list(names)
        if len(names) != len(self.weights):
            raise ValueError(
                f"CompositeLoss: the state has {len(names)} terms {names}, this loss has "
                f"{len(self.weights)} {self.names}"
            )
        if names != self.names:
            raise ValueError(
                f"CompositeLoss: the state's terms {names} differ from this loss's {self.names}"
            )
        schedules = state["schedules"]
        if not isinstance(schedules, (list, tuple)) or len(schedules) != len(names):
            raise ValueError("CompositeLoss: the state's schedules do not match its terms")
        for name, weight, saved in zip(names, self.weights, schedules, strict=True):
            if isinstance(weight, WeightSchedule) != (saved is not None):
                raise ValueError(
                    f"CompositeLoss: term {name!r} has a "
                    f"{'schedule' if saved is not None else 'constant'} weight in the state but "
                    f"a {'schedule' if isinstance(weight, WeightSchedule) else 'constant'} here"
                )
            if isinstance(weight, WeightSchedule):
                with state_error(f"{owner}: the weight of {name!r}"):
                    dry_run_load(weight, saved)
        # all checked: assign
        load_parts([(f"{owner}: the weight of {name!r}", weight, saved)
                    for name, weight, saved in zip(names, self.weights, schedules, strict=True)
                    if isinstance(weight, WeightSchedule)])
        self.count = count
        self._refresh_weight_values()

    def _dynloss_holds_state(self) -> bool:
        """A composite with a scheduled weight holds its count (see ``losses_repr``)."""
        return any(isinstance(weight, WeightSchedule) for weight in self.weights)

    def __repr__(self) -> str:
        losses = losses_repr(self, self.names, list(self.terms.values()), self._explicit_names)
        if all(not isinstance(w, WeightSchedule) and w == 1.0 for w in self.weights):
            return f"CompositeLoss({losses})"
        return f"CompositeLoss({losses}, weights=[{', '.join(repr(w) for w in self.weights)}])"


class _Weights(list):
    """A composite's weights: a list that refuses changes in place (a change goes through
    :attr:`CompositeLoss.weights`' setter, which checks it and refreshes what
    ``torch.compile`` reads)."""

    __slots__ = ()

    def _refuse(self, *args: object, **kwargs: object) -> Any:
        raise TypeError("CompositeLoss.weights cannot be changed in place: assign a new list "
                        "(loss.weights = [...]), which is checked and read by a compiled loss "
                        "too")

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Weights, (list(self),))

    def __copy__(self) -> _Weights:
        return _Weights(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> _Weights:
        return _Weights(copy.deepcopy(list(self), memo))


_REFRESHING = threading.local()
"""``ids``: the ``id`` of each composite this thread is filling the weights' buffer of, when
told of a change."""
_REFRESH_LOCK = threading.RLock()


def _scheduled(name: str, schedule: WeightSchedule) -> float:
    """A schedule's current value, checked: a custom ``value_at`` may break the contract."""
    return _checked_weight(name, schedule, schedule.value, f"at step {schedule.count}")


def _check_upcoming(name: str, schedule: WeightSchedule) -> None:
    """Before a step: raise if the schedule's value after its next ``step()``,
    ``value_at(count + 1)``, breaks the contract. Not for a schedule with its own ``step`` or
    ``value``, whose next value only its step can tell (stepping a copy would run its side
    effects twice, and not every schedule can be copied): it is checked after its step, as
    the step is taken."""
    kind = type(schedule)
    if kind.step is not WeightSchedule.step or kind.value is not WeightSchedule.value:
        return
    at = schedule.count + 1
    _checked_weight(name, schedule, schedule.value_at(at), f"at step {at}, the next step's",
                    "; the step was not taken")


def _checked_weight(name: str, schedule: WeightSchedule, value: object, when: str,
                    note: str = "") -> float:
    """A custom schedule's value as a Python float: a real number (numpy's too), finite and
    >= 0; anything else is refused naming the term."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"CompositeLoss: the weight of {name!r} (a {type(schedule).__name__} "
                        f"{when}) must be a real number; got {type(value).__name__} "
                        f"{value!r}{note}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond float's range
        value = math.inf
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"CompositeLoss: the weight of {name!r} (a {type(schedule).__name__} "
                         f"{when}) must be finite and >= 0; got {value}{note}")
    return value
