"""Checks of scalar arguments: each error names the argument and what was expected.

>>> from dynloss._checks import check_ignore_index
>>> check_ignore_index(255)
255
>>> check_ignore_index(2**64 + 1)
Traceback (most recent call last):
...
ValueError: ignore_index must lie in the int64 range [-2**63, 2**63 - 1]; got 18446744073709551617
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

import torch

from .constants import BACKENDS, MODES, MULTICLASS_MODE, MULTILABEL_MODE, REDUCTIONS


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        expected = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {expected}; got {value!r}")
    return value


def check_mode(mode: object) -> str:
    return check_choice("mode", mode, MODES)


def check_reduction(reduction: object) -> str:
    return check_choice("reduction", reduction, REDUCTIONS)


def check_backend(backend: object) -> str:
    return check_choice("backend", backend, BACKENDS)


_PLAIN = (bool, int, float, complex, str, bytes, list, tuple, dict, set, type(None))
"""Values whose repr ``torch.compile`` traces (a NumPy scalar or a tensor it does not)."""


def _shown(value: object) -> str:
    """``value`` for an error message: its type and repr; under ``torch.compile``, where a
    NumPy scalar argument is traced as an array whose repr cannot be formed, its type and a
    hint."""
    if torch.compiler.is_compiling() and type(value) not in _PLAIN:
        return (f"{type(value).__name__} (under torch.compile a NumPy scalar argument is "
                "traced as an array: pass a Python number)")
    kind = type(value).__name__
    if isinstance(value, list) and kind.startswith("_"):  # the losses' own list of weights
        kind = "list"
    return f"{kind} {value!r}"


def _as_float(value: Real) -> float:
    """``float(value)``; a NumPy float16/float32 scalar as the shortest decimal that rounds to
    it (``np.float32(0.1)`` is 0.1, not 0.10000000149...: TopK's ``ceil(k * M)`` kept one
    element more)."""
    dtype = getattr(value, "dtype", None)
    if (type(value).__module__ == "numpy" and getattr(dtype, "kind", None) == "f"
            and dtype.itemsize < 8):  # type: ignore[union-attr]
        return float(str(value))
    return float(value)


def as_array(value: object) -> torch.Tensor | None:
    """``value`` if it is a tensor; a NumPy array (anything with ``__array__`` that is not a
    number or a string) as a tensor; otherwise, or where it converts to none (an array of
    objects) or under ``torch.compile`` (which traces a NumPy argument), None."""
    if isinstance(value, torch.Tensor):
        return value
    if (isinstance(value, (Real, str, bytes)) or not hasattr(type(value), "__array__")
            or torch.compiler.is_compiling()):
        return None
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        return None


def _zero_dim_value(name: str, value: object, integral: bool) -> int | float | None:
    """A 0-d tensor or NumPy array of a real (``integral``: an integer) dtype as a Python
    number (a float32 one as its shortest decimal, as :func:`tensor_values` reads it); None
    for anything else (a bool is not a number here either)."""
    if torch.compiler.is_compiling():
        return None
    array = as_array(value)
    if (array is None or array.dim() != 0 or array.dtype == torch.bool or array.is_complex()
            or (integral and array.dtype.is_floating_point)):
        return None
    return tensor_values(name, array)[0]


def assigned_value(name: str, value: object) -> object:
    """A hyper-parameter assigned to a built loss, read as its constructor reads it: a 0-d
    tensor or NumPy array holding a number as that number, a NumPy array of higher rank as a
    tensor (which the loss reads per-class weights from); anything else, and what holds no
    number (a bool or complex array, a meta tensor), as it is: the loss's next call refuses it
    as its constructor would. Kept as given, an array's later edits in place would show in the
    attribute but not in the loss, which read its values when it was assigned."""
    array = as_array(value)
    if array is None:
        return value
    if array.dim() != 0:
        return array
    if array.dtype == torch.bool or array.is_complex() or array.is_meta:
        return value
    return tensor_values(name, array)[0]


def check_real(name: str, value: object) -> float:
    """A finite real number: a Python or NumPy one, or a 0-d tensor or array holding one."""
    if (isinstance(value, bool) or not isinstance(value, Real)) and (
            number := _zero_dim_value(name, value, integral=False)) is not None:
        value = number
    if isinstance(value, bool) or not isinstance(value, Real):
        hint = (f" (pass the mode by keyword: mode={value!r})"
                if isinstance(value, str) and value in MODES else "")
        raise TypeError(f"{name} must be a real number; got {_shown(value)}{hint}")
    try:
        value = _as_float(value)
    except OverflowError:  # an int (or Fraction) beyond float's range
        raise ValueError(f"{name} must be finite; got a number too large for a float") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    return value


def check_non_negative(name: str, value: object) -> float:
    value = check_real(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0; got {value}")
    return value


def check_fraction(name: str, value: object) -> float:
    """A fraction in (0, 1]."""
    value = check_real(name, value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be a fraction in (0, 1]; got {value}")
    return value


def check_probability(name: str, value: object) -> float:
    """A weight in [0, 1]."""
    value = check_real(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1]; got {value}")
    return value


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__} {value!r}")
    return value


def check_optional_bool(name: str, value: object) -> bool | None:
    if value is None:
        return None
    return check_bool(name, value)


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def check_ignore_index(ignore_index: object) -> int | None:
    """``None`` or an int in the int64 range, returned as a Python int (a NumPy integer, or a
    0-d integer tensor or array, is an int; a bool is refused: ``True`` is not a label)."""
    if ignore_index is None:
        return None
    if (isinstance(ignore_index, bool) or not isinstance(ignore_index, Integral)) and (
            number := _zero_dim_value("ignore_index", ignore_index, integral=True)) is not None:
        ignore_index = number
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, Integral):
        raise TypeError(
            f"ignore_index must be an int or None; got {_shown(ignore_index)}"
        )
    value = int(ignore_index)
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(
            f"ignore_index must lie in the int64 range [-2**63, 2**63 - 1]; got {value}"
        )
    return value


def check_smoothing(smooth: object, eps: object) -> tuple[float, float]:
    smooth = check_non_negative("smooth", smooth)
    eps = check_non_negative("eps", eps)
    if smooth + eps <= 0:
        raise ValueError("smooth + eps must be > 0 so that an empty target scored against an "
                         f"empty prediction is defined; got smooth={smooth}, eps={eps}")
    if smooth + eps < FLOAT32_TINY:
        raise ValueError(f"smooth + eps must be at least {FLOAT32_TINY!r} (float32's smallest "
                         "normal number, the precision the losses compute in: below it the "
                         "score of an empty target is not defined in float32); got "
                         f"smooth={smooth}, eps={eps}")
    return smooth, eps


FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38
FLOAT32_TINY_TEXT = "1.1754944e-38"
"""float32's smallest normal number as its shortest decimal (``FLOAT32_TINY`` rounded)."""


