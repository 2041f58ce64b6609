"""Teacher-output parsers: hand-checked real rows, failure counts, and fuzzing."""

from __future__ import annotations

import collections

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsbs_jax.data import official, parsing
from tests.conftest import OFFICIAL_DATA, needs_official_data

ALL_PARSERS = [
    parsing.parse_multiple_choice,
    parsing.parse_equation,
    parsing.parse_nli_answer_line,
    parsing.parse_nli_so_the_answer,
]


def test_multiple_choice_cuts_next_exemplar():
    out = (
        "Beavers need wood. So the answer is (c) wooded area.\n\nQ: Where?\nAnswer Choices:\n(a) x"
    )
    parsed = parsing.parse_multiple_choice(out)
    assert parsed == parsing.ParsedOutput("Beavers need wood.", "wooded area", parsing.OK)


def test_multiple_choice_hedge_is_flagged_with_first_choice():
    parsed = parsing.parse_multiple_choice("Both fit. So the answer is (c) club or (d) gym.")
    assert (parsed.label, parsed.status) == ("club", parsing.MULTIPLE_ANSWERS)
    assert not parsed.ok


def test_multiple_choice_without_choice_letter():
    parsed = parsing.parse_multiple_choice("Many hold shirts. So the answer is one of these four.")
    assert (parsed.label, parsed.status) == ("", parsing.NO_LABEL)


def test_equation_keeps_nested_parentheses():
    parsed = parsing.parse_equation(
        "He got 10 - (3 + 6) = 1. The answer is (10 - (3 + 6)).\n\nQ: x"
    )
    assert (parsed.rationale, parsed.label) == ("He got 10 - (3 + 6) = 1.", "(10 - (3 + 6))")


def test_equation_cut_short_has_no_label():
    parsed = parsing.parse_equation("So 1181 * 275. The answer is ((491 - 21")
    assert parsed.status == parsing.NO_LABEL


def test_nli_answer_line_and_unknown_class():
    assert parsing.parse_nli_answer_line("Not said.\nAnswer: neutral\n\nPremise: x").label == (
        "neutral"
    )
    assert parsing.parse_nli_answer_line("Hm.\nAnswer: maybe").status == parsing.NO_LABEL


def test_nli_so_the_answer_ignores_marker_case():
    parsed = parsing.parse_nli_so_the_answer("October is month ten, so the answer is entailment.")
    assert (parsed.label, parsed.status) == ("entailment", parsing.OK)


def test_missing_marker_keeps_text_as_rationale():
    parsed = parsing.parse_nli_so_the_answer("The men stand by a boat.\n")
    assert parsed == parsing.ParsedOutput("The men stand by a boat.", "", parsing.NO_ANSWER_MARKER)


@pytest.mark.parametrize("parser", ALL_PARSERS, ids=lambda p: p.__name__)
@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_parsers_never_raise_on_random_text(parser, text):
    parsed = parser(text)
    assert isinstance(parsed.label, str) and isinstance(parsed.rationale, str)
    assert parsed.ok == (parsed.status == parsing.OK)
    if parsed.ok:
        assert parsed.label and parsed.rationale


MARKER_SOUP = st.lists(
    st.sampled_from(
        [
            "So the answer is",
            "The answer is",
            "Answer:",
            "Q:",
            "Premise:",
            "(a)",
            "(",
            ")",
            "\n",
            " ",
            "neutral",
            "entailment",
            ".",
            "12",
            "+",
            "wooded area",
        ]
    ),
    max_size=30,
).map("".join)


@pytest.mark.parametrize("parser", ALL_PARSERS, ids=lambda p: p.__name__)
@settings(max_examples=300, deadline=None)
@given(text=MARKER_SOUP)
def test_parsers_never_raise_on_marker_soup(parser, text):
    parser(text)


# Hand-checked rows of the official archive: (dataset, split, row, teacher label, status).
HAND_CHECKED = [
    ("cqa", "test", 0, "wooded area", parsing.OK),
    ("cqa", "test", 35, "country club", parsing.MULTIPLE_ANSWERS),
    ("svamp", "test", 0, "(10 * 45)", parsing.OK),
    ("svamp", "test", 1, "(10 - (3 + 6))", parsing.OK),
    ("svamp", "test", 2, "(2)", parsing.OK),
    ("svamp", "train", 65, "", parsing.NO_ANSWER_MARKER),
    ("svamp", "train", 174, "", parsing.NO_LABEL),
    ("esnli", "test", 0, "neutral", parsing.OK),
    ("anli1", "test", 0, "contradiction", parsing.OK),
    ("anli1", "valid", 100, "entailment", parsing.OK),
]


@needs_official_data
@pytest.mark.parametrize("name,split,row,label,status", HAND_CHECKED)
def test_hand_checked_rows(name, split, row, label, status):
    record = list(official.read_split(OFFICIAL_DATA, name, split))[row]
    assert (record.teacher_label, record.parse_status) == (label, status)


@needs_official_data
def test_hand_checked_inputs_and_rationales():
    cqa = next(official.read_split(OFFICIAL_DATA, "cqa", "test"))
    assert cqa.input == (
        "A beaver is know for building prowess, their supplies come from where?\n"
        "Answer Choices:\n(a) british columbia\n(b) body of water\n(c) wooded area\n"
        "(d) pay debts\n(e) zoo"
    )
    assert cqa.rationales == (
        "The answer must be the place where beavers get their supplies. Of the above "
        "choices, only wooded areas have the supplies that beavers need.",
    )
    esnli = next(official.read_split(OFFICIAL_DATA, "esnli", "test"))
    assert esnli.input == (
        "This church choir sings to the masses as they sing joyous songs from the book at a "
        "church.</s>The church has cracks in the ceiling."
    )
    assert (esnli.label, esnli.rationales) == (
        "neutral",
        (
            "The church choir singing to the masses does not necessarily mean that the church "
            "has cracks in the ceiling.",
        ),
    )


# Unparseable outputs per raw split of the official archive, by status.
EXPECTED_FAILURES = {
    ("cqa", "train"): {"multiple_answers": 284, "no_label": 3},
    ("cqa", "test"): {"multiple_answers": 25},
    ("svamp", "train"): {"no_answer_marker": 11, "no_label": 2},
    ("svamp", "test"): {"no_answer_marker": 2},
    ("esnli", "valid"): {"no_answer_marker": 1},
    ("esnli", "test"): {},
    ("anli1", "valid"): {},
    ("anli1", "test"): {},
}


@needs_official_data
@pytest.mark.parametrize("name,split", sorted(EXPECTED_FAILURES))
def test_unparseable_counts(name, split):
    records = list(official.read_split(OFFICIAL_DATA, name, split))
    failures = collections.Counter(r.parse_status for r in records if not r.parse_ok)
    assert dict(failures) == EXPECTED_FAILURES[(name, split)]
