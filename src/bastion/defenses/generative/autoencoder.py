"""MagNet's denoising autoencoder: the reformer (and the detectors' reconstruction error).

MagNet — Meng & Chen 2017, "MagNet: a Two-Pronged Defense against Adversarial Examples"
(CCS 2017, arXiv 1705.09064). The autoencoder is trained on clean images with Gaussian noise
added to the input (noise volume 0.1, clipped to [0, 1]) to reproduce the clean image, with the
mean squared error plus an L2 penalty (1e-9 in the paper).

The architecture is given by a `structure` list, as in the paper's tables: an int is a 3×3
convolution with that many filters and a sigmoid, ``"average"`` / ``"max"`` a 2×2 pooling. The
decoder mirrors the encoder (pooling becomes 2× upsampling) and a last 3×3 convolution with a
sigmoid maps back to the image channels, so outputs are images in (0, 1):

* ``[3, "average", 3]`` — MNIST reformer and detector I (the default);
* ``[3]`` — MNIST detector II;
* ``[3]`` with 3 channels — the paper's CIFAR-10 autoencoder.

Departures: the L2 penalty is on the weights (the authors' code regularizes activations; at
1e-9 either is negligible), and the training noise is drawn afresh for every batch (the
authors' code draws it once), a slightly stronger denoising objective.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..._checks import check_images, check_positive
from ._common import (Timer, as_images, batches, check_int, check_training_args, describe_data, load_generative,
                      progress_bar, register_kind, save_generative, seeded)

__all__ = ["DenoisingAutoencoder", "train_autoencoder", "load_autoencoder", "MNIST_STRUCTURE"]

MNIST_STRUCTURE: tuple[int | str, ...] = (3, "average", 3)
POOLS = ("average", "max")


def _check_structure(structure: Any) -> list[int | str]:
    if isinstance(structure, (str, bytes)) or not isinstance(structure, (list, tuple)) or not structure:
        raise ValueError(f"`structure` must be a non-empty list of filter counts and 'average'/'max', got {structure!r}")
    out: list[int | str] = []
    for item in structure:
        if isinstance(item, str) and item in POOLS:
            out.append(item)
        elif isinstance(item, int) and not isinstance(item, bool) and item > 0:
            out.append(item)
        else:
            raise ValueError(f"`structure` items must be positive ints (3×3 conv filters) or one of {POOLS}, "
                             f"got {item!r} in {structure!r}")
    if not any(isinstance(i, int) for i in out):
        raise ValueError(f"`structure` needs at least one convolution, got {structure!r}")
    return out


class _Pool(nn.Module):
    """2×2 pooling that, like Keras' padding='same', keeps the last row/column of odd sizes."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "average":
            return F.avg_pool2d(x, 2, ceil_mode=True, count_include_pad=False)
        return F.max_pool2d(x, 2, ceil_mode=True)


@register_kind("autoencoder")
class DenoisingAutoencoder(nn.Module):
    """MagNet's convolutional denoising autoencoder (sigmoid activations, same padding).

    Args:
        channels: image channels.
        structure: the encoder, e.g. ``[3, "average", 3]`` (see the module docstring).

    `forward(x)` reconstructs images of any H×W (fully convolutional); `reconstruction_error(x)`
    is the per-image score MagNet's detectors threshold.
    """

    kind = "autoencoder"

    def __init__(self, channels: int = 1, structure: Any = MNIST_STRUCTURE) -> None:
        super().__init__()
        self.channels = check_int(channels, "channels")
        self.structure = _check_structure(structure)
        layers: list[nn.Module] = []
        c = channels
        for item in self.structure:  # encoder
            if isinstance(item, int):
                layers += [nn.Conv2d(c, item, 3, padding=1), nn.Sigmoid()]
                c = item
            else:
                layers.append(_Pool(item))
        self.encoder = nn.Sequential(*layers)
        layers = []
        for item in reversed(self.structure):  # decoder: mirror, pooling -> upsampling
            if isinstance(item, int):
                layers += [nn.Conv2d(c, item, 3, padding=1), nn.Sigmoid()]
                c = item
            else:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        layers += [nn.Conv2d(c, channels, 3, padding=1), nn.Sigmoid()]
        self.decoder = nn.Sequential(*layers)

    def config(self) -> dict[str, Any]:
        return {"channels": self.channels, "structure": list(self.structure)}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "DenoisingAutoencoder":
        return cls(cfg["channels"], cfg["structure"])

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"`x` must be N×{self.channels}×H×W, got shape {tuple(x.shape)}")
        out = self.decoder(self.encoder(x))
        if out.shape[-2:] != x.shape[-2:]:  # odd sizes: pooling rounded up, crop back
            out = out[..., :x.shape[-2], :x.shape[-1]]
        return out

    def reconstruction_error(self, x: Tensor, p: float = 1.0) -> Tensor:
        """Per-image mean of ``|x - AE(x)|^p`` (N,): MagNet's detector score (p=1 for detector I, 2 for II).

        Differentiable in `x` (an adaptive attacker adds it to its loss).
        """
        check_images(x, "x")
        check_positive(p, "p")
        return (x - self(x)).abs().pow(p).flatten(1).mean(1)


