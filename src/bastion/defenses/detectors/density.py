"""Kernel density, Bayesian (MC-dropout) uncertainty, and their logistic-regression combination.

Feinman, Curtin, Shintre & Gardner 2017, "Detecting Adversarial Samples from Artifacts",
arXiv:1703.00410.

* ``"kde"`` — a Gaussian kernel density of the last hidden layer's features of the training
  data of each class; an input x predicted as class t scores ``−log KDE_t(x)`` with
  ``KDE_t(x) = 1/|X_t| Σ_{x_i ∈ X_t} exp(−‖φ(x) − φ(x_i)‖² / (2σ²))`` (computed with logsumexp:
  in 128 dimensions the density itself underflows). The normalizing constant (2πσ²)^{−D/2} is
  the same for every input and is dropped from the score.
* ``"bayes-uncertainty"`` — T stochastic forward passes with dropout active; the score is
  the paper's variance ``(1/T) Σ_t y_tᵀ y_t − ȳᵀ ȳ`` of the softmax outputs y_t.
* ``"kde-bu"`` — logistic regression on the z-scored pair [kde, bu], trained on clean
  (negative) and adversarial (positive) examples disjoint from the data the densities were
  fit on, and from the data it is evaluated on.

Departures from the paper, documented:

* MC dropout defaults to ``mode="head"``: dropout on the penultimate features only (the input
  of the last `nn.Linear`), with all T passes computed at once from one feature extraction.
  This is exact for networks whose only dropout is there (Bastion's zoo), and it *creates*
  dropout at test time for networks trained without any (p = 0.5 then, or `p`) — a model
  trained without dropout is not a Bayesian approximation in Gal & Ghahramani's sense, but the
  score still measures the sensitivity of the prediction to the features. ``mode="all"``
  follows the paper: every `nn.Dropout` of the model active (the model must have dropout).
* The kde-bu regression is trained on clean vs adversarial examples only (the paper also adds
  noisy copies of the clean ones to the negatives).
* ``bandwidth="auto"`` (not in the paper) picks σ by held-out class-conditional likelihood.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..._checks import check_images, check_labels
from .base import (Detector, LayerTap, check_int, check_number, example_hashes, find_last_linear,
                   generate_adversarial, register_detector)

__all__ = ["BANDWIDTHS", "BayesianUncertainty", "KDEBU", "KernelDensity", "mc_dropout_variance"]

#: the paper's bandwidths (its MNIST / CIFAR-10 / SVHN networks)
BANDWIDTHS = {"mnist": 1.20, "cifar10": 0.26, "svhn": 1.00}


def _flat_features(tap: LayerTap, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    logits, feats = tap(model, x)
    return logits, feats.flatten(1)


@torch.no_grad()
def _batched_features(tap: LayerTap, model: nn.Module, x: Tensor, batch: int = 512) -> tuple[Tensor, Tensor]:
    outs = [_flat_features(tap, model, x[i:i + batch]) for i in range(0, x.shape[0], batch)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


# ============================================================================================
# Kernel density
# ============================================================================================

def _class_log_kde(z: Tensor, ref: Tensor, ref_labels: Tensor, cls: Tensor, sigma: float,
                   log_counts: Tensor) -> Tensor:
    """log (1/|X_c| Σ_{i ∈ X_c} exp(−‖z − r_i‖²/(2σ²))) for each row's class c (N,), unnormalized."""
    # |z|² + |r|² − 2 z·r: no square root, so the gradient is finite even at zero distance
    d2 = (z.pow(2).sum(1, keepdim=True) + ref.pow(2).sum(1).unsqueeze(0) - 2.0 * z @ ref.T).clamp_min(0.0)
    logk = -d2 / (2.0 * sigma * sigma)
    same = ref_labels.unsqueeze(0) == cls.unsqueeze(1)
    logk = logk.masked_fill(~same, -math.inf)
    return torch.logsumexp(logk, dim=1) - log_counts[cls]


