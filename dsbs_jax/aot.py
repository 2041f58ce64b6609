"""Compile the training program for a TPU slice ahead of time, on a host with no TPU.

    python -m dsbs_jax.aot --gin_file=runs/cqa_step_by_step.gin --gin_file=pods/v4_32.gin \\
        --topology=v4-32 --json=/tmp/v4_32.json

Takes the run files and flags of `dsbs_jax.train`, builds the same `Student` and jitted steps
on compile-only devices of the slice (libtpu's `get_topology_desc`; `pip install -e .[tpu]`),
and compiles the train step, the teacher-forced eval step and the label-decoding step with
their real shardings. XLA's figures per chip come out one a line: arguments, outputs, aliased
(donated) bytes, temporaries and their total against the chip's HBM, FLOPs per step against
the model's, the step time the chip's peak allows, and the compile time. A program XLA
refuses for lack of HBM is a result: needed and available bytes, fits false.

Slices are named as `gcloud` names them (`v4-32`, `v5p-32` count TensorCores: 16 chips;
`v5litepod-16`, `v6e-16` count chips) or as a topology (`v5e:4x4`, `v4:2x2x4`); v4 and v5p
chips run in megacore mode, one JAX device per chip, as on the real slice.

`--runs=N` compiles the train step of a vectorized sweep of N such runs instead
(`dsbs_jax.vectorized`: N training states stacked, one vmapped step), split over the mesh's
"runs" axis of `Partitioner.num_runs_partitions`, e.g. 16 T5 1.1 small runs on v5litepod-16:

    python -m dsbs_jax.aot --gin_file=runs/cqa_step_by_step.gin --gin_file=pods/v5e_16_small.gin \\
        --gin.Partitioner.num_runs_partitions=16 --runs=16 --topology=v5litepod-16
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from dsbs_jax import cpu_memory, decoding, startup, trainer
from dsbs_jax.errors import UserError
from dsbs_jax.gin_utils import run
from dsbs_jax.model_config import build_model_config
from dsbs_jax.models.t5 import T5Config
from dsbs_jax.state import Student

GiB = 2**30
# Share of HBM a program may fill and still count as fitting with room for the runtime.
FIT_FRACTION = 0.95


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation's published per-chip figures (cloud.google.com/tpu/docs)."""

    hbm_bytes: int
    peak_bf16_flops: float
    megacore: bool  # two TensorCores seen as one device


CHIPS = {
    "v4": Chip(32 * GiB, 275e12, megacore=True),
    "v5e": Chip(16 * GiB, 197e12, megacore=False),
    "v5p": Chip(95 * GiB, 459e12, megacore=True),
    "v6e": Chip(32 * GiB, 918e12, megacore=False),
}
# Chips -> topology: v4 and v5p are 3-D tori, v5e and v6e 2-D.
_TOPOLOGY_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8"}
_TOPOLOGY_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16"}
_TOPOLOGY_2D[256] = "16x16"
_SLICE_GENERATIONS = {"v4": "v4", "v5p": "v5p", "v5litepod": "v5e", "v5e": "v5e", "v6e": "v6e"}


def parse_topology(name: str) -> tuple[str, str]:
    """('v4', 'v4:2x2x4') for 'v4-32' or 'v4:2x2x4'; ValueError naming the accepted forms."""
    accepted = (
        "give a slice (v4-32, v5p-32, v5litepod-16, v6e-16) or a topology (v5e:4x4, v4:2x2x4)"
    )
    match = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", name)
    if match:
        generation = _SLICE_GENERATIONS[match[1]]
        count = int(match[2])
        megacore = CHIPS[generation].megacore  # the name counts TensorCores, 2 a chip
        chips = count // 2 if megacore else count
        shapes = _TOPOLOGY_3D if megacore else _TOPOLOGY_2D
        if chips not in shapes or (megacore and count % 2):
            raise UserError(f"unknown slice size {name!r}; sizes: {sorted(shapes)} chips")
        return generation, f"{generation}:{shapes[chips]}"
    match = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+)+)", name)
    if match:
        return match[1], name
    raise UserError(f"unknown TPU topology {name!r}; {accepted}")


def topology_devices(generation: str, topology: str) -> list[jax.Device]:
    """Compile-only TPU devices of the whole slice, every host's, from libtpu."""
    from jax.experimental import topologies

    if importlib.util.find_spec("libtpu") is None:
        raise UserError("libtpu is not installed; install it with pip install -e .[tpu]")
    # Compile-only: other processes of this host may hold libtpu too (its lock file is for
    # real chips), and there are no TPU workers to look up.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    with startup.quiet_start(startup.verbose_requested([])):  # libtpu's start-up lines
        description = topologies.get_topology_desc(
            topology_name=topology,
            platform="tpu",
            chip_config_name="megacore" if CHIPS[generation].megacore else "default",
        )
    return list(description.devices)


