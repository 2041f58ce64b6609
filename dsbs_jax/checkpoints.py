"""Training checkpoints and the one description of their layout on disk.

A thin layer over ``orbax.checkpoint.CheckpointManager`` that keeps t5x's layout::

    MODEL_DIR/checkpoint_{step}/        the `keep` most recent checkpoints
    MODEL_DIR/best/checkpoint_{step}/   the single best one by `best_metric`

The best checkpoint lives in its own manager (``max_to_keep=1``, keyed by the
metric) so that "keep the N most recent plus the best" holds even when the best
checkpoint is older than the N most recent. Each checkpoint holds two items:
``state`` (a pytree of possibly sharded ``jax.Array``: ``params``, and for a training run
``step`` and ``opt_state``) and ``data`` (a small JSON dict: the step, seed, metric history
and the model's shape-fixing dimensions), plus any further items whose handlers the
Checkpointer was opened with, such as the input pipeline's position
(`dsbs_jax.input_pipeline.TrainBatchesHandler`, which needs TensorFlow; this module does not
import it). Readers of this layout (`dsbs_jax.checkpoint_import`, `dsbs_jax.t5x_checkpoints`,
evaluation) take its names and step lookup from here.

Saving is synchronous by default, so once ``save`` returns the checkpoint is
complete on disk. With ``async_save`` (what training uses: runs/base.gin), ``save``
returns once the arrays are copied to host memory and the write goes on in the
background while training continues; the next save, a restore and ``close`` wait
for it. orbax writes each checkpoint into a temporary directory and renames it
when done (on gs://, where there is no rename, it marks the checkpoint complete
last), so an interrupted save, even one killed mid-write, never leaves a
directory that looks like a finished checkpoint; such leftovers are ignored and
removed on reopening, and the previous checkpoint is where a rerun resumes.

MODEL_DIR may be a gs:// URL, as on Cloud TPU VMs: orbax writes it natively.

Restoring checks the saved tree structure and shapes against the model first and
raises :class:`IncompatibleCheckpointError` with one readable message, instead of
the deep orbax/tensorstore error a mismatched ``MODEL_DIR`` would otherwise give.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gin
import jax
import orbax.checkpoint as ocp
from etils import epath

from dsbs_jax.errors import MissingFileError, UserError

STATE_ITEM = "state"
DATA_ITEM = "data"
STEP_PREFIX = "checkpoint"
BEST_SUBDIR = "best"
# Where the parameters sit in the state item (t5x's own orbax checkpoints say "target").
PARAMS_KEY = "params"
# The best checkpoint's ranking value is stored under one key, whatever the metric is called,
# so a Checkpointer opened for inference finds the best without knowing the metric's name.
BEST_VALUE_KEY = "best_metric_value"
_MAX_REPORTED_MISMATCHES = 3


def model_dir_path(model_dir: str | os.PathLike) -> epath.Path:
    """MODEL_DIR as a path orbax can write: gs:// (or another URL) as given, else absolute.

    orbax writes gs:// natively: its files through `etils.epath` (TensorFlow's GCS file system),
    its arrays through TensorStore's GCS driver.
    """
    if "://" in os.fspath(model_dir):
        return epath.Path(model_dir)
    return epath.Path(Path(model_dir).expanduser().absolute())  # orbax needs absolute paths


def _name_format() -> ocp.path.step.NameFormat:
    return ocp.path.step.standard_name_format(step_prefix=STEP_PREFIX)


def step_dirs(model_dir: str | os.PathLike) -> dict[int, epath.Path]:
    """The finished `checkpoint_<step>` folders directly under `model_dir`, by step.

    Unfinished saves (orbax's temporary folders, or on gs:// folders without their commit
    marker) are left out, as orbax itself leaves them out.
    """
    root = epath.Path(model_dir)
    if not root.is_dir():
        return {}
    return {m.step: m.path for m in _name_format().find_all(root)}


def step_of(step_dir: str | os.PathLike) -> int | None:
    """The step a `checkpoint_<step>` folder holds, by its name; None for another name."""
    match = re.fullmatch(rf"{STEP_PREFIX}_(\d+)", epath.Path(step_dir).name)
    return int(match.group(1)) if match else None


def latest_step_dir(model_dir: str | os.PathLike) -> epath.Path | None:
    """The finished checkpoint folder of the highest step under `model_dir`, or None."""
    found = step_dirs(model_dir)
    return found[max(found)] if found else None


def checkpoint_dir(
    model_dir: str | os.PathLike, which: str | int = "best"
) -> tuple[int, epath.Path]:
    """(step, folder) of MODEL_DIR's "best" checkpoint (the latest when it keeps no best),
    its "latest", or the one of a step; MissingFileError naming what there is."""
    root = model_dir_path(model_dir)
    recent = step_dirs(root)
    best = step_dirs(root / BEST_SUBDIR)
    if which == "best" and best:
        return max(best), best[max(best)]
    if which in ("best", "latest") and recent:
        return max(recent), recent[max(recent)]
    if isinstance(which, int) or str(which).isdigit():
        step = int(which)
        found = {**best, **recent}.get(step)
        if found is not None:
            return step, found
    if not recent and not best:
        raise MissingFileError(
            f"MODEL_DIR {root} holds no checkpoint; train one there first with "
            "`python -m dsbs_jax.train` and the same gin files and flags"
        )
    raise MissingFileError(
        f"MODEL_DIR {root} has no checkpoint {which!r}; saved steps: "
        f'{sorted(recent)}, best: {sorted(best)}; give "best", "latest" or one of those steps'
    )


def state_metadata(step_dir: str | os.PathLike) -> Any:
    """The tree of a checkpoint's `state` item with each array's shape and dtype, read from
    its metadata without loading the arrays."""
    return ocp.PyTreeCheckpointHandler().metadata(epath.Path(step_dir) / STATE_ITEM).tree


def check_compatible(
    step_dir: str | os.PathLike, abstract_state: Any, where: str, which: str = "checkpoint"
) -> None:
    """Raises IncompatibleCheckpointError, naming the first differences, when the state saved
    in `step_dir` has another tree or other shapes than `abstract_state`."""
    saved = _shapes_by_path(state_metadata(step_dir))
    problems = _mismatches(saved, _shapes_by_path(abstract_state))
    if problems:
        shown = problems[:_MAX_REPORTED_MISMATCHES]
        more = len(problems) - len(shown)
        raise IncompatibleCheckpointError(
            f"{where} holds an incompatible {which} (step {step_of(step_dir)}): "
            + "; ".join(shown)
            + (f"; and {more} more mismatch(es)" if more else "")
            + "; use another MODEL_DIR"
        )


def read_data(step_dir: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's `data` item (empty when it has none, as converted checkpoints may)."""
    path = epath.Path(step_dir) / DATA_ITEM
    if not path.is_dir():
        return {}
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path)


