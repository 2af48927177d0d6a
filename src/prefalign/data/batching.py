"""Deterministic index batches over a dataset."""

from __future__ import annotations

import numpy as np


def batches(
    n_examples: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True, drop_last: bool = False
) -> list[list[int]]:
    """Deterministic index batches: the same ``(seed, epoch)`` always gives the same batches.

    The permutation comes from ``numpy.random.default_rng([seed, epoch])``, independent of any global
    random state, so resuming at an epoch reproduces its order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = np.random.default_rng([seed, epoch]).permutation(n_examples) if shuffle else np.arange(n_examples)
    out = [order[i : i + batch_size].tolist() for i in range(0, n_examples, batch_size)]
    if drop_last and out and len(out[-1]) < batch_size:
        out.pop()
    return out
