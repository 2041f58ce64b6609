"""Vectorized sweeps: the runs of a sweep that can share a program, trained as one.

`python -m dsbs_jax.sweep ... --vectorized` trains in one process, and puts the runs whose
training program is the same (`program_key`: model, lengths, batch, schedule, optimizer, mesh)
into one group. A group is one jitted step, `jax.vmap` of the training step over a leading runs
axis of the training states, batches and dropout keys (`trainer.jit_stacked_train_step`); on a
mesh with a "runs" axis (`Partitioner.num_runs_partitions`) the runs are split over it, so a pod
slice trains many students at once. Groups run one after another.

Each run is still a run of its own:

* it is planned under its own gin config (`RunConfig.activate`), as `python -m dsbs_jax.train`
  with its flags would plan it, and its data (mixture, ALPHA's loss weights, training subset,
  rationales) is read under that config: each run has its own input pipeline, built while its
  config is active, and is evaluated while it is active;
* it keeps its own MODEL_DIR, `config.gin`, metrics, checkpointer, best checkpoint, early
  stopping and `test_results.json`, through the same `training.RunLoop` a run alone uses. A
  checkpoint holds the run's own slice of the stacked state, in the layout a run alone writes, so
  `eval`, `infer` and `convert` read it alone, and a run alone resumes it;
* the runs of a group save at the same steps, each with its input position. A rerun after a
  kill resumes every unfinished run of a group at the latest step they all have (a kill between
  their saves leaves some a save ahead; they go back one and train it again, which gives the
  same state);
* a run that stops early, or whose loss becomes NaN, stops saving and evaluating, and is no
  longer logged; its slot is still computed (the program keeps its shape) and thrown away.

In float32 a run trained this way matches the run alone to float rounding (a batched matmul
may add in another order), and with dropout the same masks: its dropout key is its own
`trainer.dropout_key(seed)` (threefry draws the same bits under `vmap`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from dsbs_jax import checkpoint_import, checkpoints, cpu_memory, trainer
from dsbs_jax.checkpoints import Checkpointer
from dsbs_jax.errors import UserError
from dsbs_jax.evaluation import EvalStep
from dsbs_jax.gin_utils import parse_gin, split_gin_flags
from dsbs_jax.input_pipeline import TrainBatches
from dsbs_jax.preemption import Preempted, PreemptionWatch
from dsbs_jax.state import Student
from dsbs_jax.training import NonFiniteLossError, RunLoop, TrainingRun, train_arguments

PyTree = Any


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A run's gin configuration, as `python -m dsbs_jax.train` reads it from its flags."""

    gin_files: tuple[str, ...]
    bindings: tuple[str, ...]
    search_paths: tuple[str, ...]

    @classmethod
    def from_flags(cls, flags: Sequence[str]) -> RunConfig:
        """The config of `--gin_file`, `--gin_bindings`, `--gin_search_paths` and `--gin.X=V`
        flags, bindings in the order the training program applies them."""
        gin_flags, rest = split_gin_flags(flags)
        parser = argparse.ArgumentParser(add_help=False)
        for name in ("--gin_file", "--gin_bindings", "--gin_search_paths"):
            parser.add_argument(name, action="append", default=[])
        args = parser.parse_args(rest)
        return cls(
            tuple(args.gin_file), (*args.gin_bindings, *gin_flags), tuple(args.gin_search_paths)
        )

    def activate(self) -> None:
        """Makes this the gin config: what the run reads from gin, now and lazily later (its
        datasets, its vocabulary, its mixture's rates) is this run's."""
        gin.clear_config()
        parse_gin(self.gin_files, self.bindings, self.search_paths)


@dataclasses.dataclass(frozen=True)
class Member:
    """A run of a vectorized sweep: its name, its gin config, and its checked plan."""

    name: str
    config: RunConfig
    run: TrainingRun
    checkpointer_cls: Callable[..., Checkpointer]
    checkpointer_settings: tuple[tuple[str, Any], ...]  # its gin bindings: the save schedule


