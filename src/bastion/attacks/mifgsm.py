"""Momentum Iterative FGSM."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .._checks import check_positive
from .._rng import ExampleRNG
from ..threat import ThreatModel
from .base import Attack, check_bool, check_int, check_optional_positive, register_attack
from .losses import check_loss_name
from .pgd import run_iterative

__all__ = ["MIFGSM"]


@register_attack("mifgsm")
@dataclass(frozen=True)
class MIFGSM(Attack):
    r"""Momentum Iterative FGSM: iterative steps along an accumulated, L1-normalized gradient.

    Paper: Dong, Liao, Pang, Su, Zhu, Hu & Li, "Boosting Adversarial Attacks with Momentum",
    CVPR 2018 (https://arxiv.org/abs/1710.06081).

    Distance: linf (``x ← clip(x + α · sign(g))``) and l2 (``x ← Π(x + α · g/‖g‖₂)``), with
    ``g ← mu · g + ∇ₓ loss / ‖∇ₓ loss‖₁`` per example. The momentum stabilizes the direction,
    which is why MI-FGSM transfers better than BIM; it starts at x (no random start).

    Arguments:
        steps (int): number of iterations T. (Default: 10)
        decay (float): momentum decay mu. (Default: 1.0)
        step_size (float | None): α; None means ``eps / steps`` as in the paper. (Default: None)
        loss (str): "ce", "cw" or "dlr". (Default: "ce")
        early_stop (bool): return an example's first adversarial iterate and stop attacking it.
            (Default: True)

    Shape:
        x: (N, C, H, W) in [0, 1]; y: (N,); returns `AttackResult` with x_adv (N, C, H, W).

    Example:
        >>> result = MIFGSM(steps=10, decay=1.0)(model, x, y, "linf:8/255")
    """

    steps: int = 10
    decay: float = 1.0
    step_size: float | None = None
    loss: str = "ce"
    early_stop: bool = True

    supports_norms = ("linf", "l2")

    def __post_init__(self) -> None:
        check_int(self.steps, "steps", 1)
        check_positive(self.decay, "decay", allow_zero=True)
        check_optional_positive(self.step_size, "step_size")
        check_loss_name(self.loss)
        check_bool(self.early_stop, "early_stop")

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, targets: Tensor | None,
             rng: ExampleRNG) -> Tensor:
        alpha = self.step_size if self.step_size is not None else threat.eps / self.steps
        return run_iterative(self, model, x, y, threat, targets, rng, steps=self.steps, step_size=alpha,
                             loss=self.loss, restarts=1, random_start=False, early_stop=self.early_stop,
                             decay=float(self.decay))
