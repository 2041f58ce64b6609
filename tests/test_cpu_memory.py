"""CPU runs' step sizes: train steps split into microbatches that fit, smaller eval batches."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import optax

from dsbs_jax import cpu_memory, trainer
from dsbs_jax.cpu_memory import GiB
from dsbs_jax.input_pipeline import batch_spec
from dsbs_jax.models.t5 import T5, get_config
from dsbs_jax.partitioning import Partitioner
from dsbs_jax.state import Student


class _Program:
    """Stands in for a compiled program: XLA's temporaries per device, nothing else."""

    def __init__(self, temp_bytes: int) -> None:
        self.temp_bytes = temp_bytes

    def memory_analysis(self) -> SimpleNamespace:
        return SimpleNamespace(temp_size_in_bytes=self.temp_bytes)


def _programs(per_row: int, fixed: int, rows: int, devices: int):
    """compile_with(count) for a program whose host temporaries are `fixed` plus `per_row`
    for each row of a microbatch; also the counts it was asked to compile."""
    compiled: list[int] = []

    def compile_with(count: int) -> _Program:
        compiled.append(count)
        return _Program((fixed + per_row * (rows // count)) // devices)

    return compile_with, compiled


def test_only_the_counts_whose_share_fits_are_compiled():
    partitioner = Partitioner()  # the 8 CPU devices of conftest
    devices = len(partitioner.mesh.local_devices)
    # 64 rows of 15/64 GiB and 1/8 GiB besides: 15.125 GiB whole, so 16 microbatches are the
    # first whose share fits 1 GiB; with the fixed part they need 1.06 GiB, and 32 fit.
    compile_with, compiled = _programs(15 * GiB // 64, GiB // 8, 64, devices)
    program, count = cpu_memory.fewest_microbatches(compile_with, 64, partitioner, GiB)
    assert (count, compiled) == (32, [1, 16, 32])
    assert cpu_memory.host_temp_bytes(program, partitioner) == GiB // 8 + 15 * GiB // 32


def test_a_step_that_fits_is_compiled_once_and_kept_whole():
    partitioner = Partitioner()
    compile_with, compiled = _programs(GiB // 64, 0, 32, len(partitioner.mesh.local_devices))
    _, count = cpu_memory.fewest_microbatches(compile_with, 32, partitioner, GiB)
    assert (count, compiled) == (1, [1])


def test_one_row_per_microbatch_when_none_fits():
    partitioner = Partitioner()
    compile_with, compiled = _programs(2 * GiB, 0, 8, len(partitioner.mesh.local_devices))
    program, count = cpu_memory.fewest_microbatches(compile_with, 8, partitioner, GiB)
    assert (count, compiled) == (8, [1, 8])
    assert cpu_memory.host_temp_bytes(program, partitioner) == 2 * GiB


def test_cpu_teacher_forced_losses_take_fewer_rows_unless_set():
    partitioner = Partitioner()  # 8 CPU devices: 16 rows are two per device
    assert cpu_memory.eval_batch_sizes(partitioner, None) == (16, 64)
    assert cpu_memory.eval_batch_sizes(partitioner, 24) == (24, 24)
    three = Partitioner(devices=jax.devices()[:3])
    assert cpu_memory.eval_batch_sizes(three, None) == (18, 64)


def test_xla_temporaries_of_the_split_train_step_fit_the_budget():
    """XLA's own figures: a packed batch of 1024-token rows is split until its step fits."""
    partitioner = Partitioner(devices=jax.devices()[:1])
    config = get_config("tiny", vocab_size=128, dtype=jnp.float32)
    student, optimizer = Student(config, partitioner), optax.adamw(1e-3)
    state = student.abstract_train_state(optimizer)
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=partitioner.data_sharding)
        for k, v in batch_spec({"inputs": 1024, "targets": 64}, 8, pack=True).items()
    }
    programs: dict[int, jax.stages.Compiled] = {}

    def compile_with(count: int) -> jax.stages.Compiled:
        if count not in programs:
            with partitioner.activation_rules():
                programs[count], got = trainer.compile_train_step(
                    T5(config), optimizer, partitioner, state, batch, trainer.dropout_key(0), count
                )
            assert got == count
        return programs[count]

    whole = cpu_memory.host_temp_bytes(compile_with(1), partitioner)
    assert whole > 64 << 20  # two f32 [8, 2, 1024, 1024] attention arrays alone
    program, count = cpu_memory.fewest_microbatches(compile_with, 8, partitioner, whole // 3)
    assert (count, sorted(programs)) == (4, [1, 4])
    assert cpu_memory.host_temp_bytes(program, partitioner) <= whole // 3
