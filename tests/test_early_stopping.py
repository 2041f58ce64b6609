"""Early stopping (t5x's EarlyStoppingAction rule) and a run evaluated in both label modes."""

from __future__ import annotations

import json

import pytest

from dsbs_jax.early_stopping import EarlyStopping, early_stopping
from dsbs_jax.infer import main as infer_main
from dsbs_jax.train import main


@pytest.mark.parametrize(
    "history,stop",
    [
        ([0.5, 0.6, 0.7], False),
        ([0.5, 0.7, 0.7, 0.6], True),  # the last three never improve on the one before
        ([0.5, 0.7, 0.6, 0.65], False),  # 0.65 improves on 0.6, as t5x compares neighbours
        ([0.7, 0.6], False),  # fewer values than the patience
    ],
)
def test_stops_when_the_last_patience_values_never_improve(history, stop):
    assert EarlyStopping("m", patience=3).should_stop(history) is stop


def test_tolerances_and_min_mode():
    assert EarlyStopping("m", 2, atol=0.1).should_stop([0.5, 0.55])
    assert not EarlyStopping("m", 2, rtol=0.05).should_stop([1.0, 1.06])
    assert EarlyStopping("loss", 2, mode="min").should_stop([1.0, 1.2])
    assert early_stopping() is None
    with pytest.raises(ValueError, match="patience >= 1"):
        early_stopping(patience=0)
    assert early_stopping(patience=2).watching("valid/x").metric == "valid/x"
    assert early_stopping(patience=2, metric="valid/y").watching("valid/x").metric == "valid/y"


@pytest.mark.slow
def test_run_stops_early_and_reports_both_label_modes(
    gin_cache_root, choices_cache_root, tmp_path, capsys
):
    """A learning rate of 0 keeps the validation accuracy flat: with eval every 2 steps and a
    patience of 2, training stops at step 4 of 40, and tests the best (first) checkpoint in
    generate and score modes."""
    model_dir = tmp_path / "run"
    flags = [
        "--gin_file=runs/base.gin",
        "--gin_file=models/tiny.gin",
        f"--gin.DATA_DIR='{choices_cache_root}'",
        f"--gin.MODEL_DIR='{model_dir}'",
        "--gin.MIXTURE_OR_TASK_NAME='dsbs_synthetic_step_by_step'",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 64}",
        "--gin.BATCH_SIZE=8",
        "--gin.TRAIN_STEPS=40",
        "--gin.EVAL_PERIOD=2",
        "--gin.LEARNING_RATE=0.0",
        "--gin.train.eval_batch_size=32",
        "--gin.train.max_decode_length=4",
        "--gin.early_stopping.patience=2",
        "--gin.label_evaluation.modes=['generate', 'score']",
    ]
    assert main(flags) == 0
    err = capsys.readouterr().out
    assert "stopping early at step 4" in err
    results = json.loads((model_dir / "test_results.json").read_text())
    assert results["step"] == 2
    task = "test/dsbs_synthetic_label_llm"
    assert {f"{task}/accuracy", f"{task}/score/accuracy"} <= set(results)
    # Scoring picks one of five candidates, the gold one among them: some are right.
    assert results[f"{task}/score/accuracy"] > 0.0
    assert main(flags) == 0  # resumed, it stays stopped
    assert "stopped early at step 4" in capsys.readouterr().err

    inputs, out = tmp_path / "inputs.jsonl", tmp_path / "predictions.jsonl"
    inputs.write_text(
        '{"id": "q1", "input": "Sam has 2 pens. He buys 3 more pens.", "choices": ["5", "6"]}\n'
    )
    infer_flags = [
        *flags[:-1],
        "--gin.label_evaluation.modes=['score']",
        f"--gin.infer.input_file='{inputs}'",
        f"--gin.infer.output_file='{out}'",
    ]
    assert infer_main(infer_flags) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["id"] == "q1" and row["label"] in ("5", "6") and set(row) == {"id", "input", "label"}
