"""`Defended`: transforms -> model -> (detector), the thing that gets trained, attacked and reported.

A `Defended` pipeline is an `nn.Module` returning logits, so every attack applies to it as is:
that is the *naive* attack, straight through the real components (what most papers reported).
`adaptive_view()` returns the same pipeline as an attacker who knows the defense sees it:
non-differentiable components are routed through their `bpda` stand-in on the backward pass
(Athalye et al. 2018). Randomized pipelines must additionally be attacked with EOT
(`bastion.attacks.adaptive.EOT`); `Defended.randomized` tells the evaluator so, and
`attack_view(eot)` builds the composition the declarations call for (BPDA, plus EOT when the
pipeline is randomized).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from .transforms.base import straight_through


class Defended(nn.Module):
    """A classifier behind input transformations, with an optional detector and output post-processing.

    Args:
        transforms: input transformations applied in order (each maps [0,1] images to [0,1] images).
        model: the classifier (any module returning logits).
        detector: an optional detector (flags inputs; see `bastion.defenses.detectors`).
        output: an optional post-processing of the logits (e.g. label-only outputs).

    Example:
        >>> from bastion.defenses.transforms import create_transform
        >>> d = Defended([create_transform("jpeg:quality=75")], model)
        >>> naive = pgd(d, x, y, threat)                      # gradients straight through JPEG
        >>> adaptive = pgd(d.adaptive_view(), x, y, threat)   # BPDA through JPEG
    """

    def __init__(self, transforms: Sequence[nn.Module] | nn.Module | None, model: nn.Module,
                 detector: nn.Module | None = None, output: nn.Module | None = None) -> None:
        super().__init__()
        if transforms is None:
            transforms = []
        elif isinstance(transforms, nn.Module):
            transforms = [transforms]
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        self.transforms = nn.ModuleList(list(transforms))
        self.model = model
        self.detector = detector
        self.output = output

    # -- declarations -------------------------------------------------------------------
    def components(self) -> Iterable[nn.Module]:
        yield from self.transforms
        yield self.model
        if self.output is not None:
            yield self.output

    @property
    def differentiable(self) -> bool:
        """True when autograd through the whole pipeline gives meaningful gradients."""
        return all(getattr(c, "differentiable", True) for c in self.components())

    @property
    def randomized(self) -> bool:
        """True when any component samples randomness in `forward`."""
        return any(getattr(m, "randomized", False) for m in self.modules() if m is not self)

    def declarations(self) -> list[dict[str, Any]]:
        """What each component declares (for reports and the audit: how the defense must be attacked).

        One entry per component in pipeline order — transforms, the model, the output
        post-processing — and last the detector, each with its ``role`` ("transform", "model",
        "output", "detector"), its config, ``differentiable`` and ``randomized``. The detector's
        entry is its `Detector.declaration`: also ``threshold`` and ``fpr`` (None before
        calibration), ``supervised``, ``adaptive_loss`` (it has the term an informed attacker
        adds to its loss), ``adaptive_parts``, ``bpda`` and ``eot``.
        """
        out = []
        roles = ["transform"] * len(self.transforms) + ["model"] + (["output"] if self.output is not None else [])
        for role, c in zip(roles, self.components()):
            cfg = c.config() if hasattr(c, "config") and callable(c.config) else {"name": type(c).__name__}
            out.append({"role": role, **cfg, "differentiable": bool(getattr(c, "differentiable", True)),
                        "randomized": bool(getattr(c, "randomized", False))})
        if self.detector is not None:
            d = self.detector
            if callable(getattr(d, "declaration", None)):
                out.append(d.declaration())
            else:  # a detector-like module outside Bastion's contract: say what can be said
                threshold = getattr(d, "threshold", None)
                out.append({"role": "detector", "name": getattr(d, "name", type(d).__name__),
                            "differentiable": bool(getattr(d, "differentiable", True)),
                            "randomized": bool(getattr(d, "randomized", False)),
                            "threshold": None if threshold is None else float(threshold),
                            "fpr": getattr(d, "fpr", None), "calibrated": threshold is not None,
                            "adaptive_loss": callable(getattr(d, "adaptive_loss", None))})
        return out

    # -- forward ------------------------------------------------------------------------
    def preprocess(self, x: Tensor, adaptive: bool = False) -> Tensor:
        for t in self.transforms:
            x = straight_through(t, x) if adaptive else t(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        logits = self.model(self.preprocess(x))
        return self.output(logits) if self.output is not None else logits

    def adaptive_view(self) -> "AdaptiveView":
        """The pipeline as an informed attacker differentiates it (BPDA for non-differentiable parts)."""
        return AdaptiveView(self)

    def attack_view(self, eot: int = 10, average: str = "logits", max_batch_size: int | None = None) -> nn.Module:
        """The module an adaptive attack should target, built from the declarations.

        `adaptive_view()` (BPDA through every non-differentiable component) when no component is
        randomized; otherwise ``EOT(adaptive_view(), n=eot)``: each forward averages `eot`
        independent draws, so a gradient attack follows the gradient of the expected prediction
        (Athalye, Carlini & Wagner 2018, arXiv:1802.00420, §4.1 and §4.3). Note that an attack
        run on the EOT module also *scores* with the averaged prediction (the "prediction of
        `eot` draws" classifier); to score the deployed pipeline, evaluate ``self`` (one draw)
        on the adversarial examples.

        Args:
            eot: draws per forward for randomized pipelines (>= 1; ignored otherwise).
            average: ``"logits"`` or ``"probs"`` (see `EOT`).
            max_batch_size: most rows per forward of the EOT module (None: all draws at once).

        Example:
            >>> d = Defended([create_transform("jpeg"), create_transform("gaussian-noise:sigma=0.1")], model)
            >>> result = PGD(steps=40)(d.attack_view(eot=10), x, y, "linf:0.1")   # BPDA + EOT-10
        """
        from ..attacks.adaptive import EOT

        if isinstance(eot, bool) or not isinstance(eot, int) or eot < 1:
            raise ValueError(f"`eot` must be an int >= 1 (draws per forward), got {eot!r}")
        view = self.adaptive_view()
        return EOT(view, n=eot, average=average, max_batch_size=max_batch_size) if self.randomized else view


class AdaptiveView(nn.Module):
    """Forward equals the defended pipeline's real output; backward uses each component's `bpda`.

    Output post-processing (label-only, rounded probabilities) is skipped: an attacker who knows
    the defense attacks the logits it hides (hiding gradients is not a defense).
    """

    differentiable = True

    def __init__(self, defended: Defended) -> None:
        super().__init__()
        self.defended = defended

    @property
    def randomized(self) -> bool:
        return self.defended.randomized

    def forward(self, x: Tensor) -> Tensor:
        d = self.defended
        # The model itself may be non-differentiable (a majority-vote ensemble): BPDA through it too.
        return straight_through(d.model, d.preprocess(x, adaptive=True))
