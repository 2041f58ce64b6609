"""T5 encoder-decoder in Flax linen, parameter-compatible with t5x T5 1.1 checkpoints.

Parameter names, shapes and logical axis names follow t5x (see shared/T5X_REFERENCE.md), so
t5x checkpoints load without renaming and t5x logical-axis rules shard the model. Attention
logits are not divided by sqrt(head_dim): as in T5, that factor lives in the query initialiser.

Packed rows are supported: attention never crosses segments and relative positions come from
the per-segment positions, so a packed example gives the same logits as the example alone.

For large models, as t5x's `scalable_t5`: `scan_layers` runs each stack's layers as one
`nn.scan`, whose parameters gain a "layers" axis (axis 1, where t5x puts it: `encoder/layers/...`
instead of `encoder/layers_<i>/...`), so XLA compiles one layer instead of all of them;
`remat_policy` rematerialises each layer in the backward pass ("minimal": only the dots
without batch dimensions, i.e. the dense layers' outputs, are saved; "full": nothing is).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsbs_jax.errors import UserError
from dsbs_jax.models import mixed_precision

Array = jax.Array
Initializer = Callable[..., Array]

# Additive bias for masked attention logits (the value t5x uses); finite, so rows whose keys
# are all masked (padding queries) still give a finite softmax.
_MASKED = -1e10

_EMBED_AXES = ("batch", "length", "embed")

# What each `remat_policy` saves for the backward pass; "none" is not rematerialised at all.
# "minimal": the dots without batch dimensions, i.e. the dense layers' outputs (bfloat16 ones
# come out of a custom VJP, which policies cannot look into, under the name DENSE_OUTPUT).
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "minimal": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(mixed_precision.DENSE_OUTPUT),
    ),
    "full": None,  # saves nothing: the whole layer runs again
}
# Where scanned parameters hold their "layers" axis (t5x's `param_scan_axis`).
PARAM_SCAN_AXIS = 1
SCANNED_LAYERS = "layers"


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Hyper-parameters of a T5 model; defaults are T5 1.1 (gated GELU, untied logits)."""

    vocab_size: int
    emb_dim: int
    num_heads: int
    num_encoder_layers: int
    num_decoder_layers: int
    mlp_dim: int
    head_dim: int = 64
    mlp_activations: tuple[str, ...] = ("gelu", "linear")
    logits_via_embedding: bool = False
    dropout_rate: float = 0.1
    dtype: Any = jnp.bfloat16
    param_dtype: Any = jnp.float32
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    float32_attention_logits: bool = True
    scan_layers: bool = False
    remat_policy: str = "none"

    def __post_init__(self) -> None:
        if self.remat_policy not in ("none", *REMAT_POLICIES):
            raise UserError(
                f"unknown remat_policy {self.remat_policy!r}; choose from "
                f"{['none', *REMAT_POLICIES]}"
            )


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        emb_dim=32, num_heads=2, head_dim=8, num_encoder_layers=2, num_decoder_layers=2, mlp_dim=64
    ),
    "small": dict(
        vocab_size=32128,
        emb_dim=512,
        num_heads=6,
        num_encoder_layers=8,
        num_decoder_layers=8,
        mlp_dim=1024,
    ),
    "base": dict(
        vocab_size=32128,
        emb_dim=768,
        num_heads=12,
        num_encoder_layers=12,
        num_decoder_layers=12,
        mlp_dim=2048,
    ),
    "large": dict(
        vocab_size=32128,
        emb_dim=1024,
        num_heads=16,
        num_encoder_layers=24,
        num_decoder_layers=24,
        mlp_dim=2816,
    ),
    "xl": dict(
        vocab_size=32128,
        emb_dim=2048,
        num_heads=32,
        num_encoder_layers=24,
        num_decoder_layers=24,
        mlp_dim=5120,
    ),
    "xxl": dict(
        vocab_size=32128,
        emb_dim=4096,
        num_heads=64,
        num_encoder_layers=24,
        num_decoder_layers=24,
        mlp_dim=10240,
    ),
}


