"""Published dense peak FLOP rates of the accelerators the benchmarks are likely to run on.

A step's achieved FLOP rate over its chip's peak says how much of the chip the step uses, which
a ratio between two frameworks cannot. Peaks are per precision of the multiply:

- `bfloat16`: bfloat16 operands on the tensor cores (ours with `--dtype bfloat16`, the baseline
  under bfloat16 autocast);
- `tf32`: float32 operands rounded to TF32 on the tensor cores. This is how JAX multiplies
  float32 on NVIDIA GPUs since Ampere at its default matmul precision, so ours in float32 is
  set against it (against `float32` when `jax_default_matmul_precision` asks for full float32);
- `float32`: full float32 on the CUDA cores. PyTorch multiplies float32 this way by default
  (`torch.get_float32_matmul_precision() == "highest"`, which the official code leaves alone),
  so the baseline in float32 is set against it (against `tf32` when TF32 is allowed).

Figures are NVIDIA's datasheets' (H200, H100, GH200, A100, A10, L40S, L4; the HGX B200
specifications), in TFLOP/s without structured sparsity: the datasheets' tensor-core figures
marked "with sparsity" are halved here. They are boost-clock peaks; a chip held at a lower clock
by power or heat reaches less.
"""

from __future__ import annotations

import re

# (pattern of the device name as CUDA reports it, {precision: dense TFLOP/s}); the first match
# wins, so the more specific names come first.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    # H200 NVL: FP32 60, TF32 835*, BF16 1,671* (* with sparsity)
    (r"\bH200 NVL\b", {"bfloat16": 835.5, "tf32": 417.5, "float32": 60.0}),
    # GH200 (its H100 or H200 GPU, SXM figures): FP32 67, TF32 494 | 989*, BF16 990 | 1,979*
    (r"\bGH200\b", {"bfloat16": 989.5, "tf32": 494.5, "float32": 67.0}),
    # H200 SXM ("NVIDIA H200"): FP32 67, TF32 989*, BF16 1,979*
    (r"\bH200\b", {"bfloat16": 989.5, "tf32": 494.5, "float32": 67.0}),
    # H100 NVL: FP32 60, TF32 835*, BF16 1,671*
    (r"\bH100 NVL\b", {"bfloat16": 835.5, "tf32": 417.5, "float32": 60.0}),
    # H100 PCIe: FP32 51, TF32 756*, BF16 1,513*
    (r"\bH100 PCIe\b", {"bfloat16": 756.5, "tf32": 378.0, "float32": 51.0}),
    # H100 SXM ("NVIDIA H100 80GB HBM3"): FP32 67, TF32 989*, BF16 1,979*
    (r"\bH100\b", {"bfloat16": 989.5, "tf32": 494.5, "float32": 67.0}),
    # A100 40GB and 80GB, PCIe and SXM: FP32 19.5, TF32 156 | 312*, BF16 312 | 624*
    (r"\bA100\b", {"bfloat16": 312.0, "tf32": 156.0, "float32": 19.5}),
    # A10 (not AWS's A10G): FP32 31.2, TF32 62.5 | 125*, BF16 125 | 250*
    (r"\bA10\b", {"bfloat16": 125.0, "tf32": 62.5, "float32": 31.2}),
    # L40S: FP32 91.6, TF32 366*, BF16 733*
    (r"\bL40S\b", {"bfloat16": 366.5, "tf32": 183.0, "float32": 91.6}),
    # L4: FP32 30.3, TF32 120*, BF16 242*
    (r"\bL4\b", {"bfloat16": 121.0, "tf32": 60.0, "float32": 30.3}),
    # B200 (HGX B200, per GPU): FP32 75, TF32 2.2 PF*, BF16 4.5 PF*
    (r"\bB200\b", {"bfloat16": 2250.0, "tf32": 1100.0, "float32": 75.0}),
)
PRECISIONS = ("bfloat16", "tf32", "float32")


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The chip's published dense peak for `precision` multiplies, in TFLOP/s; None for a
    device not in the table (a CPU, say)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return peaks[precision]
    return None
