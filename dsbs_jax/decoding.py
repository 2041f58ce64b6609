"""Greedy decoding for `dsbs_jax.models.t5.T5`.

t5x conventions: the decoder starts from token 0 (inputs are targets shifted right), a row
stops at `eos_id` (kept in the output) and every position after it is 0. `greedy_decode` uses
the key/value cache; `greedy_decode_no_cache` re-runs the whole decoder each step and is the
slow reference the cached path is tested against.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dsbs_jax.models.t5 import T5

Array = jax.Array
Params = Any
Cache = Any
# (cache, tokens decoded so far, step) -> (logits [batch, vocab] for `step`, updated cache)
NextLogits = Callable[[Cache, Array, Array], tuple[Array, Cache]]


class _LoopState(NamedTuple):
    step: Array
    tokens: Array
    done: Array
    cache: Cache


def shift_right(tokens: Array) -> Array:
    """Decoder inputs for `tokens`: the 0 start token, then the tokens minus the last."""
    return jnp.pad(tokens, ((0, 0), (1, 0)))[:, :-1]


def _encode(model: T5, params: Params, tokens: Array, segment_ids: Array | None) -> Array:
    return model.apply(
        {"params": params}, tokens, segment_ids, enable_dropout=False, method="encode"
    )


def init_cache(
    model: T5, params: Params, encoded: Array, encoder_input_tokens: Array, max_decode_length: int
) -> Cache:
    """Decoder cache for `max_decode_length` steps, before the first step.

    Self-attention keys/values are zeros; cross-attention keys/values are the encoder output's
    projections, computed here once rather than at every step. The cache-creating call runs
    the decoder over `max_decode_length` positions, but only the cache is kept: under `jit`
    (as in `greedy_decode`) that dead computation is removed and only the projections run.
    """

    def create(params: Params, encoded: Array, encoder_input_tokens: Array) -> Cache:
        decoder_inputs = jnp.zeros((encoded.shape[0], max_decode_length), jnp.int32)
        _, variables = model.apply(
            {"params": params},
            encoded,
            encoder_input_tokens,
            decoder_inputs,
            enable_dropout=False,
            decode=True,
            method="decode",
            mutable=["cache"],
        )
        return variables["cache"]

    return create(params, encoded, encoder_input_tokens)


def _greedy_loop(
    next_logits: NextLogits, cache: Cache, batch: int, max_decode_length: int, eos_id: int
) -> Array:
    """Picks the arg-max token each step until every row has produced `eos_id`."""

    def running(state: _LoopState) -> Array:
        return (state.step < max_decode_length) & ~jnp.all(state.done)

    def step(state: _LoopState) -> _LoopState:
        logits, cache = next_logits(state.cache, state.tokens, state.step)
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        token = jnp.where(state.done, 0, token)
        tokens = jax.lax.dynamic_update_slice_in_dim(
            state.tokens, token[:, None], state.step, axis=1
        )
        return _LoopState(state.step + 1, tokens, state.done | (token == eos_id), cache)

    start = _LoopState(
        step=jnp.zeros((), jnp.int32),
        tokens=jnp.zeros((batch, max_decode_length), jnp.int32),
        done=jnp.zeros((batch,), bool),
        cache=cache,
    )
    return jax.lax.while_loop(running, step, start).tokens


@functools.partial(jax.jit, static_argnames=("model", "max_decode_length", "eos_id"))
def greedy_decode(
    model: T5,
    params: Params,
    encoder_input_tokens: Array,
    max_decode_length: int,
    eos_id: int = 1,
    encoder_segment_ids: Array | None = None,
) -> Array:
    """Greedy decoding with the key/value cache: [batch, max_decode_length] int32 tokens.

    Encodes once, then feeds one token per step. Cross-attention sees every non-padding
    encoder token of the row, so `encoder_segment_ids` only shapes the encoder itself.
    """
    encoded = _encode(model, params, encoder_input_tokens, encoder_segment_ids)
    cache = init_cache(model, params, encoded, encoder_input_tokens, max_decode_length)

    def next_logits(cache: Cache, tokens: Array, step: Array) -> tuple[Array, Cache]:
        previous = jax.lax.dynamic_slice_in_dim(shift_right(tokens), step, 1, axis=1)
        logits, variables = model.apply(
            {"params": params, "cache": cache},
            encoded,
            encoder_input_tokens,
            previous,
            enable_dropout=False,
            decode=True,
            max_decode_length=max_decode_length,
            method="decode",
            mutable=["cache"],
        )
        return logits[:, 0], variables["cache"]

    batch = encoder_input_tokens.shape[0]
    return _greedy_loop(next_logits, cache, batch, max_decode_length, eos_id)


@functools.partial(jax.jit, static_argnames=("model", "max_decode_length", "eos_id"))
def greedy_decode_no_cache(
    model: T5,
    params: Params,
    encoder_input_tokens: Array,
    max_decode_length: int,
    eos_id: int = 1,
    encoder_segment_ids: Array | None = None,
) -> Array:
    """Same result as `greedy_decode`, re-running the full decoder at every step (slow)."""
    encoded = _encode(model, params, encoder_input_tokens, encoder_segment_ids)

    def next_logits(cache: None, tokens: Array, step: Array) -> tuple[Array, None]:
        logits = model.apply(
            {"params": params},
            encoded,
            encoder_input_tokens,
            shift_right(tokens),
            enable_dropout=False,
            method="decode",
        )
        return jax.lax.dynamic_index_in_dim(logits, step, axis=1, keepdims=False), cache

    batch = encoder_input_tokens.shape[0]
    return _greedy_loop(next_logits, None, batch, max_decode_length, eos_id)
