"""Defense-GAN projection: replace an input by the closest image the generator can make.

Defense-GAN — Samangouei, Kabkab & Chellappa 2018, "Defense-GAN: Protecting Classifiers Against
Adversarial Attacks Using Generative Models" (ICLR 2018, arXiv 1805.06605).

For an input x and a generator G trained on clean data, run L random restarts of R steps of
gradient descent on the reconstruction error, and classify G(z*) of the best restart::

    z_0^(l) ~ N(0, I),                l = 1..L
    z_{t+1}^(l) = z_t^(l) - lr_t · ∇_z ||G(z_t^(l)) - x||²      (mean over pixels)
    z* = argmin_l ||G(z_R^(l)) - x||²,    output G(z*)

The paper's settings (MNIST: L = 10, R = 200) and the authors' optimizer are the defaults:
SGD with momentum 0.7, learning rate 10 (for the per-pixel mean squared error), multiplied by
0.1 after 80% of the steps. ``optimizer="adam"`` is offered as an alternative. All L·N latent
codes are optimized at once (G is a per-sample function: it has no batch normalization), and
they are drawn on the CPU from a `torch.Generator` (or the global RNG), so a seed gives the same
projection on every device.

The output is in the range of the generator by construction. Defense-GAN is declared not
differentiable (a gradient through R unrolled optimization steps is what obfuscates it);
Athalye et al. 2018 attack it with BPDA (identity) or by searching the generator's range.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..._checks import check_choice, check_images, check_in_range, check_positive
from ._common import check_int, model_dtype
from .gan import Generator

__all__ = ["defensegan_project", "OPTIMIZERS", "default_lr"]

OPTIMIZERS = ("momentum", "adam")


def default_lr(optimizer: str) -> float:
    """The learning rate used when none is given: 10.0 for momentum SGD (the paper), 0.05 for Adam."""
    return 10.0 if optimizer == "momentum" else 0.05


def check_projection_args(restarts: int, steps: int, lr: float | None, optimizer: str, momentum: float,
                          decay_at: float, decay: float) -> None:
    """Validate Defense-GAN's options; each error names the argument."""
    for value, name, what in ((restarts, "restarts", "L, random restarts"), (steps, "steps", "R, descent steps")):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"`{name}` ({what}) must be an int, got {type(value).__name__} {value!r}")
        if value < 1:
            raise ValueError(f"`{name}` ({what}) must be >= 1, got {value!r}")
    check_choice(optimizer, "optimizer", OPTIMIZERS)
    if lr is not None:
        check_positive(lr, "lr")
    check_in_range(momentum, "momentum", 0.0, 0.999)
    check_in_range(decay_at, "decay_at", 0.0, 1.0)
    check_in_range(decay, "decay", 0.0, 1.0)


