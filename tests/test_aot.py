"""Ahead-of-time compilation for TPU slices on this CPU host (libtpu's compile-only devices)."""

from __future__ import annotations

import importlib.util
import json

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsbs_jax import aot
from dsbs_jax.gin_utils import parse_gin
from dsbs_jax.input_pipeline import batch_spec
from dsbs_jax.model_config import build_model_config
from dsbs_jax.state import Student

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e .[test])",
)
MIXTURE = "dsbs_synthetic_step_by_step"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("v4-8", ("v4", "v4:2x2x1")),
        ("v4-32", ("v4", "v4:2x2x4")),
        ("v5p-32", ("v5p", "v5p:2x2x4")),
        ("v5litepod-16", ("v5e", "v5e:4x4")),
        ("v5litepod-64", ("v5e", "v5e:8x8")),
        ("v6e-16", ("v6e", "v6e:4x4")),
        ("v5e:4x4", ("v5e", "v5e:4x4")),
    ],
)
def test_slice_names_map_to_topologies(name, expected):
    assert aot.parse_topology(name) == expected


@pytest.mark.parametrize("name", ["v4-33", "v3-8", "tpu"])
def test_unknown_slice_is_a_clear_error(name):
    with pytest.raises(ValueError, match="slice|topology"):
        aot.parse_topology(name)


def test_slices_have_one_device_per_chip_on_their_hosts():
    # v4-32 counts TensorCores: 16 megacore chips on 4 hosts; v5litepod-16 counts chips.
    for name, devices, hosts in [("v4-32", 16, 4), ("v5litepod-16", 16, 4), ("v5p-8", 4, 1)]:
        found = aot.topology_devices(*aot.parse_topology(name))
        assert len(found) == devices
        assert len({d.process_index for d in found}) == hosts


def test_out_of_hbm_is_a_result_with_the_figures():
    devices = aot.topology_devices("v5e", "v5e:2x2")
    mesh = jax.make_mesh((4,), ("data",), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))
    rows = NamedSharding(mesh, P("data"))
    big = jax.ShapeDtypeStruct((4 * 2048, 2**20), jnp.float32, sharding=rows)  # 8 GiB a chip
    double = jax.jit(lambda x: (x * 2, x + 1), out_shardings=rows)
    report = aot.compile_program("double", lambda: double.lower(big), 16 * aot.GiB, 1e12, None)
    assert not report.fits
    assert report.total_bytes == 24 * aot.GiB  # the argument and both outputs
    assert "GiB available" in report.error


def _bytes_per_chip(tree) -> int:
    return sum(
        int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
        for leaf in jax.tree.leaves(tree)
    )


def test_tiny_train_step_memory_and_flops_match_the_shapes(gin_cache_root, tmp_path):
    """XLA's per-chip arguments are the sharded train state plus the batch rows of a chip."""
    parse_gin(
        ["runs/base.gin", "models/tiny.gin"],
        [
            f"DATA_DIR = '{gin_cache_root}'",
            f"MIXTURE_OR_TASK_NAME = '{MIXTURE}'",
            "TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 32}",
            "BATCH_SIZE = 8",
            "Partitioner.num_partitions = 2",
            # Dimensions that fill whole TPU tiles, so no padding blurs the byte count.
            "t5_config.emb_dim = 128",
            "t5_config.mlp_dim = 256",
            "t5_config.vocab_size = 256",
            "t5_config.head_dim = 64",
            "t5_config.num_encoder_layers = 1",
            "t5_config.num_decoder_layers = 1",
        ],
        [],
    )
    out = tmp_path / "tiny.json"
    aot.compile_for_topology("v5e:2x2", str(out), ["train_step"])
    result = json.loads(out.read_text())
    assert (result["devices"], result["processes"], result["mesh"]) == (
        4,
        1,
        {"data": 2, "model": 2},
    )
    report = result["programs"]["train_step"]
    assert report["fits"] and report["hbm_bytes"] == 16 * aot.GiB

    settings = aot.train_settings(aot.topology_devices("v5e", "v5e:2x2"))
    # Left open, TPUs keep the whole batch in one step and evaluate 64 rows at a time.
    assert (settings["num_microbatches"], settings["eval_batch_size"]) == (1, 64)
    config = build_model_config(settings["model_config"], 128)
    student = Student(config, settings["partitioner"])
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=student.partitioner.data_sharding)
        for k, v in batch_spec({"inputs": 64, "targets": 32}, 8, True).items()
    }
    state_bytes = _bytes_per_chip(student.abstract_train_state(settings["optimizer"]))
    key_bytes = 8  # a threefry key: two uint32
    # Up to TPU tile padding of the smallest arrays (relative position biases of 2 heads).
    shapes_bytes = state_bytes + _bytes_per_chip(batch) + key_bytes
    assert shapes_bytes <= report["argument_bytes"] < 1.01 * shapes_bytes
    assert state_bytes <= report["alias_bytes"] < 1.01 * state_bytes  # donated: updated in place
    assert report["total_bytes"] < report["argument_bytes"] + report["output_bytes"] + 2**26

    expected = aot.model_flops(config, 8, 64, 32, train=True)
    assert expected == report["model_flops"]
    # XLA counts the elementwise work too (softmax, GELU, loss, AdamW): a little above.
    assert 1.0 <= report["xla_flops_per_chip"] * 4 / expected <= 1.2


