"""The training program (run by `python -m dsbs_jax.train`), configured by gin.

The t5x training program in small: sharded state created in place, a jitted
train step with explicit shardings, periodic evaluation on the validation split
(teacher-forced losses and decoded labels), the best checkpoint by validation
metric kept, automatic resumption from MODEL_DIR, and the test split evaluated
once at the end with the best checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio
from tqdm import tqdm

from dsbs_jax import checkpoint_import, evaluation, optimizers, trainer
from dsbs_jax.checkpoints import Checkpointer
from dsbs_jax.checkpoints import model_dir_path as model_dir_path_of
from dsbs_jax.data.feature_converters import StepByStepFeatureConverter
from dsbs_jax.data.registration import task_vocabulary
from dsbs_jax.data.run_inputs import ensure_run_inputs
from dsbs_jax.early_stopping import MetricHistory, early_stopping
from dsbs_jax.input_pipeline import train_batches
from dsbs_jax.models.t5 import T5, T5Config, get_config
from dsbs_jax.partitioning import Partitioner
from dsbs_jax.summaries import MetricsWriter

VOCAB_MULTIPLE = 128  # t5x pads the 32100-piece T5 vocabulary to 32128 the same way


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the step."""


# t5_config passes what it does not name on to T5Config: gin may bind those fields, no others.
_T5_CONFIG_PARAMETERS = ["preset", "original_t5", *(f.name for f in dataclasses.fields(T5Config))]


