"""The threat model: a norm ball of radius eps around each input, intersected with the [0, 1] box.

One object owns the geometry — distance, projection, random start and steepest-ascent step —
so that attacks never redo it (robustness's `AttackerStep`, foolbox's per-norm mixins).

* Images are in [0, 1] and eps is in pixel units, whatever normalization the model does inside.
* The norm has one spelling: ``"linf"``, ``"l2"``, ``"l1"`` or ``"l0"`` (`Norm`), converted once
  at the API boundary (``ThreatModel.parse("linf:8/255")``).
* ``l0`` counts changed *coordinates* (each channel value of each pixel counts once), and its
  eps is a whole number of coordinates.
* ``eps = math.inf`` means unbounded: minimum-norm attacks (C&W, DeepFool, ...) use it, and only
  the box then constrains the point.

Example:
    >>> t = ThreatModel.parse("linf:8/255")
    >>> x = torch.rand(4, 3, 32, 32)
    >>> x_adv = t.project(x + 0.1 * torch.randn_like(x), x)
    >>> bool(t.contains(x_adv, x).all())
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from fractions import Fraction
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ._rng import ExampleRNG

__all__ = ["L0", "L1", "L2", "Linf", "Norm", "ThreatModel"]


class Norm(str, Enum):
    """The perturbation norms Bastion knows; the value is the one accepted spelling."""

    LINF = "linf"
    L2 = "l2"
    L1 = "l1"
    L0 = "l0"

    @classmethod
    def parse(cls, value: Any, name: str = "norm") -> "Norm":
        """`Norm` from a `Norm` or its (case-insensitive) name; the error lists the valid ones."""
        if isinstance(value, Norm):
            return value
        if isinstance(value, str):
            try:
                return cls(value.strip().lower())
            except ValueError:
                pass
        valid = ", ".join(repr(n.value) for n in cls)
        raise ValueError(f"`{name}` must be one of {valid}; got {value!r}")

    def __str__(self) -> str:
        return self.value


def _flat(t: Tensor) -> Tensor:
    # flatten(1) rather than reshape(N, -1): it also works for an empty batch
    return t.flatten(1) if t.dim() > 1 else t.unsqueeze(1)


def _per_example(v: Tensor, like: Tensor) -> Tensor:
    """(N,) -> (N, 1, 1, ...) so that it broadcasts against `like`."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def project_l1_ball(delta: Tensor, eps: float) -> Tensor:
    """Euclidean projection of each example of `delta` onto the L1 ball of radius `eps`.

    Exact, by sorting (Duchi, Shalev-Shwartz, Singer & Chandra 2008, "Efficient projections onto
    the l1-ball for learning in high dimensions", Fig. 1), vectorized over the batch:
    w = sign(v) · max(|v| − θ, 0) with θ = (Σ_{j≤ρ} u_j − eps)/ρ, u = |v| sorted descending and
    ρ = max{j : u_j − (Σ_{r≤j} u_r − eps)/j > 0}. Examples already inside are returned unchanged.
    """
    v = _flat(delta)
    a = v.abs()
    inside = a.sum(dim=1) <= eps
    if bool(inside.all()):
        return delta
    u, _ = torch.sort(a, dim=1, descending=True)
    css = u.cumsum(dim=1)
    j = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=v.dtype)
    cond = u - (css - eps) / j > 0
    # The condition holds on a prefix; rho is its length (>= 1 whenever ||v||_1 > eps).
    rho = (cond * j).amax(dim=1).clamp_min(1).long()
    theta = (css.gather(1, (rho - 1).unsqueeze(1)) - eps) / rho.unsqueeze(1).to(v.dtype)
    w = v.sign() * (a - theta).clamp_min(0)
    return torch.where(inside.unsqueeze(1), v, w).reshape(delta.shape)


