"""Feature squeezing by colour bit-depth reduction (Xu, Evans & Qi 2018)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Transform, check_int_range, register_transform, zero_grad_output

__all__ = ["BitDepth"]


@register_transform("bit-depth")
class BitDepth(Transform):
    """Reduce every value to `bits` bits: ``round(x · (2^bits − 1)) / (2^bits − 1)``.

    Xu, Evans & Qi 2018, "Feature Squeezing: Detecting Adversarial Examples in Deep Neural
    Networks", NDSS 2018, arXiv:1704.01155 (1 bit for MNIST, 5 bits for CIFAR-10 and 4 for
    ImageNet in the paper). The output takes at most 2^bits distinct values, 0 and 1 among them.
    Broken with BPDA (identity) by Athalye, Carlini & Wagner 2018 (arXiv:1802.00420) and He
    et al. 2017 (arXiv:1706.04701).

    Declarations: not differentiable (piecewise constant: autograd gives zero), not
    randomized; `bpda` = identity.

    Args:
        bits: 1..8. Default 5.
    """

    differentiable = False
    randomized = False

    def __init__(self, bits: int = 5) -> None:
        super().__init__()
        self.bits = check_int_range(bits, "bits", 1, 8)

    def transform(self, x: Tensor) -> Tensor:
        m = float(2**self.bits - 1)
        with torch.no_grad():
            out = torch.round(x * m) / m
        return zero_grad_output(out, x)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.bits}