def train_autoencoder(data: Any, epochs: int = 30, *, structure: Any = MNIST_STRUCTURE, noise: float = 0.1,
                      reg: float = 1e-9, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
                      device: str | torch.device = "cpu", progress: bool = True,
                      save_to: str | Path | None = None, max_examples: int | None = None) -> DenoisingAutoencoder:
    """Train MagNet's denoising autoencoder: MSE(AE(clip(x + noise·N(0, I))), x) + reg·||W||².

    Args:
        data: a `Dataset`, a dataset name (its train split) or an N×C×H×W tensor in [0, 1].
        epochs: passes over the data (the paper: 100 over MNIST's 60,000 images; 30 over
            mnist-5k's 4,000 reaches a reconstruction MSE below 0.01).
        structure: the encoder (see `DenoisingAutoencoder`).
        noise: standard deviation of the Gaussian input noise (the paper's "volume", 0.1).
        reg: L2 penalty on the weights (the paper: 1e-9).
        batch_size, lr: Adam (the paper: Keras' Adam, lr 1e-3, batch 256; smaller batches and a
            larger step make up for the smaller data sets Bastion trains on: the sigmoid layers
            learn slowly).
        seed: makes initialization, data order and noise reproducible (global RNG untouched).
        device: where to train.
        progress: progress bar with the running loss.
        save_to: if given, the checkpoint stem to save to.
        max_examples: use only the first this-many images.

    Returns:
        The trained `DenoisingAutoencoder` in eval mode (``training_info`` holds per-epoch MSE).
    """
    check_training_args(epochs, batch_size, lr)
    check_positive(noise, "noise", allow_zero=True)
    check_positive(reg, "reg", allow_zero=True)
    x = as_images(data)
    if max_examples is not None:
        x = x[:check_int(max_examples, "max_examples")]
    device = torch.device(device)
    with seeded(seed):
        model = DenoisingAutoencoder(x.shape[1], structure)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    history: list[float] = []
    steps = epochs * math.ceil(len(x) / batch_size)
    timer = Timer()
    with progress_bar(steps, "autoencoder", progress) as bar:
        for epoch in range(epochs):
            total, count = 0.0, 0
            for idx in batches(len(x), batch_size, g):
                clean = x[idx]
                noisy = (clean + noise * torch.randn(clean.shape, generator=g)).clamp_(0.0, 1.0)
                clean, noisy = clean.to(device), noisy.to(device)
                mse = F.mse_loss(model(noisy), clean)
                loss = mse + reg * sum(p.pow(2).sum() for p in model.parameters() if p.dim() > 1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += mse.item() * len(idx)
                count += len(idx)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, mse=f"{mse.item():.5f}")
            history.append(round(total / count, 6))
    model.eval()
    info = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "noise": noise, "reg": reg, "seed": seed,
            "examples": len(x), "train_mse": history, "seconds": timer(), "data": describe_data(data)}
    model.training_info = info  # type: ignore[assignment]
    if save_to is not None:
        save_generative(save_to, model, info)
    return model


def load_autoencoder(path: str | Path, map_location: str | torch.device = "cpu") -> DenoisingAutoencoder:
    """Load an autoencoder saved by `train_autoencoder` / `save_generative`."""
    return load_generative(path, "autoencoder", map_location)  # type: ignore[return-value]