class IncompatibleCheckpointError(UserError):
    """The checkpoint's tree structure or shapes do not match the model's."""


def _handler_registry(
    extra_handlers: Mapping[str, ocp.CheckpointHandler],
) -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """Registers every item up front, so a freshly opened manager can read metadata.

    Each extra handler serves the save and restore args registered with its class
    (`ocp.args.register_with_handler`).
    """
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(STATE_ITEM, ocp.args.StandardSave, ocp.handlers.StandardCheckpointHandler)
    registry.add(STATE_ITEM, ocp.args.StandardRestore, ocp.handlers.StandardCheckpointHandler)
    registry.add(DATA_ITEM, ocp.args.JsonSave, ocp.handlers.JsonCheckpointHandler)
    registry.add(DATA_ITEM, ocp.args.JsonRestore, ocp.handlers.JsonCheckpointHandler)
    for item, handler in extra_handlers.items():
        for args_type in ocp.args.get_registered_args_cls(handler):
            registry.add(item, args_type, handler)
    return registry


def _composite(
    state: Any, data: dict, extra: Mapping[str, ocp.args.CheckpointArgs] | None = None
) -> ocp.args.Composite:
    return ocp.args.Composite(
        **{STATE_ITEM: ocp.args.StandardSave(state), DATA_ITEM: ocp.args.JsonSave(data)},
        **(extra or {}),
    )


