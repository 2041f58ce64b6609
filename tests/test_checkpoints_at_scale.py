"""Checkpoints as big runs write them: MODEL_DIR on gs:// and asynchronous saves killed mid-write.

gs:// is served by a GCS emulator (`gcp-storage-emulator`) on loopback that the tests start:
TensorStore (orbax's arrays) reaches it through TENSORSTORE_GCS_HTTP_URL, and etils.epath
(orbax's other files) through gcsfs, which reads STORAGE_EMULATOR_HOST; EPATH_USE_TF=false
sends epath to gcsfs, since TensorFlow's GCS file system cannot be pointed at an emulator.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from etils import epath

from dsbs_jax.checkpoints import Checkpointer
from tests.conftest import free_port

pytest.importorskip("gcp_storage_emulator")
pytest.importorskip("gcsfs")
BUCKET = "dsbs-test"


# The emulator, in a process of its own as a real server is, made to answer downloads as GCS
# does: with the object's generation in `x-goog-generation`. TensorStore reads it there; without
# it, a checkpoint write that found its OCDBT manifest already written (a write retried under
# load) failed with "Malformed StorageGeneration". Its HTTP server queues more connections
# than http.server's 5, since TensorStore opens several at once.
EMULATOR = textwrap.dedent(
    """
    import sys
    from http import HTTPStatus, server

    from gcp_storage_emulator.handlers import objects

    download = objects.download

    def download_with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            obj = storage.get_file_obj(
                request.params["bucket_name"], request.params["object_id"]
            )
            response["x-goog-generation"] = obj["generation"]
            response["x-goog-metageneration"] = obj["metageneration"]

    class QueueingServer(server.HTTPServer):
        request_queue_size = 256

    objects.download = download_with_generation  # before the server's routes take it
    server.HTTPServer = QueueingServer
    from gcp_storage_emulator.server import Server

    port, bucket = int(sys.argv[1]), sys.argv[2]
    Server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()
    """
)


@pytest.fixture(scope="module")
def gcs_env() -> dict[str, str]:
    """Starts the emulator with one bucket; yields the environment that points GCS clients at
    it. TensorStore sends it a few requests at a time: it serves one at a time."""
    port = free_port()
    emulator = subprocess.Popen(
        [sys.executable, "-c", EMULATOR, str(port), BUCKET],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert emulator.poll() is None and time.time() < deadline, "no emulator started"
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        yield {
            "EPATH_USE_TF": "false",
            "STORAGE_EMULATOR_HOST": url,
            "TENSORSTORE_GCS_HTTP_URL": url,
            "TENSORSTORE_GCS_REQUEST_CONCURRENCY": "4",
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # TensorStore's fixed token: no login
            "FSSPEC_GCS": '{"use_listings_cache": false}',  # see what other processes wrote
        }
    finally:
        emulator.kill()
        emulator.wait()


@pytest.fixture
def on_gcs(gcs_env, monkeypatch):
    for name, value in gcs_env.items():
        monkeypatch.setenv(name, value)
    from etils.epath import gpath

    gpath._is_tf_installed.cache_clear()  # epath caches its TensorFlow check
    yield
    gpath._is_tf_installed.cache_clear()


def _state(step: int, rows: int = 8) -> dict:
    mesh = jax.make_mesh((2,), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    weights = np.arange(rows * 256, dtype=np.float32).reshape(rows, 256) + step
    return {"w": jax.device_put(weights, sharding), "step": jax.numpy.asarray(step)}


def _abstract(state: dict) -> dict:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def test_gcs_model_dir_keeps_recent_and_best_and_restores(on_gcs):
    model_dir = f"gs://{BUCKET}/run"
    with Checkpointer(model_dir, keep=2, best_metric="acc", async_save=True) as ckpt:
        for step, acc in [(1, 0.9), (2, 0.5), (3, 0.7)]:
            ckpt.save(step, _state(step), {"step": step}, force=True)
            ckpt.save_best(step, _state(step), {"step": step}, {"acc": acc})
    with Checkpointer(model_dir, keep=2, best_metric="acc") as ckpt:
        assert (ckpt.latest_step(), ckpt.best_step()) == (3, 1)
        state, data = ckpt.restore(_abstract(_state(0)))
        best, _ = ckpt.restore(_abstract(_state(0)), best=True)
    assert data == {"step": 3}
    np.testing.assert_array_equal(state["w"], _state(3)["w"])
    np.testing.assert_array_equal(best["w"], _state(1)["w"])
    names = {p.name for p in epath.Path(model_dir).iterdir()}
    assert {"checkpoint_2", "checkpoint_3"} <= names and "checkpoint_1" not in names


# Saves step 1 and waits for it, starts an asynchronous save of step 2 (16 MiB) and is
# killed as soon as the background write has made step 2's folder.
_KILLED_WRITER = """
import os, signal, sys, time
import jax
from etils import epath
jax.config.update("jax_platforms", "cpu")
sys.path.insert(0, {tests!r})
from test_checkpoints_at_scale import _state
from dsbs_jax.checkpoints import Checkpointer
ckpt = Checkpointer({model_dir!r}, async_save=True)
ckpt.save(1, _state(1, rows={rows}), {{"step": 1}}, force=True)
ckpt.wait_until_finished()
ckpt.save(2, _state(2, rows={rows}), {{"step": 2}}, force=True)
while not any("checkpoint_2" in p.name for p in epath.Path({model_dir!r}).iterdir()):
    time.sleep(0.005)
os.kill(os.getpid(), signal.SIGKILL)
"""
ROWS = 2**14  # 16 MiB of float32: still being written when the kill comes


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "gcs"])
def test_kill_during_async_save_keeps_previous_checkpoint(where, gcs_env, tmp_path, request):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if where == "gcs":
        request.getfixturevalue("on_gcs")
        env.update(gcs_env)
        model_dir = f"gs://{BUCKET}/killed"
    else:
        model_dir = str(tmp_path / "killed")
    script = _KILLED_WRITER.format(tests=str(Path(__file__).parent), model_dir=model_dir, rows=ROWS)
    process = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]
    # The kill came mid-write: step 2's files were started but never committed.
    started = [p.name for p in epath.Path(model_dir).iterdir() if "checkpoint_2" in p.name]
    assert started, "the save had not started when the process was killed"

    with Checkpointer(model_dir, async_save=True) as ckpt:
        assert ckpt.latest_step() == 1
        state, data = ckpt.restore(_abstract(_state(0, ROWS)))
        assert data == {"step": 1}
        np.testing.assert_array_equal(state["w"], _state(1, ROWS)["w"])
        # The run resumes: step 2 is written again, completely this time.
        ckpt.save(2, _state(2, ROWS), {"step": 2}, force=True)
    with Checkpointer(model_dir) as ckpt:
        assert ckpt.latest_step() == 2
        state, _ = ckpt.restore(_abstract(_state(0, ROWS)))
    np.testing.assert_array_equal(state["w"], _state(2, ROWS)["w"])
