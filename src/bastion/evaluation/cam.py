"""Class-activation maps: where in the image a model finds the evidence for a class.

`grad_cam` is Grad-CAM (Selvaraju, Cogswell, Das, Vedantam, Parikh & Batra 2017, "Grad-CAM:
Visual Explanations from Deep Networks via Gradient-based Localization", ICCV,
https://arxiv.org/abs/1610.02391). With ``A`` the K feature maps (h × w) of a convolutional
layer and ``s_c`` the logit of class c::

    α_k = mean over (i, j) of ∂s_c / ∂A_k[i, j]        (the channel's importance for c)
    L_c = ReLU(Σ_k α_k · A_k)                           (h × w, upsampled to the input size)

The map is scaled to [0, 1] per image (divided by its maximum; an all-zero map stays zero).
The report's example grid shows it for the clean input (at the clean prediction) and for the
adversarial input (at the adversarial prediction), so a reader sees where the attention moved.

A model without a Conv2d (an MLP) has no spatial feature maps: for it ``layer=None`` falls
back to a gradient × input saliency map, ``|Σ_channels x · ∂s_c/∂x|`` (Shrikumar et al. 2016,
https://arxiv.org/abs/1605.01713; Simonyan et al. 2014 for plain gradients), scaled the same
way. `cam_method` says which of the two a model gets.

Gradients are taken with `torch.autograd.grad` with respect to the feature maps (or the input)
only: parameter ``.grad`` is never written. The feature maps are captured by a forward hook
that is removed afterwards (also when the forward raises), and every module's train/eval mode
and ``requires_grad`` flag are restored (`attack_mode`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks.base import attack_mode

log = logging.getLogger("bastion.cam")

__all__ = ["cam_method", "default_layer", "grad_cam", "grid_cams"]


def default_layer(model: nn.Module) -> nn.Module | None:
    """The last `nn.Conv2d` among ``model.modules()`` (registration order), or None if it has none."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            last = m
    return last


def _resolve_layer(model: nn.Module, layer: nn.Module | str | None) -> nn.Module | None:
    if layer is None:
        return default_layer(model)
    if isinstance(layer, str):
        named = dict(model.named_modules())
        if layer not in named:
            convs = [k for k, m in named.items() if isinstance(m, nn.Conv2d)]
            raise ValueError(f"`layer` {layer!r} is not a submodule of the model (its Conv2d layers: "
                             f"{', '.join(convs) if convs else 'none'})")
        return named[layer]
    if isinstance(layer, nn.Module):
        if not any(m is layer for m in model.modules()):
            raise ValueError(f"`layer` ({type(layer).__name__}) is not a submodule of the model")
        return layer
    raise TypeError(f"`layer` must be None, a submodule or its name in model.named_modules(), "
                    f"got {type(layer).__name__}")


def cam_method(model: nn.Module, layer: nn.Module | str | None = None) -> str:
    """``"grad-cam"`` when `grad_cam` finds a layer to hook, ``"gradient-x-input"`` otherwise."""
    return "grad-cam" if _resolve_layer(model, layer) is not None else "gradient-x-input"


def _scale(maps: Tensor) -> Tensor:
    """Each (H, W) map divided by its maximum: [0, 1], all-zero maps stay zero."""
    top = maps.flatten(1).amax(1).clamp_min(torch.finfo(maps.dtype).tiny)
    return (maps / top[:, None, None]).clamp(0, 1)


def _score(logits: Tensor, c: Tensor) -> Tensor:
    """Σ_n logits[n, c_n], after checking that every class is one of the logits."""
    k = logits.shape[1]
    if int(c.min()) < 0 or int(c.max()) >= k:
        raise ValueError(f"`classes` must lie in [0, {k}) (the model has {k} logits), got values in "
                         f"[{int(c.min())}, {int(c.max())}]")
    return logits.gather(1, c[:, None]).sum()