def _key_str(key: Any) -> str:
    """One path entry as orbax names it: dict key, sequence index or attribute name."""
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    return str(key.key)  # DictKey, FlattenedIndexKey


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
    """Maps 'a/b/0/c' to each leaf's shape; orbax stores tuples as lists and
    namedtuples as dicts, so paths (not tree types) are what can be compared."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(_key_str(k) for k in path): tuple(getattr(leaf, "shape", ()))
        for path, leaf in leaves
    }


def _mismatches(saved: dict[str, tuple[int, ...]], model: dict[str, tuple[int, ...]]) -> list[str]:
    """Human-readable differences between checkpoint and model, in path order."""
    problems = []
    for path in sorted(saved.keys() | model.keys()):
        if path not in saved:
            problems.append(f"{path} is missing from the checkpoint")
        elif path not in model:
            problems.append(f"{path} is in the checkpoint but not in the model")
        elif saved[path] != model[path]:
            problems.append(
                f"{path} has shape {saved[path]} in the checkpoint but {model[path]} in the model"
            )
    return problems


@gin.configurable
class Checkpointer:
    """Saves and restores (state, data) checkpoints under a t5x-style MODEL_DIR."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        best_metric: str | None = None,
        period: int = 1000,
        keep: int = 3,
        best_mode: str = "max",
        async_save: bool = False,
        extra_handlers: Mapping[str, ocp.CheckpointHandler] | None = None,
    ) -> None:
        """Opens (creating if needed) the managers for MODEL_DIR and MODEL_DIR/best.

        Args:
          model_dir: the run's MODEL_DIR.
          best_metric: the metric key that ranks checkpoints for MODEL_DIR/best (a key of
            the training program's evaluation results); None keeps no best checkpoint.
          period: save every `period` steps (see `save`).
          keep: how many of the most recent checkpoints to keep.
          best_mode: "max" or "min": whether a higher or lower metric is better.
          async_save: write in the background; call `wait_until_finished` before
            relying on the checkpoint.
          extra_handlers: {item name: orbax handler} of further items that `save(extra=...)`
            writes into the recent checkpoints and `restore_item` reads.
        """
        if period < 1 or keep < 1:
            raise UserError(
                f"Checkpointer.period and Checkpointer.keep must be >= 1, got period={period}, "
                f"keep={keep}"
            )
        if best_mode not in ("max", "min"):
            raise UserError(f"Checkpointer.best_mode must be 'max' or 'min', got {best_mode!r}")
        extra_handlers = dict(extra_handlers or {})
        if extra_handlers.keys() & {STATE_ITEM, DATA_ITEM}:
            raise ValueError(f"extra items may not be named {STATE_ITEM!r} or {DATA_ITEM!r}")
        self.model_dir = model_dir_path(model_dir)
        self.period = period
        self.best_metric = best_metric
        self.best_mode = best_mode
        self._recent = ocp.CheckpointManager(
            self.model_dir,
            options=self._options(max_to_keep=keep, async_save=async_save),
            handler_registry=_handler_registry(extra_handlers),
        )
        self._best: ocp.CheckpointManager | None = None
        self._best_value: float | None = None
        if best_metric is not None:
            self._best = ocp.CheckpointManager(
                self.model_dir / BEST_SUBDIR,
                options=self._options(
                    max_to_keep=1,
                    async_save=async_save,
                    best_fn=lambda metrics: metrics[BEST_VALUE_KEY],
                    best_mode=best_mode,
                    keep_checkpoints_without_metrics=False,
                ),
                handler_registry=_handler_registry(extra_handlers),
            )
            best_step = self._best.best_step()
            saved = self._best.metrics(best_step) if best_step is not None else None
            if saved:
                self._best_value = float(saved[BEST_VALUE_KEY])

    def _options(
        self, max_to_keep: int, async_save: bool, **kwargs: Any
    ) -> ocp.CheckpointManagerOptions:
        """Options shared by both managers; local leftover temp dirs are removed on opening.

        Not on gs://: there orbax takes every folder without its commit marker for an
        unfinished save, MODEL_DIR/best and the TensorBoard folders included. Unfinished
        saves there are skipped when reading and written over when the step is saved again.
        """
        return ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            step_prefix=STEP_PREFIX,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories="://" not in os.fspath(self.model_dir),
            **kwargs,
        )

    def _improves(self, value: float) -> bool:
        if self._best_value is None:
            return True
        if self.best_mode == "max":
            return value > self._best_value
        return value < self._best_value

    def save(
        self,
        step: int,
        state: Any,
        data: dict,
        force: bool = False,
        extra: Mapping[str, ocp.args.CheckpointArgs] | None = None,
    ) -> bool:
        """Saves a checkpoint when `step % period == 0` or `force`; returns whether it wrote one.

        A step that is already saved is not written again. `extra` holds the save args of
        further items (see `extra_handlers`), written into the same checkpoint.
        """
        step = int(step)
        if not (force or step % self.period == 0) or step in self._recent.all_steps():
            return False
        return self._recent.save(step, args=_composite(state, data, extra), force=True)

    def save_best(self, step: int, state: Any, data: dict, metrics: dict[str, float]) -> bool:
        """Makes this checkpoint MODEL_DIR/best when `metrics[best_metric]` beats the best so
        far; returns whether it did. The best checkpoint is for evaluation, so it holds only
        the state and data items."""
        if self._best is None or self.best_metric not in metrics:
            return False
        value = float(metrics[self.best_metric])
        if not self._improves(value) or int(step) in self._best.all_steps():
            return False
        self._best.save(
            int(step), args=_composite(state, data), metrics={BEST_VALUE_KEY: value}, force=True
        )
        self._best_value = value
        return True

    def latest_step(self) -> int | None:
        """The most recent saved step under MODEL_DIR, or None."""
        return self._recent.latest_step()

    def best_step(self) -> int | None:
        """The step of the best checkpoint under MODEL_DIR/best, or None."""
        return self._best.best_step() if self._best is not None else None

    def restore(
        self, abstract_state: Any, step: int | None = None, best: bool = False
    ) -> tuple[Any, dict]:
        """Restores (state, data) from `step` (default: latest, or the best if `best`).

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` whose `.sharding`
        and dtype say where and how each array lands. Raises
        `IncompatibleCheckpointError` when the saved tree does not match it and
        `MissingFileError` when there is no such checkpoint.
        """
        manager, step, which = self._saved(step, best)
        check_compatible(
            step_dirs(manager.directory)[step], abstract_state, f"MODEL_DIR {self.model_dir}", which
        )
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: ocp.args.StandardRestore(abstract_state),
                    DATA_ITEM: ocp.args.JsonRestore(),
                }
            ),
        )
        return restored[STATE_ITEM], restored[DATA_ITEM]

    def restore_item(
        self, item: str, args: ocp.args.CheckpointArgs, step: int | None = None, best: bool = False
    ) -> Any:
        """Restores the further item `item` of checkpoint `step` (default as `restore`) with
        `args`: what its handler returns, or None when that checkpoint was saved without it."""
        manager, step, _ = self._saved(step, best)
        if item not in manager.item_metadata(step):
            return None
        return manager.restore(step, args=ocp.args.Composite(**{item: args}))[item]

    def _saved(self, step: int | None, best: bool) -> tuple[ocp.CheckpointManager, int, str]:
        """(manager, step, what it is called) of a saved checkpoint; `step` None: the latest,
        or the best if `best`. Waits for pending saves; MissingFileError if there is none."""
        if best and self._best is None:
            raise ValueError("restore(best=True) needs a Checkpointer with a best_metric")
        self.wait_until_finished()
        manager = self._best if best else self._recent
        if step is None:
            step = manager.best_step() if best else manager.latest_step()
        which = "best checkpoint" if best else "checkpoint"
        if step is None or step not in manager.all_steps():
            raise MissingFileError(
                f"MODEL_DIR {self.model_dir} has no {which}"
                + (f" at step {step}" if step is not None else "")
                + f"; saved steps: {list(manager.all_steps())}"
            )
        return manager, step, which

    def wait_until_finished(self) -> None:
        """Blocks until any background save has been committed."""
        self._recent.wait_until_finished()
        if self._best is not None:
            self._best.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases the managers."""
        self._recent.close()
        if self._best is not None:
            self._best.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
