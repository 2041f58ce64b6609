"""SeqIO tasks, mixtures and the feature converter on the built-in cache."""

from __future__ import annotations

import gin
import numpy as np
import pytest
import seqio

from dsbs_jax.data import registration
from dsbs_jax.data.feature_converters import StepByStepFeatureConverter
from dsbs_jax.roles import ANSWER_SEPARATOR, TaskRole, label_after_rationale

LENGTHS = {"inputs": 96, "targets": 96}
MIXTURES = [*registration.METHODS, "step_by_step_rates"]
BASE_FEATURES = {
    "encoder_input_tokens",
    "decoder_input_tokens",
    "decoder_target_tokens",
    "decoder_loss_weights",
    "decoder_task_ids",
}
PACKING_FEATURES = {
    "encoder_segment_ids",
    "decoder_segment_ids",
    "encoder_positions",
    "decoder_positions",
}


def _examples(name, converter, split="train", shuffle=False, seed=None):
    ds = seqio.get_dataset(
        name, LENGTHS, converter, dataset_split=split, shuffle=shuffle, seed=seed
    )
    return list(ds.as_numpy_iterator())


def _decode(tokens) -> str:
    vocab = registration.vocabulary("synthetic")
    return vocab.decode([int(t) for t in tokens if t > 1])


@pytest.mark.parametrize("method", MIXTURES)
@pytest.mark.parametrize("pack", [False, True], ids=["unpacked", "packed"])
def test_every_mixture_yields_model_features(gin_cache_root, method, pack):
    name = registration.mixture_name("synthetic", method)
    examples = _examples(name, StepByStepFeatureConverter(pack=pack))
    assert examples
    expected = BASE_FEATURES | (PACKING_FEATURES if pack else set())
    for ex in examples:
        assert set(ex) == expected
        assert all(v.shape == (96,) for v in ex.values())
        assert ex["decoder_loss_weights"].dtype == np.float32
        real = ex["decoder_target_tokens"] != 0
        assert np.array_equal(ex["decoder_task_ids"] > 0, real)
        if pack:
            assert np.array_equal(ex["decoder_segment_ids"] > 0, real)


@pytest.mark.parametrize("method", MIXTURES)
def test_stock_t5x_converter_reads_every_mixture(gin_cache_root, method):
    """A real t5x install uses seqio's own converter: the mixtures must work there unchanged."""
    name = registration.mixture_name("synthetic", method)
    examples = _examples(name, seqio.EncDecFeatureConverter(pack=True), shuffle=True, seed=1)
    assert examples and "decoder_task_ids" not in examples[0]


def test_task_texts(gin_cache_root):
    converter = StepByStepFeatureConverter(pack=False)
    (label,) = _examples("dsbs_synthetic_label_gt", converter, split="test")[:1]
    (rationale,) = _examples("dsbs_synthetic_rationale", converter, split="test")[:1]
    (single,) = _examples("dsbs_synthetic_rationale_label", converter, split="test")[:1]
    question = _decode(label["encoder_input_tokens"]).removeprefix("predict: ")
    assert _decode(rationale["encoder_input_tokens"]) == "explain: " + question
    assert _decode(single["decoder_target_tokens"]) == (
        _decode(rationale["decoder_target_tokens"])
        + ANSWER_SEPARATOR
        + label_after_rationale(_decode(single["decoder_target_tokens"]))
    )
    assert label["decoder_task_ids"][0] == TaskRole.LABEL
    assert rationale["decoder_task_ids"][0] == TaskRole.RATIONALE


