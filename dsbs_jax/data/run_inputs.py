"""What a run reads, made or checked before anything heavy starts.

The built-in dataset appears on first use, so the default run needs no preparation step:
`python -m dsbs_jax.train --gin_file=runs/demo.gin` on a fresh machine writes the synthetic
word problems and their vocabulary under DATA_DIR, as `python -m dsbs_jax.data synthetic
--out <DATA_DIR>` would, and says so in one line. Any other missing cache or vocabulary is
one error naming its path and the command that makes it. A vocabulary that turns more than
0.5% of the run's training text into unknown pieces (the built-in dataset's arithmetic
vocabulary on cqa: 4.49%) is refused too: the student could not read what it trains on.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import seqio

from dsbs_jax.data import cache, prepare, synthetic, vocab
from dsbs_jax.data.registration import task_vocabulary
from dsbs_jax.data.sources import (
    TEACHER,
    TeacherCacheSource,
    load_split,
    rationale_selection,
    require_split_file,
    teacher_cache_root,
    teacher_cache_tfds_dir,
    unlabeled_augmentation,
)
from dsbs_jax.data.vocabularies import unknown_rate, vocabulary_file
from dsbs_jax.errors import UserError
from dsbs_jax.roles import PREDICT_PREFIX

# The largest share of a run's training text (its pieces) the vocabulary may leave unknown.
MAX_UNKNOWN_RATE = 0.005


def _sources(mixture_or_task_name: str) -> list[TeacherCacheSource]:
    found = seqio.get_mixture_or_task(mixture_or_task_name)
    tasks = found.tasks if isinstance(found, seqio.Mixture) else [found]
    return [t.source for t in tasks if isinstance(t.source, TeacherCacheSource)]


def cache_dirs(mixture_or_task_name: str) -> set[Path]:
    """The teacher cache folders that the mixture's (or the task's) sources read."""
    return {source.dataset_dir for source in _sources(mixture_or_task_name)}


def ensure_run_inputs(mixture_or_task_name: str, split: str | None = "train") -> None:
    """Writes the built-in dataset if the run needs it, then checks the caches and vocabulary.

    Raises a UserError naming an unknown mixture, a missing file and the command that makes
    it, or a vocabulary that leaves more than MAX_UNKNOWN_RATE of the training text unknown
    (checked on the JSON-lines caches; not with TFDS_DATA_DIR, whose hosts may not have them).
    Only a single-process run writes the built-in dataset: on a pod every host would race for
    the same files, so there a missing file stays an error.
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
        if split == "train":
            _check_unknown_rate(mixture_or_task_name)
    task_vocabulary(mixture_or_task_name).vocab_size  # noqa: B018  (a missing file raises)


def training_texts(mixture_or_task_name: str) -> list[str]:
    """The train split's texts that the run's tasks tokenize, read from the caches: inputs
    (with the `predict: ` prefix), gold and teacher labels, the rationales MAX_RATIONALES
    keeps, and the same of UNLABELED_DATASETS when a task learns teacher outputs.

    All records of the split: TRAIN_FRACTION and the filters only ever keep fewer.
    """
    sources = _sources(mixture_or_task_name)
    folders = {source.dataset_dir for source in sources}
    if any(source.audience == TEACHER for source in sources):
        folders |= {teacher_cache_root() / name for name in unlabeled_augmentation()}
    keep = rationale_selection().max_rationales_per_example
    return [
        text
        for folder in sorted(folders)
        for r in load_split(folder, "train")
        for text in (PREDICT_PREFIX + r.input, r.label, r.teacher_label, *r.rationales[:keep])
    ]


def _check_unknown_rate(mixture_or_task_name: str) -> None:
    vocabulary = task_vocabulary(mixture_or_task_name)
    rate = unknown_rate(vocabulary, training_texts(mixture_or_task_name))
    if rate > MAX_UNKNOWN_RATE:
        raise UserError(
            f"the vocabulary {vocabulary.sentencepiece_model_file} turns {rate:.2%} of the "
            f"training text of {mixture_or_task_name} into unknown pieces (at most "
            f"{MAX_UNKNOWN_RATE:.1%} may be); set VOCABULARY_PATH to one that covers it, or to "
            "None for each dataset's own <DATA_DIR>/<dataset>/spm.model (`python -m "
            "dsbs_jax.data vocab --cache <DATA_DIR>/<dataset>` writes it)"
        )


def _write_builtin_if_missing(folder: Path) -> None:
    vocab_file = folder / vocab.VOCAB_FILENAME
    needs_data = not cache.available_splits(folder)
    needs_vocab = (
        Path(vocabulary_file(synthetic.DATASET_NAME)[0]) == vocab_file and not vocab_file.is_file()
    )
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
