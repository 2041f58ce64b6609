"""Train a T5 student: `python -m dsbs_jax.train --gin_file=runs/demo.gin [--gin.NAME=value]`.

A thin command line over `dsbs_jax.training.train`. `--check` checks the configuration, data,
devices and MODEL_DIR, prints what would run and exits; `--verbose` shows the frameworks'
start-up logs. Exit status: 0 done, 2 a mistake to fix (one line says which), 143 preempted
(a checkpoint was saved: run the same command again), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dsbs_jax.gin_utils import run


def _train(flags: argparse.Namespace) -> object:
    from dsbs_jax import training  # after gin_utils.run has started TensorFlow quietly

    return training.train(check=flags.check)


def main(argv: Sequence[str] | None = None) -> int:
    return run(
        _train,
        argv,
        prog="python -m dsbs_jax.train",
        description=__doc__,
    )


if __name__ == "__main__":
    sys.exit(main())