def select_bandwidth(feats: Tensor, labels: Tensor, num_classes: int, *, grid: int = 17,
                     seed: int = 0) -> float:
    """σ maximizing the held-out class-conditional log-likelihood (80/20 split), normalizing
    constant included; the grid spans 0.05–5 × the median nearest-neighbour distance."""
    n = feats.shape[0]
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).to(feats.device)
    cut = max(1, int(0.8 * n))
    tr, va = perm[:cut], perm[cut:]
    if va.numel() == 0:
        raise ValueError("bandwidth='auto' needs at least 5 training examples")
    ref, ref_y = feats[tr], labels[tr]
    counts = torch.bincount(ref_y, minlength=num_classes).to(feats.dtype)
    keep = counts[labels[va]] > 0
    va = va[keep]
    log_counts = counts.clamp_min(1).log()
    dist = torch.cdist(feats[va], ref)
    nn_dist = float(dist.min(dim=1).values.median().clamp_min(1e-6))
    dim = feats.shape[1]
    best, best_ll = nn_dist, -math.inf
    for s in (nn_dist * np.logspace(math.log10(0.05), math.log10(5.0), grid)):
        s = float(s)
        ll = _class_log_kde(feats[va], ref, ref_y, labels[va], s, log_counts) \
            - 0.5 * dim * math.log(2 * math.pi * s * s)
        m = float(ll.mean())
        if m > best_ll:
            best, best_ll = s, m
    return best


