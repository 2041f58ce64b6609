"""Model and data parallelism for the T5 model: the slice of t5x's partitioner this project needs.

t5x cannot be installed, and its partitioner is built on APIs current JAX deprecates
(`jax.experimental.pjit`, `with Mesh(...)`, `jax.interpreters.pxla`). This module gives the same
layout with today's APIs: a 2-D ("data", "model") `jax.sharding.Mesh`, t5x's logical axis rules
(`standard_logical_axis_rules`, 1-D or 2-D) resolved by flax (`nn.logical_to_mesh_sharding`),
`jax.jit` with `in_shardings` / `out_shardings`, and global `jax.Array`s built from each host's
part of the batch. A vectorized sweep (`dsbs_jax.vectorized`), which trains several runs as one
program, adds a "runs" axis in front when `num_runs_partitions` > 1: each run's arrays gain a
leading runs dimension, split over it.

Pitfalls this module takes care of:

* `jax.make_mesh` makes `Explicit` axes by default since JAX 0.7; flax's logical constraints
  (`nn.with_logical_constraint`) need `Auto` axes, so the mesh is built with `AxisType.Auto`.
* flax only applies `nn.with_logical_constraint` when logical axis rules are active
  (`nn.logical_axis_rules`) and a mesh is set (`jax.set_mesh`); both are read while tracing, so
  trace and call jitted model code inside `Partitioner.activation_rules()`.
* Parameters made with `nn.with_logical_partitioning` come boxed (`nn.LogicallyPartitioned`);
  `init_sharded` returns them unboxed, which is what jitted functions should receive.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dsbs_jax.errors import UserError

if TYPE_CHECKING:
    import seqio

LogicalAxisRules = Sequence[tuple[str, str | None]]
RUNS_AXIS = "runs"

# t5x's standard 1-D rules: data parallelism over "data", Megatron-style model parallelism of
# the vocabulary, MLP and attention heads over "model"; everything else replicated.
STANDARD_LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("vocab", "model"),
    ("mlp", "model"),
    ("heads", "model"),
    ("joined_kv", "model"),
    ("kv", None),
    ("embed", None),
    ("length", None),
    ("relpos_buckets", None),
    ("layers", None),
    ("stack", None),
    ("mlp_activations", None),
)


def standard_logical_axis_rules(
    activation_partitioning_dims: int = 1, parameter_partitioning_dims: int = 1
) -> tuple[tuple[str, str | None], ...]:
    """t5x's `standard_logical_axis_rules`: the 1-D rules, with "embed" split when asked.

    flax gives each axis of an array the first rule whose mesh axis that array does not use yet,
    so one rule list shards parameters and activations differently. `parameter_partitioning_dims`
    2 adds ("embed", "data"): a kernel's "embed" axis (its other axis already on "model") and
    the embedding go over "data", ZeRO-3 style, while activations' "embed" stays whole because
    their "batch" holds "data". `activation_partitioning_dims` 2 puts ("embed", "model") first:
    activations [batch, length, embed] split "embed" over "model", kernels keep theirs on
    "data" (2-D parameters) or whole, and 1-D parameters such as norm scales go over "model".
    """
    dims = (activation_partitioning_dims, parameter_partitioning_dims)
    if not set(dims) <= {1, 2}:
        raise UserError(
            f"activation_partitioning_dims={activation_partitioning_dims} and "
            f"parameter_partitioning_dims={parameter_partitioning_dims}: each must be 1 or 2"
        )
    if dims == (1, 1):
        return STANDARD_LOGICAL_AXIS_RULES
    embed_rules = (("embed", "model"),) if activation_partitioning_dims == 2 else ()
    embed_rules += (("embed", "data"),) if parameter_partitioning_dims == 2 else ()
    split = tuple(rule for rule in STANDARD_LOGICAL_AXIS_RULES if rule[0] != "embed")
    return split[:5] + embed_rules + split[5:]


def param_keys(path: Sequence[Any]) -> tuple[str, ...]:
    """The parameter a train-state leaf belongs to: the dict keys along its path.

    optax states repeat the parameter tree inside their own tuples and named tuples, so a
    moment's dict keys are its parameter's.
    """
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


@gin.configurable
def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    cpu_collectives: bool = False,
    auto_detect: bool = False,
) -> None:
    """Joins this process to a multi-process JAX run; a no-op when nothing is asked.

    Call it first, before any JAX computation. `jax.distributed.initialize` runs when a
    coordinator, process count or process id is given (JAX auto-detects the ones left out), or
    with `auto_detect=True`, where JAX detects all of them (Cloud TPU pod slices, SLURM, Open MPI,
    Kubernetes). On Cloud TPU pods the call is optional, as the TPU runtime already connects the
    hosts; on GPU and CPU clusters it is required. `cpu_collectives` switches cross-process
    collectives of CPU devices to gloo, which multi-process CPU runs need.
    """
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    explicit = (coordinator_address, num_processes, process_id) != (None, None, None)
    if explicit or auto_detect:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )


@gin.configurable
class Partitioner:
    """A ("data", "model") mesh over all global devices plus t5x's logical-axis rules.

    `num_partitions` is the model-parallel size (t5x's `num_partitions`); the rest of the devices
    form the data-parallel axis. The rules are t5x's `standard_logical_axis_rules` for
    `activation_partitioning_dims` and `parameter_partitioning_dims` unless `logical_axis_rules`
    gives others. The model axis may span hosts: every host feeds the rows its devices hold
    (`host_rows`), and hosts that hold the same rows feed the same ones.

    `num_runs_partitions` > 1 puts a "runs" axis of that size first, ("runs", "data", "model"):
    the runs of a vectorized sweep are split over it (`stacked`), and "data" gets the devices
    that are left. Arrays of one run are replicated over it. 1 (the default) keeps the 2-D mesh.
    """

    def __init__(
        self,
        num_partitions: int = 1,
        logical_axis_rules: LogicalAxisRules | None = None,
        devices: Sequence[jax.Device] | None = None,
        activation_partitioning_dims: int = 1,
        parameter_partitioning_dims: int = 1,
        num_runs_partitions: int = 1,
    ) -> None:
        devices = list(jax.devices() if devices is None else devices)
        if num_partitions < 1 or len(devices) % num_partitions:
            raise UserError(
                f"num_partitions={num_partitions} must be a positive divisor of the number of "
                f"devices ({len(devices)})"
            )
        if num_runs_partitions < 1 or len(devices) % (num_runs_partitions * num_partitions):
            raise UserError(
                f"num_runs_partitions={num_runs_partitions} times num_partitions={num_partitions} "
                f"must divide the number of devices ({len(devices)})"
            )
        if logical_axis_rules is None:
            logical_axis_rules = standard_logical_axis_rules(
                activation_partitioning_dims, parameter_partitioning_dims
            )
        self.num_partitions = num_partitions
        self.num_runs_partitions = num_runs_partitions
        self.logical_axis_rules = tuple(logical_axis_rules)
        data = len(devices) // (num_runs_partitions * num_partitions)
        shape, names = (data, num_partitions), ("data", "model")
        if num_runs_partitions > 1:
            shape, names = (num_runs_partitions, *shape), (RUNS_AXIS, *names)
        # Auto axes: flax's logical constraints fail on make_mesh's default Explicit axes.
        self.mesh: Mesh = jax.make_mesh(
            shape, names, axis_types=(AxisType.Auto,) * len(names), devices=devices
        )

    @property
    def runs_axis(self) -> str | None:
        """The mesh axis the runs of a vectorized sweep are split over; None: not split."""
        return RUNS_AXIS if RUNS_AXIS in self.mesh.axis_names else None

    def stacked(self, sharding: NamedSharding) -> NamedSharding:
        """The sharding of a stack of arrays sharded like `sharding`, one per run of a
        vectorized sweep: the leading runs dimension over the "runs" axis, the rest as before."""
        return NamedSharding(self.mesh, P(self.runs_axis, *sharding.spec))

    def shard_stacked_batch(self, batches: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Global [runs, batch, ...] arrays, runs over "runs" and rows over "data", from the
        whole stacked batches, which every host holds; each host places what its devices hold."""
        sharding = self.stacked(self.data_sharding)
        return {
            name: jax.make_array_from_callback(value.shape, sharding, value.__getitem__)
            for name, value in ((n, np.asarray(v)) for n, v in batches.items())
        }

    @property
    def data_sharding(self) -> NamedSharding:
        """Sharding of [batch, ...] arrays: rows split over "data", replicated over "model"."""
        return NamedSharding(self.mesh, P("data"))

    @property
    def replicated(self) -> NamedSharding:
        """Sharding of arrays held whole on every device."""
        return NamedSharding(self.mesh, P())

    def state_shardings(self, abstract_state: Any, params: Any) -> Any:
        """Shardings for a train state: each leaf shaped like its parameter is sharded like it.

        That covers the parameters and the optimizer's per-parameter state (Adam's moments,
        Adafactor's unfactored ones), which would otherwise be created replicated: zeros
        inherit no sharding, so a plain jit of `optimizer.init` puts them whole on every
        device. The small rest (Adafactor's row and column statistics, counts) is replicated.
        """
        by_keys = {param_keys(path): p for path, p in jax.tree_util.tree_leaves_with_path(params)}

        def place(path: Any, leaf: Any) -> NamedSharding:
            param = by_keys.get(param_keys(path))
            like_param = param is not None and param.shape == leaf.shape
            return param.sharding if like_param else self.replicated

        return jax.tree_util.tree_map_with_path(place, abstract_state)

    def logical_to_sharding(self, logical_specs: Any) -> Any:
        """Maps a tree of logical PartitionSpecs (axis names) to a tree of NamedShardings."""
        return nn.logical_to_mesh_sharding(logical_specs, self.mesh, self.logical_axis_rules)

    @contextlib.contextmanager
    def activation_rules(self) -> Iterator[None]:
        """Activates the mesh (`jax.set_mesh`) and the logical axis rules while inside.

        Trace, jit and call model code inside it so the model's `nn.with_logical_constraint`
        calls become sharding constraints on this mesh. The rules are read at trace time and
        are not part of jit's cache key: trace a jitted function under one set of rules only.
        """
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.logical_axis_rules):
            yield

    def init_sharded(self, init_fn: Callable[..., Any], *args: Any) -> tuple[Any, Any]:
        """Runs `init_fn(*args)` (e.g. `model.init`) creating every parameter already sharded.

        Shapes and logical names come from `jax.eval_shape`, so no parameter is ever
        materialised whole on one device. Returns the unboxed variables and their shardings.
        """
        with self.activation_rules():
            abstract = jax.eval_shape(init_fn, *args)
            shardings = self.logical_to_sharding(nn.get_partition_spec(abstract))
            variables = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)
        return variables, shardings

    def host_rows(self, global_batch_size: int) -> np.ndarray:
        """The rows of a global batch this process feeds: those its devices hold, sorted.

        `jax.make_array_from_process_local_data` places a host's rows on its devices in this
        order, so slicing a global batch with these indices puts every row where a
        single-process run would, whatever the mapping of the "data" axis onto hosts.
        """
        if global_batch_size % self.mesh.shape["data"]:
            raise UserError(
                f"batch size {global_batch_size} is not divisible by the data-parallel size "
                f"{self.mesh.shape['data']}"
            )
        indices = self.data_sharding.addressable_devices_indices_map((global_batch_size,))
        rows = {row for (index,) in indices.values() for row in range(global_batch_size)[index]}
        return np.array(sorted(rows), dtype=np.int64)

    def host_slice(self, global_batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """This host's rows (`host_rows`) of a global batch that every host holds."""
        rows = self.host_rows(len(next(iter(global_batch.values()))))
        return {name: np.asarray(value)[rows] for name, value in global_batch.items()}

    def shard_batch(self, host_local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Makes global [batch, ...] arrays from this host's rows (see `host_rows`)."""
        return {
            name: jax.make_array_from_process_local_data(self.data_sharding, np.asarray(value))
            for name, value in host_local_batch.items()
        }

    def data_shard(self) -> tuple[int, int]:
        """(index, count) of this host's shard of the input: one per distinct block of rows.

        Hosts whose devices hold the same rows (a model axis across hosts) read the same shard,
        as t5x's data layout does, so they feed identical rows.
        """
        data_size = self.mesh.shape["data"]
        rows = self.host_rows(data_size)
        if not np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
            raise UserError(f"this host feeds non-contiguous rows {rows} of the data axis")
        return int(rows[0]) // len(rows), data_size // len(rows)

    def data_shard_info(self) -> seqio.ShardInfo:
        """`data_shard` as seqio's ShardInfo (seqio, which loads TensorFlow, is imported here)."""
        import seqio

        index, num_shards = self.data_shard()
        return seqio.ShardInfo(index=index, num_shards=num_shards)
