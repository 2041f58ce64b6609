"""Deterministic validation split and training-set subsampling.

Both follow the arithmetic of the `train_test_split` the official code calls
(a `numpy.random.default_rng(seed)` permutation, the held-out part first, its
size rounded up), so sizes agree with the paper's runs. One deliberate
difference: the validation split is cut from the full training set once, before
any subsampling, so every data fraction is selected on the same validation set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from dsbs_jax.errors import UserError

T = TypeVar("T")

VALID_FRACTION = 0.1
VALID_SEED = 0


def _permutation(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)


def split_off_validation(
    examples: Sequence[T], fraction: float = VALID_FRACTION, seed: int = VALID_SEED
) -> tuple[list[T], list[T]]:
    """Returns (train, valid) with ceil(fraction * n) examples held out for validation."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"validation fraction must be in (0, 1), got {fraction}")
    order = _permutation(len(examples), seed)
    n_valid = math.ceil(fraction * len(examples))
    train = [examples[i] for i in order[n_valid:]]
    valid = [examples[i] for i in order[:n_valid]]
    return train, valid


def subsample(examples: Sequence[T], fraction: float, seed: int = 0) -> list[T]:
    """Keeps a seeded `fraction` of the examples (the paper's data-size experiments).

    For one seed the kept sets are nested: every example kept at 25% is also kept
    at 50%, so curves over fractions compare like with like.
    """
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"training fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return list(examples)
    order = _permutation(len(examples), seed)
    n_dropped = math.ceil((1.0 - fraction) * len(examples))
    return [examples[i] for i in order[n_dropped:]]
