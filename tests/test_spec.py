"""Spec strings: build_loss grammar, errors pointing at the position, repr round trips."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dynloss
from dynloss import (
    LOSSES,
    BCELoss,
    CompositeLoss,
    Cosine,
    DiceLoss,
    FocalLoss,
    IoULoss,
    LinearRamp,
    Plateau,
    RampCosine,
    RelativeImprovement,
    SpecError,
    Step,
    SwitchingLoss,
    TopKLoss,
    TverskyLoss,
    build_loss,
)

PROPERTY = settings(max_examples=80, deadline=None, derandomize=True)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("dice", "DiceLoss()"),
        ("tversky(alpha=0.3,beta=0.7)", "TverskyLoss()"),
        ("tversky(alpha=0.5, beta=0.5)", "TverskyLoss(alpha=0.5, beta=0.5)"),
        ("tversky(0.2, 0.8)", "TverskyLoss(alpha=0.2, beta=0.8)"),
        ("topk(k=0.1)", "TopKLoss(k=0.1)"),
        ("jaccard", "IoULoss()"),
        ("dice+focal", "CompositeLoss([DiceLoss(), FocalLoss()])"),
        ("0.5*dice+bce", "CompositeLoss([DiceLoss(), BCELoss()], weights=[0.5, 1.0])"),
        ("dice*2 + bce*0.5", "CompositeLoss([DiceLoss(), BCELoss()], weights=[2.0, 0.5])"),
        ("iou->bce@50", "SwitchingLoss([IoULoss(), BCELoss()], milestones=[50])"),
        ("dice->focal@30->bce@60",
         "SwitchingLoss([DiceLoss(), FocalLoss(), BCELoss()], milestones=[30, 60])"),
        ("iou->bce@plateau(patience=5)",
         "SwitchingLoss([IoULoss(), BCELoss()], trigger=Plateau(patience=5))"),
        ("iou -> bce @ relative(threshold=0.02)",
         "SwitchingLoss([IoULoss(), BCELoss()], trigger=RelativeImprovement(threshold=0.02))"),
        ("dice->focal@plateau->bce@60",
         "SwitchingLoss([DiceLoss(), FocalLoss(), BCELoss()], trigger=[Plateau(), Milestone(60)])"),
        ("dice+focal->bce@50",
         "SwitchingLoss([CompositeLoss([DiceLoss(), FocalLoss()]), BCELoss()], milestones=[50])"),
        ("(dice+bce)+focal",
         "CompositeLoss([CompositeLoss([DiceLoss(), BCELoss()]), FocalLoss()])"),
        ("linear_ramp(40, 60, 1.0, 0.0)*iou + linear_ramp(40, 60)*bce",
         "CompositeLoss([IoULoss(), BCELoss()], weights=[LinearRamp(start=40, end=60, "
         "initial=1.0, final=0.0), LinearRamp(start=40, end=60)])"),
        ("0.5*dice", "CompositeLoss([DiceLoss()], weights=[0.5])"),
        ("focal(gamma=1, alpha=[0.2, 0.8], mode='multiclass')",
         "FocalLoss(gamma=1.0, alpha=[0.2, 0.8], mode='multiclass')"),
        ('dice(mode="multilabel", ignore_index=-1, from_logits=False, check_values=None)',
         "DiceLoss(mode='multilabel', from_logits=False, ignore_index=-1)"),
    ],
)
def test_build_loss_examples(spec: str, expected: str) -> None:
    assert repr(build_loss(spec)) == expected


def test_build_loss_types_and_values() -> None:
    loss = build_loss("dice->focal@30->bce@60")
    assert isinstance(loss, SwitchingLoss) and loss.milestones == [30, 60]
    assert [type(s) for s in loss.stages.values()] == [DiceLoss, FocalLoss, BCELoss]
    tversky = build_loss("tversky(alpha=0.3,beta=0.7)")
    assert isinstance(tversky, TverskyLoss) and (tversky.alpha, tversky.beta) == (0.3, 0.7)
    assert build_loss("topk(k=0.1)").k == 0.1
    composite = build_loss("0.5*dice+bce")
    logits, target = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    expected = 0.5 * DiceLoss()(logits, target) + BCELoss()(logits, target)
    torch.testing.assert_close(composite(logits, target), expected, rtol=0, atol=0)
    module = DiceLoss()
    assert build_loss(module) is module
    with pytest.raises(TypeError, match="needs a spec string"):
        build_loss(3)


@pytest.mark.parametrize(
    ("spec", "position", "message"),
    [
        ("", 0, "empty spec"),
        ("dice+", 5, "expected a loss, a number or a value; found the end of the spec"),
        ("dice+focl", 5, "unknown name 'focl'; did you mean 'focal'?"),
        ("tversky(alpah=0.3)", 8, "unknown parameter 'alpah' for tversky; did you mean 'alpha'?"),
        ("topk(k=0.1, k=0.2)", 12, "parameter 'k' given twice"),
        ("tversky(alpha=-1)", 14, "tversky: alpha must be >= 0; got -1.0"),
        ("tversky(0.3, 0.7, 0.1)", 18, "tversky takes at most 2 positional arguments"),
        ("dice(smooth=1, 'binary')", 15, "a positional argument cannot follow a keyword"),
        # it said "a positional argument cannot follow a keyword argument"
        ("dice(smooth=1,,)", 14, "expected an argument or ')' in the arguments of dice"),
        ("dice(,)", 5, "expected an argument or ')' in the arguments of dice"),
        ("iou->bce", 8, "expected '@' and a switch point"),
        ("iou->bce@0", 9, "the switch epoch must be an integer >= 1; got 0"),
        ("iou->bce@2.5", 9, "the switch epoch must be an integer >= 1; got 2.5"),
        ("iou->bce@dice", 9, "'dice' is not a trigger"),
        ("iou->bce@plateau(patience=-1)", 26, "plateau: patience must be >= 0"),
        ("dice->bce@60->focal@30", 20, "milestones must be strictly increasing"),
        ("dice*bce", 5, "a product must be one weight times one loss"),
        ("0.5*2", 4, "a product must be one weight times one loss"),
        ("-0.5*dice", 0, "a weight must be >= 0"),
        ("0.5", 0, "expected a loss here"),
        ("dice)", 4, "unexpected ')'"),
        ("dice@50", 4, "'@' belongs after a stage that follows '->'"),
        ("topk(k=0.1", 10, "expected ',' or ')' in the arguments of topk"),
        ("dice $", 5, "unexpected character '$'"),
        ("'abc", 0, "unterminated string"),
        ("(dice", 5, "expected ')' to close the '(' group"),
        ("dice(mode='x')", 10, "mode must be one of"),
        ("CompositeLoss([dice], weights=[1, 2])", 0, "got 2 weights for 1 losses"),
        # a repeated dict key dropped a stage (Python keeps the last; a spec is a config)
        ("SwitchingLoss({'a': dice, 'a': bce, 'b': focal}, milestones=[5])", 26,
         "key 'a' given twice"),
        ("CompositeLoss([dice, bce], weights={'bce': 1, 'bce': 2})", 46,
         "key 'bce' given twice"),
        ("focal(gamma=1" + "0" * 400 + ")", 12, "focal: gamma must be finite; got a number "
         "too large for a float"),
    ],
)
def test_errors_point_at_the_offending_position(spec: str, position: int, message: str) -> None:
    with pytest.raises(SpecError) as info:
        build_loss(spec)
    error = info.value
    assert isinstance(error, ValueError)
    assert message in error.message
    assert error.position == position
    assert str(error).endswith(f"\n    {spec}\n    {' ' * position}^")


def test_error_lists_known_parameters() -> None:
    with pytest.raises(ValueError, match=r"topk takes k, mode, from_logits, ignore_index"):
        build_loss("topk(kk=1)")


# ----------------------------------------------------------------------------- round trips
ROUND_TRIP = [
    BCELoss(),
    BCELoss("multiclass", reduction="sum"),
    FocalLoss(0.0, 0.25),
    FocalLoss(alpha=[0.1, 0.2, 0.7], mode="multiclass", ignore_index=255),
    TopKLoss(0.05, backend="reference"),
    DiceLoss(smooth=1.0, eps=1e-05, per_image=True),
    IoULoss("multilabel", from_logits=False, check_values=True),
    TverskyLoss(0.1, 0.9, ddp_pool=True),
    CompositeLoss([DiceLoss(), FocalLoss()]),
    CompositeLoss({"region": IoULoss(), "pixel": BCELoss()}, weights=[0.25, 4.0]),
    CompositeLoss([DiceLoss(), BCELoss()], weights=[Cosine(0, 10), Step([5], [0.0, 1.0])]),
    CompositeLoss([TverskyLoss(), BCELoss()], weights=[1.0, RampCosine(0, 5, 10, 0.1, 0.9)]),
    SwitchingLoss([IoULoss(), BCELoss()], milestones=[7]),
    SwitchingLoss([DiceLoss(), TopKLoss(k=0.1)], trigger=Plateau(3, 0.001, "max", 5, 40),
                  unit="step", sync_metric=False),
    SwitchingLoss({"a": CompositeLoss([DiceLoss(), BCELoss()]), "b": FocalLoss()},
                  trigger=[RelativeImprovement(threshold=0.02, window=3)]),
    SwitchingLoss([DiceLoss(), FocalLoss(), BCELoss()], trigger=[Plateau(), 90]),
    CompositeLoss([SwitchingLoss([DiceLoss(), BCELoss()], milestones=[3]),
                   IoULoss()], weights=[LinearRamp(0, 3), 2.0]),
]


@pytest.mark.parametrize("loss", ROUND_TRIP, ids=lambda loss: repr(loss)[:40])
def test_repr_round_trips_through_build_loss(loss: torch.nn.Module) -> None:
    rebuilt = build_loss(repr(loss))
    assert type(rebuilt) is type(loss)
    assert repr(rebuilt) == repr(loss)
    # the repr is also valid Python
    assert repr(eval(repr(loss), vars(dynloss))) == repr(loss)


def test_repr_round_trip_keeps_behaviour() -> None:
    loss = build_loss("iou->bce@plateau(patience=1)")
    twin = build_loss(repr(loss))
    for metric in [1.0, 0.8, 0.9]:
        assert loss.step(metric) == twin.step(metric)
    assert loss.active_index == twin.active_index == 1


_number = st.floats(0.0, 1.0, allow_nan=False).map(lambda x: round(x, 3))
_region = st.sampled_from(["dice", "iou", "tversky"])


@st.composite
def random_losses(draw, depth: int = 0):
    kind = draw(st.sampled_from(["single", "single", "composite", "switching"]
                                if depth < 2 else ["single"]))
    if kind == "single":
        name = draw(st.sampled_from(sorted(LOSSES)))
        cls = LOSSES[name]
        kwargs = {}
        if name == "tversky":
            kwargs = {"alpha": draw(_number), "beta": draw(_number)}
        elif name == "focal":
            kwargs = {"gamma": draw(st.sampled_from([0.0, 1.0, 2.0, 3.5]))}
        elif name == "topk":
            kwargs = {"k": draw(st.sampled_from([0.05, 0.1, 0.6, 1.0]))}
        if name in ("dice", "iou", "tversky") and draw(st.booleans()):
            kwargs["smooth"] = draw(_number)
        if draw(st.booleans()):
            kwargs["reduction"] = draw(st.sampled_from(["mean", "sum"]))
        return cls(**kwargs)
    parts = draw(st.lists(random_losses(depth + 1), min_size=2, max_size=3))
    if kind == "composite":
        weights = draw(st.one_of(st.none(), st.lists(
            st.one_of(_number, st.builds(LinearRamp, st.integers(0, 5), st.integers(5, 9))),
            min_size=len(parts), max_size=len(parts))))
        return CompositeLoss(parts, weights=weights)
    cuts = sorted(draw(st.sets(st.integers(1, 99), min_size=len(parts) - 1,
                               max_size=len(parts) - 1)))
    if draw(st.booleans()):
        return SwitchingLoss(parts, milestones=cuts)
    return SwitchingLoss(parts, trigger=[Plateau(patience=c % 7) for c in cuts])


@PROPERTY
@given(random_losses())
def test_any_repr_round_trips(loss) -> None:
    assert repr(build_loss(repr(loss))) == repr(loss)


# ------------------------------------------------------------------ issue #11: every failure
def _raises_spec_error(spec: str, position: int, message: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        build_loss(spec)
    assert message in info.value.message, info.value.message
    assert info.value.position == position
    return info.value


@pytest.mark.parametrize(("open_", "close", "inner"), [
    ("(", ")", "dice"),
    ("[", "]", ""),
    ("{'a': ", "}", "1"),
])
def test_nesting_deeper_than_the_limit_is_a_spec_error(open_: str, close: str, inner: str) -> None:
    assert dynloss.schedules.spec.MAX_DEPTH == 64
    for depth in (65, 400, 10_000):
        spec = open_ * depth + inner + close * depth
        if open_ == "[":
            spec = f"focal(alpha={spec})"
        # the 65th level; in focal(alpha=[[...]]) the call's '(' is the first
        position = 12 + 63 if open_ == "[" else 64 * len(open_)
        _raises_spec_error(spec, position, "brackets nested more than 64 deep")


def test_nesting_at_the_limit_builds() -> None:
    assert repr(build_loss("(" * 64 + "dice" + ")" * 64)) == "DiceLoss()"
    # a call's parentheses and a list's brackets count as one level each: 31 * 2 + 2 = 64
    spec = ("composite([" * 31 + "focal(alpha=[0.2, 0.8], mode='multiclass')" + "])" * 31
            + "->bce(mode='multiclass')@3")
    loss = build_loss(spec)
    assert isinstance(loss, SwitchingLoss) and loss.milestones == [3]
    # its repr adds SwitchingLoss([...]): 66 levels, which build_loss refuses
    text = repr(loss)
    assert text.startswith("SwitchingLoss([CompositeLoss([CompositeLoss([")
    _raises_spec_error(text, text.index("FocalLoss(") + len("FocalLoss"),
                       "brackets nested more than 64 deep")
    # 30 composites in a switching loss: the repr nests 63 levels and round-trips
    shallower = build_loss(repr(build_loss("composite([" * 30 + "dice" + "])" * 30 + "->bce@3")))
    assert repr(build_loss(repr(shallower))) == repr(shallower)
    too_deep = "composite([" * 33 + "dice" + "])" * 33
    _raises_spec_error(too_deep, 32 * 11 + 9, "brackets nested more than 64 deep")


def _reference_string(literal: str) -> str:
    import ast

    return ast.literal_eval(literal)


@pytest.mark.parametrize("literal", [
    r"'a\tb'", r"'a\nb\r'", r"'it\'s'", r'"say \"hi\""', r"'back\\slash'", r"'\x41\x00z'",
    r"'\u00e9t\u00e9'", r"'\U0001F600'", r"'\U0010FFFF'", r"'\a\b\f\v'", "'\u00e9\u4e2d'",
    r"'\ud800'",
])
def test_string_escapes_decode_like_python(literal: str) -> None:
    loss = build_loss(f"SwitchingLoss({{{literal}: dice, 'other': bce}}, milestones=[2])")
    assert loss.names == [_reference_string(literal), "other"]
    assert repr(build_loss(repr(loss))) == repr(loss)


@pytest.mark.parametrize(("spec", "position", "message"), [
    (r"dice(mode='\x')", 11, r"the escape '\x' needs 2 hex digits"),
    (r"dice(mode='\x4')", 11, r"the escape '\x' needs 2 hex digits"),
    (r"dice(mode='ab\xZZ')", 13, r"the escape '\x' needs 2 hex digits"),
    (r"dice(mode='\u12')", 11, r"the escape '\u' needs 4 hex digits"),
    (r"dice(mode='\U0011FFFF')", 11, r"'\U0011FFFF' is beyond U+10FFFF"),
    (r"dice(mode='\U00110000')", 11, r"'\U00110000' is beyond U+10FFFF"),
    (r"dice(mode='\N{DASH}')", 11, r"unknown escape '\N' in a string"),
    (r"dice(mode='\d')", 11, r"unknown escape '\d' in a string"),
    (r"dice(mode='\0')", 11, r"unknown escape '\0' in a string"),
    ("dice(mode='a\\\nb')", 12, r"unknown escape a backslash followed by '\n'"),
    ("dice(mode='a\x00b')", 12, r"a raw control character '\x00' in a string"),
    ("dice(mode='a\nb')", 12, r"a raw control character '\n' in a string"),
    ("dice(mode='abc\\'", 10, "unterminated string"),
    ("dice(mode='abc\\", 10, "unterminated string"),
    ("dice\x00", 4, r"unexpected character '\x00'"),
])
def test_bad_strings_are_spec_errors_at_their_position(spec: str, position: int,
                                                       message: str) -> None:
    _raises_spec_error(spec, position, message)


def test_error_display_shows_control_characters_so_the_caret_lines_up() -> None:
    error = _raises_spec_error("dice(mode='a\x00b')", 12, "raw control character")
    assert str(error).endswith("\n    dice(mode='a\u2400b')\n                ^")
    assert error.spec == "dice(mode='a\x00b')"
    assert repr(build_loss("dice\n+\tbce")) == "CompositeLoss([DiceLoss(), BCELoss()])"


def test_a_trailing_comma_closes_a_list_as_in_python() -> None:
    """``[a, b,]`` is Python's list: the spec language reads it so (mutation review)."""
    assert repr(build_loss("CompositeLoss([dice, bce,])")) == \
        "CompositeLoss([DiceLoss(), BCELoss()])"
    _raises_spec_error("CompositeLoss([dice, bce,,])", 25, "expected")


