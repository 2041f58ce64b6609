"""Evaluation on a split: teacher-forced losses, and decoded labels scored by seqio metrics.

Batches have a fixed size (the last one padded with empty rows) so each step
compiles once. Every host reads the whole (small) evaluation split and feeds
its slice of each global batch; decoded tokens are gathered back to all hosts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import seqio
from jax.experimental import multihost_utils
from tqdm import tqdm

from dsbs_jax import decoding, losses
from dsbs_jax.data.feature_converters import StepByStepFeatureConverter
from dsbs_jax.models.t5 import T5
from dsbs_jax.partitioning import Partitioner

PyTree = Any


def fixed_size_batches(
    examples: Iterator[Mapping[str, np.ndarray]], batch_size: int
) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Yields (batch, number of real rows), padding the last batch with all-zero rows."""
    rows: list[Mapping[str, np.ndarray]] = []
    for example in examples:
        rows.append(example)
        if len(rows) == batch_size:
            yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}, batch_size
            rows = []
    if rows:
        real = len(rows)
        rows += [{k: np.zeros_like(v) for k, v in rows[0].items()}] * (batch_size - real)
        yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}, real


def metric_tasks(mixture_or_task_name: str) -> list[seqio.Task]:
    """The tasks of a mixture (or the task) that have metrics: the ones whose labels count."""
    provider = seqio.get_mixture_or_task(mixture_or_task_name)
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    return [t for t in tasks if t.metric_fns]


def teacher_forced(
    eval_step: Callable[[PyTree, Mapping[str, jax.Array]], Mapping[str, jax.Array]],
    params: PyTree,
    partitioner: Partitioner,
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    split: str,
    batch_size: int,
) -> dict[str, float]:
    """Label and rationale losses and token accuracies over a whole split."""
    ds = seqio.get_dataset(
        mixture_or_task_name,
        task_feature_lengths,
        StepByStepFeatureConverter(pack=False),
        dataset_split=split,
        shuffle=False,
        num_epochs=1,
    )
    totals: dict[str, np.ndarray] | None = None
    for batch, _ in fixed_size_batches(ds.as_numpy_iterator(), batch_size):
        sums = jax.device_get(
            eval_step(params, partitioner.shard_batch(partitioner.host_slice(batch)))
        )
        totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
    if totals is None:
        raise ValueError(f"split '{split}' of {mixture_or_task_name} has no examples")
    return {k: float(v) for k, v in losses.summarise_loss_sums(totals).items()}


def _decode_text(vocabulary: seqio.Vocabulary, tokens: np.ndarray, eos_id: int) -> str:
    ids = tokens.tolist()
    if eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return vocabulary.decode(ids)


def decode_batches(
    model: T5,
    params: PyTree,
    partitioner: Partitioner,
    vocabulary: seqio.Vocabulary,
    inputs: Sequence[Sequence[int]],
    inputs_length: int,
    batch_size: int,
    max_decode_length: int,
) -> list[str]:
    """Greedy-decodes encoder inputs (token ids, EOS included) into texts, in order.

    Each input is padded to `inputs_length`, so every batch compiles to one shape.
    """

    def padded(ids: Sequence[int]) -> dict[str, np.ndarray]:
        tokens = np.zeros(inputs_length, np.int32)
        tokens[: len(ids)] = ids
        return {"encoder_input_tokens": tokens}

    eos_id = vocabulary.eos_id
    texts: list[str] = []
    batches = fixed_size_batches((padded(ids) for ids in inputs), batch_size)
    with tqdm(
        total=len(inputs),
        desc="decode",
        unit="ex",
        leave=False,
        disable=len(inputs) < 512 or jax.process_index() != 0,
    ) as bar:
        for batch, real in batches:
            local = partitioner.shard_batch(partitioner.host_slice(batch))["encoder_input_tokens"]
            with partitioner.activation_rules():
                tokens = decoding.greedy_decode(model, params, local, max_decode_length, eos_id)
            tokens = multihost_utils.process_allgather(tokens, tiled=True)
            texts += [_decode_text(vocabulary, row, eos_id) for row in tokens[:real]]
            bar.update(real)
    return texts


def decode_task(
    model: T5,
    params: PyTree,
    partitioner: Partitioner,
    task: seqio.Task,
    split: str,
    inputs_length: int,
    batch_size: int,
    max_decode_length: int,
) -> list[dict[str, str]]:
    """Greedy-decodes every example of a task's split: [{id, input, target, prediction}]."""
    ds = task.get_dataset(
        {"inputs": inputs_length, "targets": max_decode_length},
        split=split,
        shuffle=False,
        num_epochs=1,
    )
    examples = list(ds.as_numpy_iterator())
    vocabulary = task.output_features["targets"].vocabulary
    predictions = decode_batches(
        model,
        params,
        partitioner,
        vocabulary,
        [ex["inputs"] for ex in examples],
        inputs_length,
        batch_size,
        max_decode_length,
    )
    return [
        {
            "id": ex["id"].decode(),
            "input": ex["inputs_pretokenized"].decode(),
            "target": ex["targets_pretokenized"].decode(),
            "prediction": prediction,
        }
        for ex, prediction in zip(examples, predictions, strict=True)
    ]


def score(task: seqio.Task, rows: Sequence[Mapping[str, str]]) -> dict[str, float]:
    """Applies the task's postprocessor to targets and predictions, then its metrics."""
    targets = [task.postprocess_fn(r["target"], example=None, is_target=True) for r in rows]
    predictions = [
        task.postprocess_fn(r["prediction"], example=None, is_target=False) for r in rows
    ]
    results: dict[str, float] = {}
    for metric_fn in task.metric_fns:
        results.update({k: float(v) for k, v in metric_fn(targets, predictions).items()})
    return results