def get_config(name: str, **overrides: Any) -> T5Config:
    """Returns the named T5 1.1 preset with `overrides` applied.

    "tiny" is for tests and has no vocabulary size: pass `vocab_size`. The original T5
    variant is `mlp_activations=("relu",), logits_via_embedding=True`.
    """
    if name not in PRESETS:
        raise UserError(f"unknown T5 preset {name!r}; choose from {sorted(PRESETS)}")
    return T5Config(**{**PRESETS[name], **overrides})


# ---------------------------------------------------------------------------------------------
# Relative position buckets
# ---------------------------------------------------------------------------------------------


@functools.cache
def _distance_buckets(num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket of each distance 0..max_distance, in one direction.

    Computed once in NumPy float32 exactly like Mesh TensorFlow / t5x, so that the log-spaced
    bucket boundaries agree bit-for-bit with the ones pretrained checkpoints were trained on.
    Every distance >= max_distance falls into the last bucket.
    """
    distance = np.arange(max_distance + 1)
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore"):
        log_ratio = np.log(distance.astype(np.float32) / max_exact + np.finfo(np.float32).eps)
    large = max_exact + (
        log_ratio / np.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).astype(np.int32)
    large = np.minimum(large, num_buckets - 1)
    return np.where(distance < max_exact, distance, large).astype(np.int32)


def relative_position_bucket(
    relative_position: Array, bidirectional: bool, num_buckets: int, max_distance: int
) -> Array:
    """Maps `key_position - query_position` to T5's relative attention buckets.

    Half of the buckets give exact distances, the rest are log-spaced up to `max_distance`.
    Bidirectional (encoder) tables split the buckets between past and future keys;
    unidirectional (decoder) ones put every future key into bucket 0.
    """
    distance = -relative_position
    offset = 0
    if bidirectional:
        num_buckets //= 2
        offset = jnp.where(distance < 0, num_buckets, 0)
        distance = jnp.abs(distance)
    else:
        distance = jnp.maximum(distance, 0)
    table = jnp.asarray(_distance_buckets(num_buckets, max_distance))
    return offset + table[jnp.minimum(distance, max_distance)]


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


def _pairwise_mask(query_valid: Array, key_valid: Array) -> Array:
    """[batch, 1, q, k] mask that is true where both the query and the key are valid."""
    return query_valid[:, None, :, None] & key_valid[:, None, None, :]


def _same_segment(query_segments: Array, key_segments: Array) -> Array:
    """[batch, 1, q, k] mask that keeps packed examples from attending to each other."""
    return query_segments[:, None, :, None] == key_segments[:, None, None, :]


def _mask_to_bias(mask: Array) -> Array:
    """Turns a boolean attention mask into an additive float32 logits bias."""
    return jnp.where(mask, 0.0, _MASKED).astype(jnp.float32)


def encoder_mask(tokens: Array, segment_ids: Array | None = None) -> Array:
    """Encoder self-attention mask: non-padding tokens of the same segment."""
    mask = _pairwise_mask(tokens > 0, tokens > 0)
    if segment_ids is not None:
        mask &= _same_segment(segment_ids, segment_ids)
    return mask


def decoder_self_mask(
    length: int, target_tokens: Array | None = None, segment_ids: Array | None = None
) -> Array:
    """Causal decoder self-attention mask, restricted to non-padding targets and one segment.

    Padding comes from the targets because the inputs start with the 0 BOS token.
    """
    index = jnp.arange(length)
    mask = (index[:, None] >= index[None, :])[None, None]
    if target_tokens is not None:
        mask &= _pairwise_mask(target_tokens > 0, target_tokens > 0)
    if segment_ids is not None:
        mask &= _same_segment(segment_ids, segment_ids)
    return mask


def cross_attention_mask(
    encoder_tokens: Array,
    decoder_length: int,
    target_tokens: Array | None = None,
    encoder_segment_ids: Array | None = None,
    decoder_segment_ids: Array | None = None,
) -> Array:
    """Decoder-to-encoder mask: non-padding encoder tokens of the decoder token's segment."""
    query_valid = (
        target_tokens > 0
        if target_tokens is not None
        else jnp.ones((encoder_tokens.shape[0], decoder_length), bool)
    )
    mask = _pairwise_mask(query_valid, encoder_tokens > 0)
    if encoder_segment_ids is not None and decoder_segment_ids is not None:
        mask &= _same_segment(decoder_segment_ids, encoder_segment_ids)
    return mask


def _positions_or_range(positions: Array | None, length: int) -> Array:
    """Per-segment positions of a packed row, or 0..length-1 (batch dim 1) when unpacked."""
    return jnp.arange(length)[None] if positions is None else positions


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


def _kernel_init() -> Initializer:
    """T5's attention kernel init (fan-in scaled normal)."""
    return nn.initializers.variance_scaling(1.0, "fan_in", "normal")


def _mlp_init() -> Initializer:
    """T5's MLP and logits kernel init (fan-in scaled truncated normal)."""
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def _query_init(head_dim: int) -> Initializer:
    """Fan-in init divided by sqrt(head_dim): T5's attention scaling, folded into the query."""
    base = _kernel_init()

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return (base(key, shape, dtype) / np.sqrt(head_dim)).astype(dtype)

    return init


def _dense(
    features: int,
    axes: tuple[str, str],
    init: Initializer,
    config: T5Config,
    name: str,
    out_dtype: Any = None,
) -> nn.Dense:
    """Bias-free dense layer whose 2-D kernel carries logical axis names.

    Its operands are in `config.dtype`; bfloat16 ones accumulate in float32
    (`mixed_precision.matmul`), and the result is in `out_dtype` (default `config.dtype`).
    """
    return nn.Dense(
        features,
        use_bias=False,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=nn.with_logical_partitioning(init, axes),
        dot_general=functools.partial(mixed_precision.dense_dot_general, out_dtype=out_dtype),
        name=name,
    )


def _dropout(config: T5Config, x: Array, enable_dropout: bool) -> Array:
    """T5 dropout: one mask per feature vector, shared along the length axis."""
    return nn.Dropout(config.dropout_rate, broadcast_dims=(-2,))(
        x, deterministic=not enable_dropout
    )


class RMSNorm(nn.Module):
    """T5 layer norm: no mean subtraction, no bias; statistics in float32."""

    config: T5Config

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            (x.shape[-1],),
            self.config.param_dtype,
        )
        x = x.astype(jnp.float32)
        mean_square = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        y = x * jax.lax.rsqrt(mean_square + self.config.layer_norm_epsilon)
        return (y * scale.astype(jnp.float32)).astype(self.config.dtype)


