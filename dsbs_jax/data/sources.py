"""SeqIO data sources over canonical teacher caches.

Tasks are registered at import time, before gin has parsed the command line, so
everything a run may change (where the caches live, which fraction of the
training set to keep, which rationales to train on, which unlabeled caches to
add) is read from gin when a dataset is built, not when the task is registered.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import gin
import numpy as np
import seqio
import tensorflow as tf

from dsbs_jax import metrics
from dsbs_jax.data import cache
from dsbs_jax.data.splits import subsample
from dsbs_jax.errors import MissingFileError, UserError

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


@dataclasses.dataclass(frozen=True)
class RationaleSelection:
    """Which teacher samples of a training input become training examples."""

    max_rationales_per_example: int | None
    require_correct_teacher_label: bool


@gin.configurable
def rationale_selection(
    max_rationales_per_example: int | None = 1, require_correct_teacher_label: bool = False
) -> RationaleSelection:
    """Training data from the teacher's samples (gin: MAX_RATIONALES, CORRECT_TEACHER_ONLY).

    Each of the first `max_rationales_per_example` rationales of a record (None:
    all) becomes its own training example in the tasks that teach rationales and
    in the label tasks paired with them. `require_correct_teacher_label` keeps
    only records whose teacher label is right by the task's metric; the cache
    stores one (majority) teacher label per record, not one per sample, so this
    is decided per record. Records without a gold label cannot be checked and are
    dropped. Valid and test are never affected.
    """
    if max_rationales_per_example is not None and max_rationales_per_example < 1:
        raise UserError(
            f"max_rationales_per_example must be None or >= 1, got {max_rationales_per_example}"
        )
    return RationaleSelection(max_rationales_per_example, require_correct_teacher_label)


@gin.configurable
def unlabeled_augmentation(datasets: Sequence[str] = ()) -> tuple[str, ...]:
    """Caches under the same root whose train records join the teacher-output tasks
    (gin: UNLABELED_DATASETS), as in the paper's svamp + asdiv experiment.

    Their gold labels are ignored, so gold-label tasks never see them; ids become
    `<dataset>/<id>`, and TRAIN_FRACTION does not subsample them.
    """
    if isinstance(datasets, str):
        raise UserError(f"unlabeled_augmentation.datasets must be a list, got {datasets!r}")
    return tuple(datasets)


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


def require_split_file(dataset_dir: Path, split: str) -> Path:
    """The cache file of `split`; FileNotFoundError naming it and the command that writes it."""
    path = cache.split_path(dataset_dir, split)
    if not path.is_file():
        raise MissingFileError(
            f"no teacher cache for split '{split}' at {path}; create it with "
            "`python -m dsbs_jax.data prepare ...` (or `... synthetic`), or point DATA_DIR "
            "(gin) or $DSBS_DATA_DIR at the right directory"
        )
    return path


def load_split(dataset_dir: Path, split: str) -> tuple[cache.TeacherRecord, ...]:
    path = require_split_file(dataset_dir, split)
    return _load_split(path, path.stat().st_mtime_ns)


# One record as both readers yield it; `rationales` is 1-D (every teacher sample kept).
RECORD_FEATURES = ("index", "id", "input", "label", "teacher_label", "rationales", "parse_ok")
# A training example made from the i-th rationale of record <id> is `<id>#r<i>`.
RATIONALE_ID_SEPARATOR = "#r"
# An augmentation record's id is `<dataset>/<id>`.
DATASET_ID_SEPARATOR = "/"


def _jsonl_dataset(records: Sequence[cache.TeacherRecord]) -> tf.data.Dataset:
    def strings(values: list[str]) -> tf.Tensor:
        return tf.constant(values, tf.string, shape=[len(values)])

    rationales = tf.RaggedTensor.from_row_lengths(
        strings([text for r in records for text in r.rationales]),
        tf.constant([len(r.rationales) for r in records], tf.int64, shape=[len(records)]),
    )
    return tf.data.Dataset.from_tensor_slices(
        {
            "index": tf.range(len(records), dtype=tf.int64),
            "id": strings([r.id for r in records]),
            "input": strings([r.input for r in records]),
            "label": strings([r.label for r in records]),
            "teacher_label": strings([r.teacher_label for r in records]),
            "rationales": rationales,
            "parse_ok": tf.constant([r.parse_ok for r in records], tf.bool, [len(records)]),
        }
    ).map(_record_layout)


def _record_layout(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Both readers' records in one layout (the TFDS build has more fields), so they concatenate."""
    return {k: ex[k] for k in RECORD_FEATURES}


