"""Vectorized sweeps: every run as it would be alone, in its own directory, resumed exactly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
import seqio

from dsbs_jax import checkpoints, evaluation, sweep, train, trainer, vectorized
from dsbs_jax.checkpoints import Checkpointer
from dsbs_jax.inference import restore_student
from dsbs_jax.input_pipeline import train_batches
from dsbs_jax.label_prediction import LabelPredictor
from dsbs_jax.model_config import build_model_config, t5_config
from dsbs_jax.partitioning import Partitioner
from dsbs_jax.state import Student
from tests.conftest import assert_same_arrays, checkpoint_state

MIXTURE = "dsbs_synthetic_step_by_step"
LENGTHS = {"inputs": 64, "targets": 64}
# Two methods x two ALPHAs: the loss weights, and the rate mixture's rates, that gin gives each.
RUNS = ("dsbs,ALPHA=0.3", "dsbs_rates,ALPHA=0.3", "dsbs,ALPHA=0.7", "dsbs_rates,ALPHA=0.7")
TIMINGS = {"step_time_s", "examples_per_second", "tokens_per_second", "rows_per_second"}


def _flags(data_dir: Path, sweep_dir: Path, methods: str = "dsbs,dsbs_rates") -> list[str]:
    return [
        "--gin_file=runs/base.gin",
        "--gin_file=models/tiny.gin",
        f"--gin.DATA_DIR='{data_dir}'",
        f"--gin.MODEL_DIR='{sweep_dir}'",
        f"--gin.MIXTURE_OR_TASK_NAME='{MIXTURE}'",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 64}",
        "--gin.TRAIN_STEPS=6",
        "--gin.EVAL_PERIOD=6",  # one validation pass a run
        "--gin.Checkpointer.period=3",
        "--gin.BATCH_SIZE=8",
        "--gin.LEARNING_RATE=3e-3",
        "--gin.DROPOUT_RATE=0.1",  # each run its own dropout masks
        "--gin.train.eval_batch_size=32",
        "--gin.train.max_decode_length=4",
        "--gin.train.log_period=1",
        f"--methods={methods}",
        "--sweep=ALPHA=[0.3,0.7]",
    ]


def _records(model_dir: Path, group: str) -> dict[int, dict]:
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if r["group"] == group}


def _predictions(model_dir: Path) -> list[str]:
    """The best checkpoint's test labels, restored alone as `eval` and `infer` restore it."""
    config = t5_config(preset="tiny", dtype="float32")
    student, params, _ = restore_student(model_dir, MIXTURE, config, Partitioner(), "best")
    task = seqio.get_mixture_or_task("dsbs_synthetic_label_llm")
    examples = evaluation.read_split(task, "test", 64, 4)
    vocabulary = task.output_features["targets"].vocabulary
    predictor = LabelPredictor(student.model, params, student.partitioner, vocabulary, 64, 4, 32)
    rows = evaluation.predict_labels("generate", predictor, task, "test", examples)
    return [row["prediction"] for row in rows]


def _config(model_dir: Path) -> str:
    """MODEL_DIR/config.gin less the MODEL_DIR binding."""
    return re.sub(r"MODEL_DIR = \\?\s*'[^']*'", "", (model_dir / "config.gin").read_text())


def _close(ours: dict, theirs: dict, keys) -> None:
    for key in keys:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-5, err_msg=key)


@pytest.mark.slow
def test_each_run_is_the_run_alone_and_a_killed_sweep_resumes_exactly(
    gin_cache_root, tmp_path, monkeypatch, capsys
):
    """A vectorized sweep of four runs, each against `python -m dsbs_jax.train` with its
    recorded flags (`_check_each_run_is_the_run_alone`); then a sweep of two of those runs
    killed while saving and rerun (`_check_killed_sweep_resumes_exactly`) ends with the first's
    bytes. One test, so the first sweep trains once and serves both."""
    swept = tmp_path / "swept"
    assert sweep.main([*_flags(gin_cache_root, swept), "--vectorized"]) == 0
    _check_each_run_is_the_run_alone(swept, tmp_path / "alone")
    _check_killed_sweep_resumes_exactly(
        swept, tmp_path / "killed", gin_cache_root, monkeypatch, capsys
    )


