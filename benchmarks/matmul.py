"""FLOP rate of one matrix multiply in XLA (ours) and PyTorch (baseline), float32 and bfloat16.

    python -m benchmarks.matmul --json benchmarks/results/matmul.json

Both training and label decoding are bound by matrix multiplies on CPU, so the FLOP rate each
framework reaches on one multiply of the training step's shape bounds what either side can do.
The default shape is the T5-small logits projection of a training step: 1216 target tokens of
width 512 times the 512 x 32128 output embedding.

Each dtype multiplies operands of that dtype. For bfloat16, the script also reports the element
type of the dot that XLA compiled: where the backend has no bfloat16 dot, XLA converts the
operands to float32 first, and the rate is the float32 one or lower. PyTorch runs bfloat16
through oneDNN, which uses AMX tiles on CPUs that have them.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks import common

DTYPES = ("float32", "bfloat16")
FIGURES = tuple((f"gflops_{dtype}", "GFLOP/s", "higher") for dtype in DTYPES)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, prog="python -m " + __spec__.name)
    common.add_side_args(parser)
    parser.add_argument("--m", type=int, default=1216, help="rows of the left operand")
    parser.add_argument("--k", type=int, default=512, help="contracted dimension")
    parser.add_argument("--n", type=int, default=32128, help="columns of the right operand")
    return parser


def _gflops(args: argparse.Namespace, seconds: Sequence[float]) -> float:
    flops = 2 * args.m * args.k * args.n
    return common.median_rate([flops / 1e9] * len(seconds), seconds)


def _seconds(args: argparse.Namespace, multiply: Callable[[], Any]) -> list[float]:
    """Wall-clock seconds of each timed call, after one call and `--warmup` more."""
    for _ in range(1 + args.warmup):
        multiply()
    return [common.timed(multiply)[0] for _ in range(args.steps)]


def compiled_dot_dtype(hlo_text: str) -> str:
    """The element type of the first dot (or library fusion running one) in compiled HLO."""
    for line in hlo_text.splitlines():
        if re.search(r"= \w+\[[^\]]*\]\S* (dot\(|fusion\(.*kind=kCustom)", line):
            return line.split("=", 1)[1].strip().split("[", 1)[0]
    raise ValueError("no dot in the compiled HLO")


def _until_ready(fn: Callable[..., Any], *operands: Any) -> Any:
    """`fn(*operands)`, waited for: JAX dispatches asynchronously."""
    return fn(*operands).block_until_ready()


def ours(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    result: dict[str, Any] = {"jax": jax.__version__}
    for dtype in DTYPES:
        a = jnp.ones((args.m, args.k), dtype)
        b = jnp.ones((args.k, args.n), dtype)
        compiled = jax.jit(jnp.matmul).lower(a, b).compile()
        result[f"xla_dot_dtype_{dtype}"] = compiled_dot_dtype(compiled.as_text())
        run = functools.partial(_until_ready, compiled, a, b)
        result[f"gflops_{dtype}"] = _gflops(args, _seconds(args, run))
    return result


def baseline(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"torch": torch.__version__}
    for dtype in DTYPES:
        a = torch.ones((args.m, args.k), dtype=getattr(torch, dtype))
        b = torch.ones((args.k, args.n), dtype=getattr(torch, dtype))
        with torch.inference_mode():
            run = functools.partial(torch.matmul, a, b)
            result[f"gflops_{dtype}"] = _gflops(args, _seconds(args, run))
    return result


SIDE_FNS = {"ours": ours, "baseline": baseline}


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if common.child_main(args, SIDE_FNS):
        return None
    results = common.run_sides(__spec__.name, argv, args, SIDE_FNS)
    for dtype in DTYPES:
        compiled = results.get("ours", {}).get(f"xla_dot_dtype_{dtype}")
        if compiled is not None:
            print(f"matmul ours {dtype} operands: XLA compiled a {compiled} dot", flush=True)
    return common.report("matmul", args, results, FIGURES)


if __name__ == "__main__":
    main()
