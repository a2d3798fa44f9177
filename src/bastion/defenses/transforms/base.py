"""The defense-component contract: what a transform declares about how it must be attacked.

Every input transformation is an `nn.Module` mapping images in [0, 1] to images in [0, 1] and
declaring:

* ``differentiable`` — autograd through `forward` gives meaningful gradients. JPEG, bit-depth
  reduction, median filters, quilting... do not (their gradient is zero or undefined), so a
  gradient attack straight through them fails for the wrong reason (Athalye et al. 2018).
* ``randomized`` — `forward` samples randomness (SHIELD, BaRT, noise, random resize): an attacker
  must average over it (EOT), and an evaluation must not trust a single draw.
* ``bpda(x)`` — a differentiable stand-in for `forward`, used on the backward pass of an
  adaptive attack (Backward Pass Differentiable Approximation). The default is the identity,
  right for transforms that keep the image close to its input.

`straight_through(t, x)` returns the real ``t(x)`` on the forward pass with the gradient of
``t.bpda(x)`` on the backward pass; `bastion.defenses.pipeline.Defended` uses it in its
adaptive view.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from ..._checks import check_images
from ..._registry import Registry

TRANSFORMS: Registry[type["Transform"]] = Registry("transform")


class Transform(nn.Module):
    """Base class of input transformations. Subclasses set the class flags and implement `transform`."""

    differentiable: ClassVar[bool] = True
    randomized: ClassVar[bool] = False
    name: ClassVar[str] = "transform"
    #: channels the transform accepts (None: any)
    channels: ClassVar[tuple[int, ...] | None] = None

    def forward(self, x: Tensor) -> Tensor:
        check_images(x, "x")
        if self.channels is not None and x.shape[1] not in self.channels:
            raise ValueError(f"`x` has {x.shape[1]} channel(s); transform {self.name!r} accepts "
                             f"{' or '.join(map(str, self.channels))}")
        return self.transform(x)

    def transform(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def bpda(self, x: Tensor) -> Tensor:
        """Differentiable stand-in for `forward` (identity by default)."""
        return x

    def config(self) -> dict[str, Any]:
        """JSON-ready description (name + options) for reports."""
        return {"name": self.name}

    def extra_repr(self) -> str:
        cfg = {k: v for k, v in self.config().items() if k != "name"}
        return ", ".join(f"{k}={v!r}" for k, v in cfg.items())


def straight_through(t: nn.Module, x: Tensor) -> Tensor:
    """Forward: the real component ``t(x)``. Backward: the gradient of ``t.bpda(x)``.

    For a differentiable component this is simply ``t(x)``.
    """
    if getattr(t, "differentiable", True):
        return t(x)
    approx = t.bpda(x)
    real = t(x.detach()).detach()
    return approx + (real - approx).detach()


def register_transform(name: str, summary: str | None = None):
    """Class decorator: register a `Transform` subclass under `name` and set its ``name``."""

    def deco(cls: type[Transform]) -> type[Transform]:
        cls.name = name
        TRANSFORMS.register(name, summary)(cls)
        return cls

    return deco


def create_transform(spec: str, **kwargs: Any) -> Transform:
    """Build a transform from ``"name"`` or ``"name:key=value,key=value"`` (values parsed as JSON)."""
    import json

    name, _, opts = spec.partition(":")
    for item in filter(None, (s.strip() for s in _split_options(opts))):
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"transform option {item!r} in {spec!r} must be key=value")
        try:
            kwargs[key.strip().replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            kwargs[key.strip().replace("-", "_")] = raw
    cls = TRANSFORMS.get(name)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise TypeError(f"bad options for transform {name!r}: {e}") from e


def _split_options(text: str) -> list[str]:
    """Split ``a=1,b=[2,3]`` on the commas outside brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def list_transforms() -> list[str]:
    return TRANSFORMS.names()
