"""Projected gradient descent (Madry et al. 2018) and the iterative loop it shares with BIM and MI-FGSM."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._checks import check_in_range
from .._rng import ExampleRNG
from ..threat import ThreatModel
from .base import Attack, BestTracker, check_bool, check_int, check_optional_positive, is_adversarial, \
    logits_and_grad, register_attack
from .losses import LossFn, check_loss_name, get_loss

__all__ = ["PGD", "iterate"]


def iterate(model: nn.Module, x: Tensor, y: Tensor, targets: Tensor | None, threat: ThreatModel, x0: Tensor, *,
            steps: int, step_size: float, loss_fn: LossFn, tracker: BestTracker | None, idx: Tensor,
            early_stop: bool = True, decay: float | None = None, l1_fraction: float = 0.05,
            final_eval: bool = True) -> tuple[Tensor, Tensor]:
    """The projected steepest-ascent loop: ``x ← P(x + step_size · direction(∇loss))``, `steps` times.

    The functional core of PGD, BIM and MI-FGSM. `x`, `y`, `targets` and the start `x0` are
    the rows `idx` of the full batch whose bookkeeping `tracker` holds; every iterate (x0
    included) is offered to the tracker (None: no bookkeeping, only without ``early_stop``).
    ``final_eval=False`` skips the forward pass that scores the last iterate (its loss is then
    -inf): a caller that keeps the last iterate whatever its loss saves one pass.

    With ``early_stop`` an example leaves the batch as soon as it is adversarial, so later
    steps cost only what is still unbroken. Without it every example runs all steps (Madry's
    training-time PGD).

    With ``decay = mu`` the step follows the momentum g ← mu·g + ∇/‖∇‖₁ (MI-FGSM,
    Dong et al. 2018) instead of the raw gradient.

    Returns:
        the last iterate (len(idx), ...) and its loss (len(idx),); rows that stopped early keep
        their last iterate (the tracker holds their successful point).
    """
    if tracker is None and early_stop:
        raise ValueError("early stopping needs a `tracker`")
    n = x.shape[0]
    local = torch.arange(n, device=x.device)  # rows of this run still being attacked
    x_t = x0.detach()
    last_x, last_loss = x0.detach().clone(), torch.full((n,), -math.inf, device=x.device, dtype=x.dtype)
    mom = torch.zeros_like(x) if decay is not None else None
    for t in range(steps + 1):
        tg = None if targets is None else targets[local]
        if t < steps:
            logits, loss, grad = logits_and_grad(model, x_t, y[local], loss_fn, tg)
        elif not final_eval:
            last_x[local] = x_t
            break
        else:  # the last iterate needs its loss and prediction, not a gradient
            with torch.no_grad():
                logits = model(x_t)
                loss = loss_fn(logits, y[local], tg)
        if t == steps or early_stop or tracker is not None:
            succ = is_adversarial(logits, y[local], tg)
            if tracker is not None:
                tracker.update(idx[local], x_t, loss, succ)
            last_x[local], last_loss[local] = x_t, loss.to(last_loss.dtype)
        if t == steps:
            break
        if early_stop and bool(succ.any()):
            keep = ~succ
            local, x_t, grad = local[keep], x_t[keep], grad[keep]
            if mom is not None:
                mom = mom[keep]
            if local.numel() == 0:
                break
        if mom is not None:
            l1 = grad.reshape(grad.shape[0], -1).abs().sum(dim=1).clamp_min(1e-12)
            mom = decay * mom + grad / l1.view(-1, *([1] * (grad.dim() - 1)))
            grad = mom
        x_t = threat.project(threat.step(x_t, grad, step_size, l1_fraction=l1_fraction), x[local]).detach()
    return last_x, last_loss


def run_iterative(attack: Attack, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel,
                  targets: Tensor | None, rng: ExampleRNG, *, steps: int, step_size: float, loss: str,
                  restarts: int, random_start: bool, early_stop: bool, decay: float | None = None,
                  l1_fraction: float = 0.05) -> Tensor:
    """Restarts around `iterate`: each restart runs only on the examples not yet broken.

    With ``early_stop`` the returned point is the first successful iterate of an example, else
    its highest-loss iterate over all restarts. Without it, every example runs every step, and
    the returned point is the final iterate of the restart with the highest final loss
    (restarts still skip examples whose final iterate already succeeded).
    """
    loss_fn = get_loss(loss, targets is not None)
    if not early_stop:
        return _run_fixed(attack, model, x, y, threat, targets, rng, steps=steps, step_size=step_size,
                          loss_fn=loss_fn, restarts=restarts, random_start=random_start, decay=decay,
                          l1_fraction=l1_fraction)
    tracker = BestTracker(x)
    everyone = torch.arange(x.shape[0], device=x.device)
    # Iterate "-1" is the clean input: already-adversarial examples are returned unchanged.
    with torch.no_grad():
        logits = model(x)
        tracker.update(everyone, x, loss_fn(logits, y, targets), is_adversarial(logits, y, targets))
    for r in range(restarts):
        idx = tracker.active()
        if idx.numel() == 0:
            break
        xs = x[idx]
        x0 = threat.random_init(xs, rng.subset(idx), tag=(attack.name, "init", r)) if random_start else xs
        ts = None if targets is None else targets[idx]
        iterate(model, xs, y[idx], ts, threat, x0, steps=steps, step_size=step_size, loss_fn=loss_fn,
                tracker=tracker, idx=idx, early_stop=True, decay=decay, l1_fraction=l1_fraction)
    return tracker.x_best


def _run_fixed(attack: Attack, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel,
               targets: Tensor | None, rng: ExampleRNG, *, steps: int, step_size: float, loss_fn: LossFn,
               restarts: int, random_start: bool, decay: float | None, l1_fraction: float) -> Tensor:
    """`run_iterative` without early stopping: every step on every example, the final iterate kept.

    No bookkeeping on the way: exactly `steps` forward+backward passes per restart, plus, only
    when there are several restarts, one forward pass per restart to compare final losses and
    skip the examples already broken. A single restart costs what a hand-written loop costs.
    """
    out = x.clone()
    out_loss = torch.full((x.shape[0],), -math.inf, device=x.device, dtype=x.dtype)
    out_succ = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for r in range(restarts):
        idx = (~out_succ).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        xs = x[idx]
        x0 = threat.random_init(xs, rng.subset(idx), tag=(attack.name, "init", r)) if random_start else xs
        ts = None if targets is None else targets[idx]
        last_x, last_loss = iterate(model, xs, y[idx], ts, threat, x0, steps=steps, step_size=step_size,
                                    loss_fn=loss_fn, tracker=None, idx=idx, early_stop=False, decay=decay,
                                    l1_fraction=l1_fraction, final_eval=restarts > 1)
        if restarts == 1:
            return last_x if idx.numel() == x.shape[0] else out.index_copy_(0, idx, last_x)
        better = last_loss > out_loss[idx]
        out[idx[better]] = last_x[better]
        out_loss[idx[better]] = last_loss[better]
        if r < restarts - 1:
            with torch.no_grad():
                out_succ[idx] = is_adversarial(model(out[idx]), y[idx], ts)
    return out


@register_attack("pgd")
@dataclass(frozen=True)
class PGD(Attack):
    r"""Projected Gradient Descent with random start.

    Paper: Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep Learning Models Resistant to
    Adversarial Attacks", ICLR 2018 (https://arxiv.org/abs/1706.06083).

    Distance: linf, l2, l1 (the l1 step moves the top ``l1_fraction`` of the coordinates,
    Tramèr & Boneh 2019). Each step is ``x ← Π_{B(x₀, ε) ∩ [0,1]}(x + α · direction(∇loss))``.

    Arguments:
        steps (int): gradient steps per restart. (Default: 10)
        step_size (float | None): α in pixel units of the threat's norm; None means
            ``2.5 · eps / steps`` (Madry et al.'s rule: enough to cross the ball and back).
            (Default: None)
        restarts (int): number of random starts (>= 1, AutoAttack's counting); each restart runs
            only on the examples not yet broken. (Default: 1)
        random_start (bool): start uniformly in the ball (``threat.random_init``); False starts
            at x (and then ``restarts`` must be 1). (Default: True)
        loss (str): "ce", "cw" (margin) or "dlr" (see `bastion.attacks.losses`). (Default: "ce")
        early_stop (bool): stop attacking an example at its first adversarial iterate and
            return that iterate (else its highest-loss iterate). False runs every step on every
            example and returns the final iterate, as adversarial training wants. (Default: True)
        l1_fraction (float): fraction of coordinates an l1 step moves. (Default: 0.05)

    Shape:
        x: (N, C, H, W) in [0, 1]; y: (N,); returns `AttackResult` with x_adv (N, C, H, W).

    Example:
        >>> attack = PGD(steps=20, restarts=2)
        >>> result = attack(model, x, y, "linf:8/255", seed=0)
        >>> robust_accuracy = 1 - result.success_rate
    """

    steps: int = 10
    step_size: float | None = None
    restarts: int = 1
    random_start: bool = True
    loss: str = "ce"
    early_stop: bool = True
    l1_fraction: float = 0.05

    supports_norms = ("linf", "l2", "l1")

    def __post_init__(self) -> None:
        check_int(self.steps, "steps", 1)
        check_optional_positive(self.step_size, "step_size")
        check_int(self.restarts, "restarts", 1)
        check_bool(self.random_start, "random_start")
        check_bool(self.early_stop, "early_stop")
        check_loss_name(self.loss)
        check_in_range(self.l1_fraction, "l1_fraction", 0.0, 1.0)
        if self.restarts > 1 and not self.random_start:
            raise ValueError("`restarts` > 1 needs `random_start=True` (restarts from x would repeat the same run)")

    @property
    def randomized(self) -> bool:
        return self.random_start

    def _step_size(self, threat: ThreatModel) -> float:
        return self.step_size if self.step_size is not None else 2.5 * threat.eps / self.steps

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, targets: Tensor | None,
             rng: ExampleRNG) -> Tensor:
        return run_iterative(self, model, x, y, threat, targets, rng, steps=self.steps,
                             step_size=self._step_size(threat), loss=self.loss, restarts=self.restarts,
                             random_start=self.random_start, early_stop=self.early_stop,
                             l1_fraction=self.l1_fraction)
