"""SHIELD (Das et al. 2018): Stochastic Local Quantization and an ensemble of vaccinated models.

* `SHIELD` ("shield") — Stochastic Local Quantization (SLQ): the image is JPEG-compressed at
  every quality of a set (default {20, 40, 60, 80}), split into square blocks (default 8×8,
  the JPEG block), and each block of the output is taken from one of the compressed versions
  chosen uniformly at random, independently per block and per image.
* `vaccinate` — fine-tunes copies of a classifier, one per JPEG quality, on images
  compressed at that quality ("vaccination"), and returns them as an `Ensemble`
  (majority vote by default, as the paper).
* `shield_defense` — the full defense: ``Defended([SHIELD(...)], vaccinated ensemble)``.

SHIELD's selling point is speed (a JPEG codec is cheap). Like every JPEG-based defense it
falls to BPDA (identity) + EOT (Athalye, Carlini & Wagner 2018, arXiv:1802.00420); the
vaccinated ensemble's majority vote adds a second non-differentiable step, whose stand-in
is its mean-probability path (`Ensemble.bpda`).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..._checks import check_choice, check_images, check_labels, check_positive
from .base import RandomizedTransform, check_int_range, register_transform, zero_grad_output
from .jpeg import _check_quality, jpeg_roundtrip

__all__ = ["SHIELD", "shield_defense", "vaccinate"]


def _check_qualities(qualities: Any) -> tuple[int, ...]:
    if isinstance(qualities, str):  # "20/40/60/80" (the spec parser of create_transform splits on commas)
        try:
            qualities = [int(q) for q in re.split(r"[/;|\s]+", qualities.strip()) if q]
        except ValueError:
            raise ValueError(f"`qualities` must be JPEG qualities like '20/40/60/80', got {qualities!r}") from None
    if isinstance(qualities, int) and not isinstance(qualities, bool):  # one quality ("shield:qualities=50")
        qualities = (qualities,)
    if not isinstance(qualities, Sequence) or not qualities:
        raise ValueError(f"`qualities` must be a non-empty sequence of JPEG qualities, got {qualities!r}")
    return tuple(_check_quality(q, "qualities") for q in qualities)


@register_transform("shield")
class SHIELD(RandomizedTransform):
    """Stochastic Local Quantization: a JPEG quality drawn at random for every block.

    Das, Shanbhogue, Chen, Hohman, Li, Chen, Kounavis & Chau 2018, "SHIELD: Fast, Practical
    Defense and Vaccination for Deep Learning using JPEG Compression", KDD 2018,
    arXiv:1802.06816.

    Declarations: randomized (the per-block qualities; attack with EOT) unless `qualities` holds
    a single value (then the instance declares ``randomized = False``: it is plain JPEG); not
    differentiable (the JPEG codec: autograd gives zero); `bpda` = identity.

    Args:
        qualities: the JPEG qualities to choose from (each 1..100). Default (20, 40, 60, 80).
            A string ``"20/40/60/80"`` is accepted too (``create_transform("shield:qualities=30/90")``).
        block: side of the square blocks in pixels (>= 1). Default 8 (the JPEG block).
        seed / generator: see `RandomizedTransform`.

    Shape: N×C×H×W with C = 1 or 3; output of the same shape. Blocks at the right and bottom
    border are cut to the image.
    """

    differentiable = False
    randomized = True
    channels = (1, 3)

    def __init__(self, qualities: Sequence[int] = (20, 40, 60, 80), block: int = 8,
                 seed: int | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__(seed, generator)
        self.qualities = _check_qualities(qualities)
        self.block = check_int_range(block, "block", 1)
        # one distinct quality: every block gets the same codec, nothing is random
        self.randomized = len(set(self.qualities)) > 1
        self.last_choice: Tensor | None = None  # N×bh×bw indices into `qualities` of the last call

    def transform(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        b = self.block
        bh, bw = -(-h // b), -(-w // b)
        choice = self.randint(0, len(self.qualities), n, bh, bw, device=x.device)
        self.last_choice = choice
        with torch.no_grad():
            versions = torch.stack([jpeg_roundtrip(x, q) for q in self.qualities])  # Q×N×C×H×W
            idx = choice.repeat_interleave(b, dim=1).repeat_interleave(b, dim=2)[:, :h, :w]  # N×H×W
            idx = idx[None, :, None].expand(1, n, c, h, w)
            out = versions.gather(0, idx).squeeze(0)
        return zero_grad_output(out, x)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "qualities": list(self.qualities), "block": self.block, "seed": self.seed}


def vaccinate(model: nn.Module, x: Tensor, y: Tensor, qualities: Sequence[int] = (20, 40, 60, 80), *,
              epochs: int = 3, lr: float = 1e-3, batch_size: int = 128, mode: str = "vote",
              seed: int = 0) -> nn.Module:
    """Fine-tune one copy of `model` per JPEG quality on compressed data; return their `Ensemble`.

    SHIELD's "vaccination" (Das et al. 2018, arXiv:1802.06816, Sec. 3): model m is re-trained
    on the training images JPEG-compressed at quality q_m, so it is accurate on compressed
    inputs; the paper combines them by majority vote behind SLQ.

    Args:
        model: the classifier to start from (left unchanged; copies are trained).
        x, y: training images N×C×H×W in [0, 1] (C = 1 or 3) and labels.
        qualities: one model per quality.
        epochs: fine-tuning epochs per model (Adam, cross-entropy).
        lr: Adam learning rate.
        batch_size: minibatch size.
        mode: the ensemble's combination, ``"vote"`` (the paper's majority vote; not
            differentiable, its BPDA stand-in is the mean-probability path), ``"probs"`` or
            ``"logits"``.
        seed: seed of the minibatch order.

    Returns:
        `bastion.defenses.layers.Ensemble` of the fine-tuned copies, in eval mode, with the
        parameters' ``requires_grad`` as in `model`.
    """
    from ..layers import Ensemble

    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    check_images(x, "x")
    check_labels(y, None, x.shape[0], "y")
    qualities = _check_qualities(qualities)
    check_int_range(epochs, "epochs", 1)
    check_positive(lr, "lr")
    check_int_range(batch_size, "batch_size", 1)
    check_choice(mode, "mode", ("vote", "probs", "logits"))
    requires = [p.requires_grad for p in model.parameters()]
    members = []
    for q in qualities:
        xq = jpeg_roundtrip(x, q)
        m = copy.deepcopy(model)
        params = list(m.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        g = torch.Generator().manual_seed(seed)
        m.train()
        for _ in range(epochs):
            perm = torch.randperm(len(y), generator=g).to(y.device)
            for i in range(0, len(y), batch_size):
                idx = perm[i:i + batch_size]
                loss = nn.functional.cross_entropy(m(xq[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        m.eval()
        for p, req in zip(params, requires):
            p.requires_grad_(req)
            p.grad = None
        members.append(m)
    return Ensemble(members, mode=mode)


def shield_defense(model: nn.Module, x: Tensor | None = None, y: Tensor | None = None,
                   qualities: Sequence[int] = (20, 40, 60, 80), block: int = 8, *, seed: int | None = None,
                   **vaccinate_kwargs: Any) -> nn.Module:
    """The SHIELD pipeline: ``Defended([SHIELD(qualities, block)], vaccinate(model, x, y, qualities))``.

    With ``x``/``y`` None, `model` is used as is (already vaccinated, or as an ablation).
    `seed` seeds SLQ; the other keyword arguments go to `vaccinate`.
    """
    from ..pipeline import Defended

    if (x is None) != (y is None):
        raise ValueError("give both `x` and `y` (to vaccinate) or neither")
    classifier = model if x is None else vaccinate(model, x, y, qualities, **vaccinate_kwargs)
    return Defended([SHIELD(qualities, block, seed=seed)], classifier)
