"""What a t5x install needs from us, checked without t5x (it is not on PyPI).

tests/test_t5x_integration.py runs the real t5x where it is installed; these hold
everywhere: our tasks build under seqio.Evaluator with t5x's split names, and the
checkpoint layouts we write and read are t5x's orbax ones.
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import seqio
from flax import traverse_util

from dsbs_jax import checkpoint_import, convert, t5x_checkpoints, trainer
from dsbs_jax.checkpoints import Checkpointer
from dsbs_jax.data import registration
from dsbs_jax.data.feature_converters import StepByStepFeatureConverter
from dsbs_jax.models.t5 import T5, get_config
from dsbs_jax.partitioning import Partitioner
from dsbs_jax.roles import TaskRole
from tests.conftest import assert_same_arrays

VOCAB_SIZE = 40


def _dsbs_tasks() -> list[seqio.Task]:
    import dsbs_jax.tasks  # noqa: F401  (registers the tasks)

    return [seqio.TaskRegistry.get(n) for n in seqio.TaskRegistry.names() if n.startswith("dsbs_")]


def test_every_output_feature_has_a_rank_seqio_evaluator_measures():
    """seqio.Evaluator reads `shape[0]` of every output feature; a rank-0 one stops it."""
    tasks = _dsbs_tasks()
    assert tasks
    for task in tasks:
        assert set(task.output_features) == {"inputs", "targets"}, task.name
        assert all(f.rank >= 1 for f in task.output_features.values()), task.name
        assert tuple(task.splits) == ("train", "validation", "test"), task.name


def test_seqio_evaluator_builds_our_mixtures(gin_cache_root):
    """As t5x's infer_eval and t5x.eval build it: split 'validation', stock converter."""
    for method in ("step_by_step", "single_task"):
        evaluator = seqio.Evaluator(
            mixture_or_task_name=registration.mixture_name("synthetic", method),
            feature_converter=seqio.EncDecFeatureConverter(pack=False),
            eval_split="validation",
            logger_cls=(),
        )
        (task,) = evaluator.eval_tasks  # only label tasks have metrics
        assert len(evaluator.cached_task_datasets[task.name]) == 24  # valid.jsonl's inputs
        assert set(evaluator.model_feature_shapes) == {
            "encoder_input_tokens",
            "decoder_input_tokens",
            "decoder_target_tokens",
            "decoder_loss_weights",
        }


def test_rate_mixture_keeps_each_examples_task_role(gin_cache_root):
    """task_role is not an output feature, yet the loss still tells label from rationale."""
    name = registration.mixture_name("synthetic", "step_by_step_rates")
    ds = seqio.get_dataset(
        name, {"inputs": 64, "targets": 64}, StepByStepFeatureConverter(pack=False), shuffle=False
    )
    roles = {int(r) for ex in ds.take(64).as_numpy_iterator() for r in ex["decoder_task_ids"]}
    assert roles == {0, int(TaskRole.LABEL), int(TaskRole.RATIONALE)}


def _random_params(seed: int = 0) -> dict:
    config = get_config("tiny", vocab_size=VOCAB_SIZE, dtype=np.float32)
    tokens = np.ones((1, 4), np.int32)
    variables = T5(config).init(jax.random.key(seed), tokens, tokens, enable_dropout=False)
    return jax.tree.map(np.asarray, nn.unbox(variables["params"])), config


def _load(path, config) -> dict:
    shardings = checkpoint_import.param_shardings(config, Partitioner())
    return jax.tree.map(np.asarray, checkpoint_import.load_params(str(path), config, shardings))


def test_written_t5x_checkpoint_has_t5x_orbax_layout(tmp_path):
    params, _ = _random_params()
    step_dir = t5x_checkpoints.write_t5x_checkpoint(params, tmp_path, step=7)
    # Where t5x's OrbaxCheckpointManagerInterface looks for a step's state.
    expected = ocp.utils.get_save_directory(7, tmp_path, name="state", step_prefix="checkpoint")
    assert step_dir / "state" == expected
    tree = ocp.PyTreeCheckpointer().metadata(expected).item_metadata.tree
    assert set(tree) == {"target", "state"} and set(tree["state"]) == {"step"}
    want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    got = traverse_util.flatten_dict(tree["target"], sep="/")
    assert {k: tuple(v.shape) for k, v in got.items()} == want
    handlers = json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())["item_handlers"]
    assert handlers["state"].endswith("PyTreeCheckpointHandler")


