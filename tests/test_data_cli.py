"""`python -m dsbs_jax.data`: conversion of the official archive, errors, the built-in data."""

from __future__ import annotations

import json
import subprocess
import sys

import sentencepiece as spm

from dsbs_jax.data import cache
from dsbs_jax.data.__main__ import main
from tests.conftest import OFFICIAL_DATA, needs_official_data


@needs_official_data
def test_prepare_svamp_counts_and_teacher_accuracy(tmp_path, capsys):
    assert (
        main(
            [
                "prepare",
                "--dataset",
                "svamp",
                "--source",
                str(OFFICIAL_DATA),
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "test        200     198           2  74.00%  (no_answer_marker: 2)" in out
    sizes = {s: len(cache.read_records(tmp_path / "svamp" / f"{s}.jsonl")) for s in cache.SPLITS}
    assert sizes == {"train": 720, "valid": 80, "test": 200}
    info = json.loads((tmp_path / "svamp" / "dataset_info.json").read_text())
    assert info["metric"] == "equation_accuracy"
    assert info["splits"]["train"]["unparseable"] == {"no_answer_marker": 10, "no_label": 2}


@needs_official_data
def test_prepare_cqa_teacher_test_accuracy(tmp_path, capsys):
    assert (
        main(
            ["prepare", "--dataset", "cqa", "--source", str(OFFICIAL_DATA), "--out", str(tmp_path)]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "test       1221    1196          25  78.21%  (multiple_answers: 25)" in out
    train = cache.read_records(tmp_path / "cqa" / "train.jsonl")
    valid = cache.read_records(tmp_path / "cqa" / "valid.jsonl")
    assert (len(train), len(valid)) == (8766, 975)
    assert {r.id for r in train}.isdisjoint(r.id for r in valid)


def test_missing_source_is_one_clear_line(tmp_path, capsys):
    code = main(
        [
            "prepare",
            "--dataset",
            "cqa",
            "--source",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert (
        err == f"error: no official data for 'cqa': {tmp_path / 'nope' / 'cqa'} is not a directory"
    )


def _official_layout(root, rows, outputs):
    (root / "anli1" / "llm").mkdir(parents=True)
    (root / "anli1" / "anli1_test.json").write_text("\n".join(rows) + "\n")
    (root / "anli1" / "llm" / "test_CoT_0.json").write_text(json.dumps(outputs))


def test_malformed_row_names_file_and_line(tmp_path, capsys):
    good = json.dumps({"uid": "u1", "premise": "p", "hypothesis": "h", "label": 0})
    _official_layout(tmp_path, [good, "{oops"], ["r. So the answer is neutral.", "x"])
    assert (
        main(
            [
                "prepare",
                "--dataset",
                "anli1",
                "--source",
                str(tmp_path),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "anli1_test.json:2: not valid JSON" in err


def test_misaligned_teacher_outputs_are_refused(tmp_path, capsys):
    row = json.dumps({"uid": "u1", "premise": "p", "hypothesis": "h", "label": "2"})
    _official_layout(tmp_path, [row], ["a", "b"])
    assert (
        main(
            [
                "prepare",
                "--dataset",
                "anli1",
                "--source",
                str(tmp_path),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    assert "2 teacher outputs for 1 examples" in capsys.readouterr().err


def test_numeric_string_nli_labels_and_separator(tmp_path, capsys):
    row = json.dumps(
        {"uid": "u1", "premise": "A dog runs.", "hypothesis": "An animal moves.", "label": "0"}
    )
    _official_layout(
        tmp_path, [row], ["Dogs are animals. So the answer is entailment.\n\nPremise:"]
    )
    assert (
        main(
            [
                "prepare",
                "--dataset",
                "anli1",
                "--source",
                str(tmp_path),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    (record,) = cache.read_records(tmp_path / "out" / "anli1" / "test.jsonl")
    assert record.input == "A dog runs.</s>An animal moves."
    assert (record.label, record.teacher_label, record.rationales) == (
        "entailment",
        "entailment",
        ("Dogs are animals.",),
    )


def test_synthetic_command_writes_cache_and_vocabulary(tmp_path, capsys):
    assert (
        main(
            [
                "synthetic",
                "--out",
                str(tmp_path),
                "--num-train",
                "60",
                "--num-valid",
                "10",
                "--num-test",
                "10",
                "--vocab-size",
                "128",
            ]
        )
        == 0
    )
    folder = tmp_path / "synthetic"
    assert [len(cache.read_records(folder / f"{s}.jsonl")) for s in cache.SPLITS] == [60, 10, 10]
    assert (folder / "spm.model").stat().st_size > 0
    assert "synthetic:" in capsys.readouterr().out


def test_vocab_command_on_empty_folder_fails_clearly(tmp_path, capsys):
    assert main(["vocab", "--cache", str(tmp_path)]) == 2
    assert f"no <split>.jsonl teacher cache files in {tmp_path}" in capsys.readouterr().err


def test_module_entry_point_exit_code(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsbs_jax.data",
            "prepare",
            "--dataset",
            "svamp",
            "--source",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: no official data")


def test_asdiv_layout(tmp_path, capsys):
    rows = [
        {
            "Body": "Tom has 3 apples.",
            "Question": "He eats 1. How many are left?",
            "Formula": "3-1=2",
            "Answer": "2 (apples)",
        }
    ]
    (tmp_path / "asdiv" / "llm").mkdir(parents=True)
    (tmp_path / "asdiv" / "asdiv_test.json").write_text(json.dumps(rows[0]) + "\n")
    (tmp_path / "asdiv" / "llm" / "test_CoT_0.json").write_text(
        json.dumps(["He has 3 - 1 = 2. The answer is (3 - 1).\n\nQ: more"])
    )
    assert (
        main(
            [
                "prepare",
                "--dataset",
                "asdiv",
                "--source",
                str(tmp_path),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    (record,) = cache.read_records(tmp_path / "out" / "asdiv" / "test.jsonl")
    assert (record.input, record.label, record.teacher_label) == (
        "Tom has 3 apples.\nHe eats 1. How many are left?",
        "2",
        "(3 - 1)",
    )
    assert "100.00%" in capsys.readouterr().out


@needs_official_data
def test_prepare_writes_the_vocabulary_unless_told_not_to(tmp_path, capsys):
    argv = ["prepare", "--dataset", "svamp", "--source", str(OFFICIAL_DATA), "--out", str(tmp_path)]
    model = tmp_path / "svamp" / "spm.model"
    assert main([*argv, "--no-vocab"]) == 0
    assert not model.exists() and "vocabulary" not in capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote the vocabulary {model}"
    # svamp's 720 training inputs support 1003 pieces, fewer than the 8000 asked for.
    assert spm.SentencePieceProcessor(model_file=str(model)).get_piece_size() == 1003


def test_prepare_of_a_cache_without_train_split_says_it_wrote_no_vocabulary(tmp_path, capsys):
    row = json.dumps({"uid": "u1", "premise": "p", "hypothesis": "h", "label": 0})
    _official_layout(tmp_path, [row], ["r. So the answer is entailment."])
    argv = ["prepare", "--dataset", "anli1", "--source", str(tmp_path), "--out", str(tmp_path)]
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"wrote no vocabulary: {tmp_path / 'anli1'} has no train split to learn one from "
        "(runs on it need VOCABULARY_PATH)"
    )


def test_vocab_command_trains_on_train_and_says_what_it_replaced(tmp_path, capsys):
    from dsbs_jax.data import synthetic

    folder, model = tmp_path / "mydata", tmp_path / "mydata" / "spm.model"
    config = synthetic.SyntheticConfig(num_train=60, num_valid=10, num_test=10)
    cache.write_splits(folder, synthetic.generate(config))
    assert main(["vocab", "--cache", str(folder)]) == 0
    assert capsys.readouterr().out == f"wrote {model}\n"
    assert main(["vocab", "--cache", str(folder)]) == 0
    assert capsys.readouterr().out == f"wrote {model} (the same as the one it replaced)\n"
    cache.write_splits(folder, {"train": synthetic.generate(config)["test"]})
    assert main(["vocab", "--cache", str(folder)]) == 0
    assert capsys.readouterr().out == (
        f"wrote {model}, replacing a different one: models trained with that no longer match\n"
    )
    (folder / "train.jsonl").unlink()
    assert main(["vocab", "--cache", str(folder)]) == 2
    assert f"no train split at {folder / 'train.jsonl'}" in capsys.readouterr().err
