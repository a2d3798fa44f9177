"""Per-example attack losses, all written to be *maximized* by the attacker.

Every loss has the signature ``loss(logits, y, targets=None) -> (N,)``. The untargeted losses
push away from the true class `y`; the targeted ones (used when `targets` is given) pull toward
`targets`. `get_loss(name, targeted)` returns the right one from the `LOSSES` table.

* ``ce``  — cross-entropy CE(z, y); targeted: −CE(z, t).
* ``cw``  — Carlini & Wagner 2017 margin, max_{j≠y} z_j − z_y (positive = misclassified),
  optionally capped at a confidence `kappa`; targeted: z_t − max_{j≠t} z_j.
* ``dlr`` — Difference of Logits Ratio, Croce & Hein 2020 ("Reliable evaluation of adversarial
  robustness with an ensemble of diverse parameter-free attacks"):
  −(z_y − max_{j≠y} z_j) / (z_π1 − z_π3 + 1e-12), π sorting z in decreasing order; invariant
  to shifting and scaling the logits, so it sees through logit-scaling gradient masking.
  Targeted: −(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2 + 1e-12). Needs 3 (targeted: 4) classes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LOSSES", "LossFn", "ce", "ce_targeted", "cw", "cw_targeted", "dlr", "dlr_targeted", "get_loss", "margin"]

LossFn = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def _max_other(logits: Tensor, cls: Tensor) -> Tensor:
    """max_{j ≠ cls} z_j per example."""
    masked = logits.scatter(1, cls.unsqueeze(1), -math.inf)
    return masked.amax(dim=1)


def _true(logits: Tensor, cls: Tensor) -> Tensor:
    return logits.gather(1, cls.unsqueeze(1)).squeeze(1)


def _need_targets(name: str, targets: Tensor | None) -> Tensor:
    if targets is None:
        raise ValueError(f"the targeted loss {name!r} needs `targets`")
    return targets


def ce(logits: Tensor, y: Tensor, targets: Tensor | None = None) -> Tensor:
    """Cross-entropy of the true class, (N,)."""
    return F.cross_entropy(logits, y, reduction="none")


def ce_targeted(logits: Tensor, y: Tensor, targets: Tensor | None = None) -> Tensor:
    """−CE(z, t): maximizing it raises the target's probability, (N,)."""
    return -F.cross_entropy(logits, _need_targets("ce", targets), reduction="none")


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """max_{j≠y} z_j − z_y, (N,): > 0 exactly when the example is misclassified."""
    return _max_other(logits, y) - _true(logits, y)


def cw(logits: Tensor, y: Tensor, targets: Tensor | None = None, kappa: float = math.inf) -> Tensor:
    """C&W margin loss min(max_{j≠y} z_j − z_y, kappa), (N,).

    With a finite `kappa` the loss stops rewarding margins above it (the confidence of
    Carlini & Wagner 2017); the default ``inf`` keeps pushing.
    """
    m = margin(logits, y)
    return m if math.isinf(kappa) else m.clamp(max=kappa)


def cw_targeted(logits: Tensor, y: Tensor, targets: Tensor | None = None, kappa: float = math.inf) -> Tensor:
    """min(z_t − max_{j≠t} z_j, kappa), (N,): > 0 exactly when the prediction is the target."""
    t = _need_targets("cw", targets)
    m = _true(logits, t) - _max_other(logits, t)
    return m if math.isinf(kappa) else m.clamp(max=kappa)


def _check_classes(logits: Tensor, need: int, name: str) -> None:
    if logits.shape[1] < need:
        raise ValueError(f"loss {name!r} needs at least {need} classes, the model has {logits.shape[1]}")


def dlr(logits: Tensor, y: Tensor, targets: Tensor | None = None) -> Tensor:
    """DLR loss of Croce & Hein 2020, (N,); needs >= 3 classes."""
    _check_classes(logits, 3, "dlr")
    z = logits.sort(dim=1, descending=True).values
    return -(_true(logits, y) - _max_other(logits, y)) / (z[:, 0] - z[:, 2] + 1e-12)


def dlr_targeted(logits: Tensor, y: Tensor, targets: Tensor | None = None) -> Tensor:
    """Targeted DLR of Croce & Hein 2020, (N,); needs >= 4 classes."""
    _check_classes(logits, 4, "dlr (targeted)")
    t = _need_targets("dlr", targets)
    z = logits.sort(dim=1, descending=True).values
    return -(_true(logits, y) - _true(logits, t)) / (z[:, 0] - 0.5 * (z[:, 2] + z[:, 3]) + 1e-12)


# name -> (untargeted, targeted)
LOSSES: dict[str, tuple[LossFn, LossFn]] = {
    "ce": (ce, ce_targeted),
    "cw": (cw, cw_targeted),
    "dlr": (dlr, dlr_targeted),
}


def get_loss(name: str, targeted: bool = False, arg: str = "loss") -> LossFn:
    """The loss called `name` (see `LOSSES`), targeted or not; the error names the argument `arg`."""
    if name not in LOSSES:
        raise ValueError(f"`{arg}` must be one of {', '.join(map(repr, LOSSES))}; got {name!r}")
    return LOSSES[name][1 if targeted else 0]


def check_loss_name(name: object, arg: str = "loss", allowed: tuple[str, ...] | None = None) -> None:
    """Raise naming `arg` if `name` is not a known loss (or not in `allowed`)."""
    choices = allowed if allowed is not None else tuple(LOSSES)
    if not isinstance(name, str):
        raise TypeError(f"`{arg}` must be a loss name ({', '.join(map(repr, choices))}), got {type(name).__name__}")
    if name not in choices:
        raise ValueError(f"`{arg}` must be one of {', '.join(map(repr, choices))}; got {name!r}")