@gin.configurable(allowlist=_T5_CONFIG_PARAMETERS)
def t5_config(
    preset: str = "small",
    vocab_size: int | None = None,
    dtype: str = "bfloat16",
    dropout_rate: float = 0.1,
    original_t5: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """The student's hyper-parameters as gin sets them (see gin_configs/models/).

    `vocab_size` None: the tasks' vocabulary size, rounded up to a multiple of 128.
    `original_t5` selects ReLU and tied logits instead of T5 1.1's gated GELU.
    """
    config = dict(
        preset=preset,
        vocab_size=vocab_size,
        dtype=jnp.dtype(dtype),
        dropout_rate=dropout_rate,
        **overrides,
    )
    if original_t5:
        config.update(mlp_activations=("relu",), logits_via_embedding=True)
    return config


def build_model_config(config: Mapping[str, Any], vocabulary: seqio.Vocabulary) -> T5Config:
    settings = dict(config)
    preset = settings.pop("preset")
    if settings.get("vocab_size") is None:
        settings["vocab_size"] = -(-vocabulary.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    elif settings["vocab_size"] < vocabulary.vocab_size:
        raise ValueError(
            f"model vocab_size {settings['vocab_size']} is smaller than the tasks' vocabulary "
            f"({vocabulary.vocab_size} pieces)"
        )
    return get_config(preset, **settings)


def _primary_metric(mixture_or_task_name: str, split: str) -> str | None:
    """The metric that picks the best checkpoint, e.g. 'validation/dsbs_cqa_label_llm/accuracy'."""
    tasks = evaluation.metric_tasks(mixture_or_task_name)
    if not tasks:
        return None
    mode = evaluation.label_evaluation().modes[0]
    return evaluation.metric_key(split, tasks[0].name, tasks[0].metric_fns[0].__name__, mode)


def abstract_like(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Student:
    """A student for one config: model, partitioner, optimizer and sharded initial state.

    Training, evaluation and inference all start here, so they agree on shapes and
    shardings and can restore one another's checkpoints.
    """

    def __init__(
        self,
        mixture_or_task_name: str,
        task_feature_lengths: Mapping[str, int],
        model_config: Mapping[str, Any],
        train_steps: int,
        seed: int,
        initial_checkpoint_path: str | None = None,
        devices: Sequence[jax.Device] | None = None,
        abstract: bool = False,
    ) -> None:
        """Parameters start random (seeded), or from a pretrained checkpoint when a path is
        given: Hugging Face, t5x or ours (see `dsbs_jax.checkpoint_import`).

        `devices` (default: all) are the mesh's; `abstract` makes `state` shapes, dtypes and
        shardings only (`jax.ShapeDtypeStruct`s, nothing allocated), which is what compiling
        ahead of time for devices this host does not have needs (see `dsbs_jax.aot`).
        """
        self.vocabulary = task_vocabulary(mixture_or_task_name)
        self.config = build_model_config(model_config, self.vocabulary)
        self.model = T5(self.config)
        self.partitioner = Partitioner(devices=devices)
        self.optimizer = optimizers.make_optimizer(train_steps)
        lengths = task_feature_lengths

        def init_params(rng: jax.Array) -> Any:
            encoder = jnp.ones((1, lengths["inputs"]), jnp.int32)
            decoder = jnp.ones((1, lengths["targets"]), jnp.int32)
            return self.model.init(rng, encoder, decoder, enable_dropout=False)["params"]

        if abstract:
            params = _abstract_sharded(self.partitioner, init_params, jax.random.key(seed))
        elif initial_checkpoint_path:
            shardings = checkpoint_import.param_shardings(self.config, self.partitioner)
            params = checkpoint_import.load_params(initial_checkpoint_path, self.config, shardings)
        else:
            params, _ = self.partitioner.init_sharded(init_params, jax.random.key(seed))

        def init_state(params: Any) -> trainer.TrainState:
            return trainer.init_state(params, self.optimizer)

        abstract_state = jax.eval_shape(init_state, params)
        self.state_shardings = self.partitioner.state_shardings(abstract_state, params)
        if abstract:
            self.state = jax.tree.map(_with_sharding, abstract_state, self.state_shardings)
        else:
            with self.partitioner.activation_rules():
                self.state = jax.jit(init_state, out_shardings=self.state_shardings)(params)


def _with_sharding(leaf: Any, sharding: jax.sharding.Sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def _abstract_sharded(partitioner: Partitioner, init_fn: Any, *args: Any) -> Any:
    """What `partitioner.init_sharded(init_fn, *args)` makes, as sharded ShapeDtypeStructs."""
    with partitioner.activation_rules():
        boxed = jax.eval_shape(init_fn, *args)
        shardings = partitioner.logical_to_sharding(nn.get_partition_spec(boxed))
    return jax.tree.map(_with_sharding, nn.unbox(boxed), shardings)


def jit_train_step(
    student: Student, num_microbatches: int, label_smoothing: float, z_loss: float
) -> Any:
    """The jitted train step with its shardings; trace it inside `activation_rules()`."""
    partitioner = student.partitioner
    return jax.jit(
        trainer.make_train_step(
            student.model, student.optimizer, num_microbatches, label_smoothing, z_loss
        ),
        in_shardings=(student.state_shardings, partitioner.data_sharding, partitioner.replicated),
        out_shardings=(student.state_shardings, partitioner.replicated),
        donate_argnums=(0,),
    )


def jit_eval_step(student: Student, label_smoothing: float, z_loss: float) -> Any:
    """The jitted teacher-forced eval step; its inputs' shardings place it."""
    return jax.jit(trainer.make_eval_step(student.model, label_smoothing, z_loss))


def batch_spec(
    task_feature_lengths: Mapping[str, int], batch_rows: int, pack: bool
) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of the model features of a batch the input pipeline yields."""
    converter = StepByStepFeatureConverter(pack=pack)
    lengths = converter.get_model_feature_lengths(task_feature_lengths)
    specs = converter.MODEL_FEATURES
    return {
        name: jax.ShapeDtypeStruct(
            (batch_rows, length),
            specs[name].dtype.as_numpy_dtype if name in specs else np.int32,
        )
        for name, length in lengths.items()
    }


@gin.configurable
def train(
    *,
    model_dir: str = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    train_steps: int = gin.REQUIRED,
    batch_size: int = gin.REQUIRED,
    model_config: Mapping[str, Any] = gin.REQUIRED,
    initial_checkpoint_path: str | None = None,
    random_seed: int = 0,
    num_microbatches: int = 1,
    pack: bool = True,
    eval_period: int = 1000,
    eval_split: str = "validation",
    test_split: str | None = "test",
    eval_batch_size: int = 64,
    max_decode_length: int | None = None,
    log_period: int = 10,
    label_smoothing: float = 0.0,
    z_loss: float = 1e-4,
    use_cached: bool = False,
    shard_files_by_host: bool = False,
    use_hardware_rng: bool = False,
) -> dict[str, float]:
    """Trains, evaluates on `eval_split` every `eval_period` steps, then tests the best.

    A run starts from `initial_checkpoint_path` (pretrained weights) unless MODEL_DIR already
    holds a checkpoint of its own, which it resumes. With several hosts, each feeds its rows of
    every batch; `shard_files_by_host` makes each read only its own files instead of the whole
    stream (see `dsbs_jax.input_pipeline`). Only the first host writes MODEL_DIR's own files;
    orbax coordinates the checkpoint writes of all hosts. `use_hardware_rng` draws dropout
    masks with XLA's RngBitGenerator (see `trainer.dropout_key`). Training stops early when
    gin sets `early_stopping.patience` and the validation metric stops improving.
    """
    ensure_run_inputs(mixture_or_task_name)
    model_dir_path = model_dir_path_of(model_dir)  # gs:// as given, else a local path
    is_host0 = jax.process_index() == 0
    if is_host0:
        model_dir_path.mkdir(parents=True, exist_ok=True)
        (model_dir_path / "config.gin").write_text(gin.config_str())
    best_metric = _primary_metric(mixture_or_task_name, eval_split)
    checkpointer = (
        Checkpointer(model_dir_path, best_metric=best_metric)
        if best_metric
        else Checkpointer(model_dir_path, keep_best=False)
    )
    resuming = checkpointer.latest_step() is not None
    student = Student(
        mixture_or_task_name,
        task_feature_lengths,
        model_config,
        train_steps,
        random_seed,
        initial_checkpoint_path=None if resuming else initial_checkpoint_path,
    )
    if is_host0:
        (model_dir_path / "model-info.txt").write_text(_model_info(student))
    partitioner = student.partitioner
    writer = MetricsWriter(model_dir_path, enabled=is_host0)

    state, start_step, data = student.state, 0, {}
    if resuming:
        checkpoint_import.check_resumable(str(model_dir_path), student.config)
        state, data = checkpointer.restore(abstract_like(state))
        start_step = int(state.step)
        if data.get("seed") != random_seed:
            raise ValueError(
                f"MODEL_DIR {model_dir_path} was trained with RANDOM_SEED {data.get('seed')}, "
                f"not {random_seed}; use another MODEL_DIR"
            )
        print(f"resuming from {model_dir_path} at step {start_step}", file=sys.stderr)
    history = MetricHistory(early_stopping(best_metric), data.get("metric_history", ()))

    with partitioner.activation_rules():
        train_step = jit_train_step(student, num_microbatches, label_smoothing, z_loss)
        eval_step = jit_eval_step(student, label_smoothing, z_loss)
        evaluate = SplitEvaluator(
            student,
            eval_step,
            mixture_or_task_name,
            task_feature_lengths,
            eval_batch_size,
            max_decode_length,
        )
        if history.stop:
            print(f"{model_dir_path} stopped early at step {start_step}", file=sys.stderr)
        elif start_step < train_steps:
            batches = _host_train_batches(
                partitioner,
                mixture_or_task_name,
                task_feature_lengths,
                batch_size,
                random_seed,
                pack,
                start_step,
                use_cached,
                shard_files_by_host,
            )
            state = _train_loop(
                state,
                train_step,
                batches,
                partitioner,
                start_step,
                train_steps,
                batch_size,
                log_period,
                eval_period,
                eval_split,
                evaluate,
                checkpointer,
                writer,
                random_seed,
                trainer.dropout_key(random_seed, use_hardware_rng),
                history,
            )
        else:
            print(f"{model_dir_path} is already trained to step {start_step}", file=sys.stderr)
        results: dict[str, float] = {}
        if test_split:
            if checkpointer.best_step() is not None:
                state, _ = checkpointer.restore(abstract_like(state), best=True)
            results = evaluate(state.params, test_split)
            writer.write(int(state.step), f"test_{test_split}", results)
            if is_host0:
                (model_dir_path / "test_results.json").write_text(
                    json.dumps({"step": int(state.step), **results}, indent=2) + "\n"
                )
                print(format_results(f"{test_split} (checkpoint {int(state.step)})", results))
    checkpointer.close()
    writer.close()
    return results


class SplitEvaluator:
    """Validation/test evaluation: teacher-forced losses of the mixture, and label metrics in
    each mode of `evaluation.label_evaluation` (generated, scored among candidates). A task's
    split is read once, at its first evaluation, and kept for the later ones."""

    def __init__(
        self,
        student: Student,
        eval_step: Any,
        name: str,
        lengths: Mapping[str, int],
        batch_size: int,
        max_decode_length: int | None,
    ) -> None:
        self._run, self._eval_step, self._name, self._lengths = student, eval_step, name, lengths
        self._batch_size = batch_size
        self._max_decode_length = max_decode_length or lengths["targets"]
        self._labels = evaluation.label_evaluation()
        self._examples: dict[tuple[str, str], list[dict[str, Any]]] = {}

    def __call__(self, params: Any, split: str) -> dict[str, float]:
        student = self._run
        losses = evaluation.teacher_forced(
            self._eval_step,
            params,
            student.partitioner,
            self._name,
            self._lengths,
            split,
            self._batch_size,
        )
        results = {f"{split}/{k}": v for k, v in losses.items()}
        labels = self._labels
        for task in evaluation.metric_tasks(self._name):
            if (task.name, split) not in self._examples:
                self._examples[task.name, split] = evaluation.read_split(
                    task, split, self._lengths["inputs"], self._max_decode_length
                )
            for mode in labels.modes:
                rows = evaluation.predict_labels(
                    mode,
                    student.model,
                    params,
                    student.partitioner,
                    task,
                    split,
                    self._examples[task.name, split],
                    self._lengths["inputs"],
                    labels.batch_size or self._batch_size,
                    self._max_decode_length,
                    labels.length_normalized,
                )
                scores = evaluation.score(task, rows)
                results.update(
                    {evaluation.metric_key(split, task.name, k, mode): v for k, v in scores.items()}
                )
        return results


def _host_train_batches(
    partitioner: Partitioner,
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    batch_size: int,
    seed: int,
    pack: bool,
    start_step: int,
    use_cached: bool,
    shard_files_by_host: bool,
) -> Iterator[dict[str, np.ndarray]]:
    """This host's rows of every global batch, from the whole stream or from its own files."""
    rows = partitioner.host_rows(batch_size)
    if shard_files_by_host:
        shard_info, batch_rows, host_rows = partitioner.data_shard_info(), len(rows), None
    else:
        shard_info, batch_rows, host_rows = seqio.ShardInfo(0, 1), batch_size, rows
    if jax.process_count() > 1:
        source = f"file shard {shard_info.index}" if shard_files_by_host else "all files"
        print(
            f"host {jax.process_index()} of {jax.process_count()} reads {source} and feeds "
            f"rows {rows[0]}..{rows[-1]} ({len(rows)}) of each batch of {batch_size}",
            file=sys.stderr,
        )
    return train_batches(
        mixture_or_task_name,
        task_feature_lengths,
        batch_rows,
        shard_info,
        seed,
        pack,
        start_step,
        use_cached,
        host_rows,
    )


def _train_loop(
    state: trainer.TrainState,
    train_step: Any,
    batches: Any,
    partitioner: Partitioner,
    start_step: int,
    train_steps: int,
    batch_size: int,
    log_period: int,
    eval_period: int,
    eval_split: str,
    evaluate: SplitEvaluator,
    checkpointer: Checkpointer,
    writer: MetricsWriter,
    seed: int,
    rng: jax.Array,
    history: MetricHistory,
) -> trainer.TrainState:
    pending: list[dict[str, jax.Array]] = []
    window_start, window_step = time.perf_counter(), start_step
    with tqdm(
        total=train_steps,
        initial=start_step,
        desc="train",
        unit="step",
        disable=jax.process_index() != 0,
    ) as bar:
        for step in range(start_step + 1, train_steps + 1):
            state, metrics = train_step(state, partitioner.shard_batch(next(batches)), rng)
            pending.append(metrics)
            if step % log_period == 0 or step == train_steps:
                logged = _mean_metrics(jax.device_get(pending), step - len(pending) + 1)
                logged.update(_throughput(logged, step - window_step, window_start, batch_size))
                writer.write(step, "train", logged)
                bar.set_postfix(
                    loss=f"{logged['loss']:.4f}",
                    ex_per_s=f"{logged['examples_per_second']:.1f}",
                    tok_per_s=f"{logged['tokens_per_second']:.0f}",
                    rows_per_s=f"{logged['rows_per_second']:.1f}",
                )
                pending, window_start, window_step = [], time.perf_counter(), step
            bar.update(1)
            metrics_for_best = None
            if step % eval_period == 0 or step == train_steps:
                eval_start = time.perf_counter()
                metrics_for_best = evaluate(state.params, eval_split)
                window_start += time.perf_counter() - eval_start  # rates count training only
                writer.write(step, "training_eval", metrics_for_best)
                if jax.process_index() == 0:  # tqdm.write prints even when the bar is off
                    bar.write(format_results(f"{eval_split} at step {step}", metrics_for_best))
                history.add(metrics_for_best)
            data = {"step": step, "seed": seed, "metric_history": history.values}
            stop = history.stop
            checkpointer.save(
                step, state, data, metrics_for_best, force=step == train_steps or stop
            )
            if stop:
                if jax.process_index() == 0:
                    bar.write(
                        f"stopping early at step {step}: {history.rule.metric} has not "
                        f"improved over the last {history.rule.patience} evaluations"
                    )
                break
    return state


def _throughput(
    means: Mapping[str, float], steps: int, since: float, batch_size: int
) -> dict[str, float]:
    """Per-second rates over the last `steps` steps, from their mean per-step counts.

    Examples are inputs with their targets (a packed row holds several); tokens are the
    non-padding input and target tokens; rows are the batch's (packed) sequences.
    """
    step_time = (time.perf_counter() - since) / steps
    return {
        "step_time_s": step_time,
        "examples_per_second": means["examples"] / step_time,
        "tokens_per_second": means["tokens"] / step_time,
        "rows_per_second": batch_size / step_time,
    }


def _mean_metrics(history: Sequence[Mapping[str, np.ndarray]], first_step: int) -> dict:
    for offset, metrics in enumerate(history):
        if not math.isfinite(float(metrics["loss"])):
            raise NonFiniteLossError(
                f"loss is {float(metrics['loss'])} at step {first_step + offset}; lower the "
                "learning rate, check the data, or resume from the last checkpoint"
            )
    return {k: float(np.mean([m[k] for m in history])) for k in history[0]}


def format_results(title: str, results: Mapping[str, float]) -> str:
    lines = [f"{title}:"]
    lines += [f"  {k} = {v:.4f}" for k, v in sorted(results.items())]
    return "\n".join(lines)


def _model_info(student: Student) -> str:
    lines = [f"{student.config}", ""]
    flat = jax.tree_util.tree_flatten_with_path(student.state.params)[0]
    total = 0
    for path, leaf in flat:
        total += leaf.size
        lines.append(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)} {leaf.sharding.spec}")
    lines.append(f"total parameters: {total:,}")
    return "\n".join(lines) + "\n"
