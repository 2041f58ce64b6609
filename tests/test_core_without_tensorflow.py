"""The numerical core runs on a host with JAX and without TensorFlow or SeqIO (an accelerator
host, say): models, loss, train and eval steps, partitioning, optimizers, decoding, scoring,
checkpoints and their conversion."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

# Runs in a fresh interpreter in which TensorFlow and SeqIO look uninstalled: importing them
# raises ImportError and importlib finds no spec for them.
SCRIPT = textwrap.dedent(
    """
    import sys

    BLOCKED = ("tensorflow", "tensorflow_text", "tensorflow_datasets", "seqio")
    for name in BLOCKED:
        sys.modules[name] = None

    import jax
    import jax.numpy as jnp
    import numpy as np

    from dsbs_jax import (
        checkpoint_import, checkpoints, convert, decoding, label_prediction, losses,
        model_config, optimizers, partitioning, preemption, scoring, state, t5x_checkpoints,
        trainer,
    )
    from dsbs_jax.models import t5

    config = model_config.build_model_config(
        model_config.t5_config(preset="tiny", dtype="float32", dropout_rate=0.0), 100
    )
    student = state.Student(config, partitioning.Partitioner(devices=jax.devices()[:1]))
    optimizer = optimizers.make_optimizer(10)
    train_state = student.init_train_state(optimizer, seed=0)
    rng = np.random.default_rng(0)
    targets = rng.integers(2, 100, (4, 8)).astype(np.int32)
    batch = {
        "encoder_input_tokens": rng.integers(2, 100, (4, 12)).astype(np.int32),
        "decoder_input_tokens": np.asarray(decoding.shift_right(targets)),
        "decoder_target_tokens": targets,
        "decoder_loss_weights": np.full((4, 8), 0.5, np.float32),
        "decoder_task_ids": np.repeat([[1], [2], [1], [2]], 8, axis=1).astype(np.int32),
    }
    partitioner = student.partitioner
    with partitioner.activation_rules():
        step = trainer.jit_train_step(
            student.model, optimizer, partitioner, student.abstract_train_state(optimizer)
        )
        losses_seen = []
        sharded = partitioner.shard_batch(batch)
        for _ in range(3):
            train_state, metrics = step(train_state, sharded, jax.random.key(0))
            losses_seen.append(float(metrics["loss"]))
        sums = trainer.jit_eval_step(student.model)(train_state.params, sharded)
        evaluated = float(losses.summarise_loss_sums(sums)["loss"])
        decoded = decoding.greedy_decode(
            student.model, train_state.params, batch["encoder_input_tokens"], 4, eos_id=1
        )
    assert losses_seen[-1] < losses_seen[0], losses_seen
    assert np.isfinite(evaluated) and decoded.shape == (4, 4)

    model_dir = sys.argv[1]
    with checkpoints.Checkpointer(model_dir) as checkpointer:
        checkpointer.save(3, train_state, student.record(), force=True)
    _, step_dir = checkpoints.checkpoint_dir(model_dir, "latest")
    params = student.restore_params(step_dir)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(train_state.params)):
        np.testing.assert_array_equal(a, b)
    assert convert.main(["--from", model_dir, "--to", model_dir + "_hf", "--format", "hf"]) == 0

    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED and sys.modules[m])
    assert not loaded, loaded
    print("core ran without TensorFlow:", losses_seen, evaluated)
    """
)


def test_train_and_eval_steps_run_without_tensorflow_or_seqio(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parents[1],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "core ran without TensorFlow" in result.stdout
    assert (tmp_path / "run_hf" / "model.safetensors").is_file()