class RelativePositionBias(nn.Module):
    """Learned per-head bias for each relative-position bucket; one table per stack."""

    config: T5Config
    bidirectional: bool

    @nn.compact
    def __call__(self, query_positions: Array, key_positions: Array) -> Array:
        """[batch or 1, q] and [batch or 1, k] positions -> [batch or 1, heads, q, k] bias."""
        cfg = self.config
        table = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(
                nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
                ("heads", "relpos_buckets"),
            ),
            (cfg.num_heads, cfg.relative_attention_num_buckets),
            cfg.param_dtype,
        )
        buckets = relative_position_bucket(
            key_positions[:, None, :] - query_positions[:, :, None],
            self.bidirectional,
            cfg.relative_attention_num_buckets,
            cfg.relative_attention_max_distance,
        )
        return jnp.moveaxis(table.astype(jnp.float32)[:, buckets], 0, 1)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with an additive bias (mask + relative positions) and a KV cache."""

    config: T5Config

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array,
        bias: Array,
        enable_dropout: bool,
        decode: bool = False,
        cache_index: Array | None = None,
        static_kv: bool = False,
    ) -> Array:
        """Attends from `inputs_q` to `inputs_kv`; with `decode`, keys/values go to the cache.

        `static_kv` (cross-attention): `inputs_kv` is the same at every decoding step, so with
        `decode` its keys and values are projected once, on the cache-creating call, and read
        back from the cache at every step.
        """
        cfg = self.config
        query = self._project(inputs_q, "query", _query_init(cfg.head_dim))
        if decode and static_kv:
            key, value = self._static_keys_values(inputs_kv)
        else:
            key = self._project(inputs_kv, "key", _kernel_init())
            value = self._project(inputs_kv, "value", _kernel_init())
            if decode:
                key, value = self._cached_keys_values(key, value, cache_index)
        heads = self._attend(query, key, value, bias, enable_dropout)
        batch, length = heads.shape[:2]
        joined = heads.reshape(batch, length, cfg.num_heads * cfg.head_dim)
        out = _dense(cfg.emb_dim, ("joined_kv", "embed"), _kernel_init(), cfg, "out")(joined)
        return nn.with_logical_constraint(out, _EMBED_AXES)

    def _project(self, x: Array, name: str, init: Initializer) -> Array:
        """Projects to [batch, length, heads, head_dim] through a 2-D t5x-shaped kernel."""
        cfg = self.config
        joined = _dense(cfg.num_heads * cfg.head_dim, ("embed", "joined_kv"), init, cfg, name)(x)
        split = joined.reshape(*x.shape[:2], cfg.num_heads, cfg.head_dim)
        return nn.with_logical_constraint(split, ("batch", "length", "heads", "kv"))

    def _static_keys_values(self, inputs_kv: Array) -> tuple[Array, Array]:
        """Keys and values of an input that never changes while decoding, projected once.

        The cache-creating call projects them and stores them in the cache; later calls read
        them from there without touching `inputs_kv`.
        """
        if self.has_variable("cache", "cached_key"):
            return self.get_variable("cache", "cached_key"), self.get_variable(
                "cache", "cached_value"
            )
        key = self._project(inputs_kv, "key", _kernel_init())
        value = self._project(inputs_kv, "value", _kernel_init())
        self.put_variable("cache", "cached_key", key)
        self.put_variable("cache", "cached_value", value)
        return key, value

    def _cached_keys_values(
        self, key: Array, value: Array, cache_index: Array | None
    ) -> tuple[Array, Array]:
        """Writes this step's key/value at `cache_index` and returns the whole cache.

        The first decode call only creates the zero cache (its length is the input length)
        and attends over its own keys, as in t5x.
        """
        initialised = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
        if not initialised:
            return key, value
        start = (0, cache_index, 0, 0)
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, start)
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value, start)
        return cached_key.value, cached_value.value

    def _attend(
        self, query: Array, key: Array, value: Array, bias: Array, enable_dropout: bool
    ) -> Array:
        """Softmax(q k^T + bias) v, logits in float32 when the config asks for it."""
        cfg = self.config
        if cfg.float32_attention_logits:
            query, key = query.astype(jnp.float32), key.astype(jnp.float32)
        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key)
        logits = logits + bias.astype(logits.dtype)
        weights = jax.nn.softmax(logits).astype(cfg.dtype)
        weights = nn.Dropout(cfg.dropout_rate)(weights, deterministic=not enable_dropout)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, value.astype(cfg.dtype))


class MlpBlock(nn.Module):
    """Feed-forward block: product of activated projections (gated GELU in T5 1.1), then wo."""

    config: T5Config

    @nn.compact
    def __call__(self, x: Array, enable_dropout: bool) -> Array:
        cfg = self.config
        activations = cfg.mlp_activations
        hidden = None
        for index, activation in enumerate(activations):
            name = "wi" if len(activations) == 1 else f"wi_{index}"
            h = _dense(cfg.mlp_dim, ("embed", "mlp"), _mlp_init(), cfg, name)(x)
            h = _activation(activation)(h)
            hidden = h if hidden is None else hidden * h
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        hidden = _dropout(cfg, hidden, enable_dropout)
        out = _dense(cfg.emb_dim, ("mlp", "embed"), _mlp_init(), cfg, "wo")(hidden)
        return nn.with_logical_constraint(out, _EMBED_AXES)


def _activation(name: str) -> Callable[[Array], Array]:
    """Named activation as t5x spells it: "linear" is the identity, others are `flax.linen`."""
    return (lambda x: x) if name == "linear" else getattr(nn, name)


def _residual(
    config: T5Config,
    x: Array,
    norm_name: str,
    block: Callable[[Array], Array],
    enable_dropout: bool,
) -> Array:
    """Pre-norm residual sub-layer: x + dropout(block(norm(x)))."""
    y = block(RMSNorm(config, name=norm_name)(x))
    return nn.with_logical_constraint(x + _dropout(config, y, enable_dropout), _EMBED_AXES)


class EncoderLayer(nn.Module):
    """Self-attention then MLP, each pre-normed and residual."""

    config: T5Config

    @nn.compact
    def __call__(self, x: Array, bias: Array, enable_dropout: bool) -> Array | tuple[Array, None]:
        cfg = self.config
        attention = MultiHeadAttention(cfg, name="attention")
        x = _residual(
            cfg,
            x,
            "pre_attention_layer_norm",
            lambda h: attention(h, h, bias, enable_dropout),
            enable_dropout,
        )
        mlp = MlpBlock(cfg, name="mlp")
        x = _residual(
            cfg, x, "pre_mlp_layer_norm", lambda h: mlp(h, enable_dropout), enable_dropout
        )
        return _scan_step(cfg, x)


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to the encoder, then MLP."""

    config: T5Config

    @nn.compact
    def __call__(
        self,
        x: Array,
        encoded: Array,
        self_bias: Array,
        cross_bias: Array,
        enable_dropout: bool,
        decode: bool,
        cache_index: Array | None,
    ) -> Array | tuple[Array, None]:
        cfg = self.config
        self_attention = MultiHeadAttention(cfg, name="self_attention")
        x = _residual(
            cfg,
            x,
            "pre_self_attention_layer_norm",
            lambda h: self_attention(h, h, self_bias, enable_dropout, decode, cache_index),
            enable_dropout,
        )
        cross_attention = MultiHeadAttention(cfg, name="encoder_decoder_attention")
        x = _residual(
            cfg,
            x,
            "pre_cross_attention_layer_norm",
            lambda h: cross_attention(
                h, encoded, cross_bias, enable_dropout, decode, cache_index, static_kv=True
            ),
            enable_dropout,
        )
        mlp = MlpBlock(cfg, name="mlp")
        x = _residual(
            cfg, x, "pre_mlp_layer_norm", lambda h: mlp(h, enable_dropout), enable_dropout
        )
        return _scan_step(cfg, x)


