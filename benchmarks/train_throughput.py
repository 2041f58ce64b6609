"""Training throughput: ours (packed, one jitted step) against the official training step.

    python -m benchmarks.train_throughput --json benchmarks/results/train.json

Ours: the paired step-by-step mixture, packed into rows of `--inputs-length` /
`--targets-length` tokens, through the training program's jitted train step (AdamW with
clipping, state donated). The number of packed rows is chosen so that a step holds
`--batch-size` input pairs on average; the pairs actually present are counted.

Baseline, as the official `TaskPrefixTrainer` runs a step: Hugging Face
`T5ForConditionalGeneration` in PyTorch, the `predict:` batch and the `explain:` batch of the
same `--batch-size` inputs each padded to its own longest row (DataCollatorForSeq2Seq), two
forward passes, `alpha * pred_loss + (1 - alpha) * expl_loss`, backward, gradient clipping at
1.0, AdamW (lr 5e-5, linear decay).

`gflops` is the FLOP rate a step achieves (XLA's count of the compiled step for ours,
elementwise work included; for the baseline, with `--count-flops`, torch's FlopCounterMode
over the timed batches, counted after timing, matrix work only); `matrix_gflops` counts
matrix work alone on both sides (ours: the dots of the compiled step). Set them against
`benchmarks.matmul`'s rate on the same machine.

Each side runs on the accelerator its framework sees, if any: ours on `jax.devices()[0]` (a GPU
when JAX has CUDA), the baseline on `cuda` when `torch.cuda.is_available()`; else on the CPU.
Each side reports its `device` and `platform`, and on a chip of `benchmarks.peaks` the chip's
published dense peak for the step's multiplies (`peak_tflops`) and `peak_fraction`, the
matrix work's FLOP rate (`matrix_gflops`) over it.

The batches come from SeqIO, which needs TensorFlow. For a host without it,
`--write-batches FILE` builds both sides' batches here and writes them (`benchmarks.batch_file`),
and `--batches FILE` there, with the same settings, reads them instead of building them.

An example is one input with its label and its rationale; tokens are the non-padding encoder
and target tokens; both are counted the same way on both sides. Batches are built before
timing on both sides, so the figures are of the training step alone. Rates are medians over
the timed steps of (amount in the step / step time).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import batch_file, common, matmul, peaks
from dsbs_jax.errors import EXIT_BAD_INPUT, UserError

OFFICIAL_LENGTHS = {"inputs": 1024, "targets": 256}  # the official truncation
FIGURES = (
    ("examples_per_s", "examples/s", "higher"),
    ("tokens_per_s", "tokens/s", "higher"),
    ("step_time_median_s", "s", "lower"),
    ("examples_per_cpu_s", "examples per CPU-second", "higher"),
    ("peak_rss_mib", "MiB", "lower"),
    ("compile_s", "s", "lower"),
    ("real_token_fraction", "", "higher"),
    ("gflops", "GFLOP/s achieved by the step", "higher"),
    ("matrix_gflops", "GFLOP/s of matrix work achieved by the step", "higher"),
)
# The settings that make the batches: a batch file is read only with the ones it was written with.
BATCH_SETTINGS = (
    "dataset",
    "spm_vocab_size",
    "batch_size",
    "inputs_length",
    "targets_length",
    "rows",
    "no_pack",
    "alpha",
    "seed",
    "warmup",
    "steps",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, prog="python -m " + __spec__.name)
    common.add_common_args(parser)
    parser.add_argument("--batch-size", type=int, default=16, help="input pairs per step")
    parser.add_argument("--inputs-length", type=int, default=384, help="ours: packed row length")
    parser.add_argument("--targets-length", type=int, default=136, help="ours: packed row length")
    parser.add_argument(
        "--rows", type=int, default=0, help="ours: packed rows per step (0: about --batch-size)"
    )
    parser.add_argument("--no-pack", action="store_true", help="ours: pad instead of packing")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument(
        "--count-flops",
        action="store_true",
        help="baseline: count each timed step's FLOPs (torch FlopCounterMode, after timing); "
        "ours always reports XLA's count",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="ours: trace one more step into this folder and report where its time goes",
    )
    parser.add_argument(
        "--use-hardware-rng",
        action="store_true",
        help="ours: dropout masks from XLA's RngBitGenerator (train.use_hardware_rng)",
    )
    stored = parser.add_mutually_exclusive_group()
    stored.add_argument(
        "--write-batches",
        type=Path,
        default=None,
        metavar="FILE",
        help="build both sides' batches (SeqIO, TensorFlow), write them to FILE (.npz) and stop",
    )
    stored.add_argument(
        "--batches",
        type=Path,
        default=None,
        metavar="FILE",
        help="read the batches from FILE (written by --write-batches with the same settings) "
        "instead of building them: no TensorFlow or SeqIO needed",
    )
    return parser


def _counts(batch: dict[str, Any], pack: bool) -> tuple[float, int, int]:
    """(input pairs, real tokens, token slots) of one of our batches."""
    if pack:
        sequences = int(batch["decoder_segment_ids"].max(axis=1).sum())
    else:
        sequences = int((batch["decoder_target_tokens"] > 0).any(axis=1).sum())
    real = int(
        (batch["encoder_input_tokens"] > 0).sum() + (batch["decoder_target_tokens"] > 0).sum()
    )
    slots = batch["encoder_input_tokens"].size + batch["decoder_target_tokens"].size
    return sequences / 2, real, slots


def auto_rows(mixture: str, lengths: dict[str, int], batch_size: int, seed: int) -> int:
    """Packed rows per step that hold about `batch_size` pairs, from a sample of rows."""
    import seqio

    from dsbs_jax.input_pipeline import train_batches

    sample = train_batches(mixture, lengths, 16, seqio.ShardInfo(0, 1), seed + 1)
    pairs = [_counts(next(sample), pack=True)[0] for _ in range(4)]
    pairs_per_row = sum(pairs) / (16 * len(pairs))
    return max(1, round(batch_size / pairs_per_row))


def ours_batches(args: argparse.Namespace, dataset: str) -> tuple[int, list[dict[str, Any]]]:
    """Ours, from SeqIO: (packed rows a step, the batches of every step, compiling and warmup
    steps included)."""
    import seqio

    from dsbs_jax.input_pipeline import train_batches

    with_gin_alpha(args.alpha)  # the loss weights are the batches' decoder_loss_weights
    lengths = {"inputs": args.inputs_length, "targets": args.targets_length}
    mixture = f"dsbs_{dataset}_step_by_step"
    pack = not args.no_pack
    rows = args.rows or (
        auto_rows(mixture, lengths, args.batch_size, args.seed) if pack else 2 * args.batch_size
    )
    stream = train_batches(mixture, lengths, rows, seqio.ShardInfo(0, 1), args.seed, pack)
    return rows, [next(stream) for _ in range(_all_steps(args))]


def baseline_pairs(args: argparse.Namespace, dataset: str) -> list[list[batch_file.Pair]]:
    """The baseline's, from SeqIO: each step's `--batch-size` (label, rationale) pairs."""
    pairs = common.paired_examples(dataset, "train", OFFICIAL_LENGTHS, args.seed)
    return [[next(pairs) for _ in range(args.batch_size)] for _ in range(_all_steps(args))]


def _all_steps(args: argparse.Namespace) -> int:
    """Steps a side runs: the first (compiling) step, the warmup steps and the timed ones."""
    return 1 + args.warmup + args.steps


def batch_meta(args: argparse.Namespace, dataset: str, rows: int) -> dict[str, Any]:
    """What a batch file records besides its batches: the settings that made them, the
    dataset they are of (the synthetic one when cqa was asked for and absent), ours' rows."""
    return {
        "settings": {name: getattr(args, name) for name in BATCH_SETTINGS},
        "dataset": dataset,
        "rows": rows,
    }


