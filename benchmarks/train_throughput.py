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

An example is one input with its label and its rationale; tokens are the non-padding encoder
and target tokens; both are counted the same way on both sides. Batches are built before
timing on both sides, so the figures are of the training step alone. Rates are medians over
the timed steps of (amount in the step / step time).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import common, matmul

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


def ours(args: argparse.Namespace) -> dict[str, Any]:
    common.quiet_tensorflow()
    dataset = common.prepare_data(args)
    import jax
    import seqio

    from dsbs_jax import optimizers, trainer
    from dsbs_jax.input_pipeline import train_batches
    from dsbs_jax.partitioning import Partitioner
    from dsbs_jax.state import Student

    lengths = {"inputs": args.inputs_length, "targets": args.targets_length}
    mixture = f"dsbs_{dataset}_step_by_step"
    pack = not args.no_pack
    rows = args.rows or (
        auto_rows(mixture, lengths, args.batch_size, args.seed) if pack else 2 * args.batch_size
    )
    stream = train_batches(mixture, lengths, rows, seqio.ShardInfo(0, 1), args.seed, pack)
    batches = [next(stream) for _ in range(1 + args.warmup + args.steps)]
    rss_before = common.current_rss_mib()

    with_gin_alpha(args.alpha)
    student = Student(common.model_config(args), Partitioner())
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
        **profile,
    )


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
    common.quiet_tensorflow()
    dataset = common.prepare_data(args)
    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    pairs = common.paired_examples(dataset, "train", OFFICIAL_LENGTHS, args.seed)
    batches, counts = [], []
    for _ in range(1 + args.warmup + args.steps):
        chunk = [next(pairs) for _ in range(args.batch_size)]
        pred = _collate([label for label, _ in chunk])
        expl = _collate([rationale for _, rationale in chunk])
        batches.append({"pred": pred, "expl": expl})
        real = sum(
            int(b["attention_mask"].sum() + (b["labels"] != -100).sum()) for b in (pred, expl)
        )
        slots = sum(b["input_ids"].numel() + b["labels"].numel() for b in (pred, expl))
        counts.append((float(args.batch_size), real, slots))
    rss_before = common.current_rss_mib()

    model = common.hf_model(common.model_config(args), args.seed)
    model.train()
    total_steps = 10_000
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.0)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, 0, total_steps)
    alpha = args.alpha

    def train_step(batch: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
        with common.baseline_precision(args):
            pred_outputs = model(**batch["pred"])
            expl_outputs = model(**batch["expl"])
            loss = alpha * pred_outputs.loss + (1.0 - alpha) * expl_outputs.loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        model.zero_grad()
        return loss.detach()

    times = []
    for batch in batches:
        seconds, cpu, loss = common.timed_cpu(lambda b=batch: train_step(b))
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
        mean_padded_lengths=[
            float(np.mean([b[t][k].shape[1] for b in batches]))
            for t in ("pred", "expl")
            for k in ("input_ids", "labels")
        ],
    )


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
    return {k: v for k, v in result.items() if v is not None}


SIDE_FNS = {"ours": ours, "baseline": baseline}


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    ran = common.main_sides(__spec__.name, build_parser(), SIDE_FNS, argv)
    if ran is None:
        return None
    args, results = ran
    return common.report("train", args, results, FIGURES)


if __name__ == "__main__":
    main()