def _scan_step(config: T5Config, x: Array) -> Array | tuple[Array, None]:
    """A layer's output, as `nn.scan` wants it (carry, per-layer output) when layers are scanned."""
    return (x, None) if config.scan_layers else x


def _layer_stack(
    config: T5Config, layer: type[nn.Module], num_layers: int, static_argnums: tuple[int, ...]
) -> Callable[..., nn.Module]:
    """Makes a stack's layer modules by name: plain, rematerialised and/or one scan over all.

    `static_argnums` are the layer's Python-valued arguments (flags), counting `self` as 0;
    `nn.remat` must not trace them. Scanned layers broadcast every argument but the carried
    activations to each layer, split the parameter and dropout rngs per layer, and stack
    parameters on axis `PARAM_SCAN_AXIS` (logical name "layers") and caches on axis 0.
    """
    if config.remat_policy != "none":
        layer = nn.remat(
            layer,
            policy=REMAT_POLICIES[config.remat_policy],
            prevent_cse=not config.scan_layers,  # scan already keeps XLA from merging the copies
            static_argnums=static_argnums,
        )
    if config.scan_layers:
        layer = nn.scan(
            layer,
            variable_axes={"params": PARAM_SCAN_AXIS, "cache": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=nn.broadcast,
            length=num_layers,
            metadata_params={nn.PARTITION_NAME: SCANNED_LAYERS},
        )
    return functools.partial(layer, config)


def _embed(config: T5Config, embedder: nn.Embed, tokens: Array, enable_dropout: bool) -> Array:
    """Token embedding (not rescaled, as in T5) followed by dropout.

    The rows are gathered before the cast to `config.dtype` (`nn.Embed` casts the whole
    table first: a pass over 32128 rows a call in bfloat16); the result is the same.
    """
    x = jnp.take(embedder.embedding, tokens, axis=0).astype(config.dtype)
    x = _dropout(config, x, enable_dropout)
    return nn.with_logical_constraint(x, _EMBED_AXES)


class Encoder(nn.Module):
    """Embedding, bidirectional layers sharing one relative-position table, final norm."""

    config: T5Config
    shared_embedding: nn.Module

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        enable_dropout: bool = True,
    ) -> Array:
        cfg = self.config
        positions = _positions_or_range(positions, tokens.shape[1])
        relpos = RelativePositionBias(cfg, bidirectional=True, name="relpos_bias")
        bias = relpos(positions, positions) + _mask_to_bias(encoder_mask(tokens, segment_ids))
        x = _embed(cfg, self.shared_embedding, tokens, enable_dropout)
        make_layer = _layer_stack(cfg, EncoderLayer, cfg.num_encoder_layers, static_argnums=(3,))
        if cfg.scan_layers:
            x, _ = make_layer(name=SCANNED_LAYERS)(x, bias, enable_dropout)
        else:
            for index in range(cfg.num_encoder_layers):
                x = make_layer(name=f"layers_{index}")(x, bias, enable_dropout)
        x = RMSNorm(cfg, name="encoder_norm")(x)
        return nn.with_logical_constraint(_dropout(cfg, x, enable_dropout), _EMBED_AXES)


