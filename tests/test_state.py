"""A run's state in memory: one training state after a resume, parameters alone for eval and
infer, and checkpoints refused in one line when the config does not match them."""

from __future__ import annotations

import gc
import re
from pathlib import Path

import jax
import pytest

from dsbs_jax import training
from dsbs_jax.checkpoints import Checkpointer
from dsbs_jax.errors import UserError
from dsbs_jax.inference import restore_student
from dsbs_jax.label_prediction import label_evaluation
from dsbs_jax.model_config import t5_config
from dsbs_jax.optimizers import make_optimizer
from dsbs_jax.partitioning import Partitioner
from dsbs_jax.state import tree_bytes

MIXTURE = "dsbs_synthetic_step_by_step"
LENGTHS = {"inputs": 64, "targets": 64}


def _model_config(mlp_dim: int = 64) -> dict:
    return t5_config(preset="tiny", vocab_size=128, dtype="float32", mlp_dim=mlp_dim)


def _plan(model_dir: Path, steps: int = 2, mlp_dim: int = 64) -> training.TrainingRun:
    return training.TrainingRun.plan(
        model_dir,
        _model_config(mlp_dim),
        Partitioner(devices=jax.devices()[:1]),
        make_optimizer(steps),
        label_evaluation(),
        training.InputSettings(MIXTURE, LENGTHS, batch_size=4),
        training.LoopSettings(steps, eval_period=1000, log_period=1),
        training.EvalSettings(test_split=None, batch_size=8, max_decode_length=4),
        None,
    )


def _live_bytes() -> int:
    gc.collect()
    return sum(a.nbytes for a in jax.live_arrays())


def test_one_training_state_parameters_alone_and_one_line_refusals(gin_cache_root, tmp_path):
    """A tiny run trained to step 2, then read three ways: resumed for training, restored for
    eval and infer, and restored with a config it does not match. One test, so the run trains
    once (a module fixture trains once per xdist worker that runs one of its tests)."""
    trained = tmp_path / "run"
    _plan(trained).execute(Checkpointer)
    _check_a_resumed_run_holds_one_training_state(trained)
    _check_eval_and_infer_restore_parameters_alone(trained)
    _check_a_config_that_does_not_match_the_checkpoint_is_one_line(trained)


def _check_a_resumed_run_holds_one_training_state(trained: Path) -> None:
    run = _plan(trained)
    assert run.resume_dir is not None and run.resume_dir.name == "checkpoint_2"
    with Checkpointer(trained) as checkpointer:
        before = _live_bytes()
        state, data = run.start_state(checkpointer)
        grown = _live_bytes() - before
    assert int(state.step) == 2 and data["step"] == 2
    # The parameters and both AdamW moments once, nothing random built first: the state's
    # bytes, give or take a scalar that restoring leaves cached (4 bytes here).
    state_bytes = tree_bytes(state)
    assert state_bytes == tree_bytes(run.abstract_state)
    assert state_bytes <= grown <= state_bytes + 16
    assert tree_bytes(state.opt_state) > 2 * tree_bytes(state.params) > 0


def _check_eval_and_infer_restore_parameters_alone(trained: Path) -> None:
    before = _live_bytes()
    student, params, step = restore_student(
        trained, MIXTURE, _model_config(), Partitioner(devices=jax.devices()[:1]), "latest"
    )
    assert step == 2
    assert _live_bytes() - before == tree_bytes(params) == tree_bytes(student.abstract_params)


def _check_a_config_that_does_not_match_the_checkpoint_is_one_line(trained: Path) -> None:
    partitioner = Partitioner(devices=jax.devices()[:1])
    with pytest.raises(UserError) as error:
        restore_student(trained, MIXTURE, _model_config(mlp_dim=96), partitioner, "latest")
    message = str(error.value)
    assert "\n" not in message
    assert re.search(r"checkpoint_2 holds a model with mlp_dim=64, but the gin config", message)
    assert "gives mlp_dim=96" in message
    with pytest.raises(UserError, match=f"MODEL_DIR {trained} holds a model with mlp_dim=64"):
        _plan(trained, mlp_dim=96)  # training refuses it before writing anything
