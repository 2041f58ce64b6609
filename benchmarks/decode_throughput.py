"""Label-only decoding throughput: our jitted greedy decoding against Hugging Face `generate`.

    python -m benchmarks.decode_throughput --json benchmarks/results/decode.json

Both sides decode the `predict:` inputs of the test split, `--batch-size` inputs at a time,
greedily, for exactly `--max-decode-length` steps: random weights rarely emit EOS where a
trained model would, so EOS is disabled on both sides (ours: an `eos_id` no token has, so the
loop never stops early; Hugging Face: `min_new_tokens` equal to `max_new_tokens`). Ours pads
each batch's inputs to the next multiple of `--pad-multiple` tokens (one compiled program per
length, all compiled before timing); Hugging Face pads each batch to its longest input.

Ours: `dsbs_jax.decoding.greedy_decode` (encoder once, key/value cache, one `while_loop`).
Baseline: `T5ForConditionalGeneration.generate(num_beams=1, do_sample=False)`, key/value cache
on, as the official `Seq2SeqTrainer(predict_with_generate=True)` evaluates.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks import common

FIGURES = (
    ("examples_per_s", "examples/s", "higher"),
    ("tokens_per_s", "generated tokens/s", "higher"),
    ("batch_time_median_s", "s", "lower"),
    ("examples_per_cpu_s", "examples per CPU-second", "higher"),
    ("peak_rss_mib", "MiB", "lower"),
    ("compile_s", "s", "lower"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, prog="python -m " + __spec__.name)
    common.add_common_args(parser)
    parser.set_defaults(steps=8, warmup=1)
    parser.add_argument("--batch-size", type=int, default=16, help="inputs per batch")
    parser.add_argument("--max-decode-length", type=int, default=16, help="tokens decoded")
    parser.add_argument("--pad-multiple", type=int, default=16, help="ours: input length step")
    return parser


def _input_batches(dataset: str, args: argparse.Namespace) -> list[list[np.ndarray]]:
    """`warmup + steps` batches of test-split `predict:` inputs (token ids, EOS included)."""
    import seqio

    task = seqio.get_mixture_or_task(f"dsbs_{dataset}_label_llm")
    ds = task.get_dataset({"inputs": 1024, "targets": 256}, split="test", shuffle=False)
    inputs = [ex["inputs"] for ex in ds.as_numpy_iterator()]
    needed = (args.warmup + args.steps) * args.batch_size
    inputs = (inputs * (needed // max(len(inputs), 1) + 1))[:needed]
    return [inputs[i : i + args.batch_size] for i in range(0, needed, args.batch_size)]


def _padded(rows: Sequence[np.ndarray], length: int) -> np.ndarray:
    out = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def ours(args: argparse.Namespace) -> dict[str, Any]:
    common.quiet_tensorflow()
    dataset = common.prepare_data(args)
    import jax

    from dsbs_jax import decoding
    from dsbs_jax.models.t5 import T5

    batches = _input_batches(dataset, args)
    multiple = args.pad_multiple
    arrays = [_padded(b, -(-max(len(r) for r in b) // multiple) * multiple) for b in batches]
    rss_before = common.current_rss_mib()
    config = common.model_config(args)
    model = T5(config)
    ones = np.ones((1, 8), np.int32)
    params = jax.jit(lambda key: model.init(key, ones, ones, enable_dropout=False)["params"])(
        jax.random.key(args.seed)
    )
    length = args.max_decode_length

    compile_s = 0.0
    compiled: dict[int, Any] = {}
    for array in arrays:
        if array.shape[1] not in compiled:
            # eos_id -1: no token ever matches it, so every row decodes `length` tokens.
            seconds, program = common.timed(
                lambda a=array: decoding.greedy_decode.lower(
                    model, params, a, length, eos_id=-1
                ).compile()
            )
            compile_s += seconds
            compiled[array.shape[1]] = program
    times = []
    for array in arrays:
        seconds, cpu, tokens = common.timed_cpu(
            lambda a=array: jax.block_until_ready(compiled[a.shape[1]](params, a))
        )
        times.append((seconds, cpu))
    assert tokens.shape == (args.batch_size, length), tokens.shape
    return _summary(
        times,
        args,
        rss_before,
        compile_s=compile_s,
        compiled_lengths=sorted(compiled),
        mean_padded_input_length=float(np.mean([a.shape[1] for a in arrays])),
        dataset=dataset,
    )


def baseline(args: argparse.Namespace) -> dict[str, Any]:
    common.quiet_tensorflow()
    dataset = common.prepare_data(args)
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    batches = _input_batches(dataset, args)
    tensors = []
    for batch in batches:
        input_ids = torch.as_tensor(_padded(batch, max(len(r) for r in batch)), dtype=torch.long)
        tensors.append((input_ids, (input_ids != 0).long()))
    rss_before = common.current_rss_mib()
    model = common.hf_model(common.model_config(args), args.seed)
    model.eval()
    length = args.max_decode_length
    generation_config = transformers.GenerationConfig(
        max_new_tokens=length,
        min_new_tokens=length,  # never stop early: the same work as ours
        do_sample=False,
        num_beams=1,
        use_cache=True,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    times = []
    for input_ids, attention_mask in tensors:
        with common.baseline_precision(args):
            seconds, cpu, out = common.timed_cpu(
                lambda i=input_ids, m=attention_mask: model.generate(
                    input_ids=i, attention_mask=m, generation_config=generation_config
                )
            )
        times.append((seconds, cpu))
    assert tuple(out.shape) == (args.batch_size, length + 1), out.shape  # + the start token
    return _summary(
        times,
        args,
        rss_before,
        compile_s=None,
        mean_padded_input_length=float(np.mean([t[0].shape[1] for t in tensors])),
        dataset=dataset,
        torch_threads=torch.get_num_threads(),
    )


def _summary(
    times: Sequence[tuple[float, float]],
    args: argparse.Namespace,
    rss_before: float,
    compile_s: float | None,
    **extra: Any,
) -> dict[str, Any]:
    timed = [t[0] for t in times[args.warmup :]]
    cpu = [t[1] for t in times[args.warmup :]]
    result = {
        "examples_per_s": args.batch_size / statistics.median(timed),
        "tokens_per_s": args.batch_size * args.max_decode_length / statistics.median(timed),
        "batch_time_median_s": statistics.median(timed),
        "batch_time_min_s": min(timed),
        "batch_cpu_time_median_s": statistics.median(cpu),
        "examples_per_cpu_s": args.batch_size / statistics.median(cpu),
        "first_batch_s": times[0][0],
        "peak_rss_mib": common.peak_rss_mib(),
        "rss_before_model_mib": rss_before,
        "timed_batches": len(timed),
        **extra,
    }
    if compile_s is not None:
        result["compile_s"] = compile_s
    return result


SIDE_FNS = {"ours": ours, "baseline": baseline}


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    ran = common.main_sides(__spec__.name, build_parser(), SIDE_FNS, argv)
    if ran is None:
        return None
    args, results = ran
    return common.report("decode", args, results, FIGURES)


if __name__ == "__main__":
    main()
