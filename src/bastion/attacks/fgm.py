"""Fast gradient (sign) method: one steepest-ascent step of length eps."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._checks import check_in_range
from .._rng import ExampleRNG
from ..threat import ThreatModel
from .base import Attack, is_adversarial, logits_and_grad, register_attack
from .losses import check_loss_name, get_loss

__all__ = ["FGM", "FGSM"]


@register_attack("fgm")
@dataclass(frozen=True)
class FGM(Attack):
    r"""Fast Gradient Method: ``x_adv = Π(x + eps · direction(∇ₓ loss))``, one gradient.

    Paper: Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial Examples",
    ICLR 2015 (https://arxiv.org/abs/1412.6572) for linf (FGSM); the l2 version (gradient
    divided by its l2 norm) follows Miyato et al. 2016 / Kurakin et al. 2017.

    Distance: linf (sign of the gradient), l2 (normalized gradient), l1. Under l1 the exact
    steepest-ascent step moves the single coordinate with the largest |gradient| (among those
    the box lets move in the gradient's direction) by eps; the box then clips it, so for
    eps > 1 most of the budget is unused — that is the geometry, not a bug. ``l1_fraction > 0``
    spreads the step over that fraction of the coordinates instead (Tramèr & Boneh 2019).

    Targeted (``targets=``): steps up −CE(target), i.e. toward the target class.
    Examples already misclassified (targeted: already at their target) are returned unchanged.

    Arguments:
        loss (str): "ce", "cw" or "dlr". (Default: "ce")
        l1_fraction (float): fraction of coordinates an l1 step moves; 0 = one coordinate.
            (Default: 0.0)

    Shape:
        x: (N, C, H, W) in [0, 1]; y: (N,); returns `AttackResult` with x_adv (N, C, H, W).

    Example:
        >>> result = FGM()(model, x, y, "l2:0.5")
    """

    loss: str = "ce"
    l1_fraction: float = 0.0

    supports_norms = ("linf", "l2", "l1")

    def __post_init__(self) -> None:
        check_loss_name(self.loss)
        check_in_range(self.l1_fraction, "l1_fraction", 0.0, 1.0)

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, targets: Tensor | None,
             rng: ExampleRNG) -> Tensor:
        loss_fn = get_loss(self.loss, targets is not None)
        logits, _, grad = logits_and_grad(model, x, y, loss_fn, targets)
        x_adv = threat.project(threat.step(x, grad, threat.eps, l1_fraction=self.l1_fraction), x)
        done = is_adversarial(logits, y, targets).view(-1, *([1] * (x.dim() - 1)))
        return torch.where(done, x, x_adv)


@register_attack("fgsm")
@dataclass(frozen=True)
class FGSM(FGM):
    r"""Fast Gradient Sign Method: ``x_adv = clip(x + eps · sign(∇ₓ loss))``.

    Paper: Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial Examples",
    ICLR 2015 (https://arxiv.org/abs/1412.6572).

    Distance: linf only (use "fgm" for l2 / l1).

    Arguments:
        loss (str): "ce", "cw" or "dlr". (Default: "ce")

    Shape:
        x: (N, C, H, W) in [0, 1]; y: (N,); returns `AttackResult` with x_adv (N, C, H, W).

    Example:
        >>> result = FGSM()(model, x, y, "linf:8/255")
        >>> robust_accuracy = 1 - result.success_rate
    """

    supports_norms = ("linf",)
