"""Train a dataset's own SentencePiece vocabulary from its teacher cache, for offline runs.

The pretrained T5 vocabulary needs a download and has 32k pieces, far more than a
student trained from scratch on one dataset can use. This trains one in the id
layout seqio and T5 expect (pad 0, eos 1, unk 2, no bos), with digits split into
single pieces so every number is spelt digit by digit, the same way in inputs,
rationales and labels.

A real dataset's vocabulary (`write_dataset_vocab`) learns from its train split
only, the text the student trains on, so test text never shapes it; measured on
cqa, 8000 pieces (the corpus supports 12,726) leave no unknown piece in train or
test and spend 42.6 tokens on a training input (40.8 at 12,726, 47.5 at 4000).
"""

from __future__ import annotations

import collections
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from dsbs_jax.data import cache
from dsbs_jax.errors import MissingFileError, UserError
from dsbs_jax.roles import EXPLAIN_PREFIX, PREDICT_PREFIX

logger = logging.getLogger(__name__)

VOCAB_FILENAME = "spm.model"
# A real dataset's vocabulary size; a corpus that supports fewer pieces gets as many as it does.
DATASET_VOCAB_SIZE = 8000
# The splits a real dataset's vocabulary learns from.
DATASET_VOCAB_SPLITS = ("train",)
TASK_PREFIXES = (PREDICT_PREFIX, EXPLAIN_PREFIX)
_SEED = 0
_MAX_PIECE_LENGTH = 16
_WORD_START = "\u2581"  # how SentencePiece marks the whitespace before a word
# SentencePiece's complaint when a corpus supports fewer pieces than asked for.
_TOO_HIGH = re.compile(r"vocabulary size (?:is )?too high.*?<= ?(\d+)", re.IGNORECASE | re.DOTALL)


def _write_seed_pieces(corpus: list[str], path: Path) -> None:
    """Writes every within-word substring with its frequency, as the unigram trainer's seeds.

    SentencePiece seeds its unigram model only with substrings that are followed by more
    than one distinct character. In text as regular as the synthetic task's, a frequent
    word such as "has" is always followed by a space, so only "has " would qualify, and
    that crosses a word boundary and is dropped: the word never gets a piece. Seeding
    with all substrings of words (ranked, as SentencePiece does, by frequency times
    length) lets whole words win.
    """
    words = collections.Counter(word for text in corpus for word in text.split())
    seeds: collections.Counter[str] = collections.Counter()
    for word, count in words.items():
        marked = _WORD_START + word
        for start in range(len(marked)):
            for end in range(start + 2, min(len(marked), start + _MAX_PIECE_LENGTH) + 1):
                seeds[marked[start:end]] += count
    with path.open("w", encoding="utf-8") as f:
        f.writelines(f"{piece}\t{count}\n" for piece, count in sorted(seeds.items()))


def _train(corpus: list[str], model_prefix: str, seeds: Path, vocab_size: int) -> None:
    spm.set_random_generator_seed(_SEED)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type="unigram",
        seed_sentencepieces_file=str(seeds),
        max_sentencepiece_length=_MAX_PIECE_LENGTH,
        character_coverage=1.0,
        split_digits=True,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )


def _drop_temp_paths(model_file: Path) -> None:
    """Clears the temporary paths SentencePiece records in the model, so equal corpora give
    byte-identical models wherever they are trained."""
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(model_file.read_bytes())
    model.trainer_spec.ClearField("model_prefix")
    model.trainer_spec.ClearField("seed_sentencepieces_file")
    model_file.write_bytes(model.SerializeToString())


