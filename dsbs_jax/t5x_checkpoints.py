"""t5x's own checkpoint layout (orbax), read and written without t5x installed.

Current t5x writes `MODEL_DIR/checkpoint_<step>/state/`, an orbax PyTree of its
TrainState's state dict: `target/...` (the parameters, with the names of
shared/T5X_REFERENCE.md, which are ours) and `state/step` plus, after training,
`state/param_states/...` (the optimizer's). Ours keeps `params/...` in the same
place, so a reader picks the tree by its top-level key.

`write_t5x_checkpoint` writes `target` and `state/step` only, not the state of
whichever optimizer the t5x run will use: t5x.eval and t5x.infer restore it as it
is; finetune.gin restores strictly, so it needs
gin_configs/dsbs_t5x/restore_without_optimizer_state.gin to start that state afresh.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

# t5x's OrbaxCheckpointManagerInterface writes the item and step folders that ours have.
from dsbs_jax.checkpoints import PARAMS_KEY, STATE_ITEM, STEP_PREFIX
from dsbs_jax.model_config import SHAPE_FIELDS

if TYPE_CHECKING:
    from dsbs_jax.models.t5 import T5Config

T5X_PARAMS = "target"
# The fields of t5x's `network.T5Config` (t5x/examples/t5/network.py) that must equal ours for
# its T5 to hold our parameters and compute what ours computes; t5x's model gins set other
# values (vocab_size 32128, float32_attention_logits False). dtype and dropout_rate are the
# run's choice, not the checkpoint's.
NETWORK_FIELDS = (
    *(f for f in SHAPE_FIELDS if f != "relative_attention_num_buckets"),  # t5x fixes it at 32
    "float32_attention_logits",
)


def params_key(tree: Mapping[str, Any]) -> str | None:
    """'params' (ours) or 'target' (t5x): where the parameters sit in a checkpoint's tree."""
    for key in (PARAMS_KEY, T5X_PARAMS):
        if key in tree:
            return key
    return None


def t5x_state(params: Any, step: int = 0) -> dict[str, Any]:
    """The state dict t5x saves, less optimizer state: {'target': params, 'state': {'step'}}."""
    return {T5X_PARAMS: params, "state": {"step": np.asarray(step, np.int32)}}


def write_t5x_checkpoint(params: Any, model_dir: str | Path, step: int = 0) -> Path:
    """Writes `MODEL_DIR/checkpoint_<step>/state/` as t5x writes it; returns the step dir."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(step_prefix=STEP_PREFIX, create=True)
    with ocp.CheckpointManager(
        Path(model_dir).absolute(), options=options, item_names=(STATE_ITEM,)
    ) as manager:
        state = t5x_state(params, step)
        manager.save(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.PyTreeSave(state)}))
        manager.wait_until_finished()
    return Path(model_dir) / f"{STEP_PREFIX}_{step}"


def network_gin(config: T5Config) -> str:
    """The gin block that makes t5x's `network.T5Config` the network of `config`'s parameters,
    for a gin file (or `--gin.network.T5Config.<field>=` flags) after t5x's model gin."""
    fields = [f"  {name} = {getattr(config, name)!r}" for name in NETWORK_FIELDS]
    return "\n".join(["network.T5Config:", *fields])
