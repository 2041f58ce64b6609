"""Share of real (non-padding) tokens per training batch, with and without packing.

    python -m benchmarks.packing --json benchmarks/results/packing.json

Three ways to batch the same paired step-by-step training stream:

* ours, packed: the training pipeline with `StepByStepFeatureConverter(pack=True)`, rows of
  `--inputs-length` / `--targets-length` tokens (what `python -m dsbs_jax.train` feeds);
* ours, unpacked: the same converter with `pack=False`, every example padded to those lengths;
* baseline: the official collator, `--batch-size` label rows and `--batch-size` rationale rows,
  each batch padded to its own longest row (dynamic padding), after the official truncation
  at 1024 input and 256 target tokens.

Fractions are given for encoder inputs, targets and both together, over `--steps` batches.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from benchmarks import common

FIGURES = (
    ("real_fraction", "", "higher"),
    ("real_fraction_inputs", "", "higher"),
    ("real_fraction_targets", "", "higher"),
    ("examples_per_batch", "", "higher"),
)
OFFICIAL_LENGTHS = {"inputs": 1024, "targets": 256}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, prog="python -m " + __spec__.name)
    common.add_common_args(parser)
    parser.set_defaults(steps=50)
    parser.add_argument("--batch-size", type=int, default=16, help="input pairs per batch")
    parser.add_argument("--inputs-length", type=int, default=384)
    parser.add_argument("--targets-length", type=int, default=136)
    parser.add_argument("--rows", type=int, default=0, help="packed rows (0: about batch size)")
    return parser


def _fractions(real_inputs: int, slots_inputs: int, real_targets: int, slots_targets: int):
    return {
        "real_fraction": (real_inputs + real_targets) / (slots_inputs + slots_targets),
        "real_fraction_inputs": real_inputs / slots_inputs,
        "real_fraction_targets": real_targets / slots_targets,
    }


def ours(args: argparse.Namespace, dataset: str, pack: bool) -> dict[str, Any]:
    import seqio

    from benchmarks.train_throughput import auto_rows
    from dsbs_jax.input_pipeline import train_batches

    lengths = {"inputs": args.inputs_length, "targets": args.targets_length}
    mixture = f"dsbs_{dataset}_step_by_step"
    if pack:
        rows = args.rows or auto_rows(mixture, lengths, args.batch_size, args.seed)
    else:
        rows = 2 * args.batch_size
    stream = train_batches(mixture, lengths, rows, seqio.ShardInfo(0, 1), args.seed, pack)
    totals = [0, 0, 0, 0]
    sequences = 0
    for _ in range(args.steps):
        batch = next(stream)
        inputs, targets = batch["encoder_input_tokens"], batch["decoder_target_tokens"]
        totals[0] += int((inputs > 0).sum())
        totals[1] += inputs.size
        totals[2] += int((targets > 0).sum())
        totals[3] += targets.size
        if pack:
            sequences += int(batch["decoder_segment_ids"].max(axis=1).sum())
        else:
            sequences += int((targets > 0).any(axis=1).sum())
    return {
        **_fractions(*totals),
        "examples_per_batch": sequences / 2 / args.steps,
        "rows": rows,
        "inputs_length": args.inputs_length,
        "targets_length": args.targets_length,
    }


def baseline(args: argparse.Namespace, dataset: str) -> dict[str, Any]:
    pairs = common.paired_examples(dataset, "train", OFFICIAL_LENGTHS, args.seed)
    totals = [0, 0, 0, 0]
    padded_lengths = []
    for _ in range(args.steps):
        chunk = [next(pairs) for _ in range(args.batch_size)]
        for rows in ([label for label, _ in chunk], [rationale for _, rationale in chunk]):
            inputs = [len(r["inputs"]) for r in rows]
            targets = [len(r["targets"]) for r in rows]
            totals[0] += sum(inputs)
            totals[1] += len(rows) * max(inputs)
            totals[2] += sum(targets)
            totals[3] += len(rows) * max(targets)
            padded_lengths.append((max(inputs), max(targets)))
    return {**_fractions(*totals), "examples_per_batch": float(args.batch_size)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    common.quiet_tensorflow()
    dataset = common.prepare_data(args)
    results = {
        "ours": ours(args, dataset, pack=True),
        "ours_unpacked": ours(args, dataset, pack=False),
        "baseline": baseline(args, dataset),
    }
    results["ours"]["dataset"] = dataset
    return common.report("packing", args, results, FIGURES)


if __name__ == "__main__":
    main()
