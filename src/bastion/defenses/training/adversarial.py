"""Adversarial-training objectives: FGSM-AT, PGD-AT, Fast AT, Free AT, ALP and CLP.

Each objective is a dataclass whose fields are the paper's hyper-parameters (with the paper's
defaults), registered in `OBJECTIVES` so that ``bastion train --defense NAME`` finds it. The
shared pieces live here too:

* `AdversarialObjective` — the threat options every adversarial objective takes: ``eps`` (pixel
  units), ``norm`` (``"linf"`` or ``"l2"``) or a ``threat`` string such as ``"linf:0.1"``.
* `generation_mode` — the model mode used while crafting the training adversary. ``"train"``
  keeps the modes the Trainer set (batch-norm uses batch statistics *and updates its running
  statistics* with every attack step; dropout stays on), which is what the PyTorch references
  of Madry et al., Wong et al. and Rice et al. do; ``"eval"`` switches to eval mode, as the
  TRADES, MART and MMA references do. Parameters are frozen while crafting (gradients are
  taken w.r.t. the input only) and every module's mode and every ``requires_grad`` flag is
  restored afterwards, also on error.
* `maximize` — the projected steepest-ascent loop (PGD), built on the `ThreatModel`'s
  ``step``/``project``: the geometry is never redone here.

Randomness (random starts, pool choice, pairings, noise) comes from torch's global generators,
or from an `ExampleRNG` seeded from the global CPU generator, so ``TrainConfig.seed`` fixes it
and the Trainer's checkpoints (which carry the RNG states) make resume exact.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..._checks import check_choice, check_in_range, check_positive
from ..._rng import ExampleRNG
from ...attacks.base import Attack, check_bool, check_int, check_optional_positive, create_attack
from ...threat import ThreatModel
from .objectives import OBJECTIVES, Objective, StopTraining

__all__ = ["ALP", "CLP", "AdversarialObjective", "FGSMAT", "FastAT", "FreeAT", "PGDAT", "ce_per_example",
           "generation_mode", "maximize", "pgd_adversary", "project_delta", "seeded_rng"]

NORMS = ("linf", "l2")
MODES = ("train", "eval")


# --------------------------------------------------------------------------- shared helpers
@contextlib.contextmanager
def generation_mode(model: nn.Module, mode: str = "eval") -> Iterator[nn.Module]:
    """Craft adversaries in `mode` (``"train"``: as the model is; ``"eval"``) with frozen parameters.

    Every module's ``training`` flag and every parameter's ``requires_grad`` are saved and
    restored afterwards (also when the body raises), so the loss that follows sees the model
    exactly as the Trainer left it.
    """
    check_choice(mode, "bn_mode", MODES)
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        if mode == "eval":
            model.eval()
        for p, _ in grads:
            p.requires_grad_(False)  # the input gradient needs no parameter gradients: cheaper
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for p, req in grads:
            p.requires_grad_(req)


def seeded_rng(x: Tensor) -> ExampleRNG:
    """An `ExampleRNG` for `x` whose seed is drawn from torch's global CPU generator.

    The seed comes from the generator the Trainer seeds and checkpoints, so draws are
    reproducible under ``TrainConfig.seed`` and identical after a resume.
    """
    return ExampleRNG(int(torch.randint(0, 2**62, (1,)).item()), x)


def maximize(model: nn.Module, x: Tensor, x_start: Tensor, loss_fn: Callable[[Tensor], Tensor],
             threat: ThreatModel, steps: int, step_size: float | Tensor) -> Tensor:
    """Projected steepest ascent: ``x' ← Π_{B(x, eps) ∩ [0,1]}(x' + step_size · direction(∇ₓ' loss))``.

    Args:
        model: called on the iterates (the caller chooses its mode, see `generation_mode`).
        x: the clean batch (the centre of the ball).
        x_start: the first iterate (x, a random start, ...).
        loss_fn: logits (N, K) -> per-example loss (N,) to *maximize*; the gradient of its sum
            is each example's own gradient.
        threat: the ball; its ``step`` gives the direction (sign for linf) and ``project``
            the projection.
        steps: number of gradient steps (0 returns the projected start).
        step_size: a number or a per-example tensor (N,).

    Returns:
        the final iterate, detached, inside the ball and the box (Madry et al.'s PGD returns
        the last iterate, not the best one).
    """
    x_adv = x_start.detach()
    for _ in range(steps):
        with torch.enable_grad():
            xg = x_adv.clone().requires_grad_(True)
            loss = loss_fn(model(xg))
            (grad,) = torch.autograd.grad(loss.sum(), [xg])
        x_adv = threat.project(threat.step(x_adv, grad, step_size), x).detach()
    return threat.project(x_adv, x).detach()


def ce_per_example(y: Tensor) -> Callable[[Tensor], Tensor]:
    """logits -> CE(logits, y) per example: the attacker's loss of PGD-AT, Fast AT, ALP, MART."""
    return lambda logits: F.cross_entropy(logits, y, reduction="none")


def pgd_adversary(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *, steps: int,
                  step_size: float | None, random_start: bool, bn_mode: str) -> Tensor:
    """Madry et al.'s training adversary: PGD on CE from a uniform random start, last iterate.

    ``step_size=None`` means 2.5·eps/steps (long enough to cross the ball from any start).
    """
    with generation_mode(model, bn_mode):
        start = threat.random_init(x, seeded_rng(x)) if random_start else x
        size = step_size if step_size is not None else 2.5 * threat.eps / steps
        return maximize(model, x, start, ce_per_example(y), threat, steps, size)


def _check_mode(value: Any) -> None:
    check_choice(value, "bn_mode", MODES)


# --------------------------------------------------------------------------- base class
@dataclass
class AdversarialObjective(Objective):
    """Threat options shared by the adversarial objectives.

    Args:
        eps: radius of the training perturbation in pixel units (images in [0, 1]); 0.1 suits
            Fashion-MNIST-like data (MNIST papers use 0.3, CIFAR-10 papers 8/255).
        norm: ``"linf"`` or ``"l2"``.
        threat: optional threat string (``"linf:0.1"``, ``"l2:0.5"``, ``"linf:8/255"``); when
            given it sets ``norm`` and ``eps`` (which are then overwritten to match it).
    """

    name: ClassVar[str] = "adversarial"

    eps: float = 0.1
    norm: str = "linf"
    threat: str | None = None

    def __post_init__(self) -> None:
        if self.threat is not None:
            try:
                tm = ThreatModel.parse(self.threat)
            except (TypeError, ValueError) as e:
                raise type(e)(f"`threat`: {e}") from None
            self.norm, self.eps = tm.norm.value, tm.eps
        check_positive(self.eps, "eps")
        check_choice(self.norm, "norm", NORMS)

    @property
    def threat_model(self) -> ThreatModel:
        """The `ThreatModel` (norm ball of radius eps intersected with the [0, 1] box)."""
        return ThreatModel(self.norm, self.eps)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """The training adversary x' of the batch (detached); `loss` trains on it."""
        raise NotImplementedError


# --------------------------------------------------------------------------- FGSM-AT
def _check_pool_entry(entry: Any, norm: str) -> Attack:
    if isinstance(entry, str):
        name, kwargs = entry, {}
    elif isinstance(entry, Mapping) and isinstance(entry.get("name"), str):
        name, kwargs = entry["name"], {k: v for k, v in entry.items() if k != "name"}
    else:
        raise TypeError("`attacks` entries must be attack names or mappings like {'name': 'pgd', 'steps': 5}, "
                        f"got {entry!r}")
    try:
        attack = create_attack(name, **kwargs)
    except (KeyError, TypeError, ValueError) as e:
        raise type(e)(f"`attacks` entry {entry!r}: {e}") from None
    if norm not in attack.supports_norms:
        raise ValueError(f"`attacks` entry {entry!r}: attack {attack.name!r} supports norms "
                         f"{', '.join(attack.supports_norms)}, not {norm!r}")
    return attack


@OBJECTIVES.register("fgsm-at", "Goodfellow et al. 2015: alpha·CE(x) + (1−alpha)·CE(FGSM(x)); "
                                "optional attack pool.")
@dataclass
class FGSMAT(AdversarialObjective):
    r"""Adversarial training with the fast gradient sign method (or a pool of attacks).

    Paper: Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial Examples",
    ICLR 2015 (arXiv:1412.6572), Sec. 6:

        L = alpha · CE(f(x), y) + (1 − alpha) · CE(f(x'), y),   x' = x + eps · sign(∇ₓ CE(f(x), y))

    projected onto the [0, 1] box (eps · sign is already on the linf sphere; for ``norm="l2"``
    the step is eps · ∇/‖∇‖₂, the fast gradient method).

    The attack pool follows ART's ``AdversarialTrainer`` (Nicolae et al. 2018, arXiv:1807.01069):
    each batch's x' comes from one attack of the pool, chosen per batch either at random
    (``pool_order="random"``, from torch's global generator, which the Trainer seeds and
    checkpoints) or round-robin (``pool_order="cycle"``, the position is carried in the
    checkpoint). Pool attacks are registry attacks and follow the attack contract: they run
    the model in eval mode, and many stop at the first adversarial iterate and leave already
    misclassified examples unchanged (pass ``{"name": "pgd", "early_stop": False}`` for
    Madry-style training adversaries). ``ratio`` is ART's/Kurakin et al.'s proportion of
    each batch replaced by its adversarial version in the second term (random examples).

    Clean and adversarial inputs go through the model as one concatenated "mixed minibatch"
    (Kurakin et al. 2017), so batch-norm sees both. The logits returned (train accuracy) are
    the clean ones.

    Args:
        alpha: weight of the clean term (0.5 in the paper; 0 trains on x' only).
        attacks: the pool — attack names or mappings ``{"name": ..., **hyper_parameters}`` from
            the attack registry; empty (default) uses the built-in FGSM of the paper, which
            perturbs every example.
        pool_order: ``"random"`` or ``"cycle"``.
        ratio: fraction of each batch replaced by adversarial examples in the second term (1.0:
            all, the paper's setting).
        bn_mode: model mode while crafting with the built-in FGSM (``"train"`` or ``"eval"``).
    """

    name: ClassVar[str] = "fgsm-at"

    alpha: float = 0.5
    attacks: Sequence[Any] = ()
    pool_order: str = "random"
    ratio: float = 1.0
    bn_mode: str = "train"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_in_range(self.alpha, "alpha", 0.0, 1.0)
        if isinstance(self.attacks, (str, Mapping)) or not isinstance(self.attacks, Sequence):
            raise TypeError(f"`attacks` must be a list of attack names or mappings, got {self.attacks!r}")
        self._pool = [_check_pool_entry(a, self.norm) for a in self.attacks]
        check_choice(self.pool_order, "pool_order", ("random", "cycle"))
        check_in_range(self.ratio, "ratio", 0.0, 1.0)
        if self.ratio == 0.0:
            raise ValueError("`ratio` must be > 0 (0 would train on clean examples only: use 'standard')")
        _check_mode(self.bn_mode)
        self._pool_step = 0

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        threat = self.threat_model
        if not self._pool:
            with generation_mode(model, self.bn_mode):
                return maximize(model, x, x, ce_per_example(y), threat, 1, threat.eps)
        if self.pool_order == "cycle":
            k = self._pool_step % len(self._pool)
            self._pool_step += 1
        else:
            k = int(torch.randint(0, len(self._pool), (1,)).item())
        seed = int(torch.randint(0, 2**62, (1,)).item())
        return self._pool[k](model, x, y, threat, seed=seed).x_adv.detach()

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x_adv = self.perturb(model, x, y)
        if self.ratio < 1.0:
            n = x.shape[0]
            k = int(round(self.ratio * n))
            pick = torch.zeros(n, dtype=torch.bool)
            pick[torch.randperm(n)[:k]] = True
            x_adv = torch.where(pick.to(x.device).view(-1, *([1] * (x.dim() - 1))), x_adv, x)
        logits = model(torch.cat([x, x_adv]))
        clean, adv = logits[:x.shape[0]], logits[x.shape[0]:]
        loss = self.alpha * F.cross_entropy(clean, y) + (1 - self.alpha) * F.cross_entropy(adv, y)
        return loss, clean

    def state_dict(self) -> dict[str, Tensor]:
        return {"pool_step": torch.tensor([self._pool_step], dtype=torch.int64)} if self.pool_order == "cycle" else {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if "pool_step" in state:
            self._pool_step = int(state["pool_step"].item())


# --------------------------------------------------------------------------- PGD-AT
@OBJECTIVES.register("pgd-at", "Madry et al. 2018: cross-entropy on PGD adversaries (random start) only.")
@dataclass
class PGDAT(AdversarialObjective):
    r"""Madry et al.'s adversarial training: minimize the loss at the PGD maximizer.

    Paper: Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep Learning Models Resistant to
    Adversarial Attacks", ICLR 2018 (arXiv:1706.06083):

        min_θ E[ max_{‖δ‖ ≤ eps} CE(f(x + δ), y) ],   loss = CE(f(x'), y)

    with x' the last iterate of PGD on CE from a uniform random start in the ball,
    ``x' ← Π_{B(x, eps) ∩ [0,1]}(x' + step_size · sign(∇CE))``. The paper uses 40 steps of 0.01
    at eps 0.3 on MNIST and 7 steps of 2/255 at 8/255 on CIFAR-10; the default step size
    2.5·eps/steps crosses the ball from any start. The logits returned (train accuracy) are
    the adversarial ones — Madry et al.'s "adversarial training accuracy".

    Args:
        steps: PGD steps per batch.
        step_size: step length in pixel units; None means 2.5·eps/steps.
        random_start: start uniformly in the ball (`ThreatModel.random_init`); False starts at x.
        bn_mode: model mode while crafting — ``"train"`` (default, as in the PyTorch reference
            implementations: batch statistics, running statistics updated by every step) or
            ``"eval"`` (running statistics, untouched).
    """

    name: ClassVar[str] = "pgd-at"

    steps: int = 10
    step_size: float | None = None
    random_start: bool = True
    bn_mode: str = "train"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.steps, "steps", 1)
        check_optional_positive(self.step_size, "step_size")
        check_bool(self.random_start, "random_start")
        _check_mode(self.bn_mode)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return pgd_adversary(model, x, y, self.threat_model, steps=self.steps, step_size=self.step_size,
                             random_start=self.random_start, bn_mode=self.bn_mode)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(self.perturb(model, x, y))
        return F.cross_entropy(logits, y), logits


# --------------------------------------------------------------------------- Fast AT
@OBJECTIVES.register("fast-at", "Wong, Rice & Kolter 2020: FGSM from a random start, step 1.25·eps, "
                                "catastrophic-overfitting stop.")
@dataclass
class FastAT(AdversarialObjective):
    r""""Fast is better than free": FGSM adversarial training from a random start.

    Paper: Wong, Rice & Kolter, "Fast is better than free: Revisiting adversarial training",
    ICLR 2020 (arXiv:2001.03994), FGSM with random initialization:

        δ ~ U(−eps, eps)  (clipped so that x + δ ∈ [0, 1])
        δ ← Π(δ + alpha · sign(∇_δ CE(f(x + δ), y))),   alpha = 1.25 · eps
        loss = CE(f(x + δ), y)

    with Π the projection onto the eps-ball and the [0, 1] box. The paper's cyclic learning rate
    is the Trainer's ``TrainConfig(schedule="cyclic")`` — the CLI and benchmarks must set it
    (this objective cannot); mixed precision is not used here.

    Catastrophic overfitting (the paper's early stop): after every epoch the model's
    PGD and FGSM accuracies are measured (eval mode, fixed seed) on a fixed probe batch — the
    first ``probe_size`` training examples this objective sees (the start of epoch 1, in the
    Trainer's data order and after augmentation), or a batch given with `set_probe`. If the PGD
    accuracy falls more than ``max_drop`` below the best seen so far while the FGSM accuracy
    is above its value at that best epoch — the signature of catastrophic overfitting: the
    model defeats its own single-step adversary and nothing stronger — training stops with
    `StopTraining` and the weights of the best epoch are restored. (The reference code compares
    with the previous epoch only and needs no FGSM rise; comparing with the best epoch and
    asking for the FGSM rise keeps an ordinary bad epoch from ending training.) ``pgd_acc`` and
    ``fgsm_acc`` are returned as epoch metrics (metrics.jsonl). The probe, the best weights
    and their accuracies are carried in checkpoints, so resume is exact.

    Args:
        alpha: FGSM step in pixel units; None means 1.25·eps (the paper's choice).
        bn_mode: model mode while crafting (``"train"``, as in the reference code, or ``"eval"``).
        overfit_check: run the probe and the catastrophic-overfitting stop.
        probe_size: examples in the probe batch (the paper used one training minibatch).
        probe_steps: PGD steps of the probe attack (step 2.5·eps/steps).
        probe_restarts: PGD random restarts of the probe attack.
        max_drop: stop when the probe PGD accuracy is more than this below the best (0.2: the
            paper's 20 points).
    """

    name: ClassVar[str] = "fast-at"

    alpha: float | None = None
    bn_mode: str = "train"
    overfit_check: bool = True
    probe_size: int = 256
    probe_steps: int = 10
    probe_restarts: int = 1
    max_drop: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_optional_positive(self.alpha, "alpha")
        _check_mode(self.bn_mode)
        check_bool(self.overfit_check, "overfit_check")
        check_int(self.probe_size, "probe_size", 1)
        check_int(self.probe_steps, "probe_steps", 1)
        check_int(self.probe_restarts, "probe_restarts", 1)
        check_in_range(self.max_drop, "max_drop", 0.0, 1.0)
        self._probe_x: Tensor | None = None
        self._probe_y: Tensor | None = None
        self._probe_given = False
        self._best_state: dict[str, Tensor] | None = None
        self._best = (-math.inf, 0.0, 0)  # (pgd_acc, fgsm_acc, epoch) of the best epoch so far

    @property
    def fgsm_step(self) -> float:
        """The FGSM step alpha in pixel units."""
        return self.alpha if self.alpha is not None else 1.25 * self.eps

    def set_probe(self, x: Tensor, y: Tensor) -> None:
        """Use this batch (e.g. held-out data) as the overfitting probe instead of the first training examples."""
        self._probe_x, self._probe_y = x.detach().clone(), y.detach().clone()
        self._probe_given = True

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        threat = self.threat_model
        with generation_mode(model, self.bn_mode):
            start = threat.random_init(x, seeded_rng(x))
            return maximize(model, x, start, ce_per_example(y), threat, 1, self.fgsm_step)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.overfit_check:
            self._collect_probe(x, y)
        logits = model(self.perturb(model, x, y))
        return F.cross_entropy(logits, y), logits

    def _collect_probe(self, x: Tensor, y: Tensor) -> None:
        have = 0 if self._probe_x is None else self._probe_x.shape[0]
        if self._probe_given or have >= self.probe_size:
            return
        take = self.probe_size - have
        xs, ys = x[:take].detach().clone(), y[:take].detach().clone()
        if self._probe_x is None or self._probe_y is None:
            self._probe_x, self._probe_y = xs, ys
        else:
            self._probe_x, self._probe_y = torch.cat([self._probe_x, xs]), torch.cat([self._probe_y, ys])

    def probe_accuracies(self, model: nn.Module) -> tuple[float, float]:
        """(PGD accuracy, FGSM accuracy) of `model` on the probe batch (registry attacks, eval mode, seed 0)."""
        assert self._probe_x is not None and self._probe_y is not None
        threat = self.threat_model
        x, y = self._probe_x, self._probe_y
        pgd = create_attack("pgd", steps=self.probe_steps, restarts=self.probe_restarts)
        # "fgm" is FGSM under linf and its normalized-gradient version under l2
        fgsm = create_attack("fgm")
        pgd_acc = pgd(model, x, y, threat, seed=0).robust_accuracy(y)
        fgsm_acc = fgsm(model, x, y, threat, seed=0).robust_accuracy(y)
        return pgd_acc, fgsm_acc

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict[str, Any]:
        if not self.overfit_check or self._probe_x is None:
            return {}
        pgd_acc, fgsm_acc = self.probe_accuracies(model)
        best_pgd, best_fgsm, best_epoch = self._best
        if pgd_acc >= best_pgd:
            self._best = (pgd_acc, fgsm_acc, epoch)
            self._best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif pgd_acc < best_pgd - self.max_drop and fgsm_acc > best_fgsm:
            raise StopTraining(
                f"catastrophic overfitting at epoch {epoch}: PGD accuracy on the probe batch fell from "
                f"{best_pgd:.3f} (epoch {best_epoch}) to {pgd_acc:.3f} while FGSM accuracy rose from "
                f"{best_fgsm:.3f} to {fgsm_acc:.3f}; restored the weights of epoch {best_epoch}",
                restore=self._best_state)
        return {"pgd_acc": pgd_acc, "fgsm_acc": fgsm_acc}

    def state_dict(self) -> dict[str, Tensor]:
        state: dict[str, Tensor] = {}
        if self._probe_x is not None and self._probe_y is not None:
            state["probe_x"], state["probe_y"] = self._probe_x, self._probe_y
            state["probe_given"] = torch.tensor([int(self._probe_given)])
        if self._best_state is not None:
            state["best"] = torch.tensor([self._best[0], self._best[1], float(self._best[2])], dtype=torch.float64)
            state.update({f"best_state.{k}": v for k, v in self._best_state.items()})
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if "probe_x" in state:
            self._probe_x, self._probe_y = state["probe_x"], state["probe_y"]
            self._probe_given = bool(int(state["probe_given"].item()))
        if "best" in state:
            b = state["best"].tolist()
            self._best = (b[0], b[1], int(b[2]))
            prefix = "best_state."
            self._best_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------- Free AT
def project_delta(delta: Tensor, norm: str, eps: float) -> Tensor:
    """Project each example's perturbation onto the eps-ball (no box): linf clamp, l2 rescale.

    Free AT carries δ from one minibatch to the next, so δ is clipped to the ball only; the box
    is applied to x + δ of whatever batch it lands on. (`ThreatModel.project` always includes
    the box of one particular x, hence this small helper.)
    """
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = delta.flatten(1).norm(dim=1).clamp_min(1e-30)
    return delta * (eps / n).clamp(max=1.0).view(-1, *([1] * (delta.dim() - 1)))


@OBJECTIVES.register("free-at", "Shafahi et al. 2019: m minibatch replays, one backward pass updates weights "
                                "and the carried perturbation.")
@dataclass
class FreeAT(AdversarialObjective):
    r"""Adversarial training for free: minibatch replays with a carried-over perturbation.

    Paper: Shafahi, Najibi, Ghiasi, Xu, Dickerson, Studer, Davis, Taylor & Goldstein,
    "Adversarial Training for Free!", NeurIPS 2019 (arXiv:1904.12843). Each
    minibatch is replayed m times (``replays``: the Trainer makes m optimizer steps on it);
    each replay is one forward/backward pass whose gradient updates both the weights and δ:

        loss = CE(f(clip₀₁(x + δ)), y)
        θ ← optimizer step with ∇_θ loss
        δ ← Π_{‖δ‖ ≤ eps}(δ + eps · sign(∇_δ loss))          (after_step, same backward pass)

    δ starts at 0 and is carried between replays *and* between minibatches (the paper's
    "warm start"). When a batch is smaller than the carried δ (the last batch of an epoch) its
    first rows are used and updated, as in the reference code; a larger batch gets zero rows
    appended; a batch of another image shape resets δ to 0. δ is in the checkpoint, so resume
    is exact. The logits returned (train accuracy) are those on x + δ of the last replay.

    Every epoch makes m passes over the data, so divide the epoch budget by m (the paper trains
    for ``epochs / m`` epochs to match the cost of natural training); the learning-rate
    schedule then follows the Trainer's step counter, which counts minibatches, not replays.

    Args:
        replays: m, optimizer steps per minibatch (the paper uses m = 8 on CIFAR, 4 on ImageNet).
    """

    name: ClassVar[str] = "free-at"

    replays: int = 8  # type: ignore[assignment]  # a field overriding the base class's property

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.replays, "replays", 1)
        self._delta: Tensor | None = None  # carried perturbation, (rows, *image shape)
        self._leaf: Tensor | None = None   # this replay's δ, whose .grad the Trainer's backward fills

    def _delta_for(self, x: Tensor) -> Tensor:
        d = self._delta
        n = x.shape[0]
        if d is None or d.shape[1:] != x.shape[1:] or d.device != x.device:
            d = torch.zeros_like(x)
        elif d.shape[0] < n:
            d = torch.cat([d, d.new_zeros((n - d.shape[0], *d.shape[1:]))])
        self._delta = d
        return d[:n]

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        self._leaf = self._delta_for(x).detach().clone().requires_grad_(True)
        logits = model((x + self._leaf).clamp(*ThreatModel.box))
        return F.cross_entropy(logits, y), logits

    def after_step(self, model: nn.Module) -> None:
        leaf, self._leaf = self._leaf, None
        if leaf is None or leaf.grad is None or self._delta is None:
            return
        threat = self.threat_model
        new = project_delta(leaf.detach() + threat.eps * threat.direction(leaf.grad), self.norm, self.eps)
        self._delta = self._delta.clone()
        self._delta[:new.shape[0]] = new

    def state_dict(self) -> dict[str, Tensor]:
        return {"delta": self._delta} if self._delta is not None else {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._delta = state.get("delta")
        self._leaf = None


# --------------------------------------------------------------------------- ALP / CLP
@OBJECTIVES.register("alp", "Kannan et al. 2018: mixed clean/PGD cross-entropy + lam·‖z(x) − z(x')‖² "
                            "(logit pairing).")
@dataclass
class ALP(AdversarialObjective):
    r"""Adversarial logit pairing.

    Paper: Kannan, Kurakin & Goodfellow, "Adversarial Logit Pairing", 2018 (arXiv:1803.06373):

        loss = alpha · CE(f(x), y) + (1 − alpha) · CE(f(x'), y) + lam · mean_{i,k} (z_k(x_i) − z_k(x'_i))²

    where z are the logits, x' is Madry et al.'s PGD adversary (random start, CE) and the
    pairing term is the mean squared difference over the batch and the logits (the official
    implementation's ``mean_squared_error``). The first two terms are the paper's mixed
    minibatch: clean and adversarial examples go through the model as one batch. The official
    ImageNet runs crafted x' with targeted least-likely-class PGD; here it is untargeted CE
    PGD, as in the paper's MNIST/SVHN experiments and Madry et al. The logits returned (train
    accuracy) are the clean ones.

    Note: Engstrom, Ilyas & Athalye 2018 (arXiv:1807.10272) and Mosbach et al. 2018
    (arXiv:1810.12042) showed ALP's robustness was overestimated; evaluate it with strong,
    many-step attacks.

    Args:
        alpha: weight of the clean cross-entropy (0.5: the paper's mixed minibatch).
        lam: weight of the logit pairing term (0.5: the official implementation's example).
        steps, step_size, random_start, bn_mode: the PGD adversary, as in ``pgd-at``.
    """

    name: ClassVar[str] = "alp"

    alpha: float = 0.5
    lam: float = 0.5
    steps: int = 10
    step_size: float | None = None
    random_start: bool = True
    bn_mode: str = "train"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_in_range(self.alpha, "alpha", 0.0, 1.0)
        check_positive(self.lam, "lam", allow_zero=True)
        check_int(self.steps, "steps", 1)
        check_optional_positive(self.step_size, "step_size")
        check_bool(self.random_start, "random_start")
        _check_mode(self.bn_mode)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return pgd_adversary(model, x, y, self.threat_model, steps=self.steps, step_size=self.step_size,
                             random_start=self.random_start, bn_mode=self.bn_mode)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x_adv = self.perturb(model, x, y)
        logits = model(torch.cat([x, x_adv]))
        clean, adv = logits[:x.shape[0]], logits[x.shape[0]:]
        loss = (self.alpha * F.cross_entropy(clean, y) + (1 - self.alpha) * F.cross_entropy(adv, y)
                + self.lam * F.mse_loss(clean, adv))
        return loss, clean


@OBJECTIVES.register("clp", "Kannan et al. 2018: CE on clean (optionally noisy) inputs "
                            "+ lam·‖z(x_i) − z(x_j)‖² over random pairs.")
@dataclass
class CLP(Objective):
    r"""Clean logit pairing: pair the logits of random pairs of clean examples.

    Paper: Kannan, Kurakin & Goodfellow, "Adversarial Logit Pairing", 2018 (arXiv:1803.06373):

        loss = CE(f(x̃), y) + lam · mean_{pairs (i, j), k} (z_k(x̃_i) − z_k(x̃_j))²

    with x̃ = clip₀₁(x + N(0, noise_std²)) (the paper combines CLP with Gaussian noise
    augmentation; ``noise_std=0`` turns it off). Pairing: each batch is shuffled with a random
    permutation from torch's global generator and split into disjoint consecutive pairs
    (perm[0], perm[1]), (perm[2], perm[3]), ...; with an odd batch size the last example is
    unpaired. Pairs are of arbitrary classes (the paper pairs random clean examples). CLP has
    no adversary and therefore no threat options.

    Note: Engstrom et al. 2018 and Mosbach et al. 2018 (arXiv:1810.12042) showed the reported
    robustness of CLP came from distorted gradients; evaluate it with strong attacks.

    Args:
        lam: weight of the pairing term.
        noise_std: standard deviation of the Gaussian noise added to the inputs (pixel units).
    """

    name: ClassVar[str] = "clp"

    lam: float = 0.5
    noise_std: float = 0.0

    def __post_init__(self) -> None:
        check_positive(self.lam, "lam", allow_zero=True)
        check_positive(self.noise_std, "noise_std", allow_zero=True)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.noise_std > 0:
            x = (x + self.noise_std * torch.randn(x.shape, device=x.device, dtype=x.dtype)).clamp(*ThreatModel.box)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        n = x.shape[0] // 2 * 2
        if n >= 2:
            perm = torch.randperm(x.shape[0])[:n].to(x.device)
            loss = loss + self.lam * F.mse_loss(logits[perm[0::2]], logits[perm[1::2]])
        return loss, logits
