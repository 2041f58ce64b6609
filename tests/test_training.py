"""The training program: learning, sharding parity, resumption, and its failure messages."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import seqio

from dsbs_jax import trainer
from dsbs_jax.checkpoints import Checkpointer
from dsbs_jax.input_pipeline import train_batches
from dsbs_jax.models.t5 import T5, get_config
from dsbs_jax.partitioning import Partitioner
from dsbs_jax.train import main
from tests.conftest import assert_same_arrays, checkpoint_state

LENGTHS = {"inputs": 64, "targets": 64}
MIXTURE = "dsbs_synthetic_step_by_step"


def _batch(rows: int = 8) -> dict[str, np.ndarray]:
    batches = train_batches(MIXTURE, LENGTHS, rows, seqio.ShardInfo(0, 1), seed=0)
    return next(batches)


def _model(vocab_size: int = 128) -> T5:
    config = get_config(
        "tiny", vocab_size=vocab_size, num_heads=4, head_dim=8, dtype=jnp.float32, dropout_rate=0.0
    )
    return T5(config)


def _init(model: T5, partitioner: Partitioner, optimizer):
    def init_params(rng):
        ones = jnp.ones((1, 8), jnp.int32)
        return model.init(rng, ones, ones, enable_dropout=False)["params"]

    params, _ = partitioner.init_sharded(init_params, jax.random.key(0))
    with partitioner.activation_rules():
        state = jax.jit(lambda p: trainer.init_state(p, optimizer))(params)
    return state


def _run_steps(num_partitions: int, batch, steps: int = 3) -> list[float]:
    model, optimizer = _model(), optax.adamw(1e-3)
    partitioner = Partitioner(num_partitions=num_partitions)
    state = _init(model, partitioner, optimizer)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    with partitioner.activation_rules():
        step_fn = jax.jit(
            trainer.make_train_step(model, optimizer),
            in_shardings=(shardings, partitioner.data_sharding, partitioner.replicated),
            out_shardings=(shardings, partitioner.replicated),
        )
        global_batch = partitioner.shard_batch(batch)
        losses = []
        for _ in range(steps):
            state, metrics = step_fn(state, global_batch, jax.random.key(1))
            losses.append(float(metrics["loss"]))
    return losses


def test_loss_goes_down_on_a_fixed_batch(gin_cache_root):
    losses = _run_steps(1, _batch(), steps=40)
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.slow
def test_sharded_training_equals_one_device(gin_cache_root):
    """Meshes (8,1), (4,2), (2,4) against one single-device run."""
    batch = _batch()
    single = Partitioner(num_partitions=1, devices=jax.devices()[:1])
    model, optimizer = _model(), optax.adamw(1e-3)
    state = _init(model, single, optimizer)
    step_fn = jax.jit(trainer.make_train_step(model, optimizer))
    reference = []
    for _ in range(3):
        state, metrics = step_fn(
            state, {k: jnp.asarray(v) for k, v in batch.items()}, jax.random.key(1)
        )
        reference.append(float(metrics["loss"]))
    for num_partitions in (1, 2, 4):
        losses = _run_steps(num_partitions, batch)
        np.testing.assert_allclose(losses, reference, rtol=2e-5, err_msg=f"{num_partitions=}")


@pytest.mark.slow
def test_hardware_rng_dropout_is_repeatable_and_not_threefrys(gin_cache_root):
    """`train.use_hardware_rng`: other dropout masks than threefry's, the same ones every time."""
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    config = get_config(
        "tiny", vocab_size=128, num_heads=4, head_dim=8, dtype=jnp.float32, dropout_rate=0.3
    )
    model, optimizer = T5(config), optax.adamw(1e-3)
    state = _init(model, Partitioner(num_partitions=1, devices=jax.devices()[:1]), optimizer)
    step_fn = jax.jit(trainer.make_train_step(model, optimizer))

    def loss(key):
        return float(step_fn(state, batch, key)[1]["loss"])

    hardware = loss(trainer.dropout_key(1, use_hardware_rng=True))
    assert hardware == loss(trainer.dropout_key(1, use_hardware_rng=True))
    assert hardware != loss(trainer.dropout_key(1))
    assert loss(trainer.dropout_key(1)) == loss(jax.random.key(1))  # the default is threefry


def test_resumed_pipeline_gives_the_next_batch(gin_cache_root):
    fresh = train_batches(MIXTURE, LENGTHS, 4, seqio.ShardInfo(0, 1), seed=3)
    expected = [next(fresh) for _ in range(6)][5]
    resumed = train_batches(MIXTURE, LENGTHS, 4, seqio.ShardInfo(0, 1), seed=3, start_step=5)
    got = next(resumed)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value)


