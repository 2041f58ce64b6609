"""Closed-set scoring (rank classification): the likeliest of an input's candidate labels.

As t5x's `score` mode and the t5 library's `rank_classification`: every candidate is scored
teacher-forced (candidate tokens + EOS as the decoder targets) and the prediction is the one
with the highest summed log-likelihood, or the highest mean per token when
`length_normalized`. The encoder runs once per input; all its candidates go through the
decoder together, in one batched pass.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from dsbs_jax.decoding import shift_right
from dsbs_jax.models.t5 import T5

Array = jax.Array
Params = Any


@functools.partial(jax.jit, static_argnames=("model", "length_normalized"))
def candidate_log_likelihoods(
    model: T5,
    params: Params,
    encoder_input_tokens: Array,
    candidate_tokens: Array,
    length_normalized: bool = False,
) -> Array:
    """[batch, candidates] float32 log-likelihoods of each input's candidates.

    `candidate_tokens` is [batch, candidates, length] int32 (EOS included, 0-padded); an
    all-padding candidate (an input with fewer candidates than the batch's widest) gets -inf.
    """
    batch, num_candidates, length = candidate_tokens.shape
    encoded = model.apply(
        {"params": params}, encoder_input_tokens, enable_dropout=False, method="encode"
    )
    targets = candidate_tokens.reshape(batch * num_candidates, length)
    logits = model.apply(
        {"params": params},
        jnp.repeat(encoded, num_candidates, axis=0),
        jnp.repeat(encoder_input_tokens, num_candidates, axis=0),
        shift_right(targets),
        targets,
        enable_dropout=False,
        method="decode",
    )
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    token_log_likelihoods = target_logits - jax.nn.logsumexp(logits, axis=-1)
    mask = targets != 0
    total = jnp.sum(jnp.where(mask, token_log_likelihoods, 0.0), axis=-1)
    count = jnp.sum(mask, axis=-1)
    if length_normalized:
        total = total / jnp.maximum(count, 1)
    return jnp.where(count > 0, total, -jnp.inf).reshape(batch, num_candidates)