def test_a_bool_dict_key_is_refused_at_the_key() -> None:
    """``True`` is not a stage name: the error points at the key, not at the whole spec."""
    _raises_spec_error("SwitchingLoss({True: dice, 'b': bce}, milestones=[5])", 15,
                       "a dict key must be a string or a number")


@pytest.mark.parametrize(("spec", "position", "message"), [
    ("dice(smooth=" + "9" * 5000 + ")", 12, "has too many digits"),
    ("9" * 400 + "*dice", 0, "a weight must be finite"),
    ("1e999*dice", 0, "a weight must be finite; got inf"),
    ("iou->bce@plateau(min_delta=" + "9" * 400 + ")", 27,
     "plateau: min_delta must be finite; got a number too large for a float"),
    ("dice(smooth=\u0661)", 12, "unexpected character '\u0661'"),
    # a number run into letters: the error named the 0 of 0x10 as the switch epoch (found by
    # a review of unusual inputs), and 1x10 as "unexpected 'x10'"
    ("dice->bce@0x10", 11, "a number must not run into letters: '0' is followed by 'x10' "
                           "(write decimal numbers: 16, 1000, 1e-4)"),
    ("dice->bce@1_000", 11, "'1' is followed by '_000'"),
    ("2dice", 1, "'2' is followed by 'dice'"),
])
def test_bad_numbers_are_spec_errors(spec: str, position: int, message: str) -> None:
    _raises_spec_error(spec, position, message)


