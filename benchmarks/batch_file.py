"""The training benchmark's batches in one compressed `.npz` file.

The batches come from SeqIO, which needs TensorFlow; an accelerator host may have neither. So
they are built where SeqIO runs, written here, and the file travels: reading it needs NumPy
alone. Ours are whole batches (a dict of arrays a step, all steps of one shape); the baseline's
are each step's (label example, rationale example) pairs of token ids, padded only when the
benchmark collates them, so they are kept as they came: concatenated, with their lengths.
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dsbs_jax.errors import MissingFileError, UserError

# A pair is (label example, rationale example), each with these token id sequences.
EXAMPLES = ("pred", "expl")
FEATURES = ("inputs", "targets")
Pair = tuple[Mapping[str, Any], Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class Batches:
    """What the file holds: the writer's `meta` (JSON), ours' batches, the baseline's pairs."""

    meta: dict[str, Any]
    ours: list[dict[str, np.ndarray]]
    baseline: list[list[Pair]]


def write(
    path: Path,
    meta: Mapping[str, Any],
    ours: Sequence[Mapping[str, np.ndarray]],
    baseline: Sequence[Sequence[Pair]],
) -> int:
    """Writes the batches to `path` (compressed); returns the file's size in bytes."""
    arrays = {"meta": np.array(json.dumps(dict(meta)))}
    for name in ours[0]:
        arrays[f"ours_{name}"] = np.stack([np.asarray(batch[name]) for batch in ours])
    for index, example in enumerate(EXAMPLES):
        for key in FEATURES:
            ids = [np.asarray(pair[index][key]) for step in baseline for pair in step]
            arrays[f"baseline_{example}_{key}_ids"] = np.concatenate(ids).astype(np.int32)
            arrays[f"baseline_{example}_{key}_lengths"] = np.array(
                [[len(pair[index][key]) for pair in step] for step in baseline], np.int32
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # savez_compressed would add ".npz" to any other name
        np.savez_compressed(f, **arrays)
    return path.stat().st_size


def read(path: Path) -> Batches:
    """The batches `write` wrote to `path`."""
    if not path.is_file():
        raise MissingFileError(
            f"batch file {path} not found: write it with --write-batches where SeqIO runs"
        )
    try:
        with np.load(path) as data:
            return _parse({name: data[name] for name in data.files})
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise UserError(f"{path} is not a batch file written by --write-batches: {error}") from None


def _parse(arrays: Mapping[str, np.ndarray]) -> Batches:
    ours_arrays = {k.removeprefix("ours_"): v for k, v in arrays.items() if k.startswith("ours_")}
    steps = len(arrays["ours_encoder_input_tokens"])
    ours = [{name: value[step] for name, value in ours_arrays.items()} for step in range(steps)]
    sequences = {
        (example, key): _split(arrays, f"baseline_{example}_{key}")
        for example in EXAMPLES
        for key in FEATURES
    }
    width = arrays["baseline_pred_inputs_lengths"].shape[1]
    pairs = [
        tuple({key: sequences[example, key][i] for key in FEATURES} for example in EXAMPLES)
        for i in range(len(sequences["pred", "inputs"]))
    ]
    baseline = [pairs[start : start + width] for start in range(0, len(pairs), width)]
    return Batches(json.loads(str(arrays["meta"])), ours, baseline)


def _split(arrays: Mapping[str, np.ndarray], name: str) -> list[np.ndarray]:
    """Every sequence of one pair field, in order, from their concatenation and lengths."""
    lengths = arrays[f"{name}_lengths"].ravel()
    return np.split(arrays[f"{name}_ids"], np.cumsum(lengths)[:-1])
