"""bfloat16 dense matmuls accumulate in float32 forward and backward, and the model runs on them."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.matmul import dot_operand_types
from dsbs_jax import decoding
from dsbs_jax.models import mixed_precision
from dsbs_jax.models.t5 import T5, get_config

BF16 = jnp.bfloat16


def _operands(seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(keys[0], (3, 8, 32)).astype(BF16)
    w = jax.random.normal(keys[1], (32, 48)).astype(BF16)
    cotangent = jax.random.normal(keys[2], (3, 8, 48))
    return x, w, cotangent


def test_bfloat16_matmul_matches_float32_products_and_gradients():
    x, w, cotangent = _operands()
    x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)

    out = mixed_precision.matmul(x, w)
    assert out.dtype == BF16
    np.testing.assert_allclose(out.astype(jnp.float32), x32 @ w32, rtol=1e-2, atol=1e-2)

    def loss(x, w):
        return jnp.sum(mixed_precision.matmul(x, w).astype(jnp.float32) * cotangent)

    dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    assert dx.dtype == BF16 and dw.dtype == BF16
    np.testing.assert_allclose(dx.astype(jnp.float32), cotangent @ w32.T, rtol=2e-2, atol=5e-2)
    dw_expected = jnp.einsum("bti,btj->ij", x32, cotangent)
    np.testing.assert_allclose(dw.astype(jnp.float32), dw_expected, rtol=2e-2, atol=1e-1)


def test_bfloat16_matmul_never_multiplies_float32_copies_of_its_operands():
    x, w, cotangent = _operands()

    def loss(x, w):
        return jnp.sum(mixed_precision.matmul(x, w).astype(jnp.float32) * cotangent)

    hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()
    dots = dot_operand_types(hlo)
    assert len(dots) == 3, dots  # forward, and one for each operand's gradient
    assert all(types == ("bf16", "bf16") for types in dots), dots
    # The plain bfloat16 dot, by contrast, is run on float32 copies by XLA:CPU.
    if jax.default_backend() == "cpu":
        plain = jax.jit(jnp.matmul).lower(x, w).compile().as_text()
        assert dot_operand_types(plain) == [("f32", "f32")]


def test_float32_matmul_gives_the_plain_dots_values_and_gradients():
    x, w, _ = _operands()
    x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
    x32 = jnp.stack([x32, 2 * x32])  # [2, rows, k]: the weight gradient sums over both axes
    np.testing.assert_array_equal(mixed_precision.matmul(x32, w32), x32 @ w32)

    def loss(fn):
        return lambda a, b: jnp.sum(jnp.sin(fn(a, b)))

    got = jax.grad(loss(mixed_precision.matmul), argnums=(0, 1))(x32, w32)
    want = jax.grad(loss(jnp.matmul), argnums=(0, 1))(x32, w32)
    for g, r in zip(got, want, strict=True):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_other_dtypes_take_the_plain_dot_and_out_dtype_is_honoured():
    x, w, _ = _operands()
    w32 = w.astype(jnp.float32)
    x16, w16 = x.astype(jnp.float16), w.astype(jnp.float16)
    np.testing.assert_array_equal(mixed_precision.matmul(x16, w16), x16 @ w16)
    assert mixed_precision.matmul(x, w, jnp.float32).dtype == jnp.float32
    with pytest.raises(ValueError, match="one dtype"):
        mixed_precision.matmul(x, w32)


def test_dense_dot_general_refuses_other_contractions():
    x, w, _ = _operands()
    with pytest.raises(ValueError, match="not a dense layer"):
        mixed_precision.dense_dot_general(x, w.T, (((1,), (1,)), ((), ())))


@pytest.mark.slow
def test_bfloat16_model_gives_float32s_loss_and_gradients_and_decodes():
    def config(dtype):
        return get_config("tiny", vocab_size=64, dtype=dtype, dropout_rate=0.0)

    model32, model16 = T5(config(jnp.float32)), T5(config(BF16))
    tokens = jax.random.randint(jax.random.key(1), (4, 12), 2, 64, jnp.int32)
    targets = jax.random.randint(jax.random.key(2), (4, 6), 2, 64, jnp.int32)
    decoder_inputs = jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]
    params = nn.unbox(
        jax.jit(model32.init, static_argnames="enable_dropout")(
            jax.random.key(0), tokens, decoder_inputs, targets, enable_dropout=False
        )
    )["params"]

    def loss(params, model):
        logits = model.apply(
            {"params": params}, tokens, decoder_inputs, targets, enable_dropout=False
        )
        labels = jax.nn.one_hot(targets, logits.shape[-1])
        return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1))

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    loss32, grads32 = grad(params, model32)
    loss16, grads16 = grad(params, model16)
    assert abs(float(loss16) - float(loss32)) < 2e-2 * float(loss32)
    flat32, flat16 = jax.tree.leaves(grads32), jax.tree.leaves(grads16)
    for g32, g16 in zip(flat32, flat16, strict=True):
        assert g16.dtype == jnp.float32  # parameters (and their gradients) stay float32
        scale = float(jnp.max(jnp.abs(g32))) + 1e-6
        assert float(jnp.max(jnp.abs(g16 - g32))) < 0.1 * scale

    decoded = decoding.greedy_decode(model16, params, tokens, 5, eos_id=-1)
    assert decoded.shape == (4, 5)
    assert bool(jnp.all((decoded >= 0) & (decoded < 64)))
