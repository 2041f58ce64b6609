"""What each task of the method is, in words both the data pipeline and the model code use.

Every example carries a task role (label or rationale); the loss weighs and reports the two
roles apart, and inputs carry the prefix of theirs. This module is plain Python, so the model,
the loss and the train step can read it on a host without TensorFlow or SeqIO.
"""

from __future__ import annotations

import enum

PREDICT_PREFIX = "predict: "
EXPLAIN_PREFIX = "explain: "
# Joins rationale and label in the single-task baseline's target.
ANSWER_SEPARATOR = " So the answer is "
# The example key holding the TaskRole: an int32 scalar, not an output feature (see mixtures).
TASK_ROLE = "task_role"


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


def label_after_rationale(output: str, example: dict | None = None, is_target: bool = False) -> str:
    """Single-task postprocessor: the label is what follows the last answer separator."""
    del example, is_target
    marker = ANSWER_SEPARATOR.strip()
    return output.rsplit(marker, 1)[1].strip() if marker in output else output.strip()
