"""The step-by-step loss against a direct reference, and exact gradient accumulation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dsbs_jax import losses, trainer
from dsbs_jax.models.t5 import T5, get_config

VOCAB = 11


def _paired_batch(rng: np.random.Generator, alpha: float, rows: int = 6, length: int = 9):
    """Rows alternate label / rationale examples, as the paired mixture yields them."""
    targets = rng.integers(2, VOCAB, size=(rows, length))
    lengths = rng.integers(1, length + 1, size=rows)
    mask = np.arange(length)[None, :] < lengths[:, None]
    role = np.where(np.arange(rows) % 2 == 0, 1, 2)[:, None]
    task_ids = np.where(mask, role, 0)
    weights = np.where(task_ids == 1, alpha, np.where(task_ids == 2, 1 - alpha, 0.0))
    return {
        "decoder_target_tokens": np.where(mask, targets, 0).astype(np.int32),
        "decoder_task_ids": task_ids.astype(np.int32),
        "decoder_loss_weights": weights.astype(np.float32),
    }


def _reference_official_loss(logits: np.ndarray, batch, alpha: float) -> float:
    """What the official code computes: two separate token-mean CEs, then alpha-mixed."""
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    means = []
    for role in (1, 2):
        rows, cols = np.nonzero(batch["decoder_task_ids"] == role)
        targets = batch["decoder_target_tokens"][rows, cols]
        means.append(-log_probs[rows, cols, targets].mean())
    return alpha * means[0] + (1 - alpha) * means[1]


@pytest.mark.parametrize("alpha", [0.5, 0.2, 0.9])
def test_paired_loss_equals_official_formula(alpha):
    rng = np.random.default_rng(0)
    batch = _paired_batch(rng, alpha)
    logits = rng.normal(size=(*batch["decoder_target_tokens"].shape, VOCAB)).astype(np.float32)
    loss, sums = losses.step_by_step_loss(jnp.asarray(logits), batch)
    expected = _reference_official_loss(logits.astype(np.float64), batch, alpha)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    metrics = losses.summarise_loss_sums(sums)
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
    unweighted = _reference_official_loss(logits.astype(np.float64), batch, 1.0)
    np.testing.assert_allclose(float(metrics["label_loss"]), unweighted, rtol=1e-5)


def test_label_smoothing_and_z_loss():
    logits = jnp.array([[[4.0, 0.0, -1.0, 0.5]]])
    targets = jnp.array([[0]])
    plain, _ = losses.token_cross_entropy(logits, targets)
    smoothed, _ = losses.token_cross_entropy(logits, targets, label_smoothing=0.1)
    with_z, z_term = losses.token_cross_entropy(logits, targets, z_loss=1e-2)
    log_z = float(jax.nn.logsumexp(logits))
    np.testing.assert_allclose(float(plain[0, 0]), log_z - 4.0, rtol=1e-6)
    np.testing.assert_allclose(float(z_term[0, 0]), 1e-2 * log_z**2, rtol=1e-6)
    np.testing.assert_allclose(float(with_z[0, 0]), float(plain[0, 0]) + 1e-2 * log_z**2, rtol=1e-6)
    # A perfect smoothed prediction scores zero: the target entropy is subtracted.
    soft = np.full(4, 0.1 / 3)
    soft[0] = 0.9
    perfect, _ = losses.token_cross_entropy(jnp.log(jnp.asarray(soft))[None, None], targets, 0.1)
    np.testing.assert_allclose(float(perfect[0, 0]), 0.0, atol=1e-6)
    assert float(smoothed[0, 0]) != float(plain[0, 0])


def test_token_accuracy_per_task():
    batch = _paired_batch(np.random.default_rng(1), 0.5)
    logits = jax.nn.one_hot(batch["decoder_target_tokens"], VOCAB) * 10.0
    _, sums = losses.step_by_step_loss(logits, batch)
    metrics = losses.summarise_loss_sums(sums)
    assert float(metrics["label_token_accuracy"]) == 1.0
    assert float(metrics["rationale_token_accuracy"]) == 1.0
    assert float(metrics["label_tokens"]) == (batch["decoder_task_ids"] == 1).sum()


def _tiny_model_batch(rng: np.random.Generator):
    batch = _paired_batch(rng, 0.3, rows=8, length=7)
    targets = batch["decoder_target_tokens"]
    batch["decoder_input_tokens"] = np.pad(targets[:, :-1], ((0, 0), (1, 0)))
    batch["encoder_input_tokens"] = rng.integers(2, VOCAB, size=(8, 5)).astype(np.int32)
    return {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.mark.slow
def test_microbatches_give_the_full_batch_gradient():
    model = T5(get_config("tiny", vocab_size=VOCAB, dtype=jnp.float32, dropout_rate=0.0))
    batch = _tiny_model_batch(np.random.default_rng(2))
    params = model.init(
        jax.random.key(0), batch["encoder_input_tokens"], batch["decoder_input_tokens"]
    )["params"]
    params = jax.tree.map(
        lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value")
    )
    optimizer = optax.sgd(1.0)
    state = trainer.init_state(params, optimizer)
    results = []
    for micro in (1, 4):
        step = jax.jit(trainer.make_train_step(model, optimizer, num_microbatches=micro))
        new_state, metrics = step(state, batch, jax.random.key(1))
        results.append((new_state.params, metrics))
    for params_m, metrics_m in results[1:]:
        np.testing.assert_allclose(
            float(metrics_m["loss"]), float(results[0][1]["loss"]), rtol=1e-5
        )
        for a, b in zip(jax.tree.leaves(params_m), jax.tree.leaves(results[0][0]), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
