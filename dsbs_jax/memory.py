"""Per-chip memory of a training run on a TPU slice, worked out on paper from the config.

Shapes come from `jax.eval_shape` of the real model and optimizer (nothing is allocated, so
xxl takes seconds on a CPU), shardings from the project's logical axis rules applied to a
hypothetical ("data", "model") mesh, the layout `Partitioner` builds on real devices. A sharded
dimension that does not divide by its mesh axis is rounded up, as XLA pads it.

Activations are a rough estimate (see `activation_bytes`): the model has no rematerialisation,
so the backward pass keeps every layer's activations.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import PartitionSpec

from dsbs_jax import optimizers
from dsbs_jax.checkpoint_import import _abstract_params
from dsbs_jax.models.t5 import T5Config
from dsbs_jax.partitioning import STANDARD_LOGICAL_AXIS_RULES, LogicalAxisRules, param_keys

GiB = 2**30
# HBM per chip; JAX sees one device per chip on all three (v4 and v5p run megacore).
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95}
# Share of HBM the estimate may fill: the rest is for XLA temporaries and the TPU runtime.
HEADROOM = 0.9


@dataclasses.dataclass(frozen=True)
class Slice:
    """A Cloud TPU slice as `gcloud ... --accelerator-type` names it."""

    generation: str
    chips: int
    chips_per_host: int

    @property
    def hosts(self) -> int:
        return max(self.chips // self.chips_per_host, 1)


# v4-N and v5p-N count TensorCores (2 per chip); v5litepod-N counts chips. Multi-host slices
# have 4 chips per host; the single-host v5litepod-8 has 8.
SLICES = {
    "v4-8": Slice("v4", 4, 4),
    "v4-32": Slice("v4", 16, 4),
    "v4-64": Slice("v4", 32, 4),
    "v4-128": Slice("v4", 64, 4),
    "v5litepod-8": Slice("v5e", 8, 8),
    "v5litepod-16": Slice("v5e", 16, 4),
    "v5litepod-64": Slice("v5e", 64, 4),
    "v5litepod-256": Slice("v5e", 256, 4),
    "v5p-8": Slice("v5p", 4, 4),
    "v5p-32": Slice("v5p", 16, 4),
}


def mesh_shape(chips: int, num_partitions: int) -> dict[str, int]:
    """The ("data", "model") mesh `Partitioner` would build on `chips` devices."""
    if num_partitions < 1 or chips % num_partitions:
        raise ValueError(f"num_partitions={num_partitions} must divide chips={chips}")
    return {"data": chips // num_partitions, "model": num_partitions}


Placed = tuple[tuple[jax.ShapeDtypeStruct, PartitionSpec], ...]


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Shape, dtype and mesh PartitionSpec of every parameter and optimizer-state array."""

    params: Placed
    optimizer_state: Placed

    @property
    def param_count(self) -> int:
        return sum(math.prod(leaf.shape) for leaf, _ in self.params)


def state_layout(
    config: T5Config,
    optimizer: str = "adamw",
    rules: LogicalAxisRules = STANDARD_LOGICAL_AXIS_RULES,
) -> StateLayout:
    """The train state as `training.Student` creates it, from `jax.eval_shape` alone.

    Parameter specs are their logical axis names under `rules`, as
    `Partitioner.logical_to_sharding` resolves them. The optimizer is the project's own
    (`optimizers.make_optimizer`), and its state is placed by `Partitioner.state_shardings`'
    rule: a leaf shaped like its parameter (Adam's moments, Adafactor's unfactored ones) is
    sharded like it, the small rest (Adafactor's row and column statistics, counts) replicated.
    """
    boxed = _abstract_params(config)
    shapes = traverse_util.flatten_dict(nn.unbox(boxed))
    logical = traverse_util.flatten_dict(nn.get_partition_spec(boxed))
    specs = {path: nn.logical_to_mesh_axes(spec, rules) for path, spec in logical.items()}
    tx = optimizers.make_optimizer(1, name=optimizer)
    state = jax.eval_shape(tx.init, traverse_util.unflatten_dict(shapes))
    placed_state = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        keys = param_keys(path)
        like_param = keys in shapes and shapes[keys].shape == leaf.shape
        placed_state.append((leaf, specs[keys] if like_param else PartitionSpec()))
    return StateLayout(
        params=tuple((shapes[path], specs[path]) for path in shapes),
        optimizer_state=tuple(placed_state),
    )


