"""Closed-set scoring (rank classification): the likeliest of an input's candidate labels.

As t5x's `score` mode and the t5 library's `rank_classification`: every candidate is scored
teacher-forced (candidate tokens + EOS as the decoder targets) and the prediction is the one
with the highest summed log-likelihood, or the highest mean per token when
`length_normalized`. The encoder runs once per input.

An input's candidates share one decoder row as a prefix tree: each distinct proper prefix of
a candidate (the empty one first) is one decoder position, whose input token is the prefix's
last token (0 for the empty one), whose position is the prefix's length, and which attends
only to the prefixes it extends. Its output is the distribution of the token after that
prefix, exactly as in the candidate's own teacher-forced pass, so a candidate's
log-likelihood sums its tokens' log-probabilities at the positions of its prefixes. Shared
prefixes (the empty one, at least) are computed once, and no candidate is padded to the
longest or repeats the encoder output.
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
    """Decoder row length that holds prefix trees of `sizes` (`tree_size`) positions, a
    multiple of `multiple`."""
    return -(-max(sizes, default=1) // multiple) * multiple


def pack_candidates(
    candidates: Sequence[Candidates], rows: int, length: int, width: int, label_length: int
) -> dict[str, np.ndarray]:
    """Row i of the decoder features holds the prefix tree of `candidates[i]`; rows past the
    candidates, and the end of each row, are padding.

    decoder_input_tokens, decoder_positions: [rows, length] per prefix;
    decoder_self_attention_mask: [rows, length, length], a prefix to itself and the prefixes it
    extends; candidate_prefixes, candidate_tokens: [rows, width, label_length], for each
    token of each candidate slot the index of the prefix it follows and the token (0 past a
    candidate's end and in unfilled slots).
    """
    features = {
        "decoder_input_tokens": np.zeros((rows, length), np.int32),
        "decoder_positions": np.zeros((rows, length), np.int32),
        "decoder_self_attention_mask": np.tile(np.eye(length, dtype=bool), (rows, 1, 1)),
        "candidate_prefixes": np.zeros((rows, width, label_length), np.int32),
        "candidate_tokens": np.zeros((rows, width, label_length), np.int32),
    }
    for row, labels in enumerate(candidates):
        prefixes, paths = prefix_tree(labels)
        index = {prefix: node for node, prefix in enumerate(prefixes)}
        mask = features["decoder_self_attention_mask"][row]
        for node, prefix in enumerate(prefixes):
            if prefix:  # what its parent (listed before it) sees, and itself
                features["decoder_input_tokens"][row, node] = prefix[-1]
                features["decoder_positions"][row, node] = len(prefix)
                mask[node] |= mask[index[prefix[:-1]]]
        for slot, (ids, path) in enumerate(zip(labels, paths, strict=True)):
            features["candidate_prefixes"][row, slot, : len(ids)] = path
            features["candidate_tokens"][row, slot, : len(ids)] = ids
    return features


@functools.partial(jax.jit, static_argnames=("model", "length_normalized"))
def candidate_log_likelihoods(
    model: T5,
    params: Params,
    encoder_input_tokens: Array,
    packed: dict[str, Array],
    length_normalized: bool = False,
) -> Array:
    """[batch, width] float32 log-likelihoods of the candidates packed by `pack_candidates`;
    a candidate slot an input does not fill gets -inf."""
    encoded = model.apply(
        {"params": params}, encoder_input_tokens, enable_dropout=False, method="encode"
    )
    logits = model.apply(
        {"params": params},
        encoded,
        encoder_input_tokens,
        packed["decoder_input_tokens"],
        decoder_positions=packed["decoder_positions"],
        decoder_self_attention_mask=packed["decoder_self_attention_mask"],
        enable_dropout=False,
        method="decode",
    )
    batch, length, vocab = logits.shape
    prefixes, tokens = packed["candidate_prefixes"], packed["candidate_tokens"]
    flat = (prefixes * vocab + tokens).reshape(batch, -1)
    picked = jnp.take_along_axis(logits.reshape(batch, length * vocab), flat, axis=1)
    normalizers = jnp.take_along_axis(
        jax.nn.logsumexp(logits, axis=-1), prefixes.reshape(batch, -1), axis=1
    )
    in_candidate = tokens > 0
    log_probs = (picked - normalizers).reshape(tokens.shape)
    total = jnp.sum(jnp.where(in_candidate, log_probs, 0.0), axis=-1)
    count = jnp.sum(in_candidate, axis=-1)
    if length_normalized:
        total = total / jnp.maximum(count, 1)
    return jnp.where(count > 0, total, -jnp.inf)