def check_float32_range(name: str, value: float) -> float:
    """A weight the region losses compute with in float32 (the kernels; the reference for
    float32 input): above float32's largest number it would overflow to inf, NaN or 0 by
    backend."""
    if value > FLOAT32_MAX:
        raise ValueError(f"{name} must be at most {FLOAT32_MAX!r} (float32's largest number, "
                         f"the precision the losses compute in); got {value!r}")
    return value


def check_ddp_pool(ddp_pool: object, per_image: bool) -> bool:
    ddp_pool = check_bool("ddp_pool", ddp_pool)
    if ddp_pool and per_image:
        raise ValueError("ddp_pool=True pools the batch sums across ranks and needs "
                         "per_image=False; per-image scores need no pooling")
    return ddp_pool


def check_include_background(include_background: object, mode: str) -> bool:
    include_background = check_bool("include_background", include_background)
    if not include_background and mode not in (MULTICLASS_MODE, MULTILABEL_MODE):
        raise ValueError(f"include_background=False needs mode='multiclass' or 'multilabel'; "
                         f"got mode={mode!r}, whose one channel is the foreground")
    return include_background


def check_region_weight(weight: object, mode: str, name: str = "weight"
                        ) -> tuple[float, ...] | None:
    """Dice/IoU/Tversky's per-class ``weight`` (MONAI's): None or one weight >= 0 per class
    (multiclass and multilabel mode; their number is checked against ``C`` per call); a 1-D
    tensor is read as its values."""
    if weight is None:
        return None
    if mode not in (MULTICLASS_MODE, MULTILABEL_MODE):
        raise ValueError(f"{name} needs mode='multiclass' or 'multilabel' (one weight per "
                         f"class); got mode={mode!r}, whose one class a weight would only scale")
    return _per_class_weights(weight, mode, name)


