"""Tests for the on-paper memory estimate (dsbs_jax/memory.py, benchmarks/memory_per_chip.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from dsbs_jax import memory, optimizers, trainer
from dsbs_jax.models.t5 import T5, get_config
from dsbs_jax.partitioning import Partitioner

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_per_chip.py"
# Every model-parallel dimension (vocab, heads, joined_kv, mlp) divides by 4.
TINY = dict(vocab_size=64, num_heads=4, head_dim=8, mlp_dim=64, dtype=jnp.float32)
# Published T5 1.1 sizes with the 32128-piece vocabulary (xxl: 44.5 GB of float32 weights).
T5_1_1_SIZES = {"small": 77e6, "base": 248e6, "large": 783e6, "xl": 2.85e9, "xxl": 11.14e9}


@pytest.mark.parametrize("name", sorted(T5_1_1_SIZES))
def test_param_count_matches_published_t5_1_1(name: str) -> None:
    count = memory.state_layout(get_config(name)).param_count
    assert count == pytest.approx(T5_1_1_SIZES[name], rel=0.01)


def test_shard_shape_rounds_uneven_dimensions_up() -> None:
    mesh = {"data": 4, "model": 3}
    spec = jax.sharding.PartitionSpec(None, "model")
    assert memory.shard_shape((10, 32), spec, mesh) == (10, 11)
    assert memory.shard_shape((8, 6), jax.sharding.PartitionSpec("data"), mesh) == (2, 6)


def test_model_sharded_params_halve_when_partitions_double() -> None:
    layout = memory.state_layout(get_config("tiny", **TINY))
    sharded = tuple(item for item in layout.params if "model" in tuple(item[1]))
    replicated = tuple(item for item in layout.params if "model" not in tuple(item[1]))
    assert sharded and replicated
    two, four = memory.mesh_shape(8, 2), memory.mesh_shape(8, 4)
    assert memory.bytes_per_chip(sharded, two) == 2 * memory.bytes_per_chip(sharded, four)
    assert memory.bytes_per_chip(replicated, two) == memory.bytes_per_chip(replicated, four)


def _bytes_on_first_device(tree) -> int:
    device = jax.devices()[0]
    return sum(
        shard.data.nbytes
        for leaf in jax.tree.leaves(tree)
        for shard in leaf.addressable_shards
        if shard.device == device
    )


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_layout_matches_the_state_training_creates(optimizer: str) -> None:
    """Real shardings on the 8 CPU devices: the state as `training.Student` creates it."""
    config = get_config("tiny", **TINY)
    partitioner = Partitioner(num_partitions=2)
    tokens = jnp.ones((1, 4), jnp.int32)
    params, _ = partitioner.init_sharded(
        lambda rng: T5(config).init(rng, tokens, tokens, enable_dropout=False)["params"],
        jax.random.key(0),
    )
    tx = optimizers.make_optimizer(1, name=optimizer)

    def init_state(params):
        return trainer.init_state(params, tx)

    shardings = partitioner.state_shardings(jax.eval_shape(init_state, params), params)
    with partitioner.activation_rules():
        state = jax.jit(init_state, out_shardings=shardings)(params)
    layout = memory.state_layout(config, optimizer)
    mesh = dict(partitioner.mesh.shape)
    assert memory.bytes_per_chip(layout.params, mesh) == _bytes_on_first_device(state.params)
    assert memory.bytes_per_chip(layout.optimizer_state, mesh) == _bytes_on_first_device(
        state.opt_state
    )


def test_sharded_adam_moments_take_the_param_layout() -> None:
    config = get_config("tiny", **TINY)
    layout = memory.state_layout(config, "adamw")
    mesh = memory.mesh_shape(8, 4)
    moments = memory.bytes_per_chip(layout.optimizer_state, mesh)
    assert moments == pytest.approx(2 * memory.bytes_per_chip(layout.params, mesh), abs=64)


def test_plan_picks_the_fewest_partitions_that_fit() -> None:
    config = get_config("base")
    layout = memory.state_layout(config)
    found = memory.plan(config, layout, memory.SLICES["v4-32"], 64, (1024, 256))
    assert found["fits"]["v4"] and found["num_partitions"] == 1
    assert found["mesh"] == {"data": 16, "model": 1}


def _script():
    spec = importlib.util.spec_from_file_location("memory_per_chip", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.json"
    argv = ["--model", "small", "--num_partitions", "2", "--slice", "v4-32"]
    assert _script().main([*argv, "--optimizer", "adafactor", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["mesh"] == {"data": 8, "model": 2}
    assert record["rows_per_chip"] == 8 and record["rows_per_host"] == 16
    assert set(record["bytes_per_chip"]) == {
        "params",
        "optimizer_state",
        "gradients",
        "activations",
        "total",
    }
    assert set(record["fits"]) == {"v4", "v5e", "v5p"}
    printed = capsys.readouterr().out
    assert "activations:" in printed and "(rough estimate)" in printed


def test_script_table_and_bad_batch(capsys: pytest.CaptureFixture[str]) -> None:
    script = _script()
    assert script.main(["--table", "--models", "small", "--slices", "v4-8,v5litepod-16"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 4 and rows[2].startswith("| small | v4-8 | 4 / 1 |")
    assert script.main(["--model", "small", "--chips", "16", "--batch_size", "8"]) == 2
