"""The training program (run by `python -m dsbs_jax.train`), configured by the run gin.

t5x's training program in small. The run gin passes in what t5x's run gins pass (the model's
settings, the partitioner, the optimizer, the checkpointer and the label evaluation) and the
run's macros; `train` then

* checks everything it can before it writes anything: the data and vocabulary, the mesh and
  batch sizes, the checkpoint it would resume or start from (`--check` stops there and prints
  what would run);
* makes the training state real once (`dsbs_jax.state`): restored from MODEL_DIR straight into
  its shardings when a checkpoint exists, else initialised;
* trains with a jitted step over this host's batches, evaluating on `eval_split` every
  `eval_period` steps and keeping the best checkpoint by the first label metric;
* saves a checkpoint before each evaluation it would otherwise wait on (always before the
  last), so a long evaluation never holds up a checkpoint: a checkpoint saved that way is
  marked, and a resumed run evaluates that step first;
* on SIGTERM (a preempted or maintained TPU VM) saves a checkpoint at the step every host
  reached and exits with `preemption.EXIT_PREEMPTED`; the same command resumes there;
* stops early when `early_stopping` says so, then tests the best checkpoint's parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gin
import jax
import numpy as np
import optax
import seqio
from gin import config as gin_config
from tqdm import tqdm

from dsbs_jax import checkpoint_import, checkpoints, cpu_memory, trainer
from dsbs_jax.checkpoints import Checkpointer, model_dir_path
from dsbs_jax.data.feature_converters import step_by_step_loss_weights
from dsbs_jax.data.registration import task_vocabulary
from dsbs_jax.data.run_inputs import ensure_run_inputs
from dsbs_jax.early_stopping import EarlyStopping, MetricHistory
from dsbs_jax.errors import UserError
from dsbs_jax.evaluation import EvalStep, SplitEvaluator, primary_metric
from dsbs_jax.input_pipeline import (
    DATASET_ITEM,
    TrainBatches,
    TrainBatchesHandler,
    TrainBatchesRestore,
    TrainBatchesSave,
    batch_spec,
    train_batches,
)
from dsbs_jax.label_prediction import LabelEvaluation
from dsbs_jax.model_config import build_model_config
from dsbs_jax.partitioning import Partitioner
from dsbs_jax.preemption import Preempted, PreemptionWatch
from dsbs_jax.state import Student
from dsbs_jax.summaries import MetricsWriter

PyTree = Any


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite; the message names the step."""


