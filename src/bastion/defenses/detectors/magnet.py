"""MagNet's detectors: reconstruction error and probability divergence (Meng & Chen 2017).

Meng & Chen, "MagNet: a Two-Pronged Defense against Adversarial Examples", CCS 2017,
arXiv:1705.09064. A denoising autoencoder AE trained on clean data gives two kinds of detector:

* reconstruction error ``mean |x − AE(x)|^p`` (p = 1 or 2; the paper's MNIST detectors);
* probability divergence ``JSD(softmax(f(x)/T) ‖ softmax(f(AE(x))/T))`` (T = 10 and 40 on
  CIFAR-10).

Each component j gets its own threshold t_j at false-positive rate fpr/m (the paper splits the
budget over its m detectors; by the union bound the whole flags at most fpr of clean inputs),
and an input is rejected if *any* component exceeds its threshold. As one score: after
calibration ``score = max_j s_j / t_j`` with threshold 1. The other prong, the reformer
x → AE(x) in front of the classifier, is the ``"magnet"`` transform; `magnet_defense` puts both
into one `Defended` pipeline.

Everything is differentiable: Carlini & Wagner (2017, arXiv:1711.08478) broke MagNet by
differentiating through the autoencoder, and `adaptive_terms` gives an attacker one margin per
component, to be pushed below zero together.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..._checks import check_images
from ..generative.autoencoder import MNIST_STRUCTURE, DenoisingAutoencoder, load_autoencoder, train_autoencoder
from ..generative.magnet import jensen_shannon
from .base import (Detector, NotFittedError, check_fpr, check_int, check_number, conformal_threshold,
                   example_hashes, register_detector, robust_spread)

__all__ = ["MagNetDetector", "magnet_defense"]


@register_detector("magnet", "MagNet: autoencoder reconstruction error + probability divergence (Meng & Chen 2017)")
class MagNetDetector(Detector):
    """MagNet's detector: reconstruction errors and Jensen–Shannon divergences, any-of-m rule.

    Meng & Chen 2017, "MagNet: a Two-Pronged Defense against Adversarial Examples", CCS 2017,
    arXiv:1705.09064.

    Declarations: differentiable, not randomized, unsupervised (the autoencoder is trained on
    clean data only).

    Args:
        autoencoder: a trained `DenoisingAutoencoder`, the stem of its checkpoint, or None (a
            small one is trained on `x_clean` in `fit`, ``ae_epochs`` epochs).
        norms: exponents p of the reconstruction-error components (1: mean absolute error,
            2: mean squared error). Default (1,).
        temperatures: temperatures T of the divergence components. Default (10, 40).
        split: True (the paper): thresholds at fpr/m per component, any-of rule. False: one
            threshold at fpr on the max of the components normalized by their median clean score.
        ae_epochs, structure, seed: for the autoencoder trained in `fit` when none is given.
    """

    differentiable = True
    randomized = False

    def __init__(self, autoencoder: DenoisingAutoencoder | str | Path | None = None, norms: Sequence[float] = (1,),
                 temperatures: Sequence[float] = (10.0, 40.0), split: bool = True, ae_epochs: int = 30,
                 structure: Any = MNIST_STRUCTURE, seed: int = 0) -> None:
        super().__init__()
        if isinstance(autoencoder, (str, Path)):
            self._source: str | None = str(autoencoder)
            autoencoder = load_autoencoder(autoencoder)
        else:
            self._source = None if autoencoder is None else "given"
        if autoencoder is not None and not isinstance(autoencoder, DenoisingAutoencoder):
            raise TypeError(f"`autoencoder` must be a DenoisingAutoencoder, a checkpoint stem or None, "
                            f"got {type(autoencoder).__name__}")
        self.autoencoder = autoencoder
        self.norms = tuple(check_number(p, "norms") for p in _as_seq(norms, "norms"))
        self.temperatures = tuple(check_number(t, "temperatures") for t in _as_seq(temperatures, "temperatures"))
        if not self.norms and not self.temperatures:
            raise ValueError("`norms` and `temperatures` are both empty: MagNet needs at least one component")
        if not isinstance(split, bool):
            raise TypeError(f"`split` must be a bool, got {type(split).__name__}")
        self.split = split
        self.ae_epochs = check_int(ae_epochs, "ae_epochs")
        self.structure = structure
        self.seed = check_int(seed, "seed", 0)
        m = len(self.norms) + len(self.temperatures)
        self.register_buffer("norm", torch.ones(m))
        if autoencoder is not None:
            _freeze(autoencoder)

    @property
    def components(self) -> list[str]:
        return [f"recon-l{p:g}" for p in self.norms] + [f"jsd-T{t:g}" for t in self.temperatures]

    def options(self) -> dict[str, Any]:
        return {"autoencoder": self._source, "norms": list(self.norms), "temperatures": list(self.temperatures),
                "split": self.split, "ae_epochs": self.ae_epochs, "seed": self.seed}

    def init_kwargs(self) -> dict[str, Any]:
        # the autoencoder is rebuilt by `_rebuild` and its weights come with the detector's tensors
        return {"norms": list(self.norms), "temperatures": list(self.temperatures), "split": self.split,
                "ae_epochs": self.ae_epochs, "structure": list(self.structure), "seed": self.seed}

    def _extra_state(self) -> dict[str, Any]:
        assert self.autoencoder is not None
        return {"autoencoder": self.autoencoder.config(), "source": self._source}

    def _rebuild(self, extra: dict[str, Any], model: nn.Module) -> None:
        ae = DenoisingAutoencoder.from_config(extra["autoencoder"])
        _freeze(ae)
        self.autoencoder = ae
        self._source = extra.get("source")

    def _adaptive_parts(self) -> int:
        return len(self.components)

    def _fit(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor | None, **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"MagNetDetector.fit() got unexpected keyword(s) {', '.join(sorted(kwargs))}")
        if self.autoencoder is None:
            ae = train_autoencoder(x.detach().cpu(), epochs=self.ae_epochs, structure=self.structure,
                                   seed=self.seed, progress=False, device=x.device)
            _freeze(ae)
            self.autoencoder = ae.to(x.device)
            self._source = "trained in fit"
        elif self.autoencoder.channels != x.shape[1]:
            raise ValueError(f"the autoencoder takes {self.autoencoder.channels}-channel images, `x_clean` has "
                             f"{x.shape[1]}")
        with torch.no_grad():
            raw = torch.cat([self.components_raw(x[i:i + self.batch_size])
                             for i in range(0, x.shape[0], self.batch_size)])
        med = raw.median(0).values.clamp_min(1e-12)
        self.norm = med.to(self.norm.device)
        self.fit_info = {"components": self.components, "median_clean": med.tolist(),
                         "autoencoder": self._source}

    def components_raw(self, x: Tensor) -> Tensor:
        """Raw component scores (N, m): reconstruction errors, then divergences; differentiable."""
        ae = self.autoencoder
        assert ae is not None
        rec = ae(x.to(next(ae.parameters()).dtype)).to(x.dtype)
        cols = [(x - rec).abs().pow(p).flatten(1).mean(1) for p in self.norms]
        if self.temperatures:
            model = self.model
            zx, zr = model(x), model(rec)
            for t in self.temperatures:
                cols.append(jensen_shannon(torch.softmax(zx / t, 1), torch.softmax(zr / t, 1)))
        return torch.stack(cols, 1)

    def normalized(self, x: Tensor) -> Tensor:
        """Components divided by their thresholds (after `calibrate`; by their median clean score before)."""
        return self.components_raw(x) / self.norm.to(x.device, x.dtype)

    def _score(self, x: Tensor) -> Tensor:
        return self.normalized(x).amax(1)

    def calibrate(self, x_clean: Tensor, fpr: float, *, allow_fit_data: bool = False) -> float:
        """Thresholds per component at ``fpr / m`` (``split=True``), so the any-of rule flags at
        most `fpr` of clean inputs; the combined threshold is then 1. With ``split=False`` the
        base rule on the combined score."""
        if not self.split:
            return super().calibrate(x_clean, fpr, allow_fit_data=allow_fit_data)
        fpr = check_fpr(fpr)
        if not self.fitted:
            raise NotFittedError("detector 'magnet' is not fitted: call fit(...) before calibrate(...)")
        check_images(x_clean, "x_clean")
        self._refuse_fit_data(x_clean, "x_clean", allow_fit_data)
        with torch.no_grad():
            raw = torch.cat([self.components_raw(x_clean[i:i + self.batch_size])
                             for i in range(0, x_clean.shape[0], self.batch_size)])
        m = raw.shape[1]
        thresholds = [conformal_threshold(raw[:, j], fpr / m, "x_clean")[0] for j in range(m)]
        t = torch.tensor(thresholds, dtype=self.norm.dtype, device=self.norm.device).clamp_min(1e-12)
        self.norm = t
        combined = (raw / t.to(raw)).amax(1)
        self.threshold, self.fpr, self.scale = 1.0, fpr, robust_spread(combined)
        self.calibration = {"n": int(raw.shape[0]), "fpr_requested": fpr, "fpr_per_component": fpr / m,
                            "component_thresholds": dict(zip(self.components, thresholds)),
                            "fpr_calibration": float((combined > 1.0).float().mean()), "scale": self.scale}
        self.calibration_hashes = set(example_hashes(x_clean))
        return 1.0

    def adaptive_terms(self, x: Tensor) -> Tensor:
        """One margin per component, ``(s_j / t_j − 1) / scale`` (N, m): all must go below 0."""
        threshold = self._check_calibrated()
        self._check_ready(x)
        return (self.normalized(x) - threshold) / self.scale

    def reformer(self) -> nn.Module:
        """The other prong: the ``"magnet"`` transform x → AE(x) with this autoencoder."""
        from ..transforms.purifiers import MagNetReformer

        if self.autoencoder is None:
            raise NotFittedError("the MagNet detector has no autoencoder yet: fit it first")
        return MagNetReformer(self.autoencoder)


def magnet_defense(detector: MagNetDetector, model: nn.Module | None = None) -> nn.Module:
    """MagNet's full defense: ``Defended([reformer], model, detector)``.

    The detector judges the raw input (as in the paper); the classifier sees AE(x).
    """
    from ..pipeline import Defended

    if not isinstance(detector, MagNetDetector):
        raise TypeError(f"`detector` must be a MagNetDetector, got {type(detector).__name__}")
    return Defended([detector.reformer()], model if model is not None else detector.model, detector=detector)


def _as_seq(value: Any, name: str) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"`{name}` must be a list of numbers, got {value!r}")
    return tuple(value)


def _freeze(module: nn.Module) -> None:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
