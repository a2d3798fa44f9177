"""Generative purifiers as registered transforms: PixelDefend, Defense-GAN, MagNet's reformer.

Each is built from a trained generative model: a module, or the stem of a checkpoint written
by `bastion.defenses.generative` (``benchmarks/train_generative.py`` trains all three)::

    >>> create_transform("pixeldefend:model=runs/gen/pixelcnn,eps_defend=0.0627")
    >>> create_transform("defense-gan:model=runs/gen/generator,restarts=10,steps=200,seed=0")
    >>> create_transform("magnet:model=runs/gen/autoencoder")

The generative network becomes a frozen submodule (``requires_grad`` off, eval mode): it moves
with ``.to(device)`` and is never trained by an optimizer over the defended pipeline.

How each must be attacked (what the evaluator reads):

============  ==============  ==========  =========================================
name          differentiable  randomized  bpda (backward pass of an adaptive attack)
============  ==============  ==========  =========================================
pixeldefend   no              no (yes     identity (Athalye et al. 2018)
                              if sample)
defense-gan   no              yes         identity (Athalye et al. 2018)
magnet        yes             no          the autoencoder itself
============  ==============  ==========  =========================================
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..._checks import check_in_range
from ..generative._common import model_dtype, resolve_model
from ..generative.autoencoder import DenoisingAutoencoder
from ..generative.defensegan import check_projection_args, default_lr, defensegan_project
from ..generative.gan import Generator
from ..generative.pixelcnn import PixelCNN
from ..generative.pixeldefend import pixeldefend
from .base import Transform, register_transform, zero_grad_output

__all__ = ["PixelDefend", "DefenseGAN", "MagNetReformer"]

ModelLike = nn.Module | str | Path


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _make_rng(seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
    """The CPU generator a randomized purifier draws from (None: the global torch RNG)."""
    if seed is not None and generator is not None:
        raise ValueError("pass `seed` or `generator`, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise TypeError("`generator` must be a CPU torch.Generator (draws are made on the CPU and moved to x's device)")
        return generator
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"`seed` must be an int, got {type(seed).__name__} {seed!r}")
        return torch.Generator().manual_seed(seed)
    return None


@register_transform("pixeldefend", "PixelDefend: greedy PixelCNN purification within ±eps_defend (Song et al. 2018)")
class PixelDefend(Transform):
    """PixelDefend — Song, Kim, Nowozin, Ermon & Kushman 2018 (ICLR 2018, arXiv 1710.10766).

    Each sub-pixel, in raster order, is set to the value the PixelCNN finds most likely given the
    already-purified pixels, among the values within ``eps_defend`` of the input (Algorithm 1);
    see `bastion.defenses.generative.pixeldefend`. The output is within ``eps_defend`` of the
    input in L∞. Cost: H·W·C PixelCNN evaluations (on a small exact crop), batched.

    Args:
        model: a trained `PixelCNN` or the stem of its checkpoint.
        eps_defend: the purifier's L∞ budget in pixel units, in [0, 1] (default 16/255, the
            paper's CIFAR-10 value; the paper's advice is eps_defend = the attack's eps when
            it is known).
        sample: draw from the restricted conditional instead of taking the argmax (then the
            transform is randomized and must be attacked with EOT).
        seed: seed of the draws for ``sample=True`` (a fresh stream per transform; successive
            calls differ, a new transform with the same seed repeats them).
        generator: a CPU `torch.Generator` instead of `seed`.

    Declarations: not differentiable (argmax over a greedy sequence); ``bpda`` is the identity
    (the purified image is within eps_defend of the input); randomized only with ``sample``.
    """

    differentiable = False
    randomized = False

    def __init__(self, model: ModelLike, eps_defend: float = 16 / 255, sample: bool = False,
                 seed: int | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        check_in_range(eps_defend, "eps_defend", 0.0, 1.0)
        if not isinstance(sample, bool):
            raise TypeError(f"`sample` must be a bool, got {type(sample).__name__}")
        if not sample and (seed is not None or generator is not None):
            raise ValueError("`seed`/`generator` only apply with sample=True (greedy PixelDefend is deterministic)")
        self.model, self._source = resolve_model(model, "pixelcnn")
        _freeze(self.model)
        self.eps_defend = float(eps_defend)
        self.sample = sample
        self.seed = seed
        self._rng = _make_rng(seed, generator)
        # the sampling variant draws randomness in forward: declare it so the evaluator uses EOT
        self.randomized = sample

    def transform(self, x: Tensor) -> Tensor:
        assert isinstance(self.model, PixelCNN)
        out = pixeldefend(self.model, x, self.eps_defend, sample=self.sample, generator=self._rng)
        return zero_grad_output(out, x)

    def manual_seed(self, seed: int) -> "PixelDefend":
        """Restart the draws of ``sample=True`` from `seed` (returns self)."""
        if not self.sample:
            raise ValueError("`seed` only applies with sample=True (greedy PixelDefend is deterministic)")
        self._rng, self.seed = _make_rng(seed, None), seed
        return self

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "model": self._source, "eps_defend": self.eps_defend, "sample": self.sample,
                "seed": self.seed}


@register_transform("defense-gan", "Defense-GAN: project onto the range of a GAN generator (Samangouei et al. 2018)")
class DefenseGAN(Transform):
    """Defense-GAN — Samangouei, Kabkab & Chellappa 2018 (ICLR 2018, arXiv 1805.06605).

    Replaces x by G(z*), where z* is the best of `restarts` (L) random starts after `steps` (R)
    gradient steps on the mean squared reconstruction error; see
    `bastion.defenses.generative.defensegan`.

    Args:
        model: a trained `Generator` or the stem of its checkpoint.
        restarts: L, random restarts (paper: 10).
        steps: R, gradient steps per restart (paper: 200).
        lr: step size (None: 10 for momentum SGD, the authors' value; 0.05 for Adam).
        optimizer: ``momentum`` (SGD, momentum 0.7, lr × 0.1 after 80% of the steps) or ``adam``.
        batch_size: images projected at a time (None: the whole batch; memory ∝ batch · L).
        seed: seed of the initial z (a fresh stream per transform: successive calls differ, a new
            transform with the same seed repeats them); None uses the global torch RNG.
        generator: a CPU `torch.Generator` instead of `seed`.

    Declarations: not differentiable (an inner optimization); randomized (random starts); ``bpda``
    is the identity. The output is always in the generator's range: ``G(z)`` for the z that
    `project` returns.
    """

    differentiable = False
    randomized = True

    def __init__(self, model: ModelLike, restarts: int = 10, steps: int = 200, lr: float | None = None,
                 optimizer: str = "momentum", batch_size: int | None = None, seed: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        check_projection_args(restarts, steps, lr, optimizer, 0.7, 0.8, 0.1)
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"`batch_size` must be a positive int or None, got {batch_size!r}")
        self.model, self._source = resolve_model(model, "gan-generator")
        _freeze(self.model)
        self.restarts, self.steps, self.optimizer, self.batch_size, self.seed = restarts, steps, optimizer, batch_size, seed
        self.lr = float(lr) if lr is not None else default_lr(optimizer)
        self._rng = _make_rng(seed, generator)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(G(z*), z*, reconstruction error)`` for a batch of images (see `defensegan_project`)."""
        assert isinstance(self.model, Generator)
        return defensegan_project(self.model, x, self.restarts, self.steps, self.lr, optimizer=self.optimizer,
                                  rng=self._rng, batch_size=self.batch_size)

    def transform(self, x: Tensor) -> Tensor:
        return zero_grad_output(self.project(x)[0], x)

    def manual_seed(self, seed: int) -> "DefenseGAN":
        """Restart the transform's own random sequence of initial z from `seed` (returns self)."""
        self._rng, self.seed = _make_rng(seed, None), seed
        return self

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "model": self._source, "restarts": self.restarts, "steps": self.steps,
                "lr": self.lr, "optimizer": self.optimizer, "batch_size": self.batch_size, "seed": self.seed}


