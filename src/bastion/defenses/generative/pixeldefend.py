"""PixelDefend purification: move each pixel, within ±eps_defend, to its most likely value.

PixelDefend — Song, Kim, Nowozin, Ermon & Kushman 2018, "PixelDefend: Leveraging Generative
Models to Understand and Defend against Adversarial Examples" (ICLR 2018, arXiv 1710.10766).

Algorithm 1 of the paper, for an image X and a PixelCNN p trained on clean data::

    X' <- X
    for each row i, column j, channel k (raster order):
        R <- [X[i,j,k] - eps_defend, X[i,j,k] + eps_defend]      # around the *input* value
        X'[i,j,k] <- argmax_{z in R} p(z | X'[pixels before (i,j)], X'[i,j,<k])

so the output stays within eps_defend of the input in L∞ while climbing the model's
likelihood, one sub-pixel at a time (H·W·C evaluations of the PixelCNN, each vectorized over
the batch). `sample=True` draws z from the model restricted to R instead of taking the argmax
(a randomized variant; the paper's method is the greedy one).

Values are the PixelCNN's quantization levels ``k / (levels - 1)``; a sub-pixel whose window
holds no level (possible only with coarse `levels` and a small eps_defend) is left unchanged.

PixelDefend was broken by BPDA with the identity as the backward pass (Athalye, Carlini &
Wagner 2018): the purifier is not differentiable in any useful sense, but its output is close to
its input.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._checks import check_images, check_in_range
from ._common import model_dtype
from .pixelcnn import PixelCNN

__all__ = ["pixeldefend"]

# |level - x| is compared with eps_defend up to float32 rounding of levels like k/255
_TOL = 1e-6


@torch.no_grad()
def pixeldefend(model: PixelCNN, x: Tensor, eps_defend: float, *, sample: bool = False,
                generator: torch.Generator | None = None) -> Tensor:
    """Purify `x` (N×C×H×W in [0, 1]) with PixelCNN `model`; the result is within `eps_defend` of `x`.

    Args:
        model: a trained `PixelCNN` with ``model.channels == C``.
        x: images in [0, 1].
        eps_defend: the L∞ budget of the purifier, in pixel units (the paper's 16 on the 0–255
            scale is ``16/255``).
        sample: draw each value from the model's conditional restricted to the window instead
            of taking the most likely one.
        generator: a CPU `torch.Generator` for the draws of ``sample=True`` (global RNG if None);
            draws are made on the CPU and moved to ``x.device``, so a seed gives the same
            purification on every device.

    Returns:
        The purified images, same shape, device and dtype as `x`.
    """
    check_images(x, "x")
    check_in_range(eps_defend, "eps_defend", 0.0, 1.0)
    if x.shape[1] != model.channels:
        raise ValueError(f"`x` has {x.shape[1]} channel(s) but the PixelCNN models {model.channels}")
    n, c, h, w = x.shape
    if n == 0:
        return x.clone()
    dtype = model_dtype(model)
    src = x.detach().to(dtype)
    out = src.clone()
    levels = model.values.to(device=x.device, dtype=dtype)  # (L,)
    top = model.levels - 1
    for i in range(h):
        for j in range(w):
            for k in range(c):
                logits = model.logits_at(out, i, j)[:, :, k].float()  # N×L
                xi = src[:, k, i, j]
                allowed = (levels[None, :] - xi[:, None]).abs() <= eps_defend + _TOL  # N×L
                logits = logits.masked_fill(~allowed, float("-inf"))
                if sample:
                    # inverse-CDF draw from the renormalized window (no NaN: each row with an
                    # allowed level has a finite logit; rows without one are discarded below)
                    p = torch.softmax(logits.nan_to_num(neginf=-1e30), dim=1) * allowed
                    cdf = p.cumsum(1) / p.sum(1, keepdim=True).clamp_min(1e-30)
                    u = torch.rand(n, 1, generator=generator).to(cdf.device)
                    idx = (cdf < u).sum(1)
                    # keep float rounding at either end of the cdf from leaving the window
                    first = allowed.float().argmax(1)
                    last = top - allowed.flip(1).float().argmax(1)
                    idx = torch.minimum(torch.maximum(idx, first), last)
                else:
                    idx = logits.argmax(1)
                out[:, k, i, j] = torch.where(allowed.any(1), levels[idx], xi)
    # exact budget (levels within float rounding of the window edge are pulled onto it) and box
    out = torch.minimum(torch.maximum(out, src - eps_defend), src + eps_defend).clamp_(0.0, 1.0)
    return out.to(x.dtype)
