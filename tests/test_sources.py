"""Training data options of the teacher-cache source: several rationales per input,
rationale filtering by teacher correctness, and unlabeled augmentation."""

from __future__ import annotations

from pathlib import Path

import gin
import pytest
import seqio

from dsbs_jax import metrics
from dsbs_jax.data import cache, registration
from dsbs_jax.data.sources import kept_training_indices, labels_agree
from dsbs_jax.roles import TaskKind

MAIN, EXTRA = "srctest_main", "srctest_extra"
LENGTHS = {"inputs": 64, "targets": 64}


def _record(
    id_: str, label: str, teacher_label: str, rationales: tuple[str, ...]
) -> cache.TeacherRecord:
    return cache.TeacherRecord(
        id=id_,
        input=f"question {id_}",
        label=label,
        teacher_label=teacher_label,
        rationales=rationales,
        teacher="test",
        parse_ok=bool(teacher_label and rationales),
    )


TRAIN = [
    _record("a", "4", "4", ("a zero", "a one", "a two")),  # right, three samples
    _record("b", "5", "6", ("b zero", "b one")),  # wrong
    _record("c", "", "7", ("c zero",)),  # unlabeled
    _record("d", "8", "", ()),  # the teacher's answer did not parse
    _record("e", "9", "9", ("e zero",)),  # right
]
EXTRA_TRAIN = [
    _record("x", "1", "1", ("x zero", "x one")),
    _record("y", "2", "3", ("y zero",)),
]
EVAL = [_record("v", "4", "5", ("v zero", "v one")), _record("w", "", "6", ("w zero",))]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sources")
    cache.write_splits(root / MAIN, {"train": TRAIN, "valid": EVAL, "test": EVAL})
    cache.write_splits(root / EXTRA, {"train": EXTRA_TRAIN, "valid": EVAL, "test": EVAL})
    registration.register_dataset(MAIN)
    registration.register_dataset(EXTRA)
    return root


@pytest.fixture
def configure(cache_root, builtin_cache_root):
    """Binds gin as a run would: the test caches, the built-in vocabulary, then `bindings`."""

    def bind(**bindings: object) -> None:
        with gin.unlock_config():
            gin.bind_parameter("teacher_cache_root.path", str(cache_root))
            spm = builtin_cache_root / "synthetic" / "spm.model"
            gin.bind_parameter("vocabulary_file.path", str(spm))
            for name, value in bindings.items():
                gin.bind_parameter(name, value)

    bind()
    yield bind
    gin.clear_config()


def _source_examples(task: str, split: str = "train") -> list[dict[str, str]]:
    """The task's source examples, unshuffled, with their text fields decoded."""
    ds = seqio.get_mixture_or_task(task).source.get_dataset(split, shuffle=False)
    keys = ("id", "label", "teacher_label", "rationale")
    return [{k: ex[k].decode() for k in keys} for ex in ds.as_numpy_iterator()]


def _ids(task: str, split: str = "train") -> list[str]:
    return [ex["id"] for ex in _source_examples(task, split)]


def _pairs(method: str, dataset: str = MAIN) -> list[tuple[dict, dict]]:
    mixture = seqio.get_mixture_or_task(registration.mixture_name(dataset, method))
    ds = mixture.get_dataset(
        LENGTHS,
        split="train",
        shuffle=False,
        num_epochs=1,
        copy_pretokenized=True,
        passthrough_features=["id"],
    )
    examples = [
        {k: ex[k].decode() for k in ("id", "inputs_pretokenized", "targets_pretokenized")}
        for ex in ds.as_numpy_iterator()
    ]
    return list(zip(examples[::2], examples[1::2], strict=True))


FINETUNE = registration.task_name(MAIN, TaskKind.LABEL_GOLD)
DISTILL = registration.distill_task_name(MAIN)
SINGLE_TASK = registration.task_name(MAIN, TaskKind.RATIONALE_THEN_LABEL)