_PIECES = ["dice", "bce", "focal", "tversky", "composite", "switching", "SwitchingLoss",
           "linear_ramp", "step", "plateau", "relative", "milestone", "(", ")", "[", "]", "{",
           "}", ",", "=", ":", "+", "*", "-", "->", "@", "0", "3", "0.5", "1e999", "9" * 400,
           "'a'", "'multiclass'", "None", "True", "alpha", "weights", "milestones", "trigger",
           "on_switch", "values", "mode", "unit", r"'\x'", "'\x00'", "\x00", "'", "\\", "$"]


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(_PIECES), min_size=1, max_size=12))
def test_any_spec_builds_a_module_or_raises_a_spec_error(pieces: list[str]) -> None:
    spec = "".join(pieces)
    try:
        loss = build_loss(spec)
    except SpecError as error:
        assert 0 <= error.position <= len(spec)
    else:  # a loss that computes, and whose repr builds the same loss again
        assert isinstance(loss, torch.nn.Module)
        assert repr(build_loss(repr(loss))) == repr(loss)
        x = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]]]])
        t = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
        if "multiclass" not in spec:
            value = loss(x, t)
            assert value.shape == () and torch.isfinite(value)


def test_dice_to_focal_plus_bce_builds_a_composite_second_stage() -> None:
    loss = build_loss("dice->focal+bce@30")
    assert isinstance(loss, SwitchingLoss) and loss.milestones == [30]
    first, second = loss.stages.values()
    assert type(first) is DiceLoss
    assert isinstance(second, CompositeLoss) and second.names == ["focal", "bce"]
    assert [type(t) for t in second.terms.values()] == [FocalLoss, BCELoss]
    assert second.weights == [1.0, 1.0]
    logits = torch.linspace(-2.0, 2.0, 32).reshape(2, 1, 4, 4)
    target = (torch.arange(32).reshape(2, 1, 4, 4) % 3 == 0).float()
    for _ in range(29):
        loss.step()
    torch.testing.assert_close(loss(logits, target), DiceLoss()(logits, target), rtol=0, atol=0)
    loss.step()
    expected = FocalLoss()(logits, target) + BCELoss()(logits, target)
    torch.testing.assert_close(loss(logits, target), expected, rtol=0, atol=0)
    assert repr(loss) == ("SwitchingLoss([DiceLoss(), CompositeLoss([FocalLoss(), BCELoss()])], "
                          "milestones=[30])")


