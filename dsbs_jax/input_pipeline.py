"""This host's training batches, deterministic so that a resumed run sees the same ones.

The pipeline is seeded end to end (shuffles, mixture sampling, packing), so the
batch after step N is the same whether or not the run stopped at N: resuming
skips N batches of the same pipeline rather than storing tf.data iterator state.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import seqio
import tensorflow as tf

from dsbs_jax.data.feature_converters import StepByStepFeatureConverter


def train_batches(
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    host_batch_size: int,
    shard_info: seqio.ShardInfo,
    seed: int,
    pack: bool = True,
    start_step: int = 0,
    use_cached: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches of model features for this host, from batch number `start_step` on."""
    ds = seqio.get_dataset(
        mixture_or_task_name,
        task_feature_lengths,
        StepByStepFeatureConverter(pack=pack),
        dataset_split="train",
        shuffle=True,
        num_epochs=None,
        shard_info=shard_info,
        seed=seed,
        use_cached=use_cached,
    )
    ds = ds.batch(host_batch_size, drop_remainder=True).skip(start_step)
    return ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
