"""Optimizers chosen by gin: the paper's AdamW and t5x's Adafactor, with clipping.

make_optimizer.name = "adamw"       # the official code: lr 5e-5, linear decay
adamw.learning_rate = 5e-5
make_optimizer.name = "adafactor"   # t5x's finetuning default
"""

from __future__ import annotations

import gin
import optax

from dsbs_jax.errors import UserError


@gin.configurable
def linear_decay(learning_rate: float, total_steps: int, warmup_steps: int = 0) -> optax.Schedule:
    """Linear warm-up to `learning_rate`, then linear decay to 0 at `total_steps` (HF's default)."""
    decay = optax.linear_schedule(learning_rate, 0.0, max(total_steps - warmup_steps, 1))
    if not warmup_steps:
        return decay
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


@gin.configurable
def adamw(
    total_steps: int,
    learning_rate: float = 5e-5,
    schedule: str = "linear",
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """AdamW as the official code trains (Hugging Face defaults, lr 5e-5, linear decay)."""
    if schedule == "linear":
        rate: float | optax.Schedule = linear_decay(learning_rate, total_steps, warmup_steps)
    elif schedule == "constant":
        rate = learning_rate
    else:
        raise UserError(f"adamw schedule must be 'linear' or 'constant', got {schedule!r}")
    return optax.adamw(rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)


@gin.configurable
def adafactor(
    total_steps: int,
    learning_rate: float = 1e-3,
    decay_rate: float = 0.8,
    multiply_by_parameter_scale: bool = True,
    clipping_threshold: float | None = 1.0,
) -> optax.GradientTransformation:
    """t5x's finetuning optimizer: factored Adafactor, no momentum, constant 1e-3."""
    del total_steps  # constant rate, as t5x finetunes
    return optax.adafactor(
        learning_rate=learning_rate,
        decay_rate=decay_rate,
        multiply_by_parameter_scale=multiply_by_parameter_scale,
        clipping_threshold=clipping_threshold,
        momentum=None,
        factored=True,
    )


OPTIMIZERS = {"adamw": adamw, "adafactor": adafactor}


@gin.configurable
def make_optimizer(
    total_steps: int, name: str = "adamw", grad_clip_norm: float | None = 1.0
) -> optax.GradientTransformation:
    """The named optimizer behind global-norm gradient clipping (HF's max_grad_norm = 1.0)."""
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {name!r}; choose from {sorted(OPTIMIZERS)}")
    optimizer = OPTIMIZERS[name](total_steps)
    if grad_clip_norm is None:
        return optimizer
    return optax.chain(optax.clip_by_global_norm(grad_clip_norm), optimizer)
