"""Tests for dsbs_jax.data.synthetic: determinism, split hygiene and the teacher's arithmetic."""

from __future__ import annotations

import itertools
import operator
import re

import pytest

from dsbs_jax.data import cache
from dsbs_jax.data.synthetic import MAX_VALUE, SyntheticConfig, generate

SMALL = SyntheticConfig(num_train=300, num_valid=50, num_test=100)
STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def steps_of(rationale: str) -> list[tuple[int, str, int, int]]:
    return [(int(a), op, int(b), int(c)) for a, op, b, c in STEP.findall(rationale)]


def all_records(data: dict[str, list[cache.TeacherRecord]]) -> list[cache.TeacherRecord]:
    return [r for split in cache.SPLITS for r in data[split]]


def test_same_seed_same_data_other_seed_other_data() -> None:
    first = generate(SMALL)
    assert first == generate(SMALL)
    other = generate(SyntheticConfig(num_train=300, num_valid=50, num_test=100, seed=1))
    assert [r.input for r in other["train"]] != [r.input for r in first["train"]]


def test_counts_ids_and_fields() -> None:
    data = generate(SMALL)
    assert list(data) == list(cache.SPLITS)
    assert {s: len(rs) for s, rs in data.items()} == {"train": 300, "valid": 50, "test": 100}
    records = all_records(data)
    assert len({r.id for r in records}) == len(records)
    for split in cache.SPLITS:
        assert [r.id for r in data[split]] == [
            f"synth-{split}-{i:06d}" for i in range(len(data[split]))
        ]
    for r in records:
        assert r.teacher == "synthetic-cot"
        assert r.parse_ok and r.parse_status == "ok"
        assert len(r.rationales) == 1
        assert "so the answer is" not in r.rationales[0].lower()
        assert 0 <= int(r.label) <= MAX_VALUE
        assert len(r.input.split()) < 45


def test_inputs_are_unique_and_test_never_leaks_into_train() -> None:
    # Numbers up to 2 leave few distinct problems, so drawing this many repeats some.
    data = generate(
        SyntheticConfig(num_train=1000, num_valid=100, num_test=200, max_number=2, max_steps=2)
    )
    inputs = [r.input for r in all_records(data)]
    assert len(set(inputs)) == len(inputs)
    assert not {r.input for r in data["test"]} & {r.input for r in data["train"]}


def test_test_split_does_not_depend_on_train_size() -> None:
    small = generate(SyntheticConfig(num_train=100, num_valid=50, num_test=100))
    large = generate(SMALL)
    assert small["test"] == large["test"]
    assert small["valid"] == large["valid"]
    assert large["train"][:100] == small["train"]


def test_error_free_teacher_is_right_and_its_arithmetic_checks_out() -> None:
    config = SyntheticConfig(num_train=300, num_valid=50, num_test=100, teacher_error_rate=0.0)
    for r in all_records(generate(config)):
        steps = steps_of(r.rationales[0])
        assert 2 <= len(steps) <= config.max_steps, r.rationales[0]
        for a, op, b, c in steps:
            assert OPS[op](a, b) == c, r.rationales[0]
        for (*_, previous), (left, *_) in itertools.pairwise(steps):
            assert left == previous, r.rationales[0]
        assert r.teacher_label == r.label == str(steps[-1][3])


def test_teacher_error_rate_and_slips_are_consistent() -> None:
    config = SyntheticConfig(
        num_train=1000, num_valid=0, num_test=0, teacher_error_rate=0.3, max_steps=3
    )
    records = generate(config)["train"]
    correct = sum(r.teacher_label == r.label for r in records)
    assert 0.62 <= correct / len(records) <= 0.78
    slipped_at = set()
    for r in records:
        steps = steps_of(r.rationales[0])
        wrong_steps = [i for i, s in enumerate(steps) if OPS[s[1]](s[0], s[2]) != s[3]]
        assert len(wrong_steps) == (0 if r.teacher_label == r.label else 1), r.rationales[0]
        slipped_at.update(wrong_steps)
        assert r.teacher_label == str(steps[-1][3])
        for (*_, previous), (left, *_) in itertools.pairwise(steps):
            assert left == previous, r.rationales[0]
        # The gold label is what the same steps give with correct arithmetic.
        value = steps[0][0]
        for _, op, b, _ in steps:
            value = OPS[op](value, b)
        assert r.label == str(int(value))
    assert slipped_at == {0, 1, 2}  # a slip early on is carried through the later steps


def test_teacher_errors_do_not_change_the_problems() -> None:
    sizes = {"num_train": 300, "num_valid": 50, "num_test": 100}
    exact = all_records(generate(SyntheticConfig(**sizes, teacher_error_rate=0.0)))
    some = all_records(generate(SyntheticConfig(**sizes, teacher_error_rate=0.1)))
    more = all_records(generate(SyntheticConfig(**sizes, teacher_error_rate=0.3)))
    assert [(r.id, r.input, r.label) for r in exact] == [(r.id, r.input, r.label) for r in more]
    assert [(r.id, r.input, r.label) for r in some] == [(r.id, r.input, r.label) for r in more]
    # A higher rate adds slips without moving the ones a lower rate already made.
    assert {r.id for r in some if r.teacher_label != r.label} < {
        r.id for r in more if r.teacher_label != r.label
    }


def test_max_steps_two_gives_two_step_problems() -> None:
    config = SyntheticConfig(num_train=100, num_valid=0, num_test=0, max_steps=2)
    assert {len(steps_of(r.rationales[0])) for r in generate(config)["train"]} == {2}


def test_write_synthetic_round_trips(tmp_path) -> None:
    counts = cache.write_splits(tmp_path, generate(SMALL))
    assert counts == {"train": 300, "valid": 50, "test": 100}
    data = generate(SMALL)
    for split in cache.SPLITS:
        assert cache.read_records(cache.split_path(tmp_path, split)) == data[split]


@pytest.mark.parametrize(
    "kwargs",
    [{"num_train": -1}, {"teacher_error_rate": 1.5}, {"max_steps": 1}, {"max_number": 1}],
)
def test_bad_config_is_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SyntheticConfig(**kwargs)
