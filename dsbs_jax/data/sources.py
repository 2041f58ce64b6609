"""SeqIO data sources over canonical teacher caches.

Tasks are registered at import time, before gin has parsed the command line, so
everything a run may change (where the caches live, which fraction of the
training set to keep) is read from gin when a dataset is built, not when the
task is registered.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import gin
import numpy as np
import seqio
import tensorflow as tf

from dsbs_jax.data import cache
from dsbs_jax.data.splits import subsample

DEFAULT_DATA_DIR = "~/.cache/dsbs_jax"

# Which records a task may see: gold labels need a gold label, teacher targets a parsed
# output; tasks paired with each other must see the same records, hence the third.
GOLD = "gold"
TEACHER = "teacher"
GOLD_AND_TEACHER = "gold_and_teacher"
AUDIENCES = (GOLD, TEACHER, GOLD_AND_TEACHER)


@gin.configurable
def teacher_cache_root(path: str | None = None) -> Path:
    """The directory holding one canonical cache per dataset (`<root>/<dataset>/`).

    Gin `teacher_cache_root.path` wins, then $DSBS_DATA_DIR, then ~/.cache/dsbs_jax.
    """
    return Path(os.path.expanduser(path or os.environ.get("DSBS_DATA_DIR", DEFAULT_DATA_DIR)))


@gin.configurable
def training_subset(fraction: float = 1.0, seed: int = 0) -> tuple[float, int]:
    """The fraction of the training split every task sees, and its seed (gin: TRAIN_FRACTION)."""
    return fraction, seed


def kept_training_indices(num_examples: int, fraction: float, seed: int) -> np.ndarray:
    """Indices (positions in the split file) kept by `splits.subsample`, sorted."""
    return np.sort(subsample(np.arange(num_examples), fraction, seed)).astype(np.int64)


@functools.lru_cache(maxsize=32)
def _load_split(path: Path, mtime_ns: int) -> tuple[cache.TeacherRecord, ...]:
    del mtime_ns  # part of the key only: a rewritten file is read again
    return tuple(cache.read_records(path))


def load_split(dataset_dir: Path, split: str) -> tuple[cache.TeacherRecord, ...]:
    path = cache.split_path(dataset_dir, split)
    if not path.is_file():
        raise FileNotFoundError(
            f"no teacher cache for split '{split}' at {path}; create it with "
            "`python -m dsbs_jax.data prepare ...` (or `... synthetic`), or point gin "
            "`teacher_cache_root.path` / $DSBS_DATA_DIR at the right directory"
        )
    return _load_split(path, path.stat().st_mtime_ns)


def _select(
    records: Sequence[cache.TeacherRecord], split: str, audience: str
) -> list[tuple[int, cache.TeacherRecord]]:
    """Subsamples train (before any filtering, so all methods share one subset), then filters."""
    indexed = list(enumerate(records))
    if split == "train":
        fraction, seed = training_subset()
        keep = set(kept_training_indices(len(records), fraction, seed).tolist())
        indexed = [(i, r) for i, r in indexed if i in keep]
    has_gold = audience in (GOLD, GOLD_AND_TEACHER)
    has_teacher = audience in (TEACHER, GOLD_AND_TEACHER)
    return [
        (i, r)
        for i, r in indexed
        if (r.label or not has_gold) and ((r.parse_ok and r.rationales) or not has_teacher)
    ]


def _to_tf_dataset(selected: Sequence[tuple[int, cache.TeacherRecord]]) -> tf.data.Dataset:
    columns = {
        "index": tf.constant([i for i, _ in selected], tf.int64, shape=[len(selected)]),
        "id": [r.id for _, r in selected],
        "input": [r.input for _, r in selected],
        "label": [r.label for _, r in selected],
        "teacher_label": [r.teacher_label for _, r in selected],
        "rationale": [r.rationales[0] if r.rationales else "" for _, r in selected],
    }
    columns = {
        k: v if isinstance(v, tf.Tensor) else tf.constant(v, tf.string, shape=[len(selected)])
        for k, v in columns.items()
    }
    return tf.data.Dataset.from_tensor_slices(columns)


class TeacherCacheSource(seqio.DataSource):
    """Reads `<teacher_cache_root>/<dataset>/<split>.jsonl`, keeping the records of one audience.

    Yields string features id, input, label, teacher_label, rationale (the first
    teacher sample) and the int64 `index` of the example in its split file.
    """

    def __init__(self, dataset: str, audience: str, splits: Sequence[str] = cache.SPLITS) -> None:
        if audience not in AUDIENCES:
            raise ValueError(f"audience must be one of {AUDIENCES}, got {audience!r}")
        self._dataset = dataset
        self._audience = audience
        super().__init__(splits=splits, num_input_examples=None)

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    @property
    def dataset_dir(self) -> Path:
        return teacher_cache_root() / self._dataset

    def list_shards(self, split: str) -> Sequence[str]:
        return [str(cache.split_path(self.dataset_dir, split))]

    def get_dataset(
        self,
        split: str = "train",
        shuffle: bool = True,
        seed: int | None = None,
        shard_info: seqio.ShardInfo | None = None,
        *,
        sequence_length: dict | None = None,
        use_cached: bool = False,
        num_epochs: int | None = 1,
    ) -> tf.data.Dataset:
        del sequence_length, use_cached, num_epochs
        selected = _select(load_split(self.dataset_dir, split), split, self._audience)
        if shard_info and shard_info.num_shards > 1:
            selected = selected[shard_info.index :: shard_info.num_shards]
        ds = _to_tf_dataset(selected)
        if shuffle:
            ds = ds.shuffle(max(len(selected), 1), seed=seed)
        return ds
