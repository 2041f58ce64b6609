"""Tests for dsbs_jax.data.vocab: the T5 id layout, lossless round trips and determinism."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import sentencepiece as spm

from dsbs_jax.data import cache
from dsbs_jax.data.synthetic import SyntheticConfig, generate
from dsbs_jax.data.vocab import (
    cache_texts,
    train_sentencepiece,
    train_vocab_for_cache,
    write_dataset_vocab,
)
from dsbs_jax.errors import MissingFileError


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache_dir = tmp_path_factory.mktemp("synthetic")
    cache.write_splits(
        cache_dir, generate(SyntheticConfig(num_train=300, num_valid=50, num_test=100))
    )
    return cache_dir


@pytest.fixture(scope="module")
def processor(synthetic_cache: Path) -> spm.SentencePieceProcessor:
    model = train_vocab_for_cache(synthetic_cache)
    assert model == synthetic_cache / "spm.model"
    assert (synthetic_cache / "spm.vocab").is_file()
    return spm.SentencePieceProcessor(model_file=str(model))


def test_t5_id_layout(processor: spm.SentencePieceProcessor) -> None:
    assert (processor.pad_id(), processor.eos_id(), processor.unk_id()) == (0, 1, 2)
    assert processor.bos_id() == -1
    assert [processor.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]


def test_cache_texts_round_trip_without_unknowns(
    synthetic_cache: Path, processor: spm.SentencePieceProcessor
) -> None:
    for text in cache_texts(synthetic_cache):
        ids = processor.encode(text)
        assert processor.unk_id() not in ids, text
        assert processor.decode(ids) == text


def test_digits_are_single_pieces(processor: spm.SentencePieceProcessor) -> None:
    pieces = processor.encode("12345", out_type=str)
    assert [p for p in pieces if p != "\u2581"] == list("12345")


def test_frequent_words_get_whole_pieces(processor: spm.SentencePieceProcessor) -> None:
    assert processor.encode("How many pens does she have now?", out_type=str) == [
        "\u2581How",
        "\u2581many",
        "\u2581pens",
        "\u2581does",
        "\u2581she",
        "\u2581have",
        "\u2581now",
        "?",
    ]


def test_cache_texts_cover_prefixed_inputs_and_targets(synthetic_cache: Path) -> None:
    texts = set(cache_texts(synthetic_cache))
    for record in cache.read_records(cache.split_path(synthetic_cache, "test")):
        assert {
            record.input,
            "predict: " + record.input,
            "explain: " + record.input,
            record.label,
            record.teacher_label,
            *record.rationales,
        } <= texts


def test_same_corpus_gives_byte_identical_model(synthetic_cache: Path, tmp_path: Path) -> None:
    first = train_sentencepiece(cache_texts(synthetic_cache), tmp_path / "a", vocab_size=128)
    second = train_sentencepiece(cache_texts(synthetic_cache), tmp_path / "b" / "b", 128)
    assert first.read_bytes() == second.read_bytes()
    assert (tmp_path / "a.vocab").read_bytes() == (tmp_path / "b" / "b.vocab").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.model", "a.vocab", "b"]


def test_vocab_too_large_for_corpus_is_retried(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="dsbs_jax.data.vocab"):
        model = train_sentencepiece(["a b c", "hello world"], tmp_path / "tiny", vocab_size=256)
    processor = spm.SentencePieceProcessor(model_file=str(model))
    assert 3 < processor.get_piece_size() < 256
    assert processor.decode(processor.encode("hello world")) == "hello world"
    assert "at most" in caplog.text


def test_empty_inputs_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        train_sentencepiece(["", ""], tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        list(cache_texts(tmp_path))


def test_dataset_vocab_learns_from_the_train_split_and_is_kept(
    synthetic_cache: Path, tmp_path: Path
) -> None:
    train = cache.read_records(cache.split_path(synthetic_cache, "train"))
    test = [dataclasses.replace(train[0], id="t0", input="Сколько ручек у неё?")]
    cache.write_splits(tmp_path, {"train": train, "test": test})
    model = tmp_path / "spm.model"
    assert write_dataset_vocab(tmp_path) == f"wrote the vocabulary {model}"
    processor = spm.SentencePieceProcessor(model_file=str(model))
    assert processor.unk_id() in processor.encode(test[0].input)  # test text shaped nothing
    assert processor.unk_id() not in processor.encode(train[0].input)
    written = model.read_bytes()

    cache.write_splits(tmp_path, {"train": test, "test": test})
    assert write_dataset_vocab(tmp_path) == (
        f"kept the existing vocabulary {model} (models trained with it depend on its ids; "
        f"`python -m dsbs_jax.data vocab --cache {tmp_path}` retrains it)"
    )
    assert model.read_bytes() == written


def test_dataset_vocab_needs_a_train_split(synthetic_cache: Path, tmp_path: Path) -> None:
    test = cache.read_records(cache.split_path(synthetic_cache, "test"))
    cache.write_splits(tmp_path, {"test": test})
    assert write_dataset_vocab(tmp_path) == (
        f"wrote no vocabulary: {tmp_path} has no train split to learn one from "
        "(runs on it need VOCABULARY_PATH)"
    )
    assert not (tmp_path / "spm.model").exists()
    with pytest.raises(MissingFileError, match="no train split at .* to train a vocabulary on"):
        train_vocab_for_cache(tmp_path, splits=("train",))