class Decoder(nn.Module):
    """Embedding, causal layers with cross-attention, final norm and vocabulary logits.

    With `decode=True` the first call creates the cache (one slot per position of its input)
    and later calls take one token each, advancing the stack-wide `cache_index`; those steps
    need `max_decode_length` equal to the cache length and ignore segment ids and positions.
    """

    config: T5Config
    shared_embedding: nn.Module

    @nn.compact
    def __call__(
        self,
        encoded: Array,
        encoder_input_tokens: Array,
        decoder_input_tokens: Array,
        decoder_target_tokens: Array | None = None,
        encoder_segment_ids: Array | None = None,
        decoder_segment_ids: Array | None = None,
        decoder_positions: Array | None = None,
        enable_dropout: bool = True,
        decode: bool = False,
        max_decode_length: int | None = None,
        decoder_self_attention_mask: Array | None = None,
    ) -> Array:
        cfg = self.config
        relpos = RelativePositionBias(cfg, bidirectional=False, name="relpos_bias")
        cache_index = self._advance_cache_index() if decode else None
        if cache_index is None:
            length = decoder_input_tokens.shape[1]
            positions = _positions_or_range(decoder_positions, length)
            self_mask = (
                decoder_self_mask(length, decoder_target_tokens, decoder_segment_ids)
                if decoder_self_attention_mask is None
                else decoder_self_attention_mask[:, None]
            )
            self_bias = relpos(positions, positions) + _mask_to_bias(self_mask)
            cross_mask = cross_attention_mask(
                encoder_input_tokens,
                length,
                decoder_target_tokens,
                encoder_segment_ids,
                decoder_segment_ids,
            )
        else:
            self_bias = self._step_self_bias(relpos, cache_index, max_decode_length)
            cross_mask = cross_attention_mask(encoder_input_tokens, 1)
        cross_bias = _mask_to_bias(cross_mask)

        x = _embed(cfg, self.shared_embedding, decoder_input_tokens, enable_dropout)
        make_layer = _layer_stack(cfg, DecoderLayer, cfg.num_decoder_layers, static_argnums=(5, 6))
        args = (encoded, self_bias, cross_bias, enable_dropout, decode, cache_index)
        if cfg.scan_layers:
            x, _ = make_layer(name=SCANNED_LAYERS)(x, *args)
        else:
            for index in range(cfg.num_decoder_layers):
                x = make_layer(name=f"layers_{index}")(x, *args)
        x = RMSNorm(cfg, name="decoder_norm")(x)
        return self._logits(_dropout(cfg, x, enable_dropout))

    def _advance_cache_index(self) -> Array | None:
        """Returns this step's position and counts it; None on the cache-creating call."""
        initialised = self.has_variable("cache", "cache_index")
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if not initialised:
            return None
        current = index.value
        index.value = current + 1
        return current

    @staticmethod
    def _step_self_bias(
        relpos: RelativePositionBias, cache_index: Array, max_decode_length: int | None
    ) -> Array:
        """Bias for one new query at `cache_index` over all cache slots (later ones masked)."""
        if max_decode_length is None:
            raise ValueError("decode=True steps need max_decode_length (the cache length)")
        key_positions = jnp.arange(max_decode_length)[None]
        visible = (key_positions <= cache_index)[:, None, None, :]
        return relpos(cache_index.reshape(1, 1), key_positions) + _mask_to_bias(visible)

    def _logits(self, x: Array) -> Array:
        """Float32 vocabulary logits: untied `logits_dense` (T5 1.1) or tied and rescaled.

        `logits_dense` multiplies in `config.dtype` and accumulates in float32, as a TPU does
        with t5x's float32 logits layer at default matmul precision.
        """
        cfg = self.config
        if cfg.logits_via_embedding:
            logits = self.shared_embedding.attend(x).astype(jnp.float32) / np.sqrt(cfg.emb_dim)
        else:
            dense = _dense(
                cfg.vocab_size, ("embed", "vocab"), _mlp_init(), cfg, "logits_dense", jnp.float32
            )
            logits = dense(x)
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


