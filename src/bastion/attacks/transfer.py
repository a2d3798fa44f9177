"""Transfer (gray-box) attacks: craft on surrogate models, evaluate on the target."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice
from .._rng import ExampleRNG
from ..threat import ThreatModel
from .base import Attack, BestTracker, attack_mode, create_attack, is_adversarial, register_attack
from .losses import get_loss
from .pgd import PGD, iterate

__all__ = ["COMBINE", "Ensemble", "Transfer", "resolve_attack"]

COMBINE = ("logits", "probs", "loss")


class Ensemble(nn.Module):
    """Several classifiers as one: the mean of their logits, or of their probabilities.

    * ``"logits"``: returns (1/m) Σ z_i (Liu et al. 2017, "Delving into transferable
      adversarial examples", https://arxiv.org/abs/1611.02770, ensemble in logit space).
    * ``"probs"``: returns log((1/m) Σ softmax(z_i)), the log of the averaged probabilities:
      valid logits whose softmax is the average prediction.

    Any attack composes with it (it is a module returning logits). Members are called on the
    same batch one after the other; they must share the input's device.

    Example:
        >>> ens = Ensemble([model_a, model_b], combine="probs")
        >>> result = PGD()(ens, x, y, "linf:8/255")
    """

    def __init__(self, models: Sequence[nn.Module], combine: str = "logits") -> None:
        super().__init__()
        if len(models) == 0:
            raise ValueError("`models` must hold at least one nn.Module")
        for i, m in enumerate(models):
            if not isinstance(m, nn.Module):
                raise TypeError(f"`models[{i}]` must be an nn.Module returning logits, got {type(m).__name__}")
        self.members = nn.ModuleList(models)
        self.combine = check_choice(combine, "combine", ("logits", "probs"))

    def member_logits(self, x: Tensor) -> list[Tensor]:
        """Each member's logits (N, K)."""
        return [m(x) for m in self.members]

    def forward(self, x: Tensor) -> Tensor:
        zs = self.member_logits(x)
        if len(zs) == 1:
            return zs[0]
        if self.combine == "logits":
            return torch.stack(zs).mean(dim=0)
        # logsumexp of the members' log-probabilities: stable even where a softmax underflows
        logp = torch.stack([F.log_softmax(z, dim=1) for z in zs])
        return torch.logsumexp(logp, dim=0) - math.log(len(zs))


class _LossStash(nn.Module):
    """An ensemble whose forward returns the mean logits (for predictions) and keeps every
    member's logits, so that a loss closure can average the per-model losses *with* their graph."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(models)
        self.last: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.last = [m(x) for m in self.members]
        return torch.stack(self.last).mean(dim=0)


def resolve_attack(attack: Attack | str, attack_kwargs: Mapping[str, Any] | None, field_name: str = "attack") -> Attack:
    """An `Attack` from an instance, or from a registered name plus keyword arguments."""
    if isinstance(attack, str):
        return create_attack(attack, **dict(attack_kwargs or {}))
    if not isinstance(attack, Attack):
        raise TypeError(f"`{field_name}` must be an Attack or a registered attack name, got {type(attack).__name__}")
    if attack_kwargs:
        raise ValueError(f"`{field_name}_kwargs` is only for an attack given by name; configure the instance instead")
    return attack


def _as_modules(value: Any, name: str) -> tuple[nn.Module, ...]:
    if isinstance(value, nn.Module):
        value = (value,)
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"`{name}` must be an nn.Module or a tuple of them, got {type(value).__name__}")
    for i, m in enumerate(value):
        if not isinstance(m, nn.Module):
            raise TypeError(f"`{name}[{i}]` must be an nn.Module returning logits, got {type(m).__name__}")
    return tuple(value)


@register_attack("transfer")
@dataclass(frozen=True)
class Transfer(Attack):
    r"""Transfer attack: craft adversarial examples on surrogate models, then test them on the target.

    Papers: Papernot, McDaniel & Goodfellow, "Transferability in Machine Learning"
    (https://arxiv.org/abs/1605.07277); Liu, Chen, Liu & Song, "Delving into Transferable
    Adversarial Examples and Black-box Attacks", ICLR 2017 (https://arxiv.org/abs/1611.02770)
    for ensembles; Tramèr et al., "Ensemble Adversarial Training", ICLR 2018.

    Distance: whatever the inner attack supports (an instance's ``supports_norms`` and
    ``supports_targeted`` are those of its inner attack; the class lists the default PGD's).

    The inner `attack` runs on the surrogate (one model, or an ensemble of several); the target
    model passed to the call is never queried by the attack — the base class evaluates the
    crafted points on it, so ``success`` is the *transfer* success. With ``surrogates=()`` the
    target itself is the surrogate: the white-box attack, the upper bound a transfer attack is
    compared with (a defense that resists it but not a transfer attack masks its gradients).

    Ensembles (``combine``):
        * ``"logits"``: the inner attack sees `Ensemble(surrogates, "logits")`, the mean logits.
        * ``"probs"``: it sees the log of the mean probabilities.
        * ``"loss"``: the loss is the mean of the per-model losses, (1/m) Σ L(z_i(x), y), and its
          gradient is the mean of the per-model gradients. A module alone cannot express that
          (an attack's loss is computed on one logits tensor), so this mode runs the inner
          attack's own projected-gradient loop (`bastion.attacks.pgd.iterate`) with a loss
          that averages over the members; it therefore needs a `PGD` inner attack (its steps,
          step size, restarts, random start, loss and early stop are used). Success inside the
          loop (early stop) is judged on the mean logits.

    The inner attack's early stop fires when the *surrogate* is fooled, which yields
    low-confidence examples that transfer poorly; ``attack_kwargs={"early_stop": False}`` (or
    a "cw" loss) usually transfers better.

    Arguments:
        surrogates (tuple[nn.Module, ...]): the model(s) to craft on, on the input's device.
            (Default: () = the target itself)
        attack (Attack | str): the attack run on the surrogate, an instance or a registered
            name. (Default: "pgd")
        attack_kwargs (dict | None): hyper-parameters when `attack` is a name. (Default: None)
        combine (str): "logits", "probs" or "loss" (see above). (Default: "logits")

    Shape:
        x: (N, C, H, W) in [0, 1]; y: (N,); returns `AttackResult` with x_adv (N, C, H, W).

    Example:
        >>> attack = Transfer(surrogates=(model_a, model_b), attack="pgd",
        ...                   attack_kwargs={"steps": 20, "early_stop": False})
        >>> result = attack(target_model, x, y, "linf:8/255", seed=0)
        >>> transfer_robust_accuracy = 1 - result.success_rate
    """

    surrogates: tuple[nn.Module, ...] = field(default=(), compare=False)
    attack: Attack | str = "pgd"
    attack_kwargs: Mapping[str, Any] | None = field(default=None, compare=False)
    combine: str = "logits"

    supports_norms = PGD.supports_norms
    supports_targeted = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "surrogates", _as_modules(self.surrogates, "surrogates"))
        check_choice(self.combine, "combine", COMBINE)
        inner = resolve_attack(self.attack, self.attack_kwargs)
        object.__setattr__(self, "attack", inner)
        object.__setattr__(self, "attack_kwargs", None)  # folded into the instance
        if self.combine == "loss" and not isinstance(inner, PGD):
            raise ValueError(f"`combine='loss'` needs a PGD inner attack (it runs PGD's loop on the averaged "
                             f"loss); got {inner.name!r}. Use combine='logits' or 'probs' with other attacks")
        # an instance attacks what its inner attack can (the class attributes describe the default)
        object.__setattr__(self, "supports_norms", inner.supports_norms)
        object.__setattr__(self, "supports_targeted", inner.supports_targeted)

    def __repr__(self) -> str:
        names = ", ".join(type(m).__name__ for m in self.surrogates)
        return f"Transfer(surrogates=({names}), attack={self.attack!r}, combine={self.combine!r})"

    def config(self) -> dict[str, Any]:
        """JSON-friendly: the surrogates by class name, the inner attack by its own config."""
        assert isinstance(self.attack, Attack)
        return {"name": self.name, "surrogates": [type(m).__name__ for m in self.surrogates],
                "attack": self.attack.config(), "combine": self.combine}

    @property
    def randomized(self) -> bool:
        assert isinstance(self.attack, Attack)
        return self.attack.randomized

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, targets: Tensor | None,
             rng: ExampleRNG) -> Tensor:
        inner = self.attack
        assert isinstance(inner, Attack)
        members = self.surrogates or (model,)
        for i, m in enumerate(members):
            p = next(m.parameters(), None)
            if p is not None and p.device != x.device:
                raise ValueError(f"`surrogates[{i}]` is on {p.device} but `x` is on {x.device}")
        if self.combine == "loss" and len(members) > 1:
            assert isinstance(inner, PGD)
            return _pgd_mean_loss(inner, members, x, y, threat, targets, rng)
        # (a single surrogate needs no ensemble; "loss" with one member is the plain loss)
        surrogate = members[0] if len(members) == 1 else Ensemble(members, self.combine)
        # The inner call gets the same seed: its per-example randomness keys on the same
        # images, so "batch then slice equals slice" carries over. Its own attack_mode leaves
        # the surrogates as it found them.
        res = inner(surrogate, x, y, threat, targets=targets, seed=rng.seed)
        return res.x_adv


def _pgd_mean_loss(pgd: PGD, members: Sequence[nn.Module], x: Tensor, y: Tensor, threat: ThreatModel,
                   targets: Tensor | None, rng: ExampleRNG) -> Tensor:
    """PGD on the mean of the members' losses, following PGD's restart and early-stop rules.

    Runs `iterate` with a model that stashes each member's logits and a loss that averages the
    members' losses over them: ∇ₓ of the mean loss is exactly the mean of the per-model gradients.
    With early stop it returns an example's first iterate that fools the ensemble (mean logits),
    else its highest-loss one; without, the final iterate of the restart with the highest loss.
    """
    stash = _LossStash(members)
    base_loss = get_loss(pgd.loss, targets is not None)

    def mean_loss(logits: Tensor, yy: Tensor, tt: Tensor | None) -> Tensor:
        return torch.stack([base_loss(z, yy, tt) for z in stash.last]).mean(dim=0)

    step_size = pgd._step_size(threat)
    everyone = torch.arange(x.shape[0], device=x.device)
    out = x.clone()
    out_loss = torch.full((x.shape[0],), -math.inf, device=x.device, dtype=x.dtype)
    with attack_mode(stash):
        tracker = BestTracker(x)
        with torch.no_grad():
            logits = stash(x)
            tracker.update(everyone, x, mean_loss(logits, y, targets), is_adversarial(logits, y, targets))
        for r in range(pgd.restarts):
            idx = tracker.active() if pgd.early_stop else everyone
            if idx.numel() == 0:
                break
            xs = x[idx]
            x0 = threat.random_init(xs, rng.subset(idx), tag=(pgd.name, "init", r)) if pgd.random_start else xs
            ts = None if targets is None else targets[idx]
            last_x, last_loss = iterate(stash, xs, y[idx], ts, threat, x0, steps=pgd.steps, step_size=step_size,
                                        loss_fn=mean_loss, tracker=tracker, idx=idx, early_stop=pgd.early_stop,
                                        l1_fraction=pgd.l1_fraction)
            better = last_loss > out_loss[idx]
            out[idx[better]], out_loss[idx[better]] = last_x[better], last_loss[better]
    return tracker.x_best if pgd.early_stop else out