def _per_class_weights(weight: object, mode: str, name: str) -> tuple[float, ...]:
    """A sequence (or 1-D tensor or NumPy array, read as its values) of weights >= 0, one per
    class."""
    array = as_array(weight)
    if array is not None:
        check_dense(name, array)
    if array is not None and array.dim() == 1:
        weight = tensor_values(name, array)
    if isinstance(weight, (str, bytes)) or not isinstance(weight, Sequence):
        raise TypeError(f"{name} must be None or a sequence of per-class weights in "
                        f"mode={mode!r}; got {_shown(weight)}")
    weights = tuple(check_float32_range(f"{name}[{i}]", check_non_negative(f"{name}[{i}]", w))
                    for i, w in enumerate(weight))
    for i, w in enumerate(weights):
        if 0 < w < FLOAT32_TINY:  # (a weighted mean divides by their sum: 1/w overflows)
            raise ValueError(f"{name}[{i}]={w!r} is below float32's smallest normal number "
                             f"{FLOAT32_TINY_TEXT}: use 0 or a larger weight")
    total = math.fsum(weights)
    if total > FLOAT32_MAX:  # (a weighted sum or mean of the classes would overflow)
        raise ValueError(f"{name}: the sum of the per-class weights is {total:.7g}, beyond "
                         f"float32's largest number {FLOAT32_MAX!r} (the precision the losses "
                         "compute in): scale them down (a weighted mean is unchanged)")
    return weights


def check_focal_alpha(alpha: object, mode: str, name: str = "alpha"
                      ) -> float | tuple[float, ...] | None:
    """Focal ``alpha``: None, a weight in [0, 1] (binary/multilabel) or per-class weights
    >= 0 (multiclass; their number is checked against ``C`` per call)."""
    if alpha is None:
        return None
    if mode == "multiclass":  # (a 1-D tensor is read as its values)
        return _per_class_weights(alpha, mode, name)
    return check_probability(name, alpha)


