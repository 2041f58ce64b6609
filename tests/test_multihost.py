"""Multi-process training for real: 2 processes on 127.0.0.1, gloo CPU collectives.

Each process has 2 CPU devices. A pair trains on a (2, 2) mesh: its per-step losses and
validation metrics match one process's on 4 devices, and the same pair preempted and rerun ends
with the same parameters. Every launch is a subprocess with a deadline, so a hang fails the
test instead of blocking it.
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
from dsbs_jax.input_pipeline import train_batches
from tests.conftest import cpu_xla_flags

REPO = Path(__file__).resolve().parents[1]
BATCH_SIZE = 8
DEADLINE_S = 300  # per launch; about 2 minutes on a busy 2-core machine
# The same batches and the same program: only the order in which partial sums meet differs
# (gloo all-reduces across processes, the (2, 2) mesh's model-parallel sums), so results differ
# by float32 rounding. Measured: at most 1.7e-7 relative over 30 steps and the evaluation.
RTOL = 2e-6
ROWS = re.compile(r"host (\d) of 2 reads all files and feeds rows (\d+)\.\.(\d+) \((\d+)\)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
def test_two_processes_match_one_and_a_preempted_pair_resumes_bit_identical(
    gin_cache_root, tmp_path
):
    """Three runs side by side: one process (the reference), two processes straight, and the
    same two-process command preempted: a notice reaching one of its processes makes both save
    the same step and exit 143, and rerunning the command ends with the straight pair's
    parameters, bit for bit."""
    single, straight, preempted = tmp_path / "single", tmp_path / "straight", tmp_path / "preempted"
    steps = 30
    running = _start(_flags(gin_cache_root, single, steps, 1), 1)
    running += _start(_flags(gin_cache_root, straight, steps, 2), 2)
    running += _start(_flags(gin_cache_root, preempted, steps, 2), 2)
    metrics = preempted / "metrics.jsonl"
    deadline = time.time() + DEADLINE_S
    while not (metrics.is_file() and '"step": 20,' in metrics.read_text()):
        assert all(p.poll() is None for p in running[3:]) and time.time() < deadline
        time.sleep(0.05)
    running[4].send_signal(signal.SIGTERM)  # process 1 of the preempted pair, only
    first = _finish(running[:3])[1:]
    stopped = _finish(running[3:], status=143)
    (step,) = checkpoints.step_dirs(preempted)
    assert 20 <= step < steps
    assert all(f"preempted: saved a checkpoint at step {step}" in err for err in stopped)
    resumed = _finish(_start(_flags(gin_cache_root, preempted, steps, 2), 2))
    assert all(f"resuming from {preempted} at step {step}" in err for err in resumed)

    # Each host fed its own half of every batch: the rows its devices hold.
    for errs in (first, stopped, resumed):
        fed = sorted(tuple(map(int, ROWS.search(err).groups())) for err in errs)
        assert fed == [(0, 0, 3, 4), (1, 4, 7, 4)], errs
    # The pair on a (2, 2) mesh computes what one process does on (4, 1).
    got, want = _records(straight, "train"), _records(single, "train")
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    np.testing.assert_allclose(
        [got[s]["loss"] for s in got], [want[s]["loss"] for s in got], rtol=RTOL
    )
    # Evaluation (teacher-forced losses, decoded labels) gathers the same results on 2 hosts.
    got_eval = _records(straight, "training_eval")[steps]
    want_eval = _records(single, "training_eval")[steps]
    assert got_eval.keys() == want_eval.keys()
    for key in got_eval.keys() - {"step", "group"}:
        np.testing.assert_allclose(got_eval[key], want_eval[key], rtol=RTOL, err_msg=key)
    for a, b in zip(_final_params(preempted), _final_params(straight), strict=True):
        np.testing.assert_array_equal(a, b)
