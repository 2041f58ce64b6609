"""Sweep methods × gin macros, one training run per combination, then aggregate.

    python -m dsbs_jax.sweep --gin_file=sweeps/synthetic_data_efficiency.gin \\
        --methods=dsbs,finetune,distill --sweep='TRAIN_FRACTION=[0.125,0.25,0.5,1.0]' \\
        --sweep='SEED=[0,1,2]' [--gin.NAME=VALUE ...] [--jobs=N | --vectorized] \\
        [--print_commands] [--check]

Every run is `python -m dsbs_jax.train` with the same gin files and flags plus its own
bindings, in its own MODEL_DIR under the sweep's MODEL_DIR. The directories are the
sweep's only state: a run with `test_results.json` is finished and skipped, an
interrupted one resumes from its last checkpoint, so an interrupted sweep is simply
run again. `run.json` records each run's flags, and a sweep refuses a directory whose
runs, finished or not, were made with other flags. `--jobs=N` runs N processes at once;
`--vectorized` instead trains, in this process, the runs that share a model and schedule
as one program (`dsbs_jax.vectorized`), with the same directories and results.
`--print_commands` records each unfinished run's `run.json` and prints its launch command
instead of running it, for a cluster scheduler; the results are then aggregated with
`--aggregate_only`. `--check` checks every run's flags, data and directory, prints what
would run, and exits.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gin

from dsbs_jax import results as results_lib
from dsbs_jax import startup
from dsbs_jax.errors import EXIT_BAD_INPUT, UserError
from dsbs_jax.gin_utils import check_macros_used, one_line, parse_gin, split_gin_flags, start_jax
from dsbs_jax.preemption import EXIT_PREEMPTED, Preempted

# A method's name → the mixture suffix of its SeqIO registration (dsbs_<dataset>_<suffix>).
METHOD_MIXTURES = {
    "dsbs": "step_by_step",
    "dsbs_gt": "step_by_step_gt",
    "dsbs_rates": "step_by_step_rates",
    "finetune": "finetune",
    "distill": "distill",
    "single_task": "single_task",
}
# Methods whose loss does not weigh tasks: ALPHA is None for them, and an ALPHA sweep
# gives each of them one run per other combination, not one per alpha.
ALPHA_FREE_METHODS = ("finetune", "distill", "single_task")
COMPILATION_CACHE = ".jax_cache"
RUN_LOG = "train.log"  # a run's output when several run at once
_MACRO = re.compile(r"^[A-Z][A-Z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of a sweep: a method and the values of the swept macros."""

    method: str
    settings: tuple[tuple[str, Any], ...]

    @property
    def name(self) -> str:
        """The run's directory name, e.g. `dsbs,ALPHA=0.5,SEED=0`."""
        return ",".join([self.method, *(f"{k}={_format_value(v)}" for k, v in self.settings)])

    def bindings(self, dataset: str) -> list[str]:
        """The `--gin.NAME=VALUE` flags that make this run."""
        mixture = f"dsbs_{dataset}_{METHOD_MIXTURES[self.method]}"
        return [
            f"--gin.MIXTURE_OR_TASK_NAME={_gin_literal(mixture)}",
            *(f"--gin.{k}={_gin_literal(v)}" for k, v in self.settings),
        ]


def parse_sweep_flag(flag: str) -> tuple[str, list[Any]]:
    """`'ALPHA=[0.3,0.5]'` → `('ALPHA', [0.3, 0.5])`: a gin macro and its Python-literal values."""
    name, sep, values_text = flag.partition("=")
    name = name.strip()
    if not sep or not _MACRO.match(name):
        raise UserError(f"--sweep {flag!r}: expected MACRO=[v1,v2,...] with an upper-case macro")
    try:
        values = ast.literal_eval(values_text.strip())
    except (ValueError, SyntaxError) as e:
        raise UserError(f"--sweep {flag!r}: the values are not a Python list ({e})") from None
    if not isinstance(values, list) or not values:
        raise UserError(f"--sweep {flag!r}: give a non-empty list of values")
    if len(set(map(repr, values))) != len(values):
        raise UserError(f"--sweep {flag!r}: a value is repeated")
    return name, values


