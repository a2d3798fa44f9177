"""Adapters to third-party model zoos: ``torchvision:NAME``, ``timm:NAME``, ``pytorchcv:NAME``.

Each adapter fills `ADAPTERS[prefix]` with ``fn(name, num_classes, in_shape, **kwargs) -> nn.Module``
and is reached through `create_model`, which puts Bastion's `Normalize` layer in front:

    >>> create_model("timm:resnet18", 10, (3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD)

The packages are optional and imported only when an adapter is used. The networks are built
with random weights unless the caller asks for pretrained ones (``pretrained=True``, which
needs network access); the classifier is sized to `num_classes`, and a 1-channel (or any
non-RGB) `in_shape` gets its first convolution adapted (see `adapt_first_conv`).

Installing: these packages declare a dependency on torch (and torchvision), so a plain
``pip install timm`` may download a second, multi-gigabyte torch build. With torch already
installed, use ``pip install --no-deps ...`` and a torchvision release matching your torch.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable, Sequence
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .base import ADAPTERS

# What to install for each adapter. timm and pytorchcv import torchvision themselves.
_INSTALL = {
    "torchvision": "pip install --no-deps torchvision  # pick the release that matches your torch",
    "timm": "pip install --no-deps timm huggingface_hub pyyaml  # timm also imports torchvision",
    "pytorchcv": "pip install --no-deps pytorchcv requests  # pytorchcv also imports torchvision",
}


def _require(module: str, adapter: str) -> ModuleType:
    """Import `module` for the `adapter:` prefix, or say exactly what to install and how."""
    package = module.partition(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = e.name or package
        if missing != package and not missing.startswith(package + "."):
            # The package is there but one of *its* dependencies is not (timm -> torchvision).
            package = missing.partition(".")[0]
        raise ModuleNotFoundError(
            f"the '{adapter}:' model adapter needs the `{package}` package, which is not installed "
            f"({e}). Install it with:\n    {_INSTALL.get(package, f'pip install --no-deps {package}')}\n"
            f"Warning: without --no-deps pip may pull its own torch build (gigabytes of CUDA "
            f"libraries); install with --no-deps when torch is already installed.",
            name=package) from e
    except ImportError as e:  # installed but broken, typically a torch/torchvision version mismatch
        raise ImportError(f"the '{adapter}:' model adapter could not import `{module}`: {e}. Is the "
                          f"installed `{package}` built for torch {torch.__version__}?", name=package) from e


def _unknown(adapter: str, name: str, valid: Iterable[str], how: str) -> ValueError:
    names = list(valid)
    near = difflib.get_close_matches(name, names, n=3)
    hint = f" Did you mean {', '.join(map(repr, near))}?" if near else ""
    return ValueError(f"unknown model {name!r} for the '{adapter}:' adapter.{hint} "
                      f"See the valid names with {how}")


def _channels(in_shape: Sequence[int]) -> int:
    if len(in_shape) != 3 or min(int(s) for s in in_shape) < 1:
        raise ValueError(f"`in_shape` must be (C, H, W) with positive sizes, got {tuple(in_shape)}")
    return int(in_shape[0])


def _set_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def adapt_first_conv(net: nn.Module, in_channels: int, label: str) -> nn.Module:
    """Make the network's first 3-channel `nn.Conv2d` take `in_channels` inputs, in place.

    The new kernel is derived from the old one: summed over RGB for one channel (so a grey
    image gives the response the RGB net gives to that image repeated on three channels, which
    keeps pretrained weights meaningful), otherwise the RGB mean repeated and scaled by 3/C.

    Raises:
        ValueError: no such convolution exists (the `in_shape` channels cannot be adapted).
    """
    if in_channels == 3:
        return net
    for path, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.in_channels == in_channels:  # already built for these inputs (e.g. in_channels=1)
                return net
            if m.in_channels != 3 or m.groups != 1:
                break
            new = nn.Conv2d(in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                            bias=m.bias is not None, padding_mode=m.padding_mode,
                            device=m.weight.device, dtype=m.weight.dtype)
            with torch.no_grad():
                w = m.weight
                if in_channels == 1:
                    new.weight.copy_(w.sum(dim=1, keepdim=True))
                else:
                    new.weight.copy_(w.mean(dim=1, keepdim=True).repeat(1, in_channels, 1, 1) * (3.0 / in_channels))
                if m.bias is not None:
                    new.bias.copy_(m.bias)
            _set_module(net, path, new)
            return net
    raise ValueError(f"cannot adapt {label} to `in_shape` with {in_channels} channel(s): its first "
                     f"convolution is not a plain 3-channel nn.Conv2d. Use a 3-channel `in_shape` "
                     f"(repeat grey images over 3 channels) or a model that takes `in_channels`.")


def replace_classifier(net: nn.Module, num_classes: int, label: str) -> nn.Module:
    """Resize the last `nn.Linear` (the classifier of torchvision/pytorchcv nets) to `num_classes`.

    Used when pretrained weights fix the number of classes; the new layer is randomly initialised.
    """
    last: tuple[str, nn.Linear] | None = None
    for path, m in net.named_modules():
        if isinstance(m, nn.Linear):
            last = (path, m)
    if last is None:
        raise ValueError(f"cannot resize the classifier of {label} to `num_classes`={num_classes}: it has "
                         f"no nn.Linear layer. Build it with random weights (pretrained=False) instead.")
    path, lin = last
    if lin.out_features != num_classes:
        _set_module(net, path, nn.Linear(lin.in_features, num_classes, bias=lin.bias is not None,
                                         device=lin.weight.device, dtype=lin.weight.dtype))
    return net


def torchvision_model(name: str, num_classes: int, in_shape: Sequence[int], *, pretrained: bool = False,
                      weights: Any = None, **kwargs: Any) -> nn.Module:
    """A torchvision classification model, e.g. ``torchvision:resnet18``.

    Args:
        name: a name from ``torchvision.models.list_models(module=torchvision.models)``.
        num_classes: size of the classifier.
        in_shape: C×H×W; C != 3 adapts the first convolution.
        pretrained: load the default ImageNet weights (``weights="DEFAULT"``; needs network).
        weights: a torchvision weights name or enum, passed through; the classifier is then
            replaced by a new one with `num_classes` outputs when the sizes differ.
        **kwargs: passed to ``torchvision.models.get_model``.
    """
    c = _channels(in_shape)
    tvm = _require("torchvision.models", "torchvision")
    valid = tvm.list_models(module=tvm)
    if name not in valid:
        raise _unknown("torchvision", name, valid, "`torchvision.models.list_models(module=torchvision.models)`")
    label = f"'torchvision:{name}'"
    if pretrained and weights is None:
        weights = "DEFAULT"
    if weights is not None:  # pretrained weights come with their own classifier size
        net = replace_classifier(tvm.get_model(name, weights=weights, **kwargs), num_classes, label)
    else:
        net = tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    return adapt_first_conv(net, c, label)


def timm_model(name: str, num_classes: int, in_shape: Sequence[int], *, pretrained: bool = False,
               **kwargs: Any) -> nn.Module:
    """A timm model, e.g. ``timm:resnet18`` or ``timm:vit_tiny_patch16_224``.

    timm sizes the classifier (`num_classes`) and the stem (`in_chans`, adapting pretrained
    kernels itself), so both are passed straight to ``timm.create_model``.

    Args:
        name: a name from ``timm.list_models()`` (a pretrained tag such as ``.a1_in1k`` is allowed).
        num_classes: size of the classifier.
        in_shape: C×H×W; C is passed as ``in_chans``.
        pretrained: load pretrained weights (needs network).
        **kwargs: passed to ``timm.create_model`` (e.g. ``drop_rate``, ``img_size``).
    """
    c = _channels(in_shape)
    timm = _require("timm", "timm")
    if not timm.is_model(name):
        raise _unknown("timm", name, timm.list_models(), "`timm.list_models()` (or `timm.list_models('*resnet*')`)")
    kwargs.setdefault("in_chans", c)
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)


def pytorchcv_model(name: str, num_classes: int, in_shape: Sequence[int], *, pretrained: bool = False,
                    **kwargs: Any) -> nn.Module:
    """A pytorchcv model, e.g. ``pytorchcv:resnet20_cifar10`` or ``pytorchcv:resnet18``.

    Args:
        name: a name known to ``pytorchcv.model_provider.get_model``.
        num_classes: size of the classifier; with ``pretrained=True`` the model is built with
            its own class count and its last linear layer is replaced when they differ.
        in_shape: C×H×W; C != 3 adapts the first convolution.
        pretrained: load pretrained weights (needs network).
        **kwargs: passed to ``get_model``.
    """
    c = _channels(in_shape)
    provider = _require("pytorchcv.model_provider", "pytorchcv")
    how = "`sorted(pytorchcv.model_provider._models)` (or the pytorchcv README)"
    known = getattr(provider, "_models", None)
    if isinstance(known, dict) and name.lower() not in known:
        raise _unknown("pytorchcv", name, sorted(known), how)
    label = f"'pytorchcv:{name}'"
    try:
        if pretrained:
            net = replace_classifier(provider.get_model(name, pretrained=True, **kwargs), num_classes, label)
        else:
            net = provider.get_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except ValueError as e:
        if "Unsupported model" in str(e):
            raise _unknown("pytorchcv", name, (), how) from e
        raise
    return adapt_first_conv(net, c, label)


ADAPTERS.update({"torchvision": torchvision_model, "timm": timm_model, "pytorchcv": pytorchcv_model})

__all__ = ["adapt_first_conv", "pytorchcv_model", "replace_classifier", "timm_model", "torchvision_model"]