@pytest.mark.parametrize("method", ["step_by_step", "step_by_step_gt"])
def test_paired_mixture_keeps_both_targets_of_an_example_together(gin_cache_root, method):
    name = registration.mixture_name("synthetic", method)
    converter = StepByStepFeatureConverter(pack=False, loss_weights={1: 0.3, 2: 0.7})
    examples = _examples(name, converter, shuffle=True, seed=5)
    assert len(examples) % 2 == 0
    questions = []
    for label, rationale in zip(examples[::2], examples[1::2], strict=True):
        label_input = _decode(label["encoder_input_tokens"])
        assert label_input.startswith("predict: ")
        assert _decode(rationale["encoder_input_tokens"]) == (
            "explain: " + label_input.removeprefix("predict: ")
        )
        assert set(label["decoder_task_ids"]) == {0, TaskRole.LABEL}
        assert set(rationale["decoder_task_ids"]) == {0, TaskRole.RATIONALE}
        np.testing.assert_allclose(label["decoder_loss_weights"][0], 0.3)
        np.testing.assert_allclose(rationale["decoder_loss_weights"][0], 0.7)
        questions.append(label_input)
    # Shuffled as pairs: not in file order, and each input once per epoch.
    in_order = _examples(name, converter)[::2]
    assert questions != [_decode(e["encoder_input_tokens"]) for e in in_order]
    assert len(set(questions)) == len(questions)


def test_alpha_from_gin_sets_loss_weights_and_rates(gin_cache_root):
    with gin.unlock_config():
        gin.parse_config(["step_by_step_loss_weights.alpha = 0.8", "step_by_step_rate.alpha = 0.8"])
    ex = _examples("dsbs_synthetic_rationale", StepByStepFeatureConverter(pack=False))[0]
    np.testing.assert_allclose(ex["decoder_loss_weights"][0], 0.2, rtol=1e-6)
    mixture = seqio.get_mixture_or_task("dsbs_synthetic_step_by_step_rates")
    rates = [mixture.get_rate(task) for task in mixture.tasks]
    np.testing.assert_allclose(sorted(rates), [0.2, 0.8])


def test_training_fraction_applies_to_every_task_alike(gin_cache_root):
    def inputs(task, split="train"):
        return {
            _decode(e["encoder_input_tokens"]).split(": ", 1)[1]
            for e in _examples(task, StepByStepFeatureConverter(pack=False), split=split)
        }

    full_gt, full_llm = inputs("dsbs_synthetic_label_gt"), inputs("dsbs_synthetic_label_llm")
    with gin.unlock_config():
        gin.bind_parameter("training_subset.fraction", 0.25)
    quarter_gt, quarter_llm = inputs("dsbs_synthetic_label_gt"), inputs("dsbs_synthetic_label_llm")
    assert len(quarter_gt) == 30
    assert quarter_llm <= quarter_gt <= full_gt and quarter_llm <= full_llm
    assert inputs("dsbs_synthetic_label_gt", "validation") == inputs(
        "dsbs_synthetic_label_llm", "validation"
    )


def test_vocabulary_follows_gin(gin_cache_root, tmp_path):
    vocab = registration.vocabulary("synthetic")
    assert vocab.vocab_size == 128
    assert vocab == seqio.SentencePieceVocabulary(str(gin_cache_root / "synthetic" / "spm.model"))
    with gin.unlock_config():
        gin.bind_parameter("vocabulary_file.path", str(tmp_path / "missing.model"))
    with pytest.raises(Exception, match="missing.model"):
        vocab.encode("hello")


def test_missing_cache_says_how_to_make_it(gin_cache_root, tmp_path):
    with gin.unlock_config():
        gin.bind_parameter("teacher_cache_root.path", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"python -m dsbs_jax.data prepare"):
        _examples("dsbs_cqa_distill", StepByStepFeatureConverter(pack=False))


