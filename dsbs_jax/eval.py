"""Evaluate a checkpoint: `python -m dsbs_jax.eval --gin_file=runs/demo.gin`.

Uses the run's gin file (or MODEL_DIR/config.gin) and its best checkpoint; choose
the split with `--gin.evaluate.split=\\"validation\\"` (default test) and another checkpoint
with `--gin.evaluate.checkpoint=\\"latest\\"` or a step number.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from dsbs_jax import inference
from dsbs_jax.gin_utils import run


def main(argv: Sequence[str] | None = None) -> int:
    return run(
        lambda: inference.evaluate(),
        argv,
        prog="python -m dsbs_jax.eval",
        description=__doc__,
    )


if __name__ == "__main__":
    sys.exit(main())
