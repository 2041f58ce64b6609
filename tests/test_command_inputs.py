"""Every command's missing inputs and misspelt settings: one line naming the thing, exit 2.

(The built-in default that just runs, writing its dataset first, is the installed wheel's demo
in `tests/test_package.py`.)
"""

from __future__ import annotations

from pathlib import Path

import gin
import pytest

from dsbs_jax import convert, sweep, teacher
from dsbs_jax import eval as eval_cli
from dsbs_jax import infer as infer_cli
from dsbs_jax import train as train_cli
from dsbs_jax.gin_utils import EXIT_BAD_INPUT, parse_gin, split_gin_flags


@pytest.fixture(autouse=True)
def _fresh_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _demo(data_dir: Path, model_dir: Path, *extra: str) -> list[str]:
    return [
        "--gin_file=runs/demo.gin",
        f"--gin.DATA_DIR='{data_dir}'",
        f"--gin.MODEL_DIR='{model_dir}'",
        *extra,
    ]


def _error_lines(capsys: pytest.CaptureFixture) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize(
    "flag,message",
    [
        (
            "--gin.TRAIN_STEP=100",
            "--gin.TRAIN_STEP: no gin file or binding uses the macro 'TRAIN_STEP': "
            "did you mean 'TRAIN_STEPS'?",
        ),
        (
            "--gin.train.eval_perod=3",
            "--gin.train.eval_perod: 'train' has no parameter 'eval_perod': "
            "did you mean 'eval_period'?",
        ),
        (
            "--gin.t5_config.emb_dimm=64",
            "--gin.t5_config.emb_dimm: 't5_config' has no parameter 'emb_dimm': "
            "did you mean 'emb_dim'?",
        ),
        (
            "--gin.trian.eval_period=3",
            "--gin.trian.eval_period: no configurable 'trian': did you mean 'train'?",
        ),
    ],
    ids=["macro", "parameter", "t5_config-field", "configurable"],
)
def test_misspelt_setting_is_refused_with_a_suggestion_before_any_data(
    tmp_path, capsys, flag, message
):
    data_dir = tmp_path / "data"  # the demo would write its dataset here once it starts
    code = train_cli.main(_demo(data_dir, tmp_path / "run", flag))
    assert code == EXIT_BAD_INPUT
    assert _error_lines(capsys) == [f"error: bad gin configuration: {message}"]
    assert not data_dir.exists() and not (tmp_path / "run").exists()


def test_command_line_macros_that_the_config_reads_are_accepted():
    bindings, _ = split_gin_flags(["--gin.EVAL_PERIOD=5", "--gin.train.log_period=2"])
    parse_gin(["runs/demo.gin"], bindings, [])
    assert gin.query_parameter("EVAL_PERIOD/macro.value") == 5
    assert gin.query_parameter("train.log_period") == 2


def _missing_cases(tmp: Path) -> dict[str, tuple]:
    """command -> (main, argv, the missing path its error must name)."""
    nothing = tmp / "no_such_run"
    cqa_demo = ["--gin.MIXTURE_OR_TASK_NAME='dsbs_cqa_step_by_step'"]
    return {
        "train": (
            train_cli.main,
            _demo(tmp / "data", tmp / "run", *cqa_demo),
            tmp / "data" / "cqa" / "train.jsonl",
        ),
        "eval": (eval_cli.main, _demo(tmp / "data", nothing), nothing),
        "infer": (infer_cli.main, _demo(tmp / "data", nothing), nothing),
        "sweep": (
            sweep.main,
            [
                "--gin_file=sweeps/synthetic_data_efficiency.gin",
                f"--gin.DATA_DIR='{tmp / 'data'}'",
                f"--gin.MODEL_DIR='{tmp / 'sweep'}'",
                *cqa_demo,
                "--methods=dsbs",
            ],
            tmp / "data" / "cqa" / "train.jsonl",
        ),
        "convert": (
            convert.main,
            ["--from", str(nothing), "--to", str(tmp / "out"), "--format", "hf"],
            nothing,
        ),
        "teacher": (
            teacher.main,
            [
                "--dataset",
                str(tmp / "inputs.jsonl"),
                "--prompt=cqa",
                "--endpoint=http://127.0.0.1:9",
                "--model=m",
                f"--out={tmp / 'cache'}",
            ],
            tmp / "inputs.jsonl",
        ),
    }


@pytest.mark.parametrize("command", ["train", "eval", "infer", "sweep", "convert", "teacher"])
def test_missing_input_is_one_line_naming_its_path(tmp_path, capsys, command):
    main, argv, missing = _missing_cases(tmp_path)[command]
    code = main(argv)
    lines = _error_lines(capsys)
    assert code == EXIT_BAD_INPUT, lines
    assert len(lines) == 1 and "error: " in lines[0] and str(missing) in lines[0], lines


def test_missing_vocabulary_names_the_command_that_writes_it(tmp_path, capsys):
    vocab = tmp_path / "spm.model"
    code = train_cli.main(
        _demo(tmp_path / "data", tmp_path / "run", f"--gin.VOCABULARY_PATH='{vocab}'")
    )
    # The built-in dataset is written first (its own vocabulary is not the one asked for).
    lines = [line for line in _error_lines(capsys) if not line.startswith("writing the built-in")]
    assert code == EXIT_BAD_INPUT
    assert len(lines) == 1 and str(vocab) in lines[0] and "python -m dsbs_jax.data" in lines[0]
