"""Adaptive attacks on detectors: fool the classifier and the detector at once.

Carlini & Wagner, "Adversarial Examples Are Not Easily Detected: Bypassing Ten Detection
Methods", AISec 2017 (https://arxiv.org/abs/1705.07263): an attacker who knows the detector
adds it to its loss. Both attacks here read the detector's declarations
(`bastion.defenses.detectors.base`):

* ``detector.adaptive_loss(x)`` / ``detector.adaptive_terms(x)`` — margins that are ≤ 0
  when the input passes undetected, differentiable (through BPDA stand-ins where the detector
  is not: feature squeezing);
* ``detector.randomized`` — the detector samples randomness (MC dropout): the margins are
  averaged over ``eot`` draws per step (EOT);
* success means *misclassified and undetected* (the real detector, one draw).

`DetectorAwarePGD` ("detector-pgd") maximizes ``loss(f(x), y) − λ · penalty(x)`` within the
threat model. `DetectorAwareCW` ("detector-cw") minimizes ``‖δ‖₂² + c · (f_cls + f_det)``
(C&W L2 with the detector's margin as a second hinge). For detectors made of parts (MRR's N
defenders, MagNet's components) ``combine="sum"`` or ``"max"`` makes the attacker push
*every* part's margin below zero at once — the white-box attack on MRR of the MRR article.

Both are registered attacks with ``detector=None`` by default, in which case they are plain
PGD / C&W L2 (so the attack contract applies to them as to every attack). The
`AttackResult.success` the base class reports is the *classifier's* (misclassified);
whether the detector caught the point is for `bastion.evaluation.detection.DetectionEval`
(or ``detector.detect``) to say.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_positive
from .._rng import ExampleRNG
from ..threat import ThreatModel
from .base import Attack, BestTracker, attack_mode, check_bool, check_int, check_optional_positive, register_attack
from .losses import check_loss_name, get_loss, margin
from .pgd import run_iterative

__all__ = ["DetectorAwareCW", "DetectorAwarePGD", "detector_penalty"]

COMBINE = ("margin", "sum", "max")


def _check_detector(detector: Any) -> None:
    if detector is None:
        return
    for attr in ("adaptive_loss", "adaptive_terms", "score", "threshold"):
        if not hasattr(detector, attr):
            raise TypeError(f"`detector` must be a bastion Detector (with {attr}), got {type(detector).__name__}")


def _need_threshold(detector: Any) -> float:
    if getattr(detector, "threshold", None) is None:
        raise ValueError("the detector has no threshold: calibrate it on clean validation data before attacking it "
                         "(the attack must know where 'undetected' begins)")
    return float(detector.threshold)


def detector_penalty(detector: Any, x: Tensor, combine: str = "margin", kappa: float = 0.0, eot: int = 1) -> Tensor:
    """The detector term an attacker minimizes (N,), ≥ 0, zero once x passes with margin `kappa`.

    ``"margin"``: ``detector.adaptive_loss`` (its own one-number margin); ``"sum"`` / ``"max"``:
    the sum / max of ``max(0, term + kappa)`` over ``detector.adaptive_terms`` (one per part).
    Averaged over `eot` draws for randomized detectors.
    """
    total = None
    for _ in range(eot):
        if combine == "margin":
            p = detector.adaptive_loss(x, kappa=kappa)
        else:
            terms = (detector.adaptive_terms(x) + kappa).clamp_min(0.0)
            p = terms.sum(1) if combine == "sum" else (terms.amax(1) if terms.shape[1] else terms.sum(1))
        total = p if total is None else total + p
    assert total is not None
    return total / eot


@torch.no_grad()
def _undetected(detector: Any, x: Tensor, threshold: float) -> Tensor:
    return detector.score(x) <= threshold


def _eot(attack: Any, detector: Any) -> int:
    if attack.eot is not None:
        return attack.eot
    return 4 if getattr(detector, "randomized", False) else 1


@register_attack("detector-pgd")
@dataclass(frozen=True)
class DetectorAwarePGD(Attack):
    r"""PGD against classifier + detector: maximize ``loss(f(x), y) − λ · penalty(x)``.

    Paper: Carlini & Wagner, "Adversarial Examples Are Not Easily Detected: Bypassing Ten
    Detection Methods", AISec 2017 (https://arxiv.org/abs/1705.07263), with PGD (Madry et al.
    2018) as the optimizer.

    Distance: linf, l2, l1. Success (for early stopping and the point kept): misclassified
    *and* not flagged by the detector; failing that, the iterate with the highest objective.

    Arguments:
        detector: a fitted and calibrated `Detector`, or None (then this is plain PGD).
        lam (float): λ, the weight of the detector term (in units of the detector's clean-score
            spread). (Default: 1.0)
        combine (str): "margin" (the detector's `adaptive_loss`), "sum" or "max" over its parts'
            margins (`adaptive_terms`). (Default: "margin")
        kappa (float): required margin below the threshold. (Default: 0.0)
        eot (int | None): draws of a randomized detector averaged per step; None: 4 for a
            randomized detector, else 1. (Default: None)
        steps, step_size, restarts, random_start, loss: as `PGD`. (Defaults: 40, None → 2.5·eps/steps, 1,
            True, "ce")

    Example:
        >>> det = create_detector("kde").fit(model, x_train, y_train); det.calibrate(x_val, 0.05)
        >>> res = DetectorAwarePGD(detector=det, lam=2.0)(model, x, y, "linf:0.1")
        >>> det.detect(res.x_adv).rate        # far lower than after plain PGD
    """

    detector: Any = field(default=None, compare=False)
    lam: float = 1.0
    combine: str = "margin"
    kappa: float = 0.0
    eot: int | None = None
    steps: int = 40
    step_size: float | None = None
    restarts: int = 1
    random_start: bool = True
    loss: str = "ce"

    supports_norms = ("linf", "l2", "l1")
    supports_targeted = False

    def __post_init__(self) -> None:
        _check_detector(self.detector)
        check_positive(self.lam, "lam", allow_zero=True)
        if self.combine not in COMBINE:
            raise ValueError(f"`combine` must be one of {', '.join(map(repr, COMBINE))}; got {self.combine!r}")
        check_positive(self.kappa, "kappa", allow_zero=True)
        if self.eot is not None:
            check_int(self.eot, "eot", 1)
        check_int(self.steps, "steps", 1)
        check_optional_positive(self.step_size, "step_size")
        check_int(self.restarts, "restarts", 1)
        check_bool(self.random_start, "random_start")
        check_loss_name(self.loss)
        if self.restarts > 1 and not self.random_start:
            raise ValueError("`restarts` > 1 needs `random_start=True` (restarts from x would repeat the same run)")

    @property
    def randomized(self) -> bool:
        return self.random_start or bool(getattr(self.detector, "randomized", False))

    def config(self) -> dict[str, Any]:
        return _config(self)

    def __repr__(self) -> str:
        det = "None" if self.detector is None else getattr(self.detector, "name", type(self.detector).__name__)
        return (f"DetectorAwarePGD(detector={det}, lam={self.lam}, combine={self.combine!r}, steps={self.steps}, "
                f"restarts={self.restarts})")

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, targets: Tensor | None,
             rng: ExampleRNG) -> Tensor:
        step_size = self.step_size if self.step_size is not None else 2.5 * threat.eps / self.steps
        if self.detector is None:
            return run_iterative(self, model, x, y, threat, targets, rng, steps=self.steps, step_size=step_size,
                                 loss=self.loss, restarts=self.restarts, random_start=self.random_start,
                                 early_stop=True)
        det = self.detector
        threshold = _need_threshold(det)
        eot = _eot(self, det)
        loss_fn = get_loss(self.loss, False)
        tracker = BestTracker(x)
        with attack_mode(det):
            def objective(xs: Tensor, ys: Tensor) -> tuple[Tensor, Tensor, Tensor]:
                with torch.enable_grad():
                    xg = xs.detach().requires_grad_(True)
                    logits = model(xg)
                    j = loss_fn(logits, ys, None) - self.lam * detector_penalty(det, xg, self.combine, self.kappa, eot)
                    (g,) = torch.autograd.grad(j.sum(), [xg], allow_unused=True)
                return j.detach(), logits.detach(), (torch.zeros_like(xg) if g is None else g.detach())

            everyone = torch.arange(x.shape[0], device=x.device)
            j0, logits0, _ = objective(x, y)
            tracker.update(everyone, x, j0, (logits0.argmax(1) != y) & _undetected(det, x, threshold))
            for r in range(self.restarts):
                idx = tracker.active()
                if idx.numel() == 0:
                    break
                xs = x[idx]
                x_t = threat.random_init(xs, rng.subset(idx), tag=(self.name, "init", r)) if self.random_start else xs
                for t in range(self.steps + 1):
                    j, logits, g = objective(x_t, y[idx])
                    ok = (logits.argmax(1) != y[idx]) & _undetected(det, x_t, threshold)
                    tracker.update(idx, x_t, j, ok)
                    if t == self.steps:
                        break
                    keep = ~ok
                    if not bool(keep.all()):
                        idx, x_t, g, xs = idx[keep], x_t[keep], g[keep], xs[keep]
                        if idx.numel() == 0:
                            break
                    x_t = threat.project(threat.step(x_t, g, step_size), xs).detach()
        return tracker.x_best


@register_attack("detector-cw")
@dataclass(frozen=True)
class DetectorAwareCW(Attack):
    r"""C&W L2 against classifier + detector: minimize ``‖δ‖₂² + c·(f_cls(x') + f_det(x'))``.

    Paper: Carlini & Wagner, "Adversarial Examples Are Not Easily Detected: Bypassing Ten
    Detection Methods", AISec 2017 (https://arxiv.org/abs/1705.07263), on the L2 attack of
    "Towards Evaluating the Robustness of Neural Networks" (S&P 2017, arXiv:1608.04644).

    x' = (tanh(w) + 1)/2; f_cls = max(z_y − max_{j≠y} z_j + κ, 0); f_det is the detector's
    penalty (`detector_penalty` with `combine` and ``det_kappa``): against MRR with
    ``combine="sum"`` (default) every defender's margin must go below zero at once. Adam on w,
    a per-example binary search over c (×10 until a first success, then bisection), and the
    smallest successful perturbation (misclassified *and* undetected) is kept; examples with no
    success return the clean input.

    Distance: l2, minimum-norm (``threat=None``); untargeted.

    Arguments:
        detector: a fitted and calibrated `Detector`, or None (plain C&W L2).
        combine (str): "sum", "max" or "margin". (Default: "sum")
        binary_search_steps (int): (Default: 5)
        max_iterations (int): Adam steps per value of c. (Default: 100)
        initial_const (float): first c. (Default: 0.1)
        learning_rate (float): Adam's step. (Default: 0.01)
        kappa (float): classifier confidence κ. (Default: 0.0)
        det_kappa (float): required detector margin. (Default: 0.0)
        eot (int | None): draws per step of a randomized detector (None: 4 if randomized, else 1).
        abort_early (bool): stop an example's run when its loss stalls (0.01% over
            ``max_iterations // 10`` steps). (Default: True)
    """

    detector: Any = field(default=None, compare=False)
    combine: str = "sum"
    binary_search_steps: int = 5
    max_iterations: int = 100
    initial_const: float = 0.1
    learning_rate: float = 0.01
    kappa: float = 0.0
    det_kappa: float = 0.0
    eot: int | None = None
    abort_early: bool = True

    supports_norms = ("l2",)
    supports_targeted = False
    minimum_norm = True

    def __post_init__(self) -> None:
        _check_detector(self.detector)
        if self.combine not in COMBINE:
            raise ValueError(f"`combine` must be one of {', '.join(map(repr, COMBINE))}; got {self.combine!r}")
        check_int(self.binary_search_steps, "binary_search_steps", 1)
        check_int(self.max_iterations, "max_iterations", 1)
        check_positive(self.initial_const, "initial_const")
        check_positive(self.learning_rate, "learning_rate")
        check_positive(self.kappa, "kappa", allow_zero=True)
        check_positive(self.det_kappa, "det_kappa", allow_zero=True)
        if self.eot is not None:
            check_int(self.eot, "eot", 1)
        check_bool(self.abort_early, "abort_early")

    @property
    def randomized(self) -> bool:
        return bool(getattr(self.detector, "randomized", False))

    def config(self) -> dict[str, Any]:
        return _config(self)

    def __repr__(self) -> str:
        det = "None" if self.detector is None else getattr(self.detector, "name", type(self.detector).__name__)
        return (f"DetectorAwareCW(detector={det}, combine={self.combine!r}, binary_search_steps="
                f"{self.binary_search_steps}, max_iterations={self.max_iterations})")

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, targets: Tensor | None,
             rng: ExampleRNG) -> Tensor:
        det = self.detector
        threshold = _need_threshold(det) if det is not None else math.inf
        eot = _eot(self, det) if det is not None else 1
        n = x.shape[0]
        shape = (-1,) + (1,) * (x.dim() - 1)
        w0 = torch.atanh((2 * x - 1) * (1 - 1e-6))
        lower = torch.zeros(n, device=x.device, dtype=x.dtype)
        upper = torch.full((n,), math.inf, device=x.device, dtype=x.dtype)
        const = torch.full((n,), float(self.initial_const), device=x.device, dtype=x.dtype)
        best_l2 = torch.full((n,), math.inf, device=x.device, dtype=x.dtype)
        best_x = x.clone()
        check_every = max(1, self.max_iterations // 10)
        ctx = attack_mode(det) if det is not None else _nullcontext()
        with ctx:
            for _ in range(self.binary_search_steps):
                w = w0.clone()
                m, v = torch.zeros_like(w), torch.zeros_like(w)
                active = torch.ones(n, dtype=torch.bool, device=x.device)
                prev = torch.full((n,), math.inf, device=x.device, dtype=x.dtype)
                found = torch.zeros(n, dtype=torch.bool, device=x.device)
                for it in range(self.max_iterations):
                    idx = active.nonzero().squeeze(1)
                    if idx.numel() == 0:
                        break
                    with torch.enable_grad():
                        wg = w[idx].detach().requires_grad_(True)
                        xa = (torch.tanh(wg) + 1) / 2
                        logits = model(xa)
                        l2sq = (xa - x[idx]).flatten(1).pow(2).sum(1)
                        gap = margin(logits, y[idx])  # > 0: misclassified
                        f_cls = (self.kappa - gap).clamp_min(0.0)
                        f_det = detector_penalty(det, xa, self.combine, self.det_kappa, eot) if det is not None \
                            else torch.zeros_like(f_cls)
                        loss = l2sq + const[idx] * (f_cls + f_det)
                        (g,) = torch.autograd.grad(loss.sum(), [wg])
                    with torch.no_grad():
                        ok = (logits.argmax(1) != y[idx]) & (gap.detach() >= self.kappa)
                        if det is not None and bool(ok.any()):
                            ok = ok & _undetected(det, xa.detach(), threshold)
                        better = ok & (l2sq.detach() < best_l2[idx])
                        sel = idx[better]
                        best_l2[sel] = l2sq.detach()[better]
                        best_x[sel] = xa.detach()[better]
                        found[idx[ok]] = True
                        keep = torch.ones_like(ok)
                        if self.abort_early and it % check_every == 0:
                            # stalled (0.01% over the last check_every steps): stop before this update,
                            # exactly as plain `CW` does, so that without a detector the two agree
                            lv = loss.detach()
                            keep = lv <= 0.9999 * prev[idx]
                            prev[idx] = lv
                            active[idx[~keep]] = False
                    # Adam, per coordinate (so a batch equals its examples run one by one)
                    a, gk, t = idx[keep], g[keep], it + 1
                    m[a] = 0.9 * m[a] + 0.1 * gk
                    v[a] = 0.999 * v[a] + 0.001 * gk * gk
                    mh, vh = m[a] / (1 - 0.9 ** t), v[a] / (1 - 0.999 ** t)
                    w[a] = (w[a] - self.learning_rate * mh / (vh.sqrt() + 1e-8)).detach()
                # binary search on c, per example
                lower = torch.where(found, lower, const)
                upper = torch.where(found, torch.minimum(upper, const), upper)
                const = torch.where(torch.isinf(upper), const * 10, (lower + upper) / 2)
        out = torch.where(torch.isinf(best_l2).view(shape), x, best_x)
        return out


def _config(attack: Attack) -> dict[str, Any]:
    """Hyper-parameters with the detector by its own config (dataclasses.asdict would deep-copy it)."""
    cfg: dict[str, Any] = {"name": attack.name}
    for f in dataclasses.fields(attack):
        if f.name != "detector":
            cfg[f.name] = getattr(attack, f.name)
    det = getattr(attack, "detector", None)
    cfg["detector"] = None if det is None else det.config()
    return cfg


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
