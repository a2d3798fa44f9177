"""`digits`: scikit-learn's 8×8 handwritten digits (1,797 images), shipped inside scikit-learn."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..base import DATASETS, Dataset, channel_stats
from ._split import SPLIT_SEED, TEST_FRACTION, stratified_split


@lru_cache(maxsize=1)
def _arrays() -> tuple[np.ndarray, np.ndarray, str]:
    """Images N×1×8×8 float32 in [0, 1], labels int64, and the file they came from."""
    import sklearn.datasets as skd
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]  # pixel values are 0..16
    y = d.target.astype(np.int64)
    source = str(Path(skd.__file__).parent / "data" / "digits.csv.gz")
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y, source


@DATASETS.register("digits", "scikit-learn's 8x8 digits, 1,797 images (offline); 80/20 stratified split")
def load_digits(split: str, root: Path | None = None, download: bool = True) -> Dataset:
    """scikit-learn's digits: 1×8×8 grey images (values /16), 10 classes "0".."9".

    The dataset has no official split; Bastion's is fixed: a seeded stratified split, 80% train /
    20% test, made by `bastion.data.sources._split.stratified_split` with seed 0 — within each
    class the indices are permuted by ``numpy.random.default_rng([0, class])`` and the first
    ``round(0.2·n_class)`` go to test (1,438 train / 359 test; images keep the original order).
    `root` and `download` are ignored: the data ships with scikit-learn.
    """
    x, y, source = _arrays()
    train_idx, test_idx = stratified_split(y, SPLIT_SEED, TEST_FRACTION)
    idx = train_idx if split == "train" else test_idx
    mean, std = channel_stats(torch.from_numpy(x[train_idx]))
    return Dataset("digits", split, torch.from_numpy(x[idx]), torch.from_numpy(y[idx]),
                   [str(i) for i in range(10)], mean, std, source,
                   {"split_method": f"stratified {1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%}, seed {SPLIT_SEED}"})
