"""Scanned layers, rematerialisation and 2-D partitioning against the plain model, on 8 CPUs.

The reference is the unscanned, un-rematerialised model on one device with 1-D rules. Each
variant must give its loss and gradients to 1e-5 (float32), a scanned model must load the
reference's checkpoints (Hugging Face, t5x, ours) and give its logits, and cached decoding
with a scanned model must give the reference's tokens.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization, traverse_util
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file

from dsbs_jax import checkpoint_import, convert, decoding
from dsbs_jax.checkpoint_import import (
    CheckpointImportError,
    checkpoint_config,
    export_hf,
    load_params,
    param_shardings,
    stack_layers,
)
from dsbs_jax.model_config import build_model_config, t5_config
from dsbs_jax.models.t5 import T5, T5Config, get_config
from dsbs_jax.partitioning import Partitioner

# Every model-parallel dimension (vocab 64, heads 4, joined_kv 32, mlp 64, embed 32) divides by 4.
VOCAB, BATCH, ENC_LEN, DEC_LEN = 64, 8, 12, 10
TOLERANCE = 1e-5
CONFIG = get_config(
    "tiny", vocab_size=VOCAB, dtype=jnp.float32, dropout_rate=0.0, num_heads=4, head_dim=8
)
SCANNED = dataclasses.replace(CONFIG, scan_layers=True)


@pytest.fixture(scope="module")
def batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = {
        "encoder_input_tokens": rng.integers(1, VOCAB, (BATCH, ENC_LEN)),
        "decoder_input_tokens": rng.integers(1, VOCAB, (BATCH, DEC_LEN)),
        "decoder_target_tokens": rng.integers(1, VOCAB, (BATCH, DEC_LEN)),
    }
    tokens["encoder_input_tokens"][:, -3:] = 0  # some padding
    return {k: v.astype(np.int32) for k, v in tokens.items()}


@pytest.fixture(scope="module")
def params() -> dict:
    """The reference's unscanned parameters, on the first device."""
    tokens = jnp.ones((1, 4), jnp.int32)
    variables = jax.jit(lambda key: T5(CONFIG).init(key, tokens, tokens, enable_dropout=False))(
        jax.random.key(0)
    )
    return nn.unbox(variables)["params"]


def stacked(params: dict) -> dict:
    """`params` in the scanned layout."""
    flat = traverse_util.flatten_dict(params, sep="/")
    return traverse_util.unflatten_dict(
        stack_layers(flat, lambda layers: jnp.stack(layers, axis=1)), sep="/"
    )


