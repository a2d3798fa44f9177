"""User model factories for `tests/test_models.py`, reached as ``"user_models:NAME"``.

A user plugs a model into Bastion with ``create_model("package.module:factory", ...)``; the
factory is called as ``factory(num_classes=..., in_shape=..., **kwargs)``. This module stands in
for the user's package (pytest puts `tests/` on `sys.path`).
"""

from __future__ import annotations

from torch import nn


def tiny_factory(num_classes: int, in_shape: tuple[int, int, int], hidden: int = 16) -> nn.Module:
    """A one-hidden-layer perceptron sized from `in_shape`."""
    c, h, w = in_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def not_a_module(num_classes: int, in_shape: tuple[int, int, int]) -> str:
    """A broken factory: returns something that is not an `nn.Module`."""
    return "not a model"


NOT_CALLABLE = 42
