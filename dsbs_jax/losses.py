"""The distilling step-by-step loss and its per-task metrics.

The official code runs the label and the rationale batch through the model
separately and combines Hugging Face's token-mean losses:
`alpha * mean_label_CE + (1 - alpha) * mean_rationale_CE`. Here both kinds of
examples share one (possibly packed) batch, `decoder_task_ids` says which task
each target token belongs to and `decoder_loss_weights` carries alpha or
1 - alpha (see `dsbs_jax.data.feature_converters`), and

    loss = sum over tasks r of  sum_{tokens t of r} w_t * CE_t / N_r

where N_r counts task r's target tokens in the whole batch. N_r is passed in
rather than recomputed, so that the losses of microbatches add up exactly to
the loss of the full batch under gradient accumulation.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from dsbs_jax.roles import TaskRole

Array = jax.Array
ROLES = {"label": int(TaskRole.LABEL), "rationale": int(TaskRole.RATIONALE)}


def token_cross_entropy(
    logits: Array, targets: Array, label_smoothing: float = 0.0, z_loss: float = 0.0
) -> tuple[Array, Array]:
    """Per-token cross-entropy (plus z-loss) and the z-loss part alone, both [batch, length].

    With label smoothing the entropy of the smoothed target is subtracted, so a
    perfect prediction still scores 0, as in t5x.
    """
    logits = logits.astype(jnp.float32)
    vocab_size = logits.shape[-1]
    log_z = jax.nn.logsumexp(logits, axis=-1)
    log_probs = logits - log_z[..., None]
    if label_smoothing:
        confidence = 1.0 - label_smoothing
        low = label_smoothing / (vocab_size - 1)
        soft = jax.nn.one_hot(targets, vocab_size) * (confidence - low) + low
        entropy = -(confidence * jnp.log(confidence) + (vocab_size - 1) * low * jnp.log(low))
        cross_entropy = -jnp.sum(soft * log_probs, axis=-1) - entropy
    else:
        cross_entropy = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    z_term = z_loss * jnp.square(log_z)
    return cross_entropy + z_term, z_term


def role_token_counts(task_ids: Array) -> Array:
    """[num roles + 1] counts of target tokens per role (index 0: padding)."""
    return jnp.bincount(task_ids.reshape(-1), length=len(TaskRole) + 1).astype(jnp.float32)


def step_by_step_loss(
    logits: Array,
    batch: Mapping[str, Array],
    token_counts: Array | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> tuple[Array, dict[str, Array]]:
    """Returns (scalar loss, sums for metrics) for one batch or microbatch.

    `token_counts` is `role_token_counts` of the full batch; None means this
    batch is the full batch. The sums in the second value add up across
    microbatches; `summarise_loss_sums` turns them into logged metrics.
    """
    task_ids = batch["decoder_task_ids"]
    if token_counts is None:
        token_counts = role_token_counts(task_ids)
    per_token, z_term = token_cross_entropy(
        logits, batch["decoder_target_tokens"], label_smoothing, z_loss
    )
    is_target = task_ids > 0
    denominator = jnp.maximum(token_counts[task_ids], 1.0)
    loss = jnp.sum(jnp.where(is_target, batch["decoder_loss_weights"] * per_token / denominator, 0))
    correct = (jnp.argmax(logits, axis=-1) == batch["decoder_target_tokens"]) & is_target
    sums = {"z_loss": jnp.sum(jnp.where(is_target, z_term, 0.0))}
    for name, role in ROLES.items():
        in_role = task_ids == role
        weighted = batch["decoder_loss_weights"] * per_token
        sums[f"{name}_weighted_loss"] = jnp.sum(jnp.where(in_role, weighted, 0.0))
        sums[f"{name}_cross_entropy"] = jnp.sum(jnp.where(in_role, per_token - z_term, 0.0))
        sums[f"{name}_correct"] = jnp.sum(correct & in_role).astype(jnp.float32)
        sums[f"{name}_tokens"] = jnp.sum(in_role).astype(jnp.float32)
    return loss, sums


def summarise_loss_sums(sums: Mapping[str, Array]) -> dict[str, Array]:
    """Turns summed statistics into per-token means: label/rationale loss and token accuracy.

    "loss" recomputed from the sums equals `step_by_step_loss` over everything summed
    (a whole batch, or a whole evaluation split).
    """
    tokens = sums["label_tokens"] + sums["rationale_tokens"]
    metrics = {
        "loss": sum(
            sums[f"{name}_weighted_loss"] / jnp.maximum(sums[f"{name}_tokens"], 1.0)
            for name in ROLES
        ),
        "z_loss": sums["z_loss"] / jnp.maximum(tokens, 1.0),
        "token_accuracy": (sums["label_correct"] + sums["rationale_correct"])
        / jnp.maximum(tokens, 1.0),
    }
    for name in ROLES:
        count = jnp.maximum(sums[f"{name}_tokens"], 1.0)
        metrics[f"{name}_loss"] = sums[f"{name}_cross_entropy"] / count
        metrics[f"{name}_token_accuracy"] = sums[f"{name}_correct"] / count
        metrics[f"{name}_tokens"] = sums[f"{name}_tokens"]
    return metrics
