"""Basic Iterative Method (iterative FGSM, no random start)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .._rng import ExampleRNG
from ..threat import ThreatModel
from .base import Attack, check_bool, check_int, check_optional_positive, register_attack
from .losses import check_loss_name
from .pgd import run_iterative

__all__ = ["BIM"]


@register_attack("bim")
@dataclass(frozen=True)
class BIM(Attack):
    r"""Basic Iterative Method: ``x ← clip_{x, eps}(x + α · sign(∇ₓ loss))`` from x, `steps` times.

    Paper: Kurakin, Goodfellow & Bengio, "Adversarial examples in the physical world",
    ICLR 2017 workshop (https://arxiv.org/abs/1607.02533).

    Distance: linf (sign steps), l2 (normalized-gradient steps). BIM is PGD without the random
    start and with a step that only just reaches the boundary: α = eps / steps.

    Arguments:
        steps (int): number of steps. (Default: 10)
        step_size (float | None): α; None means ``eps / steps``. (Default: None)
        loss (str): "ce", "cw" or "dlr". (Default: "ce")
        early_stop (bool): return an example's first adversarial iterate and stop attacking it.
            (Default: True)

    Shape:
        x: (N, C, H, W) in [0, 1]; y: (N,); returns `AttackResult` with x_adv (N, C, H, W).

    Example:
        >>> result = BIM(steps=10)(model, x, y, "linf:8/255")
    """

    steps: int = 10
    step_size: float | None = None
    loss: str = "ce"
    early_stop: bool = True

    supports_norms = ("linf", "l2")

    def __post_init__(self) -> None:
        check_int(self.steps, "steps", 1)
        check_optional_positive(self.step_size, "step_size")
        check_loss_name(self.loss)
        check_bool(self.early_stop, "early_stop")

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, targets: Tensor | None,
             rng: ExampleRNG) -> Tensor:
        alpha = self.step_size if self.step_size is not None else threat.eps / self.steps
        return run_iterative(self, model, x, y, threat, targets, rng, steps=self.steps, step_size=alpha,
                             loss=self.loss, restarts=1, random_start=False, early_stop=self.early_stop)