def write_batches(args: argparse.Namespace) -> int:
    """`--write-batches`: both sides' batches, built as the sides build them, written to the
    file; returns its size in bytes."""
    common.quiet_tensorflow()
    dataset = common.prepare_data(args)
    rows, ours_steps = ours_batches(args, dataset)
    baseline_steps = baseline_pairs(args, dataset)
    size = batch_file.write(
        args.write_batches, batch_meta(args, dataset, rows), ours_steps, baseline_steps
    )
    print(
        f"wrote {args.write_batches}: {size / 2**20:.2f} MiB ({size} bytes), "
        f"{len(ours_steps)} steps of both sides' batches",
        flush=True,
    )
    return size


def read_batches(args: argparse.Namespace) -> batch_file.Batches:
    """`--batches`: the file's batches, if it was written with this run's settings."""
    stored = batch_file.read(args.batches)
    written = stored.meta["settings"]
    differ = [name for name in BATCH_SETTINGS if written.get(name) != getattr(args, name)]
    if differ:
        flags = ", ".join(_flag(name, written.get(name)) for name in differ)
        raise UserError(
            f"{args.batches} was written with {flags}: run with those settings, or write "
            "batches for these ones with --write-batches"
        )
    return stored


def _flag(name: str, value: Any) -> str:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"no {flag}"
    return f"{flag} {value}"


