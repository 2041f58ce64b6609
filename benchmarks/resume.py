"""Seconds to the first training batch of a fresh start and of a resumed run.

    python -m benchmarks.resume --json benchmarks/results/resume.json

The training program's input pipeline (`dsbs_jax.input_pipeline.train_batches`): the
step-by-step mixture packed into rows of `--inputs-length` / `--targets-length` tokens,
`--batch-size` rows per batch. Each figure is the time a new process takes from building the
pipeline to holding its first batch:

* fresh: from step 0;
* resumed at step N (`--resume-steps`): from the state an uninterrupted run saved when it got
  to step N (`TrainBatches.save`, which training does with every checkpoint);
* replayed at step N (`--replay-steps`): the fallback without a saved state, which runs the N
  batches before step N (how every resume worked before).

An uninterrupted run, in this process, saves those states and notes the batches at every
step; `batches_equal` says whether each timed process's first `--compare` batches are the
uninterrupted run's at the same steps, bit for bit (SHA-256 of every array). Target: resuming
at the last of `--resume-steps` within 1.5 times the fresh start plus 5 seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common

FIGURES = (("first_batch_s", "s", "lower"), ("first_batch_cpu_s", "CPU s", "lower"))
TARGET_FACTOR, TARGET_SLACK_S = 1.5, 5.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, prog="python -m " + __spec__.name)
    common.add_common_args(parser)
    parser.add_argument("--batch-size", type=int, default=64, help="packed rows per batch")
    parser.add_argument("--inputs-length", type=int, default=1024)
    parser.add_argument("--targets-length", type=int, default=256)
    parser.add_argument("--resume-steps", default="1000,10000", help="comma-separated")
    parser.add_argument("--replay-steps", default="1000", help="comma-separated; may be empty")
    parser.add_argument("--compare", type=int, default=3, help="batches compared per process")
    parser.add_argument(
        "--state-dir", type=Path, default=None, help="where the states go (default: a temp dir)"
    )
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    return parser


def _steps(text: str) -> list[int]:
    return sorted({int(s) for s in text.split(",") if s.strip()})


def _pipeline(args: argparse.Namespace, dataset: str, start_step: int = 0) -> Any:
    import seqio

    from dsbs_jax.input_pipeline import train_batches

    lengths = {"inputs": args.inputs_length, "targets": args.targets_length}
    mixture = f"dsbs_{dataset}_step_by_step"
    return train_batches(
        mixture, lengths, args.batch_size, seqio.ShardInfo(0, 1), args.seed, start_step=start_step
    )


def _digest(batch: dict[str, np.ndarray]) -> str:
    sha = hashlib.sha256()
    for name in sorted(batch):
        value = np.ascontiguousarray(batch[name])
        sha.update(f"{name} {value.dtype} {value.shape}".encode())
        sha.update(value.tobytes())
    return sha.hexdigest()


def _state_dir(root: Path, step: int) -> Path:
    return root / f"step_{step}"


def measure(args: argparse.Namespace, kind: str, step: int, state_dir: Path) -> dict[str, Any]:
    """One timed start (`kind` fresh, resume or replay) at `step`, in this process."""
    dataset = common.prepare_data(args)
    wall, cpu = time.perf_counter(), time.process_time()
    batches = _pipeline(args, dataset, start_step=step)
    restored = kind == "resume" and batches.restore(_state_dir(state_dir, step), 0, 1)
    first = next(batches)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    later = [next(batches) for _ in range(args.compare - 1)]
    return {
        "step": step,
        "first_batch_s": wall,
        "first_batch_cpu_s": cpu,
        "restored": restored,
        "digests": [_digest(b) for b in [first, *later]],
    }


def _measure_apart(
    args: argparse.Namespace, argv: Sequence[str], kind: str, step: int, state_dir: Path
) -> dict[str, Any]:
    """`measure` in a new Python process (here with `--in-process`)."""
    if args.in_process:
        return measure(args, kind, step, state_dir)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        extra = [f"--measure={kind}:{step}", f"--state-dir={state_dir}", f"--result-file={out}"]
        subprocess.run([sys.executable, "-m", __spec__.name, *argv, *extra], check=True)
        return json.loads(out.read_text())


def uninterrupted(
    args: argparse.Namespace, dataset: str, state_dir: Path, wanted: set[int]
) -> tuple[dict[int, str], dict[str, dict[str, float]]]:
    """Runs the pipeline from step 0 through every batch in `wanted`, saving its state at each
    of `--resume-steps`: (digest of every wanted batch, {step: what its save took})."""
    resume_steps = set(_steps(args.resume_steps))
    stream = _pipeline(args, dataset)
    digests: dict[int, str] = {}
    saves: dict[str, dict[str, float]] = {}
    start = time.perf_counter()
    while stream.position <= max(wanted):
        step = stream.position
        if step in resume_steps:
            reached = time.perf_counter()
            stream.save(_state_dir(state_dir, step), 0, 1)
            files = _state_dir(state_dir, step).iterdir()
            saves[str(step)] = {
                "reached_s": reached - start,
                "save_s": time.perf_counter() - reached,
                "state_bytes": sum(f.stat().st_size for f in files),
            }
            print(f"resume: state at step {step} saved ({saves[str(step)]})", flush=True)
        batch = next(stream)
        if step in wanted:
            digests[step] = _digest(batch)
    return digests, saves


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    common.quiet_tensorflow()
    if args.measure:  # a timed process of the parent below
        kind, step = args.measure.split(":")
        result = measure(args, kind, int(step), args.state_dir)
        Path(args.result_file).write_text(json.dumps(result))
        return None
    dataset = common.prepare_data(args)
    with tempfile.TemporaryDirectory() as tmp:
        state_dir = args.state_dir or Path(tmp)
        starts = [("fresh", 0)]
        starts += [("resume", s) for s in _steps(args.resume_steps)]
        starts += [("replay", s) for s in _steps(args.replay_steps)]
        wanted = {step + i for _, step in starts for i in range(args.compare)}
        expected, saves = uninterrupted(args, dataset, state_dir, wanted)
        results = {}
        for kind, step in starts:
            name = kind if kind == "fresh" else f"{kind}@{step}"
            results[name] = _measure_apart(args, argv, kind, step, state_dir)
            print(
                f"resume: {name} first batch in {results[name]['first_batch_s']:.2f} s", flush=True
            )
    equal = all(
        r["digests"] == [expected[r["step"] + i] for i in range(args.compare)]
        for r in results.values()
    )
    fresh = results["fresh"]["first_batch_s"]
    resumed = {
        str(step): results[f"resume@{step}"]["first_batch_s"] for step in _steps(args.resume_steps)
    }
    last = resumed[str(_steps(args.resume_steps)[-1])]
    extra = {
        "dataset": dataset,
        "fresh_first_batch_s": fresh,
        "resume_first_batch_s": resumed,
        "replay_first_batch_s": {
            str(step): results[f"replay@{step}"]["first_batch_s"]
            for step in _steps(args.replay_steps)
        },
        "batches_equal": equal,
        "restored": all(r["restored"] for name, r in results.items() if name.startswith("resume")),
        "saves": saves,
    }
    extra["target_met"] = (
        equal and extra["restored"] and last <= TARGET_FACTOR * fresh + TARGET_SLACK_S
    )
    for r in results.values():
        del r["digests"]
    print(
        f"resume: batches equal {equal}; resuming at the last step takes {last:.2f} s, target "
        f"<= {TARGET_FACTOR} x {fresh:.2f} + {TARGET_SLACK_S:g} s: "
        + ("met" if extra["target_met"] else "NOT met"),
        flush=True,
    )
    return common.report("resume", args, results, FIGURES, extra)


if __name__ == "__main__":
    main()
