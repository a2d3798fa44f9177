"""MagNet's two uses of the autoencoder: the reformer and the detectors' scores.

MagNet — Meng & Chen 2017, "MagNet: a Two-Pronged Defense against Adversarial Examples"
(CCS 2017, arXiv 1705.09064):

* the **reformer** replaces x by AE(x), pulling inputs towards the manifold of clean data
  (`reform`; the registered transform is ``"magnet"`` in
  `bastion.defenses.transforms.purifiers`);
* the **detectors** flag inputs far from the manifold: by reconstruction error
  ``mean |x - AE(x)|^p`` (`DenoisingAutoencoder.reconstruction_error`), or by the
  Jensen–Shannon divergence between the classifier's softmax at temperature T on x and on
  AE(x) (`probability_divergence`). Thresholds are set on clean data at a chosen false-positive
  rate; that detector lives in `bastion.defenses.detectors` and reuses these scores.

Everything here is differentiable: Carlini & Wagner (2017, arXiv 1711.08478) broke MagNet by
differentiating through the autoencoder.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..._checks import check_images, check_positive
from .autoencoder import DenoisingAutoencoder

__all__ = ["reform", "probability_divergence", "jensen_shannon"]


def reform(autoencoder: DenoisingAutoencoder, x: Tensor) -> Tensor:
    """MagNet's reformer: AE(x), differentiable in x."""
    check_images(x, "x")
    return autoencoder(x)


def jensen_shannon(p: Tensor, q: Tensor, eps: float = 1e-12) -> Tensor:
    """Jensen–Shannon divergence (nats) between rows of two probability matrices N×K -> (N,)."""
    m = 0.5 * (p + q)
    kl_pm = (p * ((p + eps).log() - (m + eps).log())).sum(1)
    kl_qm = (q * ((q + eps).log() - (m + eps).log())).sum(1)
    return 0.5 * (kl_pm + kl_qm)


def probability_divergence(model: nn.Module, autoencoder: DenoisingAutoencoder, x: Tensor,
                           temperature: float = 10.0) -> Tensor:
    """MagNet's probability-divergence score: JSD(softmax(f(x)/T), softmax(f(AE(x))/T)) per image (N,).

    The paper uses T = 10 and T = 40 on CIFAR-10.
    """
    check_images(x, "x")
    check_positive(temperature, "temperature")
    p = torch.softmax(model(x) / temperature, dim=1)
    q = torch.softmax(model(autoencoder(x)) / temperature, dim=1)
    return jensen_shannon(p, q)