# ------------------------------------------------------------------------ on_switch in specs
_SWITCH = "SwitchingLoss([dice, bce], milestones=[3], on_switch="


@pytest.mark.parametrize(("value", "message"), [
    ("dice", "on_switch: DiceLoss() is a loss, not a callback"),
    ("[bce]", "on_switch: BCELoss() is a loss, not a callback"),
    ("3", "on_switch takes Python callables, which a spec cannot build; got int 3"),
    ("linear_ramp(0, 1)", "on_switch takes Python callables, which a spec cannot build; got "
                          "LinearRamp LinearRamp(start=0, end=1)"),
    ("report", "on_switch: 'report' is not a name a spec knows; callbacks are Python code"),
    ("[report]", "on_switch: 'report' is not a name a spec knows; callbacks are Python code"),
    ("['report']", "on_switch: the callback 'report' is Python code, which a spec cannot build"),
])
def test_on_switch_in_a_spec_is_refused_at_build_time(value: str, message: str) -> None:
    spec = f"{_SWITCH}{value})"
    position = len(_SWITCH) + (1 if value == "[report]" else 0)
    _raises_spec_error(spec, position, message)


def test_on_switch_none_in_a_spec_means_no_callback() -> None:
    for value in ("None", "[]"):
        loss = build_loss(f"{_SWITCH}{value})")
        assert repr(loss) == "SwitchingLoss([DiceLoss(), BCELoss()], milestones=[3])"
        assert loss._callbacks == []


