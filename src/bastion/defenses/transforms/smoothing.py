"""Spatial smoothing: the median filter of feature squeezing, and a Gaussian blur.

Both pad the image by symmetric ("half-sample") reflection, ``d c b a | a b c d | d c b a``
— scipy.ndimage's ``mode="reflect"`` (numpy's ``"symmetric"``; torch's own ``"reflect"`` pad
is the other convention, ``c b | a b c``) — built from an index gather, so any window size
works, even one larger than the image.

The functional forms (`median_filter`, `gaussian_blur`, `box_blur`) accept a per-image
parameter where it makes sense, so randomized pipelines (BaRT) stay vectorized.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._checks import check_positive
from .base import Transform, check_odd_size, register_transform, zero_grad_output

__all__ = ["GaussianBlur", "MedianFilter", "box_blur", "gaussian_blur", "median_filter", "symmetric_pad"]

# Cap on the elements of one unfolded median batch (N·C·H·W·k²), to bound memory.
_MEDIAN_CHUNK_ELEMENTS = 2**25


def _reflect_index(n: int, pad: int, device: torch.device) -> Tensor:
    """Indices of a length-n axis padded by `pad` on both sides with symmetric reflection."""
    i = torch.arange(-pad, n + pad, device=device)
    i = torch.remainder(i, 2 * n)
    return torch.where(i < n, i, 2 * n - 1 - i)


def symmetric_pad(x: Tensor, pad: int) -> Tensor:
    """Pad the last two axes by `pad` on every side, scipy ``mode="reflect"`` (differentiable)."""
    if pad == 0:
        return x
    h, w = x.shape[-2:]
    x = x.index_select(-2, _reflect_index(h, pad, x.device))
    return x.index_select(-1, _reflect_index(w, pad, x.device))


def median_filter(x: Tensor, size: int) -> Tensor:
    """Per-channel k×k median with symmetric padding; equals scipy.ndimage.median_filter(mode="reflect").

    Vectorized with `unfold` (chunked over the batch to bound memory). Not differentiable in
    any useful sense; callers that need the declaration use `MedianFilter`.
    """
    check_odd_size(size, "size")
    if size == 1 or x.numel() == 0:
        return x.clone()
    n, c, h, w = x.shape
    per_image = c * h * w * size * size
    step = max(1, _MEDIAN_CHUNK_ELEMENTS // per_image)
    outs = []
    for i in range(0, n, step):
        p = symmetric_pad(x[i:i + step], size // 2)
        win = p.unfold(2, size, 1).unfold(3, size, 1)  # n×C×H×W×k×k
        outs.append(win.reshape(*win.shape[:4], size * size).median(dim=-1).values)
    return torch.cat(outs)


def _per_image(value: float | Tensor, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    v = torch.as_tensor(value, device=device, dtype=dtype)
    return v.expand(n) if v.dim() == 0 else v.reshape(n)


def _separable(x: Tensor, kernels: Tensor) -> Tensor:
    """Filter each image with its own symmetric 1-D kernel along both axes (kernels: N×k)."""
    n, c, h, w = x.shape
    k = kernels.shape[1]
    p = symmetric_pad(x, k // 2).reshape(1, n * c, h + k - 1, w + k - 1)
    wts = kernels.repeat_interleave(c, dim=0)  # (N·C)×k, one kernel per channel of each image
    p = F.conv2d(p, wts.reshape(n * c, 1, k, 1), groups=n * c)
    p = F.conv2d(p, wts.reshape(n * c, 1, 1, k), groups=n * c)
    return p.reshape(n, c, h, w)


def gaussian_blur(x: Tensor, sigma: float | Tensor, size: int | None = None) -> Tensor:
    """Gaussian smoothing (separable, symmetric padding); `sigma` scalar or one per image.

    `size` (odd) defaults to ``2·ceil(3·max sigma) + 1``. Differentiable in `x`.
    """
    n = x.shape[0]
    if n == 0:
        return x.clone()
    s = _per_image(sigma, n, x.device, x.dtype)
    if size is None:
        size = 2 * math.ceil(3 * float(s.max())) + 1
    check_odd_size(size, "size")
    r = torch.arange(size, device=x.device, dtype=x.dtype) - size // 2
    ker = torch.exp(-0.5 * (r.unsqueeze(0) / s.unsqueeze(1)) ** 2)
    return _separable(x, ker / ker.sum(dim=1, keepdim=True))


def box_blur(x: Tensor, size: int) -> Tensor:
    """Mean over k×k windows (symmetric padding); differentiable."""
    check_odd_size(size, "size")
    ker = torch.full((x.shape[0], size), 1.0 / size, device=x.device, dtype=x.dtype)
    return _separable(x, ker) if x.shape[0] else x.clone()


@register_transform("median")
class MedianFilter(Transform):
    """Median smoothing over k×k windows, per channel, symmetric ("reflect") padding.

    The spatial-smoothing squeezer of Xu, Evans & Qi 2018, "Feature Squeezing: Detecting
    Adversarial Examples in Deep Neural Networks", NDSS 2018, arXiv:1704.01155. (The paper
    also uses even windows such as 2×2; Bastion accepts odd sizes only, so the window has a
    centre pixel and matches scipy.ndimage.median_filter exactly.)

    Declarations: not differentiable — the median's derivative exists almost everywhere but
    is a sparse selection that a gradient attack cannot use well, and real deployments compute
    it outside autograd; `forward` therefore exposes a zero derivative and `bpda` = identity
    (Athalye et al. 2018, arXiv:1802.00420). Not randomized.

    Args:
        size: odd window size >= 1. Default 3.
    """

    differentiable = False
    randomized = False

    def __init__(self, size: int = 3) -> None:
        super().__init__()
        self.size = check_odd_size(size, "size")

    def transform(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            out = median_filter(x, self.size)
        return zero_grad_output(out, x)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size}


@register_transform("gaussian-blur")
class GaussianBlur(Transform):
    """Gaussian smoothing with standard deviation `sigma` (pixels), symmetric padding.

    A classical denoising pre-processor (e.g. one of the denoisers of BaRT, Raff et al. 2019,
    arXiv:1903.09799; the smoothing baselines of Xu et al. 2018, arXiv:1704.01155).

    Declarations: differentiable (a linear filter), not randomized.

    Args:
        sigma: > 0, in pixels. Default 1.0.
        size: odd kernel size, or None for ``2·ceil(3·sigma) + 1``.
    """

    differentiable = True
    randomized = False

    def __init__(self, sigma: float = 1.0, size: int | None = None) -> None:
        super().__init__()
        check_positive(sigma, "sigma")
        self.sigma = float(sigma)
        self.size = 2 * math.ceil(3 * self.sigma) + 1 if size is None else check_odd_size(size, "size")

    def transform(self, x: Tensor) -> Tensor:
        return gaussian_blur(x, self.sigma, self.size).clamp(0.0, 1.0)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "sigma": self.sigma, "size": self.size}
