"""Multi-process training for real: 2 processes on 127.0.0.1, gloo CPU collectives.

Each process of a pair has 2 CPU devices, and the pair trains on a (2, 2) mesh. Preempted and
rerun, it computes what one process does on the same mesh of 4 devices, bit for bit: every
all-reduce sums two partial results, in gloo across the processes as in XLA within one, and a
sum of two floats does not depend on their order. Every launch is a subprocess with a deadline,
so a hang fails the test instead of blocking it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import seqio

from dsbs_jax import checkpoints
from dsbs_jax.input_pipeline import train_batches
from tests.conftest import assert_same_arrays, checkpoint_state, cpu_xla_flags, free_port

REPO = Path(__file__).resolve().parents[1]
BATCH_SIZE = 8
DEADLINE_S = 300  # per launch; about 2 minutes on a busy 2-core machine
ROWS = re.compile(r"host (\d) of 2 reads all files and feeds rows (\d+)\.\.(\d+) \((\d+)\)")


def _flags(data_dir: Path, model_dir: Path, train_steps: int, num_partitions: int) -> list[str]:
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
        "--gin.DROPOUT_RATE=0.0",
        "--gin.EVAL_PERIOD=1000",  # evaluates only at the last step
        "--gin.Checkpointer.period=1000",  # saves when preempted and at the end
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
        "XLA_FLAGS": cpu_xla_flags(4 // processes),
    }
    cluster: list[list[str]] = [[]]
    if processes > 1:
        address = f"127.0.0.1:{free_port()}"
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


def test_pipeline_keeps_the_host_rows_of_the_global_batch(gin_cache_root):
    lengths, name = {"inputs": 32, "targets": 32}, "dsbs_synthetic_step_by_step"
    whole = next(train_batches(name, lengths, 8, seqio.ShardInfo(0, 1), seed=1))
    rows = next(train_batches(name, lengths, 8, seqio.ShardInfo(0, 1), seed=1, host_rows=[4, 6]))
    for key, value in whole.items():
        np.testing.assert_array_equal(rows[key], value[[4, 6]])


@pytest.mark.slow
def test_a_preempted_pair_resumes_to_one_processs_bits(gin_cache_root, tmp_path):
    """One process on a (2, 2) mesh (the reference), and beside it the same run as two
    processes, preempted: a notice reaching one of them makes both save the same step and exit
    143. Rerunning the pair's command ends with the reference's losses, validation metrics and
    training state (parameters, optimizer moments, step), bit for bit."""
    single, preempted = tmp_path / "single", tmp_path / "preempted"
    steps = 30
    running = _start(_flags(gin_cache_root, single, steps, 2), 1)
    running += _start(_flags(gin_cache_root, preempted, steps, 2), 2)
    metrics = preempted / "metrics.jsonl"
    deadline = time.time() + DEADLINE_S
    while not (metrics.is_file() and '"step": 20,' in metrics.read_text()):
        assert all(p.poll() is None for p in running[1:]) and time.time() < deadline
        time.sleep(0.05)
    running[2].send_signal(signal.SIGTERM)  # process 1 of the pair, only
    _finish(running[:1])
    stopped = _finish(running[1:], status=143)
    (step,) = checkpoints.step_dirs(preempted)
    assert 20 <= step < steps
    assert all(f"preempted: saved a checkpoint at step {step}" in err for err in stopped)
    resumed = _finish(_start(_flags(gin_cache_root, preempted, steps, 2), 2))
    assert all(f"resuming from {preempted} at step {step}" in err for err in resumed)

    # Each host fed its own half of every batch: the rows its devices hold.
    for errs in (stopped, resumed):
        fed = sorted(tuple(map(int, ROWS.search(err).groups())) for err in errs)
        assert fed == [(0, 0, 3, 4), (1, 4, 7, 4)], errs
    # Every step's loss (before the preemption and after the resume), the validation metrics
    # (teacher-forced losses, decoded labels gathered from both hosts) and the parameters.
    got, want = _records(preempted, "train"), _records(single, "train")
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    assert [got[s]["loss"] for s in got] == [want[s]["loss"] for s in got]
    got_eval = _records(preempted, "training_eval")[steps]
    want_eval = _records(single, "training_eval")[steps]
    assert {k: got_eval[k] for k in want_eval} == want_eval
    assert_same_arrays(checkpoint_state(preempted), checkpoint_state(single))
