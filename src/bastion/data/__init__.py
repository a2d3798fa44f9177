"""Datasets by name -> float tensors in [0, 1], N×C×H×W, with int64 labels and metadata."""

from . import sources as _sources  # noqa: F401  (registers the loaders)
from .base import DATASETS, DataNotFoundError, Dataset, channel_stats, list_datasets, load_dataset

__all__ = ["DATASETS", "DataNotFoundError", "Dataset", "channel_stats", "list_datasets", "load_dataset"]