def _write_as_t5x_trains(model_dir, step: int, params: dict) -> None:
    """The state dict t5x saves while training: parameters, step and optimizer state."""
    param_states = jax.tree.map(lambda p: {"v_row": np.zeros(p.shape[:1], np.float32)}, params)
    state = {"target": params, "state": {"step": np.int32(step), "param_states": param_states}}
    options = ocp.CheckpointManagerOptions(step_prefix="checkpoint")
    with ocp.CheckpointManager(model_dir, options=options, item_names=("state",)) as manager:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)))


def test_reads_t5x_orbax_checkpoints_at_any_step_and_latest(tmp_path):
    early, config = _random_params(seed=1)
    late, _ = _random_params(seed=2)
    _write_as_t5x_trains(tmp_path, 3, early)
    _write_as_t5x_trains(tmp_path, 12, late)
    assert_same_arrays(_load(tmp_path, config), late)  # a MODEL_DIR means its latest step
    assert_same_arrays(_load(tmp_path / "checkpoint_3", config), early)


def test_convert_to_t5x_and_back_keeps_every_parameter(tmp_path):
    params, config = _random_params()
    t5x_checkpoints.write_t5x_checkpoint(params, tmp_path / "t5x_in")
    assert (
        convert.main(
            ["--from", str(tmp_path / "t5x_in"), "--to", str(tmp_path / "t5x"), "--format", "t5x"]
        )
        == 0
    )
    assert (tmp_path / "t5x" / "checkpoint_0" / "state" / "_METADATA").is_file()
    assert_same_arrays(_load(tmp_path / "t5x", config), params)
    args = ["--from", str(tmp_path / "t5x"), "--to", str(tmp_path / "ours"), "--format", "ours"]
    assert convert.main(args) == 0
    assert_same_arrays(_load(tmp_path / "ours", config), params)


def _write_as_we_train(model_dir, step: int, params: dict) -> None:
    """A checkpoint of ours as `python -m dsbs_jax.train` saves it: the whole train state."""
    state = trainer.init_state(params, optax.adamw(1e-3)).replace(step=np.int32(step))
    with Checkpointer(model_dir) as checkpointer:
        checkpointer.save(step, state, data={"step": step}, force=True)


def _convert(source, out, fmt: str) -> list[str]:
    assert convert.main(["--from", str(source), "--to", str(out), "--format", fmt]) == 0
    return sorted(p.name for p in out.glob("checkpoint_*"))


def test_convert_keeps_the_source_step(tmp_path, capsys):
    """Our run at step 20 becomes t5x's checkpoint_20 holding step 20, and ours again at 20;
    convert prints the network t5x needs for it (tests/test_t5x_integration.py restores it)."""
    early, config = _random_params(seed=1)
    params, _ = _random_params(seed=2)
    _write_as_we_train(tmp_path / "run", 10, early)
    _write_as_we_train(tmp_path / "run", 20, params)
    assert _convert(tmp_path / "run", tmp_path / "t5x", "t5x") == ["checkpoint_20"]
    network = capsys.readouterr().out.split("\n", 2)[2]
    assert network == (
        "network.T5Config:\n  vocab_size = 40\n  emb_dim = 32\n  num_heads = 2\n  head_dim = 8\n"
        "  mlp_dim = 64\n  num_encoder_layers = 2\n  num_decoder_layers = 2\n"
        "  mlp_activations = ('gelu', 'linear')\n  logits_via_embedding = False\n"
        "  float32_attention_logits = True\n"
    )
    stored = ocp.PyTreeCheckpointer().restore(tmp_path / "t5x" / "checkpoint_20" / "state")
    assert stored["state"]["step"] == 20
    assert_same_arrays(stored["target"], params)
    assert _convert(tmp_path / "t5x", tmp_path / "ours", "ours") == ["checkpoint_20"]
    assert_same_arrays(_load(tmp_path / "ours", config), params)
    assert _convert(tmp_path / "run" / "checkpoint_10", tmp_path / "early", "t5x") == [
        "checkpoint_10"
    ]


def test_orbax_checkpoint_without_parameters_is_refused_by_name(tmp_path):
    ocp.PyTreeCheckpointer().save(tmp_path / "checkpoint_0" / "state", {"state": {"step": 0}})
    with pytest.raises(checkpoint_import.CheckpointImportError, match="'target' \\(t5x's\\)"):
        checkpoint_import.checkpoint_config(str(tmp_path))
