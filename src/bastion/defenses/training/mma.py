"""MMA: max-margin adversarial training with the adaptive-norm PGD (AN-PGD) margin search."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..._checks import check_in_range, check_positive
from ...attacks.base import check_bool, check_int
from ...threat import ThreatModel
from .adversarial import AdversarialObjective, _check_mode, generation_mode, seeded_rng
from .objectives import OBJECTIVES

__all__ = ["MMA", "soft_logit_margin"]

# The attack searches up to 1.05·dmax (the reference's attack_maxeps), so that an example whose
# margin is just at dmax is still found and then dropped by the hinge.
_SEARCH_HEADROOM = 1.05
_HASH_BITS = 20  # content-hash weights < 2^20, pixels quantized to 16 bits: every sum fits in int64


def soft_logit_margin(logits: Tensor, y: Tensor) -> Tensor:
    """``logsumexp_{j≠y} z_j − z_y`` per example: < 0 means confidently correct, ≥ 0 (soft-)adversarial.

    The "slm" loss of the MMA reference code (advertorch's soft logit margin), used both as the
    attack loss and as the success criterion of the margin search. With two classes it is the
    plain logit margin z_other − z_y.
    """
    others = logits.scatter(1, y.unsqueeze(1), float("-inf"))
    return others.logsumexp(dim=1) - logits.gather(1, y.unsqueeze(1)).squeeze(1)


def _per_example(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def _project(x_adv: Tensor, x: Tensor, eps: Tensor, norm: str) -> Tensor:
    """Projection onto ball(x, eps_i) ∩ [0, 1] with a radius per example (linf: exact; l2: rescale, then box).

    `ThreatModel.project` takes one eps for the whole batch; AN-PGD needs one per example.
    """
    e = _per_example(eps, x)
    if norm == "linf":
        return torch.minimum(torch.maximum(x_adv, x - e), x + e).clamp(*ThreatModel.box)
    delta = x_adv - x
    n = delta.flatten(1).norm(dim=1).clamp_min(1e-30)
    return (x + delta * _per_example((eps / n).clamp(max=1.0), delta)).clamp(*ThreatModel.box)


def _random_start(x: Tensor, eps: Tensor, norm: str) -> Tensor:
    """Uniform in ball(x, eps_i) (as `ThreatModel.random_init`, radius per example), clipped to the box."""
    rng = seeded_rng(x)
    shape = tuple(x.shape[1:])
    e = _per_example(eps, x)
    if norm == "linf":
        delta = (2 * rng.uniform(shape, tag="mma-init") - 1) * e
    else:
        g = rng.normal(shape, tag=("mma-init", "dir"))
        r = rng.uniform((), tag=("mma-init", "radius")).double().pow(1.0 / g[0].numel()).to(g.dtype)
        delta = g / _per_example(g.flatten(1).norm(dim=1).clamp_min(1e-30), g) * _per_example(r, g) * e
    return (x + delta.to(x.dtype)).clamp(*ThreatModel.box)


@OBJECTIVES.register("mma", "Ding et al. 2020: per-example margin maximization; CE at the shortest successful "
                            "AN-PGD point (hinge at dmax).")
@dataclass
class MMA(AdversarialObjective):
    r"""Max-Margin Adversarial training.

    Paper: Ding, Sharma, Lui & Huang, "MMA Training: Direct Input Space Margin Maximization
    through Adversarial Training", ICLR 2020 (arXiv:1812.02637). MMA maximizes each correctly
    classified example's input-space margin d_θ(x, y) (the distance to the decision boundary)
    through the hinge ``max(0, dmax − d_θ)``, whose gradient is that of the loss at the closest
    boundary point. With the reference code's choices (clean-loss weight 1/3, cross-entropy as
    the margin loss):

        loss = c · CE(f(x), y) + (1 − c) · (1/N) [ Σ_{i correct, ε_i < dmax} CE(f(x'_i), y_i)
                                                   + Σ_{i misclassified} CE(f(x_i), y_i) ]

    with c = ``clean_weight``, "correct" meaning soft logit margin < 0 (`soft_logit_margin`), and
    (x'_i, ε_i) the approximately shortest successful perturbation of the paper's adaptive-norm
    PGD (AN-PGD):

    1. start from ε_i⁰ = this example's ε from the previous time it was seen (at least
       ``min_eps``; ``min_eps`` the first time) and run PGD on the soft logit margin inside
       the ε_i⁰-ball (uniform random start, ``steps`` steps of ``step_scale · ε_i⁰ / steps``);
    2. along the direction u_i = (x_PGD − x_i)/ε_i⁰, bisect ``search_steps`` times on ε in
       [0, 1.05·dmax] for the smallest ε with soft margin ≥ 0 at clip₀₁(x_i + ε u_i).

    Examples whose search ends at ε_i ≥ dmax (the hinge is flat there) contribute no gradient;
    misclassified examples contribute their clean cross-entropy.

    Honest simplifications and deviations:

    * per-example memory: the reference keys ε by dataset index; the Trainer gives objectives
      no indices, so ε is remembered in a fixed-size table (``memory_slots``) keyed by a hash
      of the image content. Augmented images (crop, flip) rarely repeat and start at
      ``min_eps``; slot collisions overwrite an entry (the example then also starts at
      ``min_eps``). The table is carried in checkpoints (exact resume); ``memory_slots=0``
      turns memory off.
    * the search returns the upper end of the final bisection bracket — the smallest ε known to
      be soft-adversarial along u_i (or 1.05·dmax when none is) — where the reference returns the
      bracket's midpoint, which may not be adversarial; and x' is clipped to the [0, 1] box,
      which the reference does not do for the final point.
    * the whole AN-PGD (PGD and search) runs in ``bn_mode`` (eval by default); the reference
      runs PGD in eval mode and the search in train mode.
    * only linf and l2 are supported (the paper's two threat models).

    The clean and the MMA forward passes are separate (batch-norm sees both), and the logits
    returned (train accuracy) are the clean ones.

    Args:
        hinge_max: dmax in pixel units; None means 1.5·eps (the reference's MNIST-linf run trains
            with dmax 0.45 for eps 0.3; its CIFAR-10 run MMA-12 uses 12/255 for 8/255).
        min_eps: smallest initial radius of the PGD; None means eps/3 (the reference's MNIST
            linf setting, 0.1 for eps 0.3).
        steps: PGD steps inside AN-PGD (the reference: 10 on CIFAR-10, 40 on MNIST).
        step_scale: PGD step = step_scale · ε_i⁰ / steps (2.5 in the reference).
        search_steps: bisection steps (10 in the reference).
        clean_weight: c, weight of the clean cross-entropy (1/3 in the reference; 0 is "OMMA").
        random_start: start the PGD uniformly in the ε_i⁰-ball.
        bn_mode: model mode during AN-PGD (``"eval"``, as the reference's PGD).
        memory_slots: size of the per-example ε table (0 disables it).
    """

    name: ClassVar[str] = "mma"

    hinge_max: float | None = None
    min_eps: float | None = None
    steps: int = 10
    step_scale: float = 2.5
    search_steps: int = 10
    clean_weight: float = 1.0 / 3.0
    random_start: bool = True
    bn_mode: str = "eval"
    memory_slots: int = 2**18

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hinge_max is not None:
            check_positive(self.hinge_max, "hinge_max")
        if self.min_eps is not None:
            check_positive(self.min_eps, "min_eps")
        check_int(self.steps, "steps", 1)
        check_positive(self.step_scale, "step_scale")
        check_int(self.search_steps, "search_steps", 0)
        check_in_range(self.clean_weight, "clean_weight", 0.0, 1.0)
        check_bool(self.random_start, "random_start")
        _check_mode(self.bn_mode)
        check_int(self.memory_slots, "memory_slots", 0)
        if self.initial_eps >= self.search_max:
            raise ValueError(f"`min_eps` ({self.initial_eps}) must be below 1.05 · hinge_max ({self.search_max})")
        self._keys: Tensor | None = None    # int64 content hash per slot (−1: empty)
        self._eps: Tensor | None = None     # remembered ε per slot
        self._hash_w: Tensor | None = None  # weights of the content hash, built for one image size

    # ----------------------------------------------------------------------- radii
    @property
    def dmax(self) -> float:
        """The hinge threshold dmax."""
        return self.hinge_max if self.hinge_max is not None else 1.5 * self.eps

    @property
    def initial_eps(self) -> float:
        """The smallest initial PGD radius."""
        return self.min_eps if self.min_eps is not None else self.eps / 3.0

    @property
    def search_max(self) -> float:
        """The upper end of the margin search (1.05·dmax)."""
        return _SEARCH_HEADROOM * self.dmax

    # ----------------------------------------------------------------------- memory
    def _hash(self, x: Tensor) -> Tensor:
        flat = x.detach().flatten(1)
        d = flat.shape[1]
        if self._hash_w is None or self._hash_w.shape[0] != d or self._hash_w.device != x.device:
            g = torch.Generator().manual_seed(0x5EED)
            self._hash_w = torch.randint(1, 2**_HASH_BITS, (d,), generator=g).to(x.device)
        q = torch.round(flat.double().clamp(0, 1) * 65535).long()
        return (q * self._hash_w).sum(dim=1)  # >= 0, below 2^63 for images of < 2^27 values

    def _recall(self, x: Tensor) -> Tensor:
        eps = torch.full((x.shape[0],), self.initial_eps, device=x.device, dtype=x.dtype)
        if self.memory_slots == 0 or self._keys is None or self._eps is None:
            return eps
        h = self._hash(x)
        slot = h % self.memory_slots
        hit = self._keys[slot] == h
        # the reference starts from max(mineps, remembered eps)
        return torch.where(hit, self._eps[slot].to(x.dtype).clamp(min=self.initial_eps), eps)

    def _remember(self, x: Tensor, eps: Tensor) -> None:
        if self.memory_slots == 0:
            return
        if self._keys is None or self._eps is None or self._keys.device != x.device:
            self._keys = torch.full((self.memory_slots,), -1, dtype=torch.int64, device=x.device)
            self._eps = torch.zeros(self.memory_slots, dtype=torch.float32, device=x.device)
        h = self._hash(x)
        slot = h % self.memory_slots
        # keep one writer per slot (the last in the batch): index_put_ with repeated indices is undefined
        order = torch.argsort(slot, stable=True)
        s = slot[order]
        last = torch.ones_like(s, dtype=torch.bool)
        last[:-1] = s[1:] != s[:-1]
        pick = order[last]
        self._keys[slot[pick]] = h[pick]
        self._eps[slot[pick]] = eps[pick].detach().float()

    def state_dict(self) -> dict[str, Tensor]:
        if self._keys is None or self._eps is None:
            return {}
        return {"memory_keys": self._keys, "memory_eps": self._eps}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._keys, self._eps = state.get("memory_keys"), state.get("memory_eps")

    # ----------------------------------------------------------------------- AN-PGD
    def an_pgd(self, model: nn.Module, x: Tensor, y: Tensor, eps0: Tensor) -> tuple[Tensor, Tensor]:
        """Adaptive-norm PGD from radii `eps0` (N,): the shortest soft-adversarial point found, and its ε.

        Runs in ``bn_mode`` with frozen parameters. Returns (x', ε) with x' = clip₀₁(x + ε·u)
        and ε in (0, 1.05·dmax]; ε = 1.05·dmax means no soft-adversarial point was found.
        """
        threat = self.threat_model  # its step direction (sign / normalized gradient)
        with generation_mode(model, self.bn_mode):
            x_t = _random_start(x, eps0, self.norm) if self.random_start else x
            step = self.step_scale * eps0 / self.steps
            for _ in range(self.steps):
                with torch.enable_grad():
                    xg = x_t.clone().requires_grad_(True)
                    (grad,) = torch.autograd.grad(soft_logit_margin(model(xg), y).sum(), [xg])
                x_t = _project(threat.step(x_t, grad, step), x, eps0, self.norm).detach()
            unit = (x_t - x) / _per_example(eps0, x)
            with torch.no_grad():
                margin = soft_logit_margin(model(x_t), y)
                lo = torch.zeros_like(eps0)
                hi = torch.full_like(eps0, self.search_max)
                cur = eps0
                for _ in range(self.search_steps):
                    hit = margin >= 0
                    lo = torch.where(hit, lo, torch.maximum(lo, cur))
                    hi = torch.where(hit, torch.minimum(hi, cur), hi)
                    cur = (lo + hi) / 2
                    margin = soft_logit_margin(model((x + _per_example(cur, x) * unit).clamp(*ThreatModel.box)), y)
                hi = torch.where(margin >= 0, torch.minimum(hi, cur), hi)
        x_adv = (x + _per_example(hi, x) * unit).clamp(*ThreatModel.box)
        return x_adv.detach(), hi

    def adversary(self, model: nn.Module, x: Tensor, y: Tensor,
                  clean_logits: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(x_mix, ε, correct): x' for the correctly classified examples and x for the others.

        ε is 0 for misclassified examples; the ε of every example is remembered for next time.
        """
        if clean_logits is None:
            with torch.no_grad():
                clean_logits = model(x)
        correct = soft_logit_margin(clean_logits.detach(), y) < 0
        eps = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        x_mix = x.detach().clone()
        idx = correct.nonzero().squeeze(1)
        if idx.numel():
            x_adv, e = self.an_pgd(model, x[idx], y[idx], self._recall(x[idx]))
            x_mix[idx], eps[idx] = x_adv, e
        self._remember(x, eps)
        return x_mix, eps, correct

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return self.adversary(model, x, y)[0]

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(x)
        clean = F.cross_entropy(logits, y)
        x_mix, eps, correct = self.adversary(model, x, y, logits)
        ce = F.cross_entropy(model(x_mix), y, reduction="none")
        # the hinge max(0, dmax − d): no gradient once the margin reaches dmax
        keep = ~correct | (eps < self.dmax)
        mma = (ce * keep).sum() / x.shape[0]
        return self.clean_weight * clean + (1 - self.clean_weight) * mma, logits
