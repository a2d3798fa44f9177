"""The attack base class, its result record, the attack registry and shared helpers.

An attack is a frozen dataclass: hyper-parameters are fields checked in ``__post_init__``, data
comes at the call (foolbox's split between configuration and data)::

    attack = PGD(steps=20)
    result = attack(model, x, y, "linf:8/255", seed=0)
    result.x_adv, result.success, result.norms["l2"]

`Attack.__call__` is the one entry point and enforces the contract for every attack:

* inputs are validated (images in [0, 1], labels in range, targets ≠ labels, the threat's
  norm supported by the attack) with errors that name the argument;
* the model runs in eval mode with its parameters' ``requires_grad`` off, and both are
  restored afterwards (also on error); gradients are taken w.r.t. the input only
  (`torch.autograd.grad`), so no parameter ``.grad`` is ever written;
* `x` and `y` are never mutated;
* the returned point is projected into ball(x, eps) ∩ [0, 1] and checked for NaN, and success
  and norms are recomputed from it — an attack cannot report more than it achieved.

Subclasses implement only ``_run(model, x, y, threat, targets, rng)`` and return ``x_adv`` (or
``(x_adv, queries)`` for gradient-free attacks).

Minimum-norm attacks (C&W, DeepFool, ...; ``minimum_norm = True``) search for the smallest
perturbation. They accept ``threat=None`` (unbounded, in their first supported norm) or a
threat with ``eps = inf``. A finite threat is passed to ``_run`` as given (the attack may
use eps, e.g. to stop early, but need not); afterwards every example whose perturbation
exceeds eps gets back its clean input and counts as a failure (unless the clean input is
itself misclassified): the budget is enforced, the perturbation is never rescaled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from .._checks import check_images, check_labels, check_positive
from .._registry import Registry
from .._rng import ExampleRNG
from ..threat import ThreatModel, norm_of
from .losses import LossFn

__all__ = [
    "ATTACKS", "Attack", "AttackResult", "BestTracker", "attack_mode", "create_attack",
    "is_adversarial", "list_attacks", "logits_and_grad", "register_attack",
]

RESULT_NORMS = ("linf", "l2", "l1", "l0")


@dataclass
class AttackResult:
    """What an attack returns, per example.

    Attributes:
        x_adv: adversarial images (N, C, H, W), inside ball(x, eps) ∩ [0, 1].
        success: bool (N,): untargeted: ``adv_pred != y``; targeted: ``adv_pred == targets``.
            Examples that were already misclassified count as successes (with x_adv = x).
        adv_pred: int64 (N,), the model's prediction on `x_adv`.
        norms: ``{"linf", "l2", "l1", "l0"} -> (N,)`` norms of ``x_adv − x`` (l0 counts coordinates).
        queries: int64 (N,) model queries used per example (gradient-free attacks), else None.
        seed: the seed the run used (pass it back to reproduce a run made with ``seed=None``).
    """

    x_adv: Tensor
    success: Tensor
    adv_pred: Tensor
    norms: dict[str, Tensor]
    queries: Tensor | None = None
    seed: int | None = None

    def __len__(self) -> int:
        return int(self.success.shape[0])

    @property
    def success_rate(self) -> float:
        """Fraction of examples where the attack succeeded (0.0 for an empty batch)."""
        return float(self.success.float().mean()) if len(self) else 0.0

    def robust_accuracy(self, y: Tensor) -> float:
        """Fraction of examples still classified as `y` after the attack."""
        return float((self.adv_pred == y.to(self.adv_pred.device)).float().mean()) if len(self) else 0.0

    def __getitem__(self, index: Any) -> "AttackResult":
        """The result of a sub-batch (slice, indices or bool mask)."""
        return AttackResult(
            self.x_adv[index], self.success[index], self.adv_pred[index],
            {k: v[index] for k, v in self.norms.items()},
            None if self.queries is None else self.queries[index], self.seed,
        )


# --------------------------------------------------------------------------- model helpers
@contextlib.contextmanager
def attack_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` in eval mode with parameters frozen; restore every module's mode and every
    parameter's ``requires_grad`` afterwards, also when the body raises.

    Per-module flags are saved (not just ``model.training``) so a model whose submodules were
    in mixed modes (e.g. frozen batch-norm inside a training model) comes back exactly as it was.
    """
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in grads:
            p.requires_grad_(False)
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
        for p, req in grads:
            p.requires_grad_(req)


