"""This host's training batches, deterministic, and resumable at any step in constant time.

The pipeline is seeded end to end (shuffles, mixture sampling, packing), so batch N is the same
whether or not the run stopped before it. `train_batches` returns a `TrainBatches`, whose
position is saved with every checkpoint as the tf.data iterator's state (what t5x does with its
`save_dataset`/`restore_dataset` options): read positions, shuffle buffers, the packing window
and prefetched batches, each process its own `train_ds-<i>-of-<n>` files. Restoring it makes the
next batch the one an uninterrupted run would get, without running the batches before it. A
checkpoint without a usable state (written before it existed, by another number of processes,
at another step or with other settings) falls back to running and dropping the batches before
the start step, with one line saying so: correct, only slow.

Every stage must be able to save its state: the pipeline runs with tf.data's external state
policy FAIL, so a stage that cannot (a `from_generator` or `py_function` source) makes the save
fail instead of a resumed run silently seeing other batches.

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

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import seqio
import tensorflow as tf
from etils import epath

from dsbs_jax.data.feature_converters import StepByStepFeatureConverter

# The checkpoint item holding every process's TrainBatches state (`TrainBatchesHandler`).
DATASET_ITEM = "dataset"
STATE_PREFIX = "train_ds"


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
) -> TrainBatches:
    """Endless batches of model features, from batch number `start_step` on.

    Batches of `batch_size` examples of the `shard_info` shard of the data; with `host_rows`,
    only those rows of each batch. `loss_weights` ({task role: weight}): None reads
    `step_by_step_loss_weights` from gin. Call `restore` before the first batch to start from
    a saved position instead of running the `start_step` batches before it.
    """

    def build() -> tf.data.Dataset:
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
        ds = ds.batch(batch_size, drop_remainder=True)
        if host_rows is not None:
            rows = tf.constant(np.asarray(host_rows, np.int64))
            ds = ds.map(lambda batch: {k: tf.gather(v, rows) for k, v in batch.items()})
        return ds.prefetch(tf.data.AUTOTUNE)

    settings = {
        "mixture_or_task_name": mixture_or_task_name,
        "task_feature_lengths": dict(task_feature_lengths),
        "batch_size": batch_size,
        "shard_info": [shard_info.index, shard_info.num_shards],
        "seed": seed,
        "pack": pack,
        "use_cached": use_cached,
        "host_rows": None if host_rows is None else [int(r) for r in host_rows],
    }
    return TrainBatches(without_autograph(build)(), start_step, settings)


def without_autograph(build: Callable[..., tf.data.Dataset]) -> Callable[..., tf.data.Dataset]:
    """`build` run with AutoGraph off for every function its tf.data stages trace.

    The tasks' preprocessors, the feature converter and the packer write their control flow
    in TensorFlow ops (`tf.while_loop`, `tf.where`), so rewriting their Python first only
    costs time: a fresh process built a run's training and validation pipelines in 7.0
    CPU-seconds instead of 10.9, with the same batches. A stage that did need AutoGraph (a
    Python `if` on a tensor) fails to trace, loudly.
    """
    return tf.autograph.experimental.do_not_convert(build)


def state_name(process_index: int, process_count: int) -> str:
    """The files of one process's state in a checkpoint item: `<name>.index`, `<name>.data-*`
    (the tf.data iterator) and `<name>.json` (its position and the pipeline's settings)."""
    return f"{STATE_PREFIX}-{process_index}-of-{process_count}"


class TrainBatches(Iterator[dict[str, np.ndarray]]):
    """Batches of numpy arrays whose position can be saved and restored.

    `position` is the number of batches of the stream before the one `__next__` returns next:
    in a training loop that pulls one batch per step, the last step trained. Save it together
    with the training state of that step, and restore it with the state, before the first batch.
    """

    def __init__(
        self, dataset: tf.data.Dataset, start_step: int, settings: Mapping[str, Any]
    ) -> None:
        """`dataset` from its first batch; `settings` (JSON) must match for a state to restore."""
        options = tf.data.Options()
        options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.FAIL
        self._dataset = dataset.with_options(options)
        self._settings = json.loads(json.dumps(settings))  # as it reads back from a file
        self.position = start_step
        self._iterator: Any = None  # made by the first batch, save or restore
        self._no_state = "no saved input position"

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._positioned())
        self.position += 1
        return {name: np.asarray(value) for name, value in batch.items()}

    def _positioned(self) -> Any:
        """The tf.data iterator at `position`, reached by running every batch before it unless
        `restore` put it there."""
        if self._iterator is None:
            self._iterator = iter(self._dataset)
            if self.position:
                print(
                    f"input pipeline: {self._no_state}; reaching batch {self.position} by "
                    f"running the {self.position} batches before it",
                    file=sys.stderr,
                )
                for _ in range(self.position):
                    next(self._iterator)
        return self._iterator

    def save(
        self,
        directory: str | os.PathLike,
        process_index: int | None = None,
        process_count: int | None = None,
    ) -> None:
        """Writes this process's state into `directory` (default: JAX's process index and count;
        tests pass them to play several hosts in one process)."""
        path = epath.Path(directory) / state_name(*_process(process_index, process_count))
        tf.train.Checkpoint(ds=self._positioned()).write(os.fspath(path))
        saved = {"position": self.position, "settings": self._settings}
        path.with_suffix(".json").write_text(json.dumps(saved, indent=1) + "\n")

    def restore(
        self,
        directory: str | os.PathLike,
        process_index: int | None = None,
        process_count: int | None = None,
    ) -> bool:
        """Continues from the state `save` wrote into `directory`; returns whether it did.

        Only a state of this process, at `position`, with the same settings restores; otherwise
        the first batch falls back to running the batches before it, saying why.
        """
        if self._iterator is not None:
            raise RuntimeError("TrainBatches.restore must come before the first batch")
        index, count = _process(process_index, process_count)
        path = epath.Path(directory) / state_name(index, count)
        if not path.with_suffix(".json").exists():
            self._no_state = f"{directory} holds no input position of process {index} of {count}"
            return False
        saved = json.loads(path.with_suffix(".json").read_text())
        if saved["settings"] != self._settings:
            self._no_state = f"the input position in {directory} is of other pipeline settings"
            return False
        if saved["position"] != self.position:
            self._no_state = (
                f"the input position in {directory} is batch {saved['position']}, "
                f"not {self.position}"
            )
            return False
        iterator = iter(self._dataset)
        tf.train.Checkpoint(ds=iterator).read(os.fspath(path)).assert_consumed()
        self._iterator = iterator
        return True


def _process(index: int | None, count: int | None) -> tuple[int, int]:
    return (
        jax.process_index() if index is None else index,
        jax.process_count() if count is None else count,
    )


class TrainBatchesHandler(ocp.CheckpointHandler):
    """Saves and restores every process's `TrainBatches` as one item of an orbax checkpoint.

    orbax writes the item into the checkpoint's temporary directory with the training state and
    renames them together, so a save killed half-way leaves the previous checkpoint as it was.
    """

    def save(self, directory: epath.Path, args: TrainBatchesSave) -> None:
        args.batches.save(directory)

    def restore(self, directory: epath.Path, args: TrainBatchesRestore) -> bool:
        return args.batches.restore(directory)


@ocp.args.register_with_handler(TrainBatchesHandler, for_save=True)
@dataclasses.dataclass
class TrainBatchesSave(ocp.args.CheckpointArgs):
    batches: TrainBatches


@ocp.args.register_with_handler(TrainBatchesHandler, for_restore=True)
@dataclasses.dataclass
class TrainBatchesRestore(ocp.args.CheckpointArgs):
    batches: TrainBatches


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
