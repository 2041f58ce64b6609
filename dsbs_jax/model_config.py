"""The student's hyper-parameters as the run gin sets them, and the T5Config they make.

Model gin files (gin_configs/models/) bind `t5_config`; the run gin passes `@t5_config()` to the
programs, which complete it with the tasks' vocabulary size (`build_model_config`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import gin
import jax.numpy as jnp

from dsbs_jax.errors import UserError
from dsbs_jax.models.t5 import T5Config, get_config

VOCAB_MULTIPLE = 128  # t5x pads the 32100-piece T5 vocabulary to 32128 the same way

# t5_config passes what it does not name on to T5Config: gin may bind those fields, no others.
_T5_CONFIG_PARAMETERS = ["preset", "original_t5", *(f.name for f in dataclasses.fields(T5Config))]


@gin.configurable(allowlist=_T5_CONFIG_PARAMETERS)
def t5_config(
    preset: str = "small",
    vocab_size: int | None = None,
    dtype: str = "bfloat16",
    dropout_rate: float = 0.1,
    original_t5: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """The student's hyper-parameters as gin sets them (see gin_configs/models/).

    `vocab_size` None: the tasks' vocabulary size, rounded up to a multiple of 128.
    `original_t5` selects ReLU and tied logits instead of T5 1.1's gated GELU.
    """
    config = dict(
        preset=preset,
        vocab_size=vocab_size,
        dtype=jnp.dtype(dtype),
        dropout_rate=dropout_rate,
        **overrides,
    )
    if original_t5:
        config.update(mlp_activations=("relu",), logits_via_embedding=True)
    return config


def build_model_config(config: Mapping[str, Any], vocabulary_size: int) -> T5Config:
    """The T5Config of `t5_config`'s settings for tasks whose vocabulary has that many pieces."""
    settings = dict(config)
    preset = settings.pop("preset")
    if settings.get("vocab_size") is None:
        settings["vocab_size"] = -(-vocabulary_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    elif settings["vocab_size"] < vocabulary_size:
        raise UserError(
            f"t5_config.vocab_size {settings['vocab_size']} is smaller than the tasks' "
            f"vocabulary ({vocabulary_size} pieces); leave it unset or raise it"
        )
    return get_config(preset, **settings)


# The fields that fix a checkpoint's parameter shapes, recorded with every checkpoint so a
# config that does not match is named in one line (see `dsbs_jax.state`).
SHAPE_FIELDS = (
    "vocab_size",
    "emb_dim",
    "num_heads",
    "head_dim",
    "mlp_dim",
    "num_encoder_layers",
    "num_decoder_layers",
    "mlp_activations",
    "logits_via_embedding",
    "relative_attention_num_buckets",
)


def shape_fields(config: T5Config) -> dict[str, Any]:
    """`config`'s shape-fixing fields, as JSON-ready values."""
    fields = {name: getattr(config, name) for name in SHAPE_FIELDS}
    fields["mlp_activations"] = list(fields["mlp_activations"])
    return fields