def plan_member(name: str, config: RunConfig) -> Member:
    """Plans a run under its own gin config (`TrainingRun.plan`: checks, writes nothing)."""
    config.activate()
    arguments = train_arguments()
    if arguments["shard_files_by_host"]:
        raise UserError(
            f"{name}: a vectorized sweep reads every run's whole stream on every host; set "
            "train.shard_files_by_host = False, or sweep without --vectorized"
        )
    checkpointer_cls = arguments["checkpointer_cls"]
    return Member(
        name,
        config,
        TrainingRun.configure(arguments),
        checkpointer_cls,
        tuple(sorted(gin.get_bindings(checkpointer_cls).items())),
    )


def optimizer_fingerprint(optimizer: optax.GradientTransformation, params: PyTree) -> tuple:
    """The optimizer's update of `params` (abstract) as a program: its jaxpr and constants.

    Equal fingerprints compute the same updates at every step, however the optimizers were
    configured (learning rate, schedule, clipping, decay), so runs that share them can share
    one program."""
    state = jax.eval_shape(optimizer.init, params)
    closed = jax.make_jaxpr(optimizer.update)(params, state, params)
    return str(closed.jaxpr), tuple(np.asarray(c).tobytes() for c in closed.consts)


def program_key(member: Member) -> tuple:
    """What a group's runs must share: everything the jitted step or the loop's schedule of
    steps, logs, saves and evaluations depends on. The seed, data and evaluation may differ."""
    run = member.run
    partitioner = run.student.partitioner
    abstract_params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), run.student.abstract_params
    )
    return (
        run.student.config,
        tuple(sorted(run.inputs.task_feature_lengths.items())),
        run.inputs.batch_size,
        run.inputs.pack,
        dataclasses.replace(run.loop, random_seed=0),
        partitioner.num_partitions,
        partitioner.num_runs_partitions,
        partitioner.logical_axis_rules,
        tuple(int(d.id) for d in partitioner.mesh.devices.flat),
        optimizer_fingerprint(run.optimizer, abstract_params),
        run.initial_checkpoint_path,
        member.checkpointer_settings,
    )


def group_members(members: Sequence[Member]) -> list[list[Member]]:
    """The members by program (`program_key`), each group in the members' order."""
    groups: dict[tuple, list[Member]] = {}
    for member in members:
        groups.setdefault(program_key(member), []).append(member)
    return list(groups.values())


def describe(groups: Sequence[Sequence[Member]]) -> str:
    """What a vectorized sweep would run, for `--check`: each program and its runs."""
    lines = []
    for number, group in enumerate(groups, 1):
        run = group[0].run
        config, partitioner = run.student.config, run.student.partitioner
        lengths = run.inputs.task_feature_lengths
        lines.append(
            f"  program {number}: {len(group)} run(s) of {config.num_encoder_layers}+"
            f"{config.num_decoder_layers} layers, emb_dim {config.emb_dim}, batch "
            f"{run.inputs.batch_size} of {lengths['inputs']}/{lengths['targets']} tokens, "
            f"{run.loop.train_steps} steps, mesh {dict(partitioner.mesh.shape)}"
        )
        for member in group:
            start = "resumes " + member.run.resume_dir.name if member.run.resume_dir else "new"
            lines.append(f"    {member.name}: {start}")
    return "\n".join(lines)


def stacked_abstract_state(
    abstract_state: trainer.TrainState, runs: int, student: Student
) -> trainer.TrainState:
    """`runs` runs' training states stacked on a leading axis, split over the "runs" axis."""
    partitioner = student.partitioner
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            (runs, *x.shape), x.dtype, sharding=partitioner.stacked(x.sharding)
        ),
        abstract_state,
    )


def _shardings(abstract: PyTree) -> PyTree:
    return jax.tree.map(lambda x: x.sharding, abstract)