def model_flops(config: T5Config, batch: int, inputs: int, targets: int, train: bool) -> float:
    """Matmul FLOPs of one step of the model (3x the forward pass when training).

    Every dense layer and attention's scores and weighted values, decoder self-attention over
    all positions as XLA computes it; embedding lookups, norms and softmax left out.
    """
    d, f, v = config.emb_dim, config.mlp_dim, config.vocab_size
    hd = config.num_heads * config.head_dim
    mlp = (len(config.mlp_activations) + 1) * d * f
    encoder = inputs * config.num_encoder_layers * (4 * d * hd + mlp + 2 * inputs * hd)
    decoder_tokens = targets * (6 * d * hd + mlp + 2 * targets * hd + 2 * inputs * hd) + inputs * (
        2 * d * hd
    )  # cross-attention keys and values of the encoder output
    decoder = config.num_decoder_layers * decoder_tokens + targets * d * v
    forward = 2.0 * batch * (encoder + decoder)
    return 3 * forward if train else forward


@dataclasses.dataclass
class ProgramReport:
    """XLA's verdict on one compiled program, per chip."""

    name: str
    fits: bool
    total_bytes: int
    hbm_bytes: int
    compile_seconds: float
    argument_bytes: int | None = None
    output_bytes: int | None = None
    alias_bytes: int | None = None
    temp_bytes: int | None = None
    generated_code_bytes: int | None = None
    xla_flops_per_chip: float | None = None
    model_flops: float | None = None
    step_seconds_lower_bound: float | None = None
    error: str | None = None

    def lines(self, chips: int, peak_flops: float) -> list[str]:
        """One line per figure, for the terminal."""

        def gib(n: int) -> str:
            return f"{n / GiB:8.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:8.2f} MiB"

        head = f"{self.name:<12}"
        out = []
        if self.error is None:
            out += [
                f"{head} arguments    {gib(self.argument_bytes)} per chip",
                f"{head} outputs      {gib(self.output_bytes)} per chip",
                f"{head} aliased      {gib(self.alias_bytes)} per chip (donated inputs reused)",
                f"{head} temporaries  {gib(self.temp_bytes)} per chip",
            ]
        share = self.total_bytes / self.hbm_bytes
        verdict = "fits" if self.fits else "DOES NOT FIT"
        out.append(
            f"{head} total        {gib(self.total_bytes)} of {self.hbm_bytes / GiB:.2f} GiB HBM "
            f"({share:.0%}): {verdict}" + (f" ({self.error})" if self.error else "")
        )
        if self.xla_flops_per_chip is not None:
            step = self.xla_flops_per_chip * chips
            model = (
                f", model {self.model_flops:.3e} (XLA/model {step / self.model_flops:.2f})"
                if self.model_flops
                else ""
            )
            out.append(f"{head} flops/step   XLA {step:.3e} ({chips} chips){model}")
            out.append(
                f"{head} step time    >= {self.step_seconds_lower_bound * 1e3:.1f} ms at "
                f"{peak_flops / 1e12:.0f} TFLOP/s per chip (bfloat16 peak)"
            )
        out.append(f"{head} compile      {self.compile_seconds:8.1f} s")
        return out


_OOM = re.compile(r"\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def compile_program(
    name: str,
    lower: Callable[[], Any],
    hbm_bytes: int,
    peak_flops: float,
    flops: float | None,
    chips: int = 1,
) -> ProgramReport:
    """Lowers and compiles one program; an out-of-HBM refusal becomes a report, not an error.

    The step-time bound takes the larger of XLA's FLOPs per chip and the model's share per
    chip: XLA's cost analysis counts a loop body once, so it undercounts scanned layers.
    """
    start = time.perf_counter()
    try:
        compiled = lower().compile()
    except jax.errors.JaxRuntimeError as e:
        message = str(e)
        found = _OOM.search(message)
        if "RESOURCE_EXHAUSTED" not in message or not found:
            raise
        needed = int(float(found[1]) * _UNITS[found[2]])
        available = int(float(found[3]) * _UNITS[found[4]])
        return ProgramReport(
            name,
            fits=False,
            total_bytes=needed,
            hbm_bytes=hbm_bytes,
            compile_seconds=time.perf_counter() - start,
            error=f"XLA: needs {needed / GiB:.2f} GiB, {available / GiB:.2f} GiB available",
        )
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    total = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
        + memory.generated_code_size_in_bytes
    )
    costs = compiled.cost_analysis()
    costs = costs[0] if isinstance(costs, list) else costs
    chip_flops = float(costs.get("flops", 0.0))
    return ProgramReport(
        name,
        fits=total <= FIT_FRACTION * hbm_bytes,
        total_bytes=int(total),
        hbm_bytes=hbm_bytes,
        compile_seconds=seconds,
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        generated_code_bytes=int(memory.generated_code_size_in_bytes),
        xla_flops_per_chip=chip_flops,
        model_flops=flops,
        step_seconds_lower_bound=max(chip_flops, (flops or 0.0) / chips) / peak_flops,
    )