@dataclasses.dataclass(frozen=True)
class InputSettings:
    """What the training batches are made of."""

    mixture_or_task_name: str
    task_feature_lengths: Mapping[str, int]
    batch_size: int
    pack: bool = True
    use_cached: bool = False
    shard_files_by_host: bool = False


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """How the loop steps, logs and evaluates."""

    train_steps: int
    random_seed: int = 0
    eval_period: int = 1000
    log_period: int = 10
    num_microbatches: int | None = None
    label_smoothing: float = 0.0
    z_loss: float = 1e-4
    use_hardware_rng: bool = False


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Which splits are evaluated, and with what batches."""

    eval_split: str = "validation"
    test_split: str | None = "test"
    batch_size: int = cpu_memory.EVAL_BATCH_SIZE
    max_decode_length: int | None = None
    loss_batch_size: int = cpu_memory.EVAL_BATCH_SIZE  # rows of the teacher-forced losses


@gin.configurable
def train(
    *,
    model_dir: str = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    train_steps: int = gin.REQUIRED,
    batch_size: int = gin.REQUIRED,
    model_config: Mapping[str, Any] = gin.REQUIRED,
    partitioner: Partitioner = gin.REQUIRED,
    optimizer: optax.GradientTransformation = gin.REQUIRED,
    label_evaluation: LabelEvaluation = gin.REQUIRED,
    checkpointer_cls: Callable[..., Checkpointer] = Checkpointer,
    early_stopping: EarlyStopping | None = None,
    initial_checkpoint_path: str | None = None,
    random_seed: int = 0,
    num_microbatches: int | None = None,
    pack: bool = True,
    eval_period: int = 1000,
    eval_split: str = "validation",
    test_split: str | None = "test",
    eval_batch_size: int | None = None,
    max_decode_length: int | None = None,
    log_period: int = 10,
    label_smoothing: float = 0.0,
    z_loss: float = 1e-4,
    use_cached: bool = False,
    shard_files_by_host: bool = False,
    use_hardware_rng: bool = False,
    check: bool = False,
) -> dict[str, float]:
    """Trains, evaluates on `eval_split` every `eval_period` steps, then tests the best.

    The run gin (runs/base.gin) binds every argument but `check`; their names are t5x's. A run
    starts from `initial_checkpoint_path` (pretrained weights) unless MODEL_DIR already holds
    a checkpoint of its own, which it resumes. With several hosts, each feeds its rows of every
    batch; `shard_files_by_host` makes each read only its own files instead of the whole stream
    (see `dsbs_jax.input_pipeline`). Only the first host writes MODEL_DIR's own files; orbax
    coordinates the checkpoint writes of all hosts. `use_hardware_rng` draws dropout masks with
    XLA's RngBitGenerator (see `trainer.dropout_key`). `checkpointer_cls` makes the
    checkpointer (gin: `@Checkpointer`, configured by `Checkpointer.period` etc.).
    `early_stopping` (gin: `@early_stopping()`) stops training when its metric stops
    improving. `check` stops after the checks and prints what would run. `num_microbatches`
    and `eval_batch_size` None: one microbatch and evaluation batches of 64; on CPU, where the
    step's memory is the host's, as few microbatches as fit and teacher-forced losses 16 rows at
    a time (`dsbs_jax.cpu_memory`). Returns the test split's results.
    """
    run = TrainingRun.configure(locals())
    if check:
        print(run.summary())
        return {}
    return run.execute(checkpointer_cls)


def train_arguments(devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
    """`train`'s arguments as the active gin config binds them, defaults filled in: what a
    program that plans the run without calling `train` (aot, vectorized sweeps) starts from,
    with the partitioner made over `devices` (None: this host's; aot: a slice's compile-only
    ones). UserError names a required one the config leaves unset."""

    def resolve(value: Any) -> Any:
        if not isinstance(value, gin_config.ConfigurableReference):
            return value
        fn = value.scoped_configurable_fn
        if devices is not None and value.configurable.wrapped is Partitioner:
            return fn(devices=devices)
        return fn() if value.evaluate else fn

    bound = gin.get_bindings(train, resolve_references=False)
    arguments = {}
    for name, parameter in inspect.signature(train).parameters.items():
        value = resolve(bound.get(name, parameter.default))
        if value is gin.REQUIRED and name != "model_dir":
            raise UserError(f"train.{name} is not set; give it in a gin file or --gin.{name}")
        arguments[name] = value
    return arguments


@dataclasses.dataclass(frozen=True)
class TrainingRun:
    """A training run, checked and ready: everything decided, nothing written yet."""

    model_dir: Any  # an etils.epath.Path (local or gs://)
    student: Student
    optimizer: optax.GradientTransformation
    labels: LabelEvaluation
    inputs: InputSettings
    loop: LoopSettings
    evals: EvalSettings
    initial_checkpoint_path: str | None
    best_metric: str | None
    early_stopping: EarlyStopping | None
    resume_dir: Any  # the latest checkpoint folder under MODEL_DIR, or None
    vocabulary: seqio.Vocabulary
    # {task role: loss weight} of the training and evaluation batches (ALPHA), read from gin
    # once, when the run is planned.
    loss_weights: Mapping[int, float]

    @classmethod
    def configure(cls, arguments: Mapping[str, Any]) -> TrainingRun:
        """`plan` from `train`'s arguments by name (`train_arguments`)."""
        a = arguments
        inputs = InputSettings(
            a["mixture_or_task_name"],
            a["task_feature_lengths"],
            a["batch_size"],
            a["pack"],
            a["use_cached"],
            a["shard_files_by_host"],
        )
        loop = LoopSettings(
            a["train_steps"],
            a["random_seed"],
            a["eval_period"],
            a["log_period"],
            a["num_microbatches"],
            a["label_smoothing"],
            a["z_loss"],
            a["use_hardware_rng"],
        )
        loss_rows, label_rows = cpu_memory.eval_batch_sizes(a["partitioner"], a["eval_batch_size"])
        evals = EvalSettings(
            a["eval_split"], a["test_split"], label_rows, a["max_decode_length"], loss_rows
        )
        return cls.plan(
            model_dir_path(a["model_dir"]),
            a["model_config"],
            a["partitioner"],
            a["optimizer"],
            a["label_evaluation"],
            inputs,
            loop,
            evals,
            a["initial_checkpoint_path"],
            a["early_stopping"],
        )

    @classmethod
    def plan(
        cls,
        model_dir: Any,
        model_config: Mapping[str, Any],
        partitioner: Partitioner,
        optimizer: optax.GradientTransformation,
        labels: LabelEvaluation,
        inputs: InputSettings,
        loop: LoopSettings,
        evals: EvalSettings,
        initial_checkpoint_path: str | None,
        early_stop: EarlyStopping | None = None,
    ) -> TrainingRun:
        """Checks the run's settings, data and MODEL_DIR; raises UserError naming the first
        problem. Writes nothing but, where the run needs it, the built-in dataset."""
        name = inputs.mixture_or_task_name
        ensure_run_inputs(name)
        vocabulary = task_vocabulary(name)
        student = Student(build_model_config(model_config, vocabulary.vocab_size), partitioner)
        _check_sizes(partitioner, inputs, loop, evals)
        resume_dir = checkpoints.latest_step_dir(model_dir)
        best_metric = primary_metric(name, evals.eval_split, labels)
        run = cls(
            model_dir,
            student,
            optimizer,
            labels,
            inputs,
            loop,
            evals,
            initial_checkpoint_path,
            best_metric,
            early_stop.watching(best_metric) if early_stop else None,
            resume_dir,
            vocabulary,
            step_by_step_loss_weights(),
        )
        if resume_dir is not None:
            run._check_resumable()
        elif initial_checkpoint_path:
            checkpoint_import.checkpoint_format(initial_checkpoint_path)  # it is a checkpoint
        return run

    @functools.cached_property
    def abstract_state(self) -> trainer.TrainState:
        return self.student.abstract_train_state(self.optimizer)

    def _check_resumable(self) -> None:
        where = f"MODEL_DIR {self.model_dir}"
        checkpoint_import.check_resumable(str(self.resume_dir), self.student.config)
        data = checkpoints.read_data(self.resume_dir)
        self.student.check_recorded(data, where)
        checkpoints.check_compatible(self.resume_dir, self.abstract_state, where)
        if data.get("seed") != self.loop.random_seed:
            raise UserError(
                f"{where} was trained with RANDOM_SEED {data.get('seed')}, not "
                f"{self.loop.random_seed}; use another MODEL_DIR"
            )

    def summary(self) -> str:
        """What the run would do, for `--check`."""
        config, mesh = self.student.config, self.student.partitioner.mesh
        params = sum(x.size for x in jax.tree.leaves(self.student.abstract_params))
        lengths = self.inputs.task_feature_lengths
        rows = len(self.student.partitioner.host_rows(self.inputs.batch_size))
        if self.resume_dir is None:
            start = "a new run" + (
                f" from {self.initial_checkpoint_path}" if self.initial_checkpoint_path else ""
            )
        else:
            start = f"resumes {self.resume_dir}"
        return "\n".join(
            [
                "check: the run is ready",
                f"  model       {config.num_encoder_layers}+{config.num_decoder_layers} layers, "
                f"emb_dim {config.emb_dim}, {config.num_heads} heads of {config.head_dim}, "
                f"mlp_dim {config.mlp_dim}, vocab {config.vocab_size}, {params:,} parameters, "
                f"{np.dtype(config.dtype).name} activations",
                f"  mesh        {dict(mesh.shape)} over {mesh.devices.size} "
                f"{mesh.devices.flat[0].platform} device(s), {jax.process_count()} process(es)",
                f"  batch       {self.inputs.batch_size} rows of {lengths['inputs']}/"
                f"{lengths['targets']} tokens ({rows} fed by this host), "
                f"{'packed' if self.inputs.pack else 'not packed'}, "
                f"{self._microbatches()}",
                f"  steps       {self.loop.train_steps}, evaluation every "
                f"{self.loop.eval_period} on {self.evals.eval_split} "
                f"({', '.join(self.labels.modes)}), test on {self.evals.test_split}, "
                f"batches of {self.evals.batch_size} ({self.evals.loss_batch_size} for losses)",
                f"  data        {self.inputs.mixture_or_task_name}, vocabulary "
                f"{getattr(self.vocabulary, 'sentencepiece_model_file', '?')} "
                f"({self.vocabulary.vocab_size} pieces)",
                f"  MODEL_DIR   {self.model_dir}: {start}",
            ]
        )

    def _microbatches(self) -> str:
        count = self.loop.num_microbatches
        if count is not None:
            return f"{count} microbatch(es)"
        if cpu_memory.on_cpu(self.student.partitioner):
            gib = cpu_memory.CPU_STEP_BYTES / cpu_memory.GiB
            return f"as few microbatches as keep XLA's temporaries within {gib:g} GiB"
        return "1 microbatch"

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """A global training batch as sharded ShapeDtypeStructs: what `host_batches` feeds."""
        inputs, sharding = self.inputs, self.student.partitioner.data_sharding
        spec = batch_spec(inputs.task_feature_lengths, inputs.batch_size, inputs.pack)
        return {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in spec.items()
        }

    def execute(self, checkpointer_cls: Callable[..., Checkpointer]) -> dict[str, float]:
        """Writes MODEL_DIR, trains, evaluates and tests; returns the test results."""
        checkpointer, writer = self.open(checkpointer_cls)
        try:
            return self._train_and_test(checkpointer, writer)
        finally:
            checkpointer.close()  # waits for background saves: none outlives the program
            writer.close()

    def open(self, checkpointer_cls: Callable[..., Checkpointer]) -> tuple[Checkpointer, Any]:
        """Writes MODEL_DIR's own files (the first host) and opens its checkpointer and its
        metrics writer, which the caller closes."""
        is_host0 = jax.process_index() == 0
        if is_host0:
            self.model_dir.mkdir(parents=True, exist_ok=True)
            (self.model_dir / "config.gin").write_text(gin.config_str())
            (self.model_dir / "model-info.txt").write_text(_model_info(self.student))
        checkpointer = checkpointer_cls(
            self.model_dir,
            best_metric=self.best_metric,
            extra_handlers={DATASET_ITEM: TrainBatchesHandler()},
        )
        return checkpointer, MetricsWriter(self.model_dir, enabled=is_host0)

    def start_state(self, checkpointer: Checkpointer) -> tuple[trainer.TrainState, dict]:
        """The one training state: restored into its shardings, else initialised."""
        if self.resume_dir is None:
            state = self.student.init_train_state(
                self.optimizer, self.loop.random_seed, self.initial_checkpoint_path
            )
            return state, {}
        state, data = checkpointer.restore(self.abstract_state)
        print(f"resuming from {self.model_dir} at step {int(state.step)}", file=sys.stderr)
        return state, data

    def evaluator(self, eval_step: EvalStep | None = None) -> SplitEvaluator:
        """The evaluator of the run's splits, with `eval_step` (None: its own jitted one);
        call it inside `activation_rules()`."""
        model, loop = self.student.model, self.loop
        return SplitEvaluator(
            model,
            self.student.partitioner,
            eval_step or trainer.jit_eval_step(model, loop.label_smoothing, loop.z_loss),
            self.inputs.mixture_or_task_name,
            self.inputs.task_feature_lengths,
            self.evals.batch_size,
            self.evals.max_decode_length,
            self.labels,
            self.loss_weights,
            self.evals.loss_batch_size,
        )

    def history(self, data: Mapping[str, Any]) -> MetricHistory:
        """The early-stopping rule and the metric's values a checkpoint's data recorded."""
        return MetricHistory(self.early_stopping, data.get("metric_history", ()))

    def _train_and_test(self, checkpointer: Checkpointer, writer: MetricsWriter) -> dict:
        state, data = self.start_state(checkpointer)
        start_step = int(state.step)
        with self.student.partitioner.activation_rules():
            evaluator = self.evaluator()
            loop = RunLoop(self, evaluator, checkpointer, writer, self.history(data))
            if data.get("pending_eval"):
                loop.finish_evaluation(start_step, state)
            if loop.history.stop:
                print(f"{self.model_dir} stopped early at step {start_step}", file=sys.stderr)
            elif start_step < self.loop.train_steps:
                state = loop.run(state, start_step)
            else:
                print(f"{self.model_dir} is already trained to step {start_step}", file=sys.stderr)
            checkpointer.wait_until_finished()
            del state  # the test needs only the best checkpoint's parameters
            return self.test(evaluator, writer)

    def test(
        self, evaluator: SplitEvaluator, writer: MetricsWriter, name: str = ""
    ) -> dict[str, float]:
        """Tests the best checkpoint on `test_split` and writes `test_results.json`; call it
        inside `activation_rules()` once the checkpoints are written. `name` heads what it
        prints."""
        split = self.evals.test_split
        if not split:
            return {}
        step, step_dir = checkpoints.checkpoint_dir(self.model_dir, "best")
        results = evaluator(self.student.restore_params(step_dir), split)
        writer.write(step, f"test_{split}", results)
        if jax.process_index() == 0:
            (self.model_dir / "test_results.json").write_text(
                json.dumps({"step": step, **results}, indent=2) + "\n"
            )
            title = f"{split} (checkpoint {step})"
            print(format_results(f"{name}: {title}" if name else title, results))
        return results

    def host_batches(self, start_step: int, every_row: bool = False) -> TrainBatches:
        """This host's rows of every global batch, from the whole stream or its own files;
        with `every_row`, every row of every batch, from the whole stream (a vectorized sweep
        on several hosts places the rows itself)."""
        inputs, partitioner = self.inputs, self.student.partitioner
        rows = partitioner.host_rows(inputs.batch_size)
        if every_row:
            shard_info, batch_rows, host_rows = seqio.ShardInfo(0, 1), inputs.batch_size, None
        elif inputs.shard_files_by_host:
            shard_info, batch_rows, host_rows = partitioner.data_shard_info(), len(rows), None
        else:
            shard_info, batch_rows, host_rows = seqio.ShardInfo(0, 1), inputs.batch_size, rows
        if jax.process_count() > 1 and not every_row:
            source = f"file shard {shard_info.index}" if inputs.shard_files_by_host else "all"
            print(
                f"host {jax.process_index()} of {jax.process_count()} reads {source} files and "
                f"feeds rows {rows[0]}..{rows[-1]} ({len(rows)}) of each batch of "
                f"{inputs.batch_size}",
                file=sys.stderr,
            )
        return train_batches(
            inputs.mixture_or_task_name,
            inputs.task_feature_lengths,
            batch_rows,
            shard_info,
            self.loop.random_seed,
            inputs.pack,
            start_step,
            inputs.use_cached,
            host_rows,
            self.loss_weights,
        )


