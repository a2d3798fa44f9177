"""Feature squeezing as a detector (Xu, Evans & Qi 2018).

Xu, Evans & Qi, "Feature Squeezing: Detecting Adversarial Examples in Deep Neural Networks",
NDSS 2018, arXiv:1704.01155: compare the model's softmax on x with its softmax on squeezed
copies of x; score = max over squeezers of the L1 distance. The paper's MNIST configuration is
1-bit depth reduction plus 2×2 and 3×3 median smoothing (its best joint detector uses bit depth
1 and median 2×2); CIFAR-10 uses 5-bit depth, 2×2 median and non-local means.

The squeezers are Bastion's input transforms (`create_transform("bit-depth:bits=1")`,
``"median:size=3"``); even median windows, which the registered median filter does not take,
are computed here (`EvenMedian`), as scipy's ``median_filter(size=2)`` does: the window covers
the pixel and its upper-left neighbours, and the even median is the upper one of the two middle
values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..transforms.base import Transform, create_transform, straight_through
from ..transforms.noise import zero_grad_output
from .base import Detector, register_detector

__all__ = ["EvenMedian", "FeatureSqueeze", "resolve_squeezer"]

DEFAULT_SQUEEZERS = ("bit-depth:bits=1", "median:size=2", "median:size=3")


class EvenMedian(Transform):
    """Median over even k×k windows (2×2, 4×4, ...), per channel, edges replicated.

    The window of pixel (i, j) spans rows i − k/2 … i + k/2 − 1 (likewise columns), and the
    value is the upper median (rank k²/2 of the sorted window, 0-based), which is what
    ``scipy.ndimage.median_filter(x, size=k, mode="nearest")`` computes. Not differentiable
    (BPDA: identity); not randomized.
    """

    differentiable = False
    randomized = False
    name = "median"

    def __init__(self, size: int = 2) -> None:
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size < 2 or size % 2:
            raise ValueError(f"`size` must be an even int >= 2 for EvenMedian, got {size!r}")
        self.size = size

    def transform(self, x: Tensor) -> Tensor:
        k = self.size
        with torch.no_grad():
            n, c, h, w = x.shape
            xp = F.pad(x.reshape(n * c, 1, h, w), (k // 2, k // 2 - 1, k // 2, k // 2 - 1), mode="replicate")
            win = F.unfold(xp, k)  # (n·c, k², h·w)
            med = win.sort(dim=1).values[:, (k * k) // 2]
            out = med.reshape(n, c, h, w)
        return zero_grad_output(out, x)

    def config(self) -> dict[str, Any]:
        return {"name": "median", "size": self.size}


def resolve_squeezer(spec: str | nn.Module) -> nn.Module:
    """A squeezer from a transform spec (``"bit-depth:bits=1"``, ``"median:size=2"``) or a module."""
    if isinstance(spec, nn.Module):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"`squeezers` items must be transform specs or nn.Modules, got {type(spec).__name__}")
    name, _, opts = spec.partition(":")
    if name.strip() == "median":
        size = 3
        for item in filter(None, (o.strip() for o in opts.split(","))):
            key, _, val = item.partition("=")
            if key.strip() == "size":
                try:
                    size = int(val)
                except ValueError:
                    raise ValueError(f"`size` in squeezer {spec!r} must be an int") from None
        if size % 2 == 0:
            return EvenMedian(size)
    return create_transform(spec)


@register_detector("feature-squeeze", "max L1 distance between softmax(x) and softmax(squeezed x) (Xu et al. 2018)")
class FeatureSqueeze(Detector):
    """Feature squeezing: ``score(x) = max_s ‖softmax(f(x)) − softmax(f(s(x)))‖₁``.

    Xu, Evans & Qi 2018, "Feature Squeezing: Detecting Adversarial Examples in Deep Neural
    Networks", NDSS 2018, arXiv:1704.01155.

    Declarations: **not differentiable** (bit-depth reduction and median filters have zero or
    useless gradients); `adaptive_score` runs each squeezer's BPDA stand-in (identity) on the
    backward pass, which is how He et al. 2017 (arXiv:1706.04701) and Athalye et al. 2018
    (arXiv:1802.00420) attack it. Not randomized (unless a squeezer is), unsupervised: `fit`
    only records the model.

    Args:
        squeezers: transform specs or modules; default ``("bit-depth:bits=1", "median:size=2",
            "median:size=3")`` (the paper's MNIST squeezers). Use e.g. ``("bit-depth:bits=5",
            "median:size=2")`` for colour images.
    """

    differentiable = False
    randomized = False

    def __init__(self, squeezers: Sequence[str | nn.Module] = DEFAULT_SQUEEZERS) -> None:
        super().__init__()
        if isinstance(squeezers, (str, nn.Module)):
            squeezers = [squeezers]
        if not isinstance(squeezers, Sequence) or len(squeezers) == 0:
            raise ValueError(f"`squeezers` must be a non-empty list of transform specs, got {squeezers!r}")
        self.squeezers = nn.ModuleList([resolve_squeezer(s) for s in squeezers])
        self._specs = [s if isinstance(s, str) else type(s).__name__ for s in squeezers]
        self._given = list(squeezers)
        # a randomized squeezer makes the detector randomized (instance-level declaration)
        self.randomized = any(bool(getattr(s, "randomized", False)) for s in self.squeezers)

    def options(self) -> dict[str, Any]:
        return {"squeezers": list(self._specs)}

    def init_kwargs(self) -> dict[str, Any]:
        given = [s for s in self._given if not isinstance(s, str)]
        if given:
            raise TypeError(f"this feature-squeeze detector cannot be saved: squeezer(s) "
                            f"{', '.join(type(s).__name__ for s in given)} were given as modules; give them as "
                            f"transform specs (e.g. 'bit-depth:bits=1') to save the detector")
        return {"squeezers": list(self._specs)}

    def _fit(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor | None, **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"FeatureSqueeze.fit() got unexpected keyword(s) {', '.join(sorted(kwargs))}")
        self.fit_info = {"squeezers": [getattr(s, "config", lambda: {})() or type(s).__name__ for s in self.squeezers]}

    def distances(self, x: Tensor, adaptive: bool = False) -> Tensor:
        """L1 distances (N, S), one column per squeezer; BPDA through squeezers if `adaptive`."""
        model = self.model
        p = torch.softmax(model(x), dim=1)
        cols = []
        for s in self.squeezers:
            xs = straight_through(s, x) if adaptive else s(x)
            cols.append((p - torch.softmax(model(xs), dim=1)).abs().sum(1))
        return torch.stack(cols, 1)

    def _score(self, x: Tensor) -> Tensor:
        return self.distances(x).amax(1)

    def adaptive_score(self, x: Tensor) -> Tensor:
        self._check_ready(x)
        return self.distances(x, adaptive=True).amax(1)
