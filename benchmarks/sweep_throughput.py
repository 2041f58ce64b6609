"""Sweep throughput: one sweep as separate runs (`--jobs=2`) and vectorized, in runs per hour.

    python -m benchmarks.sweep_throughput --json benchmarks/results/sweep.json

The same sweep of the demo model twice, one after the other on this machine: `python -m
dsbs_jax.sweep` with runs/demo.gin at its settings, but `--steps` steps and an evaluation every
`--eval-period`, over `--methods` and the `--sweep` macros (by default 2 methods x 2 seeds x 2
training fractions: 8 runs). "baseline" is how sweeps ran before (`dsbs_jax.sweep --jobs=2`:
one `python -m dsbs_jax.train` process per run, two at a time); "ours" is `--vectorized`: the
runs that share a program trained as one, in one process. Each side starts from nothing: its own
sweep directory and its own JAX compilation cache, so both pay for their compilations; the
built-in dataset is written before either starts.

`runs_per_hour` is the number of runs over the wall-clock hours of the whole sweep command
(planning, training, evaluations, tests, tables). On a machine shared with other work the wall
clock depends on their load, so the CPU time of the sweep (all its processes) is reported too
(`runs_per_cpu_hour`), and the 1-minute load average before and after each side.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import common

FIGURES = (
    ("runs_per_hour", "runs/hour", "higher"),
    ("runs_per_cpu_hour", "runs per CPU-hour", "higher"),
    ("wall_s", "s", "lower"),
    ("cpu_s", "CPU s", "lower"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, prog="python -m " + __spec__.name)
    parser.add_argument("--gin-file", default="runs/demo.gin", help="the run config swept")
    parser.add_argument("--steps", type=int, default=300, help="TRAIN_STEPS of every run")
    parser.add_argument("--eval-period", type=int, default=100, help="EVAL_PERIOD of every run")
    parser.add_argument("--methods", default="dsbs,finetune")
    parser.add_argument(
        "--sweep",
        action="append",
        default=None,
        help="MACRO=[v1,...] (repeatable; default SEED=[0,1] and TRAIN_FRACTION=[0.5,1.0])",
    )
    parser.add_argument(
        "--gin", action="append", default=[], help="more NAME=VALUE bindings for every run"
    )
    parser.add_argument("--jobs", type=int, default=2, help="baseline: runs at once")
    parser.add_argument("--data-dir", type=Path, default=common.DEFAULT_DATA_DIR / "sweep")
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="where the sweeps go (default: a temp dir)"
    )
    parser.add_argument("--sides", default="ours,baseline", help="comma-separated")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument(
        "--in-process", action="store_true", help="run every side in this process (tests)"
    )
    parser.add_argument("--side", choices=common.SIDES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def sweep_argv(args: argparse.Namespace, sweep_dir: Path) -> list[str]:
    """The `dsbs_jax.sweep` command line both sides run, less `--jobs` / `--vectorized`."""
    axes = args.sweep or ["SEED=[0,1]", "TRAIN_FRACTION=[0.5,1.0]"]
    return [
        f"--gin_file={args.gin_file}",
        f"--gin.MODEL_DIR='{sweep_dir}'",
        f"--gin.DATA_DIR='{args.data_dir}'",
        f"--gin.TRAIN_STEPS={args.steps}",
        f"--gin.EVAL_PERIOD={args.eval_period}",
        *(f"--gin.{binding}" for binding in args.gin),
        f"--methods={args.methods}",
        *(f"--sweep={axis}" for axis in axes),
    ]


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (and theirs), all threads."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _prepare_data(data_dir: Path) -> None:
    if not (data_dir / "synthetic" / "train.jsonl").exists():
        command = [sys.executable, "-m", "dsbs_jax.data", "synthetic", "--out", str(data_dir)]
        subprocess.run(command, check=True)


def run_sweep(args: argparse.Namespace, mode: Sequence[str]) -> dict[str, Any]:
    """Runs the sweep in a fresh directory with `mode` (`--jobs=N` or `--vectorized`)."""
    _prepare_data(args.data_dir)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="dsbs_sweep_bench_"))
    sweep_dir = work / ("vectorized" if "--vectorized" in mode else "separate")
    if sweep_dir.exists():
        raise SystemExit(f"{sweep_dir} exists: give an empty --work-dir")
    load_before = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), _cpu_seconds()
    from dsbs_jax import sweep  # in the timed part: both sides load the libraries once

    status = sweep.main([*sweep_argv(args, sweep_dir), *mode])
    wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    if status != 0:
        raise SystemExit(f"the sweep {' '.join(mode)} exited with {status}")
    results = sorted(sweep_dir.glob("*/test_results.json"))
    accuracies = [
        value
        for path in results
        for key, value in json.loads(path.read_text()).items()
        if key.count("/") == 2
    ]
    return {
        "mode": " ".join(mode),
        "runs": len(results),
        "wall_s": wall,
        "cpu_s": cpu,
        "runs_per_hour": len(results) * 3600 / wall,
        "runs_per_cpu_hour": len(results) * 3600 / cpu,
        "mean_test_accuracy": sum(accuracies) / max(len(accuracies), 1),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }


def ours(args: argparse.Namespace) -> dict[str, Any]:
    return run_sweep(args, ["--vectorized"])


def baseline(args: argparse.Namespace) -> dict[str, Any]:
    return run_sweep(args, [f"--jobs={args.jobs}"])


SIDE_FNS = {"ours": ours, "baseline": baseline}


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    common.quiet_tensorflow()
    parsed = common.main_sides(__spec__.name, build_parser(), SIDE_FNS, argv)
    if parsed is None:
        return None
    args, results = parsed
    return common.report("sweep", args, results, FIGURES, {"machine_load": os.getloadavg()})


if __name__ == "__main__":
    main()
