"""Tests for the partitioner on the 8 host CPU devices that conftest.py forces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from dsbs_jax.models.t5 import T5, get_config
from dsbs_jax.partitioning import (
    STANDARD_LOGICAL_AXIS_RULES,
    Partitioner,
    initialize_distributed,
    standard_logical_axis_rules,
)
from tests.conftest import cpu_xla_flags, free_port

# Every model-parallel dimension (vocab 64, heads 4, joined_kv 32, mlp 64) divides by 4.
VOCAB, EMB, HEADS, HEAD_DIM, MLP = 64, 32, 4, 8, 64
BATCH, ENC_LEN, DEC_LEN = 8, 12, 10


@pytest.fixture(scope="module")
def model() -> T5:
    config = get_config(
        "tiny",
        vocab_size=VOCAB,
        dtype=jnp.float32,
        dropout_rate=0.0,
        num_heads=HEADS,
        head_dim=HEAD_DIM,
        mlp_dim=MLP,
    )
    return T5(config)


@pytest.fixture(scope="module")
def init_fn(model):
    def init(rng, encoder_tokens, decoder_tokens):
        return model.init(rng, encoder_tokens, decoder_tokens, decoder_tokens, enable_dropout=False)

    return init


@pytest.fixture(scope="module")
def init_args():
    return (
        jax.random.PRNGKey(0),
        jnp.ones((BATCH, ENC_LEN), jnp.int32),
        jnp.ones((BATCH, DEC_LEN), jnp.int32),
    )


@pytest.fixture(scope="module")
def reference_variables(init_fn, init_args):
    """Unsharded, unboxed variables from a plain `model.init`."""
    return jax.jit(lambda *a: nn.unbox(init_fn(*a)))(*init_args)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return {
        "encoder_input_tokens": rng.integers(1, VOCAB, (BATCH, ENC_LEN)).astype(np.int32),
        "decoder_input_tokens": rng.integers(1, VOCAB, (BATCH, DEC_LEN)).astype(np.int32),
        "decoder_target_tokens": rng.integers(1, VOCAB, (BATCH, DEC_LEN)).astype(np.int32),
    }


def _forward(model):
    def forward(params, batch):
        return model.apply(
            {"params": params},
            batch["encoder_input_tokens"],
            batch["decoder_input_tokens"],
            batch["decoder_target_tokens"],
            enable_dropout=False,
        )

    return forward


@pytest.mark.parametrize(
    "num_partitions, shape", [(1, (8, 1)), (2, (4, 2)), (4, (2, 4)), (8, (1, 8))]
)
def test_mesh_shape(num_partitions, shape):
    mesh = Partitioner(num_partitions).mesh
    assert mesh.axis_names == ("data", "model")
    assert mesh.devices.shape == shape
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
    assert set(mesh.devices.flat) == set(jax.devices())


def test_mesh_over_given_devices():
    assert Partitioner(2, devices=jax.devices()[:4]).mesh.devices.shape == (2, 2)


def test_non_divisor_raises():
    with pytest.raises(ValueError, match="num_partitions=3 must be a positive divisor"):
        Partitioner(3)


def test_gin_configurable():
    with gin.unlock_config():
        gin.bind_parameter("Partitioner.num_partitions", 2)
    try:
        assert Partitioner().mesh.devices.shape == (4, 2)
    finally:
        gin.clear_config()


def test_standard_rules_and_shardings():
    rules = dict(STANDARD_LOGICAL_AXIS_RULES)
    assert rules["batch"] == "data"
    assert {k for k, v in rules.items() if v == "model"} == {"vocab", "mlp", "heads", "joined_kv"}
    partitioner = Partitioner(4)
    specs = {"embedding": P("vocab", "embed"), "hidden": P("batch", "length", "mlp")}
    shardings = partitioner.logical_to_sharding(specs)
    assert shardings["embedding"].spec == P("model", None)
    assert shardings["hidden"].spec == P("data", None, "model")
    assert partitioner.data_sharding.spec == P("data")
    assert partitioner.replicated.is_fully_replicated


@pytest.fixture(scope="module")
def sharded(init_fn, init_args):
    """num_partitions -> (partitioner, variables, shardings), each initialised once."""
    cache = {}

    def get(num_partitions: int):
        if num_partitions not in cache:
            partitioner = Partitioner(num_partitions)
            cache[num_partitions] = (partitioner, *partitioner.init_sharded(init_fn, *init_args))
        return cache[num_partitions]

    return get


# path -> (mesh PartitionSpec on a ("data", "model") mesh, per-device shard shape on (2, 4)).
EXPECTED = {
    "token_embedder/embedding": (P("model", None), (VOCAB // 4, EMB)),
    "encoder/relpos_bias/rel_embedding": (P("model", None), (HEADS // 4, 32)),
    "encoder/layers_0/attention/query/kernel": (P(None, "model"), (EMB, HEADS * HEAD_DIM // 4)),
    "encoder/layers_0/attention/out/kernel": (P("model", None), (HEADS * HEAD_DIM // 4, EMB)),
    "encoder/layers_1/mlp/wi_0/kernel": (P(None, "model"), (EMB, MLP // 4)),
    "decoder/layers_1/mlp/wo/kernel": (P("model", None), (MLP // 4, EMB)),
    "decoder/layers_0/encoder_decoder_attention/key/kernel": (
        P(None, "model"),
        (EMB, HEADS * HEAD_DIM // 4),
    ),
    "decoder/logits_dense/kernel": (P(None, "model"), (EMB, VOCAB // 4)),
    "encoder/layers_0/pre_attention_layer_norm/scale": (P(None), (EMB,)),
    "decoder/decoder_norm/scale": (P(None), (EMB,)),
}


def _lookup(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


@pytest.mark.parametrize("path", sorted(EXPECTED))
def test_init_sharded_layout(sharded, path):
    _, variables, shardings = sharded(4)
    spec, shard_shape = EXPECTED[path]
    array = _lookup(variables["params"], path)
    assert isinstance(array, jax.Array)  # unboxed
    assert _lookup(shardings["params"], path).spec == spec
    assert array.sharding.spec == spec
    assert len(array.addressable_shards) == 8
    assert {shard.data.shape for shard in array.addressable_shards} == {shard_shape}
    if spec == P(None):
        assert array.sharding.is_fully_replicated


def test_init_sharded_is_plain_init(sharded, reference_variables):
    _, variables, shardings = sharded(4)
    assert jax.tree.structure(variables) == jax.tree.structure(reference_variables)
    assert jax.tree.structure(shardings) == jax.tree.structure(reference_variables)
    jax.tree.map(
        lambda got, want: np.testing.assert_array_equal(np.asarray(got), np.asarray(want)),
        variables,
        reference_variables,
    )


@pytest.fixture(scope="module")
def reference_logits(model, reference_variables, batch):
    return jax.jit(_forward(model))(reference_variables["params"], batch)


@pytest.mark.parametrize("num_partitions", [4, 2])
def test_sharded_forward_matches_unsharded(model, sharded, batch, reference_logits, num_partitions):
    partitioner, variables, shardings = sharded(num_partitions)
    with partitioner.activation_rules():
        sharded_batch = partitioner.shard_batch(batch)
        jitted = jax.jit(
            _forward(model),
            in_shardings=(shardings["params"], partitioner.data_sharding),
            out_shardings=partitioner.logical_to_sharding(P("batch", "length", "vocab")),
        )
        lowered = jitted.lower(variables["params"], sharded_batch)
        # The model's nn.with_logical_constraint calls became real constraints.
        assert "sharding_constraint" in lowered.as_text()
        got = lowered.compile()(variables["params"], sharded_batch)

    assert got.sharding.spec == P("data", None, "model")
    np.testing.assert_allclose(np.asarray(got), np.asarray(reference_logits), atol=1e-5, rtol=0)


def test_shard_batch():
    partitioner = Partitioner(2)
    tokens = np.arange(8 * 16, dtype=np.int32).reshape(8, 16)
    (array,) = partitioner.shard_batch({"tokens": tokens}).values()
    assert array.shape == (8, 16)
    assert array.sharding.spec == P("data")
    rows = {(shard.index[0].start, shard.index[0].stop) for shard in array.addressable_shards}
    assert sorted(rows) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    for shard in array.addressable_shards:
        assert shard.data.shape == (2, 16)
        np.testing.assert_array_equal(np.asarray(shard.data), tokens[shard.index])
    np.testing.assert_array_equal(np.asarray(array), tokens)


def test_data_shard_info_single_process():
    info = Partitioner(2).data_shard_info()
    assert (info.index, info.num_shards) == (0, 1)


def test_initialize_distributed_without_arguments_is_noop():
    initialize_distributed()
    assert jax.process_count() == 1


def test_host_rows_single_process():
    partitioner = Partitioner(2)  # (4, 2): one process holds every row
    np.testing.assert_array_equal(partitioner.host_rows(8), np.arange(8))
    batch = {"tokens": np.arange(16).reshape(8, 2)}
    np.testing.assert_array_equal(partitioner.host_slice(batch)["tokens"], batch["tokens"])
    with pytest.raises(ValueError, match="not divisible by the data-parallel size 4"):
        partitioner.host_rows(6)


# ---------------------------------------------------------------------------------------------
# t5x's 2-D rules
# ---------------------------------------------------------------------------------------------


def _mesh_specs(rules, logical: dict) -> dict:
    return {name: nn.logical_to_mesh_axes(spec, rules) for name, spec in logical.items()}


# A kernel, the embedding, a norm scale, a scanned kernel and two activations.
LOGICAL = {
    "wi": P("embed", "mlp"),
    "embedding": P("vocab", "embed"),
    "scale": P("embed"),
    "scanned_wo": P("mlp", "layers", "embed"),
    "residual": P("batch", "length", "embed"),
    "hidden": P("batch", "length", "mlp"),
}


@pytest.mark.parametrize(
    "dims, want",
    [
        (
            (1, 1),
            dict(
                wi=P(None, "model"),
                embedding=P("model", None),
                scale=P(None),
                scanned_wo=P("model", None, None),
                residual=P("data", None, None),
            ),
        ),
        (  # parameters' embed over "data" (ZeRO-3 style); activations unchanged
            (1, 2),
            dict(
                wi=P("data", "model"),
                embedding=P("model", "data"),
                scale=P("data"),
                scanned_wo=P("model", None, "data"),
                residual=P("data", None, None),
            ),
        ),
        (  # activations' embed over "model"; kernels' embed stays whole
            (2, 1),
            dict(
                wi=P(None, "model"),
                embedding=P("model", None),
                scale=P("model"),
                scanned_wo=P("model", None, None),
                residual=P("data", None, "model"),
            ),
        ),
        (
            (2, 2),
            dict(
                wi=P("data", "model"),
                embedding=P("model", "data"),
                scale=P("model"),
                scanned_wo=P("model", None, "data"),
                residual=P("data", None, "model"),
            ),
        ),
    ],
)
def test_standard_rules_follow_t5x(dims, want):
    rules = standard_logical_axis_rules(*dims)
    got = _mesh_specs(rules, LOGICAL)
    assert got["hidden"] == P("data", None, "model")
    assert {k: got[k] for k in want} == want


def test_standard_rules_refuse_other_dims():
    with pytest.raises(ValueError, match="each must be 1 or 2"):
        standard_logical_axis_rules(3, 1)


def test_partitioning_dims_are_gin_settable():
    with gin.unlock_config():
        gin.parse_config(
            "Partitioner.parameter_partitioning_dims = 2\n"
            "Partitioner.activation_partitioning_dims = 2"
        )
    try:
        assert Partitioner().logical_axis_rules == standard_logical_axis_rules(2, 2)
    finally:
        gin.clear_config()
    assert Partitioner().logical_axis_rules == STANDARD_LOGICAL_AXIS_RULES


def test_optimizer_state_is_sharded_like_its_parameters(init_fn, init_args):
    """With 2-D parameters, AdamW's moments are split over "data" and "model" as well.

    Shapes and shardings only (nothing is compiled): `state_shardings` is what training jits
    the optimizer's init with.
    """
    partitioner = Partitioner(2, parameter_partitioning_dims=2)
    with partitioner.activation_rules():
        boxed = jax.eval_shape(init_fn, *init_args)["params"]
        shardings = partitioner.logical_to_sharding(nn.get_partition_spec(boxed))
    params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), shardings
    )
    optimizer = optax.adamw(1e-3)
    state = partitioner.state_shardings(jax.eval_shape(optimizer.init, params), params)
    kernel = params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    assert kernel.sharding.spec == P("data", "model")
    assert kernel.sharding.shard_shape(kernel.shape) == (EMB // 4, MLP // 2)
    for moments in (state[0].mu, state[0].nu):
        jax.tree.map(lambda m, p: assert_same_sharding(m, p.sharding, p.ndim), moments, params)


def assert_same_sharding(got, want, ndim: int) -> None:
    assert got.is_equivalent_to(want, ndim), (got, want)


def test_data_shard_info_counts_distinct_row_blocks():
    info = Partitioner(8).data_shard_info()  # one data shard: every device holds every row
    assert (info.index, info.num_shards) == (0, 1)


# Each of 4 single-device processes reports what it feeds on a (2, 2) mesh, whose model axis
# spans two processes, and the sum of squares of the global batch built from its rows.
_HOST_WORKER = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=4, process_id=int(sys.argv[2]))
import numpy as np
from dsbs_jax.partitioning import Partitioner
partitioner = Partitioner(2, parameter_partitioning_dims=2)
batch = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
rows = partitioner.host_rows(8)
shard = partitioner.data_shard()
array = partitioner.shard_batch({"x": batch[rows]})["x"]
total = jax.jit(lambda x: (x * x).sum(), out_shardings=partitioner.replicated)(array)
print(json.dumps(dict(rows=rows.tolist(), shard=list(shard),
                      total=float(total), shape=list(array.shape))))
"""


def test_model_axis_across_hosts_feeds_the_rows_each_host_holds():
    address = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": cpu_xla_flags(1),
    }
    running = [
        subprocess.Popen(
            [sys.executable, "-c", _HOST_WORKER, address, str(index)],
            cwd=Path(__file__).resolve().parents[1],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(4)
    ]
    try:
        outputs = [process.communicate(timeout=240) for process in running]
    finally:
        for process in running:
            process.kill()
    for process, (_, err) in zip(running, outputs, strict=True):
        assert process.returncode == 0, err[-3000:]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    # Processes 0 and 1 form the first row of the mesh (data index 0), 2 and 3 the second.
    assert [r["rows"] for r in reports] == [[0, 1, 2, 3]] * 2 + [[4, 5, 6, 7]] * 2
    assert [r["shard"] for r in reports] == [[0, 2], [0, 2], [1, 2], [1, 2]]
    want = float((np.arange(8 * 3, dtype=np.float32) ** 2).sum())
    assert all(r["total"] == want and r["shape"] == [8, 3] for r in reports)
