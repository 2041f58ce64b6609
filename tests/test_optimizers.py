"""Optimizers from gin: the schedule's shape and both optimizers learning."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dsbs_jax import optimizers


def test_linear_decay_with_warmup():
    schedule = optimizers.linear_decay(1.0, total_steps=110, warmup_steps=10)
    values = [float(schedule(s)) for s in (0, 5, 10, 60, 110)]
    np.testing.assert_allclose(values, [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_optimizers_minimise_a_quadratic(name):
    params = {"w": jnp.full((4, 3), 2.0)}
    optimizer = optimizers.make_optimizer(200, name=name)
    state = optimizer.init(params)

    def loss(p):
        return jnp.sum(jnp.square(p["w"] - 0.5))

    start = float(loss(params))
    for _ in range(50):
        grads = jax.grad(loss)(params)
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    # AdamW at the paper's 5e-5 moves each weight ~50 * 5e-5; Adafactor at 1e-3, scaled by the
    # parameters' RMS (2.0), ~50 * 2e-3.
    expected_drop = 0.001 if name == "adamw" else 0.1
    assert float(loss(params)) < start * (1 - expected_drop)


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        optimizers.make_optimizer(10, name="sgd")