def test_defaults_keep_one_example_per_input(configure):
    assert [(label["id"], rationale["id"]) for label, rationale in _pairs("step_by_step")] == [
        ("a#r0", "a#r0"),
        ("b#r0", "b#r0"),
        ("c#r0", "c#r0"),
        ("e#r0", "e#r0"),
    ]
    assert _ids(DISTILL) == ["a", "b", "c", "e"]
    # Gold-label tasks skip the unlabeled record c, and do not need the teacher's output.
    assert _ids(FINETUNE) == ["a", "b", "d", "e"]


def test_every_rationale_becomes_its_own_pair(configure):
    configure(**{"rationale_selection.max_rationales_per_example": None})
    pairs = _pairs("step_by_step")
    expected = [
        (f"{r.id}#r{i}", r.teacher_label, text)
        for r in TRAIN
        if r.parse_ok
        for i, text in enumerate(r.rationales)
    ]
    assert len(expected) == 7
    assert [
        (label["id"], label["targets_pretokenized"], rationale["targets_pretokenized"])
        for label, rationale in pairs
    ] == expected
    for label, rationale in pairs:
        assert rationale["id"] == label["id"]
        assert label["inputs_pretokenized"] == "predict: question " + label["id"].split("#")[0]
        assert rationale["inputs_pretokenized"] == "explain: question " + label["id"].split("#")[0]
    single = _source_examples(SINGLE_TASK)
    assert [(ex["id"], ex["rationale"]) for ex in single] == [(i, text) for i, _, text in expected]
    # step_by_step_gt pairs gold labels with every rationale of the labelled, parsed inputs.
    gold_pairs = [(lab["id"], lab["targets_pretokenized"]) for lab, _ in _pairs("step_by_step_gt")]
    assert gold_pairs == [
        (f"{r.id}#r{i}", r.label)
        for r in TRAIN
        if r.parse_ok and r.label
        for i in range(len(r.rationales))
    ]
    assert len(gold_pairs) == 6
    # The baselines' label tasks stay one example per input, and evaluation is untouched.
    assert _ids(DISTILL) == ["a", "b", "c", "e"]
    assert _ids(FINETUNE) == ["a", "b", "d", "e"]
    assert _source_examples(DISTILL, "validation") == [
        {"id": "v", "label": "4", "teacher_label": "4", "rationale": "v zero"}
    ]


def test_max_rationales_keeps_the_first_ones(configure):
    configure(**{"rationale_selection.max_rationales_per_example": 2})
    rationale_task = registration.task_name(MAIN, TaskKind.RATIONALE)
    assert [(ex["id"], ex["rationale"]) for ex in _source_examples(rationale_task)] == [
        ("a#r0", "a zero"),
        ("a#r1", "a one"),
        ("b#r0", "b zero"),
        ("b#r1", "b one"),
        ("c#r0", "c zero"),
        ("e#r0", "e zero"),
    ]
    with pytest.raises(ValueError, match="max_rationales_per_example"):
        configure(**{"rationale_selection.max_rationales_per_example": 0})
        _ids(rationale_task)


def test_correct_teacher_only_drops_wrong_and_unlabeled_inputs(configure):
    configure(
        **{
            "rationale_selection.max_rationales_per_example": None,
            "rationale_selection.require_correct_teacher_label": True,
        }
    )
    # b (wrong) and c (no gold label to check against) go; d never had a teacher output.
    assert [label["id"] for label, _ in _pairs("step_by_step")] == ["a#r0", "a#r1", "a#r2", "e#r0"]
    assert [label["id"] for label, _ in _pairs("step_by_step_gt")] == [
        "a#r0",
        "a#r1",
        "a#r2",
        "e#r0",
    ]
    assert _ids(DISTILL) == ["a", "e"]
    assert len(_ids(SINGLE_TASK)) == 4
    assert _ids(FINETUNE) == ["a", "b", "d", "e"]  # gold labels need no teacher


