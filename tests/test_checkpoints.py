"""Checkpointer: round trips with sharded arrays, period, retention, resume, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsbs_jax.checkpoints import Checkpointer, IncompatibleCheckpointError


@pytest.fixture(scope="module")
def mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def make_state(mesh: jax.sharding.Mesh, step: int, width: int = 4) -> dict:
    """A train-state-like pytree; the kernel is sharded over the 4-device mesh."""
    kernel = jax.device_put(
        jnp.arange(8 * width, dtype=jnp.float32).reshape(8, width) + step,
        NamedSharding(mesh, P("data", None)),
    )
    bias = jnp.full((width,), float(step), dtype=jnp.bfloat16)
    return {
        "params": {"dense": {"kernel": kernel, "bias": bias}},
        "opt_state": (jnp.array(step, dtype=jnp.int32), {"mu": kernel * 0.5}),
        "step": jnp.array(step),
    }


def abstract(state: dict) -> dict:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def assert_same(restored: dict, expected: dict) -> None:
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True):
        assert got.dtype == want.dtype
        assert got.sharding.is_equivalent_to(want.sharding, want.ndim)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


BEST = "valid/accuracy"


def steps_on_disk(model_dir: Path) -> tuple[list[str], list[str]]:
    best = model_dir / "best"
    return (
        sorted(p.name for p in model_dir.iterdir() if p.name.startswith("checkpoint")),
        sorted(p.name for p in best.iterdir() if p.name.startswith("checkpoint"))
        if best.is_dir()
        else [],
    )


def test_round_trip_keeps_values_and_shardings(tmp_path: Path, mesh) -> None:
    state = make_state(mesh, step=5)
    with Checkpointer(tmp_path, period=1) as ckpt:
        assert ckpt.save(5, state, {"step": 120, "seed": 0})
        restored, data = ckpt.restore(abstract(state))
    assert data == {"step": 120, "seed": 0}
    assert_same(restored, state)
    kernel = restored["params"]["dense"]["kernel"]
    assert kernel.sharding.spec == P("data", None)
    assert len(kernel.sharding.device_set) == 4


def test_restore_into_other_sharding(tmp_path: Path, mesh) -> None:
    state = make_state(mesh, step=1)
    target = abstract(state)
    other = NamedSharding(jax.make_mesh((2,), ("data",)), P(None, "data"))
    target["params"]["dense"]["kernel"] = jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=other)
    with Checkpointer(tmp_path, period=1) as ckpt:
        ckpt.save(1, state, {})
        restored, _ = ckpt.restore(target)
    assert restored["params"]["dense"]["kernel"].sharding == other
    np.testing.assert_array_equal(
        restored["params"]["dense"]["kernel"], state["params"]["dense"]["kernel"]
    )


def test_optax_state_is_compatible(tmp_path: Path, mesh) -> None:
    """Namedtuples, EmptyState and tuples (stored by orbax as dicts/lists) still match."""
    params = make_state(mesh, 3)["params"]
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.array(3)}
    with Checkpointer(tmp_path, period=1) as ckpt:
        ckpt.save(3, state, {})
        restored, _ = ckpt.restore(abstract(state))
    assert_same(restored, state)


def test_period_and_force(tmp_path: Path, mesh) -> None:
    state = make_state(mesh, step=0)
    with Checkpointer(tmp_path, period=2) as ckpt:
        assert not ckpt.save(3, state, {})
        assert ckpt.latest_step() is None
        assert ckpt.save(4, state, {})
        assert ckpt.save(5, state, {}, force=True)
        assert not ckpt.save(5, state, {}, force=True)  # already saved: not rewritten
        assert ckpt.latest_step() == 5
    assert steps_on_disk(tmp_path)[0] == ["checkpoint_4", "checkpoint_5"]


def test_keeps_recent_plus_best_and_resumes(tmp_path: Path, mesh) -> None:
    accuracy = {2: 0.1, 4: 0.9, 6: 0.5, 8: 0.3}
    with Checkpointer(tmp_path, BEST, period=2, keep=2) as ckpt:
        for step, acc in accuracy.items():
            assert ckpt.save(step, make_state(mesh, step), {"step": step})
            assert ckpt.save_best(step, make_state(mesh, step), {"step": step}, {BEST: acc}) == (
                step <= 4
            )
        assert ckpt.best_step() == 4
    assert steps_on_disk(tmp_path) == (["checkpoint_6", "checkpoint_8"], ["checkpoint_4"])

    with Checkpointer(tmp_path, BEST, period=2, keep=2) as resumed:
        assert resumed.latest_step() == 8
        assert resumed.best_step() == 4
        target = abstract(make_state(mesh, 0))
        state, data = resumed.restore(target, best=True)
        assert_same(state, make_state(mesh, 4))
        assert data == {"step": 4}
        state, data = resumed.restore(target)
        assert_same(state, make_state(mesh, 8))
        assert data == {"step": 8}
        # The best so far is read back from disk: a worse metric does not replace it.
        assert resumed.save(10, make_state(mesh, 10), {})
        assert not resumed.save_best(10, make_state(mesh, 10), {}, {BEST: 0.8})
        assert resumed.best_step() == 4
    assert steps_on_disk(tmp_path) == (["checkpoint_10", "checkpoint_8"], ["checkpoint_4"])


def test_best_mode_min_and_off_period_best(tmp_path: Path, mesh) -> None:
    with Checkpointer(tmp_path, best_metric="valid/loss", period=100, best_mode="min") as ckpt:
        for step, loss in ((3, 2.0), (7, 1.0), (9, 1.5)):
            assert not ckpt.save(step, make_state(mesh, step), {})
            improved = ckpt.save_best(step, make_state(mesh, step), {}, {"valid/loss": loss})
            assert improved == (step != 9)
        assert ckpt.best_step() == 7
        assert ckpt.latest_step() is None  # no step was a multiple of the period
    assert steps_on_disk(tmp_path) == ([], ["checkpoint_7"])


def test_incompatible_shapes_name_the_parameter(tmp_path: Path, mesh) -> None:
    with Checkpointer(tmp_path, period=1) as ckpt:
        ckpt.save(100, make_state(mesh, 100, width=4), {})
        wider = abstract(make_state(mesh, 0, width=8))
        with pytest.raises(IncompatibleCheckpointError) as err:
            ckpt.restore(wider)
    message = str(err.value)
    assert f"MODEL_DIR {tmp_path} holds an incompatible checkpoint (step 100)" in message
    assert (
        "params/dense/kernel has shape (8, 4) in the checkpoint but (8, 8) in the model" in message
    )
    assert message.endswith("use another MODEL_DIR")
    assert isinstance(err.value, ValueError)


def test_missing_and_unexpected_keys(tmp_path: Path, mesh) -> None:
    state = make_state(mesh, 1)
    with Checkpointer(tmp_path, period=1) as ckpt:
        ckpt.save(1, state, {})
        target = abstract(state)
        target["params"]["decoder"] = {"kernel": jax.ShapeDtypeStruct((2, 2), jnp.float32)}
        del target["params"]["dense"]["bias"]
        with pytest.raises(IncompatibleCheckpointError) as err:
            ckpt.restore(target)
    message = str(err.value)
    assert "params/decoder/kernel is missing from the checkpoint" in message
    assert "params/dense/bias is in the checkpoint but not in the model" in message


def test_interrupted_save_is_ignored(tmp_path: Path, mesh) -> None:
    with Checkpointer(tmp_path, BEST, period=2, keep=2) as ckpt:
        ckpt.save(8, make_state(mesh, 8), {"step": 8})
        ckpt.save_best(8, make_state(mesh, 8), {"step": 8}, {BEST: 0.5})
    # A save killed before orbax's final rename leaves its temporary directory
    # behind; even a complete-looking one must not count as a checkpoint.
    for parent in (tmp_path, tmp_path / "best"):
        shutil.copytree(parent / "checkpoint_8", parent / "checkpoint_10.orbax-checkpoint-tmp")

    with Checkpointer(tmp_path, BEST, period=2, keep=2) as resumed:
        assert resumed.latest_step() == 8
        assert resumed.best_step() == 8
        state, data = resumed.restore(abstract(make_state(mesh, 0)))
        assert_same(state, make_state(mesh, 8))
        assert data == {"step": 8}
        # Redoing the interrupted step works, and the leftovers are gone.
        assert resumed.save(10, make_state(mesh, 10), {"step": 10})
        assert resumed.save_best(10, make_state(mesh, 10), {"step": 10}, {BEST: 0.7})
        assert resumed.latest_step() == 10
        assert resumed.best_step() == 10
    assert steps_on_disk(tmp_path) == (["checkpoint_10", "checkpoint_8"], ["checkpoint_10"])


def test_async_save(tmp_path: Path, mesh) -> None:
    state = make_state(mesh, 2)
    with Checkpointer(tmp_path, BEST, period=2, async_save=True) as ckpt:
        assert ckpt.save(2, state, {"step": 2})
        assert ckpt.save_best(2, state, {"step": 2}, {BEST: 0.5})
        ckpt.wait_until_finished()
        restored, data = ckpt.restore(abstract(state), best=True)
    assert_same(restored, state)
    assert data == {"step": 2}
    assert steps_on_disk(tmp_path) == (["checkpoint_2"], ["checkpoint_2"])


def test_empty_model_dir(tmp_path: Path, mesh) -> None:
    with Checkpointer(tmp_path / "fresh", BEST) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.best_step() is None
        with pytest.raises(FileNotFoundError, match="has no checkpoint"):
            ckpt.restore(abstract(make_state(mesh, 0)))


def test_relative_model_dir(tmp_path: Path, mesh, monkeypatch) -> None:
    """MODEL_DIR = "runs/demo" as the demo config writes it: relative to the working dir."""
    monkeypatch.chdir(tmp_path)
    state = make_state(mesh, step=2)
    with Checkpointer("runs/demo", BEST, period=1) as ckpt:
        assert ckpt.save(2, state, {"step": 2})
        assert ckpt.save_best(2, state, {"step": 2}, {BEST: 1.0})
    with Checkpointer("runs/demo", BEST, period=1) as ckpt:
        assert (ckpt.latest_step(), ckpt.best_step()) == (2, 2)
        assert_same(ckpt.restore(abstract(state))[0], state)
    assert (tmp_path / "runs" / "demo" / "checkpoint_2").is_dir()


def test_extra_item_is_saved_with_the_checkpoint_and_optional_on_restore(tmp_path: Path, mesh):
    """An item beyond (state, data), e.g. the input pipeline's position, registered by its
    handler: written only when given, read back by restore_item; older checkpoints lack it."""
    extra = {"notes": ocp.handlers.JsonCheckpointHandler()}
    state = make_state(mesh, step=3)
    with Checkpointer(tmp_path, period=1, extra_handlers=extra) as ckpt:
        assert ckpt.save(3, state, {"step": 3})
        assert ckpt.save(5, state, {"step": 5}, extra={"notes": ocp.args.JsonSave({"at": 5})})
    with Checkpointer(tmp_path, period=1, extra_handlers=extra) as ckpt:
        assert ckpt.restore_item("notes", ocp.args.JsonRestore()) == {"at": 5}
        assert ckpt.restore_item("notes", ocp.args.JsonRestore(), step=3) is None
        restored, data = ckpt.restore(abstract(state), step=3)
        with pytest.raises(FileNotFoundError, match="has no checkpoint at step 4"):
            ckpt.restore_item("notes", ocp.args.JsonRestore(), step=4)
    assert_same(restored, state)
    assert data == {"step": 3}
    with Checkpointer(tmp_path, period=1) as ckpt:  # opened without the handler: as before
        assert_same(ckpt.restore(abstract(state))[0], state)
    with pytest.raises(ValueError, match="extra items may not be named 'state' or 'data'"):
        Checkpointer(tmp_path, extra_handlers={"data": ocp.handlers.JsonCheckpointHandler()})
