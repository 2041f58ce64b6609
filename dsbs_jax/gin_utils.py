"""t5x-style command lines: --gin_file, --gin.NAME=VALUE, --gin_bindings, --gin_search_paths.

    python -m dsbs_jax.train --gin_file=runs/demo.gin --gin.MODEL_DIR=\\"/tmp/demo\\"

Every failure a user can cause (a bad binding, an unknown task, a checkpoint of another
model, a NaN loss: a `dsbs_jax.errors.UserError`) ends as one line on stderr and exit status
2; anything else is a bug and keeps its traceback. Every command takes `--check` (check the
configuration, print what would run, exit) and `--verbose` (the frameworks' start-up logs).
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import gin
from gin import config as gin_config
from gin import config_parser, resource_reader

from dsbs_jax import startup
from dsbs_jax.errors import EXIT_BAD_INPUT, UserError
from dsbs_jax.partitioning import initialize_distributed
from dsbs_jax.preemption import EXIT_PREEMPTED, Preempted

PROJECT_GIN_CONFIGS = Path(__file__).resolve().parent / "gin_configs"


def _system_path_file_exists(config_path: str) -> bool:
    """gin's check for a gin file inside a Python package, minus its crash on folders.

    gin reads `runs/demo.gin` as "file demo.gin of package `runs`" when no such file is
    under the working directory, and crashes with a TypeError when `runs` is a plain
    folder there (a namespace package: no file of its own), such as the `runs/` a
    first training run writes. Such a folder holds no package file, so: not found.
    """
    try:
        return resource_reader.system_path_file_exists(config_path)
    except TypeError:
        return False


gin_config._FILE_READERS[:] = [
    (
        reader,
        _system_path_file_exists if exists is resource_reader.system_path_file_exists else exists,
    )
    for reader, exists in gin_config._FILE_READERS
]


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
    parser.add_argument(
        "--gin_bindings",
        action="append",
        default=[],
        help="a gin binding 'NAME = VALUE' (repeatable)",
    )
    parser.add_argument(
        "--gin_search_paths",
        action="append",
        default=[],
        help="comma-separated folders to find gin files in",
    )
    parser.add_argument(
        "--tfds_data_dir", default=None, help="read TFDS builds of the teacher caches from here"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the configuration, data and checkpoints, print what would run, and exit",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help=f"show the frameworks' start-up logs too (or set {startup.VERBOSE_ENV}=1)",
    )
    parser.add_argument("--coordinator_address", default=None, help="multi-host: host:port")
    parser.add_argument("--process_count", type=int, default=None, help="multi-host: processes")
    parser.add_argument("--process_index", type=int, default=None, help="multi-host: this one")
    return parser


def split_gin_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates t5x's `--gin.NAME=VALUE` flags (as 'NAME = VALUE' bindings) from the rest."""
    bindings, rest = [], []
    for arg in argv:
        if arg.startswith("--gin."):
            name, sep, value = arg[len("--gin.") :].partition("=")
            if not sep:
                raise ValueError(f"{arg}: expected --gin.NAME=VALUE")
            bindings.append(f"{name} = {value}")
        else:
            rest.append(arg)
    return bindings, rest


class UnknownBindingError(UserError):
    """A command-line macro or binding that the configuration would never read."""


def parse_gin(
    gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str]
) -> None:
    """Finds gin files on the search paths, then in the package's gin_configs/, then in the
    working directory, and parses them.

    The package's configs come before the working directory, so `runs/demo.gin` and the
    includes in it ('data/defaults.gin', 'models/tiny.gin') mean the package's files wherever
    the command runs, whatever folders the working directory holds; a user's own file keeps
    another name, or comes first through `--gin_search_paths`.

    Then the command line's `bindings`, each of which must be read by the configuration:
    a binding of a configurable or parameter that does not exist, or a macro that no file
    or binding uses, raises UnknownBindingError naming the nearest known name, since a
    misspelt `--gin.TRAIN_STEP=100` would otherwise train with the default in silence.
    """
    paths = [p for entry in search_paths for p in entry.split(",") if p]
    gin_config._LOCATION_PREFIXES[:] = [*paths, str(PROJECT_GIN_CONFIGS), os.getcwd()]
    # gin logs an error for every search path that lacks a file, even when a later one has it.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        gin.parse_config_files_and_bindings(list(gin_files), [], finalize_config=False)
    finally:
        root.setLevel(level)
    keys = [key for key in map(_binding_key, bindings) if key]
    for key in keys:
        _check_binding_key(key)
    gin.parse_config(list(bindings))
    check_macros_used(key for key in keys if _is_macro(key))


