"""The Jacobian-based Saliency Map Attack (Papernot et al. 2016), over pairs of features."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._checks import check_in_range
from .._rng import ExampleRNG
from ..threat import ThreatModel
from .base import Attack, register_attack
from .deepfool import logit_gradients

__all__ = ["JSMA"]

# Pair scores are (examples × D × D); score this many elements at a time at most (~64 MB of
# float32 per temporary), so 28×28 or 32×32×3 inputs run in bounded memory.
_PAIR_CHUNK = 2**24


@register_attack("jsma")
@dataclass(frozen=True)
class JSMA(Attack):
    r"""Jacobian-based Saliency Map Attack: change the pair of features that most helps the target.

    Paper: Papernot, McDaniel, Jha, Fredrikson, Celik & Swami, "The Limitations of Deep Learning
    in Adversarial Settings", IEEE EuroS&P 2016 (https://arxiv.org/abs/1511.07528), Algorithms 2
    and 3 (the saliency map over pairs of features).

    Distance: l0 (changed coordinates; each channel of each pixel is one feature). Targeted.
    Minimum-norm in spirit: it changes features one pair at a time and stops as soon as the
    target is reached, so ``threat=None`` (or ``"l0:inf"``) is the natural call; a finite l0
    eps caps the number of changed features at min(⌊gamma·D⌋, eps).

    Each step takes the gradients of the target logit z_t and of the sum of the other logits,
    ∇z_t and ∇Σ_{j≠t} z_j (one forward and one batched backward pass), and, for every pair
    (p, q) of distinct features in the search domain,

        α = ∂z_t/∂x_p + ∂z_t/∂x_q,    β = Σ_{j≠t} (∂z_j/∂x_p + ∂z_j/∂x_q).

    For ``theta > 0`` (increasing features) a pair is admissible when α > 0 and β < 0 (for
    ``theta < 0``: α < 0 and β > 0) — it moves the target up and the others down — and the pair
    with the largest α · |β| is changed by theta and clipped to [0, 1]. The search domain is
    the features not yet saturated (< 1 when increasing, > 0 when decreasing); a feature
    leaves it when it saturates (with theta = ±1: at once). The gradients are those of the
    logits (as cleverhans; the paper's F is the softmax output, whose saliency the logits
    rank alike near a confident prediction and without its vanishing gradients).

    An example stops when it reaches its target, when no admissible pair is left, or when the
    next pair would take it past the budget of ⌊gamma·D⌋ changed features; the l0 norm of the
    result never exceeds that budget. Examples run in one batch (the pair scores for all of
    them at once); each stops on its own.

    Targets: ``targets=`` as given. Without targets, each example gets a target drawn uniformly
    among the classes ≠ y from the per-example rng (reproducible under the seed, independent
    of the rest of the batch), and it also stops as soon as it is misclassified — the result is
    then judged untargeted, as the base class does for ``targets=None``.

    Arguments:
        theta (float): change applied to each chosen feature, in [-1, 1], ≠ 0; > 0 increases
            features. (Default: 1.0)
        gamma (float): the largest fraction of features that may change, in (0, 1].
            (Default: 0.1)

    Shape:
        x: (N, C, H, W) in [0, 1]; y: (N,); returns `AttackResult` with x_adv (N, C, H, W).

    Example:
        >>> result = JSMA(gamma=0.2)(model, x, y, targets=(y + 1) % 10)
        >>> result.norms["l0"]            # number of changed features per example
    """

    theta: float = 1.0
    gamma: float = 0.1

    supports_norms = ("l0",)
    minimum_norm = True

    def __post_init__(self) -> None:
        check_in_range(self.theta, "theta", -1.0, 1.0)
        if self.theta == 0:
            raise ValueError("`theta` must be nonzero (the change applied to a chosen feature)")
        check_in_range(self.gamma, "gamma", 0.0, 1.0)
        if self.gamma == 0:
            raise ValueError("`gamma` must be > 0 (the largest fraction of features that may change)")

    @property
    def randomized(self) -> bool:
        # only the drawn targets are random; they are drawn when no targets are given
        return True

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, targets: Tensor | None,
             rng: ExampleRNG) -> Tensor:
        lo, hi = ThreatModel.box
        n = x.shape[0]
        d = x[0].numel()
        with torch.no_grad():
            k = model(x).shape[1]
        untargeted = targets is None
        # without targets: uniform over the K − 1 classes other than y
        tgt = targets if targets is not None else (y + 1 + rng.randint(k - 1, (), tag=("jsma", "target"))) % k
        budget = math.floor(self.gamma * d)
        if threat.bounded:
            budget = min(budget, int(threat.eps))
        increase = self.theta > 0

        x_adv = x.flatten(1).clone()
        domain = x_adv < hi if increase else x_adv > lo
        changed = torch.zeros_like(domain)
        eye = torch.eye(k, device=x.device, dtype=x.dtype)
        active = torch.arange(n, device=x.device)
        while active.numel():
            xa, ta = x_adv[active], tgt[active]
            # weights: row 0 picks z_t, row 1 sums the other logits
            et = eye[ta]
            z, g = logit_gradients(model, xa.view(-1, *x.shape[1:]), torch.stack([et, 1.0 - et]))
            pred = z.argmax(dim=1)
            done = pred == ta
            if untargeted:
                done |= pred != y[active]
            slack = budget - changed[active].sum(dim=1)
            p, q, ok = _best_pairs(g[0].flatten(1), g[1].flatten(1), domain[active], changed[active], slack,
                                   increase)
            go = ~done & ok
            active, p, q = active[go], p[go], q[go]
            if active.numel() == 0:
                break
            for f in (p, q):
                new = (x_adv[active, f] + self.theta).clamp(lo, hi)
                x_adv[active, f] = new
                changed[active, f] = True
                domain[active, f] = new < hi if increase else new > lo
        return x_adv.view_as(x)


def _best_pairs(gt: Tensor, go: Tensor, domain: Tensor, changed: Tensor, slack: Tensor,
                increase: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The most salient admissible pair (p, q) per example, and whether one exists.

    gt, go: (A, D) gradients of the target logit and of the sum of the others; domain, changed:
    (A, D) bool; slack: (A,) how many more features may change. Scores all D² pairs per example,
    in chunks of examples to bound memory.
    """
    a, d = gt.shape
    p = torch.zeros(a, dtype=torch.long, device=gt.device)
    ok = torch.zeros(a, dtype=torch.bool, device=gt.device)
    offdiag = ~torch.eye(d, dtype=torch.bool, device=gt.device)
    step = max(1, _PAIR_CHUNK // max(d * d, 1))
    for s in range(0, a, step):
        e = slice(s, s + step)
        alpha = gt[e].unsqueeze(2) + gt[e].unsqueeze(1)  # (B, D, D)
        beta = go[e].unsqueeze(2) + go[e].unsqueeze(1)
        dom = domain[e]
        new = (~changed[e]).to(torch.long)
        # a pair costs the features it newly changes; it must fit the remaining budget
        fits = (new.unsqueeze(2) + new.unsqueeze(1)) <= slack[e].view(-1, 1, 1)
        signs = (alpha > 0) & (beta < 0) if increase else (alpha < 0) & (beta > 0)
        valid = dom.unsqueeze(2) & dom.unsqueeze(1) & offdiag & fits & signs
        score = torch.where(valid, -alpha * beta, torch.zeros_like(alpha))  # α·|β| > 0 where valid
        best = score.flatten(1).max(dim=1)
        p[e] = best.indices
        ok[e] = best.values > 0
    return p // d, p % d, ok