def test_repr_of_a_loss_with_callbacks_shows_them_and_build_loss_refuses_it() -> None:
    def report(event) -> None:
        pass

    events: list = []
    loss = SwitchingLoss([IoULoss(), BCELoss()], milestones=[5], on_switch=[report, events.append])
    text = repr(loss)
    assert text == ("SwitchingLoss([IoULoss(), BCELoss()], milestones=[5], on_switch=["
                    "'test_repr_of_a_loss_with_callbacks_shows_them_and_build_loss_refuses_it."
                    "<locals>.report', 'list.append'])")
    error = _raises_spec_error(text, text.index("on_switch=") + len("on_switch="),
                               "on_switch: the callback 'test_repr_of_a_loss_with_callbacks")
    assert "register it again with loss.on_switch(callback)" in error.message
    # not valid Python either: a name is not a callable
    with pytest.raises(TypeError, match="on_switch needs a callable; got str"):
        eval(text, vars(dynloss))
    # nested in a composite: refused the same way
    outer = CompositeLoss([loss, DiceLoss()])
    with pytest.raises(SpecError, match="is Python code, which a spec cannot build"):
        build_loss(repr(outer))
    # without callbacks the repr is a spec again
    assert repr(build_loss("iou->bce@5")) == "SwitchingLoss([IoULoss(), BCELoss()], milestones=[5])"


def test_a_shared_stateful_loss_is_marked_in_the_repr_and_build_loss_refuses_it() -> None:
    """Stage 1 = stage 0 + a term, with stage 0 a SwitchingLoss: the repr printed the shared
    loss twice, and the loss ``build_loss`` made of it held two independent copies (its stage-1
    copy started afresh at the outer switch: Focal from epoch 6 instead of 4), while both
    reprs read alike. Found by a review of the schedules."""
    inner = SwitchingLoss([BCELoss(), FocalLoss()], trigger=Plateau(patience=100, max_epochs=4))
    loss = SwitchingLoss([inner, CompositeLoss([inner, DiceLoss()])], milestones=[2])
    text = repr(loss)
    assert text == ("SwitchingLoss([SwitchingLoss([BCELoss(), FocalLoss()], trigger=Plateau("
                    "patience=100, max_epochs=4)), CompositeLoss([shared("
                    "'stages.switchingloss'), DiceLoss()])], milestones=[2])")
    assert loss.get_submodule("stages.switchingloss") is inner
    error = _raises_spec_error(text, text.index("shared("),
                               "is the loss at 'stages.switchingloss' once more")
    assert "build the loss in Python" in error.message
    with pytest.raises(NameError, match="name 'shared' is not defined"):
        eval(text, vars(dynloss))
    # a scheduled composite shared by two stages alike; a stateless loss shared is no matter
    ramp = CompositeLoss([DiceLoss(), BCELoss()], weights=[LinearRamp(0, 4), 1.0])
    dice = DiceLoss()
    two = SwitchingLoss({"a": ramp, "b": CompositeLoss({"r": ramp, "d": dice}), "c": dice},
                        milestones=[2, 4])
    assert repr(two) == ("SwitchingLoss({'a': CompositeLoss([DiceLoss(), BCELoss()], weights=["
                         "LinearRamp(start=0, end=4), 1.0]), 'b': CompositeLoss({'r': "
                         "shared('stages.a'), 'd': DiceLoss()}), 'c': DiceLoss()}, "
                         "milestones=[2, 4])")
    plain = SwitchingLoss([dice, CompositeLoss([dice, BCELoss()])], milestones=[1])
    assert repr(build_loss(repr(plain))) == repr(plain)
    # each repr starts afresh: the marks of one never leak into the next
    assert repr(inner) == "SwitchingLoss([BCELoss(), FocalLoss()], trigger=Plateau(" \
        "patience=100, max_epochs=4))"
    assert repr(loss) == text


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.text(min_size=1, max_size=12).filter(lambda name: "." not in name and name != "b"))
def test_any_name_round_trips_through_its_repr(name: str) -> None:
    loss = SwitchingLoss({name: DiceLoss(), "b": BCELoss()}, milestones=[2])
    rebuilt = build_loss(repr(loss))
    assert rebuilt.names == [name, "b"]
    assert repr(rebuilt) == repr(loss)


