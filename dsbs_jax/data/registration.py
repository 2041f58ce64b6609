"""Register the SeqIO tasks and mixtures of distilling step-by-step for one dataset.

For a dataset NAME with a canonical teacher cache at `<teacher_cache_root>/NAME/`:

tasks
    dsbs_NAME_label_gt          predict: x -> gold label
    dsbs_NAME_label_llm         predict: x -> teacher label, once per kept rationale
    dsbs_NAME_label_llm_per_input
                                predict: x -> teacher label, once per input
    dsbs_NAME_rationale         explain: x -> teacher rationale
    dsbs_NAME_rationale_label   predict: x -> rationale + " So the answer is " + teacher label
    dsbs_NAME_pair_gt_label, dsbs_NAME_pair_gt_rationale
                                the gold-label and rationale tasks over the examples
                                that have both, for pairing
mixtures (one per method)
    dsbs_NAME_finetune            standard finetuning (gold labels)
    dsbs_NAME_distill             standard distillation (teacher labels)
    dsbs_NAME_single_task         rationale and label in one target
    dsbs_NAME_step_by_step        teacher label + rationale, paired (official method)
    dsbs_NAME_step_by_step_gt     gold label + rationale, paired
    dsbs_NAME_step_by_step_rates  teacher label + rationale, mixed at rates alpha : 1 - alpha

Every task of NAME tokenizes with `vocabulary(NAME)`: VOCABULARY_PATH when gin sets
it, else NAME's own `<teacher_cache_root>/NAME/spm.model` (unlabeled augmentation
records join NAME's tasks, so they are read with NAME's vocabulary).

How many examples an input gives on train: a task with a rationale gives one per
rationale kept by `sources.rationale_selection` (one by default), and so does
each label task paired with one, or the pairs would fall out of step. The
baselines' label tasks (finetune's label_gt, distill's label_llm_per_input) give
one per input, as training on labels alone should: k copies of one label would
only reweight the inputs. label_llm itself is the per-rationale one, so the
step_by_step mixtures keep their task and metric names. On validation and test every
task gives one per input.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import seqio

from dsbs_jax import metrics
from dsbs_jax.data import cache
from dsbs_jax.data.mixtures import PairedMixture, RoleMixture, step_by_step_rate
from dsbs_jax.data.preprocessors import format_task
from dsbs_jax.data.sources import GOLD, GOLD_AND_TEACHER, TEACHER, TeacherCacheSource
from dsbs_jax.data.vocabularies import GinSentencePieceVocabulary
from dsbs_jax.errors import UserError
from dsbs_jax.roles import TaskKind, TaskRole, label_after_rationale

METRICS: dict[str, Callable] = {
    "accuracy": metrics.accuracy,
    "equation_accuracy": metrics.equation_accuracy,
}
METHODS = ("finetune", "distill", "single_task", "step_by_step", "step_by_step_gt")


@functools.cache
def vocabulary(dataset: str) -> GinSentencePieceVocabulary:
    """The vocabulary of `dataset`'s tasks, one object per dataset."""
    return GinSentencePieceVocabulary(dataset)


def task_vocabulary(mixture_or_task_name: str) -> seqio.Vocabulary:
    """The vocabulary a registered mixture's (or task's) targets are tokenized with."""
    return seqio.get_mixture_or_task(mixture_or_task_name).output_features["targets"].vocabulary


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    return {
        "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True),
        "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
    }


def task_name(dataset: str, kind: TaskKind, paired_with_gold: bool = False) -> str:
    """`dsbs_<dataset>_<kind>`; the gold-label pair's tasks are `..._pair_gt_<role>`."""
    if paired_with_gold:
        return f"dsbs_{dataset}_pair_gt_{kind.role.name.lower()}"
    return f"dsbs_{dataset}_{kind.value}"


def distill_task_name(dataset: str) -> str:
    """Standard distillation's task: teacher labels once per input, not once per rationale."""
    return f"{task_name(dataset, TaskKind.LABEL_TEACHER)}_per_input"