def _gold_targets(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    return {**ex, "teacher_label": ex["label"]}


def _unlabeled(ex: dict[str, tf.Tensor], dataset: str) -> dict[str, tf.Tensor]:
    """An augmentation record: gold label dropped, id prefixed so it cannot clash."""
    record_id = tf.strings.join([dataset, ex["id"]], separator=DATASET_ID_SEPARATOR)
    return {**ex, "id": record_id, "label": tf.constant("")}


def _has_gold_label(ex: dict[str, tf.Tensor]) -> tf.Tensor:
    return tf.strings.length(ex["label"]) > 0


def _has_rationale(ex: dict[str, tf.Tensor]) -> tf.Tensor:
    return tf.strings.length(ex["rationale"]) > 0


def labels_agree(metric_fn: Callable[..., Mapping[str, float]], gold: str, teacher: str) -> bool:
    """Whether the teacher label is right as the task's metric scores it (svamp: by value).

    No gold label means it cannot be checked, which counts as wrong.
    """
    return bool(gold) and list(metric_fn([gold], [teacher]).values()) == [100.0]


def _teacher_is_right(ex: dict[str, tf.Tensor], metric_fn: Callable) -> tf.Tensor:
    def agree(gold: bytes, teacher: bytes) -> bool:
        return labels_agree(metric_fn, gold.decode("utf-8"), teacher.decode("utf-8"))

    right = tf.numpy_function(agree, [ex["label"], ex["teacher_label"]], tf.bool, stateful=False)
    return tf.ensure_shape(right, [])


def _first_rationale(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """One example per record: the first teacher sample, or '' when there is none."""
    first = tf.concat([ex["rationales"], [""]], axis=0)[0]
    return {**{k: v for k, v in ex.items() if k != "rationales"}, "rationale": first}


def _per_rationale(ex: dict[str, tf.Tensor], limit: int | None) -> tf.data.Dataset:
    """One example per teacher sample (the first `limit`), with id `<id>#r<i>`."""
    rationales = ex["rationales"][:limit]
    numbers = tf.strings.as_string(tf.range(tf.size(rationales, out_type=tf.int64)))
    ids = ex["id"] + RATIONALE_ID_SEPARATOR + numbers
    shared = {k: v for k, v in ex.items() if k not in ("id", "rationales")}
    pairs = tf.data.Dataset.from_tensor_slices({"id": ids, "rationale": rationales})
    return pairs.map(lambda pair: {**shared, **pair})


def _subsample(ds: tf.data.Dataset, num_examples: int) -> tf.data.Dataset:
    """Keeps the TRAIN_FRACTION share by index, before any filtering, so all methods share it."""
    fraction, seed = training_subset()
    if fraction >= 1.0:
        return ds
    kept = np.zeros(num_examples, bool)
    kept[kept_training_indices(num_examples, fraction, seed)] = True
    kept_table = tf.constant(kept)
    return ds.filter(lambda ex: tf.gather(kept_table, ex["index"]))


def _training_examples(
    ds: tf.data.Dataset, audience: str, per_rationale: bool, metric_fn: Callable
) -> tf.data.Dataset:
    """The training examples `audience` can use, one per input or one per kept rationale."""
    selection = rationale_selection()
    needs_gold = audience in (GOLD, GOLD_AND_TEACHER)
    needs_teacher = audience in (TEACHER, GOLD_AND_TEACHER)
    if needs_gold:
        ds = ds.filter(_has_gold_label)
    if needs_teacher:
        ds = ds.filter(lambda ex: ex["parse_ok"])
        if selection.require_correct_teacher_label:
            ds = ds.filter(functools.partial(_teacher_is_right, metric_fn=metric_fn))
    if per_rationale:
        limit = selection.max_rationales_per_example
        ds = ds.flat_map(functools.partial(_per_rationale, limit=limit))
    else:
        ds = ds.map(_first_rationale, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.filter(_has_rationale) if needs_teacher else ds


def _evaluation_examples(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Every gold-labelled example once, with the gold label as its label.

    Teacher outputs are training signal only: this way all methods are scored on
    the same examples against the same answers.
    """
    ds = ds.map(_gold_targets, num_parallel_calls=tf.data.AUTOTUNE).filter(_has_gold_label)
    return ds.map(_first_rationale, num_parallel_calls=tf.data.AUTOTUNE)


class TeacherCacheSource(seqio.DataSource):
    """Reads one dataset's teacher cache, keeping the records of one audience.

    From `<teacher_cache_root>/<dataset>/<split>.jsonl` (SeqIO's split 'validation' reads
    valid.jsonl), or from the TFDS build
    `teacher_cache/<dataset>` when gin sets `teacher_cache_tfds_dir.path`. Yields
    int64 `index` (position in its split file), string id, input, label,
    teacher_label, rationale and bool parse_ok.

    On train, a `per_rationale` source yields one example per teacher sample kept
    by `rationale_selection` (id `<id>#r<i>`); a (label, rationale) pair of tasks
    must both be `per_rationale` so that `PairedMixture` zips them in step. Other
    sources, and every source on validation and test, yield one example per input with
    the first rationale. Sources for the TEACHER audience also read the train
    records of `unlabeled_augmentation`'s datasets. `metric_fn` (the task's metric)
    decides whether a teacher label is right for `rationale_selection`.
    """

    def __init__(
        self,
        dataset: str,
        audience: str,
        splits: Sequence[str] = tuple(cache.TASK_SPLITS),
        *,
        per_rationale: bool = False,
        metric_fn: Callable[..., Mapping[str, float]] = metrics.accuracy,
    ) -> None:
        if audience not in AUDIENCES:
            raise UserError(f"audience must be one of {AUDIENCES}, got {audience!r}")
        self._dataset = dataset
        self._audience = audience
        self._per_rationale = per_rationale
        self._metric_fn = metric_fn
        super().__init__(splits=splits, num_input_examples=None)

    @property
    def dataset(self) -> str:
        return self._dataset

    @property
    def audience(self) -> str:
        return self._audience

    @property
    def dataset_dir(self) -> Path:
        return teacher_cache_root() / self._dataset

    def _tfds_source(self, dataset: str) -> seqio.DataSource | None:
        data_dir = teacher_cache_tfds_dir()
        if data_dir is None:
            return None
        from dsbs_jax.data import tfds_cache  # only runs that read TFDS pay for its import

        return tfds_cache.tfds_source(tfds_cache.tfds_name(dataset), data_dir)

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return self._tfds_source(self._dataset) is None

    def list_shards(self, split: str) -> Sequence[str]:
        tfds_source = self._tfds_source(self._dataset)
        if tfds_source is not None:
            return tfds_source.list_shards(cache.file_split(split))
        return [str(cache.split_path(self.dataset_dir, split))]

    def _records(
        self,
        dataset: str,
        split: str,
        shuffle: bool,
        seed: int | None,
        shard_info: seqio.ShardInfo | None,
    ) -> tuple[tf.data.Dataset, int]:
        """One dataset's records of `split` (this host's shard) and the split's size."""
        tfds_source = self._tfds_source(dataset)
        if tfds_source is not None:
            split = cache.file_split(split)
            ds = tfds_source.get_dataset(split, shuffle=shuffle, seed=seed, shard_info=shard_info)
            return ds.map(_record_layout), tfds_source.num_input_examples(split)
        records = load_split(teacher_cache_root() / dataset, split)
        ds = _jsonl_dataset(records)
        if shard_info and shard_info.num_shards > 1:
            ds = ds.shard(shard_info.num_shards, shard_info.index)
        return ds, len(records)

    def _augmentation(
        self, shuffle: bool, seed: int | None, shard_info: seqio.ShardInfo | None
    ) -> list[tuple[tf.data.Dataset, int]]:
        """The train records of `unlabeled_augmentation`'s datasets, as unlabeled records."""
        if self._audience != TEACHER:
            return []
        read = []
        for dataset in unlabeled_augmentation():
            if dataset == self._dataset:
                raise UserError(f"unlabeled_augmentation.datasets repeats {dataset!r} itself")
            dataset_dir = teacher_cache_root() / dataset
            if teacher_cache_tfds_dir() is None and not dataset_dir.is_dir():
                raise MissingFileError(
                    f"unlabeled_augmentation.datasets names {dataset!r}, but there is no "
                    f"teacher cache directory {dataset_dir}"
                )
            ds, size = self._records(dataset, "train", shuffle, seed, shard_info)
            unlabeled = functools.partial(_unlabeled, dataset=dataset)
            read.append((ds.map(unlabeled, num_parallel_calls=tf.data.AUTOTUNE), size))
        return read

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
        ds, num_examples = self._records(self._dataset, split, shuffle, seed, shard_info)
        if split == "train":
            ds = _subsample(ds, num_examples)  # the primary dataset only
            for extra, size in self._augmentation(shuffle, seed, shard_info):
                ds, num_examples = ds.concatenate(extra), num_examples + size
        if shuffle and teacher_cache_tfds_dir() is None:  # TFDS reads shuffle files only
            ds = ds.shuffle(max(num_examples, 1), seed=seed)
        if split != "train":
            return _evaluation_examples(ds)
        return _training_examples(ds, self._audience, self._per_rationale, self._metric_fn)
