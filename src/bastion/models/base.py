"""Model registry, the `Normalize` layer and the spec that lets a checkpoint rebuild its model."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .._registry import Registry

# A builder: (num_classes, in_shape, **kwargs) -> nn.Module taking *normalized* inputs.
Builder = Callable[..., nn.Module]
MODELS: Registry[Builder] = Registry("model")


class Normalize(nn.Module):
    """(x - mean) / std per channel, inside the model, so that eps is always in pixel units."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.as_tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
        if (std_t <= 0).any():
            raise ValueError(f"`std` must be positive per channel, got {list(std)}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model before loading its weights (saved as JSON)."""

    name: str
    num_classes: int
    in_shape: tuple[int, int, int]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    # model-side defenses applied after the architecture is built, in order, each
    # {"name": ..., "kwargs": {...}} (`bastion.defenses.layers.apply_layers`, e.g. bounded ReLU, SAP)
    layers: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["in_shape"] = list(self.in_shape)
        d["mean"] = None if self.mean is None else list(self.mean)
        d["std"] = None if self.std is None else list(self.std)
        if not self.layers:  # files of models without layers stay as they were
            del d["layers"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        return cls(name=d["name"], num_classes=int(d["num_classes"]), in_shape=tuple(d["in_shape"]),
                   mean=None if d.get("mean") is None else tuple(d["mean"]),
                   std=None if d.get("std") is None else tuple(d["std"]),
                   kwargs=dict(d.get("kwargs") or {}),
                   layers=[{"name": str(x["name"]), "kwargs": dict(x.get("kwargs") or {})}
                           for x in d.get("layers") or []])


class Classifier(nn.Module):
    """`Normalize` followed by a network: takes images in [0, 1], returns logits."""

    def __init__(self, net: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None,
                 spec: ModelSpec | None = None) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std) if mean is not None and std is not None else nn.Identity()
        self.net = net
        self.spec = spec

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.normalize(x))


def _resolve_factory(path: str) -> Callable[..., nn.Module]:
    """`package.module:factory` -> the callable, with errors that say what failed."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"a user model must be given as 'module.path:factory', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {module_name!r} for model {path!r}: {e}") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} (model {path!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{path!r} is not callable")
    return obj  # type: ignore[return-value]


def create_model(name: str, num_classes: int, in_shape: Sequence[int],
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 **kwargs: Any) -> Classifier:
    """Build a model by name; it takes images in [0, 1] (normalization is its first layer).

    Args:
        name: a registered name (`list_models()`), an adapter (``"torchvision:resnet18"``,
            ``"timm:NAME"``, ``"pytorchcv:NAME"``) or a user factory ``"module.path:factory"``
            called as ``factory(num_classes=..., in_shape=..., **kwargs)``.
        num_classes: number of output logits.
        in_shape: C×H×W of one input image.
        mean, std: per-channel statistics for the `Normalize` layer (omit for none).
        **kwargs: architecture options (e.g. ``depth=16, widen=4`` for ``wide-resnet``).

    Example:
        >>> m = create_model("cnn-small", 10, (1, 28, 28), mean=(0.13,), std=(0.31,))
        >>> m(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"`num_classes` must be an integer >= 2, got {num_classes!r}")
    shape = tuple(int(s) for s in in_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"`in_shape` must be (C, H, W) with positive sizes, got {tuple(in_shape)}")
    spec = ModelSpec(name, num_classes, shape,  # type: ignore[arg-type]
                     None if mean is None else tuple(float(m) for m in mean),
                     None if std is None else tuple(float(s) for s in std), dict(kwargs))
    prefix, sep, rest = name.partition(":")
    if sep and prefix in ADAPTERS:
        try:
            net = ADAPTERS[prefix](rest, num_classes, shape, **kwargs)
        except TypeError as e:
            raise TypeError(f"bad options for model {name!r}: {e}") from e
    elif sep:
        factory = _resolve_factory(name)
        try:
            net = factory(num_classes=num_classes, in_shape=shape, **kwargs)
        except TypeError as e:
            raise TypeError(f"bad options for model {name!r}: {e}") from e
        if not isinstance(net, nn.Module):
            raise TypeError(f"factory {name!r} must return a torch.nn.Module, got {type(net).__name__}")
    else:
        builder = MODELS.get(name)
        try:
            net = builder(num_classes, shape, **kwargs)
        except TypeError as e:
            raise TypeError(f"bad options for model {name!r}: {e}") from e
    return Classifier(net, spec.mean, spec.std, spec)


def model_from_spec(spec: ModelSpec | dict[str, Any]) -> Classifier:
    """Rebuild the model `spec` describes (untrained), its model-side defense layers included."""
    if isinstance(spec, dict):
        spec = ModelSpec.from_dict(spec)
    model = create_model(spec.name, spec.num_classes, spec.in_shape, spec.mean, spec.std, **spec.kwargs)
    if spec.layers:
        from ..defenses.layers import apply_layers  # defenses import models, not the other way round

        model = apply_layers(model, [(x["name"], x["kwargs"]) for x in spec.layers])
    return model


def list_models() -> list[str]:
    return MODELS.names()


# Adapters to third-party zoos: prefix -> (name, num_classes, in_shape, **kwargs) -> nn.Module.
# Filled by `bastion.models.adapters` (imported lazily: the packages are optional).
ADAPTERS: dict[str, Callable[..., nn.Module]] = {}
