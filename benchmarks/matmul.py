"""FLOP rate of one matrix multiply in XLA (ours) and PyTorch (baseline), by precision.

    python -m benchmarks.matmul --json benchmarks/results/matmul.json

Both training and label decoding are bound by matrix multiplies on CPU, so the FLOP rate each
framework reaches on one multiply of the training step's shape bounds what either side can do.
The default shape is the T5-small logits projection of a training step: 1216 target tokens of
width 512 times the 512 x 32128 output embedding.

Precisions: `float32`; `bfloat16`, operands and result in bfloat16; `bfloat16_f32`,
bfloat16 operands with a float32 result, which is how `dsbs_jax.models.mixed_precision`
multiplies (PyTorch has no such call, and its bfloat16 matmul accumulates in float32 anyway,
so its two bfloat16 figures are the same call). For ours, the script also reports whether XLA
compiled the multiply on float32 copies of bfloat16 operands: XLA:CPU does that for a dot with
a bfloat16 result, and runs bfloat16 kernels (AMX or AVX512-BF16 where the CPU has them) only
for a float32 result. PyTorch runs bfloat16 through oneDNN.
"""

from __future__ import annotations

import argparse
import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks import common

# precision: (operand dtype, result dtype)
PRECISIONS = {
    "float32": ("float32", "float32"),
    "bfloat16": ("bfloat16", "bfloat16"),
    "bfloat16_f32": ("bfloat16", "float32"),
}
FIGURES = tuple((f"gflops_{name}", "GFLOP/s", "higher") for name in PRECISIONS)


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


def _definitions(hlo_text: str) -> dict[str, tuple[str, list[int]]]:
    """Each instruction of compiled HLO text: name -> (element type, dimensions)."""
    return {
        name: (dtype, [int(d) for d in dims.split(",") if d])
        for name, dtype, dims in re.findall(r"(%[\w.-]+) = (\w+)\[([\d,]*)\]", hlo_text)
    }


def _dots(hlo_text: str) -> list[tuple[list[int], str, str, list[int]]]:
    """Every dot of compiled HLO text, and every cuBLAS call XLA:GPU made of one: (result
    dimensions, lhs name, rhs name, the lhs's contracting dimensions)."""
    dots = []
    for result, lhs, rhs, rest in re.findall(
        r"= \w+\[([\d,]*)\]\S* dot\((%[\w.-]+), (%[\w.-]+)\)(.*)", hlo_text
    ):
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
        axes = contracting.group(1).split(",") if contracting else []
        dots.append(
            ([int(d) for d in result.split(",") if d], lhs, rhs, [int(i) for i in axes if i])
        )
    # A cuBLAS call's result is its product (first in a tuple with its workspace), its first
    # two operands the dot's, and its backend config keeps the dot's dimension numbers.
    for result, lhs, rhs, rest in re.findall(
        r"= \(?\w+\[([\d,]*)\][^=\n]*? custom-call\((%[\w.-]+), (%[\w.-]+)[^)]*\), "
        r'custom_call_target="__cublas\$[^"]*"(.*)',
        hlo_text,
    ):
        contracting = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', rest)
        axes = re.findall(r"\d+", contracting.group(1)) if contracting else []
        dots.append(([int(d) for d in result.split(",") if d], lhs, rhs, [int(i) for i in axes]))
    return dots


def dot_operand_types(hlo_text: str) -> list[tuple[str, str]]:
    """The element types of the two operands of every dot in compiled HLO text."""
    definitions = _definitions(hlo_text)
    return [(definitions[lhs][0], definitions[rhs][0]) for _, lhs, rhs, _ in _dots(hlo_text)]


def dot_gflop(hlo_text: str) -> float:
    """GFLOP of matrix work in compiled HLO text (2 per multiply-add): every dot's (and cuBLAS
    call's) result elements times its contracted size. A dot in a loop body (scanned layers)
    counts once."""
    definitions = _definitions(hlo_text)
    flops = 0
    for result, lhs, _, contracting in _dots(hlo_text):
        lhs_dims = definitions[lhs][1]
        flops += 2 * math.prod(result) * math.prod(lhs_dims[i] for i in contracting)
    return flops / 1e9


def converts_operands(hlo_text: str) -> bool:
    """Whether XLA multiplies float32 copies of (lower-precision) operands: a float32 dot."""
    return any("f32" in types for types in dot_operand_types(hlo_text))


def _until_ready(fn: Callable[..., Any], *operands: Any) -> Any:
    """`fn(*operands)`, waited for: JAX dispatches asynchronously."""
    return fn(*operands).block_until_ready()


def ours(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    result: dict[str, Any] = {"jax": jax.__version__}
    for name, (operands, out) in PRECISIONS.items():
        a = jnp.ones((args.m, args.k), operands)
        b = jnp.ones((args.k, args.n), operands)
        multiply = functools.partial(jnp.matmul, preferred_element_type=jnp.dtype(out))
        compiled = jax.jit(multiply).lower(a, b).compile()
        if operands != "float32":
            result[f"converts_operands_{name}"] = converts_operands(compiled.as_text())
        run = functools.partial(_until_ready, compiled, a, b)
        result[f"gflops_{name}"] = _gflops(args, _seconds(args, run))
    return result


def baseline(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"torch": torch.__version__}
    for name, (operands, _) in PRECISIONS.items():
        a = torch.ones((args.m, args.k), dtype=getattr(torch, operands))
        b = torch.ones((args.k, args.n), dtype=getattr(torch, operands))
        with torch.inference_mode():
            run = functools.partial(torch.matmul, a, b)
            result[f"gflops_{name}"] = _gflops(args, _seconds(args, run))
    return result


SIDE_FNS = {"ours": ours, "baseline": baseline}


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    ran = common.main_sides(__spec__.name, build_parser(), SIDE_FNS, argv)
    if ran is None:
        return None
    args, results = ran
    for name in PRECISIONS:
        converted = results.get("ours", {}).get(f"converts_operands_{name}")
        if converted is not None:
            how = "float32 copies of the operands" if converted else "the bfloat16 operands"
            print(f"matmul ours {name}: XLA multiplies {how}", flush=True)
    return common.report("matmul", args, results, FIGURES)


if __name__ == "__main__":
    main()
