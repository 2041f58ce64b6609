"""SeqIO preprocessors that turn teacher-cache examples into the method's tasks.

Every task example carries a `task_role` (label or rationale): the feature
converter turns it into per-token loss weights and task ids, so the loss can
weight and report the label and rationale parts separately. The tasks' output
features are only `inputs` and `targets`, as t5x and seqio.Evaluator expect.
"""

from __future__ import annotations

import enum

import tensorflow as tf

PREDICT_PREFIX = "predict: "
EXPLAIN_PREFIX = "explain: "
# Joins rationale and label in the single-task baseline's target.
ANSWER_SEPARATOR = " So the answer is "


class TaskRole(enum.IntEnum):
    """What a task's targets are; 0 is left for padding in the per-token ids."""

    LABEL = 1
    RATIONALE = 2


class TaskKind(enum.Enum):
    """The four tasks built from one teacher cache: (input prefix, target, role)."""

    LABEL_GOLD = "label_gt"
    LABEL_TEACHER = "label_llm"
    RATIONALE = "rationale"
    RATIONALE_THEN_LABEL = "rationale_label"

    @property
    def role(self) -> TaskRole:
        return TaskRole.RATIONALE if self is TaskKind.RATIONALE else TaskRole.LABEL

    @property
    def prefix(self) -> str:
        return EXPLAIN_PREFIX if self is TaskKind.RATIONALE else PREDICT_PREFIX


# The example key holding the TaskRole: an int32 scalar, not an output feature (see mixtures).
TASK_ROLE = "task_role"


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


def label_after_rationale(output: str, example: dict | None = None, is_target: bool = False) -> str:
    """Single-task postprocessor: the label is what follows the last answer separator."""
    del example, is_target
    marker = ANSWER_SEPARATOR.strip()
    return output.rsplit(marker, 1)[1].strip() if marker in output else output.strip()
