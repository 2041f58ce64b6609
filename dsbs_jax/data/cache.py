"""The canonical teacher cache: one JSON object a line, one file a split.

This is the single format every other part of the project reads. The official
archive is converted into it (`dsbs_jax.data.official`), the built-in synthetic
task writes it directly, and users can write it by hand for their own data:

    {"id": "q17", "input": "...", "label": "gold or empty", "teacher_label": "...",
     "rationales": ["...", ...], "teacher": "palm-540b", "parse_ok": true}

An optional "choices" list names the closed set the label is one of (closed-set scoring,
`dsbs_jax.scoring`); records without one leave it out.

A cache directory holds `<split>.jsonl` files (train, valid, test).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from dsbs_jax.errors import MissingFileError, UserError

SPLITS = ("train", "valid", "test")
# SeqIO and TFDS split names (what t5x's run files ask for) -> the cache file holding each.
TASK_SPLITS = {"train": "train", "validation": "valid", "test": "test"}
REQUIRED_FIELDS = ("id", "input", "label", "teacher_label", "rationales", "teacher", "parse_ok")


class CacheFormatError(UserError):
    """A cache file that does not follow the canonical format; the message names file and line."""


@dataclasses.dataclass(frozen=True)
class TeacherRecord:
    """One input with its gold label and what the teacher said about it.

    `rationales` holds every teacher sample kept for the input (often one);
    `parse_status` says why `parse_ok` is false ("ok" otherwise); `choices` is the closed
    set of labels to score, or empty.
    """

    id: str
    input: str
    label: str
    teacher_label: str
    rationales: tuple[str, ...]
    teacher: str
    parse_ok: bool
    parse_status: str = "ok"
    choices: tuple[str, ...] = ()

    def to_json(self) -> str:
        record = dataclasses.asdict(self)
        record["rationales"] = list(self.rationales)
        if self.choices:
            record["choices"] = list(self.choices)
        else:
            del record["choices"]
        return json.dumps(record, ensure_ascii=False)

    @classmethod
    def from_dict(cls, obj: dict, where: str = "record") -> TeacherRecord:
        """Validates one decoded JSON object; `where` prefixes the error message."""
        if not isinstance(obj, dict):
            raise CacheFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        missing = [f for f in REQUIRED_FIELDS if f not in obj]
        if missing:
            raise CacheFormatError(f"{where}: missing field(s) {', '.join(missing)}")
        rationales = obj["rationales"]
        if not isinstance(rationales, list) or not all(isinstance(r, str) for r in rationales):
            raise CacheFormatError(f"{where}: 'rationales' must be a list of strings")
        for name in ("id", "input", "label", "teacher_label", "teacher"):
            if not isinstance(obj[name], str):
                raise CacheFormatError(f"{where}: '{name}' must be a string")
        if not isinstance(obj["parse_ok"], bool):
            raise CacheFormatError(f"{where}: 'parse_ok' must be true or false")
        choices = _choices(obj, where)
        return cls(
            id=obj["id"],
            input=obj["input"],
            label=obj["label"],
            teacher_label=obj["teacher_label"],
            rationales=tuple(rationales),
            teacher=obj["teacher"],
            parse_ok=obj["parse_ok"],
            parse_status=str(obj.get("parse_status", "ok" if obj["parse_ok"] else "unknown")),
            choices=choices,
        )


def file_split(split: str) -> str:
    """The cache file split of a SeqIO split name: 'validation' is kept in valid.jsonl."""
    return TASK_SPLITS.get(split, split)


def _choices(obj: dict, where: str) -> tuple[str, ...]:
    """The optional 'choices' field: a list of strings (empty when absent)."""
    choices = obj.get("choices", [])
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise CacheFormatError(f"{where}: 'choices' must be a list of strings")
    return tuple(choices)


def split_path(cache_dir: str | os.PathLike, split: str) -> Path:
    """`<cache_dir>/<split>.jsonl`; takes the file's split name or its SeqIO name."""
    return Path(cache_dir) / f"{file_split(split)}.jsonl"


def iter_json_lines(
    path: str | os.PathLike, what: str = "teacher cache file"
) -> Iterator[tuple[str, Any]]:
    """Yields ("file:line", decoded object) for each non-blank line of a JSON-lines file.

    Undecodable JSON raises CacheFormatError naming file and line; a missing file
    raises FileNotFoundError naming `what` and the path.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no {what} at {path}")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CacheFormatError(f"{where}: not valid JSON ({e.msg})") from None
            yield where, obj


def iter_records(path: str | os.PathLike) -> Iterator[TeacherRecord]:
    """Yields the records of one cache file; bad input raises CacheFormatError naming file:line."""
    for where, obj in iter_json_lines(path):
        yield TeacherRecord.from_dict(obj, where)


@dataclasses.dataclass(frozen=True)
class Example:
    """One input to label or predict; `label` is the gold label, or empty; `choices` the
    closed set of labels to score, or empty."""

    id: str
    input: str
    label: str
    choices: tuple[str, ...] = ()


def read_examples(path: str | os.PathLike) -> list[Example]:
    """Reads {id, input, label?} JSON lines; a canonical cache file will do (the rest ignored)."""
    examples: list[Example] = []
    seen: set[str] = set()
    for where, obj in iter_json_lines(path, what="dataset file"):
        if not isinstance(obj, dict) or not isinstance(obj.get("input"), str):
            raise CacheFormatError(f"{where}: expected an object with a string 'input'")
        if not isinstance(obj.get("id"), str | int):
            raise CacheFormatError(f"{where}: expected a string 'id'")
        if not isinstance(obj.get("label", ""), str):
            raise CacheFormatError(f"{where}: 'label' must be a string")
        example = Example(str(obj["id"]), obj["input"], obj.get("label", ""), _choices(obj, where))
        if example.id in seen:
            raise CacheFormatError(f"{where}: duplicate id {example.id!r}")
        seen.add(example.id)
        examples.append(example)
    return examples


def read_records(path: str | os.PathLike) -> list[TeacherRecord]:
    records = list(iter_records(path))
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise CacheFormatError(f"{path}: duplicate id {r.id!r}")
        seen.add(r.id)
    return records


def write_records(path: str | os.PathLike, records: Iterable[TeacherRecord]) -> int:
    """Writes a cache file atomically (temp file + rename): a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(record.to_json() + "\n")
            count += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return count


def write_splits(
    cache_dir: str | os.PathLike, by_split: Mapping[str, Iterable[TeacherRecord]]
) -> dict[str, int]:
    """Writes `<cache_dir>/<split>.jsonl` for each split; returns the record counts."""
    return {
        split: write_records(split_path(cache_dir, split), rs) for split, rs in by_split.items()
    }


def available_splits(cache_dir: str | os.PathLike) -> list[str]:
    return [s for s in SPLITS if split_path(cache_dir, s).is_file()]
