r"""Spec strings: a loss from one line of a command line or a config file.

Grammar (whitespace is ignored)::

    spec     := sum ( "->" sum "@" switch )*     stages of a SwitchingLoss
    sum      := product ( "+" product )*         terms of a CompositeLoss
    product  := factor ( "*" factor )*           a weight times a loss
    factor   := "-"? NUMBER | STRING | True | False | None
              | NAME [ "(" [ arg ( "," arg )* ] ")" ]
              | "[" values "]" | "{" key ":" value, ... "}" | "(" spec ")"
    arg      := [ NAME "=" ] spec
    switch   := INT | trigger call                e.g. 50, plateau(patience=5)

Names are the losses' short names (``bce``, ``focal``, ``topk``, ``dice``, ``iou``, ``jaccard``,
``tversky``) and class names (``DiceLoss``, ``CompositeLoss``, ``SwitchingLoss``; the weight
schedules and triggers in ``CamelCase`` or ``snake_case``: ``LinearRamp`` / ``linear_ramp``,
``Plateau`` / ``plateau``, ...; the composites also as ``composite`` and ``switching``). A
bare name is a call without arguments.

- ``"dice"``, ``"tversky(alpha=0.3,beta=0.7)"``, ``"topk(k=0.1)"``: one loss.
- ``"dice+focal"``, ``"0.5*dice+bce"``, ``"linear_ramp(0,10)*dice+bce"``: a
  :class:`~dynloss.CompositeLoss`; ``+`` chains flatten into one composite, parentheses nest.
- ``"iou->bce@50"``: a :class:`~dynloss.SwitchingLoss` that uses BCE from epoch 50 on;
  ``"dice->focal@30->bce@60"``: three stages, milestones 30 and 60 (counted from the start);
  ``"iou->bce@plateau(patience=5)"``: switch when the monitored value plateaus.

Values: numbers (ASCII digits), ``True`` / ``False`` / ``None``, lists, dicts and strings in
``'...'`` or ``"..."``. Strings are read like Python literals without a prefix: the escapes
``\\ \' \" \a \b \f \n \r \t \v \xhh \uhhhh \Uhhhhhhhh`` (every escape ``repr`` writes);
octal escapes, ``\N{...}``, unknown escapes and raw control characters (NUL, a line break,
...) are refused. Brackets nest at most :data:`MAX_DEPTH` (64) levels.

``on_switch`` callbacks are Python code, which a spec cannot build: ``on_switch=`` in a spec is
refused (a loss given there, a number, a name); only ``None`` (or ``[]``) passes.

The ``repr()`` of every dynloss loss, composite and switching loss is a spec of an equal loss,
so ``build_loss(repr(loss))`` rebuilds it, with three exceptions that :func:`build_loss`
refuses with a :class:`SpecError` rather than rebuild something else: a
:class:`~dynloss.SwitchingLoss` with registered callbacks (its repr names them,
``on_switch=['report']``), a loss nested deeper than :data:`MAX_DEPTH` brackets, and one
object with schedule state (a SwitchingLoss, a CompositeLoss with a scheduled weight) held by
two stages or terms: the repr writes it in full once, then ``shared('stages.a')`` (the module
path of the first), since a spec builds each loss anew. A stateless loss held twice is written
twice: two copies behave as one.

Every error in a spec string is a :class:`SpecError` (a ``ValueError``) whose message shows the
spec with a caret under the offending position (a bad ``names=`` argument, which is not part of
the string, raises a plain ``ValueError`` or ``TypeError`` naming ``names``); a string spec
never raises ``SyntaxError``, ``RecursionError`` or ``OverflowError``.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from torch import nn

from ..losses import LOSSES, SegmentationLoss
from .composite import CompositeLoss
from .switching import SwitchingLoss, milestone_order_error, unordered_milestone
from .triggers import Milestone, Plateau, RelativeImprovement, Trigger
from .weights import Constant, Cosine, LinearRamp, RampCosine, Step, WeightSchedule

__all__ = ["MAX_DEPTH", "SpecError", "build_loss", "registry"]

MAX_DEPTH = 64
"""Most brackets a spec may nest: ``(``, ``[``, ``{`` and a call's ``(`` count one level each.

Real specs nest a few levels (``CompositeLoss([...])`` in a ``repr`` takes two); 64 levels
keep the recursive parser under 400 Python frames (about 5 per level), well inside the
default recursion limit of 1000 even when :func:`build_loss` is called from deep inside a
framework. Deeper specs are a :class:`SpecError`, never a ``RecursionError``.
"""


class SpecError(ValueError):
    """A spec string that cannot be built; ``position`` is the 0-based offending offset.

    A :class:`ValueError`. Its message is ``message``, the position, and the ``spec`` with a
    caret under the offending character.

    Examples:
        >>> from dynloss import SpecError, build_loss
        >>> try:
        ...     build_loss("dice+")
        ... except SpecError as err:
        ...     print(err.position)
        ...     print(err)
        5
        expected a loss, a number or a value; found the end of the spec (at position 5)
            dice+
                 ^
        >>> issubclass(SpecError, ValueError)
        True
    """

    def __init__(self, message: str, spec: str, position: int) -> None:
        self.message = message
        self.spec = spec
        self.position = position
        super().__init__(
            f"{message} (at position {position})\n    {_printable(spec)}\n    {' ' * position}^"
        )


def _printable(spec: str) -> str:
    """The spec with each control character shown as one visible character (U+2400 block for
    C0 and DEL, U+FFFD for C1), so that the caret below it stays aligned."""
    return "".join(
        (chr(0x2400 + ord(c)) if ord(c) < 0x20 else "\u2421" if c == "\x7f" else "\ufffd")
        if _is_control(c) else c
        for c in spec
    )


def _is_control(char: str) -> bool:
    return ord(char) < 0x20 or 0x7F <= ord(char) <= 0x9F


def registry() -> dict[str, Callable[..., Any]]:
    """Every name a spec may call, mapped to the class it builds."""
    names: dict[str, Callable[..., Any]] = {}
    for short, cls in LOSSES.items():
        names[short] = cls
        names[cls.__name__] = cls
    names["JaccardLoss"] = LOSSES["jaccard"]
    for cls, snake in [
        (CompositeLoss, "composite"),
        (SwitchingLoss, "switching"),
        (Constant, "constant"),
        (Step, "step"),
        (LinearRamp, "linear_ramp"),
        (RampCosine, "ramp_cosine"),
        (Cosine, "cosine"),
        (Milestone, "milestone"),
        (Plateau, "plateau"),
        (RelativeImprovement, "relative_improvement"),
    ]:
        names[cls.__name__] = cls
        names[snake] = cls
    names["ramp"] = LinearRamp
    names["relative"] = RelativeImprovement
    return names


_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<number>(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>->|[-+*@()\[\]{},=:])
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str
    pos: int
    value: str = ""
    """The decoded value of a string token."""


# the escapes of Python string literals that a spec accepts: every escape ``repr(str)`` writes,
# and the one-letter ones; octal, ``\N{...}`` and line continuations are refused
_SIMPLE_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "a": "\a", "b": "\b", "f": "\f", "n": "\n",
                   "r": "\r", "t": "\t", "v": "\v"}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def _read_string(spec: str, start: int) -> tuple[str, int]:
    r"""Decode the string literal opening at ``start``; returns ``(value, end)``.

    Quotes and escapes are those of a Python literal without prefix (see ``_SIMPLE_ESCAPES``,
    ``\xhh``, ``\uhhhh``, ``\Uhhhhhhhh``); raw control characters (NUL, newline, ...) must be
    written as escapes. Every problem is a SpecError at the offending character.
    """
    quote, pos = spec[start], start + 1
    chars: list[str] = []
    while pos < len(spec):
        char = spec[pos]
        if char == quote:
            return "".join(chars), pos + 1
        if _is_control(char):
            raise SpecError(
                f"a raw control character {char!r} in a string; write it as the escape "
                f"{ascii(char)[1:-1]}", spec, pos,
            )
        if char != "\\":
            chars.append(char)
            pos += 1
            continue
        if pos + 1 == len(spec):
            break
        code = spec[pos + 1]
        if code in _SIMPLE_ESCAPES:
            chars.append(_SIMPLE_ESCAPES[code])
            pos += 2
        elif code in _HEX_ESCAPES:
            width = _HEX_ESCAPES[code]
            digits = spec[pos + 2 : pos + 2 + width]
            if len(digits) != width or not _HEX_DIGITS.issuperset(digits):
                raise SpecError(f"the escape '\\{code}' needs {width} hex digits, as in "
                                f"'\\{code}{'0' * (width - 2)}41'", spec, pos)
            if int(digits, 16) > 0x10FFFF:
                raise SpecError(f"'\\{code}{digits}' is beyond U+10FFFF, the last Unicode "
                                "character", spec, pos)
            chars.append(chr(int(digits, 16)))
            pos += 2 + width
        else:
            escape = f"'\\{code}'" if code.isprintable() else f"a backslash followed by {code!r}"
            raise SpecError(
                f"unknown escape {escape} in a string; a spec accepts \\\\ \\' \\\" \\a \\b \\f "
                "\\n \\r \\t \\v \\xhh \\uhhhh \\Uhhhhhhhh", spec, pos,
            )
    raise SpecError("unterminated string: no closing quote", spec, start)


@dataclass
class _Weighted:
    """``weight * loss`` before it becomes a composite term."""

    weight: float | WeightSchedule
    loss: nn.Module


def _tokenize(spec: str) -> list[_Token]:
    tokens, pos = [], 0
    while pos < len(spec):
        if spec[pos] in "'\"":
            value, end = _read_string(spec, pos)
            tokens.append(_Token("string", spec[pos:end], pos, value))
            pos = end
            continue
        match = _TOKEN.match(spec, pos)
        if match is None:
            raise SpecError(f"unexpected character {spec[pos]!r}", spec, pos)
        kind = match.lastgroup
        assert kind is not None
        if kind == "number" and (glued := _TOKEN.match(spec, match.end())) is not None \
                and glued.lastgroup == "name":  # 0x10, 1_000, 2abc: not a number of a spec
            raise SpecError(f"a number must not run into letters: {match.group()!r} is "
                            f"followed by {glued.group()!r} (write decimal numbers: 16, "
                            "1000, 1e-4)", spec, match.end())
        if kind != "space":
            tokens.append(_Token(kind, match.group(), pos))
        pos = match.end()
    tokens.append(_Token("end", "", len(spec)))
    return tokens


def _describe(token: _Token) -> str:
    return "the end of the spec" if token.kind == "end" else repr(token.text)


def _with_names(extra: Mapping[str, Any] | None) -> dict[str, Callable[..., Any]]:
    """:func:`registry` and the caller's ``names`` (checked: identifiers, classes, no
    built-in name redefined)."""
    names = registry()
    if extra is None:
        return names
    if not isinstance(extra, Mapping):
        raise TypeError(f"names must be a mapping of names to classes; got "
                        f"{type(extra).__name__}")
    for name, cls in extra.items():
        if not isinstance(name, str) or not name.isidentifier() or not name.isascii():
            raise ValueError(f"names: {name!r} is not a name a spec can call (an ASCII "
                             "identifier)")
        if name in names or name == "shared":  # (shared(...): the mark of a shared loss)
            raise ValueError(f"names: {name!r} is a built-in name of the spec language")
        if not isinstance(cls, type):
            raise TypeError(f"names: {name!r} must map to a class; got {type(cls).__name__}")
        names[name] = cls
    return names


class _Parser:
    def __init__(self, spec: str, names: Mapping[str, Any] | None = None) -> None:
        self.spec = spec
        self.tokens = _tokenize(spec)
        self.index = 0
        self.names = _with_names(names)
        self.depth = 0  # brackets open at the current token

    def open_bracket(self, token: _Token) -> None:
        """Count one more level of nesting (``token`` is the opening bracket)."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(
                f"brackets nested more than {MAX_DEPTH} deep; a spec allows {MAX_DEPTH} levels "
                "(each '(', '[', '{' and each call's '(' counts one)", token.pos,
            )

    def close_bracket(self) -> None:
        self.depth -= 1

    # -- token helpers
    @property
    def token(self) -> _Token:
        return self.tokens[self.index]

    def error(self, message: str, pos: int | None = None) -> SpecError:
        return SpecError(message, self.spec, self.token.pos if pos is None else pos)

    def accept(self, text: str) -> _Token | None:
        token = self.token
        if token.kind == "op" and token.text == text:
            self.index += 1
            return token
        return None

    def expect(self, text: str, message: str) -> _Token:
        token = self.accept(text)
        if token is None:
            raise self.error(f"{message}; found {_describe(self.token)}")
        return token

    # -- grammar
    def parse(self) -> Any:
        value = self.spec_expr()
        if self.token.kind != "end":
            hint = ""
            if self.token.text == "@":
                hint = " ('@' belongs after a stage that follows '->', as in 'iou->bce@50')"
            raise self.error(f"unexpected {_describe(self.token)}{hint}")
        return value

    def spec_expr(self) -> Any:
        start = self.token.pos
        first = self.sum_expr()
        if self.token.text != "->" or self.token.kind != "op":
            return first
        stages = [self.as_loss(first, start)]
        switches: list[Trigger | int] = []
        points: list[int] = []  # where each switch point is
        while self.accept("->"):
            pos = self.token.pos
            stages.append(self.as_loss(self.sum_expr(), pos))
            self.expect(
                "@", "expected '@' and a switch point after a stage that follows '->' (an epoch "
                "as in 'iou->bce@50', or a trigger as in 'iou->bce@plateau(patience=5)')"
            )
            points.append(self.token.pos)
            switches.append(self.switch_point())
        unordered = unordered_milestone(switches)
        if unordered is not None:
            raise self.error(milestone_order_error(switches), points[unordered])
        try:
            milestones = [s for s in switches if isinstance(s, int)]
            if len(milestones) == len(switches):
                return SwitchingLoss(stages, milestones=milestones)
            return SwitchingLoss(stages, trigger=switches)
        except (TypeError, ValueError) as err:
            raise self.error(str(err), start) from err

    def switch_point(self) -> Trigger | int:
        token = self.token
        if token.kind == "number":
            self.index += 1
            value = self.number(token)
            if not isinstance(value, int) or value < 1:
                raise self.error(
                    f"the switch epoch must be an integer >= 1; got {token.text}", token.pos
                )
            return value
        if token.kind != "name":
            raise self.error(
                f"expected a switch epoch (an integer) or a trigger such as plateau(patience=5) "
                f"after '@'; found {_describe(token)}"
            )
        if token.text not in self.names and token.text != "shared":
            raise self.unknown_trigger(token)
        value = self.factor()
        if not isinstance(value, Trigger):
            raise self.error(
                f"{token.text!r} is not a trigger; after '@' use an epoch or one of milestone, "
                "plateau, relative_improvement", token.pos,
            )
        return value

    def unknown_trigger(self, token: _Token) -> SpecError:
        """The error for an unknown name after '@': among the triggers, not the losses."""
        triggers = ("milestone", "plateau", "relative_improvement")
        close = difflib.get_close_matches(
            token.text, [*triggers, "Milestone", "Plateau", "RelativeImprovement"], n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        own = (f"; a class of your own is named with build_loss(spec, names={{{token.text!r}: "
               f"{token.text}}})" if token.text[:1].isupper() and not close else "")
        return self.error(f"unknown trigger {token.text!r}{hint} (after '@': an epoch, or one "
                          f"of {', '.join(triggers)}){own}", token.pos)

    def sum_expr(self) -> Any:
        start = self.token.pos
        terms = [(start, self.product())]
        while self.accept("+"):
            terms.append((self.token.pos, self.product()))
        if len(terms) == 1:
            return terms[0][1]
        losses, weights = [], []
        for pos, term in terms:
            if isinstance(term, _Weighted):
                losses.append(term.loss)
                weights.append(term.weight)
            else:
                losses.append(self.as_loss(term, pos))
                weights.append(1.0)
        return self.composite(losses, weights, start)

    def composite(self, losses: list[nn.Module], weights: list[Any], pos: int) -> CompositeLoss:
        try:
            if all(not isinstance(w, WeightSchedule) and w == 1.0 for w in weights):
                return CompositeLoss(losses)
            return CompositeLoss(losses, weights=weights)
        except (TypeError, ValueError) as err:
            raise self.error(str(err), pos) from err

    def product(self) -> Any:
        start = self.token.pos
        factors = [(start, self.factor())]
        while self.accept("*"):
            factors.append((self.token.pos, self.factor()))
        if len(factors) == 1:
            return factors[0][1]
        losses = [(p, f) for p, f in factors if isinstance(f, nn.Module)]
        weights = [(p, f) for p, f in factors if not isinstance(f, nn.Module)]
        if len(losses) != 1:
            pos = losses[1][0] if len(losses) > 1 else factors[1][0]
            raise self.error("a product must be one weight times one loss, as in '0.5*dice'", pos)
        if len(weights) != 1:
            raise self.error("a product must be one weight times one loss, as in '0.5*dice'",
                             weights[1][0])
        pos, weight = weights[0]
        if isinstance(weight, WeightSchedule):
            return _Weighted(weight, losses[0][1])
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise self.error(
                "a weight must be a number or a weight schedule such as linear_ramp(0, 10)", pos
            )
        if weight < 0:
            raise self.error(f"a weight must be >= 0; got {_shorten(str(weight))}", pos)
        value = float(weight) if weight <= _FLOAT_MAX else math.inf  # float(10**400) overflows
        if not math.isfinite(value):
            raise self.error(f"a weight must be finite; got {_shorten(str(weight))}", pos)
        return _Weighted(value, losses[0][1])

    def number(self, token: _Token) -> int | float:
        text = token.text
        if not text.isdigit():
            return float(text)  # a decimal point or exponent; too large is inf
        try:
            return int(text)
        except ValueError as err:  # beyond sys.get_int_max_str_digits()
            raise self.error(f"the integer {_shorten(text)} has too many digits",
                             token.pos) from err

    def factor(self) -> Any:
        token = self.token
        if token.kind == "number":
            self.index += 1
            return self.number(token)
        if token.kind == "op" and token.text == "-":
            self.index += 1
            if self.token.kind != "number":
                raise self.error(f"expected a number after '-'; found {_describe(self.token)}")
            number = self.token
            self.index += 1
            return -self.number(number)
        if token.kind == "string":
            self.index += 1
            return token.value
        if token.kind == "name":
            self.index += 1
            if token.text in ("True", "False", "None"):
                return {"True": True, "False": False, "None": None}[token.text]
            return self.call(token)
        if token.kind == "op" and token.text in "([{":
            self.index += 1
            self.open_bracket(token)
            if token.text == "(":
                value = self.spec_expr()
                self.expect(")", "expected ')' to close the '(' group")
                value = self.finish(value)
            elif token.text == "[":
                value = self.sequence("]")
            else:
                value = self.mapping()
            self.close_bracket()
            return value
        raise self.error(f"expected a loss, a number or a value; found {_describe(token)}")

    def sequence(self, close: str) -> list[Any]:
        items: list[Any] = []
        while not self.accept(close):
            if items:
                self.expect(",", f"expected ',' or '{close}' in the list")
                if self.accept(close):
                    break
            items.append(self.finish(self.spec_expr()))
        return items

    def mapping(self) -> dict[Any, Any]:
        items: dict[Any, Any] = {}
        while not self.accept("}"):
            if items:
                self.expect(",", "expected ',' or '}' in the dict")
                if self.accept("}"):
                    break
            key_token = self.token
            key = self.factor()
            if not isinstance(key, (str, int, float)) or isinstance(key, bool):
                raise self.error("a dict key must be a string or a number", key_token.pos)
            if key in items:  # Python keeps the last; in a config that drops a stage or term
                raise self.error(f"key {key!r} given twice", key_token.pos)
            self.expect(":", "expected ':' after the dict key")
            items[key] = self.finish(self.spec_expr())
        return items

    def shared_error(self, name_token: _Token) -> SpecError:
        """The error for ``shared('path')``, the mark a repr writes for a stateful loss that
        a stage or term holds once more (see ``losses_repr``)."""
        self.accept("(")
        what = (f"shared({self.token.value!r}) is the loss at {self.token.value!r} once more"
                if self.token.kind == "string" else "shared(...) marks a loss written before")
        return self.error(
            f"{what}: one object that two stages or terms share, with its schedule state "
            "(stage, counters); a spec builds every loss it names anew and cannot express "
            "sharing: build the loss in Python, passing the same object twice", name_token.pos)

    def call(self, name_token: _Token) -> Any:
        name = name_token.text
        factory = self.names.get(name)
        if factory is None and name == "shared" and self.tokens[self.index].text == "(":
            raise self.shared_error(name_token)
        if factory is None:
            close = difflib.get_close_matches(name, list(self.names), n=3)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            # a capitalised name is likely a class of the user's (a trigger, a schedule)
            own = (f"; a class of your own is named with build_loss(spec, names={{{name!r}: "
                   f"{name}}})" if name[:1].isupper() and not close else "")
            raise self.error(
                f"unknown name {name!r}{hint} (known losses: "
                f"{', '.join(sorted(LOSSES))}){own}", name_token.pos,
            )
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        where: dict[str, int] = {}  # parameter name -> position of its value
        open_token = self.token
        if self.accept("("):
            self.open_bracket(open_token)
            parameters = {
                p.name: p for p in inspect.signature(factory).parameters.values()
            }
            positional = [
                p for p in parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
            # a constructor taking **kwargs / *args (a user's wrapper) takes any name / number
            any_name = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
            any_number = any(p.kind is p.VAR_POSITIONAL for p in parameters.values())
            while not self.accept(")"):
                if args or kwargs:
                    self.expect(",", f"expected ',' or ')' in the arguments of {name}")
                    if self.accept(")"):
                        break
                token = self.token
                if token.kind == "name" and self.tokens[self.index + 1].text == "=":
                    self.index += 2
                    if (token.text not in parameters and not any_name) or (
                        token.text in parameters
                        and parameters[token.text].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                            inspect.Parameter.VAR_POSITIONAL,
                                                            inspect.Parameter.VAR_KEYWORD)
                        and not any_name
                    ):
                        close = difflib.get_close_matches(token.text, list(parameters), n=2)
                        hint = (f"did you mean {' or '.join(repr(c) for c in close)}? "
                                if close else "")
                        raise self.error(
                            f"unknown parameter {token.text!r} for {name}; {hint}"
                            f"{name} takes {', '.join(parameters)}", token.pos,
                        )
                    if token.text in kwargs:
                        raise self.error(f"parameter {token.text!r} given twice", token.pos)
                    where[token.text] = self.token.pos
                    if factory is SwitchingLoss and token.text == "on_switch":
                        self.no_callbacks()  # None or []: no callbacks
                        kwargs["on_switch"] = None
                        continue
                    kwargs[token.text] = self.finish(self.spec_expr())
                else:
                    if token.text == ",":  # (a positional argument would fail below)
                        raise self.error(f"expected an argument or ')' in the arguments of "
                                         f"{name}", token.pos)
                    if kwargs:
                        raise self.error("a positional argument cannot follow a keyword "
                                         "argument", token.pos)
                    if len(args) >= len(positional) and not any_number:
                        raise self.error(
                            f"{name} takes at most {len(positional)} positional argument"
                            f"{'s' if len(positional) != 1 else ''}"
                            + (f" ({', '.join(p.name for p in positional)})" if positional
                               else "")
                            + "; name the others, as in name=value", token.pos,
                        )
                    if len(args) < len(positional):
                        where[positional[len(args)].name] = token.pos
                    args.append(self.finish(self.spec_expr()))
            self.close_bracket()
        try:
            return factory(*args, **kwargs)
        except (TypeError, ValueError, ArithmeticError) as err:  # float(10**400): OverflowError
            # point at the argument the message names ("alpha must be >= 0"), else at the call
            message = str(err)
            pos = next(
                (p for param, p in where.items() if re.match(rf"{param}\b", message)),
                name_token.pos,
            )
            # (a message that already names the call, "SwitchingLoss: ...", keeps its one prefix)
            prefix = "" if message.startswith(f"{name}: ") else f"{name}: "
            raise self.error(f"{prefix}{message}", pos) from err

    def no_callbacks(self) -> None:
        """Parse the value of ``on_switch=`` and refuse anything but ``None`` or ``[]``.

        Callbacks are Python code; nothing a spec builds is one (a loss is callable, but a
        callback receives a :class:`~dynloss.SwitchEvent`). The ``repr`` of a loss with
        callbacks writes their names as strings, which land here too.
        """
        pos = self.token.pos
        probe = self.tokens[self.index + (1 if self.token.text == "[" else 0)]
        if probe.kind == "name" and probe.text not in self.names and probe.text not in (
            "True", "False", "None"
        ):
            raise self.error(
                f"on_switch: {probe.text!r} is not a name a spec knows; callbacks are Python code, "
                "which a spec cannot build: build the loss without on_switch and register them "
                "with loss.on_switch(callback)", probe.pos,
            )
        value = self.finish(self.spec_expr())
        if value is None or value == []:
            return None
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, nn.Module):
                raise self.error(
                    f"on_switch: {item!r} is a loss, not a callback; a further stage is written "
                    "as in 'dice->focal@30->bce@60'", pos,
                )
            if isinstance(item, str):
                raise self.error(
                    f"on_switch: the callback {item!r} is Python code, which a spec cannot build; "
                    "build the loss without on_switch and register it again with "
                    "loss.on_switch(callback)", pos,
                )
        raise self.error(
            f"on_switch takes Python callables, which a spec cannot build; got "
            f"{type(value).__name__} {_shorten(repr(value))}; register callbacks with "
            "loss.on_switch(callback) after build_loss", pos,
        )

    # -- conversions
    def finish(self, value: Any) -> Any:
        """A weighted loss used as a value becomes a one-term composite."""
        if isinstance(value, _Weighted):
            return CompositeLoss([value.loss], weights=[value.weight])
        return value

    def as_loss(self, value: Any, pos: int) -> nn.Module:
        value = self.finish(value)
        if not isinstance(value, nn.Module):
            raise self.error(
                f"expected a loss here, such as 'dice' or 'tversky(alpha=0.3)'; got "
                f"{type(value).__name__} {value!r}", pos,
            )
        return value


_FLOAT_MAX = sys.float_info.max


def _shorten(text: str, width: int = 40) -> str:
    return text if len(text) <= width else f"{text[: width - 13]}...({len(text)} chars)"


_Module = TypeVar("_Module", bound=nn.Module)


@overload
def build_loss(spec: str, *, names: None = None
               ) -> SegmentationLoss | CompositeLoss | SwitchingLoss: ...
@overload
def build_loss(spec: str, *, names: Mapping[str, type]) -> nn.Module: ...
@overload
def build_loss(spec: _Module, *, names: Mapping[str, type] | None = None) -> _Module: ...
def build_loss(spec: str | nn.Module, *, names: Mapping[str, type] | None = None
               ) -> nn.Module:
    r"""Build a loss from a spec string (see :mod:`dynloss.schedules.spec` for the grammar).

    Args:
        spec: e.g. ``"dice"``, ``"tversky(alpha=0.3,beta=0.7)"``, ``"topk(k=0.1)"``,
            ``"dice+focal"``, ``"0.5*dice+bce"``, ``"iou->bce@50"``,
            ``"dice->focal@30->bce@60"``, ``"iou->bce@plateau(patience=5)"``, or the ``repr``
            of a dynloss loss made of its own losses, triggers and weight schedules (a custom
            trigger or schedule class is not a name a spec knows, unless ``names`` gives
            it). An ``nn.Module`` is returned unchanged.
        names: further names a spec may call, each mapped to its class: a custom
            :class:`~dynloss.schedules.Trigger`, :class:`~dynloss.WeightSchedule` or loss
            module (``{"Below": Below}`` rebuilds the repr of a loss holding ``Below(...)``).
            A name must be an ASCII identifier and must not redefine a built-in one.

    Returns:
        A loss module: a single loss, a :class:`~dynloss.CompositeLoss` or a
        :class:`~dynloss.SwitchingLoss` (typed as that union: narrow it with ``isinstance``
        before calling ``step()`` or ``on_switch()``; with ``names``, any module).

    Raises:
        SpecError: (a ``ValueError``) malformed spec, unknown name or parameter, a bad string
            (unknown or malformed escape, raw control character such as NUL), brackets nested
            deeper than :data:`MAX_DEPTH`, an integer beyond Python's digit limit, a weight that
            is not finite, ``on_switch=`` anything but ``None``, or a value a constructor
            rejects; the message points at the position with a caret.
        TypeError: ``spec`` is neither a string nor a module, ``names`` is not a mapping, or one
            of its values is not a class.
        ValueError: a key of ``names`` is a built-in name of the spec language or not an ASCII
            identifier (the message names ``names``; not a :class:`SpecError`, as there is no
            position in the spec to point at).

    Examples:
        >>> from dynloss import SpecError, build_loss
        >>> build_loss("0.5*dice+bce")
        CompositeLoss([DiceLoss(), BCELoss()], weights=[0.5, 1.0])
        >>> build_loss("iou->bce@plateau(patience=5)")
        SwitchingLoss([IoULoss(), BCELoss()], trigger=Plateau(patience=5))
        >>> build_loss("tversky(alpha=0.3, beta=0.7)")
        TverskyLoss()
        >>> build_loss("dice+focl")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        dynloss.schedules.spec.SpecError: unknown name 'focl'; did you mean 'focal'? ...
        >>> build_loss("SwitchingLoss({'a\\tb': dice, 'c\\u00e9': bce}, milestones=[5])").names
        ['a\tb', 'cé']
        >>> try:
        ...     build_loss(r"dice(mode='\x')")
        ... except SpecError as err:
        ...     print(err)
        the escape '\x' needs 2 hex digits, as in '\x41' (at position 11)
            dice(mode='\x')
                       ^
        >>> try:
        ...     build_loss("SwitchingLoss([dice, bce], milestones=[3], on_switch=dice)")
        ... except SpecError as err:
        ...     print(err.position, err.message)  # doctest: +ELLIPSIS
        53 on_switch: DiceLoss() is a loss, not a callback; ...
    """
    if isinstance(spec, nn.Module):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"build_loss needs a spec string; got {type(spec).__name__}")
    if not spec.strip():
        raise SpecError("empty spec; expected a loss such as 'dice'", spec, 0)
    parser = _Parser(spec, names)
    return parser.as_loss(parser.parse(), 0)
