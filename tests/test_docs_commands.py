"""The docs stay runnable as written: every command block of README.md and docs/*.md that
calls `python -m dsbs_jax.{train,eval,infer,sweep,aot}` passes `--check` with the command's own
gin files and flags, plus overrides that point it at this test's data and folders and shrink
the model for the checkpoint that eval and infer need."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import gin
import pytest
from conftest import OFFICIAL_DATA

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PROGRAMS = ("train", "eval", "infer", "sweep", "aot")
COMMAND = re.compile(rf"python -m dsbs_jax\.({'|'.join(PROGRAMS)})\b")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
# Official datasets whose caches the test prepares when the official outputs are present.
OFFICIAL = ("cqa", "svamp")


def documented_commands() -> list[tuple[str, int, str, list[str]]]:
    """(file, line, program, argv after `python -m dsbs_jax.<program>`) of every command in a
    shell block; continued lines joined, anything after `&&`, `|` or `;` left out."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for block in FENCE.finditer(text):
            if block.group(1) not in ("", "bash", "sh", "shell", "console"):
                continue
            start = text[: block.start(2)].count("\n") + 1
            joined = block.group(2).replace("\\\n", " ")
            for offset, line in enumerate(joined.splitlines()):
                match = COMMAND.search(line)
                if not match:
                    continue
                rest = re.split(r"\s(?:&&|\||;)\s", line[match.end() :])[0]
                argv = [a for a in shlex.split(rest, comments=True)]
                found.append((path.name, start + offset, match.group(1), argv))
    return found


COMMANDS = documented_commands()


def test_the_docs_hold_commands_of_every_program():
    assert {program for _, _, program, _ in COMMANDS} == set(PROGRAMS)


@pytest.fixture(scope="module")
def data_root(builtin_cache_root, tmp_path_factory) -> Path:
    """The built-in cache and, when the official outputs are here, cqa and svamp prepared."""
    from dsbs_jax.data import prepare

    root = tmp_path_factory.mktemp("docs_data")
    (root / "synthetic").symlink_to(builtin_cache_root / "synthetic")
    if (OFFICIAL_DATA / "cqa").is_dir():
        for name in OFFICIAL:
            prepare.prepare_official(OFFICIAL_DATA, name, root)
    return root


def _dataset(argv: list[str]) -> str:
    """The dataset a command's run file trains on ('synthetic' for the demo)."""
    for arg in argv:
        match = re.search(r"runs/(\w+?)_(step_by_step|distill|finetune|single_task)", arg)
        if match:
            return match.group(1)
    return "synthetic"


def _write_checkpoint(argv: list[str], model_dir: Path) -> None:
    """A checkpoint of the command's model shrunk to the tiny preset, for eval and infer."""
    from dsbs_jax import training
    from dsbs_jax.checkpoints import Checkpointer
    from dsbs_jax.gin_utils import parse_gin, split_gin_flags

    bindings, rest = split_gin_flags(argv)
    files = [a.split("=", 1)[1] for a in rest if a.startswith("--gin_file=")]
    try:
        parse_gin(files, bindings, [])
        settings = gin.get_bindings(training.train)
        run = training.TrainingRun.plan(
            model_dir,
            settings["model_config"],
            settings["partitioner"],
            settings["optimizer"],
            settings["label_evaluation"],
            training.InputSettings(settings["mixture_or_task_name"], {}, 8),
            training.LoopSettings(1),
            training.EvalSettings(),
            None,
        )
        with Checkpointer(model_dir) as checkpointer:
            state = run.student.init_train_state(run.optimizer, 0)
            checkpointer.save(0, state, run.student.record(), force=True)
    finally:
        gin.clear_config()


@pytest.mark.slow
@pytest.mark.parametrize(
    "where,line,program,argv",
    COMMANDS,
    ids=[f"{where}:{line}:{program}" for where, line, program, _ in COMMANDS],
)
def test_documented_command_passes_check(where, line, program, argv, data_root, tmp_path):
    import importlib

    dataset = _dataset(argv)
    if not (data_root / dataset).exists():
        pytest.skip(f"{dataset} needs the official teacher outputs at {OFFICIAL_DATA}")
    model_dir = tmp_path / "model_dir"
    overrides = [
        f"--gin.DATA_DIR='{data_root}'",
        f"--gin.MODEL_DIR='{model_dir}'",
        "--check",
    ]
    if program in ("eval", "infer"):
        tiny = [*argv, "--gin_file=models/tiny.gin", *overrides[:2]]
        _write_checkpoint(tiny, model_dir)
        argv = tiny
    if program == "aot":
        pytest.importorskip("libtpu", reason="aot compiles with libtpu (the tpu extra)")
    argv = [a for a in argv if not a.startswith(("--gin.MODEL_DIR", "--gin.DATA_DIR"))]
    module = importlib.import_module(f"dsbs_jax.{program}")
    try:
        assert module.main([*argv, *overrides]) == 0, f"{where}:{line}: {argv}"
    finally:
        gin.clear_config()
