"""TRADES and MART: a clean (or boundary) loss plus a KL term between clean and adversarial outputs.

Both reference implementations craft x' in eval mode from ``x + 0.001·N(0, 1)`` and train on
separate clean and adversarial forward passes; the losses are also exposed as pure functions
of the logits (`trades_loss`, `mart_loss`) so they can be checked and reused on their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..._checks import check_positive
from ...attacks.base import check_int, check_optional_positive
from .adversarial import AdversarialObjective, _check_mode, ce_per_example, generation_mode, maximize
from .objectives import OBJECTIVES

__all__ = ["MART", "TRADES", "mart_loss", "trades_loss"]

# Stabilizers of the MART reference code, kept so that the loss matches it: log(1.0001 − p)
# stays finite when p → 1, log(p + 1e-12) when p → 0, and the weight 1.0000001 − p_y never
# reaches exactly 0.
_MART_BCE_ONE = 1.0001
_MART_LOG_EPS = 1e-12
_MART_WEIGHT_ONE = 1.0000001


def trades_loss(logits_nat: Tensor, logits_adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """TRADES: ``CE(f(x), y) + beta · (1/N) Σ_i KL(p(x_i) ‖ p(x'_i))`` (KL "batchmean").

    ``KL(p ‖ q) = Σ_k p_k (log p_k − log q_k)``; gradients flow through both p(x) and p(x'), as
    in the reference implementation.
    """
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.log_softmax(logits_nat, dim=1), reduction="batchmean",
                  log_target=True)
    return F.cross_entropy(logits_nat, y) + beta * kl


def mart_loss(logits_nat: Tensor, logits_adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """MART: ``mean_i [BCE(p(x'_i), y_i) + beta · KL(p(x_i) ‖ p(x'_i)) · (1 − p_{y_i}(x_i))]``.

    ``BCE(p, y) = −log p_y − log(1 − max_{k≠y} p_k)`` (the boosted cross-entropy), with the
    reference code's stabilizers: ``log(1.0001 − max_{k≠y} p_k)``, ``log(p(x') + 1e-12)`` in the
    KL and the weight ``1.0000001 − p_y(x)``. Gradients flow through the weight too.
    """
    p_adv = F.softmax(logits_adv, dim=1)
    p_nat = F.softmax(logits_nat, dim=1)
    # the most likely wrong class of x' (argmax of p_adv with the true class masked out)
    wrong = p_adv.scatter(1, y.unsqueeze(1), float("-inf")).argmax(dim=1)
    p_wrong = p_adv.gather(1, wrong.unsqueeze(1)).squeeze(1)
    bce = F.cross_entropy(logits_adv, y, reduction="none") - torch.log(_MART_BCE_ONE - p_wrong + _MART_LOG_EPS)
    kl = F.kl_div(torch.log(p_adv + _MART_LOG_EPS), p_nat, reduction="none").sum(dim=1)
    p_true = p_nat.gather(1, y.unsqueeze(1)).squeeze(1)
    return bce.mean() + beta * (kl * (_MART_WEIGHT_ONE - p_true)).mean()


@dataclass
class _KLFamily(AdversarialObjective):
    """Fields and adversary start shared by TRADES and MART."""

    beta: float = 6.0
    steps: int = 10
    step_size: float | None = None
    init_std: float = 0.001
    bn_mode: str = "eval"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self.beta, "beta", allow_zero=True)
        check_int(self.steps, "steps", 1)
        check_optional_positive(self.step_size, "step_size")
        check_positive(self.init_std, "init_std", allow_zero=True)
        _check_mode(self.bn_mode)

    def _start(self, x: Tensor) -> Tensor:
        # x + 0.001·N(0, 1), not clipped: the first projected step brings it into the box
        return x + self.init_std * torch.randn(x.shape, device=x.device, dtype=x.dtype)

    def _step_size(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps


@OBJECTIVES.register("trades", "Zhang et al. 2019: CE(f(x), y) + beta·KL(f(x) ‖ f(x')), x' maximizing the KL.")
@dataclass
class TRADES(_KLFamily):
    r"""TRADES: trade natural accuracy against a boundary (smoothness) term.

    Paper: Zhang, Yu, Jiao, Xing, El Ghaoui & Jordan, "Theoretically Principled Trade-off
    between Robustness and Accuracy", ICML 2019 (arXiv:1901.08573):

        loss = CE(f(x), y) + beta · (1/N) Σ_i KL(p(x_i) ‖ p(x'_i))
        x'   = argmax_{x' ∈ B(x, eps) ∩ [0,1]} KL(p(x) ‖ p(x'))

    The inner maximization follows the reference code: eval mode, start at x + 0.001·N(0, 1),
    ``steps`` sign-gradient steps of ``step_size`` on the KL (p(x) fixed), each projected onto
    the ball and the box. The reference uses 10 steps of 0.007 at eps 0.031 on CIFAR-10 and
    40 steps of 0.01 at eps 0.3 on MNIST; ``step_size=None`` means 2.5·eps/steps (0.00775 at
    eps 0.031). Under ``norm="l2"`` the steps are normalized-gradient steps (the reference's l2
    variant optimizes δ with SGD instead). The logits returned (train accuracy) are clean.

    Args:
        beta: weight of the KL term (1/λ in the paper; 6.0 is the reference code's CIFAR-10 setting).
        steps: inner maximization steps.
        step_size: inner step in pixel units; None means 2.5·eps/steps.
        init_std: standard deviation of the Gaussian start around x.
        bn_mode: model mode during the inner maximization (``"eval"``, as the reference).
    """

    name: ClassVar[str] = "trades"

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with generation_mode(model, self.bn_mode):
            with torch.no_grad():
                log_p_nat = F.log_softmax(model(x), dim=1)

            def kl(logits: Tensor) -> Tensor:
                return F.kl_div(F.log_softmax(logits, dim=1), log_p_nat, reduction="none", log_target=True).sum(1)

            return maximize(model, x, self._start(x), kl, self.threat_model, self.steps, self._step_size())

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x_adv = self.perturb(model, x, y)
        logits_nat = model(x)
        return trades_loss(logits_nat, model(x_adv), y, self.beta), logits_nat


@OBJECTIVES.register("mart", "Wang et al. 2020: BCE(f(x'), y) + beta·KL(f(x) ‖ f(x'))·(1 − p_y(x)), x' from PGD.")
@dataclass
class MART(_KLFamily):
    r"""MART: misclassification-aware adversarial training.

    Paper: Wang, Zou, Yi, Bailey, Ma & Gu, "Improving Adversarial Robustness Requires Revisiting
    Misclassified Examples", ICLR 2020 (OpenReview rklOg6EFwS):

        loss = (1/N) Σ_i [ BCE(p(x'_i), y_i) + beta · KL(p(x_i) ‖ p(x'_i)) · (1 − p_{y_i}(x_i)) ]
        BCE(p, y) = −log p_y − log(1 − max_{k≠y} p_k)

    with x' from PGD on cross-entropy, crafted as in the reference code: eval mode, start at
    x + 0.001·N(0, 1), 10 sign steps of 0.007 at eps 8/255 (here ``step_size=None`` means
    2.5·eps/steps), each projected onto the ball and the box. The reference code's numerical
    stabilizers are kept (see `mart_loss`). The logits returned (train accuracy) are clean.

    Args:
        beta: λ of the paper (6.0, the reference code's default).
        steps, step_size, init_std, bn_mode: the PGD adversary, as in ``trades``.
    """

    name: ClassVar[str] = "mart"

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with generation_mode(model, self.bn_mode):
            return maximize(model, x, self._start(x), ce_per_example(y), self.threat_model, self.steps,
                            self._step_size())

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x_adv = self.perturb(model, x, y)
        logits_nat = model(x)
        return mart_loss(logits_nat, model(x_adv), y, self.beta), logits_nat
