"""Gaussian noise injection (a differentiable, randomized input transformation).

`GaussianNoise` adds N(0, sigma²) to every pixel and clips to [0, 1] — the input-noise
baseline of randomized smoothing (Cohen, Rosenfeld & Kolter 2019, arXiv:1902.02918) and of
Gaussian augmentation (Zantedeschi et al. 2017, arXiv:1707.06728). It is differentiable (the
noise is additive) but random, so an informed attacker averages over it (EOT).

The helpers the transforms share (`RandomizedTransform`, `zero_grad_output`, `check_int_range`,
`check_odd_size`) live in `.base`; they are re-exported here for code that imported them from
this module.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..._checks import check_positive
from .base import RandomizedTransform, check_int_range, check_odd_size, register_transform, zero_grad_output

__all__ = ["GaussianNoise", "RandomizedTransform", "check_int_range", "check_odd_size", "zero_grad_output"]


# ------------------------------------------------------------------------------ the transform
@register_transform("gaussian-noise")
class GaussianNoise(RandomizedTransform):
    """Additive Gaussian noise, clipped to [0, 1]: ``clip(x + sigma · N(0, I), 0, 1)``.

    The input-noise defense of randomized smoothing (Cohen, Rosenfeld & Kolter 2019,
    "Certified Adversarial Robustness via Randomized Smoothing", arXiv:1902.02918) and of
    Gaussian data augmentation (Zantedeschi, Nicolae & Rawat 2017, arXiv:1707.06728).

    Declarations: differentiable (the gradient of the clipped sum is meaningful), randomized
    (attack it with EOT); `bpda` is not needed.

    Args:
        sigma: standard deviation in pixel units (> 0). Default 0.1.
        seed / generator: see `RandomizedTransform`.
    """

    differentiable = True
    randomized = True

    def __init__(self, sigma: float = 0.1, seed: int | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__(seed, generator)
        check_positive(sigma, "sigma")
        self.sigma = float(sigma)

    def transform(self, x: Tensor) -> Tensor:
        noise = self.randn(*x.shape, device=x.device, dtype=x.dtype)
        return (x + self.sigma * noise).clamp(0.0, 1.0)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "sigma": self.sigma, "seed": self.seed}
