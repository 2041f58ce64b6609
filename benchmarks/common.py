"""What the benchmark scripts share: data, model configs, timing, memory, sides, reports.

Every script compares "ours" (this package: JAX/XLA, SeqIO, packing) with "baseline" (the
official code's way: Hugging Face `T5ForConditionalGeneration` in PyTorch, two separately and
dynamically padded forward passes per step, AdamW, `generate`). Both sides see the same token
ids, from this package's SeqIO tasks, and the same model dimensions with random weights.

By default each side runs in its own fresh Python process, so that peak memory (the process's
maximum resident set size) belongs to that side alone and the two frameworks' thread pools
never compete. `--in-process` runs both in this process (tests).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

SIDES = ("ours", "baseline")
DEFAULT_DATA_DIR = Path(os.environ.get("DSBS_BENCH_DATA", "/tmp/dsbs_jax_bench"))
OFFICIAL_DATA = Path(__file__).resolve().parents[2] / "shared/data/dsbs"
# T5's vocabulary size (32100 pieces padded to 32128): the model is built with it on both sides
# even though the token ids come from a small SentencePiece vocabulary trained on the cache.
T5_VOCAB_SIZE = 32128


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        default="cqa",
        help="cqa (official teacher outputs, prepared from --official-data) or synthetic; "
        "cqa falls back to synthetic when the official data is absent",
    )
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="cache root")
    parser.add_argument("--official-data", type=Path, default=OFFICIAL_DATA)
    parser.add_argument(
        "--spm-vocab-size", type=int, default=8000, help="pieces of the vocabulary trained here"
    )
    parser.add_argument("--preset", default="small", help="T5 1.1 preset of dsbs_jax.models.t5")
    parser.add_argument(
        "--model-vocab-size",
        type=int,
        default=T5_VOCAB_SIZE,
        help="the model's vocabulary size, on both sides (T5's 32128 by default)",
    )
    parser.add_argument("--dropout", type=float, default=0.1, help="dropout rate, both sides")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="ours: activation dtype (t5_config.dtype); parameters stay float32",
    )
    parser.add_argument(
        "--baseline-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="baseline: bfloat16 runs it under torch.autocast, as the official --bf16 does",
    )
    add_side_args(parser)


def add_side_args(parser: argparse.ArgumentParser) -> None:
    """What every script takes, data or not: threads, steps, sides, processes, output."""
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count(),
        help="PyTorch's threads; XLA uses every core, which is the default of both",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps (or batches)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sides", default="ours,baseline", help="comma-separated")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument(
        "--in-process", action="store_true", help="run every side in this process (tests)"
    )
    parser.add_argument("--side", choices=SIDES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, default=None, help=argparse.SUPPRESS)


def quiet_tensorflow() -> None:
    """TensorFlow (SeqIO's data pipeline) logs less; call before it is imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def prepare_data(args: argparse.Namespace) -> str:
    """Makes sure the dataset's cache and vocabulary exist, points gin at them; returns its name.

    cqa is prepared from the official teacher outputs; without them, the built-in
    synthetic dataset is used instead (and the returned name says so).
    """
    import gin

    import tasks  # noqa: F401  (registers the tasks)
    from dsbs_jax.data import vocab

    dataset = args.dataset
    root = Path(args.data_dir).expanduser()
    if dataset != "synthetic" and not (root / dataset / "train.jsonl").exists():
        if (Path(args.official_data) / dataset).is_dir():
            from dsbs_jax.data import prepare

            prepare.prepare_official(args.official_data, dataset, root)
        else:
            print(
                f"{args.official_data / dataset} not found: using the built-in synthetic data",
                file=sys.stderr,
            )
            dataset = "synthetic"
    if dataset == "synthetic" and not (root / dataset / "train.jsonl").exists():
        from dsbs_jax.data import cache, synthetic

        cache.write_splits(root / dataset, synthetic.generate(synthetic.SyntheticConfig()))
    spm_model = root / dataset / vocab.VOCAB_FILENAME
    if not spm_model.exists():
        vocab.train_vocab_for_cache(root / dataset, vocab_size=args.spm_vocab_size)
    with gin.unlock_config():
        gin.bind_parameter("teacher_cache_root.path", str(root))
        gin.bind_parameter("vocabulary_file.path", str(spm_model))
    return dataset


def model_config(args: argparse.Namespace) -> Any:
    """Our T5Config for the benchmark, with activations in `--dtype`."""
    import jax.numpy as jnp

    from dsbs_jax.models.t5 import get_config

    return get_config(
        args.preset,
        vocab_size=args.model_vocab_size,
        dropout_rate=args.dropout,
        dtype=jnp.dtype(args.dtype),
    )


def baseline_precision(args: argparse.Namespace, device_type: str = "cpu") -> Any:
    """The context the baseline's forward passes run in: autocast for `--baseline-dtype` on
    the device type the model is on ("cpu" or "cuda")."""
    import torch

    if args.baseline_dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=getattr(torch, args.baseline_dtype))


