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


@gin.configurable
def teacher_cache_tfds_dir(path: str | None = None) -> Path | None:
    """When set, tasks read TFDS builds of the caches (`python -m dsbs_jax.data tfds`) here.

    TFRecord shards let each host of a pod read only its own files; None reads
    the JSON-lines caches, which suits one machine.
    """
    return Path(os.path.expanduser(path)) if path else None


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


def _jsonl_dataset(records: Sequence[cache.TeacherRecord]) -> tf.data.Dataset:
    def strings(values: list[str]) -> tf.Tensor:
        return tf.constant(values, tf.string, shape=[len(values)])

    return tf.data.Dataset.from_tensor_slices(
        {
            "index": tf.range(len(records), dtype=tf.int64),
            "id": strings([r.id for r in records]),
            "input": strings([r.input for r in records]),
            "label": strings([r.label for r in records]),
            "teacher_label": strings([r.teacher_label for r in records]),
            "rationale": strings([r.rationales[0] if r.rationales else "" for r in records]),
            "parse_ok": tf.constant([r.parse_ok for r in records], tf.bool, [len(records)]),
        }
    )


def _from_tfds(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """The TFDS build's fields in the JSON-lines dataset's layout (first rationale only)."""
    first = tf.cond(
        tf.size(ex["rationales"]) > 0, lambda: ex["rationales"][0], lambda: tf.constant("")
    )
    keep = ("index", "id", "input", "label", "teacher_label", "parse_ok")
    return {**{k: ex[k] for k in keep}, "rationale": first}


def _gold_targets(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    return {**ex, "teacher_label": ex["label"]}


def _select(ds: tf.data.Dataset, split: str, audience: str, num_examples: int) -> tf.data.Dataset:
    """Subsamples train by index (before any filtering, so all methods share one subset),
    then keeps the records `audience` can use.

    Teacher outputs are training signal only: on other splits every task sees
    every gold-labelled example with the gold label as its label, so all methods
    are scored on the same examples against the same answers.
    """
    if split != "train":
        audience = GOLD
        ds = ds.map(_gold_targets, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        fraction, seed = training_subset()
        if fraction < 1.0:
            kept = np.zeros(num_examples, bool)
            kept[kept_training_indices(num_examples, fraction, seed)] = True
            kept_table = tf.constant(kept)
            ds = ds.filter(lambda ex: tf.gather(kept_table, ex["index"]))
    needs_gold = audience in (GOLD, GOLD_AND_TEACHER)
    needs_teacher = audience in (TEACHER, GOLD_AND_TEACHER)

    def usable(ex: dict[str, tf.Tensor]) -> tf.Tensor:
        ok = tf.constant(True)
        if needs_gold:
            ok = ok & (tf.strings.length(ex["label"]) > 0)
        if needs_teacher:
            ok = ok & ex["parse_ok"] & (tf.strings.length(ex["rationale"]) > 0)
        return ok

    return ds.filter(usable)


class TeacherCacheSource(seqio.DataSource):
    """Reads one dataset's teacher cache, keeping the records of one audience.

    From `<teacher_cache_root>/<dataset>/<split>.jsonl`, or from the TFDS build
    `teacher_cache/<dataset>` when gin sets `teacher_cache_tfds_dir.path`. Yields
    int64 `index` (position in the split), string id, input, label, teacher_label,
    rationale (the first teacher sample) and bool parse_ok.
    """

    def __init__(self, dataset: str, audience: str, splits: Sequence[str] = cache.SPLITS) -> None:
        if audience not in AUDIENCES:
            raise ValueError(f"audience must be one of {AUDIENCES}, got {audience!r}")
        self._dataset = dataset
        self._audience = audience
        super().__init__(splits=splits, num_input_examples=None)

    @property
    def dataset_dir(self) -> Path:
        return teacher_cache_root() / self._dataset

    def _tfds_source(self) -> seqio.DataSource | None:
        data_dir = teacher_cache_tfds_dir()
        if data_dir is None:
            return None
        from dsbs_jax.data import tfds_cache  # only runs that read TFDS pay for its import

        return tfds_cache.tfds_source(tfds_cache.tfds_name(self._dataset), data_dir)

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return self._tfds_source() is None

    def list_shards(self, split: str) -> Sequence[str]:
        tfds_source = self._tfds_source()
        if tfds_source is not None:
            return tfds_source.list_shards(split)
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
        tfds_source = self._tfds_source()
        if tfds_source is not None:
            num_examples = tfds_source.num_input_examples(split)
            ds = tfds_source.get_dataset(split, shuffle=shuffle, seed=seed, shard_info=shard_info)
            ds = ds.map(_from_tfds, num_parallel_calls=tf.data.AUTOTUNE)
        else:
            records = load_split(self.dataset_dir, split)
            num_examples = len(records)
            ds = _jsonl_dataset(records)
            if shard_info and shard_info.num_shards > 1:
                ds = ds.shard(shard_info.num_shards, shard_info.index)
            if shuffle:
                ds = ds.shuffle(max(num_examples, 1), seed=seed)
        return _select(ds, split, self._audience, num_examples)
