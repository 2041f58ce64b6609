"""The canonical teacher cache as a TFDS dataset, for sharded reading on a pod.

`sources.TeacherCacheSource` reads the JSON-lines cache whole on every host.
On a TPU pod each host should instead read only its own files, deterministically;
SeqIO does that for TFDS datasets (one `seqio.ShardInfo` per host picks whole
TFRecord shards). This module converts a cache directory into such a dataset:

    build_tfds("~/.cache/dsbs_jax/cqa", "cqa", data_dir)  # -> "teacher_cache/cqa:1.0.0"
    source = tfds_source("teacher_cache/cqa:1.0.0", data_dir)

Examples keep the order of their split file (the builder disables TFDS's
shuffling), so an unshuffled read gives back the file order exactly. Nothing here
touches the network or GCS: the data directory is always explicit.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from dsbs_jax.data import cache
from dsbs_jax.errors import MissingFileError, UserError

_VALID_NAME = re.compile(r"[\w+.-]+")  # what TFDS accepts as a config name


@dataclasses.dataclass(eq=False)
class TeacherCacheConfig(tfds.core.BuilderConfig):
    """One dataset's cache: the config name is the dataset name, `cache_dir` its JSONL files."""

    cache_dir: str = ""


class TeacherCache(tfds.core.GeneratorBasedBuilder):
    """Canonical teacher cache records, one split per `<split>.jsonl`, in file order.

    Configs are made at build time (`build_tfds`), not listed in BUILDER_CONFIGS;
    reading needs only the prepared files.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # Nothing is downloaded, so there is no checksums file to find next to this code; the
    # lookup would also import `importlib_resources`, which tfds 4.9.10 only requires on
    # Python < 3.9.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "index": tfds.features.Scalar(dtype=np.int64),  # position in the split file
                    "id": text(),
                    "input": text(),
                    "label": text(),
                    "teacher_label": text(),
                    "rationales": tfds.features.Sequence(text()),
                    "teacher": text(),
                    "parse_ok": tfds.features.Scalar(dtype=np.bool_),
                    "parse_status": text(),
                }
            ),
            disable_shuffling=True,  # keep the file order (keys are file positions)
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # the cache is local
        cache_dir = self.builder_config.cache_dir
        splits = cache.available_splits(cache_dir)
        if not splits:
            raise MissingFileError(f"no <split>.jsonl files in teacher cache {cache_dir}")
        return {s: self._generate_examples(cache.split_path(cache_dir, s)) for s in splits}

    def _generate_examples(self, path: Path) -> Iterator[tuple[int, dict]]:
        for i, record in enumerate(cache.read_records(path)):
            example = dataclasses.asdict(record)
            del example["choices"]  # read from the JSON-lines cache only (closed-set scoring)
            example["rationales"] = list(record.rationales)
            example["index"] = i
            yield i, example


def tfds_name(dataset: str, version: str = str(TeacherCache.VERSION)) -> str:
    """The TFDS name `build_tfds` gives a dataset's cache."""
    return f"teacher_cache/{dataset}:{version}"


def build_tfds(
    cache_dir: str | os.PathLike,
    name: str,
    data_dir: str | os.PathLike,
    num_shards: int | None = None,
    *,
    overwrite: bool = False,
) -> str:
    """Prepares `teacher_cache/<name>` under `data_dir` from a cache dir; returns its TFDS name.

    `num_shards` forces that many TFRecord files per split (e.g. >= the number of
    hosts, even for tiny data); None lets TFDS size them. An existing version is
    left untouched unless `overwrite`. A process that has already read this name
    through SeqIO keeps its memoized builder, so read a rebuilt dataset anew.
    """
    if not _VALID_NAME.fullmatch(name):
        raise UserError(f"dataset name {name!r} must match {_VALID_NAME.pattern}")
    if num_shards is not None and num_shards < 1:
        raise UserError(f"num_shards must be positive, got {num_shards}")
    cache_dir = Path(cache_dir).expanduser().resolve()
    config = TeacherCacheConfig(
        name=name, cache_dir=str(cache_dir), description=f"Teacher cache read from {cache_dir}"
    )
    builder = TeacherCache(config=config, data_dir=os.fspath(Path(data_dir).expanduser()))
    mode = tfds.download.GenerateMode
    # TFDS makes an (unused) downloads folder; keep it out of `data_dir`.
    with tempfile.TemporaryDirectory() as download_dir:
        builder.download_and_prepare(
            download_dir=download_dir,
            download_config=tfds.download.DownloadConfig(
                num_shards=num_shards,
                try_download_gcs=False,
                download_mode=(
                    mode.REUSE_CACHE_IF_EXISTS if overwrite else mode.REUSE_DATASET_IF_EXISTS
                ),
            ),
        )
    return tfds_name(name)


class TeacherCacheTfdsSource(seqio.TfdsDataSource):
    """Reads a prepared `teacher_cache` dataset from files only (no builder code, no GCS).

    Yields int64 `index` (position in the split file), string scalars id, input,
    label, teacher_label, teacher, parse_status, bool `parse_ok` and 1-D string
    `rationales`. `shard_info` picks whole files;
    `shuffle` only reorders files (the dataset is ordered, so TFDS's ordering
    guard is off here), leaving example-level shuffling to the SeqIO task.
    """

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
        input_context = None
        if shard_info:
            input_context = tf.distribute.InputContext(
                num_input_pipelines=shard_info.num_shards, input_pipeline_id=shard_info.index
            )
        read_config = tfds.ReadConfig(
            shuffle_seed=seed,
            input_context=input_context,
            skip_prefetch=True,
            enable_ordering_guard=False,
        )
        return self.tfds_dataset.builder.as_dataset(
            split=split, shuffle_files=shuffle, read_config=read_config
        )


def tfds_source(name: str, data_dir: str | os.PathLike) -> TeacherCacheTfdsSource:
    """A SeqIO source over a dataset built by `build_tfds` (`name` as it returned it)."""
    return TeacherCacheTfdsSource(
        tfds_name=name, tfds_data_dir=os.fspath(Path(data_dir).expanduser()), read_only=True
    )
