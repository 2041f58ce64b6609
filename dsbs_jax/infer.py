"""Write a student's predictions as JSON lines: `python -m dsbs_jax.infer --gin_file=runs/demo.gin`.

Labels only by default; `--gin.infer.rationales=True` also generates rationales.
Inputs come from `--gin.infer.input_file=\\"inputs.jsonl\\"` (one {"id", "input"} a line) or
the split `--gin.infer.split` of the run's label task.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dsbs_jax.gin_utils import run


def _infer(flags: argparse.Namespace) -> object:
    from dsbs_jax import inference  # after gin_utils.run has started TensorFlow quietly

    return inference.infer(check=flags.check)


def main(argv: Sequence[str] | None = None) -> int:
    return run(
        _infer,
        argv,
        prog="python -m dsbs_jax.infer",
        description=__doc__,
    )


if __name__ == "__main__":
    sys.exit(main())