@dataclass(frozen=True)
class ThreatModel:
    """Perturbations with ``‖x_adv − x‖_norm ≤ eps`` and ``x_adv ∈ [0, 1]``.

    Args:
        norm: ``"linf"``, ``"l2"``, ``"l1"`` or ``"l0"`` (or a `Norm`).
        eps: radius in pixel units (for ``l0``: a whole number of coordinates); finite and > 0,
            or ``math.inf`` for an unbounded threat (minimum-norm attacks).

    Shape:
        every method takes batches N×C×H×W (any N×... works) and returns per-example results.

    Example:
        >>> Linf(8 / 255) == ThreatModel.parse("linf:8/255")
        True
    """

    norm: Norm
    eps: float

    box: ClassVar[tuple[float, float]] = (0.0, 1.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", Norm.parse(self.norm))
        eps = self.eps
        if isinstance(eps, Fraction):
            eps = float(eps)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise TypeError(f"`eps` must be a number, got {type(eps).__name__}")
        eps = float(eps)
        if math.isnan(eps) or eps <= 0 or eps == -math.inf:
            raise ValueError(f"`eps` must be > 0 (or math.inf for an unbounded threat), got {self.eps!r}")
        if self.norm is Norm.L0 and math.isfinite(eps) and eps != int(eps):
            raise ValueError(f"`eps` for the l0 threat is a number of coordinates and must be a whole number, got {self.eps!r}")
        object.__setattr__(self, "eps", eps)

    # ----------------------------------------------------------------------- construction
    @classmethod
    def parse(cls, spec: "str | ThreatModel") -> "ThreatModel":
        """``"linf:8/255"``, ``"l2:0.5"``, ``"l1:10"``, ``"l0:12"`` or ``"l2:inf"`` -> `ThreatModel`.

        eps is read exactly with `fractions.Fraction` (never `eval`).
        """
        if isinstance(spec, ThreatModel):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"threat model must be a string like 'linf:8/255', got {type(spec).__name__}")
        norm_s, sep, eps_s = spec.partition(":")
        if not sep or not eps_s.strip():
            raise ValueError(f"threat model {spec!r} must look like 'NORM:EPS', e.g. 'linf:8/255' or 'l2:0.5'")
        try:
            norm = Norm.parse(norm_s, name="norm")
        except ValueError as e:
            raise ValueError(f"threat model {spec!r}: {e}") from None
        eps_s = eps_s.strip()
        try:
            eps = math.inf if eps_s.lower() in ("inf", "infinity") else float(Fraction(eps_s))
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"threat model {spec!r}: eps {eps_s!r} is not a number or fraction like 8/255") from None
        try:
            return cls(norm, eps)
        except ValueError as e:
            raise ValueError(f"threat model {spec!r}: {e}") from None

    def __str__(self) -> str:
        eps = "inf" if math.isinf(self.eps) else (f"{int(self.eps)}" if self.norm is Norm.L0 else f"{self.eps:.6g}")
        return f"{self.norm.value}:{eps}"

    @property
    def bounded(self) -> bool:
        """False for ``eps = inf``."""
        return math.isfinite(self.eps)

    # ----------------------------------------------------------------------- geometry
    def norm_of(self, delta: Tensor) -> Tensor:
        """Per-example norm of `delta` (N, ...) -> (N,), in this threat's norm."""
        return norm_of(delta, self.norm)

    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """A point of ball(x, eps) ∩ [0, 1] near `x_adv` (does not modify its inputs).

        * linf: clamp to [x − eps, x + eps] then to the box: the exact projection.
        * l2: rescale δ to norm ≤ eps, then clip to the box.
        * l1: exact L1-ball projection of δ (Duchi et al. 2008), then clip to the box.
        * l0: keep the eps largest |δ_i| (the exact L0 projection), then clip to the box.

        Clipping to the box after the ball can only shrink each |δ_i| (x itself is in the
        box), so the result stays in the ball. For l2/l1 it is a point of the intersection, not
        always the nearest one — the usual choice (foolbox, torchattacks, Madry's PGD).
        """
        lo, hi = self.box
        if not self.bounded:
            return x_adv.clamp(lo, hi)
        if self.norm is Norm.LINF:
            return torch.minimum(torch.maximum(x_adv, x - self.eps), x + self.eps).clamp(lo, hi)
        delta = x_adv - x
        if self.norm is Norm.L2:
            n = _flat(delta).norm(dim=1)
            # factor <= 1; the clamp keeps 0/0 away from examples with delta = 0
            factor = (self.eps / n.clamp_min(1e-30)).clamp(max=1.0)
            delta = delta * _per_example(factor, delta)
        elif self.norm is Norm.L1:
            delta = project_l1_ball(delta, self.eps)
        else:  # L0
            delta = _keep_topk(delta, int(self.eps))
        return (x + delta).clamp(lo, hi)

    def contains(self, x_adv: Tensor, x: Tensor, tol: float = 1e-6) -> Tensor:
        """Bool (N,): `x_adv` is in the box and ‖x_adv − x‖ ≤ eps, up to `tol`.

        `tol` is absolute for eps ≤ 1 and relative (tol · eps) above, because float32 sums over
        thousands of coordinates (l1, l2 with large eps) carry a relative rounding error.
        """
        lo, hi = self.box
        flat = _flat(x_adv)
        in_box = (flat >= lo - tol).all(dim=1) & (flat <= hi + tol).all(dim=1)
        if not self.bounded:
            return in_box
        n = self.norm_of(x_adv - x)
        if self.norm is Norm.L0:
            return in_box & (n <= self.eps)
        return in_box & (n <= self.eps + tol * max(1.0, self.eps))

    def random_init(self, x: Tensor, rng: "ExampleRNG", tag: Any = "random_init") -> Tensor:
        """A random point of ball(x, eps) ∩ [0, 1] per example, reproducible under `rng` and `tag`.

        * linf: x + U(−eps, eps)^D (Madry et al. 2018), clipped to the box.
        * l2: x + eps · r · u with u uniform on the sphere and r = U^(1/D): uniform in the ball.
        * l1: uniform in the L1 ball (random signs times a uniform point of the simplex, from
          D + 1 exponentials), times eps.
        * l0: eps coordinates chosen at random, set to U(0, 1).
        * eps = inf: uniform in the box.
        All but the last are then clipped to the box (which keeps them in the ball).
        """
        lo, hi = self.box
        shape = tuple(x.shape[1:])
        d = int(math.prod(shape))
        if not self.bounded:
            return rng.uniform(shape, tag=tag).to(x.dtype) * (hi - lo) + lo
        if self.norm is Norm.LINF:
            delta = (2 * rng.uniform(shape, tag=tag) - 1) * self.eps
        elif self.norm is Norm.L2:
            g = rng.normal(shape, tag=(tag, "dir"))
            u = rng.uniform((), tag=(tag, "radius"))
            r = u.double().pow(1.0 / d).to(g.dtype)
            delta = g * _per_example(self.eps * r / _flat(g).norm(dim=1).clamp_min(1e-30), g)
        elif self.norm is Norm.L1:
            e = -torch.log(rng.uniform((d + 1,), tag=(tag, "exp")))
            point = e[:, :d] / e.sum(dim=1, keepdim=True)  # uniform in the simplex interior
            signs = rng.rademacher((d,), tag=(tag, "sign"))
            delta = (self.eps * point * signs).reshape(x.shape)
        else:  # L0
            k = min(int(self.eps), d)
            idx = rng.sample_without_replacement(d, k, tag=(tag, "where"))
            new = rng.uniform((k,), tag=(tag, "value"))
            flat = _flat(x).clone()
            flat.scatter_(1, idx, new.to(x.dtype))
            return flat.reshape(x.shape)
        return (x + delta.to(x.dtype)).clamp(lo, hi)

    def direction(self, grad: Tensor, x_adv: Tensor | None = None, *, l1_fraction: float = 0.05) -> Tensor:
        """Steepest-ascent direction of unit norm (per example) for a linear model with gradient `grad`.

        * linf: sign(g) (FGSM, Goodfellow et al. 2015).
        * l2 and l0: g / ‖g‖₂ (l0 follows PGD₀ of Croce & Hein 2019, whose projection then
          keeps the largest coordinates).
        * l1: the sparse step of Tramèr & Boneh 2019 (SLIDE): sign(g) on the k = max(1, ⌈q·D⌉)
          coordinates with the largest |g|, divided by k so that ‖direction‖₁ = 1. If `x_adv` is
          given, coordinates that sit on the box and whose gradient points out of it are not
          chosen — moving them would be clipped away and waste the L1 budget. ``l1_fraction=0``
          gives the single-coordinate step (the exact L1 steepest ascent).

        Examples with a zero gradient get a zero direction (never NaN).
        """
        if self.norm is Norm.LINF:
            return grad.sign()
        if self.norm in (Norm.L2, Norm.L0):
            n = _flat(grad).norm(dim=1).clamp_min(1e-30)
            return grad / _per_example(n, grad)
        if not (0.0 <= l1_fraction <= 1.0):
            raise ValueError(f"`l1_fraction` must be in [0, 1], got {l1_fraction!r}")
        g = _flat(grad)
        score = g.abs()
        if x_adv is not None:
            lo, hi = self.box
            xa = _flat(x_adv)
            blocked = ((xa <= lo) & (g < 0)) | ((xa >= hi) & (g > 0))
            score = score.masked_fill(blocked, 0.0)
        k = max(1, math.ceil(l1_fraction * g.shape[1]))
        top, idx = score.topk(k, dim=1)
        # coordinates with zero score are not worth moving; keep the step's L1 norm at most 1
        vals = g.gather(1, idx).sign() * (top > 0)
        out = torch.zeros_like(g).scatter_(1, idx, vals / k)
        return out.reshape(grad.shape)

    def step(self, x_adv: Tensor, grad: Tensor, step_size: float | Tensor, *, l1_fraction: float = 0.05) -> Tensor:
        """``x_adv + step_size · direction(grad)`` (not projected: call `project` after).

        `step_size` is a number or a per-example tensor (N,); it is the length of the step in
        this threat's norm (for l0 it is an l2 length).
        """
        d = self.direction(grad, x_adv, l1_fraction=l1_fraction)
        if isinstance(step_size, Tensor):
            step_size = _per_example(step_size.to(d.dtype), d)
        return x_adv + step_size * d