def defensegan_project(generator: Generator, x: Tensor, restarts: int = 10, steps: int = 200,
                       lr: float | None = None, *, optimizer: str = "momentum", momentum: float = 0.7,
                       decay_at: float = 0.8, decay: float = 0.1, rng: torch.Generator | None = None,
                       batch_size: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Project `x` onto the range of `generator` (Defense-GAN's reconstruction).

    Args:
        generator: a trained `Generator` whose ``image_shape`` is ``x.shape[1:]``.
        x: images N×C×H×W in [0, 1].
        restarts: L, random initial z per image.
        steps: R, gradient steps per restart.
        lr: step size; None for `default_lr(optimizer)`.
        optimizer: ``momentum`` (SGD with `momentum`, the authors' choice) or ``adam``.
        momentum: momentum of the SGD variant.
        decay_at, decay: the learning rate is multiplied by `decay` from step ``ceil(decay_at · R)`` on.
        rng: CPU generator for the initial z (global RNG if None).
        batch_size: project this many images at a time (None: all at once); results do not
            depend on it.

    Returns:
        ``(x_hat, z, err)``: ``x_hat = generator(z)`` (N×C×H×W, x's dtype), the chosen latent
        codes z (N×d) and their per-pixel mean squared reconstruction errors (N,).
    """
    check_images(x, "x")
    check_projection_args(restarts, steps, lr, optimizer, momentum, decay_at, decay)
    if tuple(x.shape[1:]) != tuple(generator.image_shape):
        raise ValueError(f"`x` has images of shape {tuple(x.shape[1:])}, the generator makes "
                         f"{tuple(generator.image_shape)}")
    n = x.shape[0]
    d = generator.latent_dim
    dtype = model_dtype(generator)
    bs = n if batch_size is None else check_int(batch_size, "batch_size")
    if n == 0:
        return x.clone(), torch.zeros(0, d, device=x.device, dtype=dtype), torch.zeros(0, device=x.device, dtype=dtype)
    # every draw up front, in one call: chunking never changes which z an image gets
    z0 = torch.randn(n, restarts, d, generator=rng).to(device=x.device, dtype=dtype)
    step = lr if lr is not None else default_lr(optimizer)
    zs, errs = [], []
    for s in range(0, n, bs):
        z, err = _descend(generator, x[s:s + bs].detach().to(dtype), z0[s:s + bs], steps, step, optimizer,
                          momentum, decay_at, decay)
        zs.append(z)
        errs.append(err)
    z = torch.cat(zs)
    with torch.no_grad():
        x_hat = torch.cat([generator(z[s:s + bs]) for s in range(0, n, bs)])
    return x_hat.to(x.dtype), z, torch.cat(errs)


def _descend(generator: Generator, x: Tensor, z0: Tensor, steps: int, lr: float, optimizer: str,
             momentum: float, decay_at: float, decay: float) -> tuple[Tensor, Tensor]:
    """Gradient descent on z for one chunk: (n, L, d) starts -> best z (n, d) and its error (n,)."""
    with torch.inference_mode(False), torch.enable_grad():  # also inside a caller's no_grad/inference_mode
        return _descend_impl(generator, x.clone(), z0.clone(), steps, lr, optimizer, momentum, decay_at, decay)


def _descend_impl(generator: Generator, x: Tensor, z0: Tensor, steps: int, lr: float, optimizer: str,
                  momentum: float, decay_at: float, decay: float) -> tuple[Tensor, Tensor]:
    n, restarts, d = z0.shape
    target = x.repeat_interleave(restarts, dim=0)  # (n·L)×C×H×W, restart-minor like z
    z = z0.reshape(n * restarts, d)
    buf = torch.zeros_like(z)
    sq = torch.zeros_like(z)
    decay_step = math.ceil(decay_at * steps)
    beta1, beta2 = 0.9, 0.999
    for t in range(steps):
        lr_t = lr * (decay if t >= decay_step else 1.0)
        zt = z.detach().requires_grad_(True)
        err = (generator(zt) - target).pow(2).flatten(1).mean(1)
        (grad,) = torch.autograd.grad(err.sum(), zt)
        with torch.no_grad():
            if optimizer == "momentum":  # v <- m·v + g;  z <- z - lr·v   (TF/PyTorch SGD momentum)
                buf.mul_(momentum).add_(grad)
                z = z - lr_t * buf
            else:  # Adam, element-wise, so every latent code is optimized independently
                buf.mul_(beta1).add_(grad, alpha=1 - beta1)
                sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                m_hat = buf / (1 - beta1 ** (t + 1))
                v_hat = sq / (1 - beta2 ** (t + 1))
                z = z - lr_t * m_hat / (v_hat.sqrt() + 1e-8)
    with torch.no_grad():
        err = (generator(z) - target).pow(2).flatten(1).mean(1).view(n, restarts)
        best = err.argmin(1)
        rows = torch.arange(n, device=z.device)
        return z.view(n, restarts, d)[rows, best], err[rows, best]