def train_settings(devices: Sequence[jax.Device]) -> dict[str, Any]:
    """`dsbs_jax.training.train`'s arguments as gin binds them, defaults filled in, with the
    run's partitioner made over `devices` (the slice's compile-only ones, not this host's)."""
    from dsbs_jax import training  # TensorFlow's side: imported once gin_utils.run started it

    settings = training.train_arguments(devices)
    # What train() makes of the ones left open on TPUs (`dsbs_jax.cpu_memory`).
    settings["num_microbatches"] = settings["num_microbatches"] or 1
    settings["eval_batch_size"] = settings["eval_batch_size"] or cpu_memory.EVAL_BATCH_SIZE
    return settings


def _sharded(spec: Mapping[str, jax.ShapeDtypeStruct], sharding: Any) -> dict[str, Any]:
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in spec.items()}


def rows_per_host(sharding: jax.sharding.NamedSharding, batch: int) -> int:
    """Rows of a [batch, ...] array the devices of process 0 hold: what each host feeds."""
    rows = set()
    for device, (index, *_) in sharding.devices_indices_map((batch,)).items():
        if device.process_index == 0:
            rows.update(range(batch)[index])
    return len(rows)


PROGRAMS = ("train_step", "eval_step", "decode")


def compile_for_topology(
    topology_name: str,
    json_path: str | None,
    programs: Sequence[str] = PROGRAMS,
    check: bool = False,
    runs: int = 0,
) -> dict[str, Any]:
    """Compiles train, eval and decode steps (or those named) for the slice; prints and
    returns the report. `check` stops after the settings and the slice's mesh are checked.
    `runs` > 0: the train step of a vectorized sweep of that many runs (one run's eval and
    decode steps are the same as alone)."""
    unknown = set(programs) - set(PROGRAMS)
    if unknown:
        raise UserError(f"unknown programs {sorted(unknown)}; choose from {', '.join(PROGRAMS)}")
    if runs < 0:
        raise UserError(f"--runs must be 0 (one run) or more, got {runs}")
    generation, topology = parse_topology(topology_name)
    chip = CHIPS[generation]
    from dsbs_jax.data.registration import task_vocabulary
    from dsbs_jax.input_pipeline import batch_spec

    devices = topology_devices(generation, topology)
    settings = train_settings(devices)
    lengths = settings["task_feature_lengths"]
    partitioner, optimizer = settings["partitioner"], settings["optimizer"]
    vocabulary = task_vocabulary(settings["mixture_or_task_name"])
    config = build_model_config(settings["model_config"], vocabulary.vocab_size)
    student = Student(config, partitioner)
    batch_size, eval_batch_size = settings["batch_size"], settings["eval_batch_size"]
    for what, rows in (
        ("train.batch_size", batch_size),
        ("train.eval_batch_size", eval_batch_size),
    ):
        if rows % partitioner.mesh.shape["data"]:
            raise UserError(
                f"train.{what}={rows} does not divide by the data-parallel size "
                f"{partitioner.mesh.shape['data']} of {topology_name}"
            )
    if runs and runs % partitioner.num_runs_partitions:
        raise UserError(
            f"--runs={runs} does not divide by Partitioner.num_runs_partitions="
            f"{partitioner.num_runs_partitions}"
        )
    processes = len({d.process_index for d in devices})
    header = {
        "topology": topology_name,
        "libtpu_topology": topology,
        "device_kind": devices[0].device_kind,
        "devices": len(devices),
        "processes": processes,
        "mesh": dict(partitioner.mesh.shape),
        "batch_size": batch_size,
        "batch_per_host": rows_per_host(partitioner.data_sharding, batch_size),
        "num_microbatches": settings["num_microbatches"],
        "task_feature_lengths": dict(lengths),
        "runs": runs,
        "hbm_bytes": chip.hbm_bytes,
        "peak_bf16_flops": chip.peak_bf16_flops,
    }
    print(
        f"{topology_name}: {topology}, {len(devices)} {header['device_kind']} devices on "
        f"{processes} hosts, mesh {header['mesh']}, batch {batch_size} "
        f"({header['batch_per_host']} per host), {settings['num_microbatches']} microbatch(es)"
        + (f", {runs} runs at once" if runs else ""),
        flush=True,
    )
    state = student.abstract_train_state(optimizer)
    if check:
        print(f"check: would compile {', '.join(programs)} for {topology_name}")
        return header
    params = state.params
    train_batch = _sharded(
        batch_spec(lengths, batch_size, settings["pack"]), partitioner.data_sharding
    )
    eval_batch = _sharded(batch_spec(lengths, eval_batch_size, False), partitioner.data_sharding)
    key = jax.eval_shape(
        lambda: trainer.dropout_key(settings["random_seed"], settings["use_hardware_rng"])
    )
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=partitioner.replicated)
    max_decode_length = settings["max_decode_length"] or lengths["targets"]
    smoothing, z_loss = settings["label_smoothing"], settings["z_loss"]

    def lower_train() -> Any:
        if runs:
            return lower_stacked_train(student, optimizer, settings, train_batch, key, runs)
        step = trainer.jit_train_step(
            student.model,
            optimizer,
            partitioner,
            state,
            settings["num_microbatches"],
            smoothing,
            z_loss,
        )
        return step.lower(state, train_batch, key)

    def lower_eval() -> Any:
        return trainer.jit_eval_step(student.model, smoothing, z_loss).lower(params, eval_batch)

    def lower_decode() -> Any:
        return decoding.greedy_decode.lower(
            student.model,
            params,
            eval_batch["encoder_input_tokens"],
            max_decode_length=max_decode_length,
            eos_id=vocabulary.eos_id,
        )

    train_flops = model_flops(config, batch_size, *lengths.values(), True) * max(runs, 1)
    builders = (
        ("train_step", lower_train, train_flops),
        ("eval_step", lower_eval, model_flops(config, eval_batch_size, *lengths.values(), False)),
        ("decode", lower_decode, None),
    )
    reports = []
    with partitioner.activation_rules():
        for name, lower, flops in builders:
            if name not in programs:
                continue
            report = compile_program(
                name, lower, chip.hbm_bytes, chip.peak_bf16_flops, flops, len(devices)
            )
            for line in report.lines(len(devices), chip.peak_bf16_flops):
                print(line, flush=True)
            reports.append(report)
    result = {**header, "programs": {r.name: dataclasses.asdict(r) for r in reports}}
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result


