"""Total variation minimization (Guo et al. 2018), solved vectorized in torch.

Guo et al. drop pixels at random and reconstruct the "simplest" image consistent with the
pixels that were kept:

    X ~ Bernoulli(keep_prob) per pixel,   z* = argmin_z  ½ ‖X ⊙ (z − x)‖²  +  λ · TV(z)

Bastion solves this convex problem for the whole batch at once with the first-order
primal-dual algorithm of Chambolle & Pock 2011 ("A first-order primal-dual algorithm for
convex problems with applications to imaging", J. Math. Imaging Vis. 40), where

* TV is the isotropic total variation Σ_pixels ‖∇z‖₂ per channel (forward differences,
  Neumann boundary) — the Rudin-Osher-Fatemi form. Guo et al. (and ART's `TotalVarMin`) use a
  row/column-wise p-norm variant solved per image with scipy's L-BFGS; the isotropic form
  has the same purpose, an exact and fast solver, and is the one skimage's
  ``denoise_tv_chambolle`` minimizes (with X ≡ 1 the two agree; the tests check it);
* the data term's proximal map is closed-form: ``(v + τ·X·x) / (1 + τ·X)``;
* the dual update projects each pixel's dual vector onto the ball of radius λ;
* dropped pixels start from a normalized-convolution fill of their kept neighbours (not from
  their own values, which would leak the dropped pixels into the reconstruction).

A fixed number of iterations (default 200, step sizes τ = σ = 0.99/√8) is a deterministic
function of the input and the mask, so it vectorizes and runs on any device.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._checks import check_in_range, check_positive
from .base import RandomizedTransform, check_int_range, register_transform, zero_grad_output

__all__ = ["TotalVarMin", "tv_reconstruct", "total_variation"]


def _grad(z: Tensor) -> tuple[Tensor, Tensor]:
    """Forward differences with a zero last column/row (Neumann boundary)."""
    gx = F.pad(z[..., :, 1:] - z[..., :, :-1], (0, 1))
    gy = F.pad(z[..., 1:, :] - z[..., :-1, :], (0, 0, 0, 1))
    return gx, gy


def _div(px: Tensor, py: Tensor) -> Tensor:
    """The negative adjoint of `_grad` (div = −∇ᵀ), for duals whose last column/row is zero.

    ``div_x[j] = p[j] − p[j−1]`` with p[−1] = 0; at the last column p[W−1] = 0 gives −p[W−2],
    the Neumann boundary. `tv_reconstruct` keeps the duals' last column/row at zero (the
    gradient is zero there and the projection preserves it).
    """
    return (px - F.pad(px[..., :, :-1], (1, 0))) + (py - F.pad(py[..., :-1, :], (0, 0, 1, 0)))


def total_variation(x: Tensor) -> Tensor:
    """Isotropic total variation per image (N,): Σ over channels and pixels of ‖∇x‖₂."""
    gx, gy = _grad(x)
    return torch.sqrt(gx**2 + gy**2).flatten(1).sum(dim=1)


def _fill(x: Tensor, mask: Tensor) -> Tensor:
    """Dropped pixels replaced by the mean of their kept 3×3 neighbours (else the kept mean)."""
    c = x.shape[1]
    ones = torch.ones(c, 1, 3, 3, device=x.device, dtype=x.dtype)
    num = F.conv2d(x * mask, ones, padding=1, groups=c)
    den = F.conv2d(mask.expand_as(x).contiguous(), ones, padding=1, groups=c)
    kept_mean = (x * mask).flatten(2).sum(-1) / mask.expand_as(x).flatten(2).sum(-1).clamp_min(1)
    local = torch.where(den > 0, num / den.clamp_min(1e-12), kept_mean[..., None, None])
    return torch.where(mask > 0, x, local)


def tv_reconstruct(x: Tensor, mask: Tensor, weight: float, iterations: int = 200) -> Tensor:
    """``argmin_z ½‖mask ⊙ (z − x)‖² + weight · TV(z)`` for a batch, by Chambolle-Pock.

    Args:
        x: images N×C×H×W.
        mask: 0/1 weights broadcastable to x (N×1×H×W or N×C×H×W); 1 = pixel kept.
        weight: λ > 0.
        iterations: primal-dual iterations.
    """
    mask = mask.to(x.dtype)
    if x.shape[-1] < 2 or x.shape[-2] < 2:
        return x.clone()
    tau = sigma = 0.99 / math.sqrt(8.0)
    z = _fill(x, mask)
    z_bar = z
    px = torch.zeros_like(x)
    py = torch.zeros_like(x)
    tx = tau * mask * x
    denom = 1.0 + tau * mask
    for _ in range(iterations):
        gx, gy = _grad(z_bar)
        px = px + sigma * gx
        py = py + sigma * gy
        scale = (torch.sqrt(px * px + py * py) / weight).clamp_min_(1.0)
        px, py = px / scale, py / scale
        z_new = (z + tau * _div(px, py) + tx) / denom
        z_bar = 2.0 * z_new - z
        z = z_new
    return z


@register_transform("tvm")
class TotalVarMin(RandomizedTransform):
    """Total variation minimization on a random subset of pixels.

    Guo, Rana, Cissé & van der Maaten 2018, "Countering Adversarial Images using Input
    Transformations", ICLR 2018, arXiv:1711.00117. Broken with BPDA (identity) + EOT by
    Athalye, Carlini & Wagner 2018 (arXiv:1802.00420).

    Each pixel is kept with probability `keep_prob` (one Bernoulli draw per pixel, shared by
    its channels, unless ``per_channel``), then the image is reconstructed by
    ``argmin_z ½‖X ⊙ (z − x)‖² + weight · TV(z)`` (isotropic TV, Chambolle-Pock; see the
    module docstring for how this differs from the paper's solver). Output clipped to [0, 1].

    Declarations: randomized (the dropout mask; attack with EOT), except with ``keep_prob=1``
    (every pixel kept: the instance declares ``randomized = False``); not differentiable (the
    iterative solver is treated as a black box: autograd gives zero); `bpda` = identity.

    Args:
        keep_prob: probability that a pixel is kept, in (0, 1]. Default 0.5 (Guo et al.'s
            pixel-dropout rate).
        weight: TV weight λ > 0. Default 0.03 (Guo et al.'s TV weight).
        iterations: solver iterations >= 1. Default 200.
        per_channel: draw the dropout mask per channel instead of per pixel. Default False.
        seed / generator: see `RandomizedTransform`.
    """

    differentiable = False
    randomized = True

    def __init__(self, keep_prob: float = 0.5, weight: float = 0.03, iterations: int = 200, per_channel: bool = False,
                 seed: int | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__(seed, generator)
        check_in_range(keep_prob, "keep_prob", 0.0, 1.0)
        if keep_prob == 0:
            raise ValueError("`keep_prob` must be > 0 (with 0 every pixel is dropped)")
        check_positive(weight, "weight")
        if not isinstance(per_channel, bool):
            raise TypeError(f"`per_channel` must be a bool, got {per_channel!r}")
        self.keep_prob = float(keep_prob)
        self.weight = float(weight)
        self.iterations = check_int_range(iterations, "iterations", 1)
        self.per_channel = per_channel
        # keep_prob = 1 keeps every pixel: the mask, the only random draw, is constant
        self.randomized = self.keep_prob < 1.0

    def transform(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        mask = self.rand(n, c if self.per_channel else 1, h, w, device=x.device, dtype=x.dtype) < self.keep_prob
        with torch.no_grad():
            out = tv_reconstruct(x.detach(), mask, self.weight, self.iterations).clamp(0.0, 1.0)
        return zero_grad_output(out, x)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "keep_prob": self.keep_prob, "weight": self.weight,
                "iterations": self.iterations, "per_channel": self.per_channel, "seed": self.seed}