def test_a_message_that_names_its_call_is_not_prefixed_twice():
    with pytest.raises(SpecError) as caught:
        build_loss("SwitchingLoss([dice, bce], trigger=plateau, milestones=[3])")
    message = str(caught.value)
    assert message.startswith("SwitchingLoss: pass either milestones or trigger, not both")
    assert "SwitchingLoss: SwitchingLoss" not in message


@pytest.mark.parametrize(("spec", "message"), [
    ("SwitchingLoss([dice])", "SwitchingLoss: needs at least two stages; got 1 (use the loss "
                              "itself, or a CompositeLoss, for one)"),
    ("SwitchingLoss([])", "SwitchingLoss: needs at least two stages; got 0"),
    ("CompositeLoss([])", "CompositeLoss: needs at least one loss"),
])
def test_too_few_losses_are_counted_right_and_named_once(spec, message):
    """``SwitchingLoss([dice])`` said "SwitchingLoss: SwitchingLoss needs..." through
    build_loss, and ``SwitchingLoss([])`` "needs at least one loss", where two are needed
    (found by a review of bad input)."""
    with pytest.raises(SpecError) as caught:
        build_loss(spec)
    assert caught.value.message.startswith(message), caught.value.message
    with pytest.raises(ValueError) as direct:
        eval(spec, {"SwitchingLoss": SwitchingLoss, "CompositeLoss": CompositeLoss,
                    "dice": DiceLoss()})
    assert str(direct.value).startswith(message)



def test_names_a_spec_knows_and_long_sums() -> None:
    """Aliases and limits no test reached: ``JaccardLoss`` and ``ramp`` are names, the last
    code point is a valid escape, and a call closes its bracket level (a sum of 70 calls was
    refused as nested 64 deep)."""
    assert repr(build_loss("JaccardLoss()")) == "IoULoss()"
    ramped = build_loss("dice + ramp(0, 10)*bce")
    assert repr(ramped) == ("CompositeLoss([DiceLoss(), BCELoss()], "
                            "weights=[1.0, LinearRamp(start=0, end=10)])")
    named = build_loss("SwitchingLoss({'\\U0010ffff': dice, 'b': bce}, milestones=[5])")
    assert named.names == ["\U0010ffff", "b"]
    long = build_loss("+".join(["dice()"] * 70))
    assert len(long.terms) == 70


@pytest.mark.parametrize("spec, at", [("dice->bce@30->focal@30", 20),
                                      ("dice->bce@plateau->focal@5->iou@5", 32)])
def test_milestones_out_of_order_point_at_the_later_one(spec: str, at: int) -> None:
    """The caret was at position 0, the start of the whole spec."""
    with pytest.raises(SpecError, match="milestones must be strictly increasing") as info:
        build_loss(spec)
    assert info.value.position == at


def test_repr_after_reassigning_an_argument_is_still_a_spec() -> None:
    """A reassigned argument was kept as given: ``smooth=np.float64(1.0)`` and a tuple of
    class weights made a repr that ``build_loss`` refused; ``k=1`` rebuilt as ``k=1.0``."""
    np = pytest.importorskip("numpy")
    dice = dynloss.DiceLoss()
    dice.smooth = np.float64(2.0)
    focal = dynloss.FocalLoss(mode="multiclass")
    focal.alpha = (1.0, 2.0, 3.0)
    tversky = dynloss.TverskyLoss()
    tversky.alpha = np.float32(0.25)
    topk = dynloss.TopKLoss()
    topk.k = 1
    for loss, expected in [(dice, "DiceLoss(smooth=2.0)"),
                           (focal, "FocalLoss(alpha=[1.0, 2.0, 3.0], mode='multiclass')"),
                           (tversky, "TverskyLoss(alpha=0.25)"), (topk, "TopKLoss(k=1.0)")]:
        assert repr(loss) == expected
        assert repr(build_loss(repr(loss))) == expected


def test_repr_writes_a_reassigned_number_as_the_argument_s_type() -> None:
    """An int reassigned to a float argument whose default is None read ``alpha=1`` where the
    loss rebuilt from that repr read ``alpha=1.0`` (equal losses, different text); multiclass
    weights alike."""
    binary = dynloss.FocalLoss()
    binary.alpha = 1
    multiclass = dynloss.FocalLoss(mode="multiclass")
    multiclass.alpha = [1, 2, 0]
    for loss, expected in [(binary, "FocalLoss(alpha=1.0)"),
                           (multiclass, "FocalLoss(alpha=[1.0, 2.0, 0.0], mode='multiclass')")]:
        assert repr(loss) == expected
        assert repr(build_loss(repr(loss))) == expected
        assert repr(eval(repr(loss), vars(dynloss))) == expected


def test_reassigning_an_argument_of_a_subclass_keeps_its_constructor_alone() -> None:
    """Reassigned arguments are not re-normalised by building a fresh loss (a subclass that
    sets an argument after ``super().__init__`` recursed, one with ``**kwargs`` failed, one that
    transforms an argument had it transformed again)."""
    class WeightedDice(dynloss.DiceLoss):
        def __init__(self, mode: str = "binary", weight: float = 1.0) -> None:
            super().__init__(mode)
            self.weight = weight

    class PercentTopK(dynloss.TopKLoss):
        def __init__(self, k: float = 10.0, *, mode: str = "binary") -> None:
            super().__init__(k=k / 100, mode=mode)

    weighted = WeightedDice(weight=2.0)
    weighted.weight = 3.0
    assert weighted.weight == 3.0
    percent = PercentTopK(k=60.0)
    percent.mode = "binary"
    percent.mode = "binary"
    assert percent.k == pytest.approx(0.6)