def test_labels_agree_by_the_tasks_metric():
    assert labels_agree(metrics.accuracy, "Wooded area.", "wooded  area")
    assert not labels_agree(metrics.accuracy, "4", "5")
    assert labels_agree(metrics.equation_accuracy, "( 84.0 / 2.0 )", "(84 / 2)")
    assert not labels_agree(metrics.equation_accuracy, "( 84.0 / 2.0 )", "(84 * 2)")
    assert not labels_agree(metrics.accuracy, "", "")  # nothing to check against


def test_unlabeled_augmentation_feeds_teacher_tasks_only(configure):
    configure(**{"unlabeled_augmentation.datasets": [EXTRA]})
    distill = _source_examples(DISTILL)
    assert [ex["id"] for ex in distill] == ["a", "b", "c", "e", f"{EXTRA}/x", f"{EXTRA}/y"]
    assert [ex["label"] for ex in distill[-2:]] == ["", ""]  # gold labels ignored
    assert [ex["teacher_label"] for ex in distill[-2:]] == ["1", "3"]
    pair_ids = [label["id"] for label, _ in _pairs("step_by_step")]
    assert pair_ids[-2:] == [f"{EXTRA}/x#r0", f"{EXTRA}/y#r0"]
    assert len(set(pair_ids)) == len(pair_ids) == 6
    assert len(_ids(SINGLE_TASK)) == 6
    # Gold-label tasks and evaluation splits never see the augmentation records.
    assert _ids(FINETUNE) == ["a", "b", "d", "e"]
    assert [label["id"] for label, _ in _pairs("step_by_step_gt")] == ["a#r0", "b#r0", "e#r0"]
    assert _ids(DISTILL, "test") == ["v"]

    configure(**{"rationale_selection.require_correct_teacher_label": True})
    assert _ids(DISTILL) == ["a", "e"]  # unlabeled records cannot be checked


def test_train_fraction_subsamples_the_primary_dataset_only(configure):
    configure(**{"unlabeled_augmentation.datasets": [EXTRA], "training_subset.fraction": 0.4})
    kept = [TRAIN[i] for i in kept_training_indices(len(TRAIN), 0.4, seed=0)]
    assert len(kept) == 2
    primary = [r.id for r in kept if r.parse_ok]
    assert _ids(DISTILL) == [*primary, f"{EXTRA}/x", f"{EXTRA}/y"]


def test_bad_augmentation_datasets_are_named(configure, cache_root):
    configure(**{"unlabeled_augmentation.datasets": ["nowhere"]})
    with pytest.raises(FileNotFoundError, match=str(cache_root / "nowhere")):
        _ids(DISTILL)
    configure(**{"unlabeled_augmentation.datasets": [MAIN]})
    with pytest.raises(ValueError, match="repeats"):
        _ids(DISTILL)
    configure(**{"unlabeled_augmentation.datasets": EXTRA})
    with pytest.raises(ValueError, match="must be a list"):
        _ids(DISTILL)


def test_tfds_builds_give_the_same_examples(configure, cache_root, tmp_path):
    from dsbs_jax.data import tfds_cache

    for dataset in (MAIN, EXTRA):
        tfds_cache.build_tfds(cache_root / dataset, dataset, tmp_path, num_shards=1)
    configure(
        **{
            "rationale_selection.max_rationales_per_example": None,
            "unlabeled_augmentation.datasets": [EXTRA],
            "training_subset.fraction": 0.6,
        }
    )
    tasks = [
        FINETUNE,
        DISTILL,
        SINGLE_TASK,
        registration.task_name(MAIN, TaskKind.LABEL_GOLD, paired_with_gold=True),
    ]
    from_jsonl = {task: _source_examples(task) for task in tasks}
    assert all(from_jsonl.values())
    configure(**{"teacher_cache_tfds_dir.path": str(tmp_path)})
    assert {task: _source_examples(task) for task in tasks} == from_jsonl
