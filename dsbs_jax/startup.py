"""Framework start-up without its noise: commands print their own lines.

At start-up TensorFlow (loaded for the input pipeline) and JAX's backends log lines that are
not about the run: oneDNN notices, missing CUDA drivers and a failed cuInit on hosts without
GPUs, absl's warning about logging before its initialisation, libtpu's guesses at TPU metadata
on hosts without TPUs. `quiet_start` captures the process's standard error while a framework
starts (the C++ libraries write to the file descriptor, not through Python) and writes back
everything but those lines, so anything else, a real error included, still shows.
`start_tensorflow` also hides accelerators from TensorFlow, as t5x does: JAX owns them, and
TensorFlow only reads data. `--verbose` (or `DSBS_VERBOSE=1`) leaves every line alone.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

VERBOSE_ENV = "DSBS_VERBOSE"

# Start-up lines of TensorFlow, XLA, absl and libtpu. glog-style info and warning lines
# ("I0000 00:00:1796416096.292528    8446 port.cc:153] ...") come only from the frameworks at
# this point; of their error lines, only the known harmless ones.
_NOISE = re.compile(
    r"^[IW]\d{4} [\d:.]+ +\d+ \S+:\d+\]"
    r"|^E\d{4} .*(failed call to cuInit|TPU_WORKER_HOSTNAMES|Unable to register cu(DNN|FFT|BLAS))"
    r"|^WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|^WARNING: Logging before InitGoogle\(\)"
    r"|could not determine TPU (accelerator type|worker hostnames)"
    r"|^=== Source Location Trace: ===\s*$"
    r"|^\S+/libtpu_init_utils\.cc:\d+\s*$"
    r"|^To enable the following instructions: .* in other operations, rebuild TensorFlow"
)


def verbose_requested(argv: list[str]) -> bool:
    """Whether the command line or the environment asks for the frameworks' own logs."""
    return "--verbose" in argv or os.environ.get(VERBOSE_ENV, "") not in ("", "0")


@contextlib.contextmanager
def quiet_start(verbose: bool = False) -> Iterator[None]:
    """Captures standard error while inside, then writes it back less start-up noise."""
    if verbose:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", errors="replace")
            kept = [line for line in text.splitlines(keepends=True) if not _NOISE.search(line)]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def start(verbose_flag: bool) -> bool:
    """Whether the frameworks' logs are wanted (`--verbose`, or DSBS_VERBOSE), passed on to
    what starts later (libtpu's compile-only devices) and to child processes; then TensorFlow,
    started quietly unless they are wanted. Returns whether they are."""
    verbose = verbose_flag or verbose_requested([])
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    start_tensorflow(verbose)
    return verbose


def start_tensorflow(verbose: bool = False) -> None:
    """Imports TensorFlow, quietly, and hides GPUs and TPUs from it (JAX owns them)."""
    with quiet_start(verbose):
        import tensorflow as tf

        try:
            tf.config.set_visible_devices([], "GPU")
            tf.config.set_visible_devices([], "TPU")
        except RuntimeError:  # TensorFlow already ran in this process: it keeps its devices
            pass


def start_jax(verbose: bool = False) -> None:
    """Starts JAX's backends (after `jax.distributed.initialize`, if any), quietly."""
    import jax

    with quiet_start(verbose):
        jax.devices()
