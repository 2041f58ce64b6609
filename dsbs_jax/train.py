"""Train a T5 student: `python -m dsbs_jax.train --gin_file=runs/demo.gin [--gin.NAME=value]`.

A thin command line over `dsbs_jax.training.train`; gin files import
`dsbs_jax.training`, so the configurables have one home whatever runs as __main__.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from dsbs_jax import training
from dsbs_jax.gin_utils import run


def main(argv: Sequence[str] | None = None) -> int:
    return run(
        lambda: training.train(),
        argv,
        prog="python -m dsbs_jax.train",
        description=__doc__,
        extra_errors=(training.NonFiniteLossError,),
    )


if __name__ == "__main__":
    sys.exit(main())