class T5(nn.Module):
    """T5 encoder-decoder; `encode` and `decode` are separate so decoding reuses the encoding."""

    config: T5Config

    def setup(self) -> None:
        cfg = self.config
        self.token_embedder = nn.Embed(
            cfg.vocab_size,
            cfg.emb_dim,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(stddev=1.0), ("vocab", "embed")
            ),
        )
        self.encoder = Encoder(cfg, self.token_embedder)
        self.decoder = Decoder(cfg, self.token_embedder)

    def encode(
        self,
        encoder_input_tokens: Array,
        encoder_segment_ids: Array | None = None,
        encoder_positions: Array | None = None,
        enable_dropout: bool = True,
    ) -> Array:
        """[batch, length] tokens -> [batch, length, emb] encoder output."""
        return self.encoder(
            encoder_input_tokens, encoder_segment_ids, encoder_positions, enable_dropout
        )

    def decode(
        self,
        encoded: Array,
        encoder_input_tokens: Array,
        decoder_input_tokens: Array,
        decoder_target_tokens: Array | None = None,
        encoder_segment_ids: Array | None = None,
        decoder_segment_ids: Array | None = None,
        decoder_positions: Array | None = None,
        enable_dropout: bool = True,
        decode: bool = False,
        max_decode_length: int | None = None,
        decoder_self_attention_mask: Array | None = None,
    ) -> Array:
        """Float32 logits [batch, length, vocab] for the decoder inputs given the encoding.

        `encoder_input_tokens` only supplies the encoder padding mask.
        `decoder_self_attention_mask` ([batch, length, length] booleans), when given, replaces
        the causal mask: which positions each one sees (a prefix tree's, `dsbs_jax.scoring`).
        """
        return self.decoder(
            encoded,
            encoder_input_tokens,
            decoder_input_tokens,
            decoder_target_tokens,
            encoder_segment_ids,
            decoder_segment_ids,
            decoder_positions,
            enable_dropout,
            decode,
            max_decode_length,
            decoder_self_attention_mask,
        )

    def __call__(
        self,
        encoder_input_tokens: Array,
        decoder_input_tokens: Array,
        decoder_target_tokens: Array | None = None,
        encoder_segment_ids: Array | None = None,
        decoder_segment_ids: Array | None = None,
        encoder_positions: Array | None = None,
        decoder_positions: Array | None = None,
        enable_dropout: bool = True,
        decode: bool = False,
        max_decode_length: int | None = None,
    ) -> Array:
        """Teacher-forced float32 logits [batch, decoder length, vocab]."""
        encoded = self.encode(
            encoder_input_tokens, encoder_segment_ids, encoder_positions, enable_dropout
        )
        return self.decode(
            encoded,
            encoder_input_tokens,
            decoder_input_tokens,
            decoder_target_tokens,
            encoder_segment_ids,
            decoder_segment_ids,
            decoder_positions,
            enable_dropout,
            decode,
            max_decode_length,
        )


@functools.lru_cache(maxsize=16)
def abstract_params(config: T5Config, boxed: bool = True) -> Any:
    """The model's parameters as ShapeDtypeStructs, allocating nothing (the tree `init` makes):
    boxed with their logical axis names, or plain (unboxed without sharding constraints, so
    also inside `Partitioner.activation_rules`). Cached: a sweep plans many runs of one model,
    and tracing `init` takes a fraction of a second; treat the tree as read-only."""

    def init() -> Any:  # the key too is made in the trace: nothing runs on any device
        tokens = jnp.ones((1, 1), jnp.int32)
        return T5(config).init(jax.random.key(0), tokens, tokens, enable_dropout=False)["params"]

    params = jax.eval_shape(init)
    if boxed:
        return params
    return jax.tree.map(
        lambda x: x.unbox(apply_constraint=False),
        params,
        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned),
    )
