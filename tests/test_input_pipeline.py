"""Resuming the input pipeline from its saved state: the uninterrupted run's batches, bit for
bit, on one process and on several played in one, without running the batches before it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import gin
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf

from dsbs_jax.checkpoints import Checkpointer
from dsbs_jax.data import sources
from dsbs_jax.input_pipeline import (
    DATASET_ITEM,
    TrainBatches,
    TrainBatchesHandler,
    TrainBatchesRestore,
    TrainBatchesSave,
    train_batches,
)

MIXTURE = "dsbs_synthetic_step_by_step"
LENGTHS = {"inputs": 64, "targets": 64}
BATCH_SIZE = 8
SEED = 3
SAVED_AT = 13  # not a multiple of the batch size, the packing window or an epoch
COMPARED = 5  # batches compared after the restore
REPO = Path(__file__).resolve().parents[1]

# (shard_info, host_rows, batch size) of each host: one process; two that keep their rows of
# one global pipeline (the default); two that read their own half of the files.
HOSTS = {
    "one": [(seqio.ShardInfo(0, 1), None, BATCH_SIZE)],
    "rows": [(seqio.ShardInfo(0, 1), rows, BATCH_SIZE) for rows in ([0, 1, 2, 3], [4, 5, 6, 7])],
    "files": [(seqio.ShardInfo(i, 2), None, BATCH_SIZE // 2) for i in range(2)],
}


def _batches(
    host: tuple, pack: bool = True, start_step: int = 0, seed: int = SEED, mixture: str = MIXTURE
) -> TrainBatches:
    shard_info, rows, batch_size = host
    return train_batches(
        mixture, LENGTHS, batch_size, shard_info, seed, pack, start_step, host_rows=rows
    )


def _take(batches: TrainBatches, n: int) -> list[dict[str, np.ndarray]]:
    return [next(batches) for _ in range(n)]


def _assert_equal(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype, (step, key)
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"batch {step} {key}")


def _assert_restores_exactly(hosts: list[tuple], directory: Path, **kwargs) -> None:
    """Each host's pipeline, saved at SAVED_AT and restored by a new one, gives the next
    COMPARED batches of the uninterrupted run."""
    expected = []
    for index, host in enumerate(hosts):
        uninterrupted = _batches(host, **kwargs)
        _take(uninterrupted, SAVED_AT)
        uninterrupted.save(directory, index, len(hosts))
        expected.append(_take(uninterrupted, COMPARED))
    for index, host in enumerate(hosts):
        resumed = _batches(host, start_step=SAVED_AT, **kwargs)
        assert resumed.restore(directory, index, len(hosts))
        _assert_equal(_take(resumed, COMPARED), expected[index])
        assert resumed.position == SAVED_AT + COMPARED
    if len(expected) == 2:  # each host restored its own state, not the other's
        assert not np.array_equal(
            expected[0][0]["decoder_target_tokens"], expected[1][0]["decoder_target_tokens"]
        )


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "unpacked"])
@pytest.mark.parametrize("hosts", list(HOSTS))
def test_restored_batches_are_the_uninterrupted_ones(gin_cache_root, tmp_path, hosts, pack):
    _assert_restores_exactly(HOSTS[hosts], tmp_path, pack=pack)


def test_pipelines_built_without_autograph_give_autographs_batches(gin_cache_root, monkeypatch):
    """Training batches (paired mixture, packed, one host's rows) and evaluation examples are
    built with AutoGraph off (`without_autograph`); built with it, as t5x's own
    `seqio.get_dataset` call would, they are the same."""
    from dsbs_jax import evaluation, input_pipeline

    def built() -> tuple[list[dict], list[dict]]:
        train = _take(_batches(HOSTS["rows"][1]), 3)
        task = seqio.get_mixture_or_task("dsbs_synthetic_label_llm")
        return train, evaluation.read_split(task, "validation", 64, 8)

    ours = built()
    for module in (input_pipeline, evaluation):
        monkeypatch.setattr(module, "without_autograph", lambda build: build)
    train, examples = built()
    _assert_equal(ours[0], train)
    np.testing.assert_equal(ours[1], examples)  # token arrays and the examples' strings


@pytest.mark.parametrize("method", ["step_by_step_rates", "finetune", "single_task"])
def test_other_mixtures_restore_exactly(gin_cache_root, tmp_path, method):
    """Mixtures sampled at rates (seqio's sampling, each task shuffled on its own) and single
    tasks, besides the paired mixture."""
    _assert_restores_exactly(HOSTS["one"], tmp_path, mixture=f"dsbs_synthetic_{method}")


def test_tfds_build_read_per_host_restores_exactly(gin_cache_root, tmp_path):
    """The pod path: each host reads its own TFRecord files of the cache's TFDS build."""
    from dsbs_jax.data import tfds_cache

    tfds_cache.build_tfds(
        gin_cache_root / "synthetic", "synthetic", tmp_path / "tfds", num_shards=2
    )
    with gin.unlock_config():
        gin.bind_parameter("teacher_cache_tfds_dir.path", str(tmp_path / "tfds"))
    _assert_restores_exactly(HOSTS["files"], tmp_path / "state")


@pytest.fixture
def source_reads(monkeypatch) -> list[int]:
    """[records the sources have read]: counted as each record leaves the cache file."""
    reads = [0]

    def count(index: np.ndarray) -> np.ndarray:
        reads[0] += 1
        return index

    layout = sources._record_layout

    def counted(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        ex = layout(ex)
        index = tf.numpy_function(count, [ex["index"]], tf.int64, stateful=False)
        return {**ex, "index": tf.ensure_shape(index, [])}

    monkeypatch.setattr(sources, "_record_layout", counted)
    return reads


def test_restoring_does_not_replay(gin_cache_root, tmp_path, source_reads):
    """A restore at step 200 reads no more than a fresh start does to its first batch; reaching
    step 200 (what a restore without the state does) reads several times that."""
    with gin.unlock_config():  # a small packing window, so little is read ahead
        gin.bind_parameter("StepByStepFeatureConverter.first_fit_window", 32)
    host = HOSTS["one"][0]
    uninterrupted = _batches(host)
    next(uninterrupted)
    fresh_first = source_reads[0]
    for step in (5, 200):
        _take(uninterrupted, step - uninterrupted.position)
        uninterrupted.save(tmp_path / str(step), 0, 1)
    reads_to_200 = source_reads[0]
    restore_reads = {}
    for step in (5, 200):
        before = source_reads[0]
        resumed = _batches(host, start_step=step)
        assert resumed.restore(tmp_path / str(step), 0, 1)
        next(resumed)
        restore_reads[step] = source_reads[0] - before
    assert restore_reads[200] <= fresh_first and restore_reads[5] <= fresh_first, restore_reads
    assert reads_to_200 > 2 * fresh_first, (reads_to_200, fresh_first)


@pytest.mark.parametrize(
    "change, why",
    [
        ({"start_step": SAVED_AT + 1}, f"is batch {SAVED_AT}, not {SAVED_AT + 1}"),
        ({"seed": SEED + 1}, "is of other pipeline settings"),
        ({"process": (1, 2)}, "holds no input position of process 1 of 2"),
    ],
    ids=["position", "settings", "process"],
)
def test_unusable_state_falls_back_to_running_the_batches_before(
    gin_cache_root, tmp_path, capsys, change, why
):
    host = HOSTS["one"][0]
    saved = _batches(host)
    _take(saved, SAVED_AT)
    saved.save(tmp_path, 0, 1)
    start, seed = change.get("start_step", SAVED_AT), change.get("seed", SEED)
    expected = _take(_batches(host, seed=seed), start + 1)[-1]  # an uninterrupted run's

    resumed = _batches(host, start_step=start, seed=seed)
    assert not resumed.restore(tmp_path, *change.get("process", (0, 1)))
    capsys.readouterr()
    _assert_equal([next(resumed)], [expected])
    err = capsys.readouterr().err
    assert why in err
    assert f"reaching batch {start} by running the {start} batches before it" in err


def test_restore_after_the_first_batch_is_refused(gin_cache_root, tmp_path):
    batches = _batches(HOSTS["one"][0])
    next(batches)
    batches.save(tmp_path, 0, 1)
    with pytest.raises(RuntimeError, match="before the first batch"):
        batches.restore(tmp_path, 0, 1)


def test_a_stage_without_savable_state_fails_the_save(tmp_path):
    """A Python generator's position cannot be saved: the save fails, rather than a resumed run
    seeing other batches."""

    def numbers():
        yield from ({"x": np.full([2], i)} for i in range(10))

    spec = {"x": tf.TensorSpec([2], tf.int64)}
    batches = TrainBatches(tf.data.Dataset.from_generator(numbers, output_signature=spec), 0, {})
    assert next(batches)["x"].tolist() == [0, 0]
    with pytest.raises(tf.errors.FailedPreconditionError, match="stateful"):
        batches.save(tmp_path, 0, 1)


def _checkpointer(model_dir: Path) -> Checkpointer:
    """Opened as training opens it (in the background), with the dataset item."""
    return Checkpointer(
        model_dir,
        period=1,
        async_save=True,
        extra_handlers={DATASET_ITEM: TrainBatchesHandler()},
    )


def _assert_resumes_at_saved_step(ckpt: Checkpointer, host: tuple, expected: list[dict]) -> None:
    """The latest checkpoint is SAVED_AT's, and the input position saved with it gives the
    batches after it: `expected`, without running the ones before."""
    assert ckpt.latest_step() == SAVED_AT
    resumed = _batches(host, start_step=SAVED_AT)
    assert ckpt.restore_item(DATASET_ITEM, TrainBatchesRestore(resumed)) is True
    _assert_equal(_take(resumed, COMPARED), expected)


def test_checkpoint_with_the_dataset_item(gin_cache_root, tmp_path, capsys):
    """Saved with the training state at an arbitrary step, restored from the latest checkpoint;
    a checkpoint saved without the item (as before it existed) still restores, by replay."""
    host = HOSTS["one"][0]
    uninterrupted = _batches(host)
    state = {"w": jnp.arange(3.0)}
    with _checkpointer(tmp_path) as ckpt:
        _take(uninterrupted, 4)
        ckpt.save(4, state, {"step": 4})  # no dataset item
        _take(uninterrupted, SAVED_AT - 4)
        ckpt.save(SAVED_AT, state, {}, extra={DATASET_ITEM: TrainBatchesSave(uninterrupted)})
        expected = _take(uninterrupted, COMPARED)
    with _checkpointer(tmp_path) as ckpt:
        _assert_resumes_at_saved_step(ckpt, host, expected)

        old = _batches(host, start_step=4)
        assert ckpt.restore_item(DATASET_ITEM, TrainBatchesRestore(old), step=4) is None
        assert ckpt.restore(state, step=4)[1] == {"step": 4}
        capsys.readouterr()
        _assert_equal(_take(old, SAVED_AT - 4 + COMPARED)[-COMPARED:], expected)
    assert "no saved input position; reaching batch 4" in capsys.readouterr().err


KILLED_MID_SAVE = """
import os, signal, sys
import gin, jax.numpy as jnp, seqio
import tasks
from dsbs_jax import input_pipeline
from tests.test_input_pipeline import HOSTS, _batches, _checkpointer, _take

gin.bind_parameter("teacher_cache_root.path", sys.argv[1])
save = input_pipeline.TrainBatches.save

def save_then_die(self, directory, *args):
    save(self, directory, *args)
    if self.position == {killed_at}:  # the dataset is written, the checkpoint not yet committed
        os.kill(os.getpid(), signal.SIGKILL)

input_pipeline.TrainBatches.save = save_then_die
batches = _batches(HOSTS["one"][0])
ckpt = _checkpointer(sys.argv[2])
for step in ({saved_at}, {killed_at}):
    _take(batches, step - batches.position)
    extra = {{input_pipeline.DATASET_ITEM: input_pipeline.TrainBatchesSave(batches)}}
    ckpt.save(step, {{"w": jnp.full(3, step)}}, {{}}, extra=extra)
    ckpt.wait_until_finished()
"""


@pytest.mark.slow
def test_save_killed_midway_leaves_the_previous_checkpoint(gin_cache_root, tmp_path):
    """SIGKILL inside the save of step 20, after the dataset item is written: the checkpoint of
    step 13 is the latest and resumes exactly; the unfinished one is not taken for a checkpoint."""
    killed_at = 20
    script = KILLED_MID_SAVE.format(saved_at=SAVED_AT, killed_at=killed_at)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), str(gin_cache_root), str(tmp_path)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == -9, run.stderr[-2000:]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f"checkpoint_{killed_at}")]
    assert leftovers and all("tmp" in name for name in leftovers), leftovers

    host = HOSTS["one"][0]
    uninterrupted = _batches(host)
    _take(uninterrupted, SAVED_AT)
    expected = _take(uninterrupted, COMPARED)
    with _checkpointer(tmp_path) as ckpt:
        _assert_resumes_at_saved_step(ckpt, host, expected)
