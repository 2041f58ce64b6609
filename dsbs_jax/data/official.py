"""Read the official Distilling Step-by-Step archive into canonical teacher records.

Layout (as published with google-research/distilling-step-by-step):

    <root>/<name>/<name>_<split>.json       JSON lines, one example a line
    <root>/<name>/llm/<split>_CoT_<i>.json  JSON lists of raw teacher continuations,
                                            chunk i covering rows [i*chunk, (i+1)*chunk)

Inputs and gold labels are built exactly as the official code builds them, so a
student trained here sees the same text as one trained there.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from dsbs_jax.data import parsing
from dsbs_jax.data.cache import Example, TeacherRecord, iter_json_lines
from dsbs_jax.data.records import make_record
from dsbs_jax.errors import UserError

NLI_LABELS = {"0": "entailment", "1": "neutral", "2": "contradiction"}
# The official code joins premise and hypothesis with the T5 tokenizer's EOS text.
NLI_SEPARATOR = "</s>"
TEACHER = "palm-540b"


class OfficialDataError(UserError):
    """The official archive is missing or malformed; the message names the path."""


@dataclasses.dataclass(frozen=True)
class OfficialDataset:
    """How one dataset of the archive is turned into (id, input, gold label) and parsed."""

    name: str
    parser: parsing.Parser
    build_example: Callable[[dict, str], tuple[str, str, str]]
    metric: str  # "accuracy" or "equation_accuracy"


def _field(row: dict, key: str, where: str) -> object:
    if key not in row:
        raise OfficialDataError(f"{where}: missing field '{key}'")
    return row[key]


def _cqa_example(row: dict, where: str) -> tuple[str, str, str]:
    choices = _field(row, "choices", where)
    if not isinstance(choices, list) or len(choices) != 5:
        raise OfficialDataError(f"{where}: 'choices' must be a list of 5 strings")
    lettered = "\n".join(f"({letter}) {c}" for letter, c in zip("abcde", choices, strict=True))
    text = f"{_field(row, 'question', where)}\nAnswer Choices:\n{lettered}"
    return str(_field(row, "id", where)), text, str(_field(row, "answer", where))


def _svamp_example(row: dict, where: str) -> tuple[str, str, str]:
    return "", str(_field(row, "input", where)), str(_field(row, "label", where))


def _asdiv_example(row: dict, where: str) -> tuple[str, str, str]:
    text = f"{_field(row, 'Body', where)}\n{_field(row, 'Question', where)}"
    return "", text, str(_field(row, "Answer", where)).split(" ")[0]


def _nli_label(row: dict, where: str) -> str:
    label = str(_field(row, "label", where))
    if label not in NLI_LABELS:
        raise OfficialDataError(f"{where}: NLI label must be 0, 1 or 2, got {label!r}")
    return NLI_LABELS[label]


def _esnli_example(row: dict, where: str) -> tuple[str, str, str]:
    text = NLI_SEPARATOR.join([_field(row, "premise", where), _field(row, "hypothesis", where)])
    return "", text, _nli_label(row, where)


def _anli_example(row: dict, where: str) -> tuple[str, str, str]:
    _, text, label = _esnli_example(row, where)
    return str(_field(row, "uid", where)), text, label


DATASETS: dict[str, OfficialDataset] = {
    "cqa": OfficialDataset("cqa", parsing.parse_multiple_choice, _cqa_example, "accuracy"),
    "svamp": OfficialDataset("svamp", parsing.parse_equation, _svamp_example, "equation_accuracy"),
    "asdiv": OfficialDataset("asdiv", parsing.parse_equation, _asdiv_example, "equation_accuracy"),
    "esnli": OfficialDataset("esnli", parsing.parse_nli_answer_line, _esnli_example, "accuracy"),
    "anli1": OfficialDataset("anli1", parsing.parse_nli_so_the_answer, _anli_example, "accuracy"),
}
OFFICIAL_SPLITS = ("train", "valid", "test")


def get_dataset(name: str) -> OfficialDataset:
    if name not in DATASETS:
        raise OfficialDataError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def find_splits(root: str | Path, name: str) -> list[str]:
    """The splits of `name` present under `root`, in train/valid/test order."""
    folder = Path(root) / name
    if not folder.is_dir():
        raise OfficialDataError(f"no official data for {name!r}: {folder} is not a directory")
    splits = [s for s in OFFICIAL_SPLITS if (folder / f"{name}_{s}.json").is_file()]
    if not splits:
        raise OfficialDataError(f"no {name}_<split>.json file in {folder}")
    return splits


def _chunk_index(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[1])


def _read_teacher_outputs(folder: Path, split: str) -> list[str]:
    """Concatenates the CoT chunks of a split in chunk order (_CoT_2 before _CoT_10)."""
    chunks = sorted(folder.glob(f"{split}_CoT_*.json"), key=_chunk_index)
    if not chunks:
        raise OfficialDataError(f"no teacher outputs {folder}/{split}_CoT_<i>.json")
    outputs: list[str] = []
    for chunk in chunks:
        try:
            data = json.loads(chunk.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise OfficialDataError(f"{chunk}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list) or not all(isinstance(o, str) for o in data):
            raise OfficialDataError(f"{chunk}: expected a JSON list of strings")
        outputs.extend(data)
    return outputs


def read_split(root: str | Path, name: str, split: str) -> Iterator[TeacherRecord]:
    """Yields one canonical record per example of `<root>/<name>/<name>_<split>.json`."""
    dataset = get_dataset(name)
    folder = Path(root) / name
    path = folder / f"{name}_{split}.json"
    if not path.is_file():
        raise OfficialDataError(f"missing {path}")
    rows = [obj for _, obj in iter_json_lines(path, what="official split file")]
    outputs = _read_teacher_outputs(folder / "llm", split)
    if len(outputs) != len(rows):
        raise OfficialDataError(
            f"{folder}/llm/{split}_CoT_*.json: {len(outputs)} teacher outputs for "
            f"{len(rows)} examples in {path}"
        )
    for index, (row, output) in enumerate(zip(rows, outputs, strict=True)):
        where = f"{path}:{index + 1}"
        if not isinstance(row, dict):
            raise OfficialDataError(f"{where}: expected a JSON object")
        example_id, text, label = dataset.build_example(row, where)
        example = Example(example_id or f"{name}-{split}-{index:06d}", text, label)
        yield make_record(example, [output], dataset.parser, TEACHER)
