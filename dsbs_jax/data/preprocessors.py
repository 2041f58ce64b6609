"""SeqIO preprocessors that turn teacher-cache examples into the method's tasks.

Every task example carries a `task_role` (label or rationale): the feature
converter turns it into per-token loss weights and task ids, so the loss can
weight and report the label and rationale parts separately. The tasks' output
features are only `inputs` and `targets`, as t5x and seqio.Evaluator expect.
"""

from __future__ import annotations

import tensorflow as tf

from dsbs_jax.roles import ANSWER_SEPARATOR, TASK_ROLE, TaskKind


def _targets(kind: TaskKind, ex: dict[str, tf.Tensor]) -> tf.Tensor:
    if kind is TaskKind.LABEL_GOLD:
        return ex["label"]
    if kind is TaskKind.LABEL_TEACHER:
        return ex["teacher_label"]
    if kind is TaskKind.RATIONALE:
        return ex["rationale"]
    return tf.strings.join([ex["rationale"], ex["teacher_label"]], separator=ANSWER_SEPARATOR)


def format_task(dataset: tf.data.Dataset, kind: TaskKind) -> tf.data.Dataset:
    """Maps a teacher-cache example to {inputs, targets, task_role, id} for `kind`."""

    def fn(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {
            "id": ex["id"],
            "inputs": tf.strings.join([kind.prefix, ex["input"]]),
            "targets": _targets(kind, ex),
            TASK_ROLE: tf.constant(int(kind.role), tf.int32),
        }

    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
