"""Tests for dsbs_jax.metrics: answer normalisation, accuracy and the safe equation evaluator."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsbs_jax.metrics import accuracy, equation_accuracy, evaluate_equation, normalize_answer

# --- normalize_answer / accuracy ------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Wooded area.", "wooded area"),
        ("  wooded \t\n AREA  ", "wooded area"),
        ("wooded area .", "wooded area"),
        ("yes..", "yes."),  # only one trailing period is dropped
        ("", ""),
        (".", ""),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_accuracy_uses_normalisation() -> None:
    targets = ["wooded area", "neutral", "yes", "no"]
    predictions = ["Wooded  area.", "NEUTRAL", "no", "no"]
    assert accuracy(targets, predictions) == {"accuracy": 75.0}


def test_accuracy_all_and_none_correct() -> None:
    assert accuracy(["a", "b"], ["A", "b."]) == {"accuracy": 100.0}
    assert accuracy(["a", "b"], ["b", "a"]) == {"accuracy": 0.0}


@pytest.mark.parametrize("metric", [accuracy, equation_accuracy])
def test_metrics_reject_mismatched_lengths(metric) -> None:
    with pytest.raises(ValueError, match="length"):
        metric(["1", "2"], ["1"])


@pytest.mark.parametrize("metric", [accuracy, equation_accuracy])
def test_metrics_reject_empty_inputs(metric) -> None:
    with pytest.raises(ValueError, match="no examples"):
        metric([], [])


# --- evaluate_equation: valid input ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2 + 3 * 4", 14.0),  # * binds tighter than +
        ("(2 + 3) * 4", 20.0),
        ("2 * 3 + 4", 10.0),
        ("8 - 2 - 1", 5.0),  # left associativity
        ("8 / 2 / 2", 2.0),
        ("8 / 2 * 2", 8.0),
        ("2 * -3", -6.0),
        ("-(2+3)", -5.0),
        ("--3", 3.0),
        ("-+-3", 3.0),
        ("2 - -3", 5.0),
        ("+4", 4.0),
        ("-2 * 3 + 1", -5.0),
        ("84.0", 84.0),
        (".5 + .25", 0.75),
        ("7.", 7.0),
        ("1 / 4", 0.25),
        ("((((7))))", 7.0),
        ("( 10.0 - ( 6.0 + 3.0 ) )", 1.0),
        ("(10 - (3 + 6))", 1.0),
        ("  \t3\n*\n( 1+1 )  ", 6.0),
        ("0 / 5", 0.0),
        ("1 - 0.5", 0.5),
    ],
)
def test_evaluate_equation_values(text: str, expected: float) -> None:
    assert evaluate_equation(text) == expected


def test_evaluate_equation_allows_100_nested_parentheses() -> None:
    assert evaluate_equation("(" * 100 + "1" + ")" * 100) == 1.0


# --- evaluate_equation: malformed input -----------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "2 3",
        "1.2.3",
        "(1+2",
        "1+2)",
        ")(",
        "()",
        "1+",
        "1 *",
        "* 2",
        "1 */ 2",
        "abc",
        "2x",
        "1e5",
        ".",
        "__import__('os')",
        "1 ** 2",
        "1 / 0",
        "1 / (2 - 2)",
        "5 / 0.0",
        "9" * 400,  # float overflow -> inf
        "1" + "0" * 307 + " / 0.001",  # 1e307 / 1e-3 overflows to inf
        "1 / (" + "9" * 200 + " * " + "9" * 200 + ")",  # inf intermediate hidden by 1/inf
        "١",  # Arabic-Indic digit: not an ASCII number
        "(" * 101 + "1" + ")" * 101,  # nested deeper than 100
        "1" + " + 1" * 500,  # longer than 1000 characters
    ],
)
def test_evaluate_equation_rejects_malformed(text: str) -> None:
    assert evaluate_equation(text) is None


def test_evaluate_equation_deep_nesting_does_not_recurse() -> None:
    # Would blow Python's recursion limit in a naive recursive-descent parser.
    assert evaluate_equation("(" * 5000 + "1" + ")" * 5000) is None
    assert evaluate_equation("(" * 400 + "1" + ")" * 400) is None  # under the length limit
    assert evaluate_equation("-" * 999 + "1") == -1.0  # unary chains are iterative


# --- equation_accuracy ----------------------------------------------------------------------


def test_equation_accuracy_svamp_style_equivalence() -> None:
    targets = ["( 10.0 - ( 6.0 + 3.0 ) )"]
    assert equation_accuracy(targets, ["(10 - (3 + 6))"]) == {"equation_accuracy": 100.0}


def test_equation_accuracy_counts_malformed_rows_as_wrong() -> None:
    targets = ["( 3.0 * 4.0 )", "( 1.0 / 3.0 )", "( 5.0 + 5.0 )", "not an equation", "2 + 2"]
    predictions = ["4 * 3", "0.33333", "(5 + 5", "not an equation", "5"]
    # Row 1 right; row 2 within 1e-4 tolerance; row 3 malformed prediction;
    # row 4 malformed target (never a match, even to itself); row 5 wrong value.
    assert equation_accuracy(targets, predictions) == {"equation_accuracy": 40.0}


def test_equation_accuracy_tolerance_boundary() -> None:
    assert equation_accuracy(["1"], ["1.00005"]) == {"equation_accuracy": 100.0}
    assert equation_accuracy(["1"], ["1.001"]) == {"equation_accuracy": 0.0}
    # Relative tolerance applies to large values.
    assert equation_accuracy(["100000"], ["100005"]) == {"equation_accuracy": 100.0}
    assert equation_accuracy(["100000"], ["100020"]) == {"equation_accuracy": 0.0}


# --- property tests -------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_evaluate_equation_never_raises_on_arbitrary_text(text: str) -> None:
    result = evaluate_equation(text)
    assert result is None or math.isfinite(result)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789.+-*/() ", max_size=200))
def test_evaluate_equation_never_raises_on_arithmetic_alphabet(text: str) -> None:
    result = evaluate_equation(text)
    assert result is None or math.isfinite(result)


@dataclass(frozen=True)
class _Expr:
    """A generated expression: its text, its value (None after a division by zero), its level."""

    text: str
    value: float | None
    level: int  # 0: sum/difference, 1: product/quotient, 2: unary or atom


_LEVEL = {"+": 0, "-": 0, "*": 1, "/": 1}
_SPACES = st.sampled_from(["", " ", "  "])


def _apply(op: str, a: float | None, b: float | None) -> float | None:
    if a is None or b is None or (op == "/" and b == 0):
        return None
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a / b


def _wrap(expr: _Expr, needed: bool) -> str:
    return f"({expr.text})" if needed else expr.text


def _binary(left: _Expr, op: str, right: _Expr, space: str, extra_parens: bool) -> _Expr:
    # Parenthesise only where precedence/left-associativity demand it (so the parser's
    # precedence rules are exercised), plus optionally redundant parentheses.
    level = _LEVEL[op]
    text = (
        f"{_wrap(left, left.level < level or extra_parens)}{space}{op}{space}"
        f"{_wrap(right, right.level <= level or extra_parens)}"
    )
    return _Expr(text, _apply(op, left.value, right.value), level)


def _negate(operand: _Expr) -> _Expr:
    value = None if operand.value is None else -operand.value
    return _Expr("-" + _wrap(operand, operand.level < 2), value, 2)


_ATOMS = st.integers(min_value=0, max_value=20).map(lambda n: _Expr(str(n), float(n), 2))
_EXPRESSIONS = st.recursive(
    _ATOMS,
    lambda children: st.one_of(
        st.builds(_binary, children, st.sampled_from("+-*/"), children, _SPACES, st.booleans()),
        st.builds(_negate, children),
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_EXPRESSIONS)
def test_evaluate_equation_matches_python_arithmetic(expr: _Expr) -> None:
    assert evaluate_equation(expr.text) == expr.value
