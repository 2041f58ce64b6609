"""Metrics to a JSON-lines file and to TensorBoard, from the first host only.

`<model_dir>/metrics.jsonl` holds one object a line: {"step", "group", metric: value}.
TensorBoard event files go to `<model_dir>/<group>/` (train, training_eval, inference_eval),
as t5x lays them out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import tensorflow as tf
from etils import epath


class MetricsWriter:
    def __init__(self, model_dir: str | Path | epath.Path, enabled: bool = True) -> None:
        self._dir = epath.Path(model_dir)  # a gs:// MODEL_DIR too
        self._enabled = enabled
        self._writers: dict[str, tf.summary.SummaryWriter] = {}

    def write(self, step: int, group: str, metrics: Mapping[str, float]) -> None:
        if not self._enabled:
            return
        record = {"step": step, "group": group}
        record.update({k: (float(v) if math.isfinite(v) else str(v)) for k, v in metrics.items()})
        with (self._dir / "metrics.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if group not in self._writers:
            self._writers[group] = tf.summary.create_file_writer(str(self._dir / group))
        with self._writers[group].as_default(step=step):
            for name, value in metrics.items():
                tf.summary.scalar(name, value)
        self._writers[group].flush()

    def written(self, step: int, group: str) -> dict[str, float] | None:
        """The last record of `group` at `step` in metrics.jsonl, or None; read on every host.
        A line cut short by a kill is skipped."""
        path = self._dir / "metrics.jsonl"
        if not path.exists():
            return None
        found = None
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step") == step and record.get("group") == group:
                found = record
        if found is None:
            return None
        return {k: float(v) for k, v in found.items() if k not in ("step", "group")}

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
