"""Tests for the partitioner on the 8 host CPU devices that conftest.py forces."""

from __future__ import annotations

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from dsbs_jax.models.t5 import T5, get_config
from dsbs_jax.partitioning import (
    STANDARD_LOGICAL_AXIS_RULES,
    Partitioner,
    initialize_distributed,
)

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
