"""Training checkpoints: the N most recent plus the best, saved with orbax.

t5x cannot be installed, so this replaces its checkpointer with a thin layer over
``orbax.checkpoint.CheckpointManager`` that keeps t5x's layout::

    MODEL_DIR/checkpoint_{step}/        the `keep` most recent checkpoints
    MODEL_DIR/best/checkpoint_{step}/   the single best one by `best_metric`

The best checkpoint lives in its own manager (``max_to_keep=1``, keyed by the
metric) so that "keep the N most recent plus the best" holds even when the best
checkpoint is older than the N most recent. Each checkpoint holds two items:
``state`` (a pytree of possibly sharded ``jax.Array``: params, optimizer state,
step) and ``data`` (a small JSON dict: the seed, the metric history), plus any
further items whose handlers the Checkpointer was opened with, such as the input
pipeline's position (`dsbs_jax.input_pipeline.TrainBatchesHandler`, which needs
TensorFlow; this module does not import it).

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gin
import jax
import orbax.checkpoint as ocp
from etils import epath

STATE_ITEM = "state"
DATA_ITEM = "data"
STEP_PREFIX = "checkpoint"
BEST_SUBDIR = "best"
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


class IncompatibleCheckpointError(ValueError):
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
    """Saves and restores (state, data) checkpoints, and further items, under a t5x-style
    MODEL_DIR."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        period: int = 1000,
        keep: int = 3,
        keep_best: bool = True,
        best_metric: str = "valid/accuracy",
        best_mode: str = "max",
        async_save: bool = False,
        extra_handlers: Mapping[str, ocp.CheckpointHandler] | None = None,
    ) -> None:
        """Opens (creating if needed) the managers for MODEL_DIR and MODEL_DIR/best.

        Args:
          model_dir: the run's MODEL_DIR.
          period: save every `period` steps (see `save`).
          keep: how many of the most recent checkpoints to keep.
          keep_best: also keep the best checkpoint by `best_metric`.
          best_metric: the metric key that ranks checkpoints.
          best_mode: "max" or "min": whether a higher or lower metric is better.
          async_save: write in the background; call `wait_until_finished` before
            relying on the checkpoint.
          extra_handlers: {item name: handler} of further items that `save` may write
            (`extra`) and `restore_item` reads back.
        """
        if period < 1 or keep < 1:
            raise ValueError(f"period and keep must be >= 1, got period={period}, keep={keep}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
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
        if keep_best:
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
        metrics: dict[str, float] | None = None,
        force: bool = False,
        extra: Mapping[str, ocp.args.CheckpointArgs] | None = None,
    ) -> bool:
        """Saves a checkpoint when `step % period == 0` or `force`; returns whether it wrote one.

        Independently of the period, when `metrics` holds `best_metric` and it
        beats the best so far, the checkpoint also replaces MODEL_DIR/best. A step
        that is already saved is not written again. `extra` holds the save args of
        further items (see `extra_handlers`), written into the same checkpoint.
        """
        step = int(step)
        composite = ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardSave(state), DATA_ITEM: ocp.args.JsonSave(data)},
            **(extra or {}),
        )
        saved = False
        if (force or step % self.period == 0) and step not in self._recent.all_steps():
            saved = self._recent.save(step, args=composite, force=True)
        if self._best is not None and metrics is not None and self.best_metric in metrics:
            value = float(metrics[self.best_metric])
            if self._improves(value) and step not in self._best.all_steps():
                self._best.save(step, args=composite, metrics={BEST_VALUE_KEY: value}, force=True)
                self._best_value = value
                saved = True
        return saved

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
        `FileNotFoundError` when there is no such checkpoint.
        """
        manager, step, which = self._saved(step, best)
        self._check_compatible(manager, step, abstract_state, which)
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
        or the best if `best`. Waits for pending saves; FileNotFoundError if there is none."""
        if best and self._best is None:
            raise ValueError("restore(best=True) needs a Checkpointer with keep_best=True")
        self.wait_until_finished()
        manager = self._best if best else self._recent
        if step is None:
            step = manager.best_step() if best else manager.latest_step()
        which = "best checkpoint" if best else "checkpoint"
        if step is None or step not in manager.all_steps():
            raise FileNotFoundError(
                f"MODEL_DIR {self.model_dir} has no {which}"
                + (f" at step {step}" if step is not None else "")
                + f"; saved steps: {list(manager.all_steps())}"
            )
        return manager, step, which

    def _check_compatible(
        self, manager: ocp.CheckpointManager, step: int, abstract_state: Any, which: str
    ) -> None:
        saved = _shapes_by_path(manager.item_metadata(step)[STATE_ITEM])
        problems = _mismatches(saved, _shapes_by_path(abstract_state))
        if problems:
            shown = problems[:_MAX_REPORTED_MISMATCHES]
            more = len(problems) - len(shown)
            raise IncompatibleCheckpointError(
                f"MODEL_DIR {self.model_dir} holds an incompatible {which} (step {step}): "
                + "; ".join(shown)
                + (f"; and {more} more mismatch(es)" if more else "")
                + "; use another MODEL_DIR"
            )

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
