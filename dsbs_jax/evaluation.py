"""Evaluation on a split: teacher-forced losses, and labels (generated, or scored among
candidates) measured by seqio metrics.

Batches have a fixed size (the last one padded with empty rows) so each step
compiles once per input length. Every host reads the whole (small) evaluation split and feeds
its slice of each global batch; decoded tokens are gathered back to all hosts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import gin
import jax
import numpy as np
import seqio
from jax.experimental import multihost_utils
from tqdm import tqdm

from dsbs_jax import decoding, losses, scoring
from dsbs_jax.data import choices
from dsbs_jax.data.feature_converters import StepByStepFeatureConverter
from dsbs_jax.data.preprocessors import PREDICT_PREFIX
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


def decode_text(vocabulary: seqio.Vocabulary, tokens: np.ndarray, eos_id: int) -> str:
    ids = tokens.tolist()
    if eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return vocabulary.decode(ids)


MIN_PADDED_LENGTH = 32
# Score mode's program compiles in a fraction of the decoding loop's time, so its batches take
# a finer grid of lengths (less padding, twice the shapes).
SCORE_STEPS_PER_OCTAVE = 8
MODES = ("generate", "score")


@dataclasses.dataclass(frozen=True)
class LabelEvaluation:
    """How labels are predicted for validation, test and `infer` (see `label_evaluation`)."""

    modes: tuple[str, ...]
    length_normalized: bool
    batch_size: int | None


@gin.configurable
def label_evaluation(
    modes: Sequence[str] = ("generate",),
    length_normalized: bool = False,
    batch_size: int | None = None,
) -> LabelEvaluation:
    """Label prediction modes, in order: "generate" (greedy decoding) and/or "score".

    "score" picks the likeliest of each input's candidate labels (`dsbs_jax.scoring`,
    candidates from `dsbs_jax.data.choices`), by summed log-likelihood or, when
    `length_normalized`, by mean log-likelihood per token. Each mode's metrics are reported
    (see `metric_key`); the first mode's picks the best checkpoint and `infer`'s labels.
    `batch_size` (inputs per batch) None: the run's evaluation batch size.
    """
    if isinstance(modes, str):
        modes = (modes,)
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown:
        raise ValueError(
            f"label_evaluation.modes must be one or more of {MODES}, got {tuple(modes)!r}"
        )
    return LabelEvaluation(tuple(modes), length_normalized, batch_size)


def metric_key(split: str, task_name: str, metric: str, mode: str) -> str:
    """'validation/dsbs_cqa_label_llm/accuracy' when generated, '.../score/accuracy' when scored."""
    return (
        f"{split}/{task_name}/{metric}"
        if mode == "generate"
        else f"{split}/{task_name}/{mode}/{metric}"
    )


def padded_length(longest: int, inputs_length: int, steps_per_octave: int = 4) -> int:
    """The length a batch whose longest input has `longest` tokens is padded to.

    Steps of 1/`steps_per_octave` of an octave from MIN_PADDED_LENGTH up to
    `inputs_length`. Four (32, 40, 48, 56, 64, 80, 96, ...): at most a quarter more tokens
    than the longest input, four compiled shapes per doubling, each a multiple of 8. Eight
    (32, 36, 40, ..., 64, 72, ...): an eighth more at most, twice the shapes.
    """
    length = MIN_PADDED_LENGTH
    while length < longest:
        length += (1 << (length.bit_length() - 1)) // steps_per_octave
    return max(min(length, inputs_length), 1)


def length_sorted_batches(
    inputs: Sequence[Sequence[int]],
    inputs_length: int,
    batch_size: int,
    sizes: Sequence[int] | None = None,
    row_multiple: int | None = None,
    steps_per_octave: int = 4,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (positions in `inputs`, [rows, padded length] tokens), shortest first.

    Inputs of similar length share a batch, so few are padded far: they are ordered by
    padded length (`padded_length` with `steps_per_octave`), then by `sizes` when given
    (the decoder's work per input, so batches of one padded length also share decoder
    lengths), then by length.
    Batches have `batch_size` rows but the one partial batch, which comes first, among the
    shortest inputs: its rows are its inputs' count rounded up to a multiple of
    `row_multiple` (None: `batch_size`, one shape fewer to compile), the rest all padding.
    Inputs longer than `inputs_length` are truncated.
    """
    lengths = [min(len(ids), inputs_length) for ids in inputs]
    buckets = [padded_length(n, inputs_length, steps_per_octave) for n in lengths]
    order = np.lexsort((lengths, np.zeros(len(inputs)) if sizes is None else sizes, buckets))
    first = len(order) % batch_size or batch_size
    multiple = row_multiple or batch_size
    ends = range(first, len(order) + 1, batch_size)
    for start, end in zip([0, *ends], ends, strict=False):
        positions = order[start:end]
        longest = max(lengths[i] for i in positions)
        rows = min(-(-len(positions) // multiple) * multiple, batch_size)
        length = padded_length(longest, inputs_length, steps_per_octave)
        tokens = np.zeros((rows, length), np.int32)
        for row, i in enumerate(positions):
            tokens[row, : lengths[i]] = list(inputs[i])[: lengths[i]]
        yield positions, tokens


def _progress(total: int, desc: str) -> tqdm:
    return tqdm(
        total=total,
        desc=desc,
        unit="ex",
        leave=False,
        disable=total < 512 or jax.process_index() != 0,
    )


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

    Batches group inputs of similar length (`length_sorted_batches`); the decoding loop of
    a batch stops once every row has produced EOS.
    """
    eos_id = vocabulary.eos_id
    texts: list[str] = [""] * len(inputs)
    with _progress(len(inputs), "decode") as bar:
        for positions, tokens in length_sorted_batches(inputs, inputs_length, batch_size):
            batch = {"encoder_input_tokens": tokens}
            local = partitioner.shard_batch(partitioner.host_slice(batch))["encoder_input_tokens"]
            with partitioner.activation_rules():
                decoded = decoding.greedy_decode(model, params, local, max_decode_length, eos_id)
            decoded = multihost_utils.process_allgather(decoded, tiled=True)
            for position, row in zip(positions, decoded, strict=False):
                texts[position] = decode_text(vocabulary, row, eos_id)
            bar.update(len(positions))
    return texts


def score_batches(
    model: T5,
    params: PyTree,
    partitioner: Partitioner,
    inputs: Sequence[Sequence[int]],
    candidates: Sequence[Sequence[Sequence[int]]],
    inputs_length: int,
    batch_size: int,
    length_normalized: bool = False,
) -> list[int]:
    """Index of the likeliest candidate of each input (`candidates[i]`: token ids, EOS
    included), in order.

    A batch's inputs share decoder rows in groups (`scoring.trees_per_row`,
    `scoring.pack_batch`) of about the same prefix-tree total, so rows are nearly full.
    Every batch has as many candidate slots as the widest input, as many tokens per slot as
    the longest candidate, and decoder rows as long as its largest group, so few programs
    are compiled. Each batch is packed while the one before it runs.
    """
    if not inputs:
        return []
    width = max(len(c) for c in candidates)
    label_length = max(len(ids) for c in candidates for ids in c)
    sizes = [scoring.tree_size(c) for c in candidates]
    data_shards = partitioner.mesh.shape["data"]
    group = scoring.trees_per_row(batch_size, data_shards)
    batches = length_sorted_batches(
        inputs,
        inputs_length,
        batch_size,
        sizes,
        row_multiple=group * data_shards,
        steps_per_octave=SCORE_STEPS_PER_OCTAVE,
    )
    best = [0] * len(inputs)
    pending = None
    with _progress(len(inputs), "score") as bar:

        def record(positions: np.ndarray, order: list[int], scores: jax.Array) -> None:
            picks = np.argmax(multihost_utils.process_allgather(scores, tiled=True), axis=-1)
            for row, pick in zip(order, picks, strict=True):
                if row < len(positions):
                    best[positions[row]] = int(pick)
            bar.update(len(positions))

        for positions, tokens in batches:
            order, features = scoring.pack_batch(
                tokens,
                [candidates[i] for i in positions],
                [sizes[i] for i in positions],
                group,
                width,
                label_length,
            )
            encoder = {"encoder_input_tokens": features.pop("encoder_input_tokens")}
            local = partitioner.shard_batch(partitioner.host_slice(features))
            local_encoder = partitioner.shard_batch(partitioner.host_slice(encoder))
            with partitioner.activation_rules():
                scores = scoring.candidate_log_likelihoods(
                    model, params, local_encoder["encoder_input_tokens"], local, length_normalized
                )
            if pending:  # read the previous batch while this one runs
                record(*pending)
            pending = (positions, order, scores)
        if pending:
            record(*pending)
    return best


def candidate_labels(dataset: str, split: str, examples: Sequence[Mapping[str, Any]]) -> list:
    """Each example's candidate labels (`dsbs_jax.data.choices`); raises if one has none."""
    cached = choices.cached_choices(dataset, split)
    return choices.candidates_of(
        dataset,
        (
            (
                ex["id"].decode(),
                ex["inputs_pretokenized"].decode().removeprefix(PREDICT_PREFIX),
                cached.get(ex["id"].decode(), ()),
            )
            for ex in examples
        ),
    )


def score_texts(
    model: T5,
    params: PyTree,
    partitioner: Partitioner,
    vocabulary: seqio.Vocabulary,
    inputs: Sequence[Sequence[int]],
    candidates: Sequence[Sequence[str]],
    inputs_length: int,
    batch_size: int,
    max_label_length: int,
    length_normalized: bool = False,
) -> list[str]:
    """The likeliest of each input's candidate label texts (closed-set scoring)."""
    eos = [vocabulary.eos_id]
    tokenized = [
        [(vocabulary.encode(c) + eos)[:max_label_length] for c in labels] for labels in candidates
    ]
    picks = score_batches(
        model, params, partitioner, inputs, tokenized, inputs_length, batch_size, length_normalized
    )
    return [labels[pick] for labels, pick in zip(candidates, picks, strict=True)]


def read_split(
    task: seqio.Task, split: str, inputs_length: int, max_decode_length: int
) -> list[dict[str, Any]]:
    """A task's split as tokenized examples, in order: read once and kept for every
    evaluation of a run (`dsbs_jax.training.SplitEvaluator`)."""
    ds = task.get_dataset(
        {"inputs": inputs_length, "targets": max_decode_length},
        split=split,
        shuffle=False,
        num_epochs=1,
    )
    return list(ds.as_numpy_iterator())


def predict_labels(
    mode: str,
    model: T5,
    params: PyTree,
    partitioner: Partitioner,
    task: seqio.Task,
    split: str,
    examples: Sequence[Mapping[str, Any]],
    inputs_length: int,
    batch_size: int,
    max_decode_length: int,
    length_normalized: bool = False,
) -> list[dict[str, str]]:
    """Predicts the label of every example of a task's split (`read_split`), generated or
    scored: [{id, input, target, prediction}]."""
    vocabulary = task.output_features["targets"].vocabulary
    inputs = [ex["inputs"] for ex in examples]
    if mode == "score":
        predictions = score_texts(
            model,
            params,
            partitioner,
            vocabulary,
            inputs,
            candidate_labels(task.source.dataset, split, examples),
            inputs_length,
            batch_size,
            max_decode_length,
            length_normalized,
        )
    else:
        predictions = decode_batches(
            model,
            params,
            partitioner,
            vocabulary,
            inputs,
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
