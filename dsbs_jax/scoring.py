"""Closed-set scoring (rank classification): the likeliest of an input's candidate labels.

As t5x's `score` mode and the t5 library's `rank_classification`: every candidate is scored
teacher-forced (candidate tokens + EOS as the decoder targets) and the prediction is the one
with the highest summed log-likelihood, or the highest mean per token when
`length_normalized`. The encoder runs once per input. An input's candidates are packed end to
end into one decoder row, each its own segment (attending only to itself, positions from 0,
all of them to the whole input), so one decoder pass scores them all without padding each
to the longest or repeating the encoder output once per candidate.
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
PACKED_FEATURES = (
    "decoder_target_tokens",
    "decoder_input_tokens",
    "decoder_segment_ids",
    "decoder_positions",
)


def packed_length(candidates: Sequence[Sequence[Sequence[int]]], multiple: int = 8) -> int:
    """Decoder row length that holds every input's candidates end to end."""
    longest = max((sum(len(ids) for ids in c) for c in candidates), default=1)
    return -(-longest // multiple) * multiple


def pack_candidates(
    candidates: Sequence[Sequence[Sequence[int]]], rows: int, length: int
) -> dict[str, np.ndarray]:
    """[rows, length] decoder features: row i holds `candidates[i]` (token ids, EOS included)
    end to end; candidate j is segment j + 1, shifted right on its own; rows past the
    candidates, and the end of each row, are padding (0)."""
    packed = {name: np.zeros((rows, length), np.int32) for name in PACKED_FEATURES}
    for row, labels in enumerate(candidates):
        start = 0
        for number, ids in enumerate(labels, start=1):
            end = start + len(ids)
            packed["decoder_target_tokens"][row, start:end] = ids
            packed["decoder_input_tokens"][row, start + 1 : end] = ids[:-1]
            packed["decoder_segment_ids"][row, start:end] = number
            packed["decoder_positions"][row, start:end] = np.arange(len(ids))
            start = end
    return packed


@functools.partial(jax.jit, static_argnames=("model", "num_candidates", "length_normalized"))
def candidate_log_likelihoods(
    model: T5,
    params: Params,
    encoder_input_tokens: Array,
    packed: dict[str, Array],
    num_candidates: int,
    length_normalized: bool = False,
) -> Array:
    """[batch, num_candidates] float32 log-likelihoods of the candidates packed by
    `pack_candidates`; a candidate slot an input does not fill gets -inf."""
    encoded = model.apply(
        {"params": params}, encoder_input_tokens, enable_dropout=False, method="encode"
    )
    targets = packed["decoder_target_tokens"]
    logits = model.apply(
        {"params": params},
        encoded,
        encoder_input_tokens,
        packed["decoder_input_tokens"],
        targets,
        decoder_segment_ids=packed["decoder_segment_ids"],
        decoder_positions=packed["decoder_positions"],
        enable_dropout=False,
        method="decode",
    )
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    token_log_likelihoods = target_logits - jax.nn.logsumexp(logits, axis=-1)
    segments = packed["decoder_segment_ids"]
    in_candidate = segments[..., None] == jnp.arange(1, num_candidates + 1)  # [b, len, cand]
    total = jnp.einsum("bl,blc->bc", token_log_likelihoods, in_candidate.astype(jnp.float32))
    count = jnp.sum(in_candidate, axis=1)
    if length_normalized:
        total = total / jnp.maximum(count, 1)
    return jnp.where(count > 0, total, -jnp.inf)
