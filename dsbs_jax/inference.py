"""Evaluate a trained student, or write its predictions, from a MODEL_DIR.

Both read the run's own gin files (the ones it was trained with, or MODEL_DIR/config.gin),
rebuild the same student and restore the parameters alone of its best checkpoint (or the
latest, or a given step): no optimizer moments are read or allocated, so a parameters-only
checkpoint (`python -m dsbs_jax.convert --format ours`) works as well as a training run's.
Evaluation runs what validation and test run in training (`evaluation.SplitEvaluator`), with
the same loss settings, so the same checkpoint and split give the same figures.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gin
import jax
from etils import epath

from dsbs_jax import checkpoint_import, checkpoints, cpu_memory, evaluation, trainer
from dsbs_jax.checkpoints import model_dir_path
from dsbs_jax.data.cache import read_examples
from dsbs_jax.data.registration import task_vocabulary
from dsbs_jax.data.run_inputs import ensure_run_inputs
from dsbs_jax.errors import MissingFileError
from dsbs_jax.label_prediction import LabelEvaluation, LabelPredictor
from dsbs_jax.model_config import build_model_config
from dsbs_jax.partitioning import Partitioner
from dsbs_jax.roles import EXPLAIN_PREFIX, PREDICT_PREFIX
from dsbs_jax.state import Student
from dsbs_jax.training import format_results

PyTree = Any


def restore_student(
    model_dir: str,
    mixture_or_task_name: str,
    model_config: Mapping[str, Any],
    partitioner: Partitioner,
    checkpoint: str | int = "best",
    split: str | None = "test",
    check: bool = False,
) -> tuple[Student, PyTree | None, int]:
    """(student, parameters, step) of MODEL_DIR's "best" or "latest" checkpoint, or a step.

    Checks the checkpoint, the split's data and that the gin config's model matches it first;
    with `check` stops there and returns no parameters.
    """
    step, step_dir = checkpoints.checkpoint_dir(model_dir, checkpoint)
    ensure_run_inputs(mixture_or_task_name, split)
    config = build_model_config(model_config, task_vocabulary(mixture_or_task_name).vocab_size)
    student = Student(config, partitioner)
    if check:
        student.check_recorded(checkpoints.read_data(step_dir), str(step_dir))
        checkpoint_import.check_params(str(step_dir), config)
        print(
            f"check: ready to use {step_dir} (step {step}), mesh "
            f"{dict(partitioner.mesh.shape)}, {mixture_or_task_name} {split}"
        )
        return student, None, step
    return student, student.restore_params(step_dir), step


@gin.configurable
def evaluate(
    *,
    model_dir: str = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    model_config: Mapping[str, Any] = gin.REQUIRED,
    partitioner: Partitioner = gin.REQUIRED,
    label_evaluation: LabelEvaluation = gin.REQUIRED,
    split: str = "test",
    checkpoint: str | int = "best",
    batch_size: int | None = None,
    max_decode_length: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    check: bool = False,
) -> dict[str, float]:
    """Teacher-forced losses and label metrics of a checkpoint on `split`, as training's
    evaluation reports them (runs/base.gin gives both the same loss settings). `batch_size`
    None: 64, but teacher-forced losses 16 rows at a time on CPU (`dsbs_jax.cpu_memory`)."""
    student, params, step = restore_student(
        model_dir, mixture_or_task_name, model_config, partitioner, checkpoint, split, check
    )
    if check:
        return {}
    loss_rows, label_rows = cpu_memory.eval_batch_sizes(partitioner, batch_size)
    with partitioner.activation_rules():
        results = evaluation.SplitEvaluator(
            student.model,
            partitioner,
            trainer.jit_eval_step(student.model, label_smoothing, z_loss),
            mixture_or_task_name,
            task_feature_lengths,
            label_rows,
            max_decode_length,
            label_evaluation,
            loss_batch_size=loss_rows,
        )(params, split)
    if jax.process_index() == 0:
        out = model_dir_path(model_dir) / f"eval_{split}_checkpoint_{step}.json"
        out.write_text(json.dumps({"step": step, **results}, indent=2) + "\n")
        print(format_results(f"{split} (checkpoint {step})", results))
    return results


def _rows(
    mixture_or_task_name: str, split: str, lengths: Mapping[str, int], input_file: str | None
) -> tuple[list[dict[str, Any]], str]:
    """The inputs to label, {id, input, choices}: the input file's, or the split's read through
    the mixture's first label task; and that task's dataset (its candidates' rule)."""
    (task, *_) = evaluation.metric_tasks(mixture_or_task_name)
    if input_file:
        examples = read_examples(Path(input_file).expanduser())
        rows = [{"id": ex.id, "input": ex.input, "choices": ex.choices} for ex in examples]
    else:
        examples = evaluation.read_split(task, split, lengths["inputs"], lengths["targets"])
        rows = evaluation.label_rows(task, split, examples)
    return rows, task.source.dataset


@gin.configurable
def infer(
    *,
    model_dir: str = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    model_config: Mapping[str, Any] = gin.REQUIRED,
    partitioner: Partitioner = gin.REQUIRED,
    label_evaluation: LabelEvaluation = gin.REQUIRED,
    input_file: str | None = None,
    split: str = "test",
    output_file: str | None = None,
    rationales: bool = False,
    checkpoint: str | int = "best",
    batch_size: int = 64,
    max_decode_length: int | None = None,
    check: bool = False,
) -> epath.Path | None:
    """Writes {id, input, label[, rationale]} JSON lines for `input_file` (or `split`).

    Only the label is predicted unless `rationales`: at deployment the rationale
    costs nothing. The label is generated, or picked among the input's candidates when
    `label_evaluation.modes` starts with "score" (an input file's rows may list their
    own `choices`).
    """
    if input_file and not Path(input_file).expanduser().is_file():
        raise MissingFileError(f"infer.input_file {input_file} does not exist")
    student, params, step = restore_student(
        model_dir,
        mixture_or_task_name,
        model_config,
        partitioner,
        checkpoint,
        None if input_file else split,
        check,
    )
    if check:
        return None
    rows, dataset = _rows(mixture_or_task_name, split, task_feature_lengths, input_file)
    predictor = LabelPredictor(
        student.model,
        params,
        partitioner,
        task_vocabulary(mixture_or_task_name),
        task_feature_lengths["inputs"],
        max_decode_length or task_feature_lengths["targets"],
        label_evaluation.batch_size or batch_size,
        label_evaluation.length_normalized,
    )
    mode = label_evaluation.modes[0]
    with partitioner.activation_rules():
        inputs = predictor.tokenize([PREDICT_PREFIX + r["input"] for r in rows])
        candidates = evaluation.candidate_labels(dataset, rows) if mode == "score" else None
        for row, label in zip(rows, predictor(mode, inputs, candidates), strict=True):
            row["label"] = label
        if rationales:
            inputs = predictor.tokenize([EXPLAIN_PREFIX + r["input"] for r in rows])
            for row, rationale in zip(rows, predictor("generate", inputs), strict=True):
                row["rationale"] = rationale
    name = f"predictions_{split}_checkpoint_{step}.jsonl"
    out = model_dir_path(output_file) if output_file else model_dir_path(model_dir) / name
    if jax.process_index() == 0:
        with out.open("w", encoding="utf-8") as f:
            for row in rows:
                row.pop("choices")
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {len(rows)} predictions (checkpoint {step}) to {out}")
    return out
