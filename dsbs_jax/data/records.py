"""One teacher record from an input and the teacher's raw continuations.

The official archive (`dsbs_jax.data.official`) and the teacher stage (`dsbs_jax.teacher`) both
build their records here, so the same continuation gives the same record whichever path read it.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence

from dsbs_jax.data import parsing
from dsbs_jax.data.cache import Example, TeacherRecord
from dsbs_jax.metrics import evaluate_equation


def _equation_value(label: str) -> object:
    """Equations vote by value, so "(8-3)" and "(8 - 3)" agree; malformed ones by their text."""
    value = evaluate_equation(label)
    return label if value is None else round(value, 6)


# How labels are compared in the vote, by parser; exact text for the rest.
VOTE_KEYS: dict[parsing.Parser, Callable[[str], object]] = {parsing.parse_equation: _equation_value}


def majority_label(labels: Sequence[str], key: Callable[[str], object] = str) -> str:
    """The first label of the most frequent group (labels equal under `key`).

    A tie goes to the group seen first; '' when there are no labels.
    """
    groups = collections.Counter(key(label) for label in labels)
    if not groups:
        return ""
    best = max(groups, key=groups.__getitem__)
    return next(label for label in labels if key(label) == best)


def make_record(
    example: Example, outputs: Sequence[str], parser: parsing.Parser, teacher: str
) -> TeacherRecord:
    """The record of `example` from its teacher samples (at least one).

    The samples that parse give the rationales and vote on the label. When none does, the
    record keeps what the parser read from all of them (a hedge's first choice, the text of an
    answer without a label), flagged with the first sample's status: one sample thus gives
    exactly what the parser read from it.
    """
    if not outputs:
        raise ValueError(f"no teacher output for example {example.id!r}")
    parsed = [parser(output) for output in outputs]
    kept = [p for p in parsed if p.ok] or parsed
    return TeacherRecord(
        id=example.id,
        input=example.input,
        label=example.label,
        teacher_label=majority_label(
            [p.label for p in kept if p.label], VOTE_KEYS.get(parser, str)
        ),
        rationales=tuple(p.rationale for p in kept if p.rationale),
        teacher=teacher,
        parse_ok=kept[0].ok,
        parse_status=kept[0].status,
    )
