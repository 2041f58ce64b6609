"""The tasks' vocabulary: a SentencePiece model whose path is set by gin.

SeqIO tasks need a vocabulary object when they are registered, at import time,
while the path (the real T5 vocabulary on a TPU VM, a small trained one
offline, a Hugging Face `spiece.model`) is only known once gin has parsed the
command line. `GinSentencePieceVocabulary` asks gin for the path whenever it is
used and reloads if the answer changed.
"""

from __future__ import annotations

import os
from typing import Any

import gin
import seqio

from dsbs_jax.data.sources import teacher_cache_root
from dsbs_jax.data.synthetic import DATASET_NAME as BUILTIN_DATASET
from dsbs_jax.data.vocab import VOCAB_FILENAME
from dsbs_jax.errors import MissingFileError


@gin.configurable
def vocabulary_file(path: str | None = None, extra_ids: int = 0) -> tuple[str, int]:
    """(SentencePiece model path, extra sentinel ids); gin: `vocabulary_file.path`.

    Defaults to the vocabulary trained for the built-in dataset,
    `<teacher_cache_root>/synthetic/spm.model`.
    """
    if path is None:
        path = str(teacher_cache_root() / BUILTIN_DATASET / VOCAB_FILENAME)
    return path, extra_ids


class GinSentencePieceVocabulary(seqio.SentencePieceVocabulary):
    """A seqio.SentencePieceVocabulary that reads `vocabulary_file()` when used.

    It compares equal to a plain SentencePieceVocabulary of the same file, which
    is what t5x checks between a task's vocabulary and its model's.
    """

    def __init__(self) -> None:
        super().__init__(sentencepiece_model_file=None)

    def _follow_gin(self) -> None:
        path, extra_ids = vocabulary_file()
        if (path, extra_ids) != (self._sentencepiece_model_file, self._extra_ids):
            if "://" not in path and not os.path.isfile(path):
                raise MissingFileError(
                    f"no SentencePiece vocabulary at {path}; write it with `python -m "
                    "dsbs_jax.data vocab --cache <DATA_DIR>/<dataset>` (`python -m dsbs_jax.data "
                    "synthetic --out <DATA_DIR>` for the built-in one) or set VOCABULARY_PATH"
                )
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
        return super().__getstate__()
