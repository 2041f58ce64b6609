"""Noticing that a run is being preempted, on every host at the same step.

A Cloud TPU VM that is preempted or taken for maintenance receives SIGTERM, and the process
is killed some seconds later; on a pod slice only some hosts may get it. Training asks
`PreemptionWatch.reached(step)` after every step. With several processes this is JAX's
preemption sync point (`multihost_utils.reached_preemption_sync_point`, as t5x and MaxText
use it): the coordination service passes any host's SIGTERM to all of them, and they agree on
the step at which every one answers True. With one process, a SIGTERM handler sets a flag.
The training program then saves a checkpoint at that step and exits with `EXIT_PREEMPTED`.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import jax
from jax.experimental import multihost_utils

# What a run that stopped for a preemption exits with: 128 + SIGTERM, as a shell reports a
# process that SIGTERM ended, so a scheduler sees an unfinished run to start again.
EXIT_PREEMPTED = 128 + signal.SIGTERM


class Preempted(Exception):
    """The run saved a checkpoint at `step` and stopped because it is being preempted."""

    def __init__(self, step: int, model_dir: str) -> None:
        super().__init__(
            f"preempted: saved a checkpoint at step {step} in {model_dir}; "
            "run the same command again to resume there"
        )
        self.step = step


class PreemptionWatch:
    """Whether SIGTERM reached this run (any of its hosts), answered at the same step on all.

    Use it as a context manager around training: with one process it installs the SIGTERM
    handler on entry and puts the previous one back on exit.
    """

    def __init__(self) -> None:
        self._multihost = jax.process_count() > 1
        self._signalled = threading.Event()
        self._previous: object = None

    def __enter__(self) -> PreemptionWatch:
        if not self._multihost:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._multihost:
            signal.signal(signal.SIGTERM, self._previous)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        del signum, frame
        self._signalled.set()

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step`; call it after every step, on every host."""
        if self._multihost:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._signalled.is_set()