def _on_device(name: str, platform: str, precision: str) -> dict[str, Any]:
    """Where a side ran and, on a chip of the peak table, its peak for the step's multiplies."""
    peak = peaks.peak_tflops(name, precision)
    if peak is None:
        return {"device": name, "platform": platform}
    return {"device": name, "platform": platform, "peak_tflops": peak, "peak_precision": precision}


def ours(args: argparse.Namespace) -> dict[str, Any]:
    if args.batches:
        stored = read_batches(args)
        dataset, rows, batches = stored.meta["dataset"], stored.meta["rows"], stored.ours
    else:
        common.quiet_tensorflow()
        dataset = common.prepare_data(args)
        rows, batches = ours_batches(args, dataset)
    import jax

    from dsbs_jax import optimizers, trainer
    from dsbs_jax.partitioning import Partitioner
    from dsbs_jax.state import Student

    pack = not args.no_pack
    rss_before = common.current_rss_mib()

    device = jax.devices()[0]  # JAX's first device: a GPU when JAX has CUDA
    student = Student(common.model_config(args), Partitioner(devices=[device]))
    partitioner = student.partitioner
    optimizer = optimizers.make_optimizer(10_000)
    state = student.init_train_state(optimizer, args.seed)
    rng = trainer.dropout_key(args.seed, args.use_hardware_rng)
    with partitioner.activation_rules():
        step = trainer.jit_train_step(
            student.model,
            optimizer,
            partitioner,
            student.abstract_train_state(optimizer),
            1,
            0.0,
            1e-4,
        )
        first = partitioner.shard_batch(batches[0])
        compile_s, compiled = common.timed(lambda: step.lower(state, first, rng).compile())
        times: list[tuple[float, float]] = []
        for batch in batches:
            seconds, cpu, (state, metrics) = common.timed_cpu(
                lambda b=batch: jax.block_until_ready(
                    compiled(state, partitioner.shard_batch(b), rng)  # noqa: B023
                )
            )
            times.append((seconds, cpu))
        profile = (
            _profile(compiled, state, partitioner.shard_batch(batches[-1]), rng, args.profile)
            if args.profile
            else {}
        )
    loss = float(metrics["loss"])
    return _summary(
        [_counts(b, pack) for b in batches],
        times,
        args,
        compile_s=compile_s,
        rss_before=rss_before,
        rows=rows,
        inputs_length=args.inputs_length,
        targets_length=args.targets_length,
        packed=pack,
        dataset=dataset,
        last_loss=loss,
        xla_temp_mib=_temp_mib(compiled),
        gflop_per_step=_xla_gflop(compiled),
        matrix_gflop_per_step=matmul.dot_gflop(compiled.as_text()),
        **_on_device(device.device_kind, device.platform, _jax_precision(args.dtype)),
        **profile,
    )


def _jax_precision(dtype: str) -> str:
    """The peak ours' multiplies run at (`benchmarks.peaks`): JAX's default matmul precision
    multiplies float32 as TF32 on NVIDIA GPUs; "highest" or "float32" asks for float32."""
    import jax

    if dtype == "bfloat16":
        return "bfloat16"
    full = jax.config.jax_default_matmul_precision in ("highest", "float32")
    return "float32" if full else "tf32"


