"""The tasks' vocabularies: SentencePiece models whose paths are set by gin.

SeqIO tasks need a vocabulary object when they are registered, at import time,
while the path (the real T5 vocabulary on a TPU VM, a dataset's own trained one
offline, a Hugging Face `spiece.model`) is only known once gin has parsed the
command line. `GinSentencePieceVocabulary` asks gin for the path whenever it is
used and reloads if the answer changed. Each dataset has one: with
VOCABULARY_PATH unset it reads its own dataset's `<DATA_DIR>/<dataset>/spm.model`,
with it set they all read that one file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gin
import seqio

from dsbs_jax.data.sources import teacher_cache_root
from dsbs_jax.data.synthetic import DATASET_NAME as BUILTIN_DATASET
from dsbs_jax.data.vocab import VOCAB_FILENAME
from dsbs_jax.errors import MissingFileError


@gin.configurable
def vocabulary_file(dataset: str, path: str | None = None, extra_ids: int = 0) -> tuple[str, int]:
    """(SentencePiece model path, extra sentinel ids) of `dataset`'s tasks; gin:
    `vocabulary_file.path` (VOCABULARY_PATH), one file for every dataset.

    Defaults to the dataset's own vocabulary, `<teacher_cache_root>/<dataset>/spm.model`.
    """
    if path is None:
        path = str(teacher_cache_root() / dataset / VOCAB_FILENAME)
    return path, extra_ids


def _missing_vocabulary(path: str, dataset: str) -> str:
    """The one line for an absent vocabulary: the path and the command that writes it."""
    own = teacher_cache_root() / dataset
    if dataset == BUILTIN_DATASET:
        write = f"`python -m dsbs_jax.data synthetic --out {own.parent}`"
    else:  # `prepare` and the teacher stage write it too
        write = f"`python -m dsbs_jax.data vocab --cache {own}`"
    if Path(path) != own / VOCAB_FILENAME:
        return (
            f"no SentencePiece vocabulary at {path} (VOCABULARY_PATH); point VOCABULARY_PATH at "
            f"one, or set it to None for {dataset}'s own, which {write} writes"
        )
    return (
        f"no SentencePiece vocabulary for {dataset} at {path}; write it with {write}, "
        "or set VOCABULARY_PATH"
    )


class GinSentencePieceVocabulary(seqio.SentencePieceVocabulary):
    """A seqio.SentencePieceVocabulary of `dataset`'s tasks that reads `vocabulary_file()`
    when used.

    It compares equal to a plain SentencePieceVocabulary of the same file, which is what
    t5x checks between a task's vocabulary and its model's: its state (what seqio
    compares) is a plain one's, and a copy or pickle is rebuilt from the dataset's name.
    """

    def __init__(self, dataset: str) -> None:
        super().__init__(sentencepiece_model_file=None)
        self._dataset = dataset

    def _follow_gin(self) -> None:
        path, extra_ids = vocabulary_file(self._dataset)
        if (path, extra_ids) != (self._sentencepiece_model_file, self._extra_ids):
            if "://" not in path and not os.path.isfile(path):
                raise MissingFileError(_missing_vocabulary(path, self._dataset))
            self._sentencepiece_model_file, self._extra_ids, self._model = path, extra_ids, None

    def _model_context(self) -> Any:
        self._follow_gin()
        return super()._model_context()

    @property
    def extra_ids(self) -> int:
        self._follow_gin()
        return self._extra_ids

    @property
    def sentencepiece_model_file(self) -> str:
        self._follow_gin()
        return self._sentencepiece_model_file

    def __getstate__(self) -> dict:
        self._follow_gin()
        state = super().__getstate__()
        del state["_dataset"]
        return state

    def __reduce__(self) -> tuple:
        return type(self), (self._dataset,)


def unknown_rate(vocabulary: seqio.SentencePieceVocabulary, texts: Sequence[str]) -> float:
    """The share of the pieces `vocabulary` cuts `texts` into that are its unknown piece."""
    tokenizer = vocabulary.tokenizer
    encoded = tokenizer.encode(list(texts))
    total = sum(map(len, encoded))
    unknown = sum(ids.count(tokenizer.unk_id()) for ids in encoded)
    return unknown / total if total else 0.0
