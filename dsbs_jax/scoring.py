"""Closed-set scoring (rank classification): the likeliest of an input's candidate labels.

As t5x's `score` mode and the t5 library's `rank_classification`: every candidate is scored
teacher-forced (candidate tokens + EOS as the decoder targets) and the prediction is the one
with the highest summed log-likelihood, or the highest mean per token when
`length_normalized`. The encoder runs once per input.

An input's candidates form one prefix tree: each distinct proper prefix of a candidate (the
empty one first) is one decoder position, whose input token is the prefix's
last token (0 for the empty one), whose position is the prefix's length, and which attends
only to the prefixes it extends. Its output is the distribution of the token after that
prefix, exactly as in the candidate's own teacher-forced pass, so a candidate's
log-likelihood sums its tokens' log-probabilities at the positions of its prefixes. Shared
prefixes (the empty one, at least) are computed once, and no candidate is padded to the
longest or repeats the encoder output. Several inputs' trees share a decoder row, one
segment each, every segment attending only to its own input's encoding, so rows are nearly
full however the trees' sizes vary.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsbs_jax.models.t5 import T5

Array = jax.Array
Params = Any
Candidates = Sequence[Sequence[int]]  # one input's candidates: token ids, EOS included


def prefix_tree(candidates: Candidates) -> tuple[list[tuple[int, ...]], list[list[int]]]:
    """(the distinct proper prefixes of `candidates`, each after the prefixes it extends;
    per candidate, the index of each of its prefixes, one per token)."""
    index: dict[tuple[int, ...], int] = {}
    paths = []
    for ids in candidates:
        path = []
        for end in range(len(ids)):
            prefix = tuple(ids[:end])
            path.append(index.setdefault(prefix, len(index)))
        paths.append(path)
    return list(index), paths


def tree_size(candidates: Candidates) -> int:
    """Decoder positions the candidates' prefix tree takes."""
    return len(prefix_tree(candidates)[0])