def _profile(compiled: Any, state: Any, batch: Any, rng: Any, trace_dir: Path) -> dict[str, Any]:
    """One traced step (it consumes the donated `state`, so it comes last): op-time shares
    by kind and the top ops with their HLO, printed and returned for the JSON."""
    hlo = {
        line.split(" = ")[0].strip().removeprefix("ROOT ").lstrip("%"): line.strip()[:160]
        for line in compiled.as_text().splitlines()
        if " = " in line
    }
    seconds = common.profile_ops(lambda: compiled(state, batch, rng), trace_dir, hlo.keys())
    shares = common.op_time_shares(seconds)
    top = sorted(seconds.items(), key=lambda item: -item[1])[:12]
    print(f"op time of one traced step: {sum(seconds.values()):.2f} s over XLA's threads")
    for kind, share in shares.items():
        print(f"  {100 * share:5.1f}%  {kind}")
    for name, value in top:
        print(f"  {1000 * value:8.1f} ms  {hlo[name]}")
    return {
        "op_time_shares": shares,
        "top_ops": [{"op": hlo[name], "seconds": value} for name, value in top],
    }


def with_gin_alpha(alpha: float) -> None:
    import gin

    with gin.unlock_config():
        gin.bind_parameter("step_by_step_loss_weights.alpha", alpha)


def _xla_gflop(compiled: Any) -> float | None:
    """XLA's FLOP count of the compiled step (multiply-adds count 2), in GFLOP."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # cost analysis is not available on every backend
        return None
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return flops / 1e9 if flops else None


def _torch_gflop(step: Any) -> float:
    """FLOPs `step()` runs in PyTorch, counted by FlopCounterMode, in GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / 1e9


def _temp_mib(compiled: Any) -> float | None:
    try:
        return compiled.memory_analysis().temp_size_in_bytes / 2**20
    except Exception:  # memory analysis is not available on every backend
        return None


