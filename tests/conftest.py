"""Shared fixtures: the official archive (optional) and a small built-in cache made here."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# The tests' models are tiny, so compiling their programs takes longer than running them: with
# LLVM's optimizations off (`COMPILE_FAST`) the vectorized sweep's test took 90 s instead of 125.
COMPILE_FAST = "--xla_backend_optimization_level=0"


def cpu_xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test's process: `devices` host CPU devices, compiled fast."""
    return f"{COMPILE_FAST} --xla_force_host_platform_device_count={devices}"


# Set before JAX starts, for every test and every command a test launches (they inherit the
# environment; one that needs other devices passes its own `cpu_xla_flags`). Eight host CPU
# devices, so sharding tests can build real meshes.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {cpu_xla_flags(8)}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache for the whole run, shared by the xdist workers and the
# commands tests launch (they inherit the environment): many tests compile the same tiny
# programs. Each run starts empty, so the suite's time is a cold start's. The size limit turns
# on JAX's file lock, so concurrent processes never read a half-written entry.
_OWN_COMPILATION_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_COMPILATION_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dsbs_jax_test_jit_")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))

import gin  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_unconfigure(config: pytest.Config) -> None:
    if _OWN_COMPILATION_CACHE:  # the process that made the cache removes it
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests run first: with xdist handing out one test at a time (`--maxschedchunk=1`
    in pyproject.toml), the workers then finish together instead of one waiting on a long
    test that started last."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable


# The official teacher outputs live beside the checkout (../shared/data/dsbs); never copied in.
OFFICIAL_DATA = Path(
    os.environ.get("DSBS_OFFICIAL_DATA", Path(__file__).resolve().parents[2] / "shared/data/dsbs")
)
needs_official_data = pytest.mark.skipif(
    not (OFFICIAL_DATA / "cqa").is_dir(),
    reason=f"official teacher outputs not found at {OFFICIAL_DATA} (set DSBS_OFFICIAL_DATA)",
)


def free_port() -> int:
    """A loopback port nothing listens on: bound for a moment, then closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def checkpoint_state(model_dir: Path, step: int | str = "latest") -> dict:
    """A checkpoint's training state as numpy arrays, read without the shardings it was written
    with: its writers' devices (two processes', a stacked sweep's) need not be this one's."""
    import jax
    import orbax.checkpoint as ocp

    from dsbs_jax import checkpoints

    _, step_dir = checkpoints.checkpoint_dir(model_dir, step)
    metadata = checkpoints.state_metadata(step_dir)
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    return ocp.PyTreeCheckpointer().restore(
        step_dir / checkpoints.STATE_ITEM, restore_args=as_numpy
    )


def assert_same_arrays(got: Any, want: Any) -> None:
    """Two trees of arrays equal bit for bit, leaf by named leaf."""
    import jax

    got, want = (
        {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(t)}
        for t in (got, want)
    )
    assert got.keys() == want.keys()
    for name, leaf in want.items():
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(leaf), err_msg=name)


@pytest.fixture(scope="session")
def builtin_cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache root with a small synthetic dataset and its trained vocabulary."""
    from dsbs_jax.data import cache, synthetic, vocab

    root = tmp_path_factory.mktemp("caches")
    config = synthetic.SyntheticConfig(num_train=120, num_valid=24, num_test=24, seed=0)
    cache.write_splits(root / synthetic.DATASET_NAME, synthetic.generate(config))
    vocab.train_vocab_for_cache(root / synthetic.DATASET_NAME, vocab_size=128)
    return root


@pytest.fixture
def gin_cache_root(builtin_cache_root: Path) -> Iterator[Path]:
    """Points the tasks at the built-in cache through gin, as a run's config would; the gin
    config cleared at the end."""
    import tasks  # noqa: F401  (registers the tasks)

    with gin.unlock_config():
        gin.bind_parameter("teacher_cache_root.path", str(builtin_cache_root))
    yield builtin_cache_root
    gin.clear_config()


@pytest.fixture(scope="session")
def choices_cache_root(builtin_cache_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in cache whose valid and test records list five candidate labels (`choices`):
    the gold label and the four numbers around it."""
    import dataclasses
    import shutil

    from dsbs_jax.data import cache, synthetic

    root = tmp_path_factory.mktemp("choices_caches")
    shutil.copytree(builtin_cache_root / synthetic.DATASET_NAME, root / synthetic.DATASET_NAME)
    for split in ("valid", "test"):
        path = cache.split_path(root / synthetic.DATASET_NAME, split)
        records = [
            dataclasses.replace(r, choices=tuple(str(int(r.label) + d) for d in (-2, -1, 0, 1, 2)))
            for r in cache.read_records(path)
        ]
        cache.write_records(path, records)
    return root