def plan(methods: Sequence[str], axes: Mapping[str, Sequence[Any]]) -> list[Run]:
    """Every combination of the swept values × method; alpha-free methods once per alpha sweep."""
    unknown = [m for m in methods if m not in METHOD_MIXTURES]
    if unknown:
        raise UserError(f"unknown method(s) {unknown}; choose from {sorted(METHOD_MIXTURES)}")
    # Methods vary fastest, so a sweep cut short still compares them on the same settings.
    names = list(axes)
    runs: list[Run] = []
    for values in itertools.product(*(axes[n] for n in names)):
        for method in methods:
            settings = dict(zip(names, values, strict=True))
            if method in ALPHA_FREE_METHODS and "ALPHA" in settings:
                settings["ALPHA"] = None
            runs.append(Run(method, tuple(settings.items())))
    return list(dict.fromkeys(runs))


def dataset_of(mixture_or_task_name: str) -> str:
    """`dsbs_cqa_step_by_step` → `cqa`: the dataset a run config trains on."""
    for suffix in sorted(set(METHOD_MIXTURES.values()), key=len, reverse=True):
        match = re.fullmatch(rf"dsbs_(.+)_{suffix}", mixture_or_task_name)
        if match:
            return match.group(1)
    raise UserError(
        f"MIXTURE_OR_TASK_NAME {mixture_or_task_name!r} is not one of the dsbs_<dataset>_<method>"
        " mixtures, so the sweep cannot tell which dataset to train on"
    )


def _format_value(value: Any) -> str:
    return "None" if value is None else str(value)