def lower_stacked_train(
    student: Student,
    optimizer: Any,
    settings: dict[str, Any],
    batch: dict[str, jax.ShapeDtypeStruct],
    key: jax.ShapeDtypeStruct,
    runs: int,
) -> Any:
    """The vectorized sweep's train step of `runs` runs, lowered for the stacked state, batches
    and keys (`trainer.jit_stacked_train_step`, `vectorized.stacked_abstract_state`)."""
    from dsbs_jax.vectorized import stacked_abstract_state

    partitioner = student.partitioner
    state = stacked_abstract_state(student.abstract_train_state(optimizer), runs, student)

    def stacked(x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(
            (runs, *x.shape), x.dtype, sharding=partitioner.stacked(x.sharding)
        )

    step = trainer.jit_stacked_train_step(
        student.model,
        optimizer,
        partitioner,
        state,
        settings["num_microbatches"],
        settings["label_smoothing"],
        settings["z_loss"],
    )
    return step.lower(state, jax.tree.map(stacked, batch), stacked(key))


def _aot_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--topology",
        required=True,
        help="TPU slice (v4-32, v5litepod-16, v5litepod-64, v5p-32, v6e-16) or topology (v5e:4x4)",
    )
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument(
        "--runs",
        type=int,
        default=0,
        help="compile the train step of a vectorized sweep of this many runs (0: one run)",
    )
    parser.add_argument(
        "--programs",
        default=",".join(PROGRAMS),
        help=f"comma-separated programs to compile (default: {','.join(PROGRAMS)})",
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # A pod file turns on jax.distributed for the real slice; this host compiles alone.
    argv.append("--gin.initialize_distributed.auto_detect=False")
    return run(
        lambda args: compile_for_topology(
            args.topology,
            args.json,
            [p for p in args.programs.split(",") if p],
            args.check,
            args.runs,
        ),
        argv,
        prog="python -m dsbs_jax.aot",
        description=__doc__,
        add_flags=_aot_flags,
    )


if __name__ == "__main__":
    sys.exit(main())