def mixture_name(dataset: str, method: str) -> str:
    return f"dsbs_{dataset}_{method}"


def _add_task(
    name: str,
    dataset: str,
    kind: TaskKind,
    audience: str,
    per_rationale: bool,
    metric: str,
    splits: Sequence[str],
) -> None:
    is_label_task = kind.role is TaskRole.LABEL
    source = TeacherCacheSource(
        dataset, audience, splits, per_rationale=per_rationale, metric_fn=METRICS[metric]
    )
    seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=[
            functools.partial(format_task, kind=kind),
            seqio.preprocessors.tokenize,
            seqio.CacheDatasetPlaceholder(),
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features=output_features(vocabulary(dataset)),
        postprocess_fn=label_after_rationale if kind is TaskKind.RATIONALE_THEN_LABEL else None,
        metric_fns=[METRICS[metric]] if is_label_task else [],
    )


def register_dataset(
    dataset: str, metric: str = "accuracy", splits: Sequence[str] = tuple(cache.TASK_SPLITS)
) -> None:
    """Registers every task and mixture of `dataset`; safe to call again (replaces them)."""
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    # (name, kind, audience, one example per kept rationale on train)
    tasks = [
        (task_name(dataset, TaskKind.LABEL_GOLD), TaskKind.LABEL_GOLD, GOLD, False),
        (task_name(dataset, TaskKind.LABEL_TEACHER), TaskKind.LABEL_TEACHER, TEACHER, True),
        (distill_task_name(dataset), TaskKind.LABEL_TEACHER, TEACHER, False),
        (task_name(dataset, TaskKind.RATIONALE), TaskKind.RATIONALE, TEACHER, True),
        (
            task_name(dataset, TaskKind.RATIONALE_THEN_LABEL),
            TaskKind.RATIONALE_THEN_LABEL,
            TEACHER,
            True,
        ),
        (
            task_name(dataset, TaskKind.LABEL_GOLD, True),
            TaskKind.LABEL_GOLD,
            GOLD_AND_TEACHER,
            True,
        ),
        (task_name(dataset, TaskKind.RATIONALE, True), TaskKind.RATIONALE, GOLD_AND_TEACHER, True),
    ]
    for name, kind, audience, per_rationale in tasks:
        seqio.TaskRegistry.remove(name)
        _add_task(name, dataset, kind, audience, per_rationale, metric, splits)

    label_llm = task_name(dataset, TaskKind.LABEL_TEACHER)
    rationale = task_name(dataset, TaskKind.RATIONALE)
    single = {
        "finetune": task_name(dataset, TaskKind.LABEL_GOLD),
        "distill": distill_task_name(dataset),
        "single_task": task_name(dataset, TaskKind.RATIONALE_THEN_LABEL),
    }
    for method, task in single.items():
        _replace_mixture(RoleMixture(mixture_name(dataset, method), [(task, 1.0)]))
    _replace_mixture(PairedMixture(mixture_name(dataset, "step_by_step"), [label_llm, rationale]))
    _replace_mixture(
        PairedMixture(
            mixture_name(dataset, "step_by_step_gt"),
            [
                task_name(dataset, TaskKind.LABEL_GOLD, True),
                task_name(dataset, TaskKind.RATIONALE, True),
            ],
        )
    )
    rates = [
        (label_llm, functools.partial(step_by_step_rate, role=TaskRole.LABEL)),
        (rationale, functools.partial(step_by_step_rate, role=TaskRole.RATIONALE)),
    ]
    _replace_mixture(RoleMixture(mixture_name(dataset, "step_by_step_rates"), rates))


def _replace_mixture(mixture: seqio.Mixture) -> None:
    """Mixture() does not register itself; add() builds and registers in one go."""
    seqio.MixtureRegistry.remove(mixture.name)
    seqio.MixtureRegistry.add_provider(mixture.name, mixture)
