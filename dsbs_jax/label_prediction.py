"""Predicting labels with a student: greedy decoding or closed-set scoring, batched for speed.

Labels are predicted the same way for validation, test (`dsbs_jax.evaluation`) and `infer`: a
`LabelPredictor` takes tokenized inputs, and candidate labels in score mode, and gives the
label texts. "generate" decodes greedily with the key/value cache; "score" picks the
likeliest candidate (`dsbs_jax.scoring`). Inputs of similar length share a batch and batches
come from a small grid of padded lengths, so each program compiles a few times per run. Every
host feeds its slice of each global batch; results are gathered back to all hosts.

This module needs JAX alone: vocabularies are any object with SeqIO's `encode`, `decode` and
`eos_id`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import gin
import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from dsbs_jax import decoding, scoring
from dsbs_jax.errors import UserError
from dsbs_jax.models.t5 import T5
from dsbs_jax.partitioning import Partitioner

PyTree = Any


class Vocabulary(Protocol):
    """What label prediction needs of a vocabulary (a `seqio.Vocabulary` has it)."""

    eos_id: int

    def encode(self, text: str) -> Sequence[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


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
        raise UserError(
            f"label_evaluation.modes must be one or more of {MODES}, got {tuple(modes)!r}"
        )
    return LabelEvaluation(tuple(modes), length_normalized, batch_size)


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


def progress_bar(total: int | None, desc: str, unit: str = "ex") -> tqdm:
    """A bar on host 0 for a pass over `total` items, so no long pass is silent."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        leave=False,
        disable=jax.process_index() != 0,
    )


def decode_text(vocabulary: Vocabulary, tokens: np.ndarray, eos_id: int) -> str:
    ids = tokens.tolist()
    if eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return vocabulary.decode(ids)


def decode_batches(
    model: T5,
    params: PyTree,
    partitioner: Partitioner,
    vocabulary: Vocabulary,
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
    with progress_bar(len(inputs), "decode") as bar:
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
    with progress_bar(len(inputs), "score") as bar:

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


def score_texts(
    model: T5,
    params: PyTree,
    partitioner: Partitioner,
    vocabulary: Vocabulary,
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


@dataclasses.dataclass(frozen=True)
class LabelPredictor:
    """Predicts the labels of tokenized inputs with a student's parameters.

    The one place that chooses between generating and scoring: validation, test and `infer`
    all call it.
    """

    model: T5
    params: PyTree
    partitioner: Partitioner
    vocabulary: Vocabulary
    inputs_length: int
    max_decode_length: int
    batch_size: int
    length_normalized: bool = False

    def __call__(
        self,
        mode: str,
        inputs: Sequence[Sequence[int]],
        candidates: Sequence[Sequence[str]] | None = None,
    ) -> list[str]:
        """The label text of each input (token ids, EOS included), in order: decoded, or in
        score mode the likeliest of its `candidates`."""
        if mode == "score":
            if candidates is None:
                raise ValueError("score mode needs each input's candidate labels")
            return score_texts(
                self.model,
                self.params,
                self.partitioner,
                self.vocabulary,
                inputs,
                candidates,
                self.inputs_length,
                self.batch_size,
                self.max_decode_length,
                self.length_normalized,
            )
        return decode_batches(
            self.model,
            self.params,
            self.partitioner,
            self.vocabulary,
            inputs,
            self.inputs_length,
            self.batch_size,
            self.max_decode_length,
        )

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Encoder inputs for raw texts: their ids and EOS, cut at `inputs_length`."""
        eos = [self.vocabulary.eos_id]
        return [(list(self.vocabulary.encode(t)) + eos)[: self.inputs_length] for t in texts]