_BINDING_KEY = re.compile(r"^\s*([A-Za-z_][\w./]*)\s*=")


def _binding_key(binding: str) -> str | None:
    """`'train.x = 3'` -> `'train.x'`; None for the `import` and `include` statements."""
    match = _BINDING_KEY.match(binding)
    return match.group(1) if match else None


def _is_macro(key: str) -> bool:
    return "." not in key.rsplit("/", 1)[-1]


def _did_you_mean(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, sorted(set(known)), n=1, cutoff=0.6)
    return f": did you mean {close[0]!r}?" if close else ""


def _check_binding_key(key: str) -> None:
    """Raises UnknownBindingError unless `key` names a known configurable's parameter."""
    if _is_macro(key):
        return
    _, selector, parameter = config_parser.parse_binding_key(key)
    configurable = gin_config._REGISTRY.get_match(selector)
    if configurable is None:
        known = [c.name for _, c in gin_config._REGISTRY.items()]
        raise UnknownBindingError(
            f"--gin.{key}: no configurable {selector!r}{_did_you_mean(selector, known)}"
        )
    fn = inspect.unwrap(configurable.wrapped)
    if inspect.isclass(fn):
        fn = fn.__init__
    signature = inspect.signature(fn).parameters.values()
    named = [p.name for p in signature if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    takes_any = any(p.kind == p.VAR_KEYWORD for p in signature) and not configurable.allowlist
    known = [*named, *(configurable.allowlist or ())]
    if parameter not in known and not takes_any:
        raise UnknownBindingError(
            f"--gin.{key}: {selector!r} has no parameter {parameter!r}"
            f"{_did_you_mean(parameter, known)}"
        )


def check_macros_used(names: Iterable[str]) -> None:
    """Raises UnknownBindingError for a macro in `names` that nothing in the config reads."""
    used = {
        ref.scoped_selector.rsplit("/", 1)[0]
        for ref in gin_config.iterate_references(gin_config._CONFIG)
        if ref.configurable.name == "macro"
    }
    defined = [scope for scope, selector in gin_config._CONFIG if selector == "gin.macro"]
    for name in names:
        if name not in used:
            known = [m for m in [*used, *defined] if m != name]
            raise UnknownBindingError(
                f"--gin.{name}: no gin file or binding uses the macro {name!r}"
                f"{_did_you_mean(name, known)}"
            )


def start_jax(verbose: bool, *distributed: str | int | None) -> None:
    """Joins JAX to the other hosts (`initialize_distributed(*distributed)`, gin giving what is
    not passed) and starts its backends, quietly unless `verbose`."""
    with startup.quiet_start(verbose):
        initialize_distributed(*distributed)
    startup.start_jax(verbose)


def run(
    main: Callable[[argparse.Namespace], object],
    argv: Sequence[str] | None,
    prog: str,
    description: str,
    add_flags: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """Parses flags and gin, sets up multi-host JAX, runs `main(flags)`; returns the exit status.

    A UserError ends as one line and status 2, a preemption as its line and
    `preemption.EXIT_PREEMPTED`, Ctrl-C as a line and 130. `add_flags` adds a program's own
    flags to the common ones.
    """
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser(prog, description)
    if add_flags is not None:
        add_flags(parser)
    try:
        gin_flags, rest = split_gin_flags(argv)
    except ValueError as e:
        parser.error(str(e))
    args = parser.parse_args(rest)
    if not args.gin_file:
        parser.error("give at least one --gin_file (e.g. --gin_file=runs/demo.gin)")
    verbose = startup.start(args.verbose)
    try:
        bindings = [*args.gin_bindings, *gin_flags]
        if args.tfds_data_dir:
            bindings.append(f"teacher_cache_tfds_dir.path = {args.tfds_data_dir!r}")
        parse_gin(args.gin_file, bindings, args.gin_search_paths)
    except Exception as e:  # gin raises many types for a bad file or binding
        print(f"error: bad gin configuration: {one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    start_jax(verbose, args.coordinator_address, args.process_count, args.process_index)
    try:
        main(args)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Preempted as e:
        print(one_line(e), file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print(
            "interrupted: the last checkpoint in MODEL_DIR is where a rerun resumes",
            file=sys.stderr,
        )
        return 130
    return 0


def one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    text = re.sub(r"\s*In call to configurable '[^']*' \(<[^>]*>\)", "", text)
    return " ".join(line.strip() for line in text.splitlines() if line.strip())
