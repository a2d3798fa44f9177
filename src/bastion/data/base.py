"""The `Dataset` record every loader returns, and the dataset registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .._checks import check_images, check_labels
from .._registry import Registry

SPLITS = ("train", "test")


class DataNotFoundError(FileNotFoundError):
    """A dataset file is missing or corrupt; the message says what, where, and how to get it."""


@dataclass
class Dataset:
    """Images as float32 N×C×H×W in [0, 1] with int64 labels, plus what a model needs to know.

    `mean`/`std` are per-channel statistics of the training split (used by the model's
    `Normalize` layer, so that attacks work in pixel units); `source` says where the data was read.
    """

    name: str
    split: str
    images: Tensor
    labels: Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = ""
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_images(self.images, "images")
        check_labels(self.labels, len(self.classes), self.images.shape[0], "labels")
        if self.images.dtype != torch.float32:
            self.images = self.images.float()
        self.labels = self.labels.long()
        if len(self.mean) != self.images.shape[1] or len(self.std) != self.images.shape[1]:
            raise ValueError(f"`mean`/`std` need one value per channel ({self.images.shape[1]})")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of one image, C×H×W."""
        c, h, w = self.images.shape[1:]
        return (int(c), int(h), int(w))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: slice | Tensor | list[int]) -> "Dataset":
        """A view on some examples (same metadata)."""
        if isinstance(index, list):
            index = torch.as_tensor(index, dtype=torch.long)
        return Dataset(self.name, self.split, self.images[index], self.labels[index], self.classes,
                       self.mean, self.std, self.source, dict(self.info))

    def take(self, n: int | None) -> "Dataset":
        """The first `n` examples (all when `n` is None)."""
        return self if n is None or n >= len(self) else self.subset(slice(0, n))

    def meta(self) -> dict:
        """JSON-ready metadata (no tensors)."""
        return {"name": self.name, "split": self.split, "n": len(self), "shape": list(self.shape),
                "num_classes": self.num_classes, "classes": list(self.classes),
                "mean": list(self.mean), "std": list(self.std), "source": self.source}


# A loader: (split, root, download) -> Dataset.
Loader = Callable[[str, "Path | None", bool], Dataset]
DATASETS: Registry[Loader] = Registry("dataset")


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of a batch of images."""
    flat = images.transpose(0, 1).reshape(images.shape[1], -1).double()
    return tuple(flat.mean(1).tolist()), tuple(flat.std(1).clamp_min(1e-6).tolist())


def load_dataset(name: str, split: str = "train", root: str | Path | None = None, download: bool = True) -> Dataset:
    """Load a dataset split by name.

    Args:
        name: one of `list_datasets()` (e.g. ``"mnist-5k"``, ``"fashion-mnist"``, ``"cifar10"``).
        split: ``"train"`` or ``"test"``.
        root: folder holding the standard files; defaults depend on the source (``$BASTION_DATA``,
            system locations, then a download cache).
        download: fetch missing files where the network allows (verified by checksum).

    Returns:
        A `Dataset` with float32 images in [0, 1], N×C×H×W, and int64 labels.

    Example:
        >>> ds = load_dataset("digits", "test")
        >>> ds.images.shape[1:], ds.num_classes
        (torch.Size([1, 8, 8]), 10)
    """
    loader = DATASETS.get(name)
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}")
    return loader(split, Path(root).expanduser() if root is not None else None, download)


def list_datasets() -> list[str]:
    return DATASETS.names()