@register_detector("kde", "kernel density of penultimate features under the predicted class (Feinman et al. 2017)")
class KernelDensity(Detector):
    """Kernel density estimate of the predicted class's training features; score = −log density.

    Feinman, Curtin, Shintre & Gardner 2017, "Detecting Adversarial Samples from Artifacts",
    arXiv:1703.00410, §4.1. An input x predicted as class t scores
    ``−log( 1/|X_t| Σ_{x_i ∈ X_t} exp(−‖φ(x) − φ(x_i)‖²/(2σ²)) )``, φ the last hidden layer.

    Declarations: differentiable (through φ; the predicted class is piecewise constant), not
    randomized, unsupervised.

    Args:
        bandwidth: σ, a number > 0, one of the paper's presets ``"mnist"`` (1.20), ``"cifar10"``
            (0.26), ``"svhn"`` (1.00), or ``"auto"`` (held-out likelihood; see
            `select_bandwidth`). The paper's values fit the paper's networks; for another network
            ``"auto"`` is usually the better choice. Default 1.20 (MNIST).
        layer: the features (see `LayerTap`); default the penultimate layer.
        max_per_class: keep at most this many training examples per class (memory and speed:
            scoring costs one distance per kept example). None keeps all. Default 2000.
    """

    differentiable = True
    randomized = False

    def __init__(self, bandwidth: float | str = 1.20, layer: str | None = None,
                 max_per_class: int | None = 2000) -> None:
        super().__init__()
        if isinstance(bandwidth, str):
            if bandwidth != "auto" and bandwidth not in BANDWIDTHS:
                raise ValueError(f"`bandwidth` must be a number > 0, 'auto' or one of {', '.join(BANDWIDTHS)}; "
                                 f"got {bandwidth!r}")
        else:
            check_number(bandwidth, "bandwidth")
        self.bandwidth = bandwidth
        self.tap = LayerTap(layer)
        self.layer = layer
        self.max_per_class = None if max_per_class is None else check_int(max_per_class, "max_per_class")
        self.sigma: float | None = None
        self.register_buffer("ref", torch.zeros(0, 0), persistent=True)
        self.register_buffer("ref_labels", torch.zeros(0, dtype=torch.long), persistent=True)
        self.register_buffer("log_counts", torch.zeros(0), persistent=True)

    def options(self) -> dict[str, Any]:
        return {"bandwidth": self.bandwidth, "sigma": self.sigma, "layer": self.layer,
                "max_per_class": self.max_per_class}

    def _extra_state(self) -> dict[str, Any]:
        return {"sigma": self.sigma}

    def _rebuild(self, extra: dict[str, Any], model: nn.Module) -> None:
        self.sigma = None if extra.get("sigma") is None else float(extra["sigma"])

    def _fit(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor | None, **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"KernelDensity.fit() got unexpected keyword(s) {', '.join(sorted(kwargs))}")
        logits, feats = _batched_features(self.tap, model, x)
        k = logits.shape[1]
        if int(y.max()) >= k:
            raise ValueError(f"`y_clean` holds class {int(y.max())}, the model has {k} classes")
        if self.max_per_class is not None:
            keep = torch.cat([(y == c).nonzero().squeeze(1)[:self.max_per_class] for c in range(k)])
            feats, y = feats[keep], y[keep]
        self.ref = feats.detach()
        self.ref_labels = y.detach()
        counts = torch.bincount(y, minlength=k).to(feats.dtype)
        # a class with no training example gets an infinite score (nothing is typical of it)
        self.log_counts = torch.where(counts > 0, counts.clamp_min(1).log(), torch.full_like(counts, math.inf))
        if self.bandwidth == "auto":
            self.sigma = select_bandwidth(feats, y, k)
        elif isinstance(self.bandwidth, str):
            self.sigma = BANDWIDTHS[self.bandwidth]
        else:
            self.sigma = float(self.bandwidth)
        self.fit_info = {"layer": self.tap.resolve(model)[0], "n_ref": int(feats.shape[0]), "sigma": self.sigma,
                         "feature_dim": int(feats.shape[1])}

    def log_density(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(log KDE of the predicted class (N,), predicted class (N,)); differentiable in x."""
        logits, z = _flat_features(self.tap, self.model, x)
        pred = logits.argmax(1)
        ref = self.ref.to(z.device, z.dtype)
        out = _class_log_kde(z, ref, self.ref_labels.to(z.device), pred, float(self.sigma),
                             self.log_counts.to(z.device, z.dtype))
        return out, pred

    def _score(self, x: Tensor) -> Tensor:
        return -self.log_density(x)[0]


# ============================================================================================
# Bayesian uncertainty (MC dropout)
# ============================================================================================

def mc_dropout_variance(probs: Tensor) -> Tensor:
    """Feinman et al.'s uncertainty from T softmax outputs (T, N, K): mean_t y_tᵀy_t − ȳᵀȳ, (N,)."""
    mean = probs.mean(0)
    return probs.pow(2).sum(-1).mean(0) - mean.pow(2).sum(-1)


@register_detector("bayes-uncertainty", "MC-dropout variance of the softmax outputs (Feinman et al. 2017)")
class BayesianUncertainty(Detector):
    """Bayesian uncertainty by Monte-Carlo dropout: the variance of T stochastic softmax outputs.

    Feinman, Curtin, Shintre & Gardner 2017, "Detecting Adversarial Samples from Artifacts",
    arXiv:1703.00410, §4.2 (after Gal & Ghahramani 2016, arXiv:1506.02142): with dropout
    active at test time, the score is ``(1/T) Σ_t y_tᵀ y_t − ȳᵀ ȳ`` of the T softmax outputs.

    Declarations: differentiable (through the sampled masks), **randomized** (attack with
    EOT), unsupervised.

    Args:
        passes: T, stochastic forward passes. Default 50 (the paper).
        p: dropout probability. None: in ``"head"`` mode the rate of the model's own dropout on
            the penultimate features if it has one (``net.dropout`` in Bastion's zoo), else 0.5;
            ignored in ``"all"`` mode (each layer keeps its own rate).
        mode: ``"head"`` — dropout on the input of the last `nn.Linear` only, all T passes from
            one feature extraction (and dropout is *created* there if the model has none); the
            last `nn.Linear` must produce the logits. ``"all"`` — every `nn.Dropout` of the model
            active (the paper; the model must have dropout). Default "head".
        seed: seed of the dropout masks (reproducible streams: a generator seeded once, consumed
            call after call). None uses torch's global RNG.
    """

    differentiable = True
    randomized = True

    def __init__(self, passes: int = 50, p: float | None = None, mode: str = "head", seed: int | None = None) -> None:
        super().__init__()
        self.passes = check_int(passes, "passes", 2)
        if p is not None:
            check_number(p, "p")
            if p >= 1:
                raise ValueError(f"`p` must be a dropout probability in (0, 1), got {p!r}")
        self.p = p
        if mode not in ("head", "all"):
            raise ValueError(f"`mode` must be 'head' or 'all', got {mode!r}")
        self.mode = mode
        if seed is not None:
            check_int(seed, "seed", 0)
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}
        self.rate: float | None = None

    def options(self) -> dict[str, Any]:
        return {"passes": self.passes, "p": self.p, "mode": self.mode, "seed": self.seed, "rate": self.rate}

    def _extra_state(self) -> dict[str, Any]:
        return {"rate": self.rate}

    def _rebuild(self, extra: dict[str, Any], model: nn.Module) -> None:
        """The dropout rate, and (head mode) the model's last Linear, found again on `model`.

        A seeded mask stream starts again at its seed (as after `reseed`).
        """
        self.rate = None if extra.get("rate") is None else float(extra["rate"])
        self._generators.clear()
        if self.mode == "head":
            self.__dict__["_head"] = find_last_linear(model)[1]

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def reseed(self) -> None:
        """Restart the seeded mask stream (no effect with ``seed=None``)."""
        self._generators.clear()

    def _fit(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor | None, **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"BayesianUncertainty.fit() got unexpected keyword(s) {', '.join(sorted(kwargs))}")
        if self.mode == "all":
            drops = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
            if not drops:
                raise ValueError("mode='all' needs a model with dropout (an nn.Dropout with p > 0); use "
                                 "mode='head', which adds dropout on the penultimate features at test time")
            self.rate = None
            self.fit_info = {"dropout_layers": len(drops)}
            return
        name, lin = find_last_linear(model)
        with torch.no_grad():
            xs = x[:8]
            logits, h = LayerTap(None)(model, xs)
            if h.dim() != 2 or not torch.allclose(lin(h), logits, atol=1e-5, rtol=1e-4):
                raise ValueError(f"mode='head' needs the last nn.Linear ({name!r}) to produce the logits; this "
                                 f"model computes more after it: use mode='all'")
        own = _dropout_before(model, name)
        created = not own  # None or 0: the model has no dropout there, MC dropout creates it
        self.rate = float(self.p) if self.p is not None else (0.5 if created else float(own))
        self.__dict__["_head"] = lin
        self.fit_info = {"layer": f"{name}:input", "rate": self.rate, "created_dropout": created}

    def probabilities(self, x: Tensor) -> Tensor:
        """Softmax outputs of the T stochastic passes, (T, N, K)."""
        model, gen = self.model, self._generator(x.device)
        if self.mode == "head":
            lin = self.__dict__["_head"]
            _, h = LayerTap(None)(model, x)
            keep = 1.0 - float(self.rate)
            shape = (self.passes, *h.shape)
            u = torch.rand(shape, generator=gen, device=h.device, dtype=h.dtype) if gen is not None \
                else torch.rand(shape, device=h.device, dtype=h.dtype)
            masks = (u < keep).to(h.dtype) / keep
            return torch.softmax(lin(h.unsqueeze(0) * masks), dim=-1)
        # mode "all": the model's own dropout layers, T passes as one batch of T·N
        drops = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
        modes = [(m, m.training) for m in drops]
        xr = x.repeat(self.passes, *([1] * (x.dim() - 1)))
        try:
            for m in drops:
                m.train()
            if gen is not None:
                seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).item())
                with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
                    torch.manual_seed(seed)
                    logits = model(xr)
            else:
                logits = model(xr)
        finally:
            for m, mode in modes:
                m.train(mode)
        return torch.softmax(logits, dim=-1).reshape(self.passes, x.shape[0], -1)

    def _score(self, x: Tensor) -> Tensor:
        return mc_dropout_variance(self.probabilities(x))