def norm_of(delta: Tensor, norm: Norm | str) -> Tensor:
    """Per-example ``‖delta‖`` (N,) in `norm`; l0 counts the nonzero coordinates."""
    norm = Norm.parse(norm)
    f = _flat(delta)
    if f.shape[1] == 0:
        return f.new_zeros(f.shape[0])
    if norm is Norm.LINF:
        return f.abs().amax(dim=1)
    if norm is Norm.L2:
        return f.norm(dim=1)
    if norm is Norm.L1:
        return f.abs().sum(dim=1)
    return (f != 0).sum(dim=1).to(f.dtype)


def _keep_topk(delta: Tensor, k: int) -> Tensor:
    """Zero all but the k largest-magnitude coordinates of each example."""
    f = _flat(delta)
    if k >= f.shape[1]:
        return delta
    idx = f.abs().topk(k, dim=1).indices
    out = torch.zeros_like(f).scatter_(1, idx, f.gather(1, idx))
    return out.reshape(delta.shape)


def Linf(eps: float) -> ThreatModel:  # noqa: N802 - reads like a type, as in foolbox/robustness
    """``ThreatModel("linf", eps)``."""
    return ThreatModel(Norm.LINF, eps)


def L2(eps: float) -> ThreatModel:  # noqa: N802
    """``ThreatModel("l2", eps)``."""
    return ThreatModel(Norm.L2, eps)


def L1(eps: float) -> ThreatModel:  # noqa: N802
    """``ThreatModel("l1", eps)``."""
    return ThreatModel(Norm.L1, eps)


def L0(eps: int) -> ThreatModel:  # noqa: N802
    """``ThreatModel("l0", eps)``: at most `eps` changed coordinates."""
    return ThreatModel(Norm.L0, eps)