def test_data_gin_file_macros_reach_the_pipeline(gin_cache_root):
    from pathlib import Path

    from dsbs_jax.data.feature_converters import step_by_step_loss_weights
    from dsbs_jax.data.sources import teacher_cache_root, training_subset

    gin_file = Path(__file__).resolve().parents[1] / "dsbs_jax/gin_configs/data/defaults.gin"
    with gin.unlock_config():
        gin.parse_config_files_and_bindings(
            [str(gin_file)],
            [
                "ALPHA = 0.7",
                "TRAIN_FRACTION = 0.5",
                "DATA_SEED = 3",
                f'DATA_DIR = "{gin_cache_root}"',
            ],
        )
    assert training_subset() == (0.5, 3)
    assert teacher_cache_root() == gin_cache_root
    weights = step_by_step_loss_weights()
    np.testing.assert_allclose([weights[TaskRole.LABEL], weights[TaskRole.RATIONALE]], [0.7, 0.3])
    assert len(_examples("dsbs_synthetic_label_gt", StepByStepFeatureConverter(pack=False))) == 60


TASK_NAMES = [
    "dsbs_synthetic_label_gt",
    "dsbs_synthetic_label_llm",
    "dsbs_synthetic_rationale",
    "dsbs_synthetic_rationale_label",
    "dsbs_synthetic_pair_gt_label",
    "dsbs_synthetic_pair_gt_rationale",
]


@pytest.mark.parametrize("task", TASK_NAMES)
@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_every_task_yields_each_split(gin_cache_root, task, split):
    examples = _examples(task, StepByStepFeatureConverter(pack=True), split=split)
    assert examples and set(examples[0]) == BASE_FEATURES | PACKING_FEATURES


def test_tfds_build_reads_like_the_jsonl_cache(gin_cache_root, tmp_path):
    from dsbs_jax.data import tfds_cache

    tfds_cache.build_tfds(gin_cache_root / "synthetic", "synthetic", tmp_path, num_shards=2)
    converter = StepByStepFeatureConverter(pack=False)

    def read(task, shard=None, split="train"):
        ds = seqio.get_mixture_or_task(task).get_dataset(
            LENGTHS, split=split, shuffle=False, shard_info=shard
        )
        return sorted(_decode(ex["inputs"]) for ex in ds.as_numpy_iterator())

    with gin.unlock_config():
        gin.bind_parameter("training_subset.fraction", 0.5)
    from_jsonl = read("dsbs_synthetic_label_llm")
    validation = read("dsbs_synthetic_label_llm", split="validation")  # valid.jsonl
    with gin.unlock_config():
        gin.bind_parameter("teacher_cache_tfds_dir.path", str(tmp_path))
    assert read("dsbs_synthetic_label_llm") == from_jsonl
    assert read("dsbs_synthetic_label_llm", split="validation") == validation and validation
    hosts = [read("dsbs_synthetic_label_llm", seqio.ShardInfo(i, 2)) for i in range(2)]
    assert set(hosts[0]).isdisjoint(hosts[1]) and sorted(hosts[0] + hosts[1]) == from_jsonl
    assert _examples("dsbs_synthetic_step_by_step", converter)


def test_evaluation_splits_use_every_gold_example_and_gold_labels(gin_cache_root):
    from dsbs_jax.data import cache

    converter = StepByStepFeatureConverter(pack=False)
    records = cache.read_records(gin_cache_root / "synthetic" / "test.jsonl")
    for task in ["dsbs_synthetic_label_llm", "dsbs_synthetic_label_gt", "dsbs_synthetic_rationale"]:
        assert len(_examples(task, converter, split="test")) == len(records)
    labels = [
        _decode(e["decoder_target_tokens"])
        for e in _examples("dsbs_synthetic_label_llm", converter, split="test")
    ]
    assert labels == [r.label for r in records]
    # On train the same task teaches the teacher's labels, mistakes included.
    train = cache.read_records(gin_cache_root / "synthetic" / "train.jsonl")
    taught = [
        _decode(e["decoder_target_tokens"])
        for e in _examples("dsbs_synthetic_label_llm", converter)
    ]
    assert taught == [r.teacher_label for r in train if r.parse_ok]
    assert any(r.label != r.teacher_label for r in train)
