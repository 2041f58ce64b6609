"""Train and eval steps: pure functions of (state, batch), jitted with explicit shardings.

Gradient accumulation splits the batch into microbatches and scans over them;
each task's token count is taken over the whole batch first, so the summed
microbatch gradients equal the full-batch gradient exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dsbs_jax import cpu_memory, losses
from dsbs_jax.errors import UserError
from dsbs_jax.models.t5 import T5
from dsbs_jax.partitioning import Partitioner

Array = jax.Array
Batch = Mapping[str, Array]
PyTree = Any

# Batch features the model reads, by the name of its keyword argument.
MODEL_INPUTS = (
    "encoder_input_tokens",
    "decoder_input_tokens",
    "decoder_target_tokens",
    "encoder_segment_ids",
    "decoder_segment_ids",
    "encoder_positions",
    "decoder_positions",
)


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint must hold to resume training exactly."""

    step: Array
    params: PyTree
    opt_state: PyTree


def dropout_key(seed: int, use_hardware_rng: bool = False) -> Array:
    """The key every train step folds its step number into for dropout.

    `use_hardware_rng` (t5x's flag of that name) draws dropout masks with XLA's
    RngBitGenerator (`unsafe_rbg`) instead of threefry: cheaper on every backend, and
    still deterministic for a given mesh, but the masks change with the partitioning.
    """
    return jax.random.key(seed, impl="unsafe_rbg" if use_hardware_rng else "threefry2x32")


def init_state(params: PyTree, optimizer: optax.GradientTransformation) -> TrainState:
    step = jnp.zeros((), jnp.int32)
    return TrainState(step=step, params=params, opt_state=optimizer.init(params))


def model_logits(
    model: T5, params: PyTree, batch: Batch, dropout_rng: Array | None = None
) -> Array:
    """Teacher-forced logits; dropout is on exactly when a dropout rng is given."""
    kwargs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
    return model.apply(
        {"params": params}, **kwargs, enable_dropout=dropout_rng is not None, rngs=rngs
    )


def batch_counts(batch: Batch) -> dict[str, Array]:
    """How many examples (an input with its target) and non-padding tokens a batch holds.

    A packed row holds several examples, numbered by its segment ids from 1; an unpacked row
    holds one, unless it is padding.
    """
    targets = batch["decoder_target_tokens"]
    if "decoder_segment_ids" in batch:
        examples = jnp.max(batch["decoder_segment_ids"], axis=-1).sum()
    else:
        examples = jnp.any(targets > 0, axis=-1).sum()
    tokens = (batch["encoder_input_tokens"] > 0).sum() + (targets > 0).sum()
    return {"examples": examples.astype(jnp.float32), "tokens": tokens.astype(jnp.float32)}


