"""Each dataset's tasks read their own vocabulary, and a run refuses one that cannot read its
training text."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import gin
import pytest
import sentencepiece as spm
import seqio

import dsbs_jax.tasks  # noqa: F401  (registers the built-in datasets' tasks)
from dsbs_jax import train as train_cli
from dsbs_jax.data import cache, registration, vocab
from dsbs_jax.data.__main__ import main as data_main
from dsbs_jax.data.run_inputs import MAX_UNKNOWN_RATE, ensure_run_inputs, training_texts
from dsbs_jax.data.vocabularies import unknown_rate
from dsbs_jax.errors import EXIT_BAD_INPUT, MissingFileError
from dsbs_jax.roles import PREDICT_PREFIX, TaskKind
from tests.conftest import OFFICIAL_DATA, needs_official_data

DATASET, EXTRA, BARE = "vocabtest", "vocabtest_extra", "vocabtest_bare"
MIXTURE = registration.mixture_name(DATASET, "step_by_step")
LENGTHS = {"inputs": 64, "targets": 64}


def _records(prefix: str, n: int) -> list[cache.TeacherRecord]:
    """French questions: letters (é, è, ê, ù) the built-in arithmetic vocabulary lacks."""
    return [
        cache.TeacherRecord(
            id=f"{prefix}{i}",
            input=f"Où vit le castor numéro {i} ? Choix : forêt, rivière, désert",
            label="rivière",
            teacher_label="rivière",
            rationales=(f"Le castor {i} bâtit des barrages sur la rivière.",),
            teacher="test",
            parse_ok=True,
        )
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def data_root(builtin_cache_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in dataset, a made-up one with its own vocabulary, one to augment it with
    (no vocabulary) and one without a vocabulary."""
    root = tmp_path_factory.mktemp("dataset_vocabularies")
    shutil.copytree(builtin_cache_root / "synthetic", root / "synthetic")
    for name, prefix in ((DATASET, "q"), (EXTRA, "x"), (BARE, "b")):
        records = _records(prefix, 40)
        cache.write_splits(
            root / name, {"train": records, "valid": records[:8], "test": records[8:16]}
        )
        registration.register_dataset(name)
    vocab.write_dataset_vocab(root / DATASET)
    return root


@pytest.fixture
def bind(data_root: Path):
    """Binds gin as a run would: the caches under `data_root`, then `bindings`."""

    def bind_(**bindings: object) -> None:
        with gin.unlock_config():
            gin.bind_parameter("teacher_cache_root.path", str(data_root))
            for name, value in bindings.items():
                gin.bind_parameter(name, value)

    bind_()
    yield bind_
    gin.clear_config()


def _plain(path: Path) -> seqio.SentencePieceVocabulary:
    return seqio.SentencePieceVocabulary(str(path))


def test_each_dataset_reads_its_own_vocabulary_unless_vocabulary_path_is_set(data_root, bind):
    own = registration.task_vocabulary(MIXTURE)
    builtin = registration.task_vocabulary("dsbs_synthetic_step_by_step")
    assert own is registration.vocabulary(DATASET)
    assert own == _plain(data_root / DATASET / "spm.model")
    assert builtin == _plain(data_root / "synthetic" / "spm.model")
    assert own != builtin
    task = seqio.get_mixture_or_task(registration.task_name(DATASET, TaskKind.LABEL_GOLD))
    (example,) = list(task.get_dataset(LENGTHS, split="test", shuffle=False).take(1))
    assert (
        own.decode(example["inputs"].numpy().tolist()) == PREDICT_PREFIX + _records("q", 9)[8].input
    )

    bind(**{"vocabulary_file.path": str(data_root / "synthetic" / "spm.model")})
    assert registration.task_vocabulary(MIXTURE) == builtin


def test_missing_vocabulary_is_one_line_naming_it_and_its_command(data_root, bind):
    with pytest.raises(MissingFileError) as missing:
        registration.vocabulary(BARE).vocab_size  # noqa: B018
    folder = data_root / BARE
    assert str(missing.value) == (
        f"no SentencePiece vocabulary for {BARE} at {folder / 'spm.model'}; write it with "
        f"`python -m dsbs_jax.data vocab --cache {folder}`, or set VOCABULARY_PATH"
    )
    bind(**{"vocabulary_file.path": str(data_root / "nowhere.model")})
    with pytest.raises(MissingFileError) as missing:
        registration.vocabulary(BARE).vocab_size  # noqa: B018
    assert str(missing.value) == (
        f"no SentencePiece vocabulary at {data_root / 'nowhere.model'} (VOCABULARY_PATH); point "
        f"VOCABULARY_PATH at one, or set it to None for {BARE}'s own, which "
        f"`python -m dsbs_jax.data vocab --cache {folder}` writes"
    )


