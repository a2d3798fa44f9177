"""The defense-component contract: what a transform declares about how it must be attacked.

Every input transformation is an `nn.Module` mapping images in [0, 1] to images in [0, 1] and
declaring:

* ``differentiable`` — autograd through `forward` gives meaningful gradients. JPEG, bit-depth
  reduction, median filters, quilting... do not (their gradient is zero or undefined), so a
  gradient attack straight through them fails for the wrong reason (Athalye et al. 2018).
* ``randomized`` — `forward` samples randomness (SHIELD, BaRT, noise, random resize): an attacker
  must average over it (EOT), and an evaluation must not trust a single draw. The class
  attribute is the default; a transform whose randomness an option switches off (quilting with
  ``k=1``, TVM keeping every pixel, SHIELD with one quality, ...) sets ``randomized = False``
  on that instance, so the evaluator does not pay for EOT draws that are all the same.
* ``bpda(x)`` — a differentiable stand-in for `forward`, used on the backward pass of an
  adaptive attack (Backward Pass Differentiable Approximation). The default is the identity,
  right for transforms that keep the image close to its input.

`straight_through(t, x)` returns the real ``t(x)`` on the forward pass with the gradient of
``t.bpda(x)`` on the backward pass; `bastion.defenses.pipeline.Defended` uses it in its
adaptive view.

Helpers the transform modules share:

* `zero_grad_output(out, x)` — the real output of a non-differentiable component, attached to
  the graph with a zero derivative: autograd through it yields zeros (what a naive attack sees
  and the obfuscated-gradient checks flag) instead of an error.
* `RandomizedTransform` — a `Transform` with an optional ``seed`` / ``generator``: with neither,
  draws come from torch's global RNG (so ``torch.manual_seed`` fixes them); with a seed, the
  transform owns a `torch.Generator` seeded once, so two calls differ and a fresh transform
  with the same seed replays the same sequence of calls.
* `check_int_range`, `check_odd_size` — argument checks whose errors name the argument.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..._checks import check_images
from ..._registry import Registry

TRANSFORMS: Registry[type["Transform"]] = Registry("transform")


class Transform(nn.Module):
    """Base class of input transformations. Subclasses set the class flags and implement `transform`."""

    differentiable: ClassVar[bool] = True
    #: the class default; an instance whose options switch its randomness off sets its own False
    randomized: bool = False
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


# ------------------------------------------------------------------------------ validation
def check_int_range(value: Any, name: str, lo: int, hi: int | None = None) -> int:
    """An int (not a bool) in [lo, hi] (hi None: unbounded); errors name the argument."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"`{name}` must be an integer {rng}, got {value!r}")
    return value


def check_odd_size(value: Any, name: str = "size") -> int:
    """A positive odd window size (the window must have a centre pixel)."""
    check_int_range(value, name, 1)
    if value % 2 == 0:
        raise ValueError(f"`{name}` must be odd (the window needs a centre pixel), got {value!r}")
    return value


# ------------------------------------------------------------------------------ gradients
def zero_grad_output(out: Tensor, x: Tensor) -> Tensor:
    """`out` (computed without autograd) connected to `x` with a zero derivative.

    A non-differentiable component (a codec, a solver, a table look-up, a purifier's inner
    optimization) gives an attacker who differentiates through it exactly zero gradient;
    returning a detached tensor would make `torch.autograd.grad` raise instead, which hides
    the masking rather than showing it.
    """
    out = out.detach()
    if x.requires_grad:
        out = out + 0.0 * x.sum()
    return out


# ------------------------------------------------------------------------------ randomness
class RandomizedTransform(Transform):
    """A transform that samples randomness; reproducible under ``seed`` or an explicit generator.

    Args:
        seed: seed of a generator owned by the transform (None: no own generator).
        generator: a `torch.Generator` to draw from (exclusive with `seed`). Draws happen on the
            generator's device and are moved to the input's device.

    With neither, draws use torch's global RNG. ``randomized`` is True by default; a subclass
    whose options make a draw constant sets ``self.randomized = False`` on the instance.
    """

    randomized = True

    def __init__(self, seed: int | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if seed is not None and generator is not None:
            raise ValueError("give either `seed` or `generator`, not both")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"`seed` must be an int or None, got {seed!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be a torch.Generator or None, got {type(generator).__name__}")
        self.seed = seed
        self.generator = generator
        if seed is not None:
            self.generator = torch.Generator().manual_seed(seed)

    def manual_seed(self, seed: int) -> "RandomizedTransform":
        """Restart the transform's own random sequence from `seed` (returns self)."""
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"`seed` must be an int, got {seed!r}")
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        return self

    # draws on the generator's device (CPU for an own generator), then moved to `device`
    def _device(self, device: torch.device) -> torch.device:
        return self.generator.device if self.generator is not None else device

    def rand(self, *shape: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
        d = torch.device(device)
        return torch.rand(shape, generator=self.generator, device=self._device(d), dtype=dtype).to(d)

    def randn(self, *shape: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
        d = torch.device(device)
        return torch.randn(shape, generator=self.generator, device=self._device(d), dtype=dtype).to(d)

    def randint(self, low: int, high: int, *shape: int, device: torch.device | str = "cpu") -> Tensor:
        d = torch.device(device)
        return torch.randint(low, high, shape, generator=self.generator, device=self._device(d)).to(d)

    def uniform(self, lo: float, hi: float, *shape: int, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> Tensor:
        return lo + (hi - lo) * self.rand(*shape, device=device, dtype=dtype)

    def perm(self, n: int) -> list[int]:
        """A random permutation of range(n), as a Python list."""
        return torch.randperm(n, generator=self.generator, device=self._device(torch.device("cpu"))).tolist()

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed}


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


def parse_spec(spec: str, what: str = "transform") -> tuple[str, dict[str, Any]]:
    """``"name"`` or ``"name:key=value,key=value"`` -> (name, options); values parsed as JSON
    (else kept as strings), dashes in keys become underscores; `what` names the kind in errors."""
    import json

    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a {what} is given as NAME or NAME:KEY=VALUE,..., got {spec!r}")
    name, _, opts = spec.strip().partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in _split_options(opts))):
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"{what} option {item!r} in {spec!r} must be key=value")
        try:
            kwargs[key.strip().replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            kwargs[key.strip().replace("-", "_")] = raw
    return name, kwargs


def create_transform(spec: str, **kwargs: Any) -> Transform:
    """Build a transform from ``"name"`` or ``"name:key=value,key=value"`` (values parsed as JSON)."""
    name, opts = parse_spec(spec, "transform")
    kwargs.update(opts)
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
