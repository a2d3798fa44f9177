"""Papernot et al.'s practical black-box attack: train a substitute on the target's labels,
grown by Jacobian-based dataset augmentation, then attack the substitute."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_images, check_positive
from .._rng import ExampleRNG
from ..threat import ThreatModel
from .base import Attack, check_int, is_adversarial, register_attack
from .fgm import FGSM
from .transfer import resolve_attack

__all__ = ["Substitute", "small_cnn"]

Architecture = Callable[[tuple[int, int, int], int], nn.Module]


def small_cnn(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The default substitute: two 3×3 convolutions, pooled to 4×4, and a two-layer head.

    Adapts to any C×H×W (the adaptive pooling fixes the head's width); about 0.2M parameters.
    """
    c = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Linear(32 * 16, 128), nn.ReLU(), nn.Linear(128, num_classes),
    )


def _oracle(model: nn.Module, x: Tensor, chunk: int = 4096) -> Tensor:
    """The target as a label-only oracle: argmax of its logits, int64 (N,)."""
    with torch.no_grad():
        return torch.cat([model(c).argmax(dim=1) for c in x.split(chunk)]) if x.shape[0] else \
            torch.zeros(0, dtype=torch.long, device=x.device)


@register_attack("substitute")
@dataclass(frozen=True)
class Substitute(Attack):
    r"""Practical black-box attack: a substitute model trained on the target's labels only.

    Paper: Papernot, McDaniel, Goodfellow, Jha, Celik & Swami, "Practical Black-Box Attacks
    against Machine Learning", AsiaCCS 2017 (https://arxiv.org/abs/1602.02697), Algorithm 1.

    Distance: whatever the inner attack supports (default FGSM: linf).

    1. The seed set S₀ is `seed_data` if given, else the batch x being attacked; the target is
       queried only for its predicted label (argmax), never for scores or gradients.
    2. For ρ = 0 … rounds − 1: label S_ρ with the oracle, train the substitute (Adam, `epochs`
       passes, continuing from the last round) on all labelled points so far, then grow the set
       by Jacobian-based augmentation:
       S_{ρ+1} = S_ρ ∪ {clip(x + λ_ρ · sign(∇ₓ log F_sub(x)[Õ(x)]))}, with Õ(x) the oracle label
       (sign(∇ log p) = sign(∇ p): the paper's Jacobian row, computed stably);
       λ_ρ = λ · (−1)^⌊ρ/τ⌋ with τ = `sign_period` (the paper's periodic step), or λ if None.
       With `reservoir` = κ only κ random points of S_ρ are augmented per round (the paper's
       reservoir sampling), so queries grow linearly instead of doubling.
    3. The last set is labelled, the substitute trained once more, and the inner `attack` (FGSM
       by default) is run on the substitute; its points are returned and the base class
       evaluates them on the target.

    Examples the oracle already gets wrong are returned unchanged. ``queries[i]`` counts oracle
    queries on the points descended from example i (seed set = the batch: what attacking that
    example alone would cost, 2^rounds per example without reservoir), or — with `seed_data` —
    the whole run's queries plus the one label query of the example (every example needs the
    whole substitute).

    Caveat: with the default seed set (the batch) the substitute depends on the whole batch,
    so attacking a slice trains another substitute and "batch then slice equals slice" does not
    hold; pass `seed_data` for batch-independent results. Training is reproducible under the
    seed (weights and shuffling come from it; the global torch RNG is left untouched).

    Arguments:
        rounds (int): Jacobian augmentation rounds ρ (the paper's substitute epochs). (Default: 4)
        lmbda (float): augmentation step λ, in pixel units. (Default: 0.1)
        sign_period (int | None): τ of the periodic step sign; None keeps λ positive.
            (Default: None)
        reservoir (int | None): κ, points augmented per round; None augments all. (Default: None)
        epochs (int): training passes over the labelled set per round. (Default: 10)
        lr (float): Adam learning rate for the substitute. (Default: 0.01)
        batch_size (int): training mini-batch size. (Default: 128)
        seed_data (Tensor | None): unlabelled seed images (M, C, H, W) in [0, 1], on the
            input's device; None uses the batch. (Default: None)
        architecture (callable | None): ``(input_shape (C, H, W), num_classes) -> nn.Module``
            building the substitute; None is `small_cnn`. (Default: None)
        attack (Attack | str): the attack run on the trained substitute. (Default: "fgsm")
        attack_kwargs (dict | None): its hyper-parameters when given by name. (Default: None)

    Shape:
        x: (N, C, H, W) in [0, 1]; y: (N,); returns `AttackResult` with x_adv (N, C, H, W) and
        queries (N,).

    Example:
        >>> attack = Substitute(rounds=4, seed_data=x_holdout[:150])
        >>> result = attack(target_model, x, y, "linf:0.3", seed=0)
        >>> robust_accuracy, oracle_queries = 1 - result.success_rate, int(result.queries.max())
    """

    rounds: int = 4
    lmbda: float = 0.1
    sign_period: int | None = None
    reservoir: int | None = None
    epochs: int = 10
    lr: float = 0.01
    batch_size: int = 128
    seed_data: Tensor | None = field(default=None, compare=False, repr=False)
    architecture: Architecture | None = field(default=None, compare=False)
    attack: Attack | str = "fgsm"
    attack_kwargs: Mapping[str, Any] | None = field(default=None, compare=False)

    supports_norms = FGSM.supports_norms
    supports_targeted = True
    gradient_free = True
    # Not part of the base contract: tells generic tests that, with the default seed set (the
    # batch), attacking a slice is a different attack than attacking the batch.
    batch_dependent: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_int(self.rounds, "rounds", 0)
        check_positive(self.lmbda, "lmbda")
        if self.sign_period is not None:
            check_int(self.sign_period, "sign_period", 1)
        if self.reservoir is not None:
            check_int(self.reservoir, "reservoir", 1)
        check_int(self.epochs, "epochs", 1)
        check_positive(self.lr, "lr")
        check_int(self.batch_size, "batch_size", 1)
        if self.seed_data is not None:
            check_images(self.seed_data, "seed_data")
            if self.seed_data.shape[0] == 0:
                raise ValueError("`seed_data` must hold at least one image")
        if self.architecture is not None and not callable(self.architecture):
            raise TypeError(f"`architecture` must be callable (input_shape, num_classes) -> nn.Module, "
                            f"got {type(self.architecture).__name__}")
        inner = resolve_attack(self.attack, self.attack_kwargs)
        object.__setattr__(self, "attack", inner)
        object.__setattr__(self, "attack_kwargs", None)
        object.__setattr__(self, "supports_norms", inner.supports_norms)
        object.__setattr__(self, "supports_targeted", inner.supports_targeted)

    @property
    def randomized(self) -> bool:
        return True  # the substitute's initialization and training order come from the seed

    def config(self) -> dict[str, Any]:
        """JSON-friendly: seed data by shape, architecture by name, inner attack by its config."""
        assert isinstance(self.attack, Attack)
        arch = self.architecture
        return {
            "name": self.name, "rounds": self.rounds, "lmbda": self.lmbda, "sign_period": self.sign_period,
            "reservoir": self.reservoir, "epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size,
            "seed_data": None if self.seed_data is None else list(self.seed_data.shape),
            "architecture": "small_cnn" if arch is None else getattr(arch, "__name__", type(arch).__name__),
            "attack": self.attack.config(),
        }

    # ----------------------------------------------------------------------- training
    def _train(self, sub: nn.Module, x: Tensor, labels: Tensor, opt: torch.optim.Optimizer,
               gen: torch.Generator) -> None:
        sub.train()
        for _ in range(self.epochs):
            perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
            for i in range(0, x.shape[0], self.batch_size):
                b = perm[i:i + self.batch_size]
                loss = F.cross_entropy(sub(x[b]), labels[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()  # the substitute's own parameters; the target is never touched
                opt.step()
        sub.eval()

    def _augment(self, sub: nn.Module, x: Tensor, labels: Tensor, lam: float) -> Tensor:
        """x + λ·sign(∇ₓ log softmax(sub(x))[label]), clipped to the box."""
        xg = x.detach().requires_grad_(True)
        logp = F.log_softmax(sub(xg), dim=1).gather(1, labels.unsqueeze(1)).sum()
        (g,) = torch.autograd.grad(logp, [xg])
        return (x + lam * g.sign()).clamp(*ThreatModel.box).detach()

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, targets: Tensor | None,
             rng: ExampleRNG) -> tuple[Tensor, Tensor]:
        inner = self.attack
        assert isinstance(inner, Attack)
        n = x.shape[0]
        own_seed = self.seed_data is None
        if own_seed:
            data = x
        else:
            assert self.seed_data is not None
            data = self.seed_data.detach()
            if data.device != x.device:
                raise ValueError(f"`seed_data` is on {data.device} but `x` is on {x.device}")
            if data.shape[1:] != x.shape[1:]:
                raise ValueError(f"`seed_data` images have shape {tuple(data.shape[1:])}, `x` has {tuple(x.shape[1:])}")
        # which example each point descends from (only meaningful for the batch as seed set)
        origin = torch.arange(data.shape[0], device=x.device)
        seed = rng.seed % 2**63
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            # the label range (the oracle's output size); not a label query, so not counted
            num_classes = int(model(x[:1]).shape[1])
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(seed)  # the substitute's initial weights come from the attack's seed
            arch = self.architecture or small_cnn
            sub = arch(tuple(x.shape[1:]), num_classes)
        if not isinstance(sub, nn.Module):
            raise TypeError(f"`architecture` must return an nn.Module, got {type(sub).__name__}")
        sub = sub.to(x.device)
        opt = torch.optim.Adam(sub.parameters(), lr=self.lr)

        labels = _oracle(model, data)
        points, point_labels, point_origin = data, labels, origin
        for rho in range(self.rounds + 1):
            self._train(sub, points, point_labels, opt, gen)
            if rho == self.rounds:
                break
            lam = self.lmbda * (-1) ** (rho // self.sign_period) if self.sign_period else self.lmbda
            pick = torch.arange(points.shape[0], device=x.device)
            if self.reservoir is not None and points.shape[0] > self.reservoir:
                pick = torch.randperm(points.shape[0], generator=gen)[:self.reservoir].to(x.device)
            new = self._augment(sub, points[pick], point_labels[pick], lam)
            new_labels = _oracle(model, new)
            points = torch.cat([points, new])
            point_labels = torch.cat([point_labels, new_labels])
            point_origin = torch.cat([point_origin, point_origin[pick]])
        for p in sub.parameters():
            p.requires_grad_(False)

        total = point_labels.shape[0]
        if own_seed:
            queries = torch.bincount(point_origin, minlength=n)
            clean_pred = labels  # the first round labelled the batch itself
        else:
            clean_pred = _oracle(model, x)
            queries = torch.full((n,), total + 1, dtype=torch.long, device=x.device)
        done = is_adversarial(F.one_hot(clean_pred, num_classes).to(x.dtype), y, targets)
        x_adv = x.clone()
        todo = (~done).nonzero().squeeze(1)
        if todo.numel():
            ts = None if targets is None else targets[todo]
            x_adv[todo] = inner(sub, x[todo], y[todo], threat, targets=ts, seed=rng.seed).x_adv
        return x_adv, queries