def tree_length(sizes: Sequence[int], multiple: int = 4) -> int:
    """Decoder row length that holds `sizes` positions (a row's total of `tree_size`s), a
    multiple of `multiple`."""
    return -(-max(sizes, default=1) // multiple) * multiple


def trees_per_row(batch_size: int, data_shards: int, most: int = 4) -> int:
    """How many inputs' prefix trees share a decoder row: the largest power of two up to
    `most` that leaves every data shard whole decoder rows of `batch_size` inputs."""
    group = most
    while group > 1 and batch_size % (group * data_shards):
        group //= 2
    return group


def balanced_groups(sizes: Sequence[int], group: int) -> list[list[int]]:
    """Indices of `sizes` in groups of `group` whose totals are close: largest first, each
    into the group with the smallest total that has room. `len(sizes)` is a multiple of
    `group`."""
    groups: list[list[int]] = [[] for _ in range(len(sizes) // group)]
    totals = [0] * len(groups)
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        room = min(
            (g for g in range(len(groups)) if len(groups[g]) < group), key=totals.__getitem__
        )
        groups[room].append(index)
        totals[room] += sizes[index]
    return groups


def pack_candidates(
    groups: Sequence[Sequence[Candidates]], length: int, width: int, label_length: int
) -> dict[str, np.ndarray]:
    """Decoder row i holds the prefix trees of the inputs of `groups[i]` one after another,
    the j-th as segment j + 1 (which sees only encoder row `i * group + j`, see
    `candidate_log_likelihoods`); the end of each row is padding (segment 0).

    decoder_input_tokens, decoder_positions, decoder_segment_ids: [rows, length] per prefix;
    decoder_self_attention_mask: [rows, length, length], a prefix to itself and the prefixes it
    extends; candidate_prefixes, candidate_tokens: [rows, group * width, label_length], for
    each token of each input's candidate slots the position of the prefix it follows and the
    token (0 past a candidate's end and in unfilled slots).
    """
    rows, group = len(groups), max(len(g) for g in groups)
    features = {
        "decoder_input_tokens": np.zeros((rows, length), np.int32),
        "decoder_positions": np.zeros((rows, length), np.int32),
        "decoder_segment_ids": np.zeros((rows, length), np.int32),
        "decoder_self_attention_mask": np.tile(np.eye(length, dtype=bool), (rows, 1, 1)),
        "candidate_prefixes": np.zeros((rows, group * width, label_length), np.int32),
        "candidate_tokens": np.zeros((rows, group * width, label_length), np.int32),
    }
    for row, members in enumerate(groups):
        start = 0
        for segment, labels in enumerate(members):
            prefixes, paths = prefix_tree(labels)
            node = {prefix: start + n for n, prefix in enumerate(prefixes)}
            mask = features["decoder_self_attention_mask"][row]
            features["decoder_segment_ids"][row, start : start + len(prefixes)] = segment + 1
            for prefix, at in node.items():
                if prefix:  # what its parent (listed before it) sees, and itself
                    features["decoder_input_tokens"][row, at] = prefix[-1]
                    features["decoder_positions"][row, at] = len(prefix)
                    mask[at] |= mask[node[prefix[:-1]]]
            for slot, (ids, path) in enumerate(zip(labels, paths, strict=True)):
                features["candidate_prefixes"][row, segment * width + slot, : len(ids)] = [
                    start + p for p in path
                ]
                features["candidate_tokens"][row, segment * width + slot, : len(ids)] = ids
            start += len(prefixes)
    return features


def pack_batch(
    encoder_input_tokens: np.ndarray,
    candidates: Sequence[Candidates],
    sizes: Sequence[int],
    group: int,
    width: int,
    label_length: int,
) -> tuple[list[int], dict[str, np.ndarray]]:
    """A batch's features for `candidate_log_likelihoods`: (the batch's rows in the order the
    features hold them, the features, `encoder_input_tokens` reordered among them).

    Input i (`encoder_input_tokens[i]`, `candidates[i]`, tree `sizes[i]`) joins a group of
    `group` inputs of about the same tree total (`balanced_groups`), one group per decoder
    row (`pack_candidates`); rows past `candidates` are padding.
    """
    rows = len(encoder_input_tokens)
    members = [*candidates, *[[]] * (rows - len(candidates))]
    totals = [*sizes, *[0] * (rows - len(sizes))]
    groups = balanced_groups(totals, group)
    order = [row for g in groups for row in g]
    features = pack_candidates(
        [[members[row] for row in g] for g in groups],
        tree_length([sum(totals[row] for row in g) for g in groups]),
        width,
        label_length,
    )
    features["encoder_input_tokens"] = encoder_input_tokens[order]
    return order, features


@functools.partial(jax.jit, static_argnames=("model", "length_normalized"))
def candidate_log_likelihoods(
    model: T5,
    params: Params,
    encoder_input_tokens: Array,
    packed: dict[str, Array],
    length_normalized: bool = False,
) -> Array:
    """[inputs, width] float32 log-likelihoods of the candidates packed by `pack_candidates`
    for `encoder_input_tokens` ([inputs, length], `group` consecutive rows per decoder row);
    a candidate slot an input does not fill gets -inf.

    Decoder row i attends to the encodings of inputs `i * group` to `i * group + group - 1`
    laid end to end, each input's segment to its own.
    """
    encoded = model.apply(
        {"params": params}, encoder_input_tokens, enable_dropout=False, method="encode"
    )
    inputs, inputs_length = encoder_input_tokens.shape
    rows, length = packed["decoder_input_tokens"].shape
    group = inputs // rows
    key_tokens = encoder_input_tokens.reshape(rows, group * inputs_length)
    key_segments = jnp.broadcast_to(
        jnp.repeat(jnp.arange(1, group + 1, dtype=jnp.int32), inputs_length), key_tokens.shape
    )
    logits = model.apply(
        {"params": params},
        encoded.reshape(rows, group * inputs_length, encoded.shape[-1]),
        key_tokens,
        packed["decoder_input_tokens"],
        encoder_segment_ids=key_segments,
        decoder_segment_ids=packed["decoder_segment_ids"],
        decoder_positions=packed["decoder_positions"],
        decoder_self_attention_mask=packed["decoder_self_attention_mask"],
        enable_dropout=False,
        method="decode",
    )
    vocab = logits.shape[-1]
    prefixes, tokens = packed["candidate_prefixes"], packed["candidate_tokens"]
    flat = (prefixes * vocab + tokens).reshape(rows, -1)
    picked = jnp.take_along_axis(logits.reshape(rows, length * vocab), flat, axis=1)
    normalizers = jnp.take_along_axis(
        jax.nn.logsumexp(logits, axis=-1), prefixes.reshape(rows, -1), axis=1
    )
    in_candidate = tokens > 0
    log_probs = (picked - normalizers).reshape(tokens.shape)
    total = jnp.sum(jnp.where(in_candidate, log_probs, 0.0), axis=-1)
    count = jnp.sum(in_candidate, axis=-1)
    if length_normalized:
        total = total / jnp.maximum(count, 1)
    return jnp.where(count > 0, total, -jnp.inf).reshape(inputs, -1)
