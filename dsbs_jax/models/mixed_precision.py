"""Dense-layer matmuls with low-precision operands that accumulate in float32, both ways.

XLA:CPU multiplies bfloat16 matrices with its bfloat16 kernels (AMX tiles or AVX512-BF16 where
the CPU has them) only when the dot's result is float32. A dot with a bfloat16 result is
rewritten to convert both operands to float32 first, which is slower than float32 throughout.
`jax.grad` of a dot with a float32 result would make the backward dots mixed float32 x
bfloat16, which are converted the same way. `matmul` asks for a float32 result in the forward
dot and in both backward dots, then casts each to the dtype its consumer expects. On TPU and
GPU the matrix units accumulate bfloat16 products in float32 anyway, so the arithmetic is that
of a plain bfloat16 dot there.

Float32 layers take the same custom VJP. Its weight gradient is one dot contracting the
flattened rows of inputs and output gradient ("...k,...n->kn"); `jax.grad` of the plain dot
makes XLA:CPU copy each activation into a transposed layout first. Measured on the T5-small
training step (benchmarks.train_throughput, 2-core AMD EPYC): layout copies fell from 18% to 7%
of op time and the step from 3.5-3.7 s to 3.1 s, with the same loss.

Rematerialisation policies see no dot inside that custom VJP, so its result is named
`DENSE_OUTPUT` (`jax.ad_checkpoint.checkpoint_name`) for a policy to save it, as
`dots_with_no_batch_dims_saveable` saves a plain dense layer's dot.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Array = jax.Array
DENSE_OUTPUT = "dense_output"


def _accumulated(spec: str, lhs: Array, rhs: Array, out_dtype: Any) -> Array:
    return jnp.einsum(spec, lhs, rhs, preferred_element_type=jnp.float32).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(inputs: Array, kernel: Array, out_dtype: Any) -> Array:
    return _accumulated("...k,kn->...n", inputs, kernel, out_dtype)


def _matmul_fwd(inputs: Array, kernel: Array, out_dtype: Any):
    return _matmul(inputs, kernel, out_dtype), (inputs, kernel)


def _matmul_bwd(out_dtype: Any, residuals: tuple[Array, Array], grad: Array):
    inputs, kernel = residuals
    grad = grad.astype(inputs.dtype)
    return (
        _accumulated("...n,kn->...k", grad, kernel, inputs.dtype),
        _accumulated("...k,...n->kn", inputs, grad, kernel.dtype),
    )


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(inputs: Array, kernel: Array, out_dtype: Any = None) -> Array:
    """`inputs @ kernel` ([..., k] x [k, n]) in `out_dtype` (default: the operands' dtype).

    bfloat16 and float32 operands take the float32-accumulating custom VJP above; others the
    plain dot (XLA:CPU has no float16 kernels for a float32 result).
    """
    out_dtype = jnp.dtype(inputs.dtype if out_dtype is None else out_dtype)
    if inputs.dtype != kernel.dtype:
        raise ValueError(f"operands of one dtype expected, got {inputs.dtype} x {kernel.dtype}")
    if inputs.dtype not in (jnp.bfloat16, jnp.float32):
        return (inputs @ kernel).astype(out_dtype)
    return checkpoint_name(_matmul(inputs, kernel, out_dtype), DENSE_OUTPUT)


def dense_dot_general(
    lhs: Array,
    rhs: Array,
    dimension_numbers: Sequence[Any],
    precision: Any = None,
    preferred_element_type: Any = None,
    out_dtype: Any = None,
) -> Array:
    """For `nn.Dense(dot_general=...)`: the dense layer's contraction through `matmul`."""
    contracting, batch = dimension_numbers
    if tuple(map(tuple, contracting)) != ((lhs.ndim - 1,), (0,)) or any(map(len, batch)):
        raise ValueError(f"not a dense layer's dot: dimension numbers {dimension_numbers}")
    del precision, preferred_element_type  # matmul sets its own accumulation
    return matmul(lhs, rhs, out_dtype)