def loss_fn(model: T5):
    def loss(params, batch):
        logits = model.apply(
            {"params": params},
            batch["encoder_input_tokens"],
            batch["decoder_input_tokens"],
            batch["decoder_target_tokens"],
            enable_dropout=False,
        )
        labels = batch["decoder_target_tokens"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return loss


def loss_and_grads(config: T5Config, partitioner: Partitioner, params: dict, batch: dict):
    """Loss and gradients under `partitioner`, jitted with its shardings as training does."""
    shardings = param_shardings(config, partitioner)
    with partitioner.activation_rules():
        step = jax.jit(
            jax.value_and_grad(loss_fn(T5(config))),
            in_shardings=(shardings, partitioner.data_sharding),
            out_shardings=(partitioner.replicated, shardings),
        )
        return step(jax.device_put(params, shardings), partitioner.shard_batch(batch))


@pytest.fixture(scope="module")
def reference(params, batch):
    one_device = Partitioner(devices=jax.devices()[:1])
    return loss_and_grads(CONFIG, one_device, params, batch)


def assert_close_trees(got: dict, want: dict) -> None:
    got, want = traverse_util.flatten_dict(got, sep="/"), traverse_util.flatten_dict(want, sep="/")
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_allclose(
            np.asarray(got[path]), np.asarray(want[path]), atol=TOLERANCE, rtol=0, err_msg=path
        )


# name: (T5Config overrides, Partitioner arguments). Combined so that each feature is covered
# with few compilations; t5x's rules for each pair of dims are checked in test_partitioning.py.
VARIANTS = {
    "2-D parameters, scanned, remat minimal": (
        dict(scan_layers=True, remat_policy="minimal"),
        dict(num_partitions=2, parameter_partitioning_dims=2),
    ),
    "2-D parameters and activations, unscanned, remat full": (
        dict(remat_policy="full"),
        dict(num_partitions=4, parameter_partitioning_dims=2, activation_partitioning_dims=2),
    ),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_same_loss_and_gradients_as_one_device_unscanned(params, batch, reference, variant):
    overrides, partitioning = VARIANTS[variant]
    config = dataclasses.replace(CONFIG, **overrides)
    partitioner = Partitioner(**partitioning)
    want_loss, want_grads = reference
    if config.scan_layers:
        params, want_grads = stacked(params), stacked(want_grads)
    loss, grads = loss_and_grads(config, partitioner, params, batch)
    np.testing.assert_allclose(float(loss), float(want_loss), atol=TOLERANCE, rtol=0)
    assert_close_trees(grads, want_grads)
    if partitioning.get("parameter_partitioning_dims") == 2:  # ZeRO-3: embed over "data"
        layers = "layers" if config.scan_layers else "layers_0"
        kernel = grads["encoder"][layers]["mlp"]["wi_0"]["kernel"]
        assert kernel.sharding.spec[0] == "data"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_remat_policies_save_less(dtype):
    """`minimal` keeps only dense-layer outputs, `full` nothing, for the backward pass.

    bfloat16 dense layers are a custom VJP (mixed_precision.matmul) that policies cannot see
    into; `minimal` still saves their outputs, which are half the float32 ones.
    """
    tokens = jnp.ones((2, ENC_LEN), jnp.int32)

    def saved_bytes(policy: str) -> int:
        config = dataclasses.replace(SCANNED, remat_policy=policy, dtype=jnp.dtype(dtype))
        model = T5(config)
        variables = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, tokens))
        params = nn.unbox(variables)["params"]

        def loss(p):
            return model.apply({"params": p}, tokens, tokens, enable_dropout=False).sum()

        # The VJP closure's leaves are what the backward pass keeps (shapes only: eval_shape).
        residuals = jax.eval_shape(lambda p: jax.vjp(loss, p)[1], params)
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(residuals))

    none, minimal, full = (saved_bytes(p) for p in ("none", "minimal", "full"))
    assert none > minimal > full


def test_gin_sets_scan_and_remat():
    with gin.unlock_config():
        gin.parse_config("t5_config.scan_layers = True\nt5_config.remat_policy = 'minimal'")
    try:
        config = build_model_config(t5_config(preset="tiny"), VOCAB)
    finally:
        gin.clear_config()
    assert (config.scan_layers, config.remat_policy) == (True, "minimal")
    with pytest.raises(ValueError, match="unknown remat_policy 'some'"):
        get_config("tiny", vocab_size=VOCAB, remat_policy="some")


def logits(config: T5Config, params: dict, batch: dict) -> np.ndarray:
    return np.asarray(
        jax.jit(T5(config).apply, static_argnames="enable_dropout")(
            {"params": params},
            batch["encoder_input_tokens"],
            batch["decoder_input_tokens"],
            enable_dropout=False,
        )
    )


