"""Evaluation of a student on a split of its SeqIO tasks: teacher-forced losses, and labels
(generated, or scored among candidates) measured by the tasks' metrics.

`SplitEvaluator` is what validation, test and `python -m dsbs_jax.eval` run, so the same
checkpoint and split give the same figures everywhere. Labels come from
`dsbs_jax.label_prediction.LabelPredictor`, which `infer` calls too. Batches have a fixed size
(the last one padded with empty rows), so each step compiles once per input length. Every host
reads the whole (small) evaluation split and feeds its slice of each global batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import seqio

from dsbs_jax import losses
from dsbs_jax.data import choices
from dsbs_jax.data.feature_converters import StepByStepFeatureConverter
from dsbs_jax.errors import UserError
from dsbs_jax.input_pipeline import without_autograph
from dsbs_jax.label_prediction import LabelEvaluation, LabelPredictor, progress_bar
from dsbs_jax.models.t5 import T5
from dsbs_jax.partitioning import Partitioner
from dsbs_jax.roles import PREDICT_PREFIX

PyTree = Any
EvalStep = Callable[[PyTree, Mapping[str, jax.Array]], Mapping[str, jax.Array]]


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


def metric_key(split: str, task_name: str, metric: str, mode: str) -> str:
    """'validation/dsbs_cqa_label_llm/accuracy' when generated, '.../score/accuracy' when scored."""
    return (
        f"{split}/{task_name}/{metric}"
        if mode == "generate"
        else f"{split}/{task_name}/{mode}/{metric}"
    )


def primary_metric(mixture_or_task_name: str, split: str, labels: LabelEvaluation) -> str | None:
    """The metric that picks the best checkpoint, e.g. 'validation/dsbs_cqa_label_llm/accuracy':
    the first label task's first metric in the first label mode; None without label tasks."""
    tasks = metric_tasks(mixture_or_task_name)
    if not tasks:
        return None
    return metric_key(split, tasks[0].name, tasks[0].metric_fns[0].__name__, labels.modes[0])


def teacher_forced(
    eval_step: EvalStep,
    params: PyTree,
    partitioner: Partitioner,
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    split: str,
    batch_size: int,
    loss_weights: Mapping[int, float] | None = None,
) -> dict[str, float]:
    """Label and rationale losses and token accuracies over a whole split, with the metrics'
    definitions of training (`losses.summarise_loss_sums`); `loss_weights` as training's
    (None: gin's `step_by_step_loss_weights`)."""
    ds = without_autograph(seqio.get_dataset)(
        mixture_or_task_name,
        task_feature_lengths,
        StepByStepFeatureConverter(pack=False, loss_weights=loss_weights),
        dataset_split=split,
        shuffle=False,
        num_epochs=1,
    )
    totals: dict[str, np.ndarray] | None = None
    size = int(ds.cardinality())  # negative when tf.data cannot tell
    with progress_bar(size if size >= 0 else None, f"{split} losses") as bar:
        for batch, real in fixed_size_batches(ds.as_numpy_iterator(), batch_size):
            sums = jax.device_get(
                eval_step(params, partitioner.shard_batch(partitioner.host_slice(batch)))
            )
            totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
            bar.update(real)
    if totals is None:
        raise UserError(f"split '{split}' of {mixture_or_task_name} has no examples")
    return {k: float(v) for k, v in losses.summarise_loss_sums(totals).items()}


def read_split(
    task: seqio.Task, split: str, inputs_length: int, max_decode_length: int
) -> list[dict[str, Any]]:
    """A task's split as tokenized examples, in order: read once and kept for every
    evaluation of a run (`SplitEvaluator`)."""
    ds = without_autograph(task.get_dataset)(
        {"inputs": inputs_length, "targets": max_decode_length},
        split=split,
        shuffle=False,
        num_epochs=1,
    )
    return list(ds.as_numpy_iterator())


def label_rows(task: seqio.Task, split: str, examples: Sequence[Mapping[str, Any]]) -> list[dict]:
    """{id, input, choices} of each example: its raw input (task prefix removed) and the
    candidate labels its cache record lists, as `infer` reads rows of an input file."""
    cached = choices.cached_choices(task.source.dataset, split)
    return [
        {
            "id": ex["id"].decode(),
            "input": ex["inputs_pretokenized"].decode().removeprefix(PREDICT_PREFIX),
            "choices": cached.get(ex["id"].decode(), ()),
        }
        for ex in examples
    ]


def candidate_labels(dataset: str, rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, ...]]:
    """Each row's candidate labels (`dsbs_jax.data.choices`); raises if one has none."""
    return choices.candidates_of(dataset, ((r["id"], r["input"], r["choices"]) for r in rows))


def predict_labels(
    mode: str,
    predictor: LabelPredictor,
    task: seqio.Task,
    split: str,
    examples: Sequence[Mapping[str, Any]],
) -> list[dict[str, str]]:
    """Predicts the label of every example of a task's split (`read_split`), generated or
    scored: [{id, input, target, prediction}]."""
    candidates = (
        candidate_labels(task.source.dataset, label_rows(task, split, examples))
        if mode == "score"
        else None
    )
    predictions = predictor(mode, [ex["inputs"] for ex in examples], candidates)
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


class SplitEvaluator:
    """A split's figures for a student's parameters: the mixture's teacher-forced losses, and
    label metrics in each mode of `labels`. A task's split is read once, at its first
    evaluation, and kept for the later ones. `loss_weights` weigh the losses as in training
    (None: gin's `step_by_step_loss_weights`). Batches have `batch_size` rows, those of the
    teacher-forced losses `loss_batch_size` (None: `batch_size`)."""

    def __init__(
        self,
        model: T5,
        partitioner: Partitioner,
        eval_step: EvalStep,
        mixture_or_task_name: str,
        task_feature_lengths: Mapping[str, int],
        batch_size: int,
        max_decode_length: int | None,
        labels: LabelEvaluation,
        loss_weights: Mapping[int, float] | None = None,
        loss_batch_size: int | None = None,
    ) -> None:
        self._model, self._partitioner, self._eval_step = model, partitioner, eval_step
        self._loss_weights = loss_weights
        self._name, self._lengths = mixture_or_task_name, task_feature_lengths
        self._batch_size = batch_size
        self._loss_batch_size = loss_batch_size or batch_size
        self._max_decode_length = max_decode_length or task_feature_lengths["targets"]
        self._labels = labels
        self._examples: dict[tuple[str, str], list[dict[str, Any]]] = {}

    def __call__(self, params: PyTree, split: str) -> dict[str, float]:
        losses_ = teacher_forced(
            self._eval_step,
            params,
            self._partitioner,
            self._name,
            self._lengths,
            split,
            self._loss_batch_size,
            self._loss_weights,
        )
        results = {f"{split}/{k}": v for k, v in losses_.items()}
        for task in metric_tasks(self._name):
            if (task.name, split) not in self._examples:
                self._examples[task.name, split] = read_split(
                    task, split, self._lengths["inputs"], self._max_decode_length
                )
            predictor = LabelPredictor(
                self._model,
                params,
                self._partitioner,
                task.output_features["targets"].vocabulary,
                self._lengths["inputs"],
                self._max_decode_length,
                self._labels.batch_size or self._batch_size,
                self._labels.length_normalized,
            )
            for mode in self._labels.modes:
                rows = predict_labels(
                    mode, predictor, task, split, self._examples[task.name, split]
                )
                results.update(
                    {metric_key(split, task.name, k, mode): v for k, v in score(task, rows).items()}
                )
        return results
