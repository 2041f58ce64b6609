"""The distilling step-by-step objective as a t5x model, for training inside a t5x install.

t5x's EncoderDecoderModel minimises a sum of token losses weighted by seqio's 0/1
`decoder_loss_weights`; it knows nothing of tasks. `StepByStepEncoderDecoderModel`
reads our feature converter's per-token `decoder_task_ids` and weights and
minimises `dsbs_jax.losses.step_by_step_loss`: ALPHA * mean label CE +
(1 - ALPHA) * mean rationale CE, each mean over that task's tokens in the batch.

Only t5x users import this module (gin_configs/dsbs_t5x/step_by_step.gin does);
t5x is not a dependency of dsbs_jax. Exact under data parallelism and model
parallelism (the loss sees the global batch); t5x's microbatching
(`Trainer.num_microbatches`) divides by each microbatch's own token counts, so
leave it off.
"""

from __future__ import annotations

from collections.abc import Mapping

import gin
import jax
import seqio
from t5x import metrics as t5x_metrics
from t5x import models

from dsbs_jax.data import registration
from dsbs_jax.data.feature_converters import StepByStepFeatureConverter
from dsbs_jax.errors import UserError
from dsbs_jax.losses import step_by_step_loss, summarise_loss_sums


class StepByStepEncoderDecoderModel(models.EncoderDecoderModel):
    """t5x's EncoderDecoderModel trained on the step-by-step loss (per-task token means)."""

    FEATURE_CONVERTER_CLS = StepByStepFeatureConverter

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self._loss_normalizing_factor is not None:
            raise UserError(
                "the step-by-step loss normalises by each task's token count; "
                "set LOSS_NORMALIZING_FACTOR = None"
            )

    def loss_fn(
        self,
        params: Mapping[str, jax.Array],
        batch: Mapping[str, jax.Array],
        dropout_rng: jax.Array | None,
    ) -> tuple[jax.Array, dict]:
        logits = self._compute_logits(params, batch, dropout_rng)
        loss, sums = step_by_step_loss(
            logits, batch, label_smoothing=self._label_smoothing, z_loss=self._z_loss
        )
        is_target = batch["decoder_task_ids"] > 0
        segment_ids = {
            k[: -len("_segment_ids")]: v for k, v in batch.items() if k.endswith("_segment_ids")
        } or {k: batch[k] != 0 for k in ("encoder_input_tokens", "decoder_target_tokens")}
        metrics = self._compute_metrics(
            logits=logits,
            targets=batch["decoder_target_tokens"],
            mask=is_target,
            loss=loss,
            segment_ids=segment_ids,
        )
        for name, value in summarise_loss_sums(sums).items():
            if name != "loss":
                metrics[f"step_by_step/{name}"] = t5x_metrics.AveragePerStep(total=value)
        return loss, metrics


@gin.configurable
def step_by_step_model(model: models.EncoderDecoderModel) -> StepByStepEncoderDecoderModel:
    """`model`, as configured by t5x's model gin file, with the step-by-step loss.

    Taking the configured model keeps every binding of the model gin file (network,
    vocabularies, optimizer, z-loss, decoding) whatever network it uses.
    """
    if not isinstance(model, models.EncoderDecoderModel):
        raise TypeError(
            f"the step-by-step loss needs an encoder-decoder model, got {type(model).__name__}"
        )
    return StepByStepEncoderDecoderModel(
        module=model.module,
        input_vocabulary=model.input_vocabulary,
        output_vocabulary=model.output_vocabulary,
        optimizer_def=model.optimizer_def,
        decode_fn=model._decode_fn,
        label_smoothing=model._label_smoothing,
        z_loss=model._z_loss,
        loss_normalizing_factor=model._loss_normalizing_factor,
        default_decoder_params=model._default_decoder_params,
    )


@gin.configurable
def task_vocabulary(mixture_or_task_name: str = gin.REQUIRED) -> seqio.Vocabulary:
    """The vocabulary the run's tasks tokenize with, for t5x's VOCABULARY: VOCABULARY_PATH, or
    with it None the dataset's own (`<DATA_DIR>/<dataset>/spm.model`).

    The model is built before t5x imports MIXTURE_OR_TASK_MODULE, so this registers the tasks.
    """
    import dsbs_jax.tasks  # noqa: F401

    return registration.task_vocabulary(mixture_or_task_name)