def _dropout_before(model: nn.Module, linear_name: str) -> float | None:
    """The rate of a dropout module that runs right before the last Linear (``net.dropout``), else None.

    Judged by registration order: the leaf module registered just before the Linear.
    """
    prev: nn.Module | None = None
    for n, m in model.named_modules():
        if n == linear_name:
            return float(prev.p) if isinstance(prev, nn.modules.dropout._DropoutNd) else None
        if next(m.children(), None) is None:
            prev = m
    return None


# ============================================================================================
# The combination
# ============================================================================================

@register_detector("kde-bu", "logistic regression on [kde, bayes-uncertainty] (Feinman et al. 2017)")
class KDEBU(Detector):
    """Logistic regression on the z-scored pair [KDE score, Bayesian uncertainty].

    Feinman, Curtin, Shintre & Gardner 2017, "Detecting Adversarial Samples from Artifacts",
    arXiv:1703.00410, §5: the two features are combined by a logistic-regression classifier
    (scikit-learn) trained on clean (negative) and adversarial (positive) examples. The score is
    the regression's logit (differentiable: the coefficients are copied into torch).

    Data hygiene (the point of this class): the densities are fit on ``x_density`` (the
    classifier's training data), the regression on ``x_clean`` / ``x_adv``; `fit` refuses
    ``x_clean`` overlapping ``x_density``, and — because `fit` records the hashes of all of
    them — `calibrate` and `bastion.evaluation.detection.DetectionEval` refuse to score any
    of them: the reported numbers never come from the data the regression was trained on.

    Declarations: differentiable, **randomized** (its BU feature), **supervised**.

    Args:
        bandwidth, layer, max_per_class: for the `KernelDensity` part.
        passes, p, mode, seed: for the `BayesianUncertainty` part.
        attack, threat: how to make `x_adv` when `fit` is not given it (default FGSM at
            linf 0.1; the paper trains on the attack it evaluates).
        C: inverse regularization strength of the regression. Default 1.0.
    """

    differentiable = True
    randomized = True
    supervised = True

    def __init__(self, bandwidth: float | str = 1.20, layer: str | None = None, max_per_class: int | None = 2000,
                 passes: int = 50, p: float | None = None, mode: str = "head", seed: int | None = None,
                 attack: str = "fgsm", threat: str = "linf:0.1", C: float = 1.0) -> None:
        super().__init__()
        self.kde = KernelDensity(bandwidth, layer, max_per_class)
        self.bu = BayesianUncertainty(passes, p, mode, seed)
        self.attack, self.threat = attack, threat
        self.C = check_number(C, "C")
        self.register_buffer("mu", torch.zeros(2))
        self.register_buffer("sd", torch.ones(2))
        self.register_buffer("coef", torch.zeros(2))
        self.register_buffer("intercept", torch.zeros(()))

    def options(self) -> dict[str, Any]:
        return {"kde": self.kde.options(), "bu": self.bu.options(), "attack": self.attack, "threat": self.threat,
                "C": self.C}

    def reseed(self) -> None:
        """Restart the seeded dropout-mask stream of the BU feature (no effect with ``seed=None``)."""
        self.bu.reseed()

    def init_kwargs(self) -> dict[str, Any]:
        k, b = self.kde, self.bu
        return {"bandwidth": k.bandwidth, "layer": k.layer, "max_per_class": k.max_per_class, "passes": b.passes,
                "p": b.p, "mode": b.mode, "seed": b.seed, "attack": self.attack, "threat": self.threat, "C": self.C}

    def _extra_state(self) -> dict[str, Any]:
        # the regression is already tensors (mu, sd, coef, intercept): no scikit-learn object is kept
        return {"kde": self.kde.fitted_state(), "bu": self.bu.fitted_state()}

    def _rebuild(self, extra: dict[str, Any], model: nn.Module) -> None:
        self.kde.restore_fitted_state(extra["kde"], model)
        self.bu.restore_fitted_state(extra["bu"], model)

    def fit(self, model: nn.Module, x_clean: Tensor, y_clean: Tensor, x_adv: Tensor | None = None, *,
            x_density: Tensor | None = None, y_density: Tensor | None = None, seed: int | None = 0) -> "KDEBU":
        """Fit the densities on (`x_density`, `y_density`), the regression on `x_clean` vs `x_adv`.

        Args:
            model: the classifier.
            x_clean, y_clean: clean examples for the regression (negatives), disjoint from
                `x_density` (typically held-out data, not the classifier's training set).
            x_adv: adversarial examples (positives); made from `x_clean` with ``attack`` at
                ``threat`` when None (only the successful ones are kept).
            x_density, y_density: the data the class densities are fit on (required).
            seed: seed of the attack generating `x_adv`.
        """
        if x_density is None or y_density is None:
            raise ValueError("KDEBU.fit needs `x_density` and `y_density` (the data the densities are fit on, "
                             "e.g. the classifier's training set), separate from the regression data `x_clean`")
        check_images(x_density, "x_density")
        check_labels(y_density, None, x_density.shape[0], "y_density")
        check_images(x_clean, "x_clean")
        dens_h = set(example_hashes(x_density))
        overlap = sum(h in dens_h for h in example_hashes(x_clean))
        if overlap:
            raise ValueError(f"`x_clean` shares {overlap} example(s) with `x_density`: the regression must be "
                             f"fit on data disjoint from the density data")
        if x_adv is None:
            check_labels(y_clean, None, x_clean.shape[0], "y_clean")
            was = model.training
            model.eval()
            try:
                x_adv = generate_adversarial(model, x_clean, y_clean.long(), self.attack, self.threat, seed)
                with torch.no_grad():
                    ok = (model(x_adv).argmax(1) != y_clean.to(x_adv.device)) & \
                         (model(x_clean).argmax(1) == y_clean.to(x_clean.device))
            finally:
                model.train(was)
            x_adv = x_adv[ok]
            if x_adv.shape[0] < 2:
                raise ValueError(f"the {self.attack!r} attack at {self.threat} succeeded on fewer than 2 examples; "
                                 f"pass `x_adv` or a stronger `threat`")
        super().fit(model, x_clean, y_clean, x_adv, x_density=x_density, y_density=y_density)
        self.fit_hashes |= dens_h
        return self

    def _fit(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor | None, **kwargs: Any) -> None:
        from sklearn.linear_model import LogisticRegression

        assert x_adv is not None
        self.kde.fit(model, kwargs["x_density"], kwargs["y_density"])
        self.bu.fit(model, kwargs["x_density"], kwargs["y_density"])
        with torch.no_grad():
            feats = torch.cat([self._raw(x), self._raw(x_adv)]).double()
        labels = np.concatenate([np.zeros(x.shape[0]), np.ones(x_adv.shape[0])])
        mu, sd = feats.mean(0), feats.std(0).clamp_min(1e-12)
        zs = ((feats - mu) / sd).cpu().numpy()
        lr = LogisticRegression(C=self.C, max_iter=1000).fit(zs, labels)
        dev = self.mu.device
        self.mu, self.sd = mu.float().to(dev), sd.float().to(dev)
        self.coef = torch.as_tensor(lr.coef_[0], dtype=torch.float32, device=dev)
        self.intercept = torch.as_tensor(float(lr.intercept_[0]), dtype=torch.float32, device=dev)
        self.fit_info = {"n_clean": int(x.shape[0]), "n_adv": int(x_adv.shape[0]),
                         "coef": lr.coef_[0].tolist(), "intercept": float(lr.intercept_[0]),
                         "kde": self.kde.fit_info, "bu": self.bu.fit_info}

    def _raw(self, x: Tensor) -> Tensor:
        """[kde score, bu score] (N, 2), in batches (no gradient)."""
        out = []
        for i in range(0, x.shape[0], self.batch_size):
            xb = x[i:i + self.batch_size]
            out.append(torch.stack([self.kde._score(xb), self.bu._score(xb)], 1))
        return torch.cat(out)

    def features(self, x: Tensor) -> Tensor:
        """The z-scored [kde, bu] features (N, 2); differentiable."""
        self._check_ready(x)
        raw = torch.stack([self.kde._score(x), self.bu._score(x)], 1)
        return (raw - self.mu.to(raw)) / self.sd.to(raw)

    def _score(self, x: Tensor) -> Tensor:
        z = torch.stack([self.kde._score(x), self.bu._score(x)], 1)
        z = (z - self.mu.to(z)) / self.sd.to(z)
        return z @ self.coef.to(z) + self.intercept.to(z)