def baseline(args: argparse.Namespace) -> dict[str, Any]:
    if args.batches:
        stored = read_batches(args)
        dataset, steps = stored.meta["dataset"], stored.baseline
    else:
        common.quiet_tensorflow()
        dataset = common.prepare_data(args)
        steps = baseline_pairs(args, dataset)
    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batches, counts = [], []
    for chunk in steps:
        pred = _collate([label for label, _ in chunk])
        expl = _collate([rationale for _, rationale in chunk])
        batches.append({"pred": pred, "expl": expl})
        real = sum(
            int(b["attention_mask"].sum() + (b["labels"] != -100).sum()) for b in (pred, expl)
        )
        slots = sum(b["input_ids"].numel() + b["labels"].numel() for b in (pred, expl))
        counts.append((float(args.batch_size), real, slots))
    batches = [
        {kind: {k: v.to(device) for k, v in batch[kind].items()} for kind in batch}
        for batch in batches
    ]
    rss_before = common.current_rss_mib()

    model = common.hf_model(common.model_config(args), args.seed).to(device)
    model.train()
    total_steps = 10_000
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.0)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, 0, total_steps)
    alpha = args.alpha

    def train_step(batch: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
        with common.baseline_precision(args, device.type):
            pred_outputs = model(**batch["pred"])
            expl_outputs = model(**batch["expl"])
            loss = alpha * pred_outputs.loss + (1.0 - alpha) * expl_outputs.loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        model.zero_grad()
        return loss.detach()

    def synchronize() -> None:  # a GPU runs what it was given after the call returns
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed_step(batch: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
        loss = train_step(batch)
        synchronize()
        return loss

    synchronize()
    times = []
    for batch in batches:
        seconds, cpu, loss = common.timed_cpu(lambda b=batch: timed_step(b))
        times.append((seconds, cpu))
    last_loss = float(loss)
    gflop = None
    if args.count_flops:  # after timing: the counter slows the steps it watches
        skip = 1 + args.warmup
        gflop = statistics.mean(_torch_gflop(lambda b=b: train_step(b)) for b in batches[skip:])
    return _summary(
        counts,
        times,
        args,
        compile_s=None,
        rss_before=rss_before,
        dataset=dataset,
        last_loss=last_loss,
        gflop_per_step=gflop,
        matrix_gflop_per_step=gflop,  # FlopCounterMode counts matrix work
        torch_threads=torch.get_num_threads(),
        **_on_device(
            torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            device.type,
            _torch_precision(args.baseline_dtype),
        ),
        mean_padded_lengths=[
            float(np.mean([b[t][k].shape[1] for b in batches]))
            for t in ("pred", "expl")
            for k in ("input_ids", "labels")
        ],
    )


def _torch_precision(dtype: str) -> str:
    """The peak the baseline's multiplies run at (`benchmarks.peaks`): PyTorch multiplies
    float32 in full float32 unless TF32 is allowed (float32 matmul precision below "highest")."""
    import torch

    if dtype == "bfloat16":
        return "bfloat16"
    return "float32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _collate(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """DataCollatorForSeq2Seq: pad to the longest row; labels padded with -100."""
    import numpy as np
    import torch

    def pad(key: str, value: int) -> torch.Tensor:
        longest = max(len(ex[key]) for ex in examples)
        out = torch.full((len(examples), longest), value, dtype=torch.long)
        for row, ex in enumerate(examples):
            out[row, : len(ex[key])] = torch.from_numpy(np.array(ex[key], dtype=np.int64))
        return out

    input_ids = pad("inputs", 0)
    return {
        "input_ids": input_ids,
        "attention_mask": (input_ids != 0).long(),
        "labels": pad("targets", -100),
    }


def _summary(
    counts: Sequence[tuple[float, int, int]],
    times: Sequence[tuple[float, float]],
    args: argparse.Namespace,
    compile_s: float | None,
    rss_before: float,
    **extra: Any,
) -> dict[str, Any]:
    """Figures over the timed steps: the first (compiling) and the warmup steps are left out."""
    skip = 1 + args.warmup
    timed_counts = counts[skip:]
    timed_times, cpu_times = [t[0] for t in times[skip:]], [t[1] for t in times[skip:]]
    examples = [c[0] for c in timed_counts]
    tokens = [c[1] for c in timed_counts]
    result = {
        "examples_per_s": common.median_rate(examples, timed_times),
        "tokens_per_s": common.median_rate(tokens, timed_times),
        "step_time_median_s": statistics.median(timed_times),
        "step_time_min_s": min(timed_times),
        "step_cpu_time_median_s": statistics.median(cpu_times),
        "examples_per_cpu_s": common.median_rate(examples, cpu_times),
        "first_step_s": times[0][0],
        "examples_per_step": statistics.mean(examples),
        "real_token_fraction": sum(tokens) / sum(c[2] for c in timed_counts),
        "peak_rss_mib": common.peak_rss_mib(),
        "rss_before_model_mib": rss_before,
        "timed_steps": len(timed_times),
        **extra,
    }
    if compile_s is not None:
        result["compile_s"] = compile_s
    if extra.get("gflop_per_step"):
        # The step's FLOP rate, to set against benchmarks.matmul's on the same machine.
        result["gflops"] = extra["gflop_per_step"] / statistics.median(timed_times)
    if extra.get("matrix_gflop_per_step"):
        result["matrix_gflops"] = extra["matrix_gflop_per_step"] / statistics.median(timed_times)
        if extra.get("peak_tflops"):  # the chip's share that the step's matrix work uses
            result["peak_fraction"] = result["matrix_gflops"] / (1000 * extra["peak_tflops"])
    return {k: v for k, v in result.items() if v is not None}


SIDE_FNS = {"ours": ours, "baseline": baseline}


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.write_batches:
            write_batches(args)
            return None
        if args.batches and args.side is None:
            read_batches(args)  # a missing or mismatched file stops here, before any side
        ran = common.main_sides(__spec__.name, build_parser(), SIDE_FNS, argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    if ran is None:
        return None
    args, results = ran
    for side, result in results.items():
        print(f"train {side} device: {result['device']} ({result['platform']})", flush=True)
    return common.report("train", args, results, FIGURES)


if __name__ == "__main__":
    main()
