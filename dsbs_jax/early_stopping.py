"""Early stopping on the validation metric, with t5x's `EarlyStoppingAction` semantics.

After each evaluation the metric's value joins a history; training stops when the last
`patience` values show no improvement from each one to the next (a change smaller than
`atol + rtol * |previous|` is no improvement). The history travels in every checkpoint,
so a resumed run counts on where it left off, and a run that stopped stays stopped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import gin

from dsbs_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
    """The rule; `metric` is the key it watches in the evaluation results."""

    metric: str | None  # None: the metric that picks the best checkpoint (see `watching`)
    patience: int
    mode: str = "max"
    atol: float = 0.0
    rtol: float = 0.0

    def watching(self, default_metric: str | None) -> EarlyStopping:
        """The rule with its metric named: its own, else `default_metric`."""
        metric = self.metric or default_metric
        if metric is None:
            raise UserError(
                "early_stopping has no metric to watch (the mixture has no label task): set "
                "early_stopping.metric, e.g. 'validation/loss' with mode 'min'"
            )
        return dataclasses.replace(self, metric=metric)

    def improved(self, current: float, previous: float) -> bool:
        delta = self.atol + self.rtol * abs(previous)
        if self.mode == "max":
            return current > previous + delta
        return current < previous - delta

    def should_stop(self, history: Sequence[float]) -> bool:
        """Whether the last `patience` values of `history` never improve on the one before."""
        if len(history) < self.patience:
            return False
        window = list(history)[len(history) - self.patience :]
        return not any(self.improved(b, a) for a, b in zip(window, window[1:], strict=False))


@gin.configurable
def early_stopping(
    patience: int | None = None,
    metric: str | None = None,
    mode: str = "max",
    atol: float = 0.0,
    rtol: float = 0.0,
) -> EarlyStopping | None:
    """The run's early stopping rule (gin: `early_stopping.patience = 5`), or None when off.

    It watches `metric`, by default (None) the validation metric that picks the best
    checkpoint; gin may name another, e.g. "validation/loss" with mode "min".
    """
    if patience is None:
        return None
    if patience < 1 or mode not in ("min", "max") or atol < 0 or rtol < 0:
        raise UserError(
            "early_stopping needs patience >= 1, mode 'min' or 'max' and atol, rtol >= 0; got "
            f"patience={patience}, mode={mode!r}, atol={atol}, rtol={rtol}"
        )
    return EarlyStopping(metric, patience, mode, atol, rtol)


class MetricHistory:
    """The watched metric's values so far, and whether the rule says to stop."""

    def __init__(self, rule: EarlyStopping | None, history: Sequence[float] = ()) -> None:
        self.rule = rule
        self.values = [float(v) for v in history]

    def add(self, results: Mapping[str, float] | None) -> None:
        if self.rule is not None and results is not None and self.rule.metric in results:
            self.values.append(float(results[self.rule.metric]))

    @property
    def stop(self) -> bool:
        return self.rule is not None and self.rule.should_stop(self.values)