def logits_and_grad(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn,
                    targets: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Logits (N, K), per-example loss (N,) and ∂loss/∂x (like x), all detached.

    Uses `torch.autograd.grad` w.r.t. the input only: parameter ``.grad`` is never touched.
    Each example's gradient is that of its own loss (the batch loss is a sum), so batching
    does not change it. A model whose output ignores x gets a zero gradient.
    """
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        logits = model(xg)
        loss = loss_fn(logits, y, targets)
        (grad,) = torch.autograd.grad(loss.sum(), [xg], allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(xg)
    return logits.detach(), loss.detach(), grad.detach()


def is_adversarial(logits: Tensor, y: Tensor, targets: Tensor | None = None) -> Tensor:
    """Bool (N,): prediction ≠ y (untargeted) or prediction == target (targeted)."""
    pred = logits.argmax(dim=1)
    return pred == targets if targets is not None else pred != y


class BestTracker:
    """Per-example bookkeeping for attacks that maximize a loss within a fixed budget.

    The point kept for an example is its *first successful iterate*; if it never succeeds, its
    *highest-loss iterate*. `active` lists the examples not yet successful, so iterative attacks
    (and their restarts) compute only on those — attacking what still needs attacking.

    Example:
        >>> tr = BestTracker(x)
        >>> idx = tr.active()
        >>> logits, loss, grad = logits_and_grad(model, x_t, y[idx], ce)
        >>> tr.update(idx, x_t, loss, is_adversarial(logits, y[idx]))
    """

    def __init__(self, x: Tensor) -> None:
        self.x_best = x.detach().clone()
        self.loss_best = torch.full((x.shape[0],), -math.inf, device=x.device, dtype=x.dtype)
        self.success = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)

    def active(self) -> Tensor:
        """Indices (int64) of the examples not yet successful."""
        return (~self.success).nonzero().squeeze(1)

    def update(self, idx: Tensor, x_new: Tensor, loss: Tensor, success: Tensor) -> None:
        """Offer iterate `x_new` of examples `idx` with their loss and success flags."""
        done = self.success[idx]
        first = success & ~done
        better = ~success & ~done & (loss > self.loss_best[idx])
        take = first | better
        sel = idx[take]
        self.x_best[sel] = x_new[take].detach()
        self.loss_best[sel] = loss[take].detach().to(self.loss_best.dtype)
        self.success[idx[first]] = True


# --------------------------------------------------------------------------- the base class
@dataclass(frozen=True)
class Attack:
    """Base class of every attack: a frozen dataclass of hyper-parameters, called on data.

    Class attributes a subclass sets:
        name: the registry name (set by `register_attack`).
        supports_norms: the threat norms it can attack (``("linf", "l2")`` by default).
        supports_targeted: whether ``targets=`` is accepted.
        gradient_free: it only queries the model's outputs (and reports ``queries``).
        minimum_norm: it searches the smallest perturbation (see the module docstring).

    Instance property:
        randomized: whether the result depends on the seed (e.g. a random start).
    """

    name: ClassVar[str] = "attack"
    supports_norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    supports_targeted: ClassVar[bool] = True
    gradient_free: ClassVar[bool] = False
    minimum_norm: ClassVar[bool] = False

    @property
    def randomized(self) -> bool:
        """True when the result depends on the seed; deterministic attacks ignore it."""
        return False

    def config(self) -> dict[str, Any]:
        """Hyper-parameters as a JSON-friendly dict, with the attack's name."""
        return {"name": self.name, **dataclasses.asdict(self)}

    # ----------------------------------------------------------------------- entry point
    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel | str | None = None, *,
                 targets: Tensor | None = None, seed: int | None = None) -> AttackResult:
        """Attack `model` on images `x` with labels `y` within `threat`.

        Args:
            model: an `nn.Module` returning logits (N, K) for images in [0, 1].
            x: images (N, C, H, W), floating, in [0, 1]; never modified.
            y: true labels (N,), integers in [0, K); never modified.
            threat: a `ThreatModel` or a string like ``"linf:8/255"``; required unless the
                attack is minimum-norm.
            targets: target classes (N,) for a targeted attack (each ≠ y), or None.
            seed: seed of the per-example randomness (`ExampleRNG`); None draws one from
                torch's global generator (so ``torch.manual_seed`` fixes it). The seed used is
                in ``result.seed``.

        Returns:
            `AttackResult` with ``x_adv`` in ball(x, eps) ∩ [0, 1].
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module returning logits, got {type(model).__name__}")
        check_images(x, "x")
        threat = self._resolve_threat(threat)
        n = x.shape[0]
        p = next(model.parameters(), None)
        if p is not None and p.device != x.device:
            raise ValueError(f"`x` is on {x.device} but the model's parameters are on {p.device}")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"`seed` must be an int or None, got {type(seed).__name__}")
        if targets is not None and not self.supports_targeted:
            raise ValueError(f"attack {self.name!r} is untargeted only; `targets` must be None")

        with attack_mode(model):
            with torch.no_grad():  # the number of classes, from one example (a whole batch costs a pass)
                probe = x[:1] if n else x
                num_classes = _check_logits(model(probe), probe.shape[0])
            check_labels(y, num_classes, n, "y")
            if targets is not None:
                check_labels(targets, num_classes, n, "targets")
                if bool((targets.to(y.device) == y).any()):
                    k = int((targets.to(y.device) == y).nonzero()[0])
                    raise ValueError(f"`targets` must differ from `y` for every example; example {k} has target = label = {int(y[k])}")
            x_in = x.detach().clone()
            y_in = y.detach().to(device=x.device, dtype=torch.long).clone()
            t_in = None if targets is None else targets.detach().to(device=x.device, dtype=torch.long).clone()
            queries = None
            if n == 0:
                x_adv = x_in
            else:
                rng = ExampleRNG(seed, x_in)
                with torch.enable_grad():
                    out = self._run(model, x_in, y_in, threat, t_in, rng)
                x_adv, queries = out if isinstance(out, tuple) else (out, None)
            x_adv = self._enforce(x_adv, x, threat)
            with torch.no_grad():
                adv_pred = model(x_adv).argmax(dim=1)

        y_dev = y.to(device=adv_pred.device, dtype=torch.long)
        success = adv_pred == t_in if t_in is not None else adv_pred != y_dev
        delta = x_adv - x
        norms = {k: norm_of(delta, k) for k in RESULT_NORMS}
        if queries is not None:
            if not isinstance(queries, Tensor) or queries.shape != (n,):
                raise RuntimeError(f"attack {self.name!r} returned `queries` of a wrong shape; expected ({n},)")
            queries = queries.detach().to(torch.long)
        return AttackResult(x_adv, success, adv_pred, norms, queries, seed)

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, targets: Tensor | None,
             rng: ExampleRNG) -> Tensor | tuple[Tensor, Tensor]:
        """The attack itself: return x_adv (N, C, H, W), or ``(x_adv, queries)``.

        Runs in eval mode with parameters frozen and grad enabled. `x`, `y` are private copies.
        `targets` is None for untargeted runs. `threat` is never None (minimum-norm attacks get
        an unbounded one). The base class projects the result and recomputes success.
        """
        raise NotImplementedError

    # ----------------------------------------------------------------------- helpers
    def _resolve_threat(self, threat: ThreatModel | str | None) -> ThreatModel:
        if threat is None:
            if not self.minimum_norm:
                raise ValueError(f"attack {self.name!r} needs a threat model: pass `threat`, e.g. 'linf:8/255'")
            threat = ThreatModel(self.supports_norms[0], math.inf)
        elif isinstance(threat, str):
            threat = ThreatModel.parse(threat)
        elif not isinstance(threat, ThreatModel):
            raise TypeError(f"`threat` must be a ThreatModel, a string like 'linf:8/255' or None, got {type(threat).__name__}")
        if threat.norm.value not in self.supports_norms:
            raise ValueError(f"attack {self.name!r} supports norms {', '.join(self.supports_norms)}; "
                             f"`threat` is {threat}")
        if not threat.bounded and not self.minimum_norm:
            raise ValueError(f"attack {self.name!r} needs a finite eps; `threat` is {threat}")
        return threat

    def _enforce(self, x_adv: Any, x: Tensor, threat: ThreatModel) -> Tensor:
        """Project into ball ∩ box (minimum-norm: reset over-budget examples to x); no NaN."""
        if not isinstance(x_adv, Tensor) or x_adv.shape != x.shape:
            shape = tuple(x_adv.shape) if isinstance(x_adv, Tensor) else type(x_adv).__name__
            raise RuntimeError(f"attack {self.name!r} returned x_adv of shape {shape}, expected {tuple(x.shape)}")
        x_adv = x_adv.detach().to(dtype=x.dtype, device=x.device)
        if bool(torch.isnan(x_adv).any()):
            raise RuntimeError(f"attack {self.name!r} produced NaN in x_adv (check the model's logits and gradients)")
        if self.minimum_norm:
            x_adv = x_adv.clamp(*ThreatModel.box)
            if threat.bounded:
                over = ~threat.contains(x_adv, x)
                x_adv = torch.where(over.view(-1, *([1] * (x.dim() - 1))), x, x_adv)
            return x_adv
        return threat.project(x_adv, x)


def _check_logits(logits: Any, n: int) -> int:
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != n:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"`model` must return logits of shape (N={n}, num_classes), got {shape}")
    if logits.shape[1] < 2:
        raise ValueError(f"`model` must return at least 2 logits per example, got {logits.shape[1]}")
    return int(logits.shape[1])


# --------------------------------------------------------------------------- field checks
def check_int(value: Any, name: str, minimum: int = 1) -> None:
    """An int (not bool) >= `minimum`; TypeError/ValueError name the field."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value!r}")