def hf_model(config: Any, seed: int) -> Any:
    """A randomly initialised Hugging Face T5ForConditionalGeneration of our config's shape."""
    import torch
    import transformers

    from dsbs_jax.checkpoint_import import t5_config_to_hf_config

    torch.manual_seed(seed)
    hf_config = transformers.T5Config(**t5_config_to_hf_config(config))
    model = transformers.T5ForConditionalGeneration(hf_config)
    if not config.logits_via_embedding and (
        model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr()
    ):
        # transformers 5 ties lm_head in memory even for T5 1.1; untie it, as v1.1 is.
        with torch.no_grad():
            model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
    return model


def paired_examples(
    dataset: str, split: str, lengths: Mapping[str, int], seed: int, shuffle: bool = True
) -> Any:
    """(label example, rationale example) pairs of one input, tokenised by the tasks.

    The paired step-by-step mixture yields each input's `predict:` example, then its
    `explain:` example; both carry EOS, as the official tokenizer adds it.
    """
    import seqio

    ds = seqio.get_mixture_or_task(f"dsbs_{dataset}_step_by_step").get_dataset(
        dict(lengths), split=split, shuffle=shuffle, seed=seed, num_epochs=None if shuffle else 1
    )
    it = ds.as_numpy_iterator()
    for label in it:
        yield label, next(it)


# ---------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall-clock seconds, result) of `fn()`."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def timed_cpu(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall-clock seconds, CPU seconds of this process, all threads, result) of `fn()`.

    On a machine shared with other work, wall-clock time grows with the others' load while
    the CPU time a step needs changes much less, so both are reported.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def median_rate(amounts: Sequence[float], seconds: Sequence[float]) -> float:
    """Median over steps of amount / time: robust to steps slowed by other processes."""
    return statistics.median(a / s for a, s in zip(amounts, seconds, strict=True))


# ---------------------------------------------------------------------------------------------
# Where a compiled step spends its time
# ---------------------------------------------------------------------------------------------

# What an XLA:CPU op name (its HLO instruction name without the ".N") says it does.
OP_KINDS = (
    ("matrix multiplies", ("dot", "ynn_fusion", "convolution")),
    ("layout copies", ("copy", "transpose")),
    ("random bits", ("threefry", "rng", "random")),
    ("exp, tanh, log", ("exponential", "tanh", "log")),
)


def op_kind(name: str) -> str:
    """The kind of an XLA op, from its name: the first of OP_KINDS whose words it contains."""
    for kind, words in OP_KINDS:
        if any(word in name for word in words):
            return kind
    return "other elementwise"


def profile_ops(
    run: Callable[[], Any], trace_dir: Path, op_names: Collection[str]
) -> dict[str, float]:
    """Seconds per XLA op of one `run()`, traced by jax.profiler: the spans named as one of
    `op_names` (the program's HLO instructions), not the runtime's own (executor, waits).

    Summed over XLA's CPU worker threads, so with several threads the sum exceeds the
    wall-clock time.
    """
    import jax
    from jax.profiler import ProfileData

    jax.profiler.start_trace(str(trace_dir))
    try:
        jax.block_until_ready(run())
    finally:
        jax.profiler.stop_trace()
    seconds: dict[str, float] = {}
    for path in Path(trace_dir).glob("**/*.xplane.pb"):
        for plane in ProfileData.from_file(str(path)).planes:
            for line in plane.lines:
                for event in line.events:
                    if event.name in op_names:
                        seconds[event.name] = seconds.get(event.name, 0.0) + event.duration_ns / 1e9
    return seconds


