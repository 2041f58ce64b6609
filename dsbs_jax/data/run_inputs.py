"""What a run reads, made or checked before anything heavy starts.

The built-in dataset appears on first use, so the default run needs no preparation step:
`python -m dsbs_jax.train --gin_file=runs/demo.gin` on a fresh machine writes the synthetic
word problems and their vocabulary under DATA_DIR, as `python -m dsbs_jax.data synthetic
--out <DATA_DIR>` would, and says so in one line. Any other missing cache or vocabulary is
one error naming its path and the command that makes it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import seqio

from dsbs_jax.data import cache, prepare, synthetic, vocab
from dsbs_jax.data.sources import (
    TeacherCacheSource,
    require_split_file,
    teacher_cache_root,
    teacher_cache_tfds_dir,
)
from dsbs_jax.data.vocabularies import vocabulary_file
from dsbs_jax.errors import UserError


def cache_dirs(mixture_or_task_name: str) -> set[Path]:
    """The teacher cache folders that the mixture's (or the task's) sources read."""
    found = seqio.get_mixture_or_task(mixture_or_task_name)
    tasks = found.tasks if isinstance(found, seqio.Mixture) else [found]
    return {t.source.dataset_dir for t in tasks if isinstance(t.source, TeacherCacheSource)}


def ensure_run_inputs(mixture_or_task_name: str, split: str | None = "train") -> None:
    """Writes the built-in dataset if the run needs it, then checks the caches and vocabulary.

    Raises a UserError naming an unknown mixture, or a missing file and the command that makes
    it. Only a single-process run writes the built-in dataset: on a pod every host would race
    for the same files, so there a missing file stays an error.
    """
    try:
        seqio.get_mixture_or_task(mixture_or_task_name)
    except ValueError as e:  # seqio's "No Task or Mixture found with name ..."
        raise UserError(f"{e}; is MIXTURE_OR_TASK_NAME spelt right?") from None
    folders = cache_dirs(mixture_or_task_name)
    if teacher_cache_tfds_dir() is None:
        builtin = teacher_cache_root() / synthetic.DATASET_NAME
        if builtin in folders and jax.process_count() == 1:
            _write_builtin_if_missing(builtin)
        for folder in sorted(folders) if split else ():
            require_split_file(folder, split)
    vocabulary = seqio.get_mixture_or_task(mixture_or_task_name).output_features["targets"]
    vocabulary.vocabulary.vocab_size  # noqa: B018  (loads it: a missing file raises here)


def _write_builtin_if_missing(folder: Path) -> None:
    vocab_file = folder / vocab.VOCAB_FILENAME
    needs_data = not cache.available_splits(folder)
    needs_vocab = Path(vocabulary_file()[0]) == vocab_file and not vocab_file.is_file()
    if not (needs_data or needs_vocab):
        return
    what = "dataset and vocabulary" if needs_data else "vocabulary"
    print(
        f"writing the built-in {what} to {folder} (as `python -m dsbs_jax.data synthetic "
        f"--out {folder.parent}` does)",
        file=sys.stderr,
    )
    if needs_data:
        prepare.write_synthetic(folder.parent)
    else:
        vocab.train_vocab_for_cache(folder, vocab_size=prepare.SYNTHETIC_VOCAB_SIZE)
