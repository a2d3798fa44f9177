"""Gaussian noise injection, and the helpers every randomized or non-differentiable transform shares.

`GaussianNoise` adds N(0, sigma²) to every pixel and clips to [0, 1] — the input-noise
baseline of randomized smoothing (Cohen, Rosenfeld & Kolter 2019, arXiv:1902.02918) and of
Gaussian augmentation (Zantedeschi et al. 2017, arXiv:1707.06728). It is differentiable (the
noise is additive) but random, so an informed attacker averages over it (EOT).

Shared helpers (used by the other transform modules of this package):

* `RandomizedTransform` — a `Transform` with an optional ``seed`` / ``generator``: with neither,
  draws come from torch's global RNG (so ``torch.manual_seed`` fixes them); with a seed, the
  transform owns a `torch.Generator` seeded once, so two calls differ and a fresh transform
  with the same seed replays the same sequence of calls.
* `zero_grad_output(out, x)` — the real output of a non-differentiable component, attached to
  the graph with a zero derivative: autograd through it yields zeros (what a naive attack sees
  and the obfuscated-gradient checks flag) instead of an error.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..._checks import check_positive
from .base import Transform, register_transform

__all__ = ["GaussianNoise", "RandomizedTransform", "check_int_range", "check_odd_size", "zero_grad_output"]


# ------------------------------------------------------------------------------ validation
def check_int_range(value: Any, name: str, lo: int, hi: int | None = None) -> int:
    """An int (not a bool) in [lo, hi] (hi None: unbounded); errors name the argument."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"`{name}` must be an integer {rng}, got {value!r}")
    return value


def check_odd_size(value: Any, name: str = "size") -> int:
    """A positive odd window size (the window must have a centre pixel)."""
    check_int_range(value, name, 1)
    if value % 2 == 0:
        raise ValueError(f"`{name}` must be odd (the window needs a centre pixel), got {value!r}")
    return value


# ------------------------------------------------------------------------------ gradients
def zero_grad_output(out: Tensor, x: Tensor) -> Tensor:
    """`out` (computed without autograd) connected to `x` with a zero derivative.

    A non-differentiable component (a codec, a solver, a table look-up) gives an attacker who
    differentiates through it exactly zero gradient; returning a detached tensor would make
    `torch.autograd.grad` raise instead, which hides the masking rather than showing it.
    """
    out = out.detach()
    if x.requires_grad:
        out = out + 0.0 * x.sum()
    return out


# ------------------------------------------------------------------------------ randomness
class RandomizedTransform(Transform):
    """A transform that samples randomness; reproducible under ``seed`` or an explicit generator.

    Args:
        seed: seed of a generator owned by the transform (None: no own generator).
        generator: a `torch.Generator` to draw from (exclusive with `seed`). Draws happen on the
            generator's device and are moved to the input's device.

    With neither, draws use torch's global RNG.
    """

    randomized = True

    def __init__(self, seed: int | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if seed is not None and generator is not None:
            raise ValueError("give either `seed` or `generator`, not both")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"`seed` must be an int or None, got {seed!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be a torch.Generator or None, got {type(generator).__name__}")
        self.seed = seed
        self.generator = generator
        if seed is not None:
            self.generator = torch.Generator().manual_seed(seed)

    def manual_seed(self, seed: int) -> "RandomizedTransform":
        """Restart the transform's own random sequence from `seed` (returns self)."""
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"`seed` must be an int, got {seed!r}")
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        return self

    # draws on the generator's device (CPU for an own generator), then moved to `device`
    def _device(self, device: torch.device) -> torch.device:
        return self.generator.device if self.generator is not None else device

    def rand(self, *shape: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
        d = torch.device(device)
        return torch.rand(shape, generator=self.generator, device=self._device(d), dtype=dtype).to(d)

    def randn(self, *shape: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
        d = torch.device(device)
        return torch.randn(shape, generator=self.generator, device=self._device(d), dtype=dtype).to(d)

    def randint(self, low: int, high: int, *shape: int, device: torch.device | str = "cpu") -> Tensor:
        d = torch.device(device)
        return torch.randint(low, high, shape, generator=self.generator, device=self._device(d)).to(d)

    def uniform(self, lo: float, hi: float, *shape: int, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> Tensor:
        return lo + (hi - lo) * self.rand(*shape, device=device, dtype=dtype)

    def perm(self, n: int) -> list[int]:
        """A random permutation of range(n), as a Python list."""
        return torch.randperm(n, generator=self.generator, device=self._device(torch.device("cpu"))).tolist()

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed}


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
