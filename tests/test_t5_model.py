"""Tests for the Flax T5 model and greedy decoding (tiny float32 model on CPU)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from dsbs_jax import decoding
from dsbs_jax.models.t5 import T5, get_config, relative_position_bucket

VOCAB = 40
EMB, HEADS, HEAD_DIM, MLP = 32, 2, 8, 64


def _config(**overrides):
    return get_config("tiny", vocab_size=VOCAB, dtype=jnp.float32, dropout_rate=0.0, **overrides)


@functools.partial(jax.jit, static_argnums=0)
def _init(model: T5):
    tokens = jnp.ones((1, 6), jnp.int32)
    targets = jnp.ones((1, 5), jnp.int32)
    return model.init(jax.random.PRNGKey(0), tokens, targets, targets, enable_dropout=False)


@pytest.fixture(scope="module")
def model() -> T5:
    return T5(_config())


@pytest.fixture(scope="module")
def variables(model):
    return _init(model)


@pytest.fixture(scope="module")
def params(variables):
    return nn.unbox(variables)["params"]


def _random_tokens(seed: int, shape: tuple[int, ...]) -> jnp.ndarray:
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 2, VOCAB, jnp.int32)


def _shift_right(targets: np.ndarray) -> np.ndarray:
    return np.pad(targets, ((0, 0), (1, 0)))[:, :-1]


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, params, enc, dec_in, dec_target, **packing):
    return model.apply({"params": params}, enc, dec_in, dec_target, enable_dropout=False, **packing)


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    joined = HEADS * HEAD_DIM
    attention = {
        "query/kernel": (EMB, joined),
        "key/kernel": (EMB, joined),
        "value/kernel": (EMB, joined),
        "out/kernel": (joined, EMB),
    }
    mlp = {"wi_0/kernel": (EMB, MLP), "wi_1/kernel": (EMB, MLP), "wo/kernel": (MLP, EMB)}
    shapes = {
        "token_embedder/embedding": (VOCAB, EMB),
        "encoder/relpos_bias/rel_embedding": (HEADS, 32),
        "encoder/encoder_norm/scale": (EMB,),
        "decoder/relpos_bias/rel_embedding": (HEADS, 32),
        "decoder/decoder_norm/scale": (EMB,),
        "decoder/logits_dense/kernel": (EMB, VOCAB),
    }
    for i in range(2):
        enc, dec = f"encoder/layers_{i}", f"decoder/layers_{i}"
        shapes[f"{enc}/pre_attention_layer_norm/scale"] = (EMB,)
        shapes[f"{enc}/pre_mlp_layer_norm/scale"] = (EMB,)
        for norm in ("pre_self_attention", "pre_cross_attention", "pre_mlp"):
            shapes[f"{dec}/{norm}_layer_norm/scale"] = (EMB,)
        for name, shape in attention.items():
            shapes[f"{enc}/attention/{name}"] = shape
            shapes[f"{dec}/self_attention/{name}"] = shape
            shapes[f"{dec}/encoder_decoder_attention/{name}"] = shape
        for name, shape in mlp.items():
            shapes[f"{enc}/mlp/{name}"] = shape
            shapes[f"{dec}/mlp/{name}"] = shape
    return shapes


def test_parameter_tree_matches_t5x_names_and_shapes(params):
    flat = traverse_util.flatten_dict(params, sep="/")
    assert {k: v.shape for k, v in flat.items()} == _expected_shapes()
    assert all(v.dtype == jnp.float32 for v in flat.values())


def test_every_parameter_has_logical_axes(variables):
    specs = traverse_util.flatten_dict(nn.get_partition_spec(variables)["params"], sep="/")
    shapes = traverse_util.flatten_dict(nn.unbox(variables)["params"], sep="/")
    for path, spec in specs.items():
        assert len(spec) == shapes[path].ndim and all(spec), path
    assert specs["token_embedder/embedding"] == P("vocab", "embed")
    assert specs["encoder/layers_0/attention/out/kernel"] == P("joined_kv", "embed")
    assert specs["decoder/relpos_bias/rel_embedding"] == P("heads", "relpos_buckets")
    assert specs["decoder/logits_dense/kernel"] == P("embed", "vocab")


def test_query_init_folds_in_attention_scaling():
    model = T5(get_config("tiny", vocab_size=VOCAB, emb_dim=256, head_dim=64, num_heads=4))
    attention = nn.unbox(_init(model))["params"]["encoder"]["layers_0"]["attention"]
    assert np.std(attention["query"]["kernel"]) == pytest.approx((256 * 64) ** -0.5, rel=0.05)
    assert np.std(attention["key"]["kernel"]) == pytest.approx(256**-0.5, rel=0.05)


def test_relative_position_buckets():
    rel = jnp.array([0, -1, 1, -7, -8, -200, 200])
    encoder = relative_position_bucket(rel, True, 32, 128)
    np.testing.assert_array_equal(encoder, [0, 1, 17, 7, 8, 15, 31])
    rel = jnp.array([0, 3, -1, -15, -16, -127, -1000])
    decoder = relative_position_bucket(rel, False, 32, 128)
    np.testing.assert_array_equal(decoder, [0, 0, 1, 15, 16, 31, 31])


def test_packed_examples_match_examples_alone(model, params):
    enc_a, tgt_a = np.asarray(_random_tokens(1, (1, 5))), np.asarray(_random_tokens(2, (1, 4)))
    enc_b, tgt_b = np.asarray(_random_tokens(3, (1, 3))), np.asarray(_random_tokens(4, (1, 5)))
    enc_len, dec_len = 10, 11

    def pad(x: np.ndarray, length: int) -> np.ndarray:
        return np.pad(x, ((0, 0), (0, length - x.shape[1])))

    def segments(*lengths: int, total: int) -> np.ndarray:
        return pad(np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None], total)

    def positions(*lengths: int, total: int) -> np.ndarray:
        return pad(np.concatenate([np.arange(n) for n in lengths])[None], total)

    packed = _logits(
        model,
        params,
        pad(np.concatenate([enc_a, enc_b], 1), enc_len),
        pad(np.concatenate([_shift_right(tgt_a), _shift_right(tgt_b)], 1), dec_len),
        pad(np.concatenate([tgt_a, tgt_b], 1), dec_len),
        encoder_segment_ids=segments(5, 3, total=enc_len),
        decoder_segment_ids=segments(4, 5, total=dec_len),
        encoder_positions=positions(5, 3, total=enc_len),
        decoder_positions=positions(4, 5, total=dec_len),
    )
    for enc, tgt, start in ((enc_a, tgt_a, 0), (enc_b, tgt_b, 4)):
        n = tgt.shape[1]
        alone = _logits(
            model,
            params,
            pad(enc, enc_len),
            pad(_shift_right(tgt), dec_len),
            pad(tgt, dec_len),
        )
        np.testing.assert_allclose(packed[:, start : start + n], alone[:, :n], atol=1e-5)


def test_right_padding_does_not_change_logits(model, params):
    enc, tgt = np.asarray(_random_tokens(5, (2, 6))), np.asarray(_random_tokens(6, (2, 5)))
    short = _logits(model, params, enc, _shift_right(tgt), tgt)
    padded_tgt = np.pad(tgt, ((0, 0), (0, 3)))
    padded = _logits(
        model, params, np.pad(enc, ((0, 0), (0, 4))), _shift_right(padded_tgt), padded_tgt
    )
    np.testing.assert_allclose(padded[:, :5], short, atol=1e-5)


@functools.partial(jax.jit, static_argnums=(0, 6))
def _decode_step(model, params, cache, encoded, enc, token, max_decode_length):
    logits, variables = model.apply(
        {"params": params, "cache": cache},
        encoded,
        enc,
        token[:, None],
        enable_dropout=False,
        decode=True,
        max_decode_length=max_decode_length,
        method="decode",
        mutable=["cache"],
    )
    return logits[:, 0], variables["cache"]


def test_cached_decoder_logits_match_full_decoder(model, params):
    enc, tgt = _random_tokens(7, (2, 6)), np.asarray(_random_tokens(8, (2, 7)))
    full = _logits(model, params, enc, _shift_right(tgt), tgt)
    encoded = jax.jit(model.apply, static_argnames=("method", "enable_dropout"))(
        {"params": params}, enc, enable_dropout=False, method="encode"
    )
    cache = decoding.init_cache(model, params, encoded, enc, tgt.shape[1])
    assert int(cache["decoder"]["cache_index"]) == 0
    for step, token in enumerate(_shift_right(tgt).T):
        logits, cache = _decode_step(model, params, cache, encoded, enc, token, tgt.shape[1])
        np.testing.assert_allclose(logits, full[:, step], atol=1e-4)
    assert int(cache["decoder"]["cache_index"]) == tgt.shape[1]


def test_greedy_decode_with_cache_matches_no_cache(model, params):
    enc = _random_tokens(9, (3, 8)).at[1, 5:].set(0)  # the second row is padded
    cached = decoding.greedy_decode(model, params, enc, max_decode_length=12)
    reference = decoding.greedy_decode_no_cache(model, params, enc, max_decode_length=12)
    assert cached.shape == (3, 12) and cached.dtype == jnp.int32
    np.testing.assert_array_equal(cached, reference)


def test_greedy_decode_zeroes_positions_after_eos(model, params):
    enc = np.asarray(_random_tokens(10, (4, 8)))
    free = np.asarray(decoding.greedy_decode(model, params, enc, 10, eos_id=VOCAB))
    eos_id = int(free[-1, 3])  # a token the last row first emits mid-sequence
    assert eos_id not in free[-1, :3]
    tokens = np.asarray(decoding.greedy_decode(model, params, enc, 10, eos_id=eos_id))
    for row, free_row in zip(tokens, free, strict=True):
        hits = np.flatnonzero(free_row == eos_id)
        stop = hits[0] + 1 if hits.size else len(row)
        np.testing.assert_array_equal(row[:stop], free_row[:stop])
        assert not row[stop:].any()


def test_original_t5_variant_runs():
    model = T5(_config(mlp_activations=("relu",), logits_via_embedding=True))
    params = nn.unbox(_init(model))["params"]
    assert "logits_dense" not in params["decoder"]
    assert set(params["encoder"]["layers_0"]["mlp"]) == {"wi", "wo"}
    enc, tgt = _random_tokens(11, (2, 6)), np.asarray(_random_tokens(12, (2, 5)))
    logits = _logits(model, params, enc, _shift_right(tgt), tgt)
    assert logits.shape == (2, 5, VOCAB) and logits.dtype == jnp.float32
    assert np.isfinite(logits).all()


def test_adam_steps_lower_the_loss(model, params):
    enc, tgt = _random_tokens(13, (4, 8)), np.asarray(_random_tokens(14, (4, 6)))
    optimizer = optax.adam(3e-3)

    def loss_fn(params):
        logits = _logits(model, params, enc, _shift_right(tgt), tgt)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tgt).mean()

    @jax.jit
    def train_step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    initial = loss_fn(params)
    for _ in range(30):
        params, opt_state, _ = train_step(params, opt_state)
    assert loss_fn(params) < 0.5 * initial
