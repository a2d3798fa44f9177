"""Thermometer encoding (Buckman et al. 2018) and a helper to adapt a model's input layer to it.

Each value x ∈ [0, 1] becomes L binary channels, ``τ(x)_l = 1 if x >= l/L`` for
l = 0, ..., L−1 (channel 0 is always 1; x lands in bucket ``min(floor(L·x), L−1)`` and the
code has ones up to that bucket). An image N×C×H×W becomes N×(C·L)×H×W, channel-major:
output channel ``c·L + l`` is level l of input channel c.

The encoding **changes the channel count**, so the classifier behind it must take C·L
channels: `adapt_model` copies a model and widens its first `nn.Conv2d` (or `nn.Linear`) so
that, at initialisation, it computes on the code what the original computed on the image
(up to the quantization) — a warm start for training on encoded inputs (Buckman et al. train
their models on the encoding, with adversarial training in the paper's strongest setting).

Non-differentiable: the code is a step function. The BPDA stand-in is the soft thermometer
``clamp((x − l/L)·L + 1, 0, 1)`` — equal to the code at the bucket edges and linear in
between — the relaxation Athalye, Carlini & Wagner 2018 (arXiv:1802.00420) used to break it,
close to the paper's own LS-PGA relaxation (which Bastion does not implement).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from .base import Transform, check_int_range, register_transform, zero_grad_output

__all__ = ["Thermometer", "adapt_model"]


@register_transform("thermometer")
class Thermometer(Transform):
    """Thermometer encoding with `levels` levels: C channels in, C·levels binary channels out.

    Buckman, Roy, Raffel & Goodfellow 2018, "Thermometer Encoding: One Hot Way To Resist
    Adversarial Examples", ICLR 2018 (openreview S18Su--CW). Broken with BPDA by Athalye,
    Carlini & Wagner 2018 (arXiv:1802.00420).

    Declarations: not differentiable (autograd gives zero), not randomized; `bpda` = the soft
    thermometer (see the module docstring). Output shape N×(C·levels)×H×W with values {0, 1}.

    Args:
        levels: L >= 2. Default 16 (Buckman et al. use 16 levels).
    """

    differentiable = False
    randomized = False

    def __init__(self, levels: int = 16) -> None:
        super().__init__()
        self.levels = check_int_range(levels, "levels", 2)

    def _thresholds(self, x: Tensor) -> Tensor:
        l = torch.arange(self.levels, device=x.device, dtype=x.dtype) / self.levels
        return l.reshape(1, 1, self.levels, 1, 1)

    def _expand(self, v: Tensor) -> Tensor:
        n, c, l, h, w = v.shape
        return v.reshape(n, c * l, h, w)

    def transform(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            code = (x.unsqueeze(2) >= self._thresholds(x)).to(x.dtype)
        return zero_grad_output(self._expand(code), x)

    def bpda(self, x: Tensor) -> Tensor:
        soft = ((x.unsqueeze(2) - self._thresholds(x)) * self.levels + 1.0).clamp(0.0, 1.0)
        return self._expand(soft)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "levels": self.levels}


def adapt_model(model: nn.Module, levels: int, channels: int = 1) -> nn.Module:
    """A copy of `model` whose first `nn.Conv2d` / `nn.Linear` takes thermometer-encoded input.

    The first layer's weights for input channel c are spread evenly over the L code channels
    of c, and its bias is corrected so that, on the code of x, the layer outputs what it
    output on ``(floor(L·x) + ½)/L``, the centre of x's bucket: the mean of the code channels
    is ``(floor(L·x) + 1)/L``, so ``w·mean − w/(2L) = w·centre``. (At a zero-padded border
    of a convolution the correction is slightly off; training on encoded inputs absorbs it.)

    Args:
        model: the classifier for C-channel images; it is not modified.
        levels: the thermometer's L.
        channels: C, needed only when the first layer is an `nn.Linear` on the flattened image
            (assumed channel-major, as `nn.Flatten` of N×C×H×W produces); a Conv2d tells it.

    Returns:
        the adapted deep copy (train it on encoded inputs).

    Raises:
        ValueError: the model has no Conv2d/Linear layer, its first Conv2d has groups != 1, or
            a Linear's input size is not a multiple of `channels`.
    """
    check_int_range(levels, "levels", 2)
    check_int_range(channels, "channels", 1)
    new = copy.deepcopy(model)
    # depth-first, in definition order: the first layer, even when a sibling of the block that
    # holds it (a classifier head after a `features` Sequential) is a Linear
    for qual, layer in new.named_modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            wide = _widen(layer, levels, channels)
            if not qual:
                return wide
            parent_name, _, name = qual.rpartition(".")
            setattr(new.get_submodule(parent_name) if parent_name else new, name, wide)
            return new
    raise ValueError("adapt_model: found no nn.Conv2d or nn.Linear layer in the model")


def _widen(layer: nn.Module, levels: int, channels: int) -> nn.Module:
    with torch.no_grad():
        w = layer.weight
        if isinstance(layer, nn.Conv2d):
            if layer.groups != 1:
                raise ValueError("adapt_model: the first Conv2d has groups != 1; adapt it by hand")
            new: nn.Module = nn.Conv2d(w.shape[1] * levels, w.shape[0], layer.kernel_size, layer.stride,
                                       layer.padding, layer.dilation, bias=True, padding_mode=layer.padding_mode,
                                       device=w.device, dtype=w.dtype)
            new.weight.copy_(w.repeat_interleave(levels, dim=1) / levels)  # channel c -> code channels c·L..c·L+L−1
            shift = w.sum(dim=(1, 2, 3)) / (2 * levels)
        else:
            o, d = w.shape
            if d % channels:
                raise ValueError(f"adapt_model: the first Linear takes {d} features, "
                                 f"not a multiple of channels={channels}")
            # feature c·HW + j  ->  code features (c·L + l)·HW + j, l = 0..L−1
            spread = (w.reshape(o, channels, 1, d // channels) / levels).expand(o, channels, levels, d // channels)
            new = nn.Linear(d * levels, o, bias=True, device=w.device, dtype=w.dtype)
            new.weight.copy_(spread.reshape(o, d * levels))
            shift = w.sum(dim=1) / (2 * levels)
        bias = layer.bias if layer.bias is not None else torch.zeros_like(shift)
        new.bias.copy_(bias - shift)
        new.weight.requires_grad_(w.requires_grad)
        new.bias.requires_grad_(w.requires_grad)
    return new
