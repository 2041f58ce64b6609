"""Evaluate a trained student, or write its predictions, from a MODEL_DIR.

Both read the run's own gin file (the one it was trained with, or
MODEL_DIR/config.gin), rebuild the same student and restore its best
checkpoint (or the latest, or a given step).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gin
import jax
import seqio
from etils import epath

from dsbs_jax import evaluation, trainer
from dsbs_jax.checkpoints import Checkpointer, model_dir_path
from dsbs_jax.data import choices
from dsbs_jax.data.cache import read_examples
from dsbs_jax.data.preprocessors import EXPLAIN_PREFIX, PREDICT_PREFIX
from dsbs_jax.training import SplitEvaluator, Student, abstract_like, format_results


def restore_student(
    model_dir: str,
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    model_config: Mapping[str, Any],
    checkpoint: str | int = "best",
) -> tuple[Student, Any, int]:
    """(student, params, step) from MODEL_DIR's "best" or "latest" checkpoint, or a step."""
    root = model_dir_path(model_dir)
    if not (root.is_dir() and any(root.glob("checkpoint_*"))):
        raise FileNotFoundError(
            f"MODEL_DIR {root} holds no checkpoint; train one there first with "
            "`python -m dsbs_jax.train` and the same gin files and flags"
        )
    student = Student(mixture_or_task_name, task_feature_lengths, model_config, 1, 0)
    with Checkpointer(root, keep_best=checkpoint == "best") as ckpt:
        if checkpoint == "best" and ckpt.best_step() is None:
            checkpoint = "latest"  # a run without validation metrics keeps no best
        step = None if isinstance(checkpoint, str) else int(checkpoint)
        state, _ = ckpt.restore(abstract_like(student.state), step=step, best=checkpoint == "best")
    return student, state.params, int(state.step)


@gin.configurable
def evaluate(
    *,
    model_dir: str = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    model_config: Mapping[str, Any] = gin.REQUIRED,
    split: str = "test",
    checkpoint: str | int = "best",
    batch_size: int = 64,
    max_decode_length: int | None = None,
) -> dict[str, float]:
    """Teacher-forced losses and decoded-label metrics of a checkpoint on `split`."""
    student, params, step = restore_student(
        model_dir, mixture_or_task_name, task_feature_lengths, model_config, checkpoint
    )
    with student.partitioner.activation_rules():
        eval_step = jax.jit(trainer.make_eval_step(student.model))
        results = SplitEvaluator(
            student,
            eval_step,
            mixture_or_task_name,
            task_feature_lengths,
            batch_size,
            max_decode_length,
        )(params, split)
    if jax.process_index() == 0:
        out = model_dir_path(model_dir) / f"eval_{split}_checkpoint_{step}.json"
        out.write_text(json.dumps({"step": step, **results}, indent=2) + "\n")
        print(format_results(f"{split} (checkpoint {step})", results))
    return results


def _label_dataset(mixture_or_task_name: str) -> str:
    """The dataset of the mixture's first label task (its candidate labels' rule)."""
    (task, *_) = evaluation.metric_tasks(mixture_or_task_name)
    return task.source.dataset


def _task_inputs(mixture_or_task_name: str, split: str) -> list[dict[str, Any]]:
    """The raw inputs of a split, read through the mixture's first label task, with the
    candidate labels their cache records list."""
    (task, *_) = evaluation.metric_tasks(mixture_or_task_name)
    cached = choices.cached_choices(task.source.dataset, split)
    ds = task.get_dataset(None, split=split, shuffle=False, num_epochs=1)
    return [
        {
            "id": ex["id"].decode(),
            "input": ex["inputs_pretokenized"].decode().removeprefix(PREDICT_PREFIX),
            "choices": cached.get(ex["id"].decode(), ()),
        }
        for ex in ds.as_numpy_iterator()
    ]


def _tokenized(
    vocabulary: seqio.Vocabulary, texts: Sequence[str], inputs_length: int
) -> list[list[int]]:
    return [(vocabulary.encode(t) + [vocabulary.eos_id])[:inputs_length] for t in texts]


@gin.configurable
def infer(
    *,
    model_dir: str = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    model_config: Mapping[str, Any] = gin.REQUIRED,
    input_file: str | None = None,
    split: str = "test",
    output_file: str | None = None,
    rationales: bool = False,
    checkpoint: str | int = "best",
    batch_size: int = 64,
    max_decode_length: int | None = None,
) -> epath.Path:
    """Writes {id, input, label[, rationale]} JSON lines for `input_file` (or `split`).

    Only the label is predicted unless `rationales`: at deployment the rationale
    costs nothing. The label is generated, or picked among the input's candidates when
    `label_evaluation.modes` starts with "score" (an input file's rows may list their
    own `choices`).
    """
    student, params, step = restore_student(
        model_dir, mixture_or_task_name, task_feature_lengths, model_config, checkpoint
    )
    if input_file:
        examples = read_examples(Path(input_file).expanduser())
        rows = [{"id": ex.id, "input": ex.input, "choices": ex.choices} for ex in examples]
    else:
        rows = _task_inputs(mixture_or_task_name, split)
    decode_length = max_decode_length or task_feature_lengths["targets"]
    labels = evaluation.label_evaluation()
    batch_size = labels.batch_size or batch_size
    prompts = {"label": PREDICT_PREFIX}
    if rationales:
        prompts["rationale"] = EXPLAIN_PREFIX
    with student.partitioner.activation_rules():
        for field, prefix in prompts.items():
            vocabulary, inputs_length = student.vocabulary, task_feature_lengths["inputs"]
            inputs = _tokenized(vocabulary, [prefix + r["input"] for r in rows], inputs_length)
            if field == "label" and labels.modes[0] == "score":
                outputs = evaluation.score_texts(
                    student.model,
                    params,
                    student.partitioner,
                    vocabulary,
                    inputs,
                    choices.candidates_of(
                        _label_dataset(mixture_or_task_name),
                        ((r["id"], r["input"], r["choices"]) for r in rows),
                    ),
                    inputs_length,
                    batch_size,
                    decode_length,
                    labels.length_normalized,
                )
            else:
                outputs = evaluation.decode_batches(
                    student.model,
                    params,
                    student.partitioner,
                    vocabulary,
                    inputs,
                    inputs_length,
                    batch_size,
                    decode_length,
                )
            for row, output in zip(rows, outputs, strict=True):
                row[field] = output
    for row in rows:
        del row["choices"]
    name = f"predictions_{split}_checkpoint_{step}.jsonl"
    out = model_dir_path(output_file) if output_file else model_dir_path(model_dir) / name
    if jax.process_index() == 0:
        with out.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {len(rows)} predictions (checkpoint {step}) to {out}")
    return out
