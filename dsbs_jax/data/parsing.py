"""Parse raw teacher continuations into (rationale, teacher label).

A few-shot chain-of-thought teacher does not stop after its answer: the
continuation runs on into the next exemplar it imagines ("Q: ...",
"Premise: ..."). Each parser cuts that off, splits at the dataset's answer
marker and extracts the label. Parsers never raise: an output they cannot read
comes back with `ok=False` and a status that says why, so it can be counted.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

NLI_CLASSES = ("entailment", "neutral", "contradiction")

OK = "ok"
NO_ANSWER_MARKER = "no_answer_marker"
NO_LABEL = "no_label"
MULTIPLE_ANSWERS = "multiple_answers"
EMPTY_RATIONALE = "empty_rationale"


@dataclasses.dataclass(frozen=True)
class ParsedOutput:
    rationale: str
    label: str
    status: str

    @property
    def ok(self) -> bool:
        return self.status == OK


def _cut_run_on(text: str, next_exemplar: str) -> str:
    """Drops everything from the first line that starts the next few-shot exemplar."""
    match = re.search(rf"(?:^|\n)\s*{next_exemplar}", text)
    return text[: match.start()] if match else text


def _split_at_marker(text: str, marker: str) -> tuple[str, str] | None:
    """Splits at the first answer marker, ignoring case; None when there is none."""
    match = re.search(re.escape(marker), text, flags=re.IGNORECASE)
    if match is None:
        return None
    return text[: match.start()].strip(), text[match.end() :].strip()


def _result(rationale: str, label: str) -> ParsedOutput:
    if not label:
        return ParsedOutput(rationale, "", NO_LABEL)
    if not rationale:
        return ParsedOutput("", label, EMPTY_RATIONALE)
    return ParsedOutput(rationale, label, OK)


def _parse(
    output: str,
    next_exemplar: str,
    marker: str,
    read_answer: Callable[[str, str], ParsedOutput],
) -> ParsedOutput:
    """Cuts the run-on exemplar, splits at the answer marker, and reads (rationale, answer)."""
    split = _split_at_marker(_cut_run_on(output, next_exemplar), marker)
    if split is None:
        return ParsedOutput(output.strip(), "", NO_ANSWER_MARKER)
    return read_answer(*split)


def _multiple_choice_answer(rationale: str, answer: str) -> ParsedOutput:
    choices = re.split(r"\([a-eA-E]\)", answer.split("\n")[0])[1:]
    if not choices:
        return ParsedOutput(rationale, "", NO_LABEL)
    label = choices[0].strip().removesuffix(".").strip()
    if len(choices) > 1:
        # A hedge such as "(c) club or (d) gym": keep the first choice, but flag it.
        label = re.sub(r"(,|\s+or|\s+and)$", "", label).strip()
        return ParsedOutput(rationale, label, MULTIPLE_ANSWERS)
    return _result(rationale, label)


def _equation_answer(rationale: str, answer: str) -> ParsedOutput:
    match = re.search(r"\(.*\)", answer.split("\n")[0])
    return _result(rationale, match.group(0) if match else "")


def _nli_label(answer: str) -> str:
    match = re.match(r"\W*([a-zA-Z]+)", answer)
    word = match.group(1).lower() if match else ""
    return word if word in NLI_CLASSES else ""


def _nli_answer(rationale: str, answer: str) -> ParsedOutput:
    return _result(rationale, _nli_label(answer))


def parse_multiple_choice(output: str) -> ParsedOutput:
    """CommonsenseQA: '<rationale> So the answer is (d) math problem.' -> label 'math problem'."""
    return _parse(output, "Q:", "So the answer is", _multiple_choice_answer)


def parse_equation(output: str) -> ParsedOutput:
    """SVAMP / ASDiv: '<rationale> The answer is (84 / 2).' -> label '(84 / 2)'."""
    return _parse(output, "Q:", "The answer is", _equation_answer)


def parse_nli_answer_line(output: str) -> ParsedOutput:
    """e-SNLI: '<rationale>\\nAnswer: neutral' -> label 'neutral'."""
    return _parse(output, "Premise:", "Answer:", _nli_answer)


def parse_nli_so_the_answer(output: str) -> ParsedOutput:
    """ANLI: '<rationale> So the answer is contradiction.' -> label 'contradiction'."""
    return _parse(output, "Premise:", "So the answer is", _nli_answer)


Parser = Callable[[str], ParsedOutput]
