"""Stage 1: expressions and message templates run within bounds (issue 15). Each unbounded example
fails fast with an ExpressionError, which the engine turns into a failed check (with a deviation)
or, for a computed field, a refused submission."""

from __future__ import annotations

import time

import pytest

from flows.errors import SopInputError
from flows.sop.expressions import (
    ExpressionError,
    Scope,
    check_expression,
    evaluate_check,
    evaluate_value,
    render_message,
)
from flows.sop.inputs import compute_fields
from flows.sop.model import FieldSpec

EXPRESSIONS = {
    "percent-width": ("'%099999999d' % 1", "the width or precision 099999999 is above the limit 1000"),
    "nested-powers": ("((10**100)**100)**100", "333-bit ** 100 is above the limit of 4096 bits"),
    "power-product": ("(10**100)**40 * (10**100)**40 > 0", "above the limit of 4096 bits"),
    "lipsum": ("lipsum(n=100000)", "lipsum() gives at most 5 paragraphs"),
    "format-width": ("'{:>999999999}'.format(1)", "the width or precision 999999999 is above the limit 1000"),
    "format-nested": ("'{:{w}}'.format(1, w=999999999)", "nested '{...}' in a format spec is not allowed"),
    "format-filter": ("'%0999999d' | format(1)", "the filter 'format': the width or precision"),
    "center": ("'x'.center(999999999)", "center(999999999) is above the width limit 1000"),
    "indent": ("'x' | indent(999999999)", "the filter 'indent': a width or count above the limit 1000"),
    "range": ("range(100000) | list", "range() of 100000 numbers is above the limit of 10000"),
    "repeat": ("'x' * 1000000", "repeating a sequence 1000000 times is above the limit"),
    "repeat-list-of-text": ("['x' * 10000] * 100", "repeating a sequence 100 times is above the limit"),
    "replace": ("('x' * 1000).replace('', 'y' * 1000)", "replace() would give more than 100000 characters"),
    "join": ("range(10000) | join('x' * 100)", "the filter 'join' would give more than 100000 characters"),
    "translate": ("'a'.translate({97: 'b'})", "access to attribute 'translate' of 'str' object is unsafe"),
}
TEMPLATES = {
    "nested-loops": (
        "{% for a in range(1000) %}{% for b in range(1000) %}{% endfor %}{% endfor %}",
        "loops ran more than 10000 steps in one evaluation",
    ),
    "recursive-macro": (
        "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
        "calls are nested more than 20 deep",
    ),
    "recursive-loop": (
        "{% for i in range(100) recursive %}{{ loop(range(100)) }}{% endfor %}",
        "calls are nested more than 20 deep",
    ),
    "doubling-concat": (
        "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
        "'~' would give more than 100000 characters",
    ),
    "captured-output": (
        "{% set x %}{% for i in range(10000) %}{{ 'y' * 10000 }}{% endfor %}{% endset %}{{ x | length }}",
        "the output is longer than 100000 characters",
    ),
    "literal-output": (
        "{% for i in range(10000) %}" + "z" * 1000 + "{% endfor %}",
        "the output is longer than 100000 characters",
    ),
}


def _fails_fast(run, source: str, message: str) -> ExpressionError:
    started = time.perf_counter()
    with pytest.raises(ExpressionError) as info:
        run(source, {})
    elapsed = time.perf_counter() - started
    assert message in str(info.value)
    assert elapsed < 1.0, elapsed
    return info.value


@pytest.mark.parametrize("name", sorted(EXPRESSIONS))
def test_evaluate_value_refuses_unbounded_expression_fast(name: str) -> None:
    source, message = EXPRESSIONS[name]

    error = _fails_fast(evaluate_value, source, message)

    assert str(error).startswith(f"expression {source!r} failed: ")


@pytest.mark.parametrize("name", sorted(EXPRESSIONS))
def test_evaluate_check_refuses_unbounded_expression_as_a_failed_check(name: str) -> None:
    source, message = EXPRESSIONS[name]

    error = _fails_fast(evaluate_check, f"({source}) == 0", message)

    assert str(error).startswith("check ")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_render_message_refuses_unbounded_template_fast(name: str) -> None:
    source, message = TEMPLATES[name]

    error = _fails_fast(render_message, source, message)

    assert str(error).startswith("message ")


def test_compute_fields_refuses_unbounded_compute_as_a_refused_submission() -> None:
    fields = {"x": FieldSpec(type="number"), "y": FieldSpec(type="text", compute="'%099999999d' % s.x")}

    with pytest.raises(SopInputError) as info:
        compute_fields(fields, {"x": 1.0}, step_id="s", context={}, where="t step 's'")

    [problem] = info.value.problems
    assert problem.startswith("t step 's': y: could not be computed: compute ")
    assert "the width or precision 099999999 is above the limit 1000" in problem


@pytest.mark.parametrize(
    ("source", "value"),
    [
        ("'%.1f' % 37.25", "37.2"),
        ("'{:.2f} mg'.format(496)", "496.00 mg"),
        ("range(10) | map('string') | join(',')", "0,1,2,3,4,5,6,7,8,9"),
        ("[[2, 800] | min, 3] | max", 3),
        ("2 ** 100 > 10 ** 30", True),
        ("('ab' * 3).upper()", "ABABAB"),
    ],
)
def test_evaluate_value_keeps_ordinary_expressions_working(source: str, value: object) -> None:
    assert evaluate_value(source, {}) == value


def test_render_message_keeps_ordinary_templates_working() -> None:
    source = "Dose {{ params.coi }}: {% for g in grades %}{{ g }}{{ ', ' if not loop.last }}{% endfor %}"

    assert render_message(source, {"params": {"coi": "KT-1"}, "grades": [1, 3]}) == "Dose KT-1: 1, 3"


def test_check_expression_refuses_over_long_and_over_nested_source() -> None:
    scope = Scope({"a": frozenset({"x"})})

    assert check_expression("1 + " * 1500 + "1", scope) == ["the expression is 6001 characters long; the limit is 4000"]
    [problem] = check_expression("(" * 400 + "1" + ")" * 400, scope)
    assert problem.endswith("nested too deeply")


def test_sandbox_offers_no_random_filter() -> None:
    """A quality record must come out the same every time it is evaluated."""
    [problem] = check_expression("[1, 2] | random", Scope({}))

    assert "No filter named 'random'" in problem
