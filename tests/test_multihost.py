"""Multi-process training for real: 2 processes on 127.0.0.1, gloo CPU collectives.

Each process has 2 CPU devices. A first launch trains 2 steps on a (4, 1) mesh and
checkpoints; a second resumes it on a (2, 2) mesh to step 4. The per-step losses and the
validation metrics match a single-process run on 4 devices. Every launch is a subprocess with a
deadline, so a hang fails the test instead of blocking it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import seqio

from dsbs_jax import checkpoints
from dsbs_jax.checkpoints import Checkpointer
from dsbs_jax.input_pipeline import train_batches

REPO = Path(__file__).resolve().parents[1]
BATCH_SIZE = 8
DEADLINE_S = 300  # per launch; about 2 minutes on a busy 2-core machine
# The same batches and the same program: only the order in which partial sums meet differs
# (gloo all-reduces across processes, the (2, 2) mesh's model-parallel sums), so results differ
# by float32 rounding. Measured: at most 2.1e-7 relative over 4 steps and the evaluation.
RTOL = 2e-6
ROWS = re.compile(r"host (\d) of 2 reads all files and feeds rows (\d+)\.\.(\d+) \((\d+)\)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flags(
    data_dir: Path, model_dir: Path, train_steps: int, num_partitions: int, period: int = 2
) -> list[str]:
    return [
        "--gin_file=runs/base.gin",
        "--gin_file=models/tiny.gin",
        f"--gin.DATA_DIR='{data_dir}'",
        f"--gin.MODEL_DIR='{model_dir}'",
        "--gin.MIXTURE_OR_TASK_NAME='dsbs_synthetic_step_by_step'",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 32}",
        f"--gin.BATCH_SIZE={BATCH_SIZE}",
        f"--gin.TRAIN_STEPS={train_steps}",
        "--gin.LEARNING_RATE=1e-3",
        "--gin.adamw.schedule='constant'",  # a 2-step run resumed to 4 = a 4-step run
        "--gin.DROPOUT_RATE=0.0",
        "--gin.EVAL_PERIOD=1000",  # evaluates only at the last step
        f"--gin.Checkpointer.period={period}",
        f"--gin.Partitioner.num_partitions={num_partitions}",
        "--gin.train.log_period=1",
        "--gin.train.test_split=None",
        "--gin.train.eval_batch_size=24",
        "--gin.train.max_decode_length=4",
    ]


def _start(flags: list[str], processes: int) -> list[subprocess.Popen]:
    """Starts `python -m dsbs_jax.train` as the processes of one JAX run on 4 CPU devices."""
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={4 // processes}",
    }
    cluster: list[list[str]] = [[]]
    if processes > 1:
        address = f"127.0.0.1:{_free_port()}"
        cluster = [
            [
                f"--coordinator_address={address}",
                f"--process_count={processes}",
                f"--process_index={index}",
                "--gin.initialize_distributed.cpu_collectives=True",
            ]
            for index in range(processes)
        ]
    return [
        subprocess.Popen(
            [sys.executable, "-m", "dsbs_jax.train", *flags, *extra],
            env=env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for extra in cluster
    ]


def _finish(running: list[subprocess.Popen], status: int = 0) -> list[str]:
    """Waits for the processes (a hang fails after DEADLINE_S) to exit with `status`; returns
    their stderr."""
    try:
        errs = [process.communicate(timeout=DEADLINE_S)[1] for process in running]
    finally:
        for process in running:
            process.kill()  # a no-op for those that exited; the rest must not outlive the test
    for process, err in zip(running, errs, strict=True):
        assert process.returncode == status, err[-3000:]
    return errs


def _records(model_dir: Path, group: str) -> dict[int, dict]:
    """metrics.jsonl by step; a step written twice (by two hosts) fails the test."""
    lines = (model_dir / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if r["group"] == group]
    assert len({r["step"] for r in records}) == len(records), records
    return {r["step"]: r for r in records}


@pytest.mark.slow
def test_two_processes_train_resume_and_match_one(gin_cache_root, tmp_path):
    """Steps 1-2 on a (4, 1) mesh, checkpoint, steps 3-4 resumed on a (2, 2) mesh."""
    model_dir, single = tmp_path / "run", tmp_path / "single"
    # The single-process reference trains 4 steps straight, alongside the first launch.
    running = _start(_flags(gin_cache_root, single, 4, 1), 1)
    running += _start(_flags(gin_cache_root, model_dir, 2, 1), 2)
    first = _finish(running)[1:]
    with Checkpointer(model_dir) as checkpointer:
        assert checkpointer.latest_step() == 2
    resumed = _finish(_start(_flags(gin_cache_root, model_dir, 4, 2), 2))

    # Each host fed its own half of every batch: the rows its devices hold.
    for errs in (first, resumed):
        fed = sorted(tuple(map(int, ROWS.search(err).groups())) for err in errs)
        assert fed == [(0, 0, 3, 4), (1, 4, 7, 4)], errs
    assert all(f"resuming from {model_dir} at step 2" in err for err in resumed)

    got, want = _records(model_dir, "train"), _records(single, "train")
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    np.testing.assert_allclose(
        [got[s]["loss"] for s in range(1, 5)], [want[s]["loss"] for s in range(1, 5)], rtol=RTOL
    )
    # Evaluation (teacher-forced losses, decoded labels) gathers the same results on 2 hosts.
    got_eval = _records(model_dir, "training_eval")[4]
    want_eval = _records(single, "training_eval")[4]
    assert got_eval.keys() == want_eval.keys()
    for key in got_eval.keys() - {"step", "group"}:
        np.testing.assert_allclose(got_eval[key], want_eval[key], rtol=RTOL, err_msg=key)


def test_pipeline_keeps_the_host_rows_of_the_global_batch(gin_cache_root):
    lengths, name = {"inputs": 32, "targets": 32}, "dsbs_synthetic_step_by_step"
    whole = next(train_batches(name, lengths, 8, seqio.ShardInfo(0, 1), seed=1))
    rows = next(train_batches(name, lengths, 8, seqio.ShardInfo(0, 1), seed=1, host_rows=[4, 6]))
    for key, value in whole.items():
        np.testing.assert_array_equal(rows[key], value[[4, 6]])


def _final_params(model_dir: Path) -> list[np.ndarray]:
    """The latest checkpoint's parameters as numpy arrays: written by two processes, whose
    devices this one does not have, so read without their shardings."""
    _, step_dir = checkpoints.checkpoint_dir(model_dir, "latest")
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(step_dir / checkpoints.STATE_ITEM).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    restored = checkpointer.restore(step_dir / checkpoints.STATE_ITEM, restore_args=as_numpy)
    return jax.tree.leaves(restored["params"])


@pytest.mark.slow
def test_sigterm_to_one_host_stops_both_at_one_step_and_the_rerun_matches(gin_cache_root, tmp_path):
    """A preemption notice reaching one of two processes: both save the same step and exit
    143; rerunning the same command ends with the parameters of an uninterrupted run."""
    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    steps, period = 30, 1000
    running = _start(_flags(gin_cache_root, straight, steps, 1, period), 2)
    running += _start(_flags(gin_cache_root, preempted, steps, 1, period), 2)
    metrics = preempted / "metrics.jsonl"
    deadline = time.time() + DEADLINE_S
    while not (metrics.is_file() and '"step": 20,' in metrics.read_text()):
        assert all(p.poll() is None for p in running[2:]) and time.time() < deadline
        time.sleep(0.05)
    running[3].send_signal(signal.SIGTERM)  # process 1 of the preempted run, only
    _finish(running[:2])
    errs = _finish(running[2:], status=143)
    (step,) = checkpoints.step_dirs(preempted)
    assert 20 <= step < steps
    assert all(f"preempted: saved a checkpoint at step {step}" in err for err in errs)

    _finish(_start(_flags(gin_cache_root, preempted, steps, 1, period), 2))
    for a, b in zip(_final_params(preempted), _final_params(straight), strict=True):
        np.testing.assert_array_equal(a, b)
