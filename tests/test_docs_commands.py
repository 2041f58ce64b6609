"""The docs stay runnable as written: every command block of README.md and docs/*.md that
calls `python -m dsbs_jax.{train,eval,infer,sweep,aot}` passes `--check` with the commands'
own gin files and flags.

What a test machine cannot have is overridden, and nothing else: DATA_DIR and MODEL_DIR point
at the test's folders (and a path inside the documented MODEL_DIR at the same place in the
test's), a pretrained checkpoint or vocabulary on /mnt or gs:// becomes a local one, multi-host
flags are dropped (the one process checks alone). eval and infer need a checkpoint: the block's
train command (or the command's own gin) writes one of the same model shrunk to the tiny
preset, with its config.gin, as a training run would."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import gin
import pytest

from tests.conftest import OFFICIAL_DATA

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PROGRAMS = ("train", "eval", "infer", "sweep", "aot")
COMMAND = re.compile(rf"python -m dsbs_jax\.({'|'.join(PROGRAMS)})\b")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
MULTIHOST_FLAGS = ("--coordinator_address", "--process_count", "--process_index")
OFFICIAL = ("cqa", "svamp")  # prepared here when the official teacher outputs are present
GIN_VALUE = re.compile(r"^--gin\.(\w+)=(.*)$")


def _argv(rest: str) -> list[str]:
    """A command's arguments; a command quoted inside another (`--command='...'`) loses its
    closing quote."""
    try:
        return shlex.split(rest, comments=True)
    except ValueError:
        return shlex.split(rest.rstrip().rstrip("'"), comments=True)


def documented_blocks() -> list[tuple[str, list[tuple[str, list[str]]]]]:
    """('file:line', [(program, argv after `python -m dsbs_jax.<program>`)]) of every shell
    block with a command; continued lines joined, anything after `&&`, `|` or `;` left out."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for block in FENCE.finditer(text):
            if block.group(1) not in ("", "bash", "sh", "shell", "console"):
                continue
            commands = []
            for line in block.group(2).replace("\\\n", " ").splitlines():
                match = COMMAND.search(line)
                if match:
                    rest = re.split(r"\s(?:&&|\||;)\s", line[match.end() :])[0]
                    commands.append((match.group(1), _argv(rest)))
            if commands:
                line_number = text[: block.start(2)].count("\n") + 1
                found.append((f"{path.name}:{line_number}", commands))
    return found


BLOCKS = documented_blocks()


def test_the_docs_hold_commands_of_every_program():
    assert {program for _, commands in BLOCKS for program, _ in commands} == set(PROGRAMS)


@pytest.fixture(scope="module")
def local(builtin_cache_root, tmp_path_factory) -> dict[str, Path]:
    """The data root (the built-in cache, and cqa and svamp when the official outputs are
    here) and a tiny Hugging Face checkpoint standing for pretrained weights."""
    import jax
    import jax.numpy as jnp
    import optax

    from dsbs_jax import checkpoint_import
    from dsbs_jax.data.__main__ import main as data_main
    from dsbs_jax.models.t5 import get_config
    from dsbs_jax.partitioning import Partitioner
    from dsbs_jax.state import Student

    root = tmp_path_factory.mktemp("docs_data")
    (root / "synthetic").symlink_to(builtin_cache_root / "synthetic")
    if (OFFICIAL_DATA / "cqa").is_dir():
        for name in OFFICIAL:  # as the docs do it, vocabulary included
            args = ["prepare", "--dataset", name, "--source", str(OFFICIAL_DATA), "--out"]
            assert data_main([*args, str(root)]) == 0
    config = get_config("tiny", vocab_size=128, dtype=jnp.float32)
    student = Student(config, Partitioner(devices=jax.devices()[:1]))
    state = student.init_train_state(optax.sgd(0.1), 0)
    hf = tmp_path_factory.mktemp("pretrained") / "t5"
    checkpoint_import.export_hf(state.params, config, str(hf))
    return {"data": root, "pretrained": hf}


RUN_FILE = re.compile(r"runs/(\w+?)_(?:step_by_step|distill|finetune|single_task)(?:_(\w+))?\.gin")
# The tiny preset, with heads enough for the documented 4 model partitions.
TINY = ["--gin_file=models/tiny.gin", "--gin.t5_config.num_heads=4"]


