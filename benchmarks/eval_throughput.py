"""End-to-end label evaluation: ours (generate and score modes) against the official evaluation.

    python -m benchmarks.eval_throughput --json benchmarks/results/eval.json

Both sides label the whole test split (cqa: 1221 inputs) with the same weights: a student of
`--preset` size trained here for `--train-steps` steps on the gold labels, so that it emits a
label and EOS as a trained model does, saved as our checkpoint and exported to Hugging Face
format (`<data-dir>/eval_student_*`, trained once and reused). Each side runs its own
evaluation loop over the split, from token ids to accuracy.

Ours: `dsbs_jax.evaluation.predict_labels` as validation and test run it, on the split read
once (as the trainer's evaluator keeps it; the baseline's token ids are read once too).
"generate": inputs sorted by length into batches of `--batch-size`, padded to a
quarter-octave grid of lengths, greedy decoding that stops once every row has produced EOS.
"score": each input's candidate labels (cqa: its five answer choices) scored as one prefix
tree, four inputs' trees to a decoder row, in one teacher-forced pass per batch of
`--score-batch-size` inputs (32: on a CPU, smaller batches pad fewer input tokens).
The first pass over the split compiles (reported as first_pass_s); the timed pass follows.

Baseline, as the official code evaluates (`Seq2SeqTrainer` with `predict_with_generate`):
batches of `--official-batch-size` inputs in split order, each padded to its longest input
(`DataCollatorForSeq2Seq`), a teacher-forced forward pass for the loss, then
`generate(max_length=--gen-max-len, num_beams=1)`, under `torch.no_grad`. One batch is run
before timing. Both sides' ratios (`ratios.examples_per_s_generate`, `..._score`) are against
this one baseline figure.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common

SPLIT = "test"
FIGURES = (
    ("examples_per_s_generate", "examples/s", "higher"),
    ("examples_per_s_score", "examples/s", "higher"),
    ("accuracy_generate", "%", "higher"),
    ("accuracy_score", "%", "higher"),
    ("examples", "", "higher"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, prog="python -m " + __spec__.name)
    common.add_common_args(parser)
    parser.add_argument("--batch-size", type=int, default=128, help="ours: inputs per batch")
    parser.add_argument(
        "--score-batch-size", type=int, default=32, help="ours: inputs per batch, score mode"
    )
    parser.add_argument("--length-normalized", action="store_true", help="ours, score mode")
    parser.add_argument("--modes", default="generate,score", help="ours: comma-separated")
    parser.add_argument("--official-batch-size", type=int, default=64, help="official --batch_size")
    parser.add_argument("--gen-max-len", type=int, default=64, help="official --gen_max_len")
    parser.add_argument("--inputs-length", type=int, default=1024, help="official truncation")
    parser.add_argument("--train-steps", type=int, default=150, help="student training steps")
    parser.add_argument("--train-batch-size", type=int, default=16, help="student rows per step")
    parser.add_argument("--train-lr", type=float, default=1e-3, help="student AdamW rate")
    parser.add_argument(
        "--limit", type=int, default=0, help="evaluate only this many inputs (0: the whole split)"
    )
    return parser


# ---------------------------------------------------------------------------------------------
# The student both sides evaluate
# ---------------------------------------------------------------------------------------------


def _student_dir(args: argparse.Namespace, dataset: str) -> Path:
    name = f"eval_student_{dataset}_{args.preset}_v{args.model_vocab_size}"
    name += f"_{args.train_steps}steps_seed{args.seed}"
    return Path(args.data_dir).expanduser() / name


def ensure_student(args: argparse.Namespace, dataset: str) -> Path:
    """Trains the student on `dataset`'s gold labels once; returns its directory, which holds
    `ours/` (our checkpoint) and `hf/` (Hugging Face format)."""
    out = _student_dir(args, dataset)
    if (out / "hf" / "config.json").is_file():
        return out
    import jax
    import optax
    import seqio
    from tqdm import tqdm

    from dsbs_jax import checkpoint_import, trainer
    from dsbs_jax.checkpoints import Checkpointer
    from dsbs_jax.input_pipeline import train_batches
    from dsbs_jax.models.t5 import T5
    from dsbs_jax.partitioning import Partitioner

    config = common.model_config(args)
    model, partitioner, optimizer = T5(config), Partitioner(), optax.adamw(args.train_lr)

    def init(key: jax.Array) -> Any:
        ones = jax.numpy.ones((1, 8), jax.numpy.int32)
        return model.init(key, ones, ones, enable_dropout=False)["params"]

    params, _ = partitioner.init_sharded(init, jax.random.key(args.seed))
    lengths = {"inputs": 256, "targets": 32}
    batches = train_batches(
        f"dsbs_{dataset}_finetune", lengths, args.train_batch_size, seqio.ShardInfo(0, 1), args.seed
    )
    with partitioner.activation_rules():
        state = trainer.init_state(params, optimizer)
        step = jax.jit(trainer.make_train_step(model, optimizer), donate_argnums=(0,))
        rng = jax.random.key(args.seed)
        with tqdm(range(args.train_steps), desc="train the student", unit="step") as bar:
            for _ in bar:
                state, metrics = step(state, partitioner.shard_batch(next(batches)), rng)
                bar.set_postfix(loss=f"{float(metrics['loss']):.3f}")
    with Checkpointer(out / "ours") as checkpointer:
        checkpointer.save(0, {"params": state.params}, {}, force=True)
    checkpoint_import.export_hf(state.params, config, str(out / "hf"))
    return out


def _test_examples(dataset: str, args: argparse.Namespace) -> tuple[Any, list[dict]]:
    """(the label task, its test examples: token ids and texts), in split order."""
    import seqio

    from dsbs_jax import evaluation

    task = seqio.get_mixture_or_task(f"dsbs_{dataset}_label_llm")
    examples = evaluation.read_split(task, SPLIT, args.inputs_length, args.gen_max_len)
    return task, examples[: args.limit] if args.limit else examples


# ---------------------------------------------------------------------------------------------
# Sides
# ---------------------------------------------------------------------------------------------


def ours(args: argparse.Namespace) -> dict[str, Any]:
    common.quiet_tensorflow()
    dataset = common.prepare_data(args)
    student = ensure_student(args, dataset)
    from dsbs_jax import checkpoint_import, evaluation
    from dsbs_jax.label_prediction import LabelPredictor
    from dsbs_jax.models.t5 import T5
    from dsbs_jax.partitioning import Partitioner

    config = common.model_config(args)
    partitioner = Partitioner()
    shardings = checkpoint_import.param_shardings(config, partitioner)
    params = checkpoint_import.load_params(str(student / "ours"), config, shardings)
    model = T5(config)
    task, examples = _test_examples(dataset, args)
    result: dict[str, Any] = {"examples": len(examples), "dataset": dataset}
    for mode in [m for m in args.modes.split(",") if m]:
        batch_size = args.score_batch_size if mode == "score" else args.batch_size

        def evaluate(mode: str = mode, batch_size: int = batch_size) -> dict[str, float]:
            predictor = LabelPredictor(
                model,
                params,
                partitioner,
                task.output_features["targets"].vocabulary,
                args.inputs_length,
                args.gen_max_len,
                batch_size,
                args.length_normalized,
            )
            rows = evaluation.predict_labels(mode, predictor, task, SPLIT, examples)
            return evaluation.score(task, rows)

        first, _ = common.timed(evaluate)
        seconds, cpu, scores = common.timed_cpu(evaluate)
        result[f"first_pass_s_{mode}"] = first
        result[f"seconds_{mode}"] = seconds
        result[f"examples_per_s_{mode}"] = len(examples) / seconds
        result[f"examples_per_cpu_s_{mode}"] = len(examples) / cpu
        result[f"accuracy_{mode}"] = scores["accuracy"]
    return result


def baseline(args: argparse.Namespace) -> dict[str, Any]:
    common.quiet_tensorflow()
    dataset = common.prepare_data(args)
    student = ensure_student(args, dataset)
    import torch
    import transformers

    from dsbs_jax import evaluation, label_prediction

    torch.set_num_threads(args.threads)
    task, examples = _test_examples(dataset, args)
    vocabulary = task.output_features["targets"].vocabulary
    model = transformers.T5ForConditionalGeneration.from_pretrained(str(student / "hf"))
    model.eval()
    generation = transformers.GenerationConfig(
        max_length=args.gen_max_len,
        num_beams=1,
        do_sample=False,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=vocabulary.eos_id,
    )

    def collate(rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        """DataCollatorForSeq2Seq: inputs padded with 0, labels with -100, to the longest."""
        longest = max(len(r["inputs"]) for r in rows)
        longest_label = max(len(r["targets"]) for r in rows)
        input_ids = torch.zeros((len(rows), longest), dtype=torch.long)
        labels = torch.full((len(rows), longest_label), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r["inputs"])] = torch.from_numpy(r["inputs"].astype(np.int64))
            labels[i, : len(r["targets"])] = torch.from_numpy(r["targets"].astype(np.int64))
        return {"input_ids": input_ids, "attention_mask": (input_ids != 0).long(), "labels": labels}

    def predict(rows: Sequence[dict]) -> list[str]:
        """Seq2SeqTrainer.prediction_step with predict_with_generate: generate, then the loss."""
        batch = collate(rows)
        with torch.no_grad(), common.baseline_precision(args):
            generated = model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                generation_config=generation,
            )
            model(**batch).loss.item()
        return [
            label_prediction.decode_text(vocabulary, row[1:], vocabulary.eos_id)
            for row in generated.numpy()
        ]

    size = args.official_batch_size
    batches = [examples[i : i + size] for i in range(0, len(examples), size)]
    predict(batches[0])  # untimed: first-call allocations

    def evaluate() -> dict[str, float]:
        predictions = [p for rows in batches for p in predict(rows)]
        rows = [
            {"target": ex["targets_pretokenized"].decode(), "prediction": p}
            for ex, p in zip(examples, predictions, strict=True)
        ]
        return evaluation.score(task, rows)

    seconds, cpu, scores = common.timed_cpu(evaluate)
    rate = len(examples) / seconds
    # Both of our modes are compared with the one official evaluation.
    return {
        "examples": len(examples),
        "dataset": dataset,
        "seconds": seconds,
        "examples_per_s_generate": rate,
        "examples_per_s_score": rate,
        "examples_per_cpu_s": len(examples) / cpu,
        "accuracy_generate": scores["accuracy"],
        "torch_threads": torch.get_num_threads(),
    }


SIDE_FNS = {"ours": ours, "baseline": baseline}


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    ran = common.main_sides(__spec__.name, build_parser(), SIDE_FNS, argv)
    if ran is None:
        return None
    args, results = ran
    return common.report("eval", args, results, FIGURES)


if __name__ == "__main__":
    main()
