"""SeqIO metric functions for Distilling Step-by-Step evaluation.

Each metric has the form ``fn(targets, predictions) -> dict[str, float]`` that
``seqio.Task(metric_fns=[...])`` accepts. Label tasks (e.g. e-SNLI, ANLI, CQA)
are scored by normalised exact match; SVAMP is scored by evaluating the
predicted and reference equations, because a model may write an equivalent
equation with different spacing, number formatting or operand order.

Model output is untrusted text, so equations are evaluated with a small
hand-written tokenizer and recursive-descent parser rather than ``eval``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

_MAX_EQUATION_CHARS = 1000
_MAX_PAREN_DEPTH = 100
_EQUATION_REL_TOL = 1e-4
_EQUATION_ABS_TOL = 1e-4

# One token, with any leading whitespace: an unsigned decimal number
# ("84", "84.0", "84.", ".5") or a single operator / parenthesis character.
_TOKEN_RE = re.compile(r"\s*(?:(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)|(?P<op>[-+*/()]))")


def normalize_answer(text: str) -> str:
    """Canonicalise a free-text answer so cosmetic differences don't count as errors.

    Strips, lowercases, collapses internal whitespace and drops one trailing
    period, so "Wooded  area." and "wooded area" compare equal.
    """
    text = " ".join(text.lower().split())
    return text.removesuffix(".").rstrip()


def _num_examples(targets: Sequence[str], predictions: Sequence[str]) -> int:
    """Return the example count, rejecting inputs a percentage can't be computed on."""
    if len(targets) != len(predictions):
        raise ValueError(
            f"targets and predictions differ in length: {len(targets)} != {len(predictions)}"
        )
    if not targets:
        raise ValueError("no examples")
    return len(targets)


def accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Percentage (0..100) of predictions equal to their target after `normalize_answer`.

    Raises ValueError on empty or mismatched-length inputs, since either means
    the evaluation pipeline is broken and a silent 0% would hide it.
    """
    n = _num_examples(targets, predictions)
    correct = sum(
        normalize_answer(t) == normalize_answer(p)
        for t, p in zip(targets, predictions, strict=True)
    )
    return {"accuracy": 100.0 * correct / n}


class _MalformedError(Exception):
    """Raised inside the parser for any input `evaluate_equation` must reject."""


def _tokenize(text: str) -> list[float | str]:
    """Split an equation into numbers (as floats) and operator/parenthesis strings."""
    text = text.strip()
    tokens: list[float | str] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN_RE.match(text, pos)
        if match is None:
            raise _MalformedError(f"unexpected character at {pos}")
        number = match.group("num")
        tokens.append(_finite(float(number)) if number is not None else match.group("op"))
        pos = match.end()
    return tokens


def _finite(value: float) -> float:
    """Reject overflow (inf/nan) at every step, so later steps can't hide it (e.g. 1/inf)."""
    if not math.isfinite(value):
        raise _MalformedError("non-finite value")
    return value


class _Parser:
    """Recursive-descent parser that evaluates while parsing.

    Grammar (standard precedence, left-associative binary operators)::

        expr    := term (("+" | "-") term)*
        term    := unary (("*" | "/") unary)*
        unary   := ("+" | "-")* primary
        primary := NUMBER | "(" expr ")"

    Unary signs are consumed in a loop and only parentheses recurse, so the
    recursion depth is bounded by ``_MAX_PAREN_DEPTH``.
    """

    def __init__(self, tokens: list[float | str]) -> None:
        self._tokens = tokens
        self._pos = 0
        self._depth = 0

    def parse(self) -> float:
        value = self._expr()
        if self._pos != len(self._tokens):
            raise _MalformedError("trailing tokens")
        return value

    def _peek(self) -> float | str | None:
        return self._tokens[self._pos] if self._pos < len(self._tokens) else None

    def _expr(self) -> float:
        value = self._term()
        while (op := self._peek()) in ("+", "-"):
            self._pos += 1
            rhs = self._term()
            value = _finite(value + rhs if op == "+" else value - rhs)
        return value

    def _term(self) -> float:
        value = self._unary()
        while (op := self._peek()) in ("*", "/"):
            self._pos += 1
            rhs = self._unary()
            if op == "*":
                value = _finite(value * rhs)
            elif rhs == 0:
                raise _MalformedError("division by zero")
            else:
                value = _finite(value / rhs)
        return value

    def _unary(self) -> float:
        sign = 1.0
        while (op := self._peek()) in ("+", "-"):
            self._pos += 1
            if op == "-":
                sign = -sign
        return sign * self._primary()

    def _primary(self) -> float:
        token = self._peek()
        self._pos += 1
        if isinstance(token, float):
            return token
        if token != "(":
            raise _MalformedError("expected a number or '('")
        self._depth += 1
        if self._depth > _MAX_PAREN_DEPTH:
            raise _MalformedError("parentheses nested too deeply")
        value = self._expr()
        if self._peek() != ")":
            raise _MalformedError("expected ')'")
        self._pos += 1
        self._depth -= 1
        return value


def evaluate_equation(text: str) -> float | None:
    """Safely evaluate an arithmetic equation such as "( 10.0 - ( 6.0 + 3.0 ) )".

    Supports decimal numbers, unary +/-, binary + - * /, parentheses and any
    whitespace. Returns None for anything malformed (unknown characters,
    unbalanced parentheses, missing operands or operators, division by zero,
    non-finite results, more than 1000 characters or parentheses nested
    deeper than 100) so that untrusted model output can never raise.
    """
    if len(text) > _MAX_EQUATION_CHARS:
        return None
    try:
        return _Parser(_tokenize(text)).parse()
    except _MalformedError:
        return None


def equation_accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Percentage (0..100) of predicted equations whose value matches the target's.

    Comparing values rather than strings accepts equivalent equations written
    differently, e.g. "(10 - (3 + 6))" for "( 10.0 - ( 6.0 + 3.0 ) )". A row
    counts as wrong if either side fails to evaluate. Raises ValueError only
    on empty or mismatched-length inputs, like `accuracy`.
    """
    n = _num_examples(targets, predictions)
    correct = 0
    for target, prediction in zip(targets, predictions, strict=True):
        expected = evaluate_equation(target)
        actual = evaluate_equation(prediction)
        if (
            expected is not None
            and actual is not None
            and math.isclose(expected, actual, rel_tol=_EQUATION_REL_TOL, abs_tol=_EQUATION_ABS_TOL)
        ):
            correct += 1
    return {"equation_accuracy": 100.0 * correct / n}
