"""Adversarial-example detectors: each fits on clean data, scores inputs, calibrates a threshold
at a false-positive rate on held-out clean data, and declares how it must be attacked.

=====================  =========================================  ==============  ==========  ==========
name                   method                                     differentiable  randomized  supervised
=====================  =========================================  ==============  ==========  ==========
``metzen``             detector subnetwork (Metzen et al. 2017)   yes             no          yes
``kde``                kernel density (Feinman et al. 2017)       yes             no          no
``bayes-uncertainty``  MC-dropout variance (Feinman et al. 2017)  yes             yes         no
``kde-bu``             logistic regression on both (Feinman)      yes             yes         yes
``feature-squeeze``    feature squeezing (Xu et al. 2018)         no (BPDA)       no          no
``magnet``             MagNet detectors (Meng & Chen 2017)        yes             no          no
``mrr``                MRR / DeepFense latent defenders           yes             no          no
=====================  =========================================  ==============  ==========  ==========

>>> from bastion.defenses.detectors import create_detector
>>> det = create_detector("mrr:n=16").fit(model, x_train, y_train)
>>> det.calibrate(x_val, fpr=0.05)            # the security parameter: 5% false positives
>>> det.detect(x_test).is_adv
>>> save_detector(det, "runs/mrr16/detector")         # safetensors + JSON, never pickle
>>> det = load_detector("runs/mrr16/detector", model)

Every public module of this package is imported here, so a detector registers itself by living
in its own file with `@register_detector("name")`.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import (DETECTORS, Detection, Detector, LayerTap, NotFittedError, create_detector, example_hashes,
                   list_detectors, register_detector)

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_") and _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")
del _info

from .density import KDEBU, BayesianUncertainty, KernelDensity  # noqa: E402
from .magnet import MagNetDetector, magnet_defense  # noqa: E402
from .metzen import Metzen  # noqa: E402
from .mrr import MRR  # noqa: E402
from .persist import load_detector, save_detector  # noqa: E402
from .squeeze import FeatureSqueeze  # noqa: E402

__all__ = [
    "DETECTORS", "KDEBU", "MRR", "BayesianUncertainty", "Detection", "Detector", "FeatureSqueeze", "KernelDensity",
    "LayerTap", "MagNetDetector", "Metzen", "NotFittedError", "create_detector", "example_hashes", "list_detectors",
    "load_detector", "magnet_defense", "register_detector", "save_detector",
]
