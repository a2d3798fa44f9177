"""Adversary detection subnetworks on hidden activations (Metzen et al. 2017).

Metzen, Genewein, Fischer & Bischoff, "On Detecting Adversarial Perturbations", ICLR 2017,
arXiv:1702.04267. A small detector network D reads the activations of one layer of the
(frozen) classifier and is trained with binary cross-entropy to tell clean inputs (label 0)
from adversarial ones (label 1), the adversarial ones made by a given attack (the paper: FGSM,
BIM, DeepFool).

The **dynamic adversary** (§3.2 of the paper): an attacker who knows D attacks classifier and
detector jointly,

    x_{n+1} = Clip_{x,ε}( x_n + α [ (1 − σ) sign ∇J_cls(x_n, y) + σ sign ∇J_det(x_n, 1) ] ),

where J_det(·, 1) is D's loss on the label "adversarial" (increasing it makes D say "clean")
and σ ∈ [0, 1] weighs fooling the detector against fooling the classifier. With
``dynamic=True`` the detector is trained against it: every epoch fresh adversarial examples
are crafted against the current D, with σ drawn uniformly from [0, 1] per example, as in the
paper. Dynamic training needs an L∞ threat (the update uses signs).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...threat import ThreatModel
from .base import (Detector, LayerTap, check_int, check_number, generate_adversarial, register_detector,
                   seeded)

__all__ = ["Metzen", "dynamic_bim"]


class _ConvDetector(nn.Module):
    """conv3×3(w)-ReLU-conv3×3(w)-ReLU-global average pool-linear(1), on C×H×W activations."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 1),
        )

    def forward(self, a: Tensor) -> Tensor:
        return self.net(a).squeeze(1)