def test_a_vectorized_sweeps_train_step_holds_its_runs_share_per_chip(gin_cache_root, tmp_path):
    """`--runs=4` on a v5e:2x2 mesh of 2 runs x 2 data: each chip holds two runs' whole state
    (stacked, split over "runs") and its rows of their batches, and XLA counts 4 runs' FLOPs."""
    parse_gin(
        ["runs/base.gin", "models/tiny.gin"],
        [
            f"DATA_DIR = '{gin_cache_root}'",
            f"MIXTURE_OR_TASK_NAME = '{MIXTURE}'",
            "TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 32}",
            "BATCH_SIZE = 8",
            "Partitioner.num_runs_partitions = 2",
            "t5_config.emb_dim = 128",
            "t5_config.mlp_dim = 256",
            "t5_config.vocab_size = 256",
            "t5_config.head_dim = 64",
            "t5_config.num_encoder_layers = 1",
            "t5_config.num_decoder_layers = 1",
        ],
        [],
    )
    out = tmp_path / "runs.json"
    aot.compile_for_topology("v5e:2x2", str(out), ["train_step"], runs=4)
    result = json.loads(out.read_text())
    assert (result["runs"], result["mesh"]) == (4, {"runs": 2, "data": 2, "model": 1})
    report = result["programs"]["train_step"]
    assert report["fits"]

    settings = aot.train_settings(aot.topology_devices("v5e", "v5e:2x2"))
    config = build_model_config(settings["model_config"], 128)
    student = Student(config, settings["partitioner"])
    state_bytes = 2 * _bytes_per_chip(student.abstract_train_state(settings["optimizer"]))
    batch_bytes = 2 * _bytes_per_chip(  # two runs' halves of their batches
        {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=student.partitioner.data_sharding)
            for k, v in batch_spec({"inputs": 64, "targets": 32}, 8, True).items()
        }
    )
    shapes_bytes = state_bytes + batch_bytes + 2 * 8  # and two threefry keys
    assert shapes_bytes <= report["argument_bytes"] < 1.01 * shapes_bytes
    assert state_bytes <= report["alias_bytes"] < 1.01 * state_bytes
    expected = 4 * aot.model_flops(config, 8, 64, 32, train=True)
    assert report["model_flops"] == expected
    assert 1.0 <= report["xla_flops_per_chip"] * 4 / expected <= 1.25
    with pytest.raises(ValueError, match="--runs=3 does not divide"):
        aot.compile_for_topology("v5e:2x2", None, ["train_step"], runs=3)


def test_command_line_refuses_an_unknown_slice_in_one_line(capsys):
    try:
        status = aot.main(["--gin_file=runs/demo.gin", "--topology=v9-8"])
    finally:
        gin.clear_config()
    assert status == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: unknown TPU topology 'v9-8'; give a slice (v4-32, v5p-32, v5litepod-16, v6e-16) "
        "or a topology (v5e:4x4, v4:2x2x4)"
    ]