def test_augmentation_records_are_read_with_the_main_datasets_vocabulary(data_root, bind):
    bind(**{"unlabeled_augmentation.datasets": [EXTRA]})  # EXTRA has no vocabulary of its own
    rationale = seqio.get_mixture_or_task(registration.task_name(DATASET, TaskKind.RATIONALE))
    targets = {
        ex["id"].decode(): registration.vocabulary(DATASET).decode(ex["targets"].tolist())
        for ex in rationale.get_dataset(LENGTHS, split="train", shuffle=False).as_numpy_iterator()
    }
    assert targets[f"{EXTRA}/x3#r0"] == "Le castor 3 bâtit des barrages sur la rivière."
    assert len(targets) == 80
    texts = training_texts(MIXTURE)
    assert PREDICT_PREFIX + _records("x", 4)[3].input in texts and len(texts) == 80 * 4


def test_unknown_rate_is_the_share_of_unknown_pieces(data_root, bind):
    builtin = registration.vocabulary("synthetic")
    # "ж" is one word-start piece and one unknown piece; a run of unknowns is one piece.
    assert unknown_rate(builtin, ["ж", "жж"]) == 0.5
    assert unknown_rate(builtin, []) == 0.0
    assert unknown_rate(registration.vocabulary(DATASET), training_texts(MIXTURE)) == 0.0


def test_a_vocabulary_that_cannot_read_the_training_text_stops_the_run(
    data_root, bind, tmp_path, capsys
):
    ensure_run_inputs(MIXTURE)  # the dataset's own vocabulary reads all of it
    gin.clear_config()
    synthetic_vocab = data_root / "synthetic" / "spm.model"
    code = train_cli.main(
        [
            "--gin_file=runs/demo.gin",
            f"--gin.DATA_DIR='{data_root}'",
            f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
            f"--gin.MIXTURE_OR_TASK_NAME='{MIXTURE}'",
            f"--gin.VOCABULARY_PATH='{synthetic_vocab}'",
        ]
    )
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == EXIT_BAD_INPUT and len(lines) == 1, lines
    found = re.fullmatch(
        rf"error: the vocabulary {re.escape(str(synthetic_vocab))} turns (\d+\.\d\d)% of the "
        rf"training text of {MIXTURE} into unknown pieces \(at most 0\.5% may be\); set "
        r"VOCABULARY_PATH to one that covers it, .*",
        lines[0],
    )
    assert found and float(found.group(1)) > 100 * MAX_UNKNOWN_RATE, lines[0]
    assert not (tmp_path / "run").exists()


@needs_official_data
def test_prepared_cqa_writes_the_vocabulary_its_runs_read(tmp_path, capsys):
    argv = ["prepare", "--dataset", "cqa", "--source", str(OFFICIAL_DATA), "--out", str(tmp_path)]
    assert data_main(argv) == 0
    model = tmp_path / "cqa" / "spm.model"
    assert f"wrote the vocabulary {model}" in capsys.readouterr().out
    assert spm.SentencePieceProcessor(model_file=str(model)).get_piece_size() == 8000
    written = model.read_bytes()
    assert data_main(argv) == 0  # a second prepare keeps it
    assert f"kept the existing vocabulary {model}" in capsys.readouterr().out
    assert model.read_bytes() == written

    mixture = registration.mixture_name("cqa", "step_by_step")
    with gin.unlock_config():
        gin.bind_parameter("teacher_cache_root.path", str(tmp_path))
    try:
        assert registration.task_vocabulary(mixture) == _plain(model)
        ensure_run_inputs(mixture)
        # Every character of the train split has a piece: not one unknown, let alone 0.5%.
        assert unknown_rate(registration.task_vocabulary(mixture), training_texts(mixture)) == 0
    finally:
        gin.clear_config()