def check_pos_weight(pos_weight: object, mode: str, name: str = "pos_weight"
                     ) -> float | tuple[float, ...] | None:
    """BCE's ``pos_weight``: None, a weight >= 0 of every channel's positives (also given as
    one value in a sequence or tensor, as torch broadcasts it), or one weight per channel (its
    number is checked against ``C`` per call); a tensor or NumPy array (``(C, 1, 1)`` as
    ``BCEWithLogitsLoss`` takes per-channel weights of images, or ``(C,)``) is read as its
    values. Binary and multilabel mode only."""
    if pos_weight is None:
        return None
    array = as_array(pos_weight)  # (a NumPy array is read as a tensor is)
    if array is not None:
        check_dense(name, array)
        pos_weight = array
    if mode == MULTICLASS_MODE:
        raise ValueError(
            f"{name} weighs the positives of binary and multilabel targets; mode='multiclass' "
            "has none (per-class weights of the cross-entropy, as CrossEntropyLoss(weight=...): "
            "BCELoss(mode='multiclass', weight=[...]))")
    if isinstance(pos_weight, torch.Tensor):
        if sum(size != 1 for size in pos_weight.shape) > 1:
            raise ValueError(
                f"{name} must hold one weight per channel: a tensor of shape (C,) (or (C, 1, "
                f"1) as BCEWithLogitsLoss takes it); got shape {tuple(pos_weight.shape)}")
        pos_weight = tensor_values(name, pos_weight)
        if len(pos_weight) == 1:
            pos_weight = pos_weight[0]
    if isinstance(pos_weight, Sequence) and not isinstance(pos_weight, (str, bytes)):
        if len(pos_weight) == 0:
            raise ValueError(f"{name} must not be empty: one weight per channel, or one number")
        if len(pos_weight) == 1:  # one weight for every channel
            return check_float32_range(f"{name}[0]",
                                       check_non_negative(f"{name}[0]", pos_weight[0]))
        return tuple(check_float32_range(f"{name}[{i}]", check_non_negative(f"{name}[{i}]", w))
                     for i, w in enumerate(pos_weight))
    if isinstance(pos_weight, bool) or not isinstance(pos_weight, Real):
        raise TypeError(f"{name} must be a real number or a sequence of per-channel weights; "
                        f"got {_shown(pos_weight)}")
    return check_float32_range(name, check_non_negative(name, pos_weight))


def check_class_weight(weight: object, mode: str, name: str = "weight"
                       ) -> tuple[float, ...] | None:
    """The multiclass cross-entropy's per-class ``weight`` (``CrossEntropyLoss(weight=...)``):
    None or ``C`` weights >= 0 (their number is checked against ``C`` per call); a tensor is
    read as its values."""
    if weight is None:
        return None
    if mode != MULTICLASS_MODE:
        raise ValueError(
            f"{name} is the per-class weight of multiclass mode's cross-entropy "
            "(CrossEntropyLoss(weight=...)); binary and multilabel mode weigh the positives "
            "with pos_weight (or FocalLoss(gamma=0, alpha=...) for both terms)")
    return _per_class_weights(weight, mode, name)


def check_dense(name: str, values: torch.Tensor) -> None:
    """Refuse a sparse or nested tensor of hyper-parameter values (a ``TypeError`` naming
    ``name``): their values are read as a dense tensor's."""
    if values.is_nested or values.layout is not torch.strided:
        what = "nested tensor" if values.is_nested else f"{values.layout} tensor"
        raise TypeError(f"{name} must be a dense tensor (torch.strided); got a {what} "
                        "(convert it with .to_dense(), or give numbers)")


def tensor_values(name: str, values: torch.Tensor) -> list[float]:
    """A weights tensor's values as Python numbers; a float32 one's each as the shortest
    decimal that rounds to it (``torch.tensor([0.2])`` gives 0.2, not 0.20000000298...: the
    same float32, and a readable ``repr``). Other dtypes keep their exact values (a half
    precision weight rounded to a short decimal would be another float32 weight), as do
    float32 values beyond 1e30 (float32's largest, 3.4028235e38 as the shortest decimal,
    lies above it). A meta tensor, which holds none, is refused naming ``name``."""
    check_dense(name, values)
    if values.is_meta:
        raise ValueError(f"{name} is a tensor on the meta device, which holds no values to "
                         "read: create it on the CPU (or give numbers)")
    flat = values.detach().reshape(-1).cpu()
    exact = flat.tolist()
    if flat.dtype != torch.float32:
        return exact
    shortest = []
    for value in exact:
        text = value
        if math.isfinite(value) and abs(value) <= 1e30:
            for digits in range(1, 10):
                candidate = float(f"{value:.{digits}g}")
                if torch.tensor(candidate, dtype=torch.float32).item() == value:
                    text = candidate
                    break
        shortest.append(text)
    return shortest