def check_optional_positive(value: Any, name: str) -> None:
    """None, or a finite number > 0."""
    if value is not None:
        check_positive(value, name)


def check_bool(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {type(value).__name__}")


# --------------------------------------------------------------------------- registry
ATTACKS: Registry[type[Attack]] = Registry("attack")
A = TypeVar("A", bound=type[Attack])


def register_attack(name: str, summary: str | None = None) -> Callable[[A], A]:
    """Class decorator: register an `Attack` subclass under `name` and set its ``name``.

    Example:
        >>> @register_attack("my-attack")
        ... @dataclass(frozen=True)
        ... class MyAttack(Attack):
        ...     steps: int = 10
        ...     def _run(self, model, x, y, threat, targets, rng): ...
    """
    def deco(cls: A) -> A:
        if not (isinstance(cls, type) and issubclass(cls, Attack)):
            raise TypeError(f"register_attack({name!r}) must decorate an Attack subclass")
        cls.name = name.lower()
        ATTACKS.register(name, summary)(cls)
        return cls

    return deco


def create_attack(name: str, **kwargs: Any) -> Attack:
    """Build a registered attack by name with hyper-parameters as keyword arguments.

    Example:
        >>> create_attack("pgd", steps=20, restarts=2)
        PGD(steps=20, step_size=None, restarts=2, ...)
    """
    cls = ATTACKS.get(name)
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise TypeError(f"attack {name!r} has no hyper-parameter {', '.join(map(repr, unknown))}; "
                        f"valid: {', '.join(valid) or '(none)'}")
    return cls(**kwargs)


def list_attacks() -> list[str]:
    """Names of the registered attacks, sorted."""
    return ATTACKS.names()