def _flags(data_dir: Path, model_dir: Path, *extra: str) -> list[str]:
    return [
        "--gin_file=runs/base.gin",
        "--gin_file=models/tiny.gin",
        f"--gin.DATA_DIR='{data_dir}'",
        f"--gin.MODEL_DIR='{model_dir}'",
        f"--gin.MIXTURE_OR_TASK_NAME='{MIXTURE}'",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 64}",
        "--gin.BATCH_SIZE=8",
        "--gin.LEARNING_RATE=1e-3",
        "--gin.DROPOUT_RATE=0.0",
        "--gin.train.eval_batch_size=32",
        "--gin.train.max_decode_length=4",
        *extra,
    ]


@pytest.mark.slow
def test_demo_style_run_learns_and_resumes(gin_cache_root, tmp_path, capsys):
    flags = _flags(
        gin_cache_root,
        tmp_path / "run",
        "--gin.TRAIN_STEPS=40",
        "--gin.EVAL_PERIOD=20",
        "--gin.LEARNING_RATE=3e-3",
    )
    assert main(flags) == 0
    out = capsys.readouterr()
    assert "test (checkpoint" in out.out and "test/dsbs_synthetic_label_llm/accuracy" in out.out
    records = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any('"group": "training_eval"' in r for r in records)
    assert (tmp_path / "run" / "config.gin").read_text().count("MIXTURE_OR_TASK_NAME") >= 1
    assert (tmp_path / "run" / "train").is_dir()  # TensorBoard events
    assert main(flags) == 0  # a second run resumes at the end instead of starting over
    assert "already trained to step 40" in capsys.readouterr().err

    # `eval` of the same checkpoint and split reports what training's test reported.
    from dsbs_jax.eval import main as eval_main

    assert eval_main(flags) == 0
    tested = json.loads((tmp_path / "run" / "test_results.json").read_text())
    step = tested["step"]
    evaluated = json.loads((tmp_path / "run" / f"eval_test_checkpoint_{step}.json").read_text())
    assert evaluated.keys() == tested.keys()
    for key in tested:
        np.testing.assert_allclose(evaluated[key], tested[key], rtol=1e-6, err_msg=key)

    # Its parameters alone (`convert --format ours`) evaluate to the same figures.
    from dsbs_jax.convert import main as convert_main

    converted, best = tmp_path / "converted", tmp_path / "run" / "best" / f"checkpoint_{step}"
    assert convert_main(["--from", str(best), "--to", str(converted), "--format", "ours"]) == 0
    capsys.readouterr()
    converted_flags = [
        *flags,
        f"--gin.MODEL_DIR='{converted}'",
        "--gin.evaluate.checkpoint='latest'",
    ]
    assert eval_main(converted_flags) == 0
    assert "test/dsbs_synthetic_label_llm/accuracy = " in capsys.readouterr().out
    again = json.loads((converted / f"eval_test_checkpoint_{step}.json").read_text())
    assert again.keys() == tested.keys()
    for key in tested:
        np.testing.assert_allclose(again[key], tested[key], rtol=1e-6, err_msg=key)

    from dsbs_jax.infer import main as infer_main

    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text('{"id": "q1", "input": "Sam has 2 pens. He buys 3 more pens."}\n')
    out = tmp_path / "predictions.jsonl"
    assert (
        infer_main(
            [
                *flags,
                f"--gin.infer.input_file='{inputs}'",
                f"--gin.infer.output_file='{out}'",
                "--gin.infer.rationales=True",
            ]
        )
        == 0
    )
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["id"] == "q1" and set(row) == {"id", "input", "label", "rationale"}


@pytest.mark.parametrize(
    "extra,message",
    [
        (
            ["--gin.no_such_function.x=1"],
            "error: bad gin configuration: --gin.no_such_function.x: no configurable",
        ),
        (
            ["--gin.MIXTURE_OR_TASK_NAME='dsbs_nope'"],
            "error: No Task or Mixture found with name 'dsbs_nope'.",
        ),
        (
            ["--gin.LEARNING_RATE=1e38", "--gin.TRAIN_STEPS=20", "--gin.train.log_period=1"],
            "error: loss is nan at step",
        ),
    ],
    ids=["unknown-binding", "unknown-task", "nan-loss"],
)
def test_failures_are_one_clear_line(gin_cache_root, tmp_path, capsys, extra, message):
    code = main(_flags(gin_cache_root, tmp_path / "run", "--gin.TRAIN_STEPS=2", *extra))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == 2
    assert len(err) == 1 and err[0].startswith(message), err


