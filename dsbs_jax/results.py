"""Sweep results: mean ± std over seeds per method and setting, as CSV, Markdown and plots.

Each finished run directory holds `run.json` (its method and swept values, written by
`dsbs_jax.sweep`) and `test_results.json` (the test metrics of its best-validation
checkpoint, written by `dsbs_jax.training.train`). Runs that differ only in their seed
macros form one row of the table.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dsbs_jax.errors import UserError

TEST_RESULTS_FILE = "test_results.json"
RUN_FILE = "run.json"
SEED_MACROS = ("SEED", "RANDOM_SEED", "DATA_SEED")
FRACTION_MACRO = "TRAIN_FRACTION"
ALPHA_MACRO = "ALPHA"
TABLE_FILES = ("results.csv", "results.md")
FRACTION_PLOT = "accuracy_vs_fraction.png"
ALPHA_PLOT = "accuracy_vs_alpha.png"
# What the plots' legends call each method of `dsbs_jax.sweep`; others go by their name.
METHOD_TITLES = {
    "dsbs": "step-by-step, teacher labels",
    "dsbs_gt": "step-by-step, gold labels",
    "dsbs_rates": "step-by-step, rate mixture",
    "finetune": "standard finetuning (gold labels)",
    "distill": "standard distillation (teacher labels)",
    "single_task": "single-task (rationale and label)",
}


@dataclasses.dataclass(frozen=True)
class Row:
    """One method and setting: its test metric over seeds."""

    method: str
    settings: tuple[tuple[str, Any], ...]  # the swept values other than seeds
    metric: str
    values: tuple[float, ...]  # one per seed, in seed order

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds (0 for a single seed)."""
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def setting(self, name: str) -> Any:
        return dict(self.settings).get(name)


def test_metric(results: dict[str, Any], where: Path) -> tuple[str, float]:
    """The label metric among a run's test results: the one `<split>/<task>/<metric>` key, or
    in a run evaluated in score mode only, the one `<split>/<task>/score/<metric>` key."""
    keys = [k for k in results if k.count("/") == 2] or [
        k for k in results if k.count("/") == 3 and k.split("/")[2] == "score"
    ]
    if len(keys) != 1:
        raise UserError(f"{where}: expected one <split>/<task>/<metric> result, found {keys}")
    return keys[0], float(results[keys[0]])


def aggregate(sweep_dir: Path) -> list[Row]:
    """Rows for every finished run under `sweep_dir`, grouped over seeds."""
    groups: dict[tuple[str, tuple[tuple[str, Any], ...], str], list[tuple[Any, float]]] = {}
    for run_file in sorted(Path(sweep_dir).glob(f"*/{RUN_FILE}")):
        results_file = run_file.parent / TEST_RESULTS_FILE
        if not results_file.exists():
            continue
        run = json.loads(run_file.read_text())
        metric, value = test_metric(json.loads(results_file.read_text()), results_file)
        settings = tuple((k, v) for k, v in run["settings"].items() if k not in SEED_MACROS)
        seed = tuple(v for k, v in run["settings"].items() if k in SEED_MACROS)
        groups.setdefault((run["method"], settings, metric), []).append((seed, value))
    rows = [
        Row(method, settings, metric, tuple(v for _, v in sorted(seeded, key=lambda s: s[0])))
        for (method, settings, metric), seeded in groups.items()
    ]
    return sorted(rows, key=_row_order)


def _row_order(row: Row) -> tuple:
    # None (the alpha of alpha-free methods) sorts before every number.
    return (row.method, tuple((k, v is not None, v) for k, v in row.settings))


def _setting_names(rows: Sequence[Row]) -> list[str]:
    return list(dict.fromkeys(k for row in rows for k, _ in row.settings))


def _cell(value: Any) -> str:
    return "–" if value is None else str(value)


def markdown_table(rows: Sequence[Row]) -> str:
    """A Markdown table: method, swept values, seeds, test metric as mean ± std."""
    names = _setting_names(rows)
    metric = rows[0].metric.rsplit("/", 1)[-1] if rows else "metric"
    header = ["method", *names, "seeds", f"test {metric} (mean ± std)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * (len(header) - 1) + "---:|"]
    for row in rows:
        cells = [row.method, *(_cell(row.setting(n)) for n in names), str(len(row.values))]
        lines.append("| " + " | ".join([*cells, f"{row.mean:.2f} ± {row.std:.2f}"]) + " |")
    return "\n".join(lines)


def write_csv(rows: Sequence[Row], path: Path) -> None:
    names = _setting_names(rows)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", *names, "metric", "seeds", "mean", "std", "values"])
        for row in rows:
            writer.writerow(
                [
                    row.method,
                    *(_cell(row.setting(n)) for n in names),
                    row.metric,
                    len(row.values),
                    f"{row.mean:.4f}",
                    f"{row.std:.4f}",
                    " ".join(f"{v:.4f}" for v in row.values),
                ]
            )


def _lines(rows: Sequence[Row], x_macro: str) -> dict[str, list[tuple[float, Row]]]:
    """Rows that vary `x_macro`, grouped into one line per method and other setting."""
    lines: dict[str, list[tuple[float, Row]]] = {}
    for row in rows:
        x = row.setting(x_macro)
        if x is None:
            continue
        others = [f"{k}={_cell(v)}" for k, v in row.settings if k != x_macro and v is not None]
        title = METHOD_TITLES.get(row.method, row.method)
        label = title + (f"; {', '.join(others)}" if others else "")
        lines.setdefault(label, []).append((float(x), row))
    return {label: sorted(points) for label, points in lines.items() if len(points) > 1}


def plot(rows: Sequence[Row], x_macro: str, path: Path, title: str) -> bool:
    """Test metric against `x_macro`, one line per method with std error bars; False if flat."""
    lines = _lines(rows, x_macro)
    if not lines:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    log_x = x_macro == FRACTION_MACRO
    for i, (label, points) in enumerate(lines.items()):
        # Each line a little to the side of the others, so that error bars do not overlap.
        shift = 0.02 * (i - (len(lines) - 1) / 2)
        xs = [x * 2**shift if log_x else x + shift for x, _ in points]
        ax.errorbar(
            xs,
            [r.mean for _, r in points],
            yerr=[r.std for _, r in points],
            marker="o",
            capsize=3,
            label=label,
        )
    xs = sorted({x for points in lines.values() for x, _ in points})
    if log_x:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{100 * x:g}%" for x in xs])
        ax.set_xlabel("share of the training data")
    else:
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.set_xlabel(x_macro)
    metric = rows[0].metric
    ax.set_ylabel(f"test {metric.rsplit('/', 1)[-1]} (mean ± std over seeds)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_reports(rows: Sequence[Row], out_dir: Path) -> list[Path]:
    """Writes the CSV and Markdown tables and whichever plots the sweep's axes allow."""
    out_dir = Path(out_dir)
    csv_path, md_path = (out_dir / name for name in TABLE_FILES)
    write_csv(rows, csv_path)
    md_path.write_text(markdown_table(rows) + "\n")
    written = [csv_path, md_path]
    for macro, name, title in (
        (FRACTION_MACRO, FRACTION_PLOT, "Accuracy against training data"),
        (ALPHA_MACRO, ALPHA_PLOT, "Accuracy against ALPHA"),
    ):
        if plot(rows, macro, out_dir / name, title):
            written.append(out_dir / name)
    return written