def _check_each_run_is_the_run_alone(swept: Path, alone_dir: Path) -> None:
    """Each run against `python -m dsbs_jax.train` with its recorded flags: the same losses at
    every step (the same batches: the same token counts), the same evaluations, best
    checkpoint and test results, and the same test predictions."""
    first_losses = set()
    for name in RUNS:
        model_dir = swept / name
        flags = json.loads((model_dir / "run.json").read_text())["flags"]
        alone = alone_dir / name
        flags = [f for f in flags if not f.startswith("--gin.MODEL_DIR")]
        assert train.main([*flags, f"--gin.MODEL_DIR='{alone}'"]) == 0

        ours, theirs = _records(model_dir, "train"), _records(alone, "train")
        assert sorted(ours) == sorted(theirs) == [1, 2, 3, 4, 5, 6]
        for step, record in ours.items():
            assert record["examples"] == theirs[step]["examples"]
            assert record["tokens"] == theirs[step]["tokens"]
            _close(record, theirs[step], set(record) - TIMINGS - {"step", "group"})
        first_losses.add(ours[1]["loss"])
        ours, theirs = _records(model_dir, "training_eval"), _records(alone, "training_eval")
        assert sorted(ours) == sorted(theirs) == [6]
        for step, record in ours.items():
            _close(record, theirs[step], set(record) - {"step", "group"})
        ours = json.loads((model_dir / "test_results.json").read_text())
        theirs = json.loads((alone / "test_results.json").read_text())
        assert ours.keys() == theirs.keys() and ours["step"] == theirs["step"]
        _close(ours, theirs, ours)
        assert _predictions(model_dir) == _predictions(alone)
        assert _config(model_dir) == _config(alone)
    assert len(first_losses) == 4  # four runs, four different data streams


def _check_killed_sweep_resumes_exactly(
    swept: Path, sweep_dir: Path, data_dir: Path, monkeypatch, capsys
) -> None:
    """The sweep of one method's two runs, killed while saving step 6 after the first run
    saved it and before the second did: the rerun finishes the first and trains the second
    again from step 3, and both end with the four-run sweep's bytes (a run's numbers do not
    depend on the runs stacked beside it)."""
    runs = (RUNS[0], RUNS[2])  # dsbs at both ALPHAs
    flags = [*_flags(data_dir, sweep_dir, methods="dsbs"), "--vectorized"]
    save = Checkpointer.save

    def killed_at_the_second_run(self, step, *args, **kwargs):
        if step == 6 and self.model_dir.name == runs[1]:
            raise KeyboardInterrupt
        return save(self, step, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Checkpointer, "save", killed_at_the_second_run)
        with pytest.raises(SystemExit) as stopped:
            sweep.main(flags)
    assert stopped.value.code == 130
    assert [max(checkpoints.step_dirs(sweep_dir / name)) for name in runs] == [6, 3]
    capsys.readouterr()

    assert sweep.main(flags) == 0
    err = capsys.readouterr().err
    assert f"resuming {runs[1]} at step 3" in err
    for name in runs:
        ours, theirs = sweep_dir / name, swept / name
        assert_same_arrays(checkpoint_state(ours, 6), checkpoint_state(theirs, 6))
        results = "test_results.json"
        assert (ours / results).read_text() == (theirs / results).read_text()


def test_the_stacked_step_gives_each_run_its_seed_batches_and_dropout(gin_cache_root):
    """Two seeds on a ("runs", "data") mesh of 2 x 4 devices: each run's fresh state is the
    one it has alone, and one stacked step gives each the loss and parameters of its own step
    (plain SGD: Adam's first step would blow up rounding in near-zero gradients)."""
    config = build_model_config(t5_config(preset="tiny", dtype="float32", dropout_rate=0.3), 128)
    optimizer, seeds = optax.sgd(0.1), (3, 5)
    student = Student(config, Partitioner(num_runs_partitions=2))
    alone = Student(config, Partitioner())
    assert dict(student.partitioner.mesh.shape) == {"runs": 2, "data": 4, "model": 1}
    abstract = student.abstract_train_state(optimizer)
    stacked = vectorized.stacked_abstract_state(abstract, len(seeds), student)
    state = vectorized.init_stacked_state(student, optimizer, seeds, None, stacked)
    singles = [alone.init_train_state(optimizer, seed) for seed in seeds]
    for i, single in enumerate(singles):
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(single), strict=True):
            np.testing.assert_array_equal(a[i], b)

    weights = {1: 0.5, 2: 0.5}
    batches = [
        next(train_batches(MIXTURE, LENGTHS, 8, seqio.ShardInfo(0, 1), s, loss_weights=weights))
        for s in seeds
    ]
    keys = [trainer.dropout_key(seed) for seed in seeds]
    partitioner = student.partitioner
    with partitioner.activation_rules():
        step = trainer.jit_stacked_train_step(student.model, optimizer, partitioner, stacked)
        both = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
        key_array = jax.device_put(
            jax.numpy.stack(keys), partitioner.stacked(partitioner.replicated)
        )
        state, metrics = step(state, partitioner.shard_stacked_batch(both), key_array)
    take = vectorized.run_slicer(alone.abstract_train_state(optimizer))
    with alone.partitioner.activation_rules():
        single_step = trainer.jit_train_step(
            alone.model, optimizer, alone.partitioner, alone.abstract_train_state(optimizer)
        )
        for i in range(len(seeds)):
            expected, loss = single_step(
                singles[i], alone.partitioner.shard_batch(batches[i]), keys[i]
            )
            np.testing.assert_allclose(metrics["loss"][i], loss["loss"], rtol=1e-5)
            ours = jax.tree.leaves(take(state, i))
            for a, b in zip(ours, jax.tree.leaves(expected), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert metrics["loss"][0] != metrics["loss"][1]