@pytest.mark.slow
def test_incompatible_checkpoint_is_refused(gin_cache_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    common = ("--gin.TRAIN_STEPS=2", "--gin.train.test_split=None", "--gin.EVAL_PERIOD=1000")
    assert main(_flags(gin_cache_root, run_dir, *common)) == 0
    capsys.readouterr()
    code = main(_flags(gin_cache_root, run_dir, *common, "--gin.t5_config.mlp_dim=96"))
    err = capsys.readouterr().err
    assert code == 2
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert f"MODEL_DIR {run_dir} holds a model with mlp_dim=64, but the gin config gives " in line
    assert "mlp_dim=96" in line


RUNS_DIR = Path(__file__).parents[1] / "dsbs_jax" / "gin_configs" / "runs"
RUN_CONFIGS = sorted(p.name for p in RUNS_DIR.glob("*.gin"))


@pytest.mark.parametrize("run_config", [r for r in RUN_CONFIGS if r != "base.gin"])
def test_every_run_config_parses_and_names_a_registered_mixture(gin_cache_root, run_config):
    import gin

    from dsbs_jax.gin_utils import parse_gin

    parse_gin([f"runs/{run_config}"], ["MODEL_DIR = '/tmp/unused'"], [])
    name = gin.query_parameter("MIXTURE_OR_TASK_NAME/macro.value")
    assert seqio.get_mixture_or_task(name).name == name
    assert gin.query_parameter("train.train_steps") is not None


@pytest.mark.slow
def test_training_starts_from_an_initial_hugging_face_checkpoint(gin_cache_root, tmp_path):
    """INITIAL_CHECKPOINT_PATH: with a zero learning rate the trained parameters are the
    pretrained ones, and a resumed run no longer reads the initial checkpoint."""
    from dsbs_jax import checkpoint_import

    config = get_config("tiny", vocab_size=128, dtype=jnp.float32)
    ones = jnp.ones((1, 8), jnp.int32)
    pretrained = T5(config).init(jax.random.key(7), ones, ones, enable_dropout=False)["params"]
    pretrained = jax.tree.map(
        lambda x: getattr(x, "value", x), pretrained, is_leaf=lambda x: hasattr(x, "value")
    )
    hf_dir = checkpoint_import.export_hf(pretrained, config, tmp_path / "hf")
    run_dir = tmp_path / "run"
    flags = _flags(
        gin_cache_root,
        run_dir,
        "--gin.TRAIN_STEPS=1",
        "--gin.LEARNING_RATE=0.0",
        "--gin.train.test_split=None",
        "--gin.EVAL_PERIOD=1000",
        f"--gin.INITIAL_CHECKPOINT_PATH='{hf_dir}'",
    )
    assert main(flags) == 0
    assert_same_arrays(checkpoint_state(run_dir)["params"], pretrained)
    (hf_dir / "model.safetensors").unlink()  # resuming must not need it any more
    assert main(flags) == 0


def test_gin_files_resolve_beside_folders_named_like_theirs(gin_cache_root, tmp_path, monkeypatch):
    """A first run writes ./runs/; a second `--gin_file=runs/demo.gin` must still find the
    project's file rather than crash on gin's lookup of `runs` as a Python package."""
    from dsbs_jax.gin_utils import parse_gin

    for folder in ("runs", "models", "data"):
        (tmp_path / folder).mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # as `python -m` puts the working directory
    parse_gin(["runs/demo.gin"], [], [])
    assert gin.query_parameter("MODEL_DIR/macro.value") == "runs/demo"


@pytest.mark.slow
def test_killed_and_preempted_runs_resume_to_the_uninterrupted_parameters(gin_cache_root, tmp_path):
    """Two interrupted copies of a run, side by side, against the run straight through:
    SIGKILL after a periodic checkpoint, and a preempted VM's SIGTERM at a random moment after
    step 20, which saves a checkpoint at the step the run reached (not a multiple of the
    period) and exits 143. Running each one's command again ends bit-identical."""
    common = (
        "--gin.TRAIN_STEPS=60",
        "--gin.EVAL_PERIOD=1000",
        "--gin.train.test_split=None",
        "--gin.train.log_period=1",
    )
    periods = {
        "killed": "--gin.Checkpointer.period=5",
        "preempted": "--gin.Checkpointer.period=1000",
    }
    flags = {
        name: _flags(gin_cache_root, tmp_path / name, *common, p) for name, p in periods.items()
    }
    straight, killed, preempted = (tmp_path / n for n in ("straight", "killed", "preempted"))
    assert main(_flags(gin_cache_root, straight, *common)) == 0

    running = {
        name: subprocess.Popen(
            [sys.executable, "-m", "dsbs_jax.train", *command],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE if name == "preempted" else subprocess.DEVNULL,
            text=True,
            cwd=Path(__file__).parents[1],
        )
        for name, command in flags.items()
    }
    try:
        metrics, deadline, stopped = preempted / "metrics.jsonl", time.time() + 240, set()
        while len(stopped) < 2:
            ended = [n for n, p in running.items() if n not in stopped and p.poll() is not None]
            assert not ended, f"{ended} ended before its stop"
            assert time.time() < deadline, f"only {stopped or 'none'} stopped"
            if "killed" not in stopped and (killed / "checkpoint_5").is_dir():
                running["killed"].send_signal(signal.SIGKILL)
                running["killed"].wait()
                stopped.add("killed")
            reached = metrics.is_file() and '"step": 20,' in metrics.read_text()
            if "preempted" not in stopped and reached:
                time.sleep(random.uniform(0.0, 0.5))
                running["preempted"].send_signal(signal.SIGTERM)
                stopped.add("preempted")
            time.sleep(0.05)
        _, err = running["preempted"].communicate(timeout=240)
    finally:
        for process in running.values():
            process.kill()  # a no-op for those that exited
    with Checkpointer(killed) as ckpt:
        stopped_at = ckpt.latest_step()
    assert stopped_at is not None and stopped_at < 60
    assert running["preempted"].returncode == 143, err
    (step,) = [int(p.name.split("_")[1]) for p in preempted.glob("checkpoint_*")]
    assert 20 <= step < 60
    assert f"preempted: saved a checkpoint at step {step} in {preempted}" in err

    for name, command in flags.items():
        assert main(command) == 0
        assert_same_arrays(checkpoint_state(tmp_path / name), checkpoint_state(straight))


@pytest.mark.slow
def test_the_last_checkpoint_does_not_wait_for_the_last_evaluation(
    gin_cache_root, tmp_path, monkeypatch, capsys
):
    """Stopped during its final validation pass, a run has its last checkpoint already; the
    rerun evaluates that step first, then tests."""
    from dsbs_jax import checkpoints, evaluation

    model_dir = tmp_path / "run"
    flags = _flags(gin_cache_root, model_dir, "--gin.TRAIN_STEPS=3", "--gin.EVAL_PERIOD=1000")

    def interrupted(self, params, split):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(evaluation.SplitEvaluator, "__call__", interrupted)
        assert main(flags) == 130
    assert checkpoints.read_data(model_dir / "checkpoint_3")["pending_eval"] is True
    assert not (model_dir / "best").exists() or not any((model_dir / "best").iterdir())
    capsys.readouterr()
    assert main(flags) == 0
    out = capsys.readouterr()
    assert "validation at step 3:" in out.out + out.err
    assert "already trained to step 3" in out.err
    # Run again, the finished evaluation is not repeated: one record of it, one best checkpoint.
    assert main(flags) == 0
    assert "validation at step 3:" not in "".join(capsys.readouterr())
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["group"] == "training_eval"] == [3]
    assert [p.name for p in (model_dir / "best").iterdir() if p.name.startswith("checkpoint")] == [
        "checkpoint_3"
    ]
    assert (model_dir / "best" / "checkpoint_3").is_dir()
    assert json.loads((model_dir / "test_results.json").read_text())["step"] == 3


@pytest.mark.slow
def test_a_refused_configuration_writes_nothing(gin_cache_root, tmp_path):
    """A setting refused after start-up: one line, exit 2, no traceback from any thread, and
    MODEL_DIR untouched."""
    model_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "dsbs_jax.train",
        *_flags(gin_cache_root, model_dir, "--gin.Partitioner.num_partitions=3"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "num_partitions=3 must be a positive divisor of the number of devices (8)" in line
    assert not model_dir.exists()


def test_check_prints_what_would_run_and_writes_nothing(gin_cache_root, tmp_path, capsys):
    model_dir = tmp_path / "run"
    assert main([*_flags(gin_cache_root, model_dir, "--gin.TRAIN_STEPS=7"), "--check"]) == 0
    out = capsys.readouterr().out
    assert "check: the run is ready" in out
    assert "steps       7, evaluation every" in out
    assert f"MODEL_DIR   {model_dir}: a new run" in out
    assert "mesh        {'data': 8, 'model': 1} over 8 cpu device(s)" in out
    assert "as few microbatches as keep XLA's temporaries within 1 GiB" in out
    assert "test on test, batches of 32 (32 for losses)" in out
    assert not model_dir.exists()
