"""The teacher cache built as a TFDS dataset reads back exactly, in order, sharded per host."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import seqio
import tensorflow as tf

from dsbs_jax.data import cache, tfds_cache

SIZES = {"train": 50, "valid": 10, "test": 10}
NUM_SHARDS = 2


def _records(split: str, n: int) -> list[cache.TeacherRecord]:
    records = []
    for i in range(n):
        parsed = i % 7 != 3
        records.append(
            cache.TeacherRecord(
                id=f"{split}-{i:03d}",
                input=f"Frage {i}: Was kostet ein Café in 東京? « naïve » 🙂",
                label="" if i % 11 == 5 else f"résultat {i % 4}",
                teacher_label=f"résultat {i % 3}" if parsed else "",
                rationales=tuple(f"Begründung {j} für {i}: ∑ ≠ ∅" for j in range(i % 4)),
                teacher="palm-540b",
                parse_ok=parsed,
                parse_status="ok" if parsed else "no_answer",
            )
        )
    return records


def _to_record(example: dict) -> cache.TeacherRecord:
    text = {k: v.decode("utf-8") for k, v in example.items() if isinstance(v, bytes)}  # not index
    return cache.TeacherRecord(
        rationales=tuple(r.decode("utf-8") for r in example["rationales"]),
        parse_ok=bool(example["parse_ok"]),
        **text,
    )


def _read(source: seqio.DataSource, split: str, **kwargs) -> list[cache.TeacherRecord]:
    return [_to_record(ex) for ex in source.get_dataset(split, **kwargs).as_numpy_iterator()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds_cache")
    records = {split: _records(split, n) for split, n in SIZES.items()}
    for split, split_records in records.items():
        cache.write_records(cache.split_path(root / "cache", split), split_records)
    name = tfds_cache.build_tfds(root / "cache", "cqa", root / "tfds", num_shards=NUM_SHARDS)
    return root, name, records


def test_name_and_splits(built):
    root, name, _ = built
    assert name == "teacher_cache/cqa:1.0.0"
    source = tfds_cache.tfds_source(name, root / "tfds")
    assert set(source.splits) == set(SIZES)
    assert {s: source.num_input_examples(s) for s in SIZES} == SIZES


def test_round_trip_preserves_every_field_in_order(built):
    root, name, records = built
    source = tfds_cache.tfds_source(name, root / "tfds")
    for split, expected in records.items():
        assert _read(source, split, shuffle=False) == expected
        indices = [
            ex["index"] for ex in source.get_dataset(split, shuffle=False).as_numpy_iterator()
        ]
        assert indices == list(range(len(expected)))
    spec = source.get_dataset("train", shuffle=False).element_spec
    assert spec["rationales"].shape.as_list() == [None]
    assert spec["rationales"].dtype == tf.string
    assert spec["parse_ok"].dtype == tf.bool
    assert all(spec[k].shape.rank == 0 for k in spec if k != "rationales")


def test_forced_shards_are_tfrecord_files(built):
    root, name, _ = built
    version_dir = root / "tfds" / "teacher_cache" / "cqa" / "1.0.0"
    source = tfds_cache.tfds_source(name, root / "tfds")
    for split, n in SIZES.items():
        expected = [
            version_dir / f"teacher_cache-{split}.tfrecord-{i:05d}-of-{NUM_SHARDS:05d}"
            for i in range(NUM_SHARDS)
        ]
        assert sorted(version_dir.glob(f"teacher_cache-{split}.tfrecord-*")) == expected
        assert [Path(p) for p in source.list_shards(split)] == expected
        assert sum(1 for _ in tf.data.TFRecordDataset([str(p) for p in expected])) == n


def test_shard_info_gives_disjoint_complete_cover(built):
    root, name, records = built
    source = tfds_cache.tfds_source(name, root / "tfds")
    for split, expected in records.items():
        per_host = [
            [r.id for r in _read(source, split, shuffle=False, shard_info=seqio.ShardInfo(i, 2))]
            for i in range(2)
        ]
        assert all(per_host)
        assert not set(per_host[0]) & set(per_host[1])
        assert sorted(per_host[0] + per_host[1]) == sorted(r.id for r in expected)


def test_reads_are_deterministic_and_shuffle_keeps_every_record(built):
    root, name, records = built
    source = tfds_cache.tfds_source(name, root / "tfds")
    first = _read(source, "train", shuffle=False)
    assert _read(source, "train", shuffle=False) == first
    shuffled = _read(source, "train", shuffle=True, seed=1)
    assert sorted(r.id for r in shuffled) == sorted(r.id for r in records["train"])


def test_rebuild_without_overwrite_leaves_files_alone(built):
    root, name, _ = built
    version_dir = root / "tfds" / "teacher_cache" / "cqa" / "1.0.0"
    before = {p: p.stat().st_mtime_ns for p in version_dir.iterdir()}
    again = tfds_cache.build_tfds(root / "cache", "cqa", root / "tfds", num_shards=NUM_SHARDS)
    assert again == name
    assert {p: p.stat().st_mtime_ns for p in version_dir.iterdir()} == before


def test_overwrite_rebuilds(tmp_path, built):
    root, _, records = built
    data_dir = tmp_path / "tfds"
    name = tfds_cache.build_tfds(root / "cache", "cqa", data_dir, num_shards=2)
    name = tfds_cache.build_tfds(root / "cache", "cqa", data_dir, num_shards=3, overwrite=True)
    source = tfds_cache.tfds_source(name, data_dir)
    assert len(source.list_shards("valid")) == 3
    assert _read(source, "valid", shuffle=False) == records["valid"]


def test_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="dataset name"):
        tfds_cache.build_tfds(tmp_path, "c/qa", tmp_path / "tfds")
    with pytest.raises(FileNotFoundError, match="no <split>.jsonl"):
        tfds_cache.build_tfds(tmp_path, "empty", tmp_path / "tfds")
    assert not os.path.exists(tmp_path / "tfds" / "teacher_cache" / "empty" / "1.0.0")
