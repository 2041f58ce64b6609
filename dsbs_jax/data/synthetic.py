"""The built-in dataset: multi-step arithmetic word problems with a programmatic teacher.

It exists so the project runs end to end without downloading anything, and so a
tiny T5 trained from scratch on a CPU can show what the paper is about. Each
problem takes 2-3 arithmetic steps over small whole numbers; the label is only
the final number, while the teacher rationale states every intermediate step
with its arithmetic:

    input:      Mia has 3 boxes with 4 pens in each box. She gives away 5 pens.
                How many pens does Mia have now?
    rationale:  Mia has 3 * 4 = 12 pens. After giving away 5, she has 12 - 5 = 7 pens.
    label:      7

A label-only student has to find the intermediate values by itself; a student
that also learns to explain is told them. The text uses a few names, objects and
verbs in fixed sentence shapes, so a ~250-piece SentencePiece model covers it and
inputs stay short. Every number in the problem is at most `max_number`, and every
intermediate value and answer stays in 0..MAX_VALUE.

Like a real chain-of-thought teacher, this one is sometimes wrong: with
probability `teacher_error_rate` it slips (off by one or two) in one step and
carries the wrong value through the rest of the rationale into its label; the
gold `label` stays correct.

Generation is deterministic for a seed. The test split is drawn first, then
valid, then train, each from its own random stream, so the test problems do not
depend on `num_train`, and a smaller train split is a prefix of a larger one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from dsbs_jax.data import cache
from dsbs_jax.errors import UserError

MAX_VALUE = 99
DATASET_NAME = "synthetic"  # its cache is <teacher_cache_root>/synthetic/
TEACHER = "synthetic-cot"

# Stream tags keep the problem and teacher random streams independent of each other.
_PROBLEM_STREAM = 0
_TEACHER_STREAM = 1
_SLIPS = (-2, -1, 1, 2)

_NAMES = (
    ("Mia", "she", "her"),
    ("Ana", "she", "her"),
    ("Eva", "she", "her"),
    ("Lily", "she", "her"),
    ("Tom", "he", "him"),
    ("Ben", "he", "him"),
    ("Sam", "he", "him"),
    ("Max", "he", "him"),
)
_ITEMS = (
    ("pen", "pens"),
    ("apple", "apples"),
    ("card", "cards"),
    ("book", "books"),
    ("cookie", "cookies"),
    ("marble", "marbles"),
    ("shell", "shells"),
    ("sticker", "stickers"),
)
_CONTAINERS = (("box", "boxes"), ("bag", "bags"), ("jar", "jars"), ("pack", "packs"))
_COLORS = ("red", "blue", "green", "yellow")
_TAKE_VERBS = (("gives away", "giving away"), ("sells", "selling"), ("loses", "losing"))
_ADD_VERBS = (("buys", "buying"), ("finds", "finding"), ("gets", "getting"))
_TIMES_VERBS = {2: "doubles", 3: "triples"}

_T = TypeVar("_T")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and knobs of the synthetic task.

    `max_steps` is the most arithmetic steps a problem takes (at least 2);
    `max_number` the largest number the problem text states.
    """

    num_train: int = 4000
    num_valid: int = 200
    num_test: int = 500
    seed: int = 0
    teacher_error_rate: float = 0.05
    max_steps: int = 2
    max_number: int = 9

    def __post_init__(self) -> None:
        for name in ("num_train", "num_valid", "num_test", "seed"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be non-negative, got {getattr(self, name)}")
        if not 0.0 <= self.teacher_error_rate <= 1.0:
            raise UserError(f"teacher_error_rate must be in [0, 1], got {self.teacher_error_rate}")
        if self.max_steps < 2:
            raise UserError(f"max_steps must be at least 2, got {self.max_steps}")
        if not 2 <= self.max_number <= MAX_VALUE:
            raise UserError(f"max_number must be in [2, {MAX_VALUE}], got {self.max_number}")

    def count(self, split: str) -> int:
        """How many examples `split` gets."""
        return {"train": self.num_train, "valid": self.num_valid, "test": self.num_test}[split]


@dataclasses.dataclass(frozen=True)
class _Step:
    """One arithmetic step: `left op right`, where left is the previous step's result.

    `lead` starts the step's rationale sentence, which goes on "left op right = result <noun>.".
    """

    op: str
    right: int
    lead: str


@dataclasses.dataclass(frozen=True)
class _Problem:
    text: str
    first_left: int  # the left operand of the first step, stated in the text
    steps: tuple[_Step, ...]
    item: tuple[str, str]

    def values(self, slip_at: int = -1, slip: int = 0) -> list[int] | None:
        """Each step's result, with `slip` added to step `slip_at`'s; None if the chain breaks."""
        values = []
        left = self.first_left
        for i, step in enumerate(self.steps):
            result = _apply(step.op, left, step.right)
            if result is None:
                return None
            if i == slip_at:
                result += slip
            if not 0 <= result <= MAX_VALUE:
                return None
            values.append(result)
            left = result
        return values

    def rationale(self, values: Sequence[int]) -> str:
        lefts = [self.first_left, *values[:-1]]
        return " ".join(
            f"{step.lead}{left} {step.op} {step.right} = {value} {_noun(self.item, value)}."
            for step, left, value in zip(self.steps, lefts, values, strict=True)
        )


def _apply(op: str, left: int, right: int) -> int | None:
    """Exact whole-number arithmetic; None when a result would be negative or fractional."""
    if op == "+":
        return left + right
    if op == "-":
        return left - right if left >= right else None
    if op == "*":
        return left * right
    if op == "/":
        return left // right if left % right == 0 else None
    raise ValueError(f"unknown operator {op!r}")


def _noun(forms: tuple[str, str], n: int) -> str:
    return forms[0] if n == 1 else forms[1]


def _pick(rng: np.random.Generator, options: Sequence[_T]) -> _T:
    return options[int(rng.integers(len(options)))]


def _between(rng: np.random.Generator, low: int, high: int) -> int:
    return int(rng.integers(low, high + 1))


def _sample_problem(rng: np.random.Generator, config: SyntheticConfig) -> _Problem:
    """Draws one problem: an opening step, then follow-ups that keep every value in range."""
    name, pron, obj = _pick(rng, _NAMES)
    item = _pick(rng, _ITEMS)
    top = config.max_number
    opening = _pick(rng, ("groups", "colors", "gift"))
    if opening == "groups":
        container = _pick(rng, _CONTAINERS)
        a = _between(rng, 2, min(top, MAX_VALUE // 2))
        b = _between(rng, 2, min(top, MAX_VALUE // a))
        sentences = [f"{name} has {a} {container[1]} with {b} {item[1]} in each {container[0]}."]
        first = _Step("*", b, f"{name} has ")
    elif opening == "colors":
        first_color, second_color = (str(c) for c in rng.choice(_COLORS, size=2, replace=False))
        a = _between(rng, 1, min(top, MAX_VALUE - 1))
        b = _between(rng, 1, min(top, MAX_VALUE - a))
        sentences = [
            f"{name} has {a} {first_color} {_noun(item, a)}"
            f" and {b} {second_color} {_noun(item, b)}."
        ]
        first = _Step("+", b, f"{name} has ")
    else:
        friend = _pick(rng, [n for n in _NAMES if n[0] != name])[0]
        a = _between(rng, 1, min(top, MAX_VALUE - 1))
        b = _between(rng, 1, min(top, MAX_VALUE - a))
        sentences = [f"{name} has {a} {_noun(item, a)}.", f"{friend} gives {obj} {b} more."]
        first = _Step("+", b, f"{name} has ")

    steps = [first]
    value = a * b if first.op == "*" else a + b
    num_steps = _between(rng, 2, config.max_steps)
    question = f"How many {item[1]} does {name} have now?"
    cap = pron.capitalize()
    while len(steps) < num_steps:
        last = len(steps) == num_steps - 1
        # Each friend gets at least 2, so sharing never degenerates into "n / n = 1".
        divisors = [k for k in range(2, min(top, value // 2) + 1) if value % k == 0]
        kinds = [
            kind
            for kind, ok in (
                ("take", value >= 1),
                ("add", value < MAX_VALUE),
                ("times", 1 <= value <= MAX_VALUE // 2),
                ("share", last and bool(divisors)),
            )
            if ok
        ]
        kind = _pick(rng, kinds)
        if kind == "take":
            verb, gerund = _pick(rng, _TAKE_VERBS)
            k = _between(rng, 1, min(top, value))
            sentences.append(f"{cap} {verb} {k} {_noun(item, k)}.")
            step = _Step("-", k, f"After {gerund} {k}, {pron} has ")
        elif kind == "add":
            verb, gerund = _pick(rng, _ADD_VERBS)
            k = _between(rng, 1, min(top, MAX_VALUE - value))
            sentences.append(f"{cap} {verb} {k} more {_noun(item, k)}.")
            step = _Step("+", k, f"After {gerund} {k} more, {pron} has ")
        elif kind == "times":
            k = _pick(rng, [k for k in _TIMES_VERBS if k * value <= MAX_VALUE])
            verb = _TIMES_VERBS[k]
            sentences.append(f"Then the number of {item[1]} {pron} has {verb}.")
            step = _Step("*", k, f"After it {verb}, {pron} has ")
        else:
            k = _pick(rng, divisors)
            sentences.append(f"{cap} shares them equally among {k} friends.")
            step = _Step("/", k, "Each friend gets ")
            question = f"How many {item[1]} does each friend get?"
        steps.append(step)
        value = _apply(step.op, value, step.right)
    return _Problem(" ".join([*sentences, question]), a, tuple(steps), item)


def _teacher_values(
    problem: _Problem, gold: list[int], rng: np.random.Generator, error_rate: float
) -> list[int]:
    """The values the teacher writes down: correct, or with one slip that changes the answer.

    The slip goes to a random step whose wrong value still divides evenly downstream; the
    last step always has one, so a slip never silently vanishes.
    """
    if rng.random() >= error_rate:
        return gold
    for slip_at in rng.permutation(len(problem.steps)):
        for slip in rng.permutation(_SLIPS):
            values = problem.values(int(slip_at), int(slip))
            if values is not None and values[-1] != gold[-1]:
                return values
    raise AssertionError("unreachable: a slip in the last step always changes the answer")


def _generate_split(
    config: SyntheticConfig, split: str, seen: set[str]
) -> list[cache.TeacherRecord]:
    """Draws `config.count(split)` problems whose inputs are not in `seen` (which it extends)."""
    split_index = cache.SPLITS.index(split)
    rng = np.random.default_rng([config.seed, _PROBLEM_STREAM, split_index])
    wanted = config.count(split)
    max_draws = 100 * wanted + 1000
    records: list[cache.TeacherRecord] = []
    draws = 0
    while len(records) < wanted:
        if draws == max_draws:
            raise UserError(
                f"found only {len(records)} distinct {split} problems of {wanted} wanted;"
                " raise max_number or max_steps, or ask for fewer examples"
            )
        draws += 1
        problem = _sample_problem(rng, config)
        if problem.text in seen:
            continue
        seen.add(problem.text)
        index = len(records)
        teacher_rng = np.random.default_rng([config.seed, _TEACHER_STREAM, split_index, index])
        gold = problem.values()
        assert gold is not None
        values = _teacher_values(problem, gold, teacher_rng, config.teacher_error_rate)
        records.append(
            cache.TeacherRecord(
                id=f"synth-{split}-{index:06d}",
                input=problem.text,
                label=str(gold[-1]),
                teacher_label=str(values[-1]),
                rationales=(problem.rationale(values),),
                teacher=TEACHER,
                parse_ok=True,
            )
        )
    return records


def generate(config: SyntheticConfig | None = None) -> dict[str, list[cache.TeacherRecord]]:
    """All three splits, keyed "train"/"valid"/"test"; no input appears in two splits."""
    config = config or SyntheticConfig()
    seen: set[str] = set()
    by_split = {split: _generate_split(config, split, seen) for split in ("test", "valid", "train")}
    return {split: by_split[split] for split in cache.SPLITS}