def _one_batch(model: nn.Module, x: Tensor, c: Tensor, layer: nn.Module | None) -> Tensor:
    h, w = x.shape[-2:]
    if layer is None:  # gradient × input saliency
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            score = _score(model(xg), c)
            (g,) = torch.autograd.grad(score, [xg], allow_unused=True)
        if g is None:  # the output does not depend on x (or not differentiably): no evidence to show
            return torch.zeros(x.shape[0], h, w, device=x.device)
        return _scale((g * xg.detach()).sum(1).abs().float())

    captured: list[Tensor] = []

    def hook(module: nn.Module, args: Any, output: Any) -> Tensor:
        if not isinstance(output, Tensor) or output.dim() != 4:
            raise ValueError(f"`layer` ({type(module).__name__}) must output N×K×h×w feature maps, got "
                             f"{type(output).__name__ if not isinstance(output, Tensor) else tuple(output.shape)}")
        # A fresh leaf: the gradient is taken w.r.t. these maps, nothing upstream is differentiated
        # (so non-differentiable transforms in front of the model do no harm). The clone keeps an
        # in-place activation after the layer from writing into the leaf.
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf.clone()

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = model(x.detach())
            if not captured:
                raise RuntimeError(f"`layer` ({type(layer).__name__}) was not called by the model's forward")
            a = captured[-1]  # a layer called several times: its last call, the one nearest the logits
            if a.shape[0] != x.shape[0]:
                raise ValueError(f"`layer` ({type(layer).__name__}) saw {a.shape[0]} rows for {x.shape[0]} inputs "
                                 "(a model that stacks several draws per input, like EOT?): explain the model "
                                 "itself, one row per input")
            score = _score(logits, c)
            (g,) = torch.autograd.grad(score, [a], allow_unused=True)
    finally:
        handle.remove()
    if g is None:
        return torch.zeros(x.shape[0], h, w, device=x.device)
    alpha = g.mean(dim=(2, 3), keepdim=True)  # (N, K, 1, 1)
    cam = F.relu((alpha * a.detach()).sum(1, keepdim=True)).float()  # (N, 1, h, w)
    if cam.shape[-2:] != (h, w):
        cam = F.interpolate(cam, size=(h, w), mode="bilinear", align_corners=False)
    return _scale(cam[:, 0].clamp_min(0))


def grad_cam(model: nn.Module, x: Tensor, classes: Tensor | int, layer: nn.Module | str | None = None,
             batch_size: int = 256) -> Tensor:
    """Grad-CAM maps of `classes` for the images `x`, upsampled to the input size, in [0, 1].

    Args:
        model: any module returning logits (a `Defended` pipeline too: its transforms run
            forward only, the maps are those of the classifier's layer on what it sees).
        x: images (N, C, H, W).
        classes: the class of each map, (N,) integers or one int for all.
        layer: the layer whose output feature maps (N, K, h, w) are weighted: a submodule or
            its name in ``model.named_modules()``; None picks the last `nn.Conv2d` of the
            model (its output before any activation that follows it; pass the activation
            module to weigh the rectified maps, as in the paper's VGG), and a model without
            one gets a gradient × input saliency map instead (see the module docstring and
            `cam_method`). (Default: None)
        batch_size: images per forward/backward pass. (Default: 256)

    Returns:
        (N, H, W) float maps on ``x.device``, each scaled to a maximum of 1 (0 where the
        class has no positive evidence).

    Example:
        >>> cams = grad_cam(model, x, model(x).argmax(1))
        >>> cams.shape == (x.shape[0], *x.shape[-2:])
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module returning logits, got {type(model).__name__}")
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"`x` must be an N×C×H×W tensor, got {getattr(x, 'shape', type(x).__name__)}")
    n = x.shape[0]
    if isinstance(classes, bool):
        raise TypeError("`classes` must be an int or a tensor of class indices, got a bool")
    if isinstance(classes, int):
        c = torch.full((n,), classes, dtype=torch.long, device=x.device)
    elif isinstance(classes, Tensor) and classes.dim() == 1 and classes.shape[0] == n \
            and not classes.is_floating_point():
        c = classes.to(x.device, torch.long)
    else:
        raise ValueError(f"`classes` must be an int or an integer tensor of shape ({n},), got "
                         f"{tuple(classes.shape) if isinstance(classes, Tensor) else type(classes).__name__}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
    target = _resolve_layer(model, layer)
    if n == 0:
        return torch.zeros(0, *x.shape[-2:], device=x.device)
    parts = []
    with attack_mode(model):
        for i in range(0, n, batch_size):
            xb, cb = x[i:i + batch_size], c[i:i + batch_size]
            parts.append(_one_batch(model, xb, cb, target))
    return torch.cat(parts)


def grid_cams(model: nn.Module, x: Tensor, x_adv: Tensor, pred_clean: Tensor,
              pred_adv: Tensor) -> tuple[tuple[Tensor, Tensor] | None, str]:
    """The two CAM rows of an example grid: ``((clean maps, adversarial maps), method)``.

    The clean input's map is for its clean prediction, the adversarial input's map for its
    adversarial prediction (both on CPU). A picture must not end a long run: where the model
    cannot be explained this way (a forward hook that cannot be placed, an output that is not
    logits) the maps are None and the string says why (also logged as a warning).
    """
    try:
        p = next(model.parameters(), None)
        dev = p.device if p is not None else x.device
        method = cam_method(model)
        clean = grad_cam(model, x.to(dev), pred_clean.to(dev))
        adv = grad_cam(model, x_adv.to(dev), pred_adv.to(dev))
    except (RuntimeError, ValueError, TypeError) as err:
        log.warning("no class-activation maps in the example grid: %s", err)
        return None, f"no class-activation maps: {err}"
    return (clean.cpu(), adv.cpu()), method
