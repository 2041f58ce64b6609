"""A SeqIO feature converter that carries each task's loss weight to the model.

SeqIO's EncDecFeatureConverter gives 0/1 `decoder_loss_weights` and forgets
which task an example came from. The step-by-step loss needs both: a weight per
task (alpha for the label, 1 - alpha for the rationale) and, to average each
task's cross-entropy over its own tokens as the official code does, which task
every target token belongs to. Pass-through features cannot be packed, so the
task role is spread over the target tokens and packed along with them.
"""

from __future__ import annotations

from collections.abc import Mapping

import gin
import seqio
import tensorflow as tf

from dsbs_jax.data import packing
from dsbs_jax.errors import UserError
from dsbs_jax.roles import TASK_ROLE, TaskRole

ROLE_TOKENS = "targets_task_role"


@gin.configurable
def step_by_step_loss_weights(alpha: float | None = 0.5) -> dict[int, float]:
    """{role: loss weight}: alpha for labels, 1 - alpha for rationales; None weights all 1."""
    if alpha is None:
        return {int(TaskRole.LABEL): 1.0, int(TaskRole.RATIONALE): 1.0}
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"alpha must be in [0, 1], got {alpha}")
    return {int(TaskRole.LABEL): float(alpha), int(TaskRole.RATIONALE): 1.0 - float(alpha)}


@gin.configurable
class StepByStepFeatureConverter(seqio.EncDecFeatureConverter):
    """EncDecFeatureConverter plus float `decoder_loss_weights` and int `decoder_task_ids`.

    `decoder_task_ids` holds the TaskRole of every target token (0 on padding);
    `decoder_loss_weights` holds that role's weight. Examples without a
    `task_role` feature count as labels, so plain seqio tasks work too.
    `first_fit_window` is how many examples each first-fit packing pass sees; None packs
    with SeqIO's packer instead, which keeps one row open at a time.
    """

    MODEL_FEATURES = {
        **seqio.EncDecFeatureConverter.MODEL_FEATURES,
        "decoder_loss_weights": seqio.FeatureConverter.FeatureSpec(dtype=tf.float32),
        "decoder_task_ids": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
    }

    def __init__(
        self,
        pack: bool = True,
        use_custom_packing_ops: bool = False,
        apply_length_check: bool = True,
        bos_id: int = 0,
        loss_weights: Mapping[int, float] | None = None,
        first_fit_window: int | None = packing.DEFAULT_WINDOW,
    ) -> None:
        super().__init__(
            pack=pack,
            use_custom_packing_ops=use_custom_packing_ops,
            apply_length_check=apply_length_check,
            bos_id=bos_id,
        )
        weights = dict(step_by_step_loss_weights() if loss_weights is None else loss_weights)
        unknown = set(weights) - {int(r) for r in TaskRole}
        if unknown:
            raise UserError(f"loss weights for unknown task roles {sorted(unknown)}")
        self._weight_table = tf.constant(
            [0.0] + [float(weights.get(int(r), 1.0)) for r in TaskRole], tf.float32
        )
        self._first_fit_window = first_fit_window

    def _pack_or_pad(
        self, ds: tf.data.Dataset, packed_lengths: Mapping[str, int]
    ) -> tf.data.Dataset:
        if self.pack and self._first_fit_window is not None:
            return packing.first_fit_pack_dataset(ds, packed_lengths, self._first_fit_window)
        return super()._pack_or_pad(ds, packed_lengths)

    def _convert_features(
        self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
    ) -> tf.data.Dataset:
        def spread_role(ex: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            role = ex.get(TASK_ROLE, tf.constant(int(TaskRole.LABEL), tf.int32))
            kept = {k: v for k, v in ex.items() if k != TASK_ROLE}
            return {**kept, ROLE_TOKENS: tf.fill(tf.shape(ex["targets"]), role)}

        lengths = {**task_feature_lengths, ROLE_TOKENS: task_feature_lengths["targets"]}
        ds = self._pack_or_pad(ds.map(spread_role, num_parallel_calls=tf.data.AUTOTUNE), lengths)
        return ds.map(self._convert_example, num_parallel_calls=tf.data.AUTOTUNE)

    def _convert_example(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        converted = dict(super()._convert_example(features))
        is_target = tf.cast(features["targets"] != 0, tf.int32)
        task_ids = features[ROLE_TOKENS] * is_target
        converted["decoder_task_ids"] = task_ids
        converted["decoder_loss_weights"] = tf.gather(self._weight_table, task_ids)
        return converted

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
        lengths = dict(super().get_model_feature_lengths(task_feature_lengths))
        lengths["decoder_task_ids"] = task_feature_lengths["targets"]
        return lengths