@register_transform("magnet", "MagNet reformer: x -> AE(x), a denoising autoencoder (Meng & Chen 2017)")
class MagNetReformer(Transform):
    """MagNet's reformer — Meng & Chen 2017 (CCS 2017, arXiv 1705.09064).

    x -> AE(x) with a denoising autoencoder trained on clean data
    (`bastion.defenses.generative.train_autoencoder`). MagNet's detector, which thresholds
    `reconstruction_error`, lives with the detectors.

    Args:
        model: a trained `DenoisingAutoencoder` or the stem of its checkpoint.

    Declarations: differentiable (the autoencoder is a network; an adaptive attacker
    differentiates through it, as Carlini & Wagner 2017 did); not randomized; ``bpda`` is the
    autoencoder itself.
    """

    differentiable = True
    randomized = False

    def __init__(self, model: ModelLike) -> None:
        super().__init__()
        self.model, self._source = resolve_model(model, "autoencoder")
        _freeze(self.model)

    def transform(self, x: Tensor) -> Tensor:
        dtype = model_dtype(self.model)
        return self.model(x.to(dtype)).to(x.dtype)

    def bpda(self, x: Tensor) -> Tensor:
        return self.transform(x)

    def reconstruction_error(self, x: Tensor, p: float = 1.0) -> Tensor:
        """Per-image mean ``|x - AE(x)|^p`` (see `DenoisingAutoencoder.reconstruction_error`)."""
        assert isinstance(self.model, DenoisingAutoencoder)
        return self.model.reconstruction_error(x.to(model_dtype(self.model)), p).to(x.dtype)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "model": self._source}