def _gin_literal(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _macro(name: str) -> Any:
    try:
        return gin.query_parameter(f"{name}/macro.value")
    except ValueError:
        raise UserError(f"the gin files define no macro {name}") from None


def _binds(macro: str, binding: str) -> bool:
    return binding.split("=", 1)[0].strip() == macro


def _finished(model_dir: Path) -> bool:
    return (model_dir / results_lib.TEST_RESULTS_FILE).exists()


def _record(run: Run, flags: list[str]) -> dict[str, Any]:
    return {"method": run.method, "settings": dict(run.settings), "flags": flags}


def _check_claim(model_dir: Path, run: Run, flags: list[str]) -> None:
    """Refuses `model_dir` when its `run.json` (finished or not) records other flags."""
    path = model_dir / results_lib.RUN_FILE
    if not path.exists():
        return
    previous = json.loads(path.read_text())
    if previous != _record(run, flags):
        theirs = previous.get("flags", [])
        parts = []
        if only_theirs := [f for f in theirs if f not in flags]:
            parts.append("with " + " ".join(only_theirs))
        if only_ours := [f for f in flags if f not in theirs]:
            parts.append("without " + " ".join(only_ours))
        raise UserError(
            f"{model_dir} holds a run made with other flags ({', '.join(parts) or previous});"
            " give the sweep another MODEL_DIR or remove that directory"
        )


def _claim(model_dir: Path, run: Run, flags: list[str]) -> None:
    """Records what `model_dir` trains (`--aggregate_only` finds the runs by it)."""
    path = model_dir / results_lib.RUN_FILE
    if not path.exists():
        model_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_record(run, flags), indent=2) + "\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dsbs_jax.sweep", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
    parser.add_argument("--gin_bindings", action="append", default=[], help="'NAME = VALUE'")
    parser.add_argument("--gin_search_paths", action="append", default=[])
    parser.add_argument(
        "--methods",
        default="dsbs,finetune,distill,single_task",
        help=f"comma-separated, from {','.join(METHOD_MIXTURES)}",
    )
    parser.add_argument(
        "--sweep", action="append", default=[], help="MACRO=[v1,v2,...] (repeatable)"
    )
    parser.add_argument(
        "--print_commands",
        action="store_true",
        help="record the unfinished runs and print one launch command each, running none",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at once (default 1); with more, each run's output goes to its train.log",
    )
    parser.add_argument(
        "--vectorized",
        action="store_true",
        help="train the runs that share a model and schedule as one program, in this process",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="check every run's flags, data and directory, print what would run, and exit",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show TensorFlow's, XLA's and libtpu's start-up logs (also DSBS_VERBOSE=1)",
    )
    parser.add_argument(
        "--aggregate_only", action="store_true", help="only aggregate the finished runs"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    try:
        gin_flags, rest = split_gin_flags(argv)
    except ValueError as e:
        parser.error(str(e))
    args = parser.parse_args(rest)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.vectorized and (args.jobs > 1 or args.print_commands):
        parser.error("--vectorized trains the runs in this process: no --jobs, --print_commands")
    if not args.gin_file:
        parser.error("give at least one --gin_file (e.g. --gin_file=runs/demo.gin)")
    verbose = startup.start(args.verbose)  # TensorFlow before the gin files import the tasks
    try:
        axes = dict(parse_sweep_flag(flag) for flag in args.sweep)
        parse_gin(args.gin_file, [*args.gin_bindings, *gin_flags], args.gin_search_paths)
        for name in axes:
            _macro(name)
        check_macros_used(axes)
        sweep_dir = Path(_macro("MODEL_DIR")).expanduser().absolute()
        dataset = dataset_of(_macro("MIXTURE_OR_TASK_NAME"))
        runs = plan([m.strip() for m in args.methods.split(",") if m.strip()], axes)
        if not args.aggregate_only:
            if args.vectorized or args.check:  # runs planned here: JAX first, as `train` does
                start_jax(verbose)  # joined to the other hosts as the gin config says
            from dsbs_jax.data.run_inputs import ensure_run_inputs  # TensorFlow's side

            ensure_run_inputs(_macro("MIXTURE_OR_TASK_NAME"))  # once, not in every run
    except Exception as e:  # a bad flag, gin file or binding: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT

    # Flags every run shares; each run adds its MODEL_DIR, mixture and swept values.
    shared = [
        *(f"--gin_file={f}" for f in args.gin_file),
        *(f"--gin_bindings={b}" for b in args.gin_bindings),
        *(f"--gin_search_paths={p}" for p in args.gin_search_paths),
        *(f"--gin.{b.replace(' = ', '=', 1)}" for b in gin_flags if not _binds("MODEL_DIR", b)),
    ]
    launches = [
        (
            run,
            sweep_dir / run.name,
            [*shared, f"--gin.MODEL_DIR={_gin_literal(str(sweep_dir / run.name))}"]
            + run.bindings(dataset),
        )
        for run in runs
    ]
    failed: list[str] = []
    if not args.aggregate_only:
        try:
            for run, model_dir, flags in launches:
                _check_claim(model_dir, run, flags)
            todo = [launch for launch in launches if not _finished(launch[1])]
            summary = (
                f"sweep of {len(runs)} runs under {sweep_dir}: {len(runs) - len(todo)} finished,"
                f" {len(todo)} to run"
            )
            if args.check:
                print(_check(todo, summary, args.vectorized))
                return 0
            for run, model_dir, flags in todo:
                _claim(model_dir, run, flags)
            if args.vectorized:
                failed = _train_vectorized(todo, summary, sweep_dir)
            else:
                failed = _launch(todo, summary, sweep_dir, args.print_commands, args.jobs)
        except UserError as e:
            print(f"error: {one_line(e)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except Preempted as e:
            print(e, file=sys.stderr)
            return EXIT_PREEMPTED
        if args.print_commands:
            return 0
        if failed:
            print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
    table = results_lib.aggregate(sweep_dir)
    if not table:
        print(f"no finished runs under {sweep_dir}", file=sys.stderr)
        return 1
    for path in results_lib.write_reports(table, sweep_dir):
        print(f"wrote {path}")
    print(results_lib.markdown_table(table))
    return 0 if args.aggregate_only or not failed else 1


Launch = tuple[Run, Path, list[str]]  # a run, its MODEL_DIR and the flags that train it


def _members(todo: Sequence[Launch]) -> list[Any]:
    """Each run planned in this process under its own gin config (`vectorized.plan_member`)."""
    from dsbs_jax import vectorized  # TensorFlow's side: once `start_jax` has started it

    return [
        vectorized.plan_member(run.name, vectorized.RunConfig.from_flags(flags))
        for run, _, flags in todo
    ]


def _check(todo: Sequence[Launch], summary: str, vectorized: bool) -> str:
    """What `--check` prints: every unfinished run planned (its flags, data and directory
    checked), by program when `vectorized`."""
    members = _members(todo)
    lines = [f"check: the {summary}"]
    if vectorized:
        from dsbs_jax.vectorized import describe, group_members

        lines.append(describe(group_members(members)))
    for member in members if not vectorized else ():
        resume_dir = member.run.resume_dir
        lines.append(f"  {member.name}: " + (f"resumes {resume_dir.name}" if resume_dir else "new"))
    return "\n".join(lines)


def _train_vectorized(todo: Sequence[Launch], summary: str, sweep_dir: Path) -> list[str]:
    """Trains the unfinished runs in this process, one program per group of runs that share
    one (`dsbs_jax.vectorized`); returns the names that failed."""
    import jax

    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # a rerun compiles nothing again
        jax.config.update("jax_compilation_cache_dir", str(sweep_dir / COMPILATION_CACHE))
    members = _members(todo)
    from dsbs_jax.vectorized import group_members, train_group

    groups = group_members(members)
    print(f"{summary}, as {len(groups)} program(s)", file=sys.stderr)
    failed = []
    try:
        for number, group in enumerate(groups, 1):
            names = ", ".join(member.name for member in group)
            print(f"[program {number}/{len(groups)}] {len(group)} runs: {names}", file=sys.stderr)
            failed += train_group(group)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to go on", file=sys.stderr)
        raise SystemExit(130) from None
    return failed


def _launch(
    todo: Sequence[Launch], summary: str, sweep_dir: Path, print_only: bool, jobs: int = 1
) -> list[str]:
    """Runs (or prints) every unfinished run, `jobs` at a time; returns the names that failed."""
    launches = [
        (run.name, model_dir, [sys.executable, "-m", "dsbs_jax.train", *flags])
        for run, model_dir, flags in todo
    ]
    if print_only:
        for _, _, command in launches:
            print(shlex.join(["python", *command[1:]]))
        return []
    print(summary + (f", {jobs} at a time" if jobs > 1 else ""), file=sys.stderr)
    # Runs of one sweep compile the same programs; JAX's persistent cache compiles each once.
    env = {"JAX_COMPILATION_CACHE_DIR": str(sweep_dir / COMPILATION_CACHE), **os.environ}
    running: list[tuple[str, subprocess.Popen]] = []
    failed = []
    try:
        for i, (name, model_dir, command) in enumerate(launches, 1):
            while len(running) == jobs:
                failed += _reap(running)
            if jobs == 1:  # one run at a time: its progress bar on this terminal
                print(f"[{i}/{len(launches)}] {name}", file=sys.stderr)
                running.append((name, subprocess.Popen(command, env=env)))
            else:  # several: each writes to a log in its own directory
                log = model_dir / RUN_LOG
                print(f"[{i}/{len(launches)}] {name} (log: {log})", file=sys.stderr)
                with open(log, "ab") as out:
                    process = subprocess.Popen(command, env=env, stdout=out, stderr=out)
                running.append((name, process))
        while running:
            failed += _reap(running)
    except KeyboardInterrupt:
        for _, process in running:
            process.terminate()
        for _, process in running:
            process.wait()
        print("interrupted: run the same command again to go on", file=sys.stderr)
        raise SystemExit(130) from None
    return failed


def _reap(running: list[tuple[str, subprocess.Popen]]) -> list[str]:
    """Waits until a run ends and removes it from `running`; returns its name if it failed."""
    while True:
        for entry in running:
            name, process = entry
            code = process.poll()
            if code is not None:
                running.remove(entry)
                print(f"{name} {'done' if code == 0 else f'failed (exit {code})'}", file=sys.stderr)
                return [name] if code else []
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