def test_repr_of_a_subclass_leaves_its_unchanged_tuple_default_out() -> None:
    class Sub(dynloss.DiceLoss):
        def __init__(self, mode: str = "binary", classes: tuple = (1, 2)) -> None:
            super().__init__(mode)
            self.classes = classes

    assert repr(Sub()) == "Sub()"
    assert repr(Sub(classes=(1, 3))) == "Sub(classes=[1, 3])"


def test_shared_marks_name_real_paths_and_stay_inside_their_own_repr() -> None:
    """The mark's path left out the attribute of a custom module on the way (not a path
    ``get_submodule`` finds), and a loss written by a custom module's repr, outside the tree,
    took the outer repr's marks. Found by a review of the fix."""
    from torch import nn

    class Wrap(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

    inner = SwitchingLoss([BCELoss(), FocalLoss()], milestones=[1])
    loss = SwitchingLoss({"wrap": Wrap(CompositeLoss([inner, DiceLoss()])),
                          "later": CompositeLoss([inner, DiceLoss()])}, milestones=[2])
    text = repr(loss)
    assert "shared('stages.wrap.inner.terms.switchingloss')" in text
    assert loss.get_submodule("stages.wrap.inner.terms.switchingloss") is inner

    other_inner = SwitchingLoss([BCELoss(), FocalLoss()], milestones=[1])
    other = SwitchingLoss([other_inner, CompositeLoss([other_inner, DiceLoss()])],
                          milestones=[3])

    class Note(nn.Module):
        def __repr__(self) -> str:
            return f"Note(see={other!r})"

    outer = SwitchingLoss([other_inner, Note()], milestones=[1])
    assert repr(outer) == (f"SwitchingLoss([{other_inner!r}, Note(see={other!r})], "
                           "milestones=[1])")
    assert "shared('stages.switchingloss')" in repr(other)
    _raises_spec_error("shared()", 0, "shared(...) marks a loss written before")


def test_repr_of_a_subclass_with_an_unresolvable_annotation_keeps_the_float_arguments() -> None:
    """One annotation naming a type only imported for type checkers made every argument's
    annotation unreadable, and ``alpha = 1`` read ``alpha=1`` again. Found by a review."""
    class TaggedFocal(FocalLoss):
        def __init__(self, gamma: float = 2.0, alpha: float | None = None,
                     tag: NotImportedHere | None = None) -> None:  # type: ignore[name-defined]  # noqa: F821
            super().__init__(gamma=gamma, alpha=alpha)
            self.tag = tag

    loss = TaggedFocal()
    loss.alpha = 1
    assert repr(loss) == "TaggedFocal(alpha=1.0)"


def test_repr_of_a_subclass_writes_each_argument_as_its_annotation_or_default_says() -> None:
    """A number reassigned to a subclass's own argument is written as the argument takes it:
    an ``int | float`` argument keeps an int (``scale=2``, not ``2.0``), an unannotated one
    with a float default takes a float (``gamma=3.0``, not ``3``)."""
    class ScaledFocal(FocalLoss):
        def __init__(self, scale: int | float = 1, gamma: float = 2.0) -> None:
            super().__init__(gamma=gamma)
            self.scale = scale

    class LooseFocal(FocalLoss):
        def __init__(self, gamma=2.0):  # type: ignore[no-untyped-def]
            super().__init__(gamma=gamma)

    scaled = ScaledFocal()
    scaled.scale = 2
    assert repr(scaled) == "ScaledFocal(scale=2)"
    loose = LooseFocal()
    loose.gamma = 3
    assert repr(loose) == "LooseFocal(gamma=3.0)"


def test_repr_of_deeply_nested_shared_losses_walks_each_module_once(monkeypatch) -> None:
    """Module paths were gathered over every path through shared subtrees: 18 levels of
    ``x = SwitchingLoss([x, CompositeLoss([x, dice])])`` took seconds, doubling per level.
    Counted here as the modules the repr walks (12 levels: 2**12 paths), not timed."""
    walked = []
    depth = [0]  # named_modules recurses through itself: count the outermost walks' items
    original = torch.nn.Module.named_modules

    def counting(self, *args, **kwargs):
        depth[0] += 1
        try:
            for item in original(self, *args, **kwargs):
                if depth[0] == 1:
                    walked.append(item)
                depth[0] -= 1
                yield item
                depth[0] += 1
        finally:
            depth[0] -= 1

    x: torch.nn.Module = DiceLoss()
    for _ in range(12):
        x = SwitchingLoss([x, CompositeLoss([x, DiceLoss()])], milestones=[1])
    unique = len({id(m) for m in x.modules()})
    monkeypatch.setattr(torch.nn.Module, "named_modules", counting)
    text = repr(x)
    assert len(walked) <= 2 * unique
    assert text.count("shared(") == 11  # every level but the first, whose dice is stateless


def test_build_loss_takes_the_names_of_custom_triggers_and_schedules() -> None:
    """A loss holding a custom ``Trigger`` or ``WeightSchedule`` (both documented extension
    points) printed a repr that ``build_loss`` refused ("unknown name"), with no way to teach
    it the name. ``names=`` does. Found by a review of the docs."""
    from dynloss.schedules import Trigger, WeightSchedule

    class Below(Trigger):
        needs_metric = True

        def __init__(self, threshold: float = 0.1) -> None:
            self.threshold = threshold

        def update(self, count: int, stage_count: int, metric: float | None) -> bool:
            return metric is not None and metric < self.threshold

    class Halving(WeightSchedule):
        def __init__(self, start: float = 1.0) -> None:
            super().__init__()
            self.start = start

        def value_at(self, step: int) -> float:
            return self.start / 2**step

    loss = CompositeLoss([SwitchingLoss([DiceLoss(), BCELoss()], trigger=Below(threshold=0.2)),
                          FocalLoss()], weights=[1.0, Halving(start=2.0)])
    text = repr(loss)
    with pytest.raises(SpecError, match=r"unknown name 'Below' \(known losses: .*\); a class "
                       r"of your own is named with build_loss\(spec, names=\{'Below': Below\}\)"):
        build_loss(text)
    with pytest.raises(SpecError, match=r"unknown name 'Dice'; did you mean 'dice' or "
                       r"'DiceLoss'\? \(known losses: [a-z_, ]*\) \(at position 0\)"):
        # a typo of a built-in name: no hint about classes of your own
        build_loss("Dice+bce")
    rebuilt = build_loss(text, names={"Below": Below, "Halving": Halving})
    assert repr(rebuilt) == text
    assert build_loss("dice->bce@below(threshold=0.5)", names={"below": Below}).triggers[0] \
        .threshold == 0.5
    with pytest.raises(ValueError, match="names: 'dice' is a built-in name"):
        build_loss("dice", names={"dice": Below})
    with pytest.raises(TypeError, match="names: 'x' must map to a class; got int"):
        build_loss("dice", names={"x": 3})
    with pytest.raises(ValueError, match="names: '1a' is not a name a spec can call"):
        build_loss("dice", names={"1a": Below})
    with pytest.raises(ValueError, match="names: 'é' is not a name a spec can call"):
        build_loss("dice", names={"é": Below})
    with pytest.raises(ValueError, match="names: 'shared' is a built-in name"):
        build_loss("dice", names={"shared": Below})


def test_the_repr_of_a_custom_trigger_without_arguments_or_a_stored_one() -> None:
    """A ``Trigger`` subclass with no ``__init__`` of its own (a trigger without arguments, as
    the schedules page describes one: ``update`` alone) made ``repr(loss)``, and so
    ``print(loss)``, raise AttributeError: 'AfterTwo' object has no attribute 'args' (the
    signature read was ``object.__init__``'s). Found by a review of the docs. An argument the
    subclass does not store under its own name is written as a mark ``build_loss`` refuses,
    where repr raised AttributeError too."""
    from dynloss.schedules import Trigger

    class AfterTwo(Trigger):
        def update(self, count: int, stage_count: int, metric: float | None) -> bool:
            return stage_count >= 2

    class Forgetful(Trigger):
        def __init__(self, after: int = 2) -> None:
            self.limit = after

        def update(self, count: int, stage_count: int, metric: float | None) -> bool:
            return stage_count >= self.limit

    loss = SwitchingLoss([DiceLoss(), BCELoss()], trigger=AfterTwo())
    assert [loss.step() for _ in range(3)] == [False, True, False]
    assert repr(loss) == str(loss) == "SwitchingLoss([DiceLoss(), BCELoss()], trigger=AfterTwo())"
    assert repr(build_loss(repr(loss), names={"AfterTwo": AfterTwo})) == repr(loss)
    forgetful = SwitchingLoss([DiceLoss(), BCELoss()], trigger=Forgetful(3))
    text = repr(forgetful)
    assert text == ("SwitchingLoss([DiceLoss(), BCELoss()], trigger=Forgetful(after=<not "
                    "stored as .after>))")
    with pytest.raises(SpecError, match=r"unexpected character '<' \(at position 63\)"):
        build_loss(text, names={"Forgetful": Forgetful})


def test_an_unknown_trigger_is_named_among_the_triggers():
    """A misspelt trigger after '@' listed the known *losses*."""
    with pytest.raises(SpecError, match=re.escape(
            "unknown trigger 'platoo'; did you mean 'plateau'? (after '@': an epoch, or one of "
            "milestone, plateau, relative_improvement) (at position 9)")):
        build_loss("iou->bce@platoo(patience=2)")


class _Wrapped(torch.nn.Module):
    """A user's wrapper that hands every argument on (``*args, **kwargs``)."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.inner = DiceLoss(*args, **kwargs)

    def forward(self, input, target):
        return self.inner(input, target)


def test_a_constructor_with_args_and_kwargs_takes_what_it_is_given():
    """A class of the user's taking ``*args, **kwargs`` was refused every argument ("unknown
    parameter 'smooth' for Wrapped; Wrapped takes args, kwargs")."""
    names = {"Wrapped": _Wrapped}
    loss = build_loss("Wrapped(smooth=0.5, per_image=True) + bce", names=names)
    assert loss.terms["_wrapped"].inner.smooth == 0.5
    assert loss.terms["_wrapped"].inner.per_image is True
    assert build_loss("Wrapped('multiclass', smooth=0.25)", names=names).inner.mode == "multiclass"
    # what the wrapped constructor refuses is still an error at its argument
    with pytest.raises(SpecError, match=r"unexpected keyword argument 'smoth'"):
        build_loss("Wrapped(smoth=0.5)", names=names)


def test_a_weight_of_zero_is_a_weight() -> None:
    """``0*bce`` keeps the term with weight 0 (a term logged in ``last_terms`` but not
    trained on); only a negative weight is refused."""
    from dynloss import CompositeLoss, build_loss

    loss = build_loss("dice + 0*bce")
    assert isinstance(loss, CompositeLoss) and loss.weights == [1.0, 0.0]
    with pytest.raises(ValueError, match="a weight must be >= 0"):
        build_loss("dice + -1*bce")
