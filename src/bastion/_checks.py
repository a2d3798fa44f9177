"""Input validation shared by every public entry point.

Every check names the offending argument and what was expected, so a user reading the error
knows which value to fix without opening the source.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def check_images(x: Any, name: str = "x", *, channels: int | None = None) -> Tensor:
    """Validate a batch of images: a floating tensor N×C×H×W, finite, in [0, 1]."""
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of images, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise TypeError(f"`{name}` must be a floating-point tensor with values in [0, 1], got dtype {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"`{name}` must have shape N×C×H×W (4 dimensions), got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"`{name}` must have {channels} channel(s) (N×C×H×W with C={channels}), got shape {tuple(x.shape)}")
    if x.numel():
        x_ = x.detach()
        if torch.isnan(x_).any():
            raise ValueError(f"`{name}` contains NaN values")
        lo, hi = float(x_.min()), float(x_.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"`{name}` must have values in [0, 1] (pixel units), got min {lo:.4g}, max {hi:.4g}")
    return x


def check_labels(y: Any, num_classes: int | None = None, n: int | None = None, name: str = "y") -> Tensor:
    """Validate integer class labels of shape (N,) in [0, num_classes)."""
    if not isinstance(y, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of class labels, got {type(y).__name__}")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"`{name}` must be an integer tensor of class indices, got dtype {y.dtype}")
    if y.dim() != 1:
        raise ValueError(f"`{name}` must have shape (N,), got shape {tuple(y.shape)}")
    if n is not None and y.shape[0] != n:
        raise ValueError(f"`{name}` has {y.shape[0]} labels but the images have {n}")
    if num_classes is not None and y.numel():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"`{name}` must hold class indices in [0, {num_classes - 1}], got min {lo}, max {hi}")
    return y


def check_positive(value: Any, name: str, *, allow_zero: bool = False, integer: bool = False) -> None:
    """A finite positive number (or non-negative with `allow_zero`); integer if asked."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}")
    if integer and not isinstance(value, int):
        raise TypeError(f"`{name}` must be an integer, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"`{name}` must be a finite number {bound}, got {value!r}")


def check_in_range(value: Any, name: str, lo: float, hi: float) -> None:
    """A number in the closed interval [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}")
    if not (lo <= value <= hi):
        raise ValueError(f"`{name}` must be in [{lo}, {hi}], got {value!r}")


def check_choice(value: Any, name: str, choices: tuple[str, ...] | list[str]) -> str:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value
