"""Mixtures for distilling step-by-step: paired and rate-based.

Paired (the official method): the label and rationale examples of one input
travel together, label then rationale, so both land in the same batch and the
loss can be `alpha * L_label + (1 - alpha) * L_rationale` per batch. SeqIO's
Mixture samples tasks independently and shuffles each on its own, which would
break the pairs, so `PairedMixture` zips its tasks before shuffling.

Rate-based: a mixture whose rates are alpha and 1 - alpha, read from gin when
the dataset is built.

Every example keeps its `task_role` (see `dsbs_jax.data.preprocessors`) through
the mixture. It is not an output feature, so that `seqio.Evaluator`, which
measures the length of every output feature, sees only `inputs` and `targets`;
seqio's Mixture keeps only output and pass-through features, so `RoleMixture`
passes it through.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import gin
import seqio
import tensorflow as tf

from dsbs_jax.errors import UserError
from dsbs_jax.roles import TASK_ROLE, TaskRole

PAIR_SHUFFLE_BUFFER = 10_000


@gin.configurable
def step_by_step_rate(task: seqio.Task, role: TaskRole, alpha: float = 0.5) -> float:
    """The rate-based mixture's rate for a task of `role`: alpha or 1 - alpha (gin: ALPHA)."""
    del task
    if not 0.0 < alpha < 1.0:
        raise UserError(f"mixture rates need 0 < alpha < 1, got {alpha}")
    return alpha if role is TaskRole.LABEL else 1.0 - alpha


def _with_task_role(passthrough_features: Sequence[str] | None) -> list[str]:
    return sorted(set(passthrough_features or ()) | {TASK_ROLE})


class RoleMixture(seqio.Mixture):
    """A seqio.Mixture whose examples keep their `task_role`."""

    def get_dataset(self, *args, passthrough_features: Sequence[str] | None = None, **kwargs):
        return super().get_dataset(
            *args, passthrough_features=_with_task_role(passthrough_features), **kwargs
        )


class PairedMixture(RoleMixture):
    """Interleaves its tasks example by example: task 0's i-th example, task 1's i-th, ...

    The tasks must be built from one source with one-to-one preprocessing, so
    their i-th examples come from the same input; `id` is checked to be sure.
    Under a stock t5x EncDecFeatureConverter it simply yields the pairs;
    `StepByStepFeatureConverter` adds the per-task loss weights.
    """

    def __init__(self, name: str, tasks: Sequence[str]) -> None:
        if len(tasks) < 2:
            raise ValueError(f"PairedMixture {name!r} needs at least two tasks")
        super().__init__(name, [(t, 1.0) for t in tasks])

    def get_dataset(
        self,
        sequence_length: Mapping[str, int] | None = None,
        split: str = "train",
        use_cached: bool = False,
        shuffle: bool = True,
        seed: int | None = None,
        shard_info: seqio.ShardInfo | None = None,
        num_epochs: int | None = None,
        copy_pretokenized: bool = False,
        compute_stats_empirically: bool = False,
        log_mixing_proportions: bool = True,
        passthrough_features: Sequence[str] | None = None,
        trim_output_features: bool = True,
        try_in_mem_cache: bool = True,
    ) -> tf.data.Dataset:
        del compute_stats_empirically, log_mixing_proportions
        self._check_compatible_features()
        keys = set(self.output_features) | {"id"} | set(_with_task_role(passthrough_features))
        if copy_pretokenized:
            keys |= {f"{k}_pretokenized" for k in self.output_features}
        per_task = [
            self.get_task_dataset(
                task,
                keys,
                sequence_length,
                split,
                use_cached,
                shuffle=False,
                seed=None,
                shard_info=shard_info,
                num_epochs=1,
                trim_output_features=trim_output_features,
                try_in_mem_cache=try_in_mem_cache,
            )
            for task in self.tasks
        ]
        pairs = tf.data.Dataset.zip(tuple(per_task)).map(_check_same_input)
        if shuffle:
            pairs = pairs.shuffle(PAIR_SHUFFLE_BUFFER, seed=seed)
        if num_epochs != 1:
            pairs = pairs.repeat(num_epochs)
        examples = pairs.flat_map(_interleave)
        if "id" in (passthrough_features or ()):
            return examples
        return examples.map(_drop_id)


def _check_same_input(*examples: dict[str, tf.Tensor]) -> tuple[dict[str, tf.Tensor], ...]:
    for ex in examples[1:]:
        tf.debugging.assert_equal(
            ex["id"], examples[0]["id"], message="PairedMixture: tasks are out of step"
        )
    return examples


def _interleave(*examples: dict[str, tf.Tensor]) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensors(examples[0])
    for ex in examples[1:]:
        ds = ds.concatenate(tf.data.Dataset.from_tensors(ex))
    return ds


def _drop_id(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    return {k: v for k, v in ex.items() if k != "id"}
