"""Auto-PGD (APGD-CE / APGD-DLR) and its targeted-DLR sweep APGD-T, as in AutoAttack."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._checks import check_in_range
from .._rng import ExampleRNG
from ..threat import ThreatModel
from .base import Attack, BestTracker, check_bool, check_int, is_adversarial, logits_and_grad, register_attack
from .losses import LossFn, check_loss_name, get_loss

__all__ = ["APGD", "APGDT", "apgd_run", "checkpoints"]


def checkpoints(steps: int) -> list[int]:
    """The iterations at which APGD may halve its step size, for a budget of `steps`.

    The paper's p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06), in
    AutoAttack's integer form: the first period is max(⌊0.22·T⌋, 1) iterations and each next
    period is shorter by max(⌊0.03·T⌋, 1), down to max(⌊0.06·T⌋, 1).
    """
    period, shortest, shrink = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    out, w = [], 0
    while w + period <= steps:
        w += period
        out.append(w)
        period = max(period - shrink, shortest)
    return out


def apgd_run(model: nn.Module, x: Tensor, y: Tensor, targets: Tensor | None, threat: ThreatModel, x0: Tensor, *,
             steps: int, loss_fn: LossFn, tracker: BestTracker, idx: Tensor, rho: float = 0.75,
             momentum: float = 0.75, early_stop: bool = True, untargeted_success: bool = False) -> None:
    """One APGD run from `x0` on the rows `idx` of the batch that `tracker` keeps.

    Per iteration (Croce & Hein 2020, Alg. 1):
        z = P(x_k + η_k · direction(∇f(x_k)))
        x_{k+1} = P(x_k + α(z − x_k) + (1 − α)(x_k − x_{k−1}))     (α = 1 on the first step)
    η starts at 2·eps. At each checkpoint w_j, η is halved for an example when
        (1) the share of steps since w_{j−1} that increased f is ≤ ρ, or
        (2) η was not halved at w_{j−1} and the best loss has not improved since,
    and that example restarts from its best point (with the gradient stored there). The state
    is per example; with ``early_stop`` examples leave the computation once adversarial.

    `targets` go to the loss; success is reaching them, unless ``untargeted_success`` (APGD-T:
    a targeted loss, but any misclassification counts).
    """
    succ_t = None if untargeted_success else targets
    n = x.shape[0]
    view = (-1, *([1] * (x.dim() - 1)))
    logits, loss, grad = logits_and_grad(model, x0, y, loss_fn, targets)
    succ = is_adversarial(logits, y, succ_t)
    tracker.update(idx, x0, loss, succ)
    active = ~succ if early_stop else torch.ones(n, dtype=torch.bool, device=x.device)

    x_cur, x_prev = x0.detach().clone(), x0.detach().clone()
    x_best, loss_best, grad_best = x0.detach().clone(), loss.clone(), grad.clone()
    eta = torch.full((n,), 2.0 * threat.eps, device=x.device, dtype=x.dtype)
    # Condition (1) counts steps whose loss beat the previous iterate's. For the very first
    # step AutoAttack's code compares with 0, not with f(x_0) (its loss history is indexed at
    # -1, a row still zero); we keep that, so that runs match the reference bit for bit
    # (checked against it on linf, CE and DLR). It only matters for losses that can be < 0 (DLR).
    loss_prev = torch.zeros_like(loss)
    n_increase = torch.zeros(n, device=x.device, dtype=torch.long)
    # AutoAttack starts as if η had just been reduced, so condition (2) cannot fire at w_1
    reduced_last = torch.ones(n, dtype=torch.bool, device=x.device)
    loss_best_last = loss_best.clone()
    checks = set(checkpoints(steps))
    since_check = 0

    for i in range(steps):
        a = active.nonzero().squeeze(1)
        if a.numel() == 0:
            break
        xa, xs = x_cur[a], x[a]
        z = threat.project(threat.step(xa, grad[a], eta[a]), xs)
        alpha = momentum if i > 0 else 1.0
        x_new = threat.project(xa + alpha * (z - xa) + (1 - alpha) * (xa - x_prev[a]), xs).detach()
        x_prev[a], x_cur[a] = xa, x_new

        ta = None if targets is None else targets[a]
        logits, loss, g = logits_and_grad(model, x_new, y[a], loss_fn, ta)
        succ = is_adversarial(logits, y[a], None if succ_t is None else ta)
        tracker.update(idx[a], x_new, loss, succ)
        grad[a] = g
        n_increase[a] += (loss > loss_prev[a]).long()
        loss_prev[a] = loss
        better = loss > loss_best[a]
        x_best[a[better]], loss_best[a[better]], grad_best[a[better]] = x_new[better], loss[better], g[better]
        if early_stop:
            active[a[succ]] = False

        since_check += 1
        if i + 1 in checks:
            cond1 = n_increase <= since_check * rho
            cond2 = ~reduced_last & (loss_best_last >= loss_best)
            reduce = cond1 | cond2
            reduced_last, loss_best_last = reduce, loss_best.clone()
            eta = torch.where(reduce, eta / 2, eta)
            x_cur = torch.where(reduce.view(view), x_best, x_cur)
            grad = torch.where(reduce.view(view), grad_best, grad)
            n_increase.zero_()
            since_check = 0


@register_attack("apgd")
@dataclass(frozen=True)
class APGD(Attack):
    r"""Auto-PGD: step-size-free PGD with momentum and checkpointed step-size halving.

    Paper: Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
    diverse parameter-free attacks", ICML 2020 (https://arxiv.org/abs/2003.01690); follows the
    reference implementation in AutoAttack (``autopgd_base.py``) — see `apgd_run`.

    Distance: linf, l2.

    Arguments:
        steps (int): iterations per restart (AutoAttack: 100). (Default: 100)
        restarts (int): random starts; each runs only on the examples not yet broken.
            (Default: 1)
        loss (str): "ce" (APGD-CE) or "dlr" (APGD-DLR, robust to logit rescaling). With
            ``targets=`` the targeted version of the loss is used. (Default: "ce")
        rho (float): checkpoint condition (1) threshold ρ. (Default: 0.75)
        momentum (float): α, weight of the new step against the previous one. (Default: 0.75)
        early_stop (bool): stop attacking an example at its first adversarial iterate.
            (Default: True)

    Shape:
        x: (N, C, H, W) in [0, 1]; y: (N,); returns `AttackResult` with x_adv (N, C, H, W).

    Example:
        >>> result = APGD(loss="dlr")(model, x, y, "linf:8/255", seed=0)
    """

    steps: int = 100
    restarts: int = 1
    loss: str = "ce"
    rho: float = 0.75
    momentum: float = 0.75
    early_stop: bool = True

    supports_norms = ("linf", "l2")

    def __post_init__(self) -> None:
        check_int(self.steps, "steps", 1)
        check_int(self.restarts, "restarts", 1)
        check_loss_name(self.loss, allowed=("ce", "dlr"))
        check_in_range(self.rho, "rho", 0.0, 1.0)
        check_in_range(self.momentum, "momentum", 0.0, 1.0)
        check_bool(self.early_stop, "early_stop")

    @property
    def randomized(self) -> bool:
        return True

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, targets: Tensor | None,
             rng: ExampleRNG) -> Tensor:
        loss_fn = get_loss(self.loss, targets is not None)
        tracker = _clean_tracker(model, x, y, targets, loss_fn)
        for r in range(self.restarts):
            self._restart(model, x, y, targets, threat, rng, loss_fn, tracker, tag=(self.name, "init", r))
        return tracker.x_best

    def _restart(self, model: nn.Module, x: Tensor, y: Tensor, targets: Tensor | None, threat: ThreatModel,
                 rng: ExampleRNG, loss_fn: LossFn, tracker: BestTracker, tag: tuple) -> None:
        """One random start on the examples the tracker has not yet seen broken."""
        idx = tracker.active()
        if idx.numel() == 0:
            return
        xs = x[idx]
        x0 = threat.random_init(xs, rng.subset(idx), tag=tag)
        apgd_run(model, xs, y[idx], None if targets is None else targets[idx], threat, x0, steps=self.steps,
                 loss_fn=loss_fn, tracker=tracker, idx=idx, rho=self.rho, momentum=self.momentum,
                 early_stop=self.early_stop)


@register_attack("apgd-t")
@dataclass(frozen=True)
class APGDT(APGD):
    r"""APGD-T: APGD on the targeted DLR loss, swept over the most likely wrong classes.

    Paper: Croce & Hein, ICML 2020 (https://arxiv.org/abs/2003.01690), the targeted attack of
    AutoAttack's standard suite.

    Distance: linf, l2. An untargeted attack: for each example the targets are its
    `n_target_classes` highest-scoring classes other than y (ranked on the clean input), each
    run for the full budget (and all restarts) on the examples still unbroken.

    Arguments:
        steps (int): iterations per target and restart. (Default: 100)
        restarts (int): random starts per target. (Default: 1)
        n_target_classes (int): how many target classes to try (capped at num_classes − 1).
            (Default: 9)
        rho (float): checkpoint threshold ρ. (Default: 0.75)
        momentum (float): α. (Default: 0.75)
        early_stop (bool): stop attacking an example at its first adversarial iterate.
            (Default: True)

    Shape:
        x: (N, C, H, W) in [0, 1]; y: (N,); needs >= 4 classes.

    Example:
        >>> result = APGDT(n_target_classes=9)(model, x, y, "linf:8/255", seed=0)
    """

    loss: str = "dlr"
    n_target_classes: int = 9

    supports_targeted = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss != "dlr":
            raise ValueError(f"`loss` of apgd-t is the targeted DLR loss and must be 'dlr', got {self.loss!r}")
        check_int(self.n_target_classes, "n_target_classes", 1)

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, targets: Tensor | None,
             rng: ExampleRNG) -> Tensor:
        loss_fn = get_loss("dlr", targeted=True)
        with torch.no_grad():
            clean_logits = model(x)
        num_classes = clean_logits.shape[1]
        if num_classes < 4:
            raise ValueError(f"attack 'apgd-t' uses the targeted DLR loss and needs >= 4 classes, the model has {num_classes}")
        # Rank the classes on the clean input, y excluded (AutoAttack ranks the clean logits too).
        ranked = clean_logits.scatter(1, y.unsqueeze(1), -torch.inf).argsort(dim=1, descending=True)
        # Success means misclassified (into any class); each run maximizes the targeted loss
        # toward one class. Losses toward different targets are not comparable, so the clean
        # input enters the tracker with loss -inf.
        tracker = BestTracker(x)
        everyone = torch.arange(x.shape[0], device=x.device)
        tracker.update(everyone, x, torch.full_like(tracker.loss_best, -torch.inf), is_adversarial(clean_logits, y))
        for t in range(min(self.n_target_classes, num_classes - 1)):
            for r in range(self.restarts):
                idx = tracker.active()
                if idx.numel() == 0:
                    return tracker.x_best
                xs = x[idx]
                x0 = threat.random_init(xs, rng.subset(idx), tag=(self.name, "init", t, r))
                apgd_run(model, xs, y[idx], ranked[idx, t], threat, x0, steps=self.steps,
                         loss_fn=loss_fn, tracker=tracker, idx=idx, rho=self.rho, momentum=self.momentum,
                         early_stop=self.early_stop, untargeted_success=True)
        return tracker.x_best


def _clean_tracker(model: nn.Module, x: Tensor, y: Tensor, targets: Tensor | None, loss_fn: LossFn) -> BestTracker:
    """A tracker that has seen the clean input: already-adversarial examples are done."""
    tracker = BestTracker(x)
    with torch.no_grad():
        logits = model(x)
        tracker.update(torch.arange(x.shape[0], device=x.device), x, loss_fn(logits, y, targets),
                       is_adversarial(logits, y, targets))
    return tracker