def train_sentencepiece(
    texts: Iterable[str], model_prefix: str | os.PathLike, vocab_size: int = 256
) -> Path:
    """Trains `<model_prefix>.model` and `.vocab`; returns the `.model` path.

    A corpus too small for `vocab_size` is retried once at the largest size it supports,
    so tiny test caches still get a vocabulary. Training is single-threaded with a fixed
    seed, so the same corpus gives a byte-identical model, and the files are renamed into
    place only when complete.
    """
    corpus = [t for t in texts if t]
    if not corpus:
        raise UserError("cannot train a SentencePiece model on an empty corpus")
    target = Path(model_prefix)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tmp_prefix = str(tmp_dir / "spm")
        seeds = tmp_dir / "seeds.tsv"
        _write_seed_pieces(corpus, seeds)
        try:
            _train(corpus, tmp_prefix, seeds, vocab_size)
        except RuntimeError as e:
            match = _TOO_HIGH.search(str(e))
            if match is None:
                raise
            supported = int(match.group(1))
            logger.warning(
                "corpus supports at most %d SentencePiece pieces, not %d; training with %d",
                supported,
                vocab_size,
                supported,
            )
            _train(corpus, tmp_prefix, seeds, supported)
        _drop_temp_paths(Path(tmp_prefix + ".model"))
        model_path = target.with_name(target.name + ".model")
        os.replace(tmp_prefix + ".vocab", target.with_name(target.name + ".vocab"))
        os.replace(tmp_prefix + ".model", model_path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return model_path


def cache_texts(cache_dir: str | os.PathLike, splits: Sequence[str] | None = None) -> Iterator[str]:
    """Every text a model will see from the cache's `splits` (None: all it has), task
    prefixes included.

    Inputs come bare and with each task prefix, so "predict:" and "explain:" get pieces.
    """
    present = cache.available_splits(cache_dir)
    if not present:
        raise MissingFileError(f"no split files ({', '.join(cache.SPLITS)}) in {cache_dir}")
    for split in present if splits is None else splits:
        path = cache.split_path(cache_dir, split)
        if not path.is_file():
            raise MissingFileError(f"no {split} split at {path} to train a vocabulary on")
        for record in cache.iter_records(path):
            yield record.input
            for prefix in TASK_PREFIXES:
                yield prefix + record.input
            yield record.label
            yield record.teacher_label
            yield from record.rationales


def train_vocab_for_cache(
    cache_dir: str | os.PathLike, vocab_size: int = 256, splits: Sequence[str] | None = None
) -> Path:
    """Writes `<cache_dir>/spm.model` (and `spm.vocab`) trained on the texts of `splits`
    (None: every split the cache has, as the built-in dataset's vocabulary is trained).

    The synthetic task's words are so few that a unigram model runs out of useful pieces
    at about 145 (one a word, plus characters); asking for more retries at that size.
    """
    prefix = Path(cache_dir) / Path(VOCAB_FILENAME).stem
    return train_sentencepiece(cache_texts(cache_dir, splits), prefix, vocab_size)


def write_dataset_vocab(cache_dir: str | os.PathLike, vocab_size: int = DATASET_VOCAB_SIZE) -> str:
    """Trains the dataset's vocabulary `<cache_dir>/spm.model` on its train split unless the
    folder has one already; returns one line saying what it did.

    An existing vocabulary is kept, never replaced: the token ids of every model trained
    with it depend on it. `python -m dsbs_jax.data vocab` replaces it on request.
    """
    model = Path(cache_dir) / VOCAB_FILENAME
    if model.is_file():
        return (
            f"kept the existing vocabulary {model} (models trained with it depend on its ids; "
            f"`python -m dsbs_jax.data vocab --cache {cache_dir}` retrains it)"
        )
    if not all(cache.split_path(cache_dir, s).is_file() for s in DATASET_VOCAB_SPLITS):
        return (
            f"wrote no vocabulary: {cache_dir} has no train split to learn one from "
            "(runs on it need VOCABULARY_PATH)"
        )
    trained = train_vocab_for_cache(cache_dir, vocab_size, DATASET_VOCAB_SPLITS)
    return f"wrote the vocabulary {trained}"