def _datasets(argv: list[str]) -> list[str]:
    """The caches a command's run file reads: its dataset and any augmentation dataset
    (runs/svamp_step_by_step_asdiv.gin); the built-in one for the demo and the rest."""
    for arg in argv:
        match = RUN_FILE.search(arg)
        if match:
            return [name for name in match.groups() if name]
    return ["synthetic"]


def _unquoted(value: str) -> str:
    return value.strip().strip("\\").strip("'\"").strip("\\").strip("'\"")


def _localized(argv: list[str], doc_model_dir: str | None, local: dict, model_dir: Path) -> list:
    """The command's arguments with what this machine cannot have replaced (module doc)."""
    dataset = _datasets(argv)[0]  # the run file's own (not its augmentation's)
    out = []
    for arg in argv:
        if arg.startswith(MULTIHOST_FLAGS) or "initialize_distributed" in arg:
            continue
        match = GIN_VALUE.match(arg)
        name, value = (match.group(1), _unquoted(match.group(2))) if match else (None, None)
        if name in ("DATA_DIR", "MODEL_DIR"):
            continue
        if name == "INITIAL_CHECKPOINT_PATH" and not Path(value).exists():
            arg = f"--gin.{name}='{local['pretrained']}'"
        elif name == "VOCABULARY_PATH" and not Path(value).exists():
            vocab_of = "synthetic" if "/synthetic/" in value else dataset
            arg = f"--gin.{name}='{local['data'] / vocab_of / 'spm.model'}'"
        if doc_model_dir and doc_model_dir in arg:
            arg = arg.replace(doc_model_dir, str(model_dir))
        out.append(arg)
    if any("pods/" in arg for arg in argv):  # the slice's hosts are not here: one process
        out.append("--gin.initialize_distributed.auto_detect=False")
    return [*out, f"--gin.DATA_DIR='{local['data']}'", f"--gin.MODEL_DIR='{model_dir}'"]


def _doc_model_dir(commands: list[tuple[str, list[str]]]) -> str | None:
    for _, argv in commands:
        for arg in argv:
            match = GIN_VALUE.match(arg)
            if match and match.group(1) == "MODEL_DIR":
                return _unquoted(match.group(2))
    return None


def _write_tiny_run(argv: list[str], model_dir: Path) -> None:
    """What a training run of `argv`'s model shrunk to the tiny preset leaves in MODEL_DIR:
    a checkpoint and config.gin."""
    from dsbs_jax import training
    from dsbs_jax.checkpoints import Checkpointer
    from dsbs_jax.gin_utils import parse_gin, split_gin_flags

    bindings, rest = split_gin_flags([*argv, *TINY])
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
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "config.gin").write_text(gin.config_str())
        with Checkpointer(model_dir) as checkpointer:
            state = run.student.init_train_state(run.optimizer, 0)
            checkpointer.save(1, state, {"seed": 0, **run.student.record()}, force=True)
    finally:
        gin.clear_config()


@pytest.mark.slow
@pytest.mark.parametrize("where,commands", BLOCKS, ids=[where for where, _ in BLOCKS])
def test_documented_commands_pass_check(where, commands, local, tmp_path):
    needed = set().union(*(_datasets(argv) for _, argv in commands))
    missing = [name for name in needed if not (local["data"] / name).exists()]
    if missing:
        pytest.skip(f"{missing} need the official teacher outputs at {OFFICIAL_DATA}")
    if any(program == "aot" for program, _ in commands):
        pytest.importorskip("libtpu", reason="aot compiles with libtpu (pip install -e .[tpu])")
    model_dir = tmp_path / "model_dir"
    doc_model_dir = _doc_model_dir(commands)
    trained = False
    for program, argv in commands:
        argv = _localized(argv, doc_model_dir, local, model_dir)
        if program in ("eval", "infer") and not trained:
            train_argv = next((a for p, a in commands if p == "train"), argv)
            _write_tiny_run(_localized(train_argv, doc_model_dir, local, model_dir), model_dir)
            trained = True
        if trained:
            argv = [*argv, *TINY]
        module = importlib.import_module(f"dsbs_jax.{program}")
        try:
            assert module.main([*argv, "--check"]) == 0, f"{where}: {program} {argv}"
        finally:
            gin.clear_config()
