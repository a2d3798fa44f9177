"""A small PixelCNN: the density model behind PixelDefend.

PixelCNN — van den Oord, Kalchbrenner & Kavukcuoglu 2016, "Pixel Recurrent Neural Networks"
(arXiv 1601.06759). The image is modelled autoregressively in raster order, channels in order
(R, then G given R, then B given R and G)::

    p(x) = prod_i prod_c p(x_{i,c} | x_{<i}, x_{i,<c})

with a categorical distribution over `levels` quantized values per pixel and channel. Causality
comes from masked convolutions: the first layer (mask "A") sees only pixels strictly before the
current one (and, at the current pixel, only earlier channels); every later layer (mask "B")
additionally sees its own position. Hidden feature maps are split into one contiguous group per
image channel so that channel ordering is preserved through the network.

This is the plain PixelCNN of the paper (a 7×7 mask-A convolution, residual blocks of
1×1 → 3×3 mask-B → 1×1 convolutions, two 1×1 output layers), small enough to train on two CPU
cores. Like every plain PixelCNN it has a "blind spot" (a few pixels above-right of the current
one are outside the receptive field), which the gated PixelCNN (van den Oord et al. 2016b)
removes; on 8×8 and 28×28 grey-scale digits this matters little.

`levels` may be smaller than 256 for speed (e.g. 16): pixel values are quantized to
``k / (levels - 1)``. The negative log-likelihood is then in bits per sub-pixel *of that
quantization* and is not comparable with 256-level numbers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..._checks import check_images
from ._common import (Timer, as_images, batches, check_int, check_training_args, describe_data, load_generative,
                      progress_bar, register_kind, save_generative, seeded)

__all__ = ["MaskedConv2d", "PixelCNN", "train_pixelcnn", "load_pixelcnn", "causal_mask"]


def causal_mask(out_channels: int, in_channels: int, kernel_size: int, mask_type: str,
                image_channels: int) -> Tensor:
    """The 0/1 weight mask (out, in, k, k) of a masked convolution.

    Rows above the centre and pixels left of the centre in the centre row are visible. At the
    centre, an output feature of channel group g sees input features of groups < g (mask "A")
    or <= g (mask "B"); groups are contiguous blocks, feature ``i`` of ``n`` belongs to group
    ``i * image_channels // n``.
    """
    if mask_type not in ("A", "B"):
        raise ValueError(f"`mask_type` must be 'A' or 'B', got {mask_type!r}")
    if kernel_size % 2 != 1:
        raise ValueError(f"`kernel_size` of a masked convolution must be odd, got {kernel_size}")
    k, c = kernel_size, kernel_size // 2
    mask = torch.zeros(out_channels, in_channels, k, k)
    mask[:, :, :c, :] = 1.0  # rows above
    mask[:, :, c, :c] = 1.0  # left of the centre
    g_out = torch.arange(out_channels) * image_channels // out_channels
    g_in = torch.arange(in_channels) * image_channels // in_channels
    centre = (g_in[None, :] < g_out[:, None]) if mask_type == "A" else (g_in[None, :] <= g_out[:, None])
    mask[:, :, c, c] = centre.float()
    return mask


class MaskedConv2d(nn.Conv2d):
    """A same-padded convolution whose kernel is multiplied by a causal mask (see `causal_mask`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, mask_type: str,
                 image_channels: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.mask_type = mask_type
        # derived from the configuration, so it is not saved with the weights
        self.register_buffer("mask", causal_mask(out_channels, in_channels, kernel_size, mask_type, image_channels),
                             persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mask={self.mask_type}"


class _ResidualBlock(nn.Module):
    """ReLU → 1×1 (h → h/2) → ReLU → 3×3 mask B → ReLU → 1×1 (h/2 → h), plus the input."""

    def __init__(self, hidden: int, image_channels: int) -> None:
        super().__init__()
        half = max(hidden // 2, image_channels)
        self.net = nn.Sequential(
            nn.ReLU(), MaskedConv2d(hidden, half, 1, "B", image_channels),
            nn.ReLU(), MaskedConv2d(half, half, 3, "B", image_channels),
            nn.ReLU(), MaskedConv2d(half, hidden, 1, "B", image_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


@register_kind("pixelcnn")
class PixelCNN(nn.Module):
    """A PixelCNN over images in [0, 1] with a `levels`-way softmax per pixel and channel.

    Args:
        channels: image channels (1 for grey-scale, 3 for RGB).
        levels: quantization levels per channel (256 is the paper; fewer, e.g. 16, is faster and
            coarser; values are ``k / (levels - 1)``).
        hidden: feature maps per layer (at least `channels`).
        blocks: residual blocks after the first 7×7 mask-A layer.
        first_kernel: kernel size of the mask-A layer (odd).

    `forward(x)` returns logits of shape N×levels×C×H×W: ``logits[:, :, c, i, j]`` is the
    conditional distribution of ``x[:, c, i, j]`` given the pixels before (i, j) in raster
    order and the channels before c at (i, j). The network never looks at the values it
    predicts, so any values may stand in for them.
    """

    kind = "pixelcnn"

    def __init__(self, channels: int = 1, levels: int = 256, hidden: int = 64, blocks: int = 5,
                 first_kernel: int = 7) -> None:
        super().__init__()
        check_int(channels, "channels")
        check_int(levels, "levels", 2)
        check_int(hidden, "hidden", channels)
        check_int(blocks, "blocks", 0)
        check_int(first_kernel, "first_kernel")
        if first_kernel % 2 != 1:
            raise ValueError(f"`first_kernel` must be odd, got {first_kernel}")
        self.channels, self.levels, self.hidden, self.blocks, self.first_kernel = (
            channels, levels, hidden, blocks, first_kernel)
        c = channels
        self.inp = MaskedConv2d(c, hidden, first_kernel, "A", c)
        self.res = nn.Sequential(*[_ResidualBlock(hidden, c) for _ in range(blocks)])
        self.out = nn.Sequential(nn.ReLU(), MaskedConv2d(hidden, hidden, 1, "B", c),
                                 nn.ReLU(), MaskedConv2d(hidden, c * levels, 1, "B", c))
        self.register_buffer("values", torch.linspace(0.0, 1.0, levels), persistent=False)

    # -- configuration --------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"channels": self.channels, "levels": self.levels, "hidden": self.hidden,
                "blocks": self.blocks, "first_kernel": self.first_kernel}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "PixelCNN":
        return cls(**cfg)

    @property
    def reach(self) -> int:
        """How far (in pixels, up/left/right) the receptive field of one output extends.

        The output at (i, j) depends only on inputs in rows ``i - reach .. i`` and columns
        ``j - reach .. j + reach``, so it can be computed exactly on that crop.
        """
        return self.first_kernel // 2 + self.blocks

    # -- quantization ---------------------------------------------------------------------
    def quantize(self, x: Tensor) -> Tensor:
        """Level indices (int64, same shape) of images in [0, 1]: ``round(x * (levels - 1))``."""
        return torch.round(x * (self.levels - 1)).long().clamp_(0, self.levels - 1)

    def dequantize(self, idx: Tensor) -> Tensor:
        return idx.to(self.values.dtype) / (self.levels - 1)

    # -- model ----------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        if c != self.channels:
            raise ValueError(f"`x` has {c} channel(s); this PixelCNN models {self.channels}")
        feats = self.res(self.inp(x * 2.0 - 1.0))
        logits = self.out(feats)  # N×(C·L)×H×W, channel-major (group c = block c of L)
        return logits.view(n, c, self.levels, h, w).transpose(1, 2)

    def logits_at(self, x: Tensor, i: int, j: int) -> Tensor:
        """The logits (N×levels×C) of pixel (i, j), computed on the smallest exact crop of `x`."""
        r = self.reach
        h, w = x.shape[-2:]
        r0, c0, c1 = max(0, i - r), max(0, j - r), min(w, j + r + 1)
        crop = x[:, :, r0:i + 1, c0:c1]
        return self(crop)[:, :, :, i - r0, j - c0]

    def nll(self, x: Tensor) -> Tensor:
        """Per-image negative log-likelihood of the quantized images, in bits per sub-pixel (N,)."""
        check_images(x, "x")
        target = self.quantize(x)
        logits = self(self.dequantize(target))
        ce = F.cross_entropy(logits, target, reduction="none")  # N×C×H×W nats
        return ce.flatten(1).mean(1) / math.log(2.0)

    @torch.no_grad()
    def sample(self, n: int, size: tuple[int, int], generator: torch.Generator | None = None) -> Tensor:
        """Draw `n` images of `size` (H, W) pixel by pixel (slow: H·W·C network evaluations)."""
        check_int(n, "n")
        device = self.values.device
        x = torch.zeros(n, self.channels, *size, device=device)
        for i in range(size[0]):
            for j in range(size[1]):
                for c in range(self.channels):
                    p = self.logits_at(x, i, j)[:, :, c].float().softmax(1)
                    u = torch.rand(n, 1, generator=generator).to(device)
                    idx = (p.cumsum(1) < u).sum(1).clamp_(max=self.levels - 1)
                    x[:, c, i, j] = self.values[idx]
        return x


def train_pixelcnn(data: Any, epochs: int = 10, *, levels: int = 256, hidden: int = 64, blocks: int = 5,
                   first_kernel: int = 7, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                   device: str | torch.device = "cpu", progress: bool = True, save_to: str | Path | None = None,
                   max_examples: int | None = None) -> PixelCNN:
    """Train a PixelCNN by maximum likelihood (cross-entropy of the quantized pixels).

    Args:
        data: a `Dataset`, a dataset name (its train split is used) or an N×C×H×W tensor in [0, 1].
        epochs: passes over the data.
        levels, hidden, blocks, first_kernel: the architecture (see `PixelCNN`).
        batch_size, lr: Adam with this learning rate, cosine-annealed to zero.
        seed: makes initialization and data order reproducible (the global RNG is left untouched).
        device: where to train.
        progress: show a progress bar with the running loss (bits per sub-pixel).
        save_to: if given, the checkpoint stem to save to (``.safetensors`` + ``.json``).
        max_examples: use only the first this-many images.

    Returns:
        The trained `PixelCNN` in eval mode; ``model.training_info`` holds the per-epoch losses.

    Example:
        >>> pcnn = train_pixelcnn("mnist-5k", epochs=3, levels=16, save_to="runs/gen/pixelcnn")
        >>> pcnn.nll(x_test).mean()   # bits per sub-pixel
    """
    check_training_args(epochs, batch_size, lr)
    x = as_images(data)
    if max_examples is not None:
        x = x[:check_int(max_examples, "max_examples")]
    device = torch.device(device)
    with seeded(seed):
        model = PixelCNN(x.shape[1], levels, hidden, blocks, first_kernel)
    model.to(device).train()
    target_all = model.quantize(x)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / max(steps, 1), 1))))
    g = torch.Generator().manual_seed(seed)
    history: list[float] = []
    timer = Timer()
    with progress_bar(steps, "pixelcnn", progress) as bar:
        for epoch in range(epochs):
            total, count = 0.0, 0
            for idx in batches(len(x), batch_size, g):
                target = target_all[idx].to(device)
                logits = model(model.dequantize(target))
                loss = F.cross_entropy(logits, target) / math.log(2.0)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
                count += len(idx)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, bits=f"{loss.item():.3f}")
            history.append(total / count)
    model.eval()
    info = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "examples": len(x),
            "train_bits_per_dim": history, "seconds": timer(), "data": describe_data(data)}
    model.training_info = info  # type: ignore[assignment]
    if save_to is not None:
        save_generative(save_to, model, info)
    return model


def load_pixelcnn(path: str | Path, map_location: str | torch.device = "cpu") -> PixelCNN:
    """Load a PixelCNN saved by `train_pixelcnn` / `save_generative`."""
    return load_generative(path, "pixelcnn", map_location)  # type: ignore[return-value]

