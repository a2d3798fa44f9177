"""Input transformations: each declares `differentiable`, `randomized` and a `bpda` stand-in."""

import importlib as _importlib
import pkgutil as _pkgutil

from .base import (TRANSFORMS, RandomizedTransform, Transform, create_transform, list_transforms, register_transform,
                   straight_through, zero_grad_output)

# Import every transform module so its @register_transform runs.
for _info in sorted(_pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_") and _info.name != "base":
        _importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["TRANSFORMS", "RandomizedTransform", "Transform", "create_transform", "list_transforms",
           "register_transform", "straight_through", "zero_grad_output"]
