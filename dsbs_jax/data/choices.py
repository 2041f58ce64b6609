"""The closed set of answers an input's label is one of, for closed-set scoring.

An input's candidates are, first, the `choices` field of its canonical cache record (any
dataset may write one); otherwise its dataset's rule: CommonsenseQA lists its five answer
choices in the input itself, and the NLI datasets always have the same three labels.
A dataset with neither has no candidates and is evaluated by generation only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from dsbs_jax.data import cache, sources
from dsbs_jax.data.official import NLI_LABELS
from dsbs_jax.errors import UserError

# Input lines "(a) wooded area" after the "Answer Choices:" line (see official._cqa_example).
_LETTERED_CHOICE = re.compile(r"^\([a-z]\) (.*)$")
ANSWER_CHOICES_HEADER = "Answer Choices:"


def lettered_answer_choices(input_text: str) -> tuple[str, ...]:
    """The choices listed as "(a) ...", "(b) ..." after the input's "Answer Choices:" line."""
    _, header, listing = input_text.rpartition(ANSWER_CHOICES_HEADER)
    if not header:
        return ()
    matches = (_LETTERED_CHOICE.match(line.strip()) for line in listing.splitlines())
    return tuple(m.group(1) for m in matches if m)


def _nli_labels(input_text: str) -> tuple[str, ...]:
    del input_text
    return tuple(NLI_LABELS.values())


DATASET_CHOICES: dict[str, Callable[[str], tuple[str, ...]]] = {
    "cqa": lettered_answer_choices,
    "esnli": _nli_labels,
    "anli1": _nli_labels,
}


def candidates(dataset: str, input_text: str, cached: Sequence[str] = ()) -> tuple[str, ...]:
    """An input's candidate labels: its record's own `choices`, else its dataset's rule."""
    if cached:
        return tuple(cached)
    rule = DATASET_CHOICES.get(dataset)
    return rule(input_text) if rule else ()


def candidates_of(
    dataset: str, inputs: Iterable[tuple[str, str, Sequence[str]]]
) -> list[tuple[str, ...]]:
    """Candidates of (id, input text, record's choices) inputs; an input without any ends
    score mode with a ValueError naming it."""
    found = []
    for example_id, text, cached in inputs:
        labels = candidates(dataset, text, cached)
        if not labels:
            raise UserError(
                f"score mode: input {example_id!r} of {dataset} has no candidate labels; give "
                "it a 'choices' list, or use label_evaluation.modes=['generate']"
            )
        found.append(labels)
    return found


def cached_choices(dataset: str, split: str) -> dict[str, tuple[str, ...]]:
    """{record id: its `choices`} of a split's JSON-lines cache ({} when there is no file)."""
    dataset_dir = sources.teacher_cache_root() / dataset
    if not cache.split_path(dataset_dir, split).is_file():
        return {}
    return {r.id: r.choices for r in sources.load_split(dataset_dir, split) if r.choices}