def _ceil_div(n: int, d: int) -> int:
    return -(-n // d)


def shard_shape(shape: tuple[int, ...], spec: Any, mesh: Mapping[str, int]) -> tuple[int, ...]:
    """One chip's block of an array of `shape` laid out by `spec` (padded when uneven)."""
    spec = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
    block = []
    for size, axes in zip(shape, spec, strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        block.append(_ceil_div(size, math.prod(mesh[name] for name in names)))
    return tuple(block)


def bytes_per_chip(arrays: Placed, mesh: Mapping[str, int]) -> int:
    """Bytes one chip holds of `arrays` laid out on `mesh`."""
    return sum(
        math.prod(shard_shape(leaf.shape, spec, mesh)) * jnp.dtype(leaf.dtype).itemsize
        for leaf, spec in arrays
    )


def activation_bytes(
    config: T5Config,
    rows_per_chip: int,
    inputs_length: int,
    targets_length: int,
    num_partitions: int,
) -> int:
    """Rough estimate of the activations one chip keeps for the backward pass.

    Per token of a stack, in bytes, with a = bytes of `config.dtype` and t = `num_partitions`
    (the model-parallel size, which splits heads, joined_kv, mlp and vocab but not emb):
      attention block  3·a·emb + (4+4+a+a)·joined/t + (4+a+1)·heads/t·key_length
                       (norm in/out and residual; f32 q, k; v; context; f32 softmax output,
                       weights and dropout mask per key)
      MLP block        3·a·emb + (4·a+1)·mlp/t  (wi_0, wi_1, gelu, product, dropout mask)
      logits           2·4·vocab/t  (f32 logits and their log-softmax), decoder only
    An encoder layer is attention (key length = inputs) + MLP over inputs tokens; a decoder
    layer is self-attention (targets) + cross-attention (inputs) + MLP over targets tokens.
    XLA temporaries and fusion are ignored: treat it as an order of magnitude.
    """
    a = jnp.dtype(config.dtype).itemsize
    joined = config.num_heads * config.head_dim

    def split(n: int) -> int:
        return _ceil_div(n, num_partitions)

    def attention(key_length: int) -> int:
        context = 3 * a * config.emb_dim + (8 + 2 * a) * split(joined)
        return context + (5 + a) * split(config.num_heads) * key_length

    mlp = 3 * a * config.emb_dim + (4 * a + 1) * split(config.mlp_dim)
    encoder = config.num_encoder_layers * inputs_length * (attention(inputs_length) + mlp)
    decoder_layer = attention(targets_length) + attention(inputs_length) + mlp
    decoder = targets_length * (
        config.num_decoder_layers * decoder_layer + 8 * split(config.vocab_size)
    )
    return rows_per_chip * (encoder + decoder)


def estimate(
    config: T5Config,
    layout: StateLayout,
    chips: int,
    num_partitions: int,
    batch_size: int,
    lengths: tuple[int, int],
    num_microbatches: int = 1,
) -> dict[str, Any]:
    """Per-chip bytes of params, optimizer state, gradients and activations, and their sum.

    `lengths` are the inputs and targets lengths. Gradients are float32 like the parameters;
    with microbatches the accumulated sum adds a second copy. Batch rows are split over "data"
    only, so activations hold batch_size / data / num_microbatches rows per chip. `fits` says
    whether the total stays within HEADROOM of each generation's HBM.
    """
    mesh = mesh_shape(chips, num_partitions)
    if batch_size % (mesh["data"] * num_microbatches):
        raise ValueError(
            f"batch_size={batch_size} must divide by the data-parallel size {mesh['data']} "
            f"times num_microbatches={num_microbatches}"
        )
    rows = batch_size // mesh["data"] // num_microbatches
    params = bytes_per_chip(layout.params, mesh)
    figures = {
        "params": params,
        "optimizer_state": bytes_per_chip(layout.optimizer_state, mesh),
        "gradients": params * (1 if num_microbatches == 1 else 2),
        "activations": activation_bytes(config, rows, *lengths, num_partitions),
    }
    figures["total"] = sum(figures.values())
    return {
        "param_count": layout.param_count,
        "mesh": mesh,
        "rows_per_chip": rows,
        "bytes_per_chip": figures,
        "fits": {gen: figures["total"] <= HEADROOM * gib * GiB for gen, gib in HBM_GIB.items()},
    }


def plan(
    config: T5Config,
    layout: StateLayout,
    tpu: Slice,
    batch_size: int,
    lengths: tuple[int, int],
) -> dict[str, Any]:
    """The first (num_partitions, num_microbatches) that fits `tpu`, fewest partitions first;
    when none fits, the one with the smallest total (its `fits` says so).

    Partitions go up to the chips of one host (`Partitioner` keeps the model axis within a
    host), microbatches double while the batch still divides.
    """
    candidates = []
    for num_partitions in (p for p in (1, 2, 4, 8) if p <= tpu.chips_per_host):
        data, micro = tpu.chips // num_partitions, 1
        while batch_size % (data * micro) == 0:
            result = estimate(config, layout, tpu.chips, num_partitions, batch_size, lengths, micro)
            result.update(num_partitions=num_partitions, num_microbatches=micro)
            if result["fits"][tpu.generation]:
                return result
            candidates.append(result)
            micro *= 2
    if not candidates:
        raise ValueError(f"batch_size={batch_size} does not divide over {tpu.chips} chips")
    return min(candidates, key=lambda r: r["bytes_per_chip"]["total"])