def _split_microbatches(batch: Batch, num_microbatches: int) -> dict[str, Array]:
    def split(x: Array) -> Array:
        if x.shape[0] % num_microbatches:
            raise UserError(
                f"batch size {x.shape[0]} is not divisible by {num_microbatches} microbatches"
            )
        return x.reshape(num_microbatches, x.shape[0] // num_microbatches, *x.shape[1:])

    return {k: split(v) for k, v in batch.items()}


def make_train_step(
    model: T5,
    optimizer: optax.GradientTransformation,
    num_microbatches: int = 1,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> Callable[[TrainState, Batch, Array], tuple[TrainState, dict[str, Array]]]:
    """Returns train_step(state, batch, rng) -> (new state, metrics); jit it with shardings."""

    def micro_grads(params: PyTree, micro: Batch, counts: Array, rng: Array):
        def loss_fn(p: PyTree):
            logits = model_logits(model, p, micro, rng)
            return losses.step_by_step_loss(logits, micro, counts, label_smoothing, z_loss)

        (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, sums

    def train_step(
        state: TrainState, batch: Batch, rng: Array
    ) -> tuple[TrainState, dict[str, Array]]:
        rng = jax.random.fold_in(rng, state.step)
        counts = losses.role_token_counts(batch["decoder_task_ids"])
        if num_microbatches == 1:
            grads, sums = micro_grads(state.params, batch, counts, rng)
        else:
            micro = _split_microbatches(batch, num_microbatches)
            rngs = jax.random.split(rng, num_microbatches)

            def accumulate(carry, xs):
                grads, sums = micro_grads(state.params, xs[0], counts, xs[1])
                return jax.tree.map(jnp.add, carry, (grads, sums)), None

            zero_sums = jax.eval_shape(
                lambda: micro_grads(state.params, jax.tree.map(lambda x: x[0], micro), counts, rng)
            )[1]
            init = (
                jax.tree.map(jnp.zeros_like, state.params),
                jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_sums),
            )
            (grads, sums), _ = jax.lax.scan(accumulate, init, (micro, rngs))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = losses.summarise_loss_sums(sums)
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics.update(batch_counts(batch))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(
    model: T5, label_smoothing: float = 0.0, z_loss: float = 0.0
) -> Callable[[PyTree, Batch], dict[str, Array]]:
    """Returns eval_step(params, batch) -> loss sums, to add up over an evaluation split."""

    def eval_step(params: PyTree, batch: Batch) -> dict[str, Array]:
        logits = model_logits(model, params, batch)
        _, sums = losses.step_by_step_loss(logits, batch, None, label_smoothing, z_loss)
        return sums

    return eval_step


def jit_train_step(
    model: T5,
    optimizer: optax.GradientTransformation,
    partitioner: Partitioner,
    abstract_state: TrainState,
    num_microbatches: int = 1,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> Callable[[TrainState, Batch, Array], tuple[TrainState, dict[str, Array]]]:
    """`make_train_step` jitted with the state's shardings (from its abstract state), rows
    over "data", the state donated; trace and call it inside `activation_rules()`."""
    shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
    return jax.jit(
        make_train_step(model, optimizer, num_microbatches, label_smoothing, z_loss),
        in_shardings=(shardings, partitioner.data_sharding, partitioner.replicated),
        out_shardings=(shardings, partitioner.replicated),
        donate_argnums=(0,),
    )


def jit_stacked_train_step(
    model: T5,
    optimizer: optax.GradientTransformation,
    partitioner: Partitioner,
    stacked_state: TrainState,
    num_microbatches: int = 1,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> Callable[[TrainState, Batch, Array], tuple[TrainState, dict[str, Array]]]:
    """`make_train_step` of several runs at once, vmapped over a leading runs axis of the
    state, the batch and the dropout keys, jitted with the stacked state's shardings (from its
    abstract state): runs over the "runs" mesh axis (`Partitioner.stacked`), rows over
    "data", the state donated. Each run's metrics come out on the runs axis. Trace and call it
    inside `activation_rules()`: the model's sharding constraints gain the runs axis."""
    shardings = jax.tree.map(lambda x: x.sharding, stacked_state)
    runs = partitioner.stacked(partitioner.replicated)
    step = make_train_step(model, optimizer, num_microbatches, label_smoothing, z_loss)
    return jax.jit(
        jax.vmap(step, spmd_axis_name=partitioner.runs_axis),
        in_shardings=(shardings, partitioner.stacked(partitioner.data_sharding), runs),
        out_shardings=(shardings, runs),
        donate_argnums=(0,),
    )


def compile_train_step(
    model: T5,
    optimizer: optax.GradientTransformation,
    partitioner: Partitioner,
    abstract_state: TrainState,
    batch: Mapping[str, jax.ShapeDtypeStruct],
    rng: Array,
    num_microbatches: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> tuple[jax.stages.Compiled, int]:
    """(program, microbatch count): `jit_train_step` compiled for global batches shaped like
    `batch`, with `num_microbatches`; None leaves the count to `cpu_memory.fewest_microbatches`
    (1 on accelerators). Compile it inside `activation_rules()`."""

    def compile_with(count: int) -> jax.stages.Compiled:
        step = jit_train_step(
            model, optimizer, partitioner, abstract_state, count, label_smoothing, z_loss
        )
        return step.lower(abstract_state, batch, rng).compile()

    if num_microbatches is not None:
        return compile_with(num_microbatches), num_microbatches
    rows = next(iter(batch.values())).shape[0] // partitioner.mesh.shape["data"]
    return cpu_memory.fewest_microbatches(compile_with, rows, partitioner)


def jit_eval_step(
    model: T5, label_smoothing: float = 0.0, z_loss: float = 0.0
) -> Callable[[PyTree, Batch], dict[str, Array]]:
    """`make_eval_step` jitted; its inputs' shardings place it."""
    return jax.jit(make_eval_step(model, label_smoothing, z_loss))
