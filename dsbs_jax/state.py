"""A student's state: laid out abstractly first, then made real exactly once.

A `Student` is a T5 config on a mesh: its Flax module and where each parameter and optimizer
moment lives, with nothing allocated. From it a training run makes its state real once: it
restores it from MODEL_DIR straight into those shardings when a checkpoint exists, and only
otherwise initialises it (seeded random parameters, or a pretrained checkpoint's). Evaluation
and inference restore parameters alone, from full training checkpoints and parameters-only ones
alike. `dsbs_jax.aot` compiles against the abstract state, for devices this host lacks.

Training, evaluation and inference all start here, so they agree on shapes and shardings and
restore one another's checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from etils import epath

from dsbs_jax import checkpoint_import, checkpoints, trainer
from dsbs_jax.errors import UserError
from dsbs_jax.model_config import shape_fields
from dsbs_jax.models.t5 import T5, T5Config, abstract_params
from dsbs_jax.partitioning import Partitioner

PyTree = Any
MODEL_KEY = "model"  # the checkpoint data item's record of the model's dimensions


def _with_sharding(leaf: Any, sharding: jax.sharding.Sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def tree_bytes(tree: PyTree) -> int:
    """The bytes of a tree of arrays (or ShapeDtypeStructs), counted once per global array."""
    return sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class Student:
    """A T5 student on a mesh: config, module and parameter layout; nothing allocated."""

    config: T5Config
    partitioner: Partitioner

    @functools.cached_property
    def model(self) -> T5:
        return T5(self.config)

    @functools.cached_property
    def param_shardings(self) -> PyTree:
        return checkpoint_import.param_shardings(self.config, self.partitioner)

    @functools.cached_property
    def abstract_params(self) -> PyTree:
        """The parameters as ShapeDtypeStructs carrying their shardings."""
        params = abstract_params(self.config, boxed=False)
        return jax.tree.map(_with_sharding, params, self.param_shardings)

    def abstract_train_state(self, optimizer: optax.GradientTransformation) -> trainer.TrainState:
        """The training state (step, parameters, optimizer moments) as sharded
        ShapeDtypeStructs: what a checkpoint restores into and what `aot` compiles."""
        abstract = jax.eval_shape(
            functools.partial(trainer.init_state, optimizer=optimizer), self.abstract_params
        )
        shardings = self.partitioner.state_shardings(abstract, self.abstract_params)
        return jax.tree.map(_with_sharding, abstract, shardings)

    def init_train_state(
        self,
        optimizer: optax.GradientTransformation,
        seed: int,
        initial_checkpoint_path: str | None = None,
    ) -> trainer.TrainState:
        """A fresh training state, built in place: random (seeded) parameters, or a
        pretrained checkpoint's (Hugging Face, t5x or ours; `dsbs_jax.checkpoint_import`)."""
        shardings = jax.tree.map(lambda x: x.sharding, self.abstract_train_state(optimizer))
        with self.partitioner.activation_rules():
            if initial_checkpoint_path:
                params = checkpoint_import.load_params(
                    initial_checkpoint_path, self.config, self.param_shardings
                )
                init = jax.jit(
                    functools.partial(trainer.init_state, optimizer=optimizer),
                    out_shardings=shardings,
                    donate_argnums=0,
                )
                return init(params)
            init = functools.partial(self.random_train_state, optimizer=optimizer)
            return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))

    def random_train_state(
        self, rng: jax.Array, optimizer: optax.GradientTransformation
    ) -> trainer.TrainState:
        """The training state of random parameters drawn with `rng`; jit it (or vmap it over
        keys, as a vectorized sweep does) with the state's shardings."""
        tokens = jnp.ones((1, 1), jnp.int32)
        boxed = self.model.init(rng, tokens, tokens, enable_dropout=False)["params"]
        return trainer.init_state(nn.unbox(boxed), optimizer)

    def record(self) -> dict[str, Any]:
        """What a checkpoint's data item says of the model, to refuse a mismatching config."""
        return {MODEL_KEY: shape_fields(self.config)}

    def check_recorded(self, data: dict[str, Any], where: str) -> None:
        """UserError naming both sides when a checkpoint's recorded dimensions differ."""
        recorded = data.get(MODEL_KEY)
        if not recorded:
            return
        ours = shape_fields(self.config)
        differ = sorted(k for k in recorded.keys() & ours.keys() if recorded[k] != ours[k])
        if differ:
            theirs = ", ".join(f"{k}={recorded[k]}" for k in differ)
            mine = ", ".join(f"{k}={ours[k]}" for k in differ)
            raise UserError(
                f"{where} holds a model with {theirs}, but the gin config gives {mine}; use the "
                "gin files and flags it was trained with (its MODEL_DIR/config.gin)"
            )

    def restore_params(self, step_dir: str | epath.Path) -> PyTree:
        """Only the parameters of the checkpoint in `step_dir`, placed by `param_shardings`:
        no optimizer moments are read or allocated. Reads our checkpoints (training states
        and parameters-only ones, either layer layout) and t5x's."""
        self.check_recorded(checkpoints.read_data(step_dir), str(step_dir))
        return checkpoint_import.load_params(str(step_dir), self.config, self.param_shardings)
