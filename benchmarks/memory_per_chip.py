"""Per-chip memory of training a T5 1.1 student on a TPU slice, estimated on paper.

    python benchmarks/memory_per_chip.py --model base --num_partitions 2 --chips 32 \\
        --batch_size 64 --optimizer adamw --inputs_length 1024 --targets_length 256 \\
        --dtype bfloat16 --json out.json
    python benchmarks/memory_per_chip.py --table     # the README's "TPU pods" table

Parameter and optimizer-state shapes come from `jax.eval_shape` of the real model and
optimizer, shardings from the project's logical axis rules (see `dsbs_jax/memory.py`); nothing
is allocated, so it runs on a CPU in seconds, xxl included. Activations are a rough estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # shapes only: never claim an accelerator

import jax.numpy as jnp  # noqa: E402

from dsbs_jax import memory  # noqa: E402
from dsbs_jax.models.t5 import PRESETS, T5Config, get_config  # noqa: E402
from dsbs_jax.optimizers import OPTIMIZERS  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(PRESETS), default="base")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--chips", type=int, help="devices (TPU chips) in the mesh")
    where.add_argument("--slice", choices=sorted(memory.SLICES), help="a Cloud TPU slice")
    parser.add_argument("--num_partitions", type=int, default=1, help="model-parallel size")
    parser.add_argument("--batch_size", type=int, default=64, help="global batch (BATCH_SIZE)")
    parser.add_argument("--num_microbatches", type=int, default=1)
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw")
    parser.add_argument("--inputs_length", type=int, default=1024)
    parser.add_argument("--targets_length", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16", help="activation dtype (t5_config.dtype)")
    parser.add_argument("--vocab_size", type=int, default=32128)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--table",
        action="store_true",
        help="print a markdown table of --models on --slices, each with the fewest model "
        "partitions, then microbatches, that fit",
    )
    parser.add_argument("--models", default="base,large,xl,xxl", help="--table: presets")
    parser.add_argument(
        "--slices", default="v4-8,v4-32,v5litepod-16,v5litepod-64", help="--table: slices"
    )
    return parser


def _config(args: argparse.Namespace, model: str) -> T5Config:
    return get_config(model, vocab_size=args.vocab_size, dtype=jnp.dtype(args.dtype))


def _gib(n: int) -> str:
    return f"{n / memory.GiB:.2f}"


def single(args: argparse.Namespace) -> dict[str, Any]:
    """Estimates one configuration, prints one line per figure, returns the JSON record."""
    tpu = memory.SLICES.get(args.slice)
    chips = tpu.chips if tpu else args.chips
    config = _config(args, args.model)
    result = memory.estimate(
        config,
        memory.state_layout(config, args.optimizer),
        chips,
        args.num_partitions,
        args.batch_size,
        (args.inputs_length, args.targets_length),
        args.num_microbatches,
    )
    record = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        **result,
        "gib_per_chip": {k: v / memory.GiB for k, v in result["bytes_per_chip"].items()},
        "hbm_gib": memory.HBM_GIB,
        "headroom": memory.HEADROOM,
    }
    if tpu:
        record.update(hosts=tpu.hosts, rows_per_host=args.batch_size // tpu.hosts)
    mesh = result["mesh"]
    print(f"param_count: {result['param_count']:,}")
    print(f"mesh: data={mesh['data']} model={mesh['model']}")
    print(f"rows_per_chip: {result['rows_per_chip']}")
    if tpu:
        print(f"hosts: {tpu.hosts}, rows_per_host: {record['rows_per_host']}")
    for name, value in result["bytes_per_chip"].items():
        note = " (rough estimate)" if name == "activations" else ""
        print(f"{name}: {_gib(value)} GiB per chip{note}")
    for gen, fits in result["fits"].items():
        hbm = memory.HBM_GIB[gen]
        print(f"fits {gen} ({hbm} GiB, {memory.HEADROOM:.0%} usable): {'yes' if fits else 'no'}")
    return record


def table(args: argparse.Namespace) -> list[str]:
    """Markdown rows: each model on each slice with the smallest layout that fits."""
    lengths = (args.inputs_length, args.targets_length)
    rows = [
        "| model | slice | chips / hosts | partitions | microbatches | batch per host "
        "| rows per chip | params + opt + grads | activations (rough) | total | fits |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in args.models.split(","):
        config = _config(args, model)
        layout = memory.state_layout(config, args.optimizer)
        for name in args.slices.split(","):
            tpu = memory.SLICES[name]
            found = memory.plan(config, layout, tpu, args.batch_size, lengths)
            figures = found["bytes_per_chip"]
            state = figures["params"] + figures["optimizer_state"] + figures["gradients"]
            fits = "yes" if found["fits"][tpu.generation] else "**no**"
            rows.append(
                f"| {model} | {name} | {tpu.chips} / {tpu.hosts} | {found['num_partitions']} "
                f"| {found['num_microbatches']} | {args.batch_size // tpu.hosts} "
                f"| {found['rows_per_chip']} | {_gib(state)} | {_gib(figures['activations'])} "
                f"| {_gib(figures['total'])} | {fits} |"
            )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.table:
        print("\n".join(table(args)))
        return 0
    if args.chips is None and args.slice is None:
        parser.error("give --chips or --slice (or --table)")
    try:
        record = single(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
