"""Convert the official archive into a canonical teacher cache, and summarise a cache."""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from tqdm import tqdm

from dsbs_jax import metrics
from dsbs_jax.data import cache, official, splits, synthetic, vocab

# The built-in dataset's vocabulary size (its words need about 145 pieces; see `vocab`).
SYNTHETIC_VOCAB_SIZE = 256


@dataclasses.dataclass(frozen=True)
class SplitSummary:
    """Counts for one split of a cache, as `prepare` prints them."""

    split: str
    examples: int
    parsed: int
    unparseable: dict[str, int]
    teacher_accuracy: float | None  # percent over all examples; None without gold labels


def teacher_accuracy(records: Sequence[cache.TeacherRecord], metric: str) -> float | None:
    """The teacher's label accuracy against gold, counting unparseable outputs as wrong."""
    labelled = [r for r in records if r.label]
    if not labelled:
        return None
    metric_fn = getattr(metrics, metric)
    predictions = [r.teacher_label if r.parse_ok else "" for r in labelled]
    result = metric_fn([r.label for r in labelled], predictions)
    return result[metric]


def summarise(split: str, records: Sequence[cache.TeacherRecord], metric: str) -> SplitSummary:
    failures = collections.Counter(r.parse_status for r in records if not r.parse_ok)
    return SplitSummary(
        split=split,
        examples=len(records),
        parsed=sum(r.parse_ok for r in records),
        unparseable=dict(sorted(failures.items())),
        teacher_accuracy=teacher_accuracy(records, metric),
    )


def prepare_official(source: str | Path, name: str, out: str | Path) -> list[SplitSummary]:
    """Writes `<out>/<name>/<split>.jsonl` from the official layout under `source`.

    A dataset without a validation split (cqa, svamp) gets one cut from train;
    test is never used for model selection.
    """
    dataset = official.get_dataset(name)
    present = official.find_splits(source, name)
    by_split = {
        split: list(
            tqdm(
                official.read_split(source, name, split),
                desc=f"{name}/{split}",
                unit="ex",
                leave=False,
            )
        )
        for split in present
    }
    if "train" in by_split and "valid" not in by_split:
        by_split["train"], by_split["valid"] = splits.split_off_validation(by_split["train"])
    return write_dataset(Path(out) / name, name, dataset.metric, by_split)


def write_dataset(
    out_dir: str | Path,
    name: str,
    metric: str,
    by_split: Mapping[str, Sequence[cache.TeacherRecord]],
) -> list[SplitSummary]:
    """Writes a dataset's cache files (train, valid, test order) and its summary."""
    ordered = {split: by_split[split] for split in cache.SPLITS if split in by_split}
    cache.write_splits(out_dir, ordered)
    summaries = [summarise(split, records, metric) for split, records in ordered.items()]
    write_summary(out_dir, name, metric, summaries)
    return summaries


def write_synthetic(
    out: str | Path,
    config: synthetic.SyntheticConfig | None = None,
    vocab_size: int = SYNTHETIC_VOCAB_SIZE,
) -> tuple[list[SplitSummary], Path]:
    """Writes the built-in dataset to `<out>/synthetic/` and trains its vocabulary there.

    Returns the splits' summaries and the vocabulary's path.
    """
    out_dir = Path(out) / synthetic.DATASET_NAME
    summaries = write_dataset(
        out_dir, synthetic.DATASET_NAME, "accuracy", synthetic.generate(config)
    )
    return summaries, vocab.train_vocab_for_cache(out_dir, vocab_size=vocab_size)


def write_summary(
    out_dir: str | Path, name: str, metric: str, summaries: Sequence[SplitSummary]
) -> None:
    """Records the dataset's metric and counts next to the cache, for people and sweeps."""
    info = {
        "dataset": name,
        "metric": metric,
        "splits": {s.split: dataclasses.asdict(s) for s in summaries},
    }
    path = Path(out_dir) / "dataset_info.json"
    path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def format_summaries(name: str, summaries: Sequence[SplitSummary]) -> str:
    lines = [
        f"{name}:",
        f"  {'split':<6} {'examples':>8} {'parsed':>7} {'unparseable':>11}  teacher accuracy",
    ]
    for s in summaries:
        acc = "n/a (no gold)" if s.teacher_accuracy is None else f"{s.teacher_accuracy:.2f}%"
        bad = sum(s.unparseable.values())
        why = f"  ({', '.join(f'{k}: {v}' for k, v in s.unparseable.items())})" if bad else ""
        lines.append(f"  {s.split:<6} {s.examples:>8} {s.parsed:>7} {bad:>11}  {acc}{why}")
    return "\n".join(lines)
