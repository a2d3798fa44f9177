"""Output hardening: post-processing of the logits that reveals less to an attacker.

Used as ``Defended(transforms, model, output=LabelOnly())``. Each module maps logits N×K to
N×K "logits" that carry only what an API of that kind would return:

* `LabelOnly` — the decision only: a scaled one-hot of the arg-max;
* `RoundedProbs` — probabilities rounded to `decimals` places (returned as their log);
* `TopK` — only the k largest probabilities (rounded; the others at a floor), as their log.

None of them makes a model more robust. They hide the gradient: every output is computed from
the model's logits outside autograd and re-attached with a zero derivative, so a gradient
attack through the pipeline sees exactly zero gradients (visible to the obfuscated-gradient
checks) — this is "gradient masking" by design, and the modules declare
``differentiable = False``. An informed attacker attacks the logits underneath:
`Defended.adaptive_view()` skips the output module, and decision-based / score-based black-box
attacks work on the hardened outputs directly. The arg-max of the hardened output equals the
model's (ties aside), so the accuracy is unchanged.

`create_output("label-only")`, `create_output("rounded-probs:decimals=2")`,
`create_output("top-k:k=3")` build them by name (the CLI's spelling).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_positive
from .._registry import Registry

__all__ = ["OUTPUTS", "LabelOnly", "OutputHardening", "RoundedProbs", "TopK", "create_output", "list_outputs"]

OUTPUTS: Registry[type["OutputHardening"]] = Registry("output hardening")

# log of this stands for a reported probability of 0 (finite, so every loss stays finite)
_FLOOR = 1e-12


def _check_logits(logits: Tensor) -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise ValueError(f"output hardening expects logits of shape N×K, got "
                         f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")


def _check_int(value: Any, name: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an integer, got {value!r}")
    if value < lo:
        raise ValueError(f"`{name}` must be an integer >= {lo}, got {value!r}")
    return value


class OutputHardening(nn.Module):
    """Base class: `harden(logits)` computes the revealed output; `forward` hides its gradient."""

    differentiable = False
    randomized = False
    name = "output"

    def forward(self, logits: Tensor) -> Tensor:
        _check_logits(logits)
        with torch.no_grad():
            out = self.harden(logits.detach())
        if logits.requires_grad:  # attached with a zero derivative: gradients are 0, not an error
            out = out + 0.0 * logits.sum(dim=1, keepdim=True)
        return out

    def harden(self, logits: Tensor) -> Tensor:
        raise NotImplementedError

    def bpda(self, logits: Tensor) -> Tensor:
        """Differentiable stand-in: the logits themselves (what an informed attacker attacks)."""
        return logits

    def config(self) -> dict[str, Any]:
        return {"name": self.name}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")


def register_output(name: str):
    def deco(cls: type[OutputHardening]) -> type[OutputHardening]:
        cls.name = name
        OUTPUTS.register(name)(cls)
        return cls
    return deco


@register_output("label-only")
class LabelOnly(OutputHardening):
    """Only the decision: ``scale · one_hot(argmax(logits))``.

    A label-only (decision-based) API; attacks against it are decision-based (Boundary attack,
    Brendel, Rauber & Bethge 2018, arXiv:1712.04248; HopSkipJump, Chen, Jordan & Wainwright
    2020, arXiv:1904.02144) or transfer attacks — or, for an informed attacker, gradient
    attacks on the logits underneath (`Defended.adaptive_view`).

    Args:
        scale: the value of the winning logit (> 0; the others are 0). Default 10, so the
            softmax of the output is confident and cross-entropy stays well scaled.
    """

    def __init__(self, scale: float = 10.0) -> None:
        super().__init__()
        check_positive(scale, "scale")
        self.scale = float(scale)

    def harden(self, logits: Tensor) -> Tensor:
        return F.one_hot(logits.argmax(dim=1), logits.shape[1]).to(logits.dtype) * self.scale

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "scale": self.scale}


@register_output("rounded-probs")
class RoundedProbs(OutputHardening):
    """Probabilities rounded to `decimals` places, returned as their log (zeros at log 1e-12).

    Rounding confidence scores was proposed against model extraction and score-based attacks
    (Tramèr, Zhang, Juels, Reiter & Ristenpart 2016, "Stealing Machine Learning Models via
    Prediction APIs", arXiv:1609.02943, Sec. 6). Its softmax is the rounded probabilities,
    renormalized.

    Args:
        decimals: 0..10 decimal places. Default 2.
    """

    def __init__(self, decimals: int = 2) -> None:
        super().__init__()
        self.decimals = _check_int(decimals, "decimals", 0)
        if decimals > 10:
            raise ValueError(f"`decimals` must be an integer in [0, 10], got {decimals!r}")

    def harden(self, logits: Tensor) -> Tensor:
        p = torch.round(F.softmax(logits.float(), dim=1), decimals=self.decimals)
        return torch.log(p.clamp_min(_FLOOR)).to(logits.dtype)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "decimals": self.decimals}


@register_output("top-k")
class TopK(OutputHardening):
    """Only the k largest probabilities (optionally rounded); the other classes at log 1e-12.

    The "top-k scores" output of prediction APIs (Tramèr et al. 2016, arXiv:1609.02943). The
    arg-max is preserved; the scores of the classes outside the top k are hidden.

    Args:
        k: classes revealed (>= 1). Default 1.
        decimals: round the revealed probabilities to this many places (0..10), or None.
            Default 4.
    """

    def __init__(self, k: int = 1, decimals: int | None = 4) -> None:
        super().__init__()
        self.k = _check_int(k, "k", 1)
        if decimals is not None and (_check_int(decimals, "decimals", 0) > 10):
            raise ValueError(f"`decimals` must be an integer in [0, 10] or None, got {decimals!r}")
        self.decimals = decimals

    def harden(self, logits: Tensor) -> Tensor:
        p = F.softmax(logits.float(), dim=1)
        if self.decimals is not None:
            p = torch.round(p, decimals=self.decimals)
        k = min(self.k, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        keep = torch.zeros_like(p, dtype=torch.bool).scatter_(1, top, True)
        out = torch.where(keep, p, torch.zeros_like(p))
        # a rounded top-1 probability of 0 would tie with the hidden classes: keep the arg-max above the floor
        out = torch.log(out.clamp_min(_FLOOR))
        first = top[:, :1]
        out.scatter_(1, first, out.gather(1, first).clamp_min(math.log(_FLOOR) + 1.0))
        return out.to(logits.dtype)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "k": self.k, "decimals": self.decimals}


def create_output(spec: str, **kwargs: Any) -> OutputHardening:
    """``"label-only"``, ``"rounded-probs:decimals=2"``, ``"top-k:k=3,decimals=4"`` -> module."""
    import json

    name, _, opts = spec.partition(":")
    for item in filter(None, (s.strip() for s in opts.split(","))):
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"output option {item!r} in {spec!r} must be key=value")
        try:
            kwargs[key.strip().replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            kwargs[key.strip().replace("-", "_")] = raw
    cls = OUTPUTS.get(name)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise TypeError(f"bad options for output hardening {name!r}: {e}") from e


def list_outputs() -> list[str]:
    return OUTPUTS.names()