def _check_sizes(
    partitioner: Partitioner, inputs: InputSettings, loop: LoopSettings, evals: EvalSettings
) -> None:
    data_size = partitioner.mesh.shape["data"]
    sizes = (("BATCH_SIZE", inputs.batch_size), ("train.eval_batch_size", evals.batch_size))
    for name, rows in sizes:
        if rows < 1 or rows % data_size:
            raise UserError(
                f"{name}={rows} must be a positive multiple of the data-parallel size "
                f"{data_size} ({partitioner.mesh.devices.size} devices / "
                f"{partitioner.num_partitions} partitions)"
            )
    micro = loop.num_microbatches
    if micro is not None and (micro < 1 or (inputs.batch_size // data_size) % micro):
        raise UserError(
            f"train.num_microbatches={loop.num_microbatches} must divide the batch's rows per "
            f"data-parallel shard ({inputs.batch_size // data_size})"
        )
    if loop.train_steps < 0 or loop.eval_period < 1 or loop.log_period < 1:
        raise UserError(
            f"TRAIN_STEPS={loop.train_steps} must be >= 0 and EVAL_PERIOD={loop.eval_period}, "
            f"train.log_period={loop.log_period} >= 1"
        )


class RunLoop:
    """One run's side of a training loop: logging, checkpoints, evaluations, early stopping;
    and the loop itself for a run alone, from a start step to the end or to a preemption.
    A vectorized sweep (`dsbs_jax.vectorized`) keeps one per run of its program, each
    `name`d in what it prints."""

    def __init__(
        self,
        run: TrainingRun,
        evaluator: SplitEvaluator,
        checkpointer: Checkpointer,
        writer: MetricsWriter,
        history: MetricHistory,
        name: str = "",
    ) -> None:
        self.run_, self.evaluator, self.checkpointer = run, evaluator, checkpointer
        self.writer, self.history = writer, history
        self.settings = run.loop
        self.is_host0 = jax.process_index() == 0
        self.prefix = f"{name}: " if name else ""

    def save(
        self,
        step: int,
        state: trainer.TrainState,
        batches: TrainBatches,
        pending_eval: bool = False,
        force: bool = False,
    ) -> None:
        """A checkpoint of `step` (periodic, or `force`), with the input position, so a resumed
        run restores its next batch instead of replaying those before it."""
        data = self.data(step, pending_eval)
        extra = {DATASET_ITEM: TrainBatchesSave(batches)}
        self.checkpointer.save(step, state, data, force=force, extra=extra)

    def data(self, step: int, pending_eval: bool = False) -> dict[str, Any]:
        """The checkpoint's data item: what a resumed run needs besides the arrays."""
        return {
            "step": step,
            "seed": self.settings.random_seed,
            "metric_history": self.history.values,
            "pending_eval": pending_eval,
            **self.run_.student.record(),
        }

    def evaluate(self, step: int, state: trainer.TrainState) -> dict[str, float]:
        split = self.run_.evals.eval_split
        results = self.evaluator(state.params, split)
        self.writer.write(step, "training_eval", results)
        if self.is_host0:  # tqdm.write prints even when the bar is off
            tqdm.write(format_results(f"{self.prefix}{split} at step {step}", results))
        self.history.add(results)
        self.checkpointer.save_best(step, state, self.data(step), results)
        return results

    def finish_evaluation(self, step: int, state: trainer.TrainState) -> None:
        """Completes the evaluation of a checkpoint saved before it (its data's
        `pending_eval`): runs it, or, when metrics.jsonl shows it ended before the run stopped,
        adds its result to the history the checkpoint lacks and makes the best checkpoint it
        made (again: `save_best` skips a step it holds and one that does not improve)."""
        results = self.writer.written(step, "training_eval")
        if results is None:
            self.evaluate(step, state)
            return
        self.history.add(results)
        self.checkpointer.save_best(step, state, self.data(step), results)

    def log(
        self, step: int, pending: Sequence[Mapping[str, np.ndarray]], steps: int, since: float
    ) -> dict[str, float]:
        """Writes the means of the metrics of the steps up to `step` and the rates of the
        last `steps` steps, timed from `since`; returns them."""
        logged = _mean_metrics(pending, step - len(pending) + 1)
        logged.update(_throughput(logged, steps, since, self.run_.inputs.batch_size))
        self.writer.write(step, "train", logged)
        return logged

    def needs_state(self, step: int) -> bool:
        """Whether `after_step` saves or evaluates after `step`."""
        last = self.settings.train_steps
        return (
            step % self.settings.eval_period == 0
            or step == last
            or step % self.checkpointer.period == 0
        )

    def after_step(self, step: int, state: trainer.TrainState, batches: TrainBatches) -> float:
        """Saves and evaluates after `step` when `needs_state(step)`, and saves where it stops
        early; returns the seconds spent evaluating."""
        last = self.settings.train_steps
        evaluates = step % self.settings.eval_period == 0 or step == last
        # Saved before the evaluation, so a long one never holds up the checkpoint.
        self.save(step, state, batches, pending_eval=evaluates, force=step == last)
        if not evaluates:
            return 0.0
        eval_start = time.perf_counter()
        self.evaluate(step, state)
        seconds = time.perf_counter() - eval_start
        if self.history.stop:
            self.save(step, state, batches, force=True)
            if self.is_host0:
                tqdm.write(
                    f"{self.prefix}stopping early at step {step}: {self.history.rule.metric} has "
                    f"not improved over the last {self.history.rule.patience} evaluations"
                )
        return seconds

    def batches(self, start_step: int, every_row: bool = False) -> TrainBatches:
        """The run's batches (`TrainingRun.host_batches`) from `start_step`, at the input
        position saved with that step's checkpoint, else replayed to it (said so)."""
        batches = self.run_.host_batches(start_step, every_row)
        if start_step:
            restore = TrainBatchesRestore(batches)
            self.checkpointer.restore_item(DATASET_ITEM, restore, step=start_step)
        return batches

    def run(self, state: trainer.TrainState, start_step: int) -> trainer.TrainState:
        run, settings = self.run_, self.settings
        student, partitioner = run.student, run.student.partitioner
        rng = trainer.dropout_key(settings.random_seed, settings.use_hardware_rng)
        train_step, count = trainer.compile_train_step(
            student.model,
            run.optimizer,
            partitioner,
            run.abstract_state,
            run.abstract_batch(),
            rng,
            settings.num_microbatches,
            settings.label_smoothing,
            settings.z_loss,
        )
        if settings.num_microbatches is None and self.is_host0:
            cpu_memory.report_microbatches(train_step, count, run.inputs.batch_size, partitioner)
        batches = self.batches(start_step)
        pending: list[dict[str, jax.Array]] = []
        window_start, window_step = time.perf_counter(), start_step
        last = settings.train_steps
        with (
            PreemptionWatch() as preemption,
            tqdm(
                total=last, initial=start_step, desc="train", unit="step", disable=not self.is_host0
            ) as bar,
        ):
            for step in range(start_step + 1, last + 1):
                state, metrics = train_step(state, partitioner.shard_batch(next(batches)), rng)
                pending.append(metrics)
                if step % settings.log_period == 0 or step == last:
                    logged = self.log(
                        step, jax.device_get(pending), step - window_step, window_start
                    )
                    bar.set_postfix(
                        loss=f"{logged['loss']:.4f}",
                        ex_per_s=f"{logged['examples_per_second']:.1f}",
                        tok_per_s=f"{logged['tokens_per_second']:.0f}",
                    )
                    pending, window_start, window_step = [], time.perf_counter(), step
                bar.update(1)
                if self.needs_state(step):
                    # rates count training only
                    window_start += self.after_step(step, state, batches)
                if self.history.stop:
                    break
                if preemption.reached(step):
                    self.save(step, state, batches, force=True)
                    self.checkpointer.wait_until_finished()
                    raise Preempted(step, str(run.model_dir))
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
    flat = jax.tree_util.tree_flatten_with_path(student.abstract_params)[0]
    total = 0
    for path, leaf in flat:
        total += leaf.size
        lines.append(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)} {leaf.sharding.spec}")
    lines.append(f"total parameters: {total:,}")
    return "\n".join(lines) + "\n"