def test_checkpoints_load_across_the_switch(params, batch, tmp_path):
    """HF and t5x (unscanned) load into a scanned model; ours either way; convert unscans."""
    partitioner = Partitioner(num_partitions=2, parameter_partitioning_dims=2)
    want_logits = logits(CONFIG, params, batch)

    def load(path, config):
        return load_params(str(path), config, param_shardings(config, partitioner))

    hf_dir = export_hf(params, CONFIG, str(tmp_path / "hf"))
    from_hf = load(hf_dir, SCANNED)
    assert_close_trees(from_hf, stacked(params))
    np.testing.assert_allclose(logits(SCANNED, from_hf, batch), want_logits, atol=TOLERANCE)

    t5x_dir = tmp_path / "t5x"  # t5x may keep every array in the msgpack itself
    t5x_dir.mkdir()
    target = jax.tree.map(np.asarray, params)
    contents = {"version": 3, "optimizer": {"target": target, "state": {"step": np.int32(1)}}}
    (t5x_dir / "checkpoint").write_bytes(serialization.msgpack_serialize(contents))
    assert_close_trees(load(t5x_dir, SCANNED), stacked(params))

    # Ours, scanned: written by convert from a scanned model, read back into both layouts.
    scanned_dir = convert.convert(str(hf_dir), str(tmp_path / "ours_scanned"), "ours", SCANNED)
    stored = checkpoint_import._orbax_shapes(scanned_dir)
    assert stored["encoder/layers/mlp/wo/kernel"] == (64, 2, 32)
    assert checkpoint_config(str(scanned_dir), dtype=jnp.float32, dropout_rate=0.0) == CONFIG
    assert_close_trees(load(scanned_dir, CONFIG), params)
    assert_close_trees(load(scanned_dir, SCANNED), stacked(params))

    # convert writes unscanned (the layout Hugging Face and t5x use) from a scanned checkpoint.
    plain_dir = convert.convert(str(scanned_dir), str(tmp_path / "ours"), "ours", CONFIG)
    assert "encoder/layers_1/mlp/wo/kernel" in checkpoint_import._orbax_shapes(plain_dir)
    from_ours = load(plain_dir, SCANNED)
    assert_close_trees(from_ours, stacked(params))

    # Hugging Face export of a scanned model is the unscanned one's, tensor for tensor.
    again = export_hf(from_ours, SCANNED, str(tmp_path / "hf_again"))
    want_tensors = load_file(hf_dir / "model.safetensors")
    got_tensors = load_file(again / "model.safetensors")
    assert got_tensors.keys() == want_tensors.keys()
    for name, tensor in want_tensors.items():
        np.testing.assert_array_equal(got_tensors[name], tensor, err_msg=name)


def test_resuming_across_the_switch_says_why_not(params, tmp_path):
    """A run's optimizer state does not restack; resuming says so in one line."""
    model_dir = tmp_path / "run"
    hf_dir = export_hf(params, CONFIG, str(tmp_path / "hf"))
    convert.convert(str(hf_dir), str(model_dir), "ours", CONFIG)
    checkpoint_import.check_resumable(str(model_dir), CONFIG)  # same layout: fine
    with pytest.raises(CheckpointImportError) as error:
        checkpoint_import.check_resumable(str(model_dir), SCANNED)
    message = str(error.value)
    assert "\n" not in message
    assert "unscanned layers" in message and "scan_layers=True" in message
    assert "initial_checkpoint_path" in message


def test_cached_decoding_of_a_scanned_model_gives_the_same_tokens(params, batch):
    partitioner = Partitioner(num_partitions=2)
    tokens = batch["encoder_input_tokens"]
    want = decoding.greedy_decode(T5(CONFIG), params, tokens, max_decode_length=DEC_LEN)
    config = dataclasses.replace(SCANNED, remat_policy="full")  # remat must not get in the way
    shardings = param_shardings(config, partitioner)
    with partitioner.activation_rules():
        got = decoding.greedy_decode(
            T5(config),
            jax.device_put(stacked(params), shardings),
            partitioner.shard_batch({"tokens": tokens})["tokens"],
            max_decode_length=DEC_LEN,
        )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert len(set(np.asarray(want).ravel().tolist())) > 2  # not a degenerate constant output


def test_scanned_parameters_carry_a_layers_axis():
    shardings = param_shardings(SCANNED, Partitioner(num_partitions=2))
    wo = shardings["decoder"]["layers"]["mlp"]["wo"]["kernel"]
    assert wo.spec == P("model", None, None)
    shapes = checkpoint_import.param_shapes(SCANNED)
    assert shapes["decoder/layers/mlp/wo/kernel"] == (64, 2, 32)
    assert shapes["decoder/layers/pre_mlp_layer_norm/scale"] == (32, 2)
    assert not any("layers_" in path for path in shapes)