class _MLPDetector(nn.Module):
    """linear(w)-ReLU-linear(w)-ReLU-linear(1) on flat activations."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, 1))

    def forward(self, a: Tensor) -> Tensor:
        return self.net(a.flatten(1)).squeeze(1)


@register_detector("metzen", "detector subnetwork on hidden activations, trained on adversarial examples "
                             "(Metzen et al. 2017)")
class Metzen(Detector):
    """A detector subnetwork on a hidden layer, trained (BCE) on clean vs adversarial activations.

    Metzen, Genewein, Fischer & Bischoff 2017, "On Detecting Adversarial Perturbations", ICLR
    2017, arXiv:1702.04267. The score is D's logit for "adversarial".

    Declarations: differentiable, not randomized, **supervised** (trained on adversarial
    examples: it detects what it was shown; Carlini & Wagner 2017, arXiv:1705.07263, evade it
    with an attack that includes D in its loss — `bastion.attacks.detector_aware`).

    Args:
        layer: the activations D reads (see `LayerTap`); default the penultimate features.
            4-D activations (a convolutional layer, e.g. ``"net.features.5"``) get a small
            convolutional D, flat ones an MLP.
        attack: the attack making the training adversarial examples when `fit` is not given
            `x_adv` (a registered name or an `Attack`). Default "bim".
        threat: its threat model. Default "linf:0.1".
        dynamic: train against the dynamic adversary (see the module docstring). Default False.
        sigma: σ of the dynamic adversary; None draws it uniformly in [0, 1] per example
            (the paper). Default None.
        dynamic_steps: iterations of the dynamic adversary. Default 10.
        width: D's hidden width. Default 64.
        epochs, lr, batch_size: D's training (Adam). Defaults 20, 1e-3, 128.
        seed: seeds D's initialization, the data order, the attacks and σ. Default 0.
    """

    differentiable = True
    randomized = False
    supervised = True

    def __init__(self, layer: str | None = None, attack: Any = "bim", threat: str | ThreatModel = "linf:0.1",
                 dynamic: bool = False, sigma: float | None = None, dynamic_steps: int = 10, width: int = 64,
                 epochs: int = 20, lr: float = 1e-3, batch_size: int = 128, seed: int = 0) -> None:
        super().__init__()
        self.layer = layer
        self.tap = LayerTap(layer)
        self.attack = attack
        self.threat = threat if isinstance(threat, ThreatModel) else ThreatModel.parse(threat)
        if not isinstance(dynamic, bool):
            raise TypeError(f"`dynamic` must be a bool, got {type(dynamic).__name__}")
        if dynamic and self.threat.norm.value != "linf":
            raise ValueError(f"`dynamic=True` needs an linf `threat` (the dynamic adversary steps by signs), "
                             f"got {self.threat}")
        self.dynamic = dynamic
        if sigma is not None:
            check_number(sigma, "sigma", allow_equal=True)
            if sigma > 1:
                raise ValueError(f"`sigma` must be in [0, 1], got {sigma!r}")
        self.sigma = sigma
        self.dynamic_steps = check_int(dynamic_steps, "dynamic_steps")
        self.width = check_int(width, "width")
        self.epochs = check_int(epochs, "epochs")
        self.lr = check_number(lr, "lr")
        self.train_batch_size = check_int(batch_size, "batch_size")
        self.seed = check_int(seed, "seed", 0)
        self.net: nn.Module | None = None
        self.register_buffer("a_mean", torch.zeros(0))
        self.register_buffer("a_std", torch.ones(0))

    def options(self) -> dict[str, Any]:
        atk = self.attack if isinstance(self.attack, str) else getattr(self.attack, "name", type(self.attack).__name__)
        return {"layer": self.layer, "attack": atk, "threat": str(self.threat), "dynamic": self.dynamic,
                "sigma": self.sigma, "dynamic_steps": self.dynamic_steps, "width": self.width, "epochs": self.epochs,
                "lr": self.lr, "batch_size": self.train_batch_size, "seed": self.seed}

    def _rebuild(self, extra: dict[str, Any], model: nn.Module) -> None:
        """D with the architecture `fit` chose for the recorded activation shape."""
        shape = list(self.fit_info["activation_shape"])
        self.net = (_ConvDetector(shape[0], self.width) if len(shape) == 3 else _MLPDetector(shape[0], self.width)).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    # ----------------------------------------------------------------------- pieces
    def activations(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, standardized activations) of the classifier on x; differentiable."""
        logits, a = self.tap(self.model, x)
        shape = (1, -1) + (1,) * (a.dim() - 2)
        return logits, (a - self.a_mean.view(shape).to(a)) / self.a_std.view(shape).to(a)

    def _logit(self, x: Tensor) -> Tensor:
        assert self.net is not None
        return self.net(self.activations(x)[1])

    def _score(self, x: Tensor) -> Tensor:
        return self._logit(x)

    # ----------------------------------------------------------------------- training
    def _fit(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor | None, **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"Metzen.fit() got unexpected keyword(s) {', '.join(sorted(kwargs))}")
        device = x.device
        with seeded(self.seed, device):
            if x_adv is None and not self.dynamic:
                x_adv = generate_adversarial(model, x, y, self.attack, self.threat, self.seed)
            with torch.no_grad():  # standardize the activations with clean statistics
                acts = torch.cat([self.tap(model, x[i:i + 512])[1] for i in range(0, x.shape[0], 512)])
            if acts.dim() not in (2, 4):
                raise ValueError(f"Metzen reads 2-D (N×D) or 4-D (N×C×H×W) activations; layer "
                                 f"{self.tap.resolve(model)[0]!r} gives shape {tuple(acts.shape)}")
            reduce = (0,) if acts.dim() == 2 else (0, 2, 3)
            self.a_mean, self.a_std = acts.mean(dim=reduce), acts.std(dim=reduce).clamp_min(1e-6)
            self.net = (_ConvDetector(acts.shape[1], self.width) if acts.dim() == 4
                        else _MLPDetector(acts.shape[1], self.width)).to(device)
            self._train(model, x, y, x_adv)
        self.net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.fit_info = {"layer": self.tap.resolve(model)[0], "activation_shape": list(acts.shape[1:]),
                         "n_clean": int(x.shape[0]), "n_adv": None if x_adv is None else int(x_adv.shape[0]),
                         "dynamic": self.dynamic, **self.fit_info}

    def _train(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor | None) -> None:
        assert self.net is not None
        net = self.net
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        g = torch.Generator().manual_seed(self.seed)
        labels = None
        acts = None
        losses = []
        for epoch in range(self.epochs):
            if self.dynamic or acts is None:
                if self.dynamic:  # fresh adversarial examples against the current detector
                    net.eval()
                    sig = torch.rand(x.shape[0], generator=g) if self.sigma is None \
                        else torch.full((x.shape[0],), float(self.sigma))
                    x_adv = torch.cat([dynamic_bim(model, self, x[i:i + 512], y[i:i + 512], self.threat.eps,
                                                   sig[i:i + 512].to(x.device), self.dynamic_steps)
                                       for i in range(0, x.shape[0], 512)])
                assert x_adv is not None
                data = torch.cat([x, x_adv])
                labels = torch.cat([torch.zeros(x.shape[0]), torch.ones(x_adv.shape[0])]).to(x.device)
                with torch.no_grad():  # the classifier is frozen: its activations are computed once
                    acts = torch.cat([self.activations(data[i:i + 512])[1] for i in range(0, data.shape[0], 512)])
            assert labels is not None
            net.train()
            perm = torch.randperm(acts.shape[0], generator=g).to(x.device)
            total = 0.0
            for i in range(0, acts.shape[0], self.train_batch_size):
                idx = perm[i:i + self.train_batch_size]
                loss = F.binary_cross_entropy_with_logits(net(acts[idx]), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * idx.numel()
            losses.append(round(total / acts.shape[0], 5))
        self.fit_info = {"train_bce": losses}


def dynamic_bim(model: nn.Module, detector: Metzen, x: Tensor, y: Tensor, eps: float, sigma: Tensor,
                steps: int = 10, step_size: float | None = None) -> Tensor:
    """Metzen et al.'s dynamic adversary: BIM on ``(1 − σ)·sign ∇J_cls + σ·sign ∇J_det(·, 1)``.

    Args:
        model: the classifier; detector: a `Metzen` detector (its current network is attacked).
        x, y: clean images and labels; eps: the L∞ radius.
        sigma: (N,) weights in [0, 1] (0: classifier only, 1: detector only).
        steps, step_size: BIM iterations and step (default ``1.25·eps/steps``).

    Returns:
        adversarial images (N, C, H, W) in ball(x, eps) ∩ [0, 1] (no gradient).
    """
    alpha = step_size if step_size is not None else 1.25 * eps / steps
    assert detector.net is not None
    s = sigma.view(-1, *([1] * (x.dim() - 1))).to(x)
    x_adv = x.detach().clone()
    ones = torch.ones(x.shape[0], device=x.device)
    for _ in range(steps):
        with torch.enable_grad():
            xg = x_adv.requires_grad_(True)
            logits, a = detector.activations(xg)
            j_cls = F.cross_entropy(logits, y, reduction="sum")
            j_det = F.binary_cross_entropy_with_logits(detector.net(a), ones, reduction="sum")
            (g_cls,) = torch.autograd.grad(j_cls, [xg], retain_graph=True)
            (g_det,) = torch.autograd.grad(j_det, [xg])
        step = (1 - s) * g_cls.sign() + s * g_det.sign()
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * step, x - eps), x + eps).clamp(0.0, 1.0)
    return x_adv.detach()

