"""The canonical cache format, the validation split and training-set subsampling."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dsbs_jax.data import cache, splits
from dsbs_jax.data.sources import kept_training_indices


def _record(i: int, **overrides) -> cache.TeacherRecord:
    fields = dict(
        id=f"ex-{i}",
        input=f"Frage {i}: wie viele Äpfel? 🍎",
        label=str(i),
        teacher_label=str(i + (i % 3 == 0)),
        rationales=(f"first {i}", f"second\nline {i}"),
        teacher="palm",
        parse_ok=i % 4 != 0,
        parse_status="ok" if i % 4 else "no_label",
    )
    fields.update(overrides)
    return cache.TeacherRecord(**fields)


def test_round_trip_is_exact(tmp_path):
    records = [_record(i) for i in range(25)]
    path = cache.split_path(tmp_path, "train")
    assert cache.write_records(path, records) == 25
    assert cache.read_records(path) == records
    assert not path.with_name("train.jsonl.tmp").exists()


def test_hand_written_minimal_record_is_accepted(tmp_path):
    line = {
        "id": "a",
        "input": "x",
        "label": "",
        "teacher_label": "y",
        "rationales": ["r"],
        "teacher": "me",
        "parse_ok": True,
    }
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(line) + "\n\n")
    (record,) = cache.read_records(path)
    assert (record.label, record.rationales, record.parse_status) == ("", ("r",), "ok")


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", "train.jsonl:2: not valid JSON"),
        ('{"id": "b"}', "train.jsonl:2: missing field(s) input, label"),
        (
            '{"id": "b", "input": "x", "label": "", "teacher_label": "", "rationales": "r", '
            '"teacher": "t", "parse_ok": true}',
            "train.jsonl:2: 'rationales' must be a list",
        ),
        (
            '{"id": "b", "input": "x", "label": "", "teacher_label": "", "rationales": [], '
            '"teacher": "t", "parse_ok": "yes"}',
            "train.jsonl:2: 'parse_ok' must be true or false",
        ),
        (
            '{"id": "ex-0", "input": "x", "label": "", "teacher_label": "", "rationales": [], '
            '"teacher": "t", "parse_ok": false}',
            "duplicate id 'ex-0'",
        ),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "train.jsonl"
    path.write_text(_record(0).to_json() + "\n" + line + "\n")
    with pytest.raises(
        cache.CacheFormatError, match=message.replace("(", r"\(").replace(")", r"\)")
    ):
        cache.read_records(path)


def test_missing_cache_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "valid.jsonl")):
        cache.read_records(tmp_path / "valid.jsonl")


def test_validation_split_is_fixed_disjoint_and_ten_percent():
    examples = list(range(1001))
    train, valid = splits.split_off_validation(examples)
    assert len(valid) == 101 and len(train) == 900
    assert set(train).isdisjoint(valid) and set(train) | set(valid) == set(examples)
    assert splits.split_off_validation(examples) == (train, valid)


def test_subsample_is_deterministic_sized_and_nested():
    examples = list(range(800))
    quarter = splits.subsample(examples, 0.25, seed=3)
    assert quarter == splits.subsample(examples, 0.25, seed=3)
    assert len(quarter) == 200
    assert quarter != splits.subsample(examples, 0.25, seed=4)
    half = splits.subsample(examples, 0.5, seed=3)
    assert set(quarter) <= set(half)
    assert splits.subsample(examples, 1.0, seed=3) == examples


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_subsample_rejects_bad_fractions(fraction):
    with pytest.raises(ValueError, match="training fraction"):
        splits.subsample([1, 2, 3], fraction)


def test_kept_indices_match_subsample():
    kept = kept_training_indices(100, 0.125, seed=1)
    assert kept.tolist() == sorted(splits.subsample(list(range(100)), 0.125, seed=1))
    assert kept.dtype == np.int64
