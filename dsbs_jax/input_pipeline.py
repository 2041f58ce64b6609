"""This host's training batches, deterministic so that a resumed run sees the same ones.

The pipeline is seeded end to end (shuffles, mixture sampling, packing), so the
batch after step N is the same whether or not the run stopped at N: resuming
skips N batches of the same pipeline rather than storing tf.data iterator state.

With several hosts, each feeds only its own rows of every global batch. There are two ways to
get them, chosen by `train.shard_files_by_host`:

* rows (the default): every host runs the same global pipeline and keeps the rows its devices
  hold (`Partitioner.host_rows`). Every step then trains on exactly the batch a single-process
  run would, whatever the number of hosts, so losses and resumption match step for step; the
  price is that every host reads and packs the whole stream, which the teacher caches (tens of
  thousands of examples) make cheap.
* files: each host reads only its own shard of the source (`seqio.ShardInfo`, one per
  process), e.g. its own TFRecord files of a TFDS build read through
  `teacher_cache_tfds_dir`. This is the production path for data too large for every host to
  read, but which examples meet in a step then depends on the number of hosts.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np
import seqio
import tensorflow as tf

from dsbs_jax.data.feature_converters import StepByStepFeatureConverter


def train_batches(
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    batch_size: int,
    shard_info: seqio.ShardInfo,
    seed: int,
    pack: bool = True,
    start_step: int = 0,
    use_cached: bool = False,
    host_rows: Sequence[int] | None = None,
    loss_weights: Mapping[int, float] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches of model features, from batch number `start_step` on.

    Batches of `batch_size` examples of the `shard_info` shard of the data; with `host_rows`,
    only those rows of each batch. `loss_weights` ({task role: weight}): None reads
    `step_by_step_loss_weights` from gin.
    """
    ds = seqio.get_dataset(
        mixture_or_task_name,
        task_feature_lengths,
        StepByStepFeatureConverter(pack=pack, loss_weights=loss_weights),
        dataset_split="train",
        shuffle=True,
        num_epochs=None,
        shard_info=shard_info,
        seed=seed,
        use_cached=use_cached,
    )
    ds = ds.batch(batch_size, drop_remainder=True).skip(start_step)
    if host_rows is not None:
        rows = tf.constant(np.asarray(host_rows, np.int64))
        ds = ds.map(lambda batch: {name: tf.gather(value, rows) for name, value in batch.items()})
    return ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def batch_spec(
    task_feature_lengths: Mapping[str, int], batch_rows: int, pack: bool
) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of the model features of a batch `train_batches` yields."""
    converter = StepByStepFeatureConverter(pack=pack)
    lengths = converter.get_model_feature_lengths(task_feature_lengths)
    specs = converter.MODEL_FEATURES
    return {
        name: jax.ShapeDtypeStruct(
            (batch_rows, length),
            specs[name].dtype.as_numpy_dtype if name in specs else np.int32,
        )
        for name, length in lengths.items()
    }
