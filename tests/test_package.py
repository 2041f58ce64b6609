"""The project as users install it: a wheel with its gin files and prompts, a demo that runs
from any directory, and commands whose output holds no framework start-up noise."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A start-up line of TensorFlow, XLA, absl or libtpu (glog format, absl's warning, libtpu's).
FRAMEWORK_LINE = re.compile(
    r"^[IWEF]\d{4} |absl::InitializeLog|InitGoogle|TPU_|libtpu|oneDNN|cuda|cuInit", re.M
)


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", *args], check=True, capture_output=True)


@pytest.mark.slow
def test_a_wheel_installs_and_runs_the_demo_beside_folders_named_like_its_configs(tmp_path):
    """Built as a wheel and installed without -e, the package finds `runs/demo.gin` and its
    includes from a directory holding data/, runs/ and models/ folders. The README's main
    command, shortened to 2 steps on a machine with an empty $HOME, writes the built-in
    dataset first and prints its test accuracy, and its stderr holds no framework start-up
    line (libtpu of the test extras included)."""
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"), str(REPO))
    (wheel,) = (tmp_path / "wheel").glob("dsbs_jax-*.whl")
    site = tmp_path / "site"
    _pip("install", "--no-deps", "--target", str(site), str(wheel))
    assert (site / "dsbs_jax" / "gin_configs" / "runs" / "demo.gin").is_file()
    assert (site / "dsbs_jax" / "prompts" / "cqa.txt").is_file()

    work = tmp_path / "work"
    for folder in ("data", "runs", "models"):
        (work / folder).mkdir(parents=True)
    home = tmp_path / "home"
    env = {**os.environ, "PYTHONPATH": str(site), "HOME": str(home)}
    # As on a user's machine: JAX tries libtpu first, and the data goes under $HOME.
    for name in ("JAX_PLATFORMS", "DSBS_DATA_DIR"):
        env.pop(name, None)
    run_dir = work / "runs" / "demo"
    where = subprocess.run(
        [sys.executable, "-c", "import dsbs_jax; print(dsbs_jax.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=work,
        check=True,
    )
    assert where.stdout.startswith(str(site)), where.stdout
    demo = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsbs_jax.train",
            "--gin_file=runs/demo.gin",
            "--gin.TRAIN_STEPS=2",
            "--gin.EVAL_PERIOD=2",
            f"--gin.MODEL_DIR='{run_dir}'",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=work,
        timeout=600,
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert not FRAMEWORK_LINE.search(demo.stderr), FRAMEWORK_LINE.findall(demo.stderr)
    builtin = home / ".cache" / "dsbs_jax" / "synthetic"
    assert f"writing the built-in dataset and vocabulary to {builtin}" in demo.stderr
    assert (builtin / "train.jsonl").is_file() and (builtin / "spm.model").is_file()
    assert "test/dsbs_synthetic_label_llm/accuracy = " in demo.stdout
    assert (run_dir / "test_results.json").is_file()
    metrics = (run_dir / "metrics.jsonl").read_text()
    for name in ("examples_per_second", "tokens_per_second", "rows_per_second", "step_time_s"):
        assert f'"{name}": ' in metrics
