"""Evaluate a checkpoint: `python -m dsbs_jax.eval --gin_file=runs/demo.gin`.

Uses the run's gin file (or MODEL_DIR/config.gin) and its best checkpoint; choose
the split with `--gin.evaluate.split=\\"validation\\"` (default test) and another checkpoint
with `--gin.evaluate.checkpoint=\\"latest\\"` or a step number.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dsbs_jax.gin_utils import run


def _eval(flags: argparse.Namespace) -> object:
    from dsbs_jax import inference  # after gin_utils.run has started TensorFlow quietly

    return inference.evaluate(check=flags.check)


def main(argv: Sequence[str] | None = None) -> int:
    return run(
        _eval,
        argv,
        prog="python -m dsbs_jax.eval",
        description=__doc__,
    )


if __name__ == "__main__":
    sys.exit(main())