def init_stacked_state(
    student: Student,
    optimizer: optax.GradientTransformation,
    seeds: Sequence[int],
    initial_checkpoint_path: str | None,
    stacked: trainer.TrainState,
) -> trainer.TrainState:
    """The fresh training state of each run, stacked, built in place: each run's own seeded
    random parameters (those `Student.init_train_state` makes), or all the pretrained ones."""
    shardings = _shardings(stacked)
    runs = len(seeds)
    with student.partitioner.activation_rules():
        if initial_checkpoint_path:
            params = checkpoint_import.load_params(
                initial_checkpoint_path, student.config, student.param_shardings
            )

            def init(params: PyTree) -> trainer.TrainState:
                copies = jax.tree.map(lambda x: jnp.broadcast_to(x, (runs, *x.shape)), params)
                return jax.vmap(functools.partial(trainer.init_state, optimizer=optimizer))(copies)

            return jax.jit(init, out_shardings=shardings)(params)
        keys = jnp.stack([jax.random.key(seed) for seed in seeds])
        init = jax.vmap(functools.partial(student.random_train_state, optimizer=optimizer))
        return jax.jit(init, out_shardings=shardings)(keys)


def zeros_like_stacked(stacked: trainer.TrainState) -> trainer.TrainState:
    """A stacked state of zeros, in place: the slots that resumed runs are put into."""

    def zeros() -> trainer.TrainState:
        return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), stacked)

    return jax.jit(zeros, out_shardings=_shardings(stacked))()


def run_slicer(abstract_state: PyTree) -> Callable[[PyTree, int], PyTree]:
    """take(stacked, i): run i's slice of a stacked state, placed as a run alone places its
    state (`abstract_state`'s shardings); one program for every i."""
    return jax.jit(
        lambda stacked, i: jax.tree.map(lambda x: x[i], stacked),
        out_shardings=_shardings(abstract_state),
    )


def run_placer(stacked: PyTree) -> Callable[[PyTree, int, PyTree], PyTree]:
    """put(stacked, i, state): the stacked state with run i's slice replaced by `state`, the
    stack updated in place (donated)."""
    return jax.jit(
        lambda whole, i, one: jax.tree.map(lambda x, y: x.at[i].set(y), whole, one),
        out_shardings=_shardings(stacked),
        donate_argnums=(0,),
    )


class _Slot:
    """A run of a group: its place on the runs axis and its side of the loop."""

    def __init__(self, member: Member, index: int, eval_step: EvalStep) -> None:
        self.member, self.index = member, index
        self.run = member.run
        member.config.activate()
        self.checkpointer, self.writer = self.run.open(member.checkpointer_cls)
        self.evaluator = self.run.evaluator(eval_step)
        saved = checkpoints.step_dirs(self.run.model_dir)
        self.latest = max(saved, default=0)
        self.data = checkpoints.read_data(saved[self.latest]) if saved else {}
        self.loop = RunLoop(
            self.run,
            self.evaluator,
            self.checkpointer,
            self.writer,
            self.run.history(self.data),
            member.name,
        )
        self.training = False  # trained by the group's program from now on
        self.failed = False

    @property
    def done(self) -> bool:
        """Whether the run needs no more training: at its last step, or stopped early."""
        return self.loop.history.stop or self.latest >= self.run.loop.train_steps

    def activate(self) -> None:
        self.member.config.activate()

    def restore(self, step: int) -> trainer.TrainState:
        """The run's state at `step`, placed as a run alone places it; its loop's history and
        data become that checkpoint's."""
        self.activate()
        if step not in checkpoints.step_dirs(self.run.model_dir):
            raise UserError(
                f"{self.run.model_dir} has no checkpoint of step {step}, where the other runs of "
                "its program resume; remove the directory to start the run again, or raise "
                "Checkpointer.keep"
            )
        state, self.data = self.checkpointer.restore(self.run.abstract_state, step=step)
        self.loop.history = self.run.history(self.data)
        return state

    def evaluate_pending(self, step: int, state: trainer.TrainState) -> None:
        """Completes the evaluation `step`'s checkpoint was saved before (`finish_evaluation`)."""
        if self.data.get("pending_eval"):
            self.activate()
            self.loop.finish_evaluation(step, state)

    def fail(self, error: Exception) -> None:
        print(f"error: {self.member.name}: {error}", file=sys.stderr)
        self.training, self.failed = False, True

    def close(self) -> None:
        self.checkpointer.close()
        self.writer.close()


