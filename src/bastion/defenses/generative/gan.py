"""A small DCGAN-style generator (and its discriminator): the generative model behind Defense-GAN.

GAN — Goodfellow et al. 2014, "Generative Adversarial Networks" (arXiv 1406.2661); the
architecture follows DCGAN (Radford, Metz & Chintala 2015, arXiv 1511.06434): a linear layer
to a (2·width)×H/4×W/4 map, two stride-2 transposed convolutions, a 3×3 convolution and a
sigmoid so that samples are images in (0, 1).

Two deliberate departures, from DCGAN and from the Defense-GAN paper:

* **group normalization instead of batch normalization in the generator.** Defense-GAN runs
  gradient descent on z for batch × restarts latent codes at once; with batch statistics each
  reconstruction would depend on the others, and with running statistics G at test time is not
  the G that was trained. GroupNorm keeps the activations bounded as batch norm does (without
  any normalization the sigmoid output saturates to all-black on MNIST within an epoch), and
  G(z) is a per-sample function, the same in train and eval.
* **training loss**: the non-saturating GAN loss (Goodfellow et al. 2014) with spectral
  normalization in the discriminator and SN-GAN's Adam settings (Miyato et al. 2018,
  arXiv 1802.05957), which is stable for small models and a few epochs, instead of the
  paper's WGAN-GP (5 critic steps per generator step and a double backward: about 5× the
  training cost on a CPU).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from ..._checks import check_positive
from ._common import (Timer, as_images, batches, check_int, check_training_args, describe_data, load_generative,
                      progress_bar, register_kind, save_generative, seeded)

__all__ = ["Generator", "Discriminator", "train_gan", "load_generator"]


def _check_shape(image_shape: Any) -> tuple[int, int, int]:
    if (not isinstance(image_shape, (tuple, list)) or len(image_shape) != 3
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in image_shape)):
        raise ValueError(f"`image_shape` must be (C, H, W) positive ints, got {image_shape!r}")
    c, h, w = image_shape
    if h % 4 or w % 4:
        raise ValueError(f"`image_shape` must have H and W divisible by 4 (two 2× upsamplings), got {h}×{w}")
    return int(c), int(h), int(w)


def _norm(channels: int) -> nn.GroupNorm:
    """Per-sample normalization (GroupNorm, Wu & He 2018): bounded activations like DCGAN's batch
    norm, but each G(z) depends on its own z only, in training and at test time alike."""
    return nn.GroupNorm(math.gcd(8, channels), channels)


@register_kind("gan-generator")
class Generator(nn.Module):
    """G: R^latent_dim -> images C×H×W in (0, 1).

    Args:
        image_shape: (C, H, W), H and W divisible by 4 (8×8 digits, 28×28 MNIST, 32×32 CIFAR).
        latent_dim: dimension d of z ~ N(0, I).
        width: feature maps of the last hidden layer (the first has 2·width).
    """

    kind = "gan-generator"

    def __init__(self, image_shape: tuple[int, int, int] = (1, 28, 28), latent_dim: int = 32, width: int = 32) -> None:
        super().__init__()
        self.image_shape = _check_shape(image_shape)
        self.latent_dim = check_int(latent_dim, "latent_dim")
        self.width = check_int(width, "width")
        c, h, w = self.image_shape
        self._h0, self._w0 = h // 4, w // 4
        last = max(width // 2, 1)
        self.fc = nn.Linear(latent_dim, 2 * width * self._h0 * self._w0)
        self.net = nn.Sequential(
            _norm(2 * width), nn.ReLU(),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1), _norm(width), nn.ReLU(),
            nn.ConvTranspose2d(width, last, 4, stride=2, padding=1), _norm(last), nn.ReLU(),
            nn.Conv2d(last, c, 3, padding=1),
        )

    def config(self) -> dict[str, Any]:
        return {"image_shape": list(self.image_shape), "latent_dim": self.latent_dim, "width": self.width}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "Generator":
        return cls(tuple(cfg["image_shape"]), cfg["latent_dim"], cfg["width"])  # type: ignore[arg-type]

    def forward(self, z: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"`z` must have shape N×{self.latent_dim}, got {tuple(z.shape)}")
        h = self.fc(z).view(len(z), 2 * self.width, self._h0, self._w0)
        return torch.sigmoid(self.net(h))

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """`n` images G(z), z ~ N(0, I) drawn on the CPU (from `generator` or the global RNG)."""
        z = torch.randn(n, self.latent_dim, generator=generator)
        p = next(self.parameters())
        return self(z.to(device=p.device, dtype=p.dtype))


class Discriminator(nn.Module):
    """D: images -> a real/fake logit; spectrally normalized convolutions with LeakyReLU.

    Before the last layer D also sees the minibatch standard deviation of its features
    (Karras et al. 2018, arXiv 1710.10196): a batch of near-identical fakes is then easy to tell
    from real data, which keeps the generator from collapsing onto a few digits (without it,
    on the 8×8 digits, samples covered 4 to 6 of the 10 classes). D is used only in training,
    so its batch dependence never reaches Defense-GAN.
    """

    def __init__(self, image_shape: tuple[int, int, int] = (1, 28, 28), width: int = 32) -> None:
        super().__init__()
        c, h, w = _check_shape(image_shape)
        check_int(width, "width")
        self.features = nn.Sequential(
            spectral_norm(nn.Conv2d(c, width, 4, stride=2, padding=1)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(width, 2 * width, 4, stride=2, padding=1)), nn.LeakyReLU(0.2),
        )
        self.head = nn.Sequential(nn.Flatten(), spectral_norm(nn.Linear((2 * width + 1) * (h // 4) * (w // 4), 1)))

    def forward(self, x: Tensor) -> Tensor:
        f = self.features(x * 2.0 - 1.0)
        spread = f.std(dim=0, unbiased=False).mean() if len(f) > 1 else f.new_zeros(())
        f = torch.cat([f, spread.expand(len(f), 1, *f.shape[2:])], dim=1)
        return self.head(f).squeeze(1)


def train_gan(data: Any, epochs: int = 10, *, latent_dim: int = 32, width: int = 32, batch_size: int = 32,
              lr: float = 1e-3, lr_d: float | None = None, betas: tuple[float, float] = (0.0, 0.9),
              seed: int = 0, device: str | torch.device = "cpu", progress: bool = True, save_to: str | Path | None = None,
              max_examples: int | None = None) -> Generator:
    """Train a generator (and a discriminator, discarded) with the non-saturating GAN loss.

    One discriminator step and one generator step per batch, Adam for both with the SN-GAN
    settings (Miyato et al. 2018: betas (0, 0.9)) and a step of 1e-3 for the short runs Bastion
    does. On the 8×8 digits the generator collapsed onto one or two digits with DCGAN's betas
    (0.5, 0.999), and onto four to six without D's minibatch-deviation feature; with both it
    covers every class, and Defense-GAN reconstructions of clean test digits (30 epochs,
    L=10, R=200) keep a small CNN's accuracy at 97%. On mnist-5k, 5 epochs over 2,000 images
    already give reconstructions classified as well as the digits themselves (40 of 40).

    Args:
        data: a `Dataset`, a dataset name (its train split) or an N×C×H×W tensor in [0, 1].
        epochs: passes over the data.
        latent_dim, width: the generator (see `Generator`); D has the same width.
        batch_size, lr, betas: optimization (`lr` for G, and for D unless `lr_d` is given).
        lr_d: D's step size (None: `lr`).
        seed: makes initialization, data order and every z reproducible (global RNG untouched).
        device: where to train.
        progress: progress bar with the running D and G losses.
        save_to: if given, the checkpoint stem to save the generator to.
        max_examples: use only the first this-many images.

    Returns:
        The trained `Generator` in eval mode (``training_info`` holds the per-epoch losses).
    """
    check_training_args(epochs, batch_size, lr)
    x = as_images(data)
    if max_examples is not None:
        x = x[:check_int(max_examples, "max_examples")]
    device = torch.device(device)
    shape = tuple(int(s) for s in x.shape[1:])
    with seeded(seed):
        gen = Generator(shape, latent_dim, width)  # type: ignore[arg-type]
        disc = Discriminator(shape, width)  # type: ignore[arg-type]
    gen.to(device).train()
    disc.to(device).train()
    opt_g = torch.optim.Adam(gen.parameters(), lr=lr, betas=betas)
    if lr_d is not None:
        check_positive(lr_d, "lr_d")
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr if lr_d is None else lr_d, betas=betas)
    g = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    steps = epochs * math.ceil(len(x) / batch_size)
    timer = Timer()
    # spectral norm's power iteration draws its start vectors from the global RNG once, at
    # construction (inside `seeded`); training itself draws only from `g`
    with progress_bar(steps, "gan", progress) as bar:
        for epoch in range(epochs):
            sums = {"d": 0.0, "g": 0.0, "d_real": 0.0}
            count = 0
            for idx in batches(len(x), batch_size, g):
                real = x[idx].to(device)
                m = len(idx)
                # discriminator: real -> 1, fake -> 0
                z = torch.randn(m, latent_dim, generator=g).to(device)
                with torch.no_grad():
                    fake = gen(z)
                d_real, d_fake = disc(real), disc(fake)
                loss_d = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()
                # generator: non-saturating, maximize log D(G(z))
                z = torch.randn(m, latent_dim, generator=g).to(device)
                loss_g = F.softplus(-disc(gen(z))).mean()
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
                sums["d"] += loss_d.item() * m
                sums["g"] += loss_g.item() * m
                sums["d_real"] += torch.sigmoid(d_real.detach()).mean().item() * m
                count += m
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, d=f"{loss_d.item():.3f}", g=f"{loss_g.item():.3f}")
            history.append({k: round(v / count, 5) for k, v in sums.items()})
    gen.eval()
    info = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "lr_d": lr_d, "betas": list(betas), "seed": seed,
            "examples": len(x), "loss": "non-saturating + spectral-norm D", "history": history,
            "seconds": timer(), "data": describe_data(data)}
    gen.training_info = info  # type: ignore[assignment]
    if save_to is not None:
        save_generative(save_to, gen, info)
    return gen


def load_generator(path: str | Path, map_location: str | torch.device = "cpu") -> Generator:
    """Load a generator saved by `train_gan` / `save_generative`."""
    return load_generative(path, "gan-generator", map_location)  # type: ignore[return-value]
