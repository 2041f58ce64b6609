"""How much a run computes at once on CPU, where the device's memory is the host's.

The run files' batch (64 rows of 1024 input and 256 target tokens) is sized for accelerators,
where each chip holds a few of its rows. On CPU one device holds all of them, and XLA keeps the
step's activations in host memory: the attention weights alone are [rows, heads, 1024, 1024]
float32 arrays, kept per layer for the backward pass. XLA's memory analysis of the train step
puts its temporaries at 21 GiB for the demo's model (3+3 layers, width 128) and 92 GiB for
T5 1.1 small. Where a run leaves the choice open, a CPU run therefore

* splits the train step into the fewest microbatches whose temporaries fit `CPU_STEP_BYTES`
  (`fewest_microbatches`; small steps, like the demo's, stay whole), and
* computes the teacher-forced evaluation losses `CPU_LOSS_BATCH_SIZE` rows at a time: their
  rows are padded to the full feature lengths, so 64 of them take gigabytes, while label
  prediction's batches, padded only to their longest input, keep `EVAL_BATCH_SIZE` inputs.

Accelerators keep one microbatch and batches of `EVAL_BATCH_SIZE` (the pod files set theirs).
The microbatch count is part of what a run computes (each microbatch draws its own dropout
masks), so it depends only on the program, never on the host's free memory.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import jax

from dsbs_jax.partitioning import Partitioner

GiB = 1 << 30
# XLA temporaries a CPU train step may take on this host before it is split into microbatches.
CPU_STEP_BYTES = 1 * GiB
# Rows of an evaluation batch (teacher-forced losses, decoding, scoring) when the run sets none;
# on CPU, those of the teacher-forced losses.
EVAL_BATCH_SIZE = 64
CPU_LOSS_BATCH_SIZE = 16


def on_cpu(partitioner: Partitioner) -> bool:
    """Whether the partitioner's devices are CPUs."""
    return partitioner.mesh.devices.flat[0].platform == "cpu"


def host_temp_bytes(compiled: jax.stages.Compiled, partitioner: Partitioner) -> int:
    """XLA's temporaries of a compiled program on this host: per device, times its devices."""
    per_device = compiled.memory_analysis().temp_size_in_bytes
    return per_device * len(partitioner.mesh.local_devices)


def eval_batch_sizes(partitioner: Partitioner, batch_size: int | None) -> tuple[int, int]:
    """(teacher-forced rows, label prediction inputs) per evaluation batch: `batch_size` for
    both, or when None `EVAL_BATCH_SIZE`, but on CPU `CPU_LOSS_BATCH_SIZE` teacher-forced rows
    (rounded up to a multiple of the data-parallel size)."""
    if batch_size is not None:
        return batch_size, batch_size
    if not on_cpu(partitioner):
        return EVAL_BATCH_SIZE, EVAL_BATCH_SIZE
    data = partitioner.mesh.shape["data"]
    return -(-CPU_LOSS_BATCH_SIZE // data) * data, EVAL_BATCH_SIZE


def fewest_microbatches(
    compile_with: Callable[[int], jax.stages.Compiled],
    rows: int,
    partitioner: Partitioner,
    budget: int = CPU_STEP_BYTES,
) -> tuple[jax.stages.Compiled, int]:
    """(program, count): `compile_with(count)` for one microbatch, or on CPU for the fewest
    microbatches dividing `rows` (a data shard's) whose temporaries fit `budget` on this host;
    `rows` microbatches of one row when none fits.

    Temporaries grow about linearly with a microbatch's rows, so after the one-microbatch
    program only the counts whose share of its temporaries fits are compiled.
    """
    compiled, count = compile_with(1), 1
    if not on_cpu(partitioner):
        return compiled, count
    whole = temp = host_temp_bytes(compiled, partitioner)
    for n in range(2, rows + 1):
        if temp <= budget:
            break
        if rows % n == 0 and (whole / n <= budget or n == rows):
            compiled, count = compile_with(n), n
            temp = host_temp_bytes(compiled, partitioner)
    return compiled, count


def report_microbatches(
    compiled: jax.stages.Compiled, count: int, batch_rows: int, partitioner: Partitioner
) -> None:
    """Says on stderr how a step of `batch_rows` rows was split, when it was."""
    if count > 1:
        temp = host_temp_bytes(compiled, partitioner) / GiB
        print(
            f"CPU: each step trains {count} microbatches of {batch_rows // count} rows, "
            f"{temp:.1f} GiB of XLA temporaries (train.num_microbatches sets another count)",
            file=sys.stderr,
        )