def train_group(members: Sequence[Member]) -> list[str]:
    """Trains the runs of one program (`group_members`) together, then tests each; returns the
    names of the runs that failed (a non-finite loss)."""
    lead = members[0].run
    # One eval step for all: the runs share the model and the loss settings.
    model, settings = lead.student.model, lead.loop
    eval_step = trainer.jit_eval_step(model, settings.label_smoothing, settings.z_loss)
    slots: list[_Slot] = []
    try:
        for member in members:
            slots.append(_Slot(member, len(slots), eval_step))
        with lead.student.partitioner.activation_rules():
            _Group(slots).train()
            for slot in slots:
                if not slot.failed:
                    slot.activate()
                    slot.checkpointer.wait_until_finished()
                    slot.run.test(slot.evaluator, slot.writer, slot.member.name)
    finally:
        for slot in slots:
            slot.close()  # waits for background saves: none outlives the program
    return [slot.member.name for slot in slots if slot.failed]


class _Group:
    """A group's runs as one stacked state, from the step the unfinished ones all have.

    Every run of the group keeps its place on the runs axis (`_Slot.index`), trained or not,
    padded to a multiple of the runs mesh axis, so a rerun compiles the very program of the
    first: runs that need no more training, and the padding, are filled with the first
    training run's state and batches, and what is computed for them is thrown away.
    """

    def __init__(self, slots: Sequence[_Slot]) -> None:
        self.slots = slots
        self.lead = slots[0].run
        self.student = self.lead.student
        self.partitioner = self.student.partitioner

    def train(self) -> None:
        for slot in self.slots:
            if slot.done:
                self._finish(slot)
        self.active = active = [slot for slot in self.slots if not slot.done]
        if not active:
            return
        start = min(slot.latest for slot in active)
        per_partition = -(-len(self.slots) // self.partitioner.num_runs_partitions)
        runs = per_partition * self.partitioner.num_runs_partitions
        # The run whose state and batches fill each place on the runs axis.
        self.source = [active[0]] * runs
        for slot in active:
            self.source[slot.index] = slot
        self.stacked = stacked_abstract_state(self.lead.abstract_state, runs, self.student)
        self.take = run_slicer(self.lead.abstract_state)
        state = self._start_state(start)
        for slot in active:
            slot.training = not slot.loop.history.stop
        if any(slot.training for slot in active):
            self._loop(state, start)

    def _finish(self, slot: _Slot) -> None:
        """A run that needs no more training: its pending evaluation, if any."""
        if slot.data.get("pending_eval"):
            slot.evaluate_pending(slot.latest, slot.restore(slot.latest))
        if slot.loop.history.stop:
            print(f"{slot.run.model_dir} stopped early at step {slot.latest}", file=sys.stderr)
        else:
            print(f"{slot.run.model_dir} is already trained to step {slot.latest}", file=sys.stderr)

    def _start_state(self, start: int) -> trainer.TrainState:
        """The stacked state at `start`: fresh, or each run's checkpoint of that step."""
        if start == 0:
            for slot in self.active:
                slot.loop.history = slot.run.history({})
                slot.data = {}
            return init_stacked_state(
                self.student,
                self.lead.optimizer,
                [slot.run.loop.random_seed for slot in self.source],
                self.lead.initial_checkpoint_path,
                self.stacked,
            )
        state = zeros_like_stacked(self.stacked)
        put = run_placer(self.stacked)
        names = ", ".join(slot.member.name for slot in self.active)
        print(f"resuming {names} at step {start}", file=sys.stderr)
        for slot in self.active:
            one = slot.restore(start)
            slot.evaluate_pending(start, one)
            state = put(state, slot.index, one)
        first = self.active[0].index
        for index, slot in enumerate(self.source):
            if index != slot.index:  # a place filled by the first training run
                state = put(state, index, self.take(state, first))
        return state

    def _keys(self) -> jax.Array:
        """Each run's own dropout key, stacked like the runs."""
        keys = jnp.stack(
            [
                trainer.dropout_key(slot.run.loop.random_seed, slot.run.loop.use_hardware_rng)
                for slot in self.source
            ]
        )
        return jax.device_put(keys, self.partitioner.stacked(self.partitioner.replicated))

    def _microbatches(self) -> int:
        """The group's microbatch count: the run files' `train.num_microbatches`, else the
        count each run takes alone (`trainer.compile_train_step`: on CPU, from its own step's
        memory), so that a run computes what it computes alone, whatever the group's size."""
        lead, settings = self.lead, self.lead.loop
        if settings.num_microbatches is not None:
            return settings.num_microbatches
        if not cpu_memory.on_cpu(self.partitioner):
            return 1
        alone, count = trainer.compile_train_step(
            self.student.model,
            lead.optimizer,
            self.partitioner,
            lead.abstract_state,
            lead.abstract_batch(),
            trainer.dropout_key(settings.random_seed, settings.use_hardware_rng),
            None,
            settings.label_smoothing,
            settings.z_loss,
        )
        if jax.process_index() == 0:
            rows = lead.inputs.batch_size
            cpu_memory.report_microbatches(alone, count, rows, self.partitioner)
        return count

    def _batches(self, start: int) -> dict[_Slot, TrainBatches]:
        """Each training run's input pipeline from `start`, built under its own gin config and
        restored to the position saved with its checkpoint. One process feeds every row, as a
        run alone does (so its saved positions serve either); several read whole batches."""
        streams = {}
        for slot in self.active:
            slot.activate()
            streams[slot] = slot.loop.batches(start, every_row=jax.process_count() > 1)
        return streams

    def _loop(self, state: trainer.TrainState, start: int) -> None:
        settings = self.lead.loop
        train_step = trainer.jit_stacked_train_step(
            self.student.model,
            self.lead.optimizer,
            self.partitioner,
            self.stacked,
            self._microbatches(),
            settings.label_smoothing,
            settings.z_loss,
        )
        keys = self._keys()
        streams = self._batches(start)
        slots = self.active
        pending: list[dict[str, jax.Array]] = []
        window_start, window_step = time.perf_counter(), start
        last = settings.train_steps
        with (
            PreemptionWatch() as preemption,
            tqdm(
                total=last,
                initial=start,
                desc=f"train {len(slots)} runs",
                unit="step",
                disable=jax.process_index() != 0,
            ) as bar,
        ):
            for step in range(start + 1, last + 1):
                fetched = {slot: next(stream) for slot, stream in streams.items()}
                rows = [fetched[slot] for slot in self.source]
                batch = {name: np.stack([r[name] for r in rows]) for name in rows[0]}
                batch = self.partitioner.shard_stacked_batch(batch)
                state, metrics = train_step(state, batch, keys)
                pending.append(metrics)
                if step % settings.log_period == 0 or step == last:
                    logged = jax.device_get(pending)
                    losses = []
                    for slot in slots:
                        if slot.training:
                            per_run = [{k: v[slot.index] for k, v in m.items()} for m in logged]
                            try:
                                values = slot.loop.log(
                                    step, per_run, step - window_step, window_start
                                )
                            except NonFiniteLossError as e:
                                slot.fail(e)
                                continue
                            losses.append(values["loss"])
                    if losses:
                        bar.set_postfix(loss=f"{min(losses):.4f}..{max(losses):.4f}")
                    pending, window_start, window_step = [], time.perf_counter(), step
                bar.update(1)
                for slot in slots:
                    if slot.training and slot.loop.needs_state(step):
                        slot.activate()  # its evaluation reads its own data
                        one = self.take(state, slot.index)
                        window_start += slot.loop.after_step(step, one, streams[slot])
                        slot.training = not slot.loop.history.stop
                if not any(slot.training for slot in slots):
                    break
                if preemption.reached(step):
                    for slot in slots:
                        if slot.training:
                            one = self.take(state, slot.index)
                            slot.loop.save(step, one, streams[slot], force=True)
                    for slot in slots:
                        slot.checkpointer.wait_until_finished()
                    raise Preempted(step, str(self.lead.model_dir.parent))
