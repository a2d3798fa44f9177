"""The fixed, documented train/test split used by sources that ship without one."""

from __future__ import annotations

import numpy as np

SPLIT_SEED = 0
TEST_FRACTION = 0.2


def n_test_of(n: int, test_fraction: float = TEST_FRACTION) -> int:
    """How many of `n` examples of one class go to the test split: round half up of n·fraction."""
    return int(np.floor(n * test_fraction + 0.5))


def stratified_split(labels: np.ndarray, seed: int = SPLIT_SEED,
                     test_fraction: float = TEST_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a seeded stratified split: (train, test), each sorted ascending.

    Method: for each class ``c`` (in increasing order), the indices of that class are permuted
    with ``numpy.random.default_rng([seed, c]).permutation``; the first ``round(n_c·fraction)``
    of the permutation go to test, the rest to train. So every class keeps its proportion, and
    the split of one class does not depend on the others.
    """
    labels = np.asarray(labels)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        perm = idx[np.random.default_rng([seed, int(c)]).permutation(len(idx))]
        k = n_test_of(len(idx), test_fraction)
        test.append(perm[:k])
        train.append(perm[k:])
    cat = (lambda parts: np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64))
    return cat(train), cat(test)