def op_time_shares(seconds: Mapping[str, float]) -> dict[str, float]:
    """Share of the op time per kind (`op_kind`), largest first."""
    total = sum(seconds.values()) or 1.0
    shares: dict[str, float] = {}
    for name, value in seconds.items():
        kind = op_kind(name)
        shares[kind] = shares.get(kind, 0.0) + value / total
    return dict(sorted(shares.items(), key=lambda item: -item[1]))


def current_rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def peak_rss_mib() -> float:
    """The process's maximum resident set size so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


# ---------------------------------------------------------------------------------------------
# Sides and reports
# ---------------------------------------------------------------------------------------------


def run_sides(
    module: str,
    argv: Sequence[str],
    args: argparse.Namespace,
    side_fns: Mapping[str, Callable[[argparse.Namespace], dict[str, Any]]],
) -> dict[str, dict[str, Any]]:
    """Runs each requested side, each in a fresh process unless `--in-process`."""
    results: dict[str, dict[str, Any]] = {}
    for side in [s for s in args.sides.split(",") if s]:
        if side not in side_fns:
            raise SystemExit(f"unknown side {side!r}; choose from {sorted(side_fns)}")
        if args.in_process:
            results[side] = side_fns[side](args)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            command = [sys.executable, "-m", module, *argv, "--side", side, "--result-file", out]
            subprocess.run([str(c) for c in command], check=True)
            results[side] = json.loads(out.read_text())
    return results


def child_main(args: argparse.Namespace, side_fns: Mapping[str, Callable]) -> bool:
    """In a side's own process: runs it and writes its result; False in the parent."""
    if args.side is None:
        return False
    result = side_fns[args.side](args)
    Path(args.result_file).write_text(json.dumps(result))
    return True


def main_sides(
    module: str,
    parser: argparse.ArgumentParser,
    side_fns: Mapping[str, Callable[[argparse.Namespace], dict[str, Any]]],
    argv: Sequence[str] | None,
) -> tuple[argparse.Namespace, dict[str, dict[str, Any]]] | None:
    """A script's main: (args, each side's result), or None in a side's own process."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if child_main(args, side_fns):
        return None
    return args, run_sides(module, argv, args, side_fns)


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }


def _cpu_model() -> str | None:
    """The CPU's name as Linux reports it ("model name" in /proc/cpuinfo), else None."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return None
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return None


def report(
    title: str,
    args: argparse.Namespace,
    results: Mapping[str, Mapping[str, Any]],
    figures: Sequence[tuple[str, str, str]],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Prints one line per figure (ours, baseline, ours/baseline) and writes the JSON.

    `figures` are (key in each side's result, unit, "higher" or "lower" is better).
    """
    ratios: dict[str, float] = {}
    for key, unit, better in figures:
        values = {side: results[side].get(key) for side in results}
        parts = [f"{side} {_fmt(v)} {unit}" for side, v in values.items() if v is not None]
        line = f"{title} {key}: " + " | ".join(parts)
        ours, base = values.get("ours"), values.get("baseline")
        if ours is not None and base:
            ratios[key] = ours / base
            line += f" | ours/baseline {ratios[key]:.2f}x ({better} is better)"
        print(line, flush=True)
    for side, result in results.items():
        for key, value in sorted(result.items()):
            if key not in {f[0] for f in figures} and isinstance(value, int | float):
                print(f"{title} {side} {key}: {_fmt(value)}", flush=True)
    payload = {
        "benchmark": title,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine(),
        "results": dict(results),
        "ratios": ratios,
        **(extra or {}),
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}", flush=True)
    return payload


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
