"""Random resizing and padding (Xie et al. 2018), vectorized with one `grid_sample` per batch."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._checks import check_choice
from .base import RandomizedTransform, check_int_range, register_transform

__all__ = ["RandomResizePad"]


@register_transform("random-resize-pad")
class RandomResizePad(RandomizedTransform):
    """Resize to a random size, zero-pad at a random offset to a fixed larger canvas.

    Xie, Wang, Zhang, Ren & Yuille 2018, "Mitigating Adversarial Effects Through
    Randomization", ICLR 2018, arXiv:1711.01991 (ImageNet: 299 → a random side in [299, 331),
    zero-padded at a random position to 331×331, ratio ≈ 1.107). Broken with EOT by Athalye,
    Carlini & Wagner 2018 (arXiv:1802.00420).

    Per image: a side ``s_h`` uniform in the integers [H, P_h] (the width follows the aspect
    ratio, ``s_w = round(W·s_h/H)``), an offset uniform in [0, P − s] on each axis, and a
    zero canvas P_h×P_w with ``P = round(side · ratio)``.

    Output size — the model expects its own input size, so by default (``output="input"``)
    the canvas is resized back to H×W: the image ends up shrunk by s/P ∈ [1/ratio, 1] at a
    random position inside a zero border — the same distribution of content the paper's model
    sees, at the model's resolution. ``output="canvas"`` returns the P_h×P_w canvas as the
    paper does (the model must then accept that size). The whole chain (resize, pad, resize
    back) is computed as a single resampling of the input (`grid_sample`, zero padding), not
    as two successive interpolations.

    Declarations: differentiable (bilinear or nearest resampling is linear in the input),
    randomized (attack with EOT), except with ``ratio=1`` (the instance declares
    ``randomized = False``); `bpda` not needed.

    Args:
        ratio: canvas side / image side, >= 1. Default 331/299 (the paper's).
        output: ``"input"`` (default, shape preserved) or ``"canvas"``.
        mode: ``"bilinear"`` (default) or ``"nearest"`` (the paper's implementation uses
            nearest-neighbour resizing).
        seed / generator: see `RandomizedTransform`.
    """

    differentiable = True
    randomized = True

    def __init__(self, ratio: float = 331 / 299, output: str = "input", mode: str = "bilinear",
                 seed: int | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__(seed, generator)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 1.0 <= ratio <= 10.0:
            raise ValueError(f"`ratio` must be a number in [1, 10] (canvas side / image side), got {ratio!r}")
        self.ratio = float(ratio)
        self.output = check_choice(output, "output", ("input", "canvas"))
        self.mode = check_choice(mode, "mode", ("bilinear", "nearest"))
        # ratio 1: the canvas is the image, the size and offsets are constant (nothing random)
        self.randomized = self.ratio > 1.0

    def transform(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        ph, pw = round(h * self.ratio), round(w * self.ratio)
        check_int_range(ph, "canvas height", h)
        dev, dt = x.device, x.dtype
        # per-image random side in [h, ph] and offsets in [0, P − s]
        sh = (h + torch.floor(self.rand(n, device=dev, dtype=torch.float64) * (ph - h + 1))).clamp(max=ph)
        sw = torch.round(sh * w / h).clamp(max=pw)
        a = torch.floor(self.rand(n, device=dev, dtype=torch.float64) * (ph - sh + 1))
        b = torch.floor(self.rand(n, device=dev, dtype=torch.float64) * (pw - sw + 1))
        oh, ow = (h, w) if self.output == "input" else (ph, pw)
        # output pixel centre -> canvas coordinate -> normalized input coordinate (align_corners=False):
        # u = (i + ½)·P/O − ½;  g = 2(u − a + ½)/s − 1
        i = torch.arange(oh, device=dev, dtype=torch.float64)
        j = torch.arange(ow, device=dev, dtype=torch.float64)
        u = (i + 0.5) * ph / oh - 0.5
        v = (j + 0.5) * pw / ow - 0.5
        gy = 2 * (u[None, :] - a[:, None] + 0.5) / sh[:, None] - 1  # N×O_h
        gx = 2 * (v[None, :] - b[:, None] + 0.5) / sw[:, None] - 1  # N×O_w
        grid = torch.stack([gx[:, None, :].expand(n, oh, ow), gy[:, :, None].expand(n, oh, ow)], dim=-1)
        # the resized image covers canvas coordinates [a − ½, a + s − ½): zero outside, and no
        # blending of its edge pixels with the padding (as resizing first, then padding, gives)
        inside_y = (u[None, :] >= a[:, None] - 0.5) & (u[None, :] < (a + sh)[:, None] - 0.5)
        inside_x = (v[None, :] >= b[:, None] - 0.5) & (v[None, :] < (b + sw)[:, None] - 0.5)
        inside = (inside_y[:, :, None] & inside_x[:, None, :]).unsqueeze(1).to(dt)  # N×1×O_h×O_w
        out = F.grid_sample(x, grid.to(dt), mode=self.mode, padding_mode="border", align_corners=False)
        return (out * inside).clamp(0.0, 1.0)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "ratio": self.ratio, "output": self.output, "mode": self.mode, "seed": self.seed}
