"""Adaptive-attack building blocks: BPDA for non-differentiable steps, EOT for randomized ones.

Both are plain `nn.Module`s, so they compose with *every* gradient attack without any change
to the attack (Athalye, Carlini & Wagner 2018, "Obfuscated Gradients Give a False Sense of
Security", https://arxiv.org/abs/1802.00420):

    >>> masked = nn.Sequential(Quantize(), model)                 # round(): zero gradient
    >>> PGD()(masked, x, y, "linf:0.1")                           # fails: gradient masking
    >>> PGD()(nn.Sequential(BPDA(Quantize()), model), x, y, "linf:0.1")   # breaks it
    >>> PGD()(EOT(randomized_model, n=16), x, y, "linf:0.1")      # expectation over the noise

* `BPDA(component, backward)` runs the real component on the forward pass — its output is
  bit-for-bit the component's, so predictions, losses and the success the base class reports
  are those of the real defended model — and on the backward pass differentiates a stand-in
  g ≈ component at the same input (identity by default; a smooth approximation; or a network
  fitted with `learn_bpda`).
* `EOT(model, n)` returns the average of the logits (or probabilities) of n draws of a
  randomized model, so ∇ of any loss of its output is the gradient of the loss of the
  expected prediction — Expectation over Transformation (Athalye, Engstrom, Ilyas & Kwok
  2018, "Synthesizing Robust Adversarial Examples", https://arxiv.org/abs/1707.07397).
* They nest: ``EOT(nn.Sequential(BPDA(jpeg), random_resize, model), n=10)``.

The base class evaluates the attack on the module it is given, so attack the wrapped model and
report numbers on the real one (for BPDA they are identical by construction; for EOT evaluate
the randomized model with several draws — one draw is itself a random variable).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_positive
from .base import check_bool, check_int

__all__ = ["BPDA", "EOT", "identity", "learn_bpda", "with_bpda"]

Component = Callable[[Tensor], Tensor]


def identity(x: Tensor) -> Tensor:
    """The BPDA stand-in for a component with f(x) ≈ x (JPEG, bit-depth, median filter, ...)."""
    return x


class _BPDAFunction(torch.autograd.Function):
    """Forward: the real component (no graph). Backward: the vector-Jacobian product of the stand-in."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, component: Component,  # type: ignore[override]
                stand_in: Component | None) -> Tensor:
        out = component(x)
        if not isinstance(out, Tensor):
            raise TypeError(f"the BPDA component must return a tensor, got {type(out).__name__}")
        if stand_in is None and out.shape != x.shape:
            raise ValueError(f"BPDA with the identity stand-in needs a shape-preserving component; "
                             f"input {tuple(x.shape)}, output {tuple(out.shape)}")
        ctx.stand_in = stand_in
        ctx.save_for_backward(x)
        # a custom Function must return a new tensor, not its input or a view of it
        return out.clone() if out is x or out._is_view() else out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        if ctx.stand_in is None:  # identity: d(x)/dx = I
            return grad_out, None, None
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            approx = ctx.stand_in(xg)
            if approx.shape != grad_out.shape:
                raise ValueError(f"the BPDA stand-in returned shape {tuple(approx.shape)}, but the component "
                                 f"returned {tuple(grad_out.shape)}; they must match")
            # gradient w.r.t. the input only: a stand-in network's parameters get no .grad
            (g,) = torch.autograd.grad(approx, [xg], grad_out, allow_unused=True)
        return (torch.zeros_like(x) if g is None else g), None, None


class BPDA(nn.Module):
    r"""Backward Pass Differentiable Approximation of a (non-differentiable) component.

    Paper: Athalye, Carlini & Wagner, "Obfuscated Gradients Give a False Sense of Security:
    Circumventing Defenses to Adversarial Examples", ICML 2018 (https://arxiv.org/abs/1802.00420),
    §4.1.

    ``BPDA(f, g)(x)`` equals ``f(x)`` exactly (f runs without autograd), and its gradient is that
    of g at the same x: ∂L/∂x = J_g(x)ᵀ ∂L/∂f(x). With g = identity (the default) the
    gradient passes straight through — the "straight-through" estimator that breaks input
    quantization, JPEG compression, bit-depth reduction and similar preprocessing.

    Args:
        component: the real step f, a callable or `nn.Module` (registered as a submodule, so
            it follows ``.to(device)`` and `attack_mode` freezes it).
        backward: the stand-in g: `identity` / None (g(x) = x), a differentiable callable, or
            an `nn.Module` (e.g. from `learn_bpda`). g(x) must have f(x)'s shape.

    Attributes:
        differentiable: True (gradients through it are meaningful, by construction).

    Example:
        >>> quantize = lambda t: torch.round(t * 4) / 4       # zero gradient almost everywhere
        >>> model_q = nn.Sequential(BPDA(quantize), model)    # same outputs, usable gradients
        >>> result = PGD(steps=20)(model_q, x, y, "linf:0.1")
    """

    differentiable = True

    def __init__(self, component: Component | nn.Module, backward: Component | nn.Module | None = identity) -> None:
        super().__init__()
        if not callable(component):
            raise TypeError(f"`component` must be a callable or nn.Module, got {type(component).__name__}")
        if backward is not None and not callable(backward):
            raise TypeError(f"`backward` must be None, `identity`, a callable or an nn.Module, "
                            f"got {type(backward).__name__}")
        # modules are registered (device moves, eval mode, frozen parameters); plain callables are kept aside
        self.component = component
        self.stand_in = None if backward is identity else backward

    def forward(self, x: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return self.component(x)
        return _BPDAFunction.apply(x, self.component, self.stand_in)

    def extra_repr(self) -> str:
        name = lambda f: type(f).__name__ if isinstance(f, nn.Module) else getattr(f, "__name__", repr(f))  # noqa: E731
        return f"backward={'identity' if self.stand_in is None else name(self.stand_in)}" + \
            ("" if isinstance(self.component, nn.Module) else f", component={name(self.component)}")


def with_bpda(component: Component | nn.Module, model: nn.Module,
              backward: Component | nn.Module | None = identity) -> nn.Module:
    """``nn.Sequential(BPDA(component, backward), model)``: a preprocessing defense, attackable.

    Example:
        >>> defended_for_attack = with_bpda(jpeg, model)          # identity on the backward pass
        >>> PGD()(defended_for_attack, x, y, "linf:8/255")
    """
    return nn.Sequential(BPDA(component, backward), model)


class _ResidualStandIn(nn.Module):
    """x + net(x): a small conv net that starts as the identity (its last layer is zero)."""

    def __init__(self, channels: int, width: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = channels
        for _ in range(depth - 1):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU()]
            c = width
        last = nn.Conv2d(c, channels, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


def learn_bpda(component: Component | nn.Module, data: Tensor, *, epochs: int = 50, lr: float = 3e-3,
               batch_size: int = 128, width: int = 32, depth: int = 3, noise: float = 0.05,
               seed: int = 0) -> nn.Module:
    """Fit a small convolutional network to imitate `component` on `data` (MSE): a BPDA stand-in.

    Athalye et al. 2018 (§4.1) note that when the identity is a poor approximation, a
    differentiable network trained to mimic the component works as the backward pass; this is
    that network. It is residual, x + net(x), and starts as the identity, so it can only
    improve on the straight-through estimator it begins from. Each epoch sees the data plus
    uniform noise in [−noise, noise] (clipped to [0, 1]) with the component's outputs there as
    targets, so the fit also holds in the neighbourhood an attack explores.

    Args:
        component: the image → image step to imitate (same shape in and out).
        data: images (N, C, H, W) in [0, 1] (on the device to train on).
        epochs: passes over `data`. (Default: 50)
        lr: Adam learning rate. (Default: 3e-3)
        batch_size: mini-batch size. (Default: 128)
        width, depth: channels and number of 3×3 conv layers. (Default: 32, 3)
        noise: half-width of the uniform input noise; 0 fits the data only. (Default: 0.05)
        seed: weights, noise and order come from it; the global RNG is left as it was. (Default: 0)

    Returns:
        The stand-in `nn.Module`, in eval mode with frozen parameters; use it as
        ``BPDA(component, backward=stand_in)``.

    Example:
        >>> g = learn_bpda(quantize, x_train[:512])
        >>> model_q = nn.Sequential(BPDA(quantize, backward=g), model)
    """
    if not isinstance(data, Tensor) or data.dim() != 4 or not torch.is_floating_point(data) or data.shape[0] == 0:
        raise ValueError("`data` must be a non-empty floating tensor of images (N, C, H, W)")
    check_int(epochs, "epochs", 1)
    check_positive(lr, "lr")
    check_int(batch_size, "batch_size", 1)
    check_int(width, "width", 1)
    check_int(depth, "depth", 1)
    check_positive(noise, "noise", allow_zero=True)
    data = data.detach()
    devices = [data.device] if data.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        net = _ResidualStandIn(data.shape[1], width, depth).to(data.device)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        net.train()
        for _ in range(epochs):
            inputs = data
            if noise > 0:
                inputs = (data + (2 * torch.rand_like(data) - 1) * noise).clamp(0.0, 1.0)
            with torch.no_grad():
                target = component(inputs)
            if target.shape != inputs.shape:
                raise ValueError(f"learn_bpda needs a shape-preserving component; input {tuple(inputs.shape)}, "
                                 f"output {tuple(target.shape)}")
            perm = torch.randperm(inputs.shape[0], device=data.device)
            for i in range(0, inputs.shape[0], batch_size):
                b = perm[i:i + batch_size]
                loss = F.mse_loss(net(inputs[b]), target[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()  # the stand-in's own parameters
                opt.step()
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


class EOT(nn.Module):
    r"""Expectation over Transformation: the averaged prediction of n draws of a randomized model.

    Paper: Athalye, Engstrom, Ilyas & Kwok, "Synthesizing Robust Adversarial Examples",
    ICML 2018 (https://arxiv.org/abs/1707.07397); used against randomized defenses in
    Athalye, Carlini & Wagner 2018 (https://arxiv.org/abs/1802.00420), §4.3.

    ``EOT(model, n)(x)`` = (1/n) Σ_k model_k(x) over n independent draws of the model's
    randomness (``average="logits"``), or log((1/n) Σ_k softmax(model_k(x))) (``"probs"``: the
    expected probabilities, as logits). Any gradient attack run on it follows the gradient of
    its loss at the expected output, which averages the per-draw gradients instead of chasing
    one random draw: ``PGD()(EOT(randomized_model, n=10), x, y, threat)`` is EOT-PGD.

    Vectorized: with ``batched=True`` the batch is repeated n times and sent as one forward of
    n·N rows (at most `max_batch_size` rows per forward; more draws go in several chunks). That
    gives independent draws only if the model samples its randomness *per example* (noise of
    ``x``'s shape, per-example dropout masks, ...). A model that draws *one* random
    transformation per call (e.g. one resize size for the whole batch) needs
    ``batched=False``: n separate forwards of N rows.

    Args:
        model: the randomized model (logits out); it samples from torch's global generator,
            so ``torch.manual_seed`` fixes a run.
        n: number of draws. (Default: 10)
        average: "logits" or "probs". (Default: "logits")
        batched: repeat the batch within one forward (see above). (Default: True)
        max_batch_size: most rows per forward when batched; None = all n·N at once. (Default: None)

    Attributes:
        randomized: True; differentiable: True (as differentiable as the wrapped model).

    Example:
        >>> noisy = nn.Sequential(GaussianNoise(0.3), model)
        >>> result = PGD(steps=40)(EOT(noisy, n=16), x, y, "linf:0.1")
    """

    randomized = True
    differentiable = True

    def __init__(self, model: nn.Module, n: int = 10, average: str = "logits", batched: bool = True,
                 max_batch_size: int | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module returning logits, got {type(model).__name__}")
        check_int(n, "n", 1)
        check_choice(average, "average", ("logits", "probs"))
        check_bool(batched, "batched")
        if max_batch_size is not None:
            check_int(max_batch_size, "max_batch_size", 1)
        self.model, self.n, self.average = model, n, average
        self.batched, self.max_batch_size = batched, max_batch_size

    def _draws(self, x: Tensor) -> list[Tensor]:
        """Outputs of the n draws, as a list of (k, N, K) blocks."""
        n_rows = x.shape[0]
        if not self.batched:
            return [self.model(x).unsqueeze(0) for _ in range(self.n)]
        per_call = self.n if self.max_batch_size is None else max(1, self.max_batch_size // max(n_rows, 1))
        out = []
        for start in range(0, self.n, per_call):
            k = min(per_call, self.n - start)
            z = self.model(x.repeat(k, *([1] * (x.dim() - 1))))  # [x; x; ...]: draw-major rows
            out.append(z.reshape(k, n_rows, *z.shape[1:]))
        return out

    def forward(self, x: Tensor) -> Tensor:
        blocks = self._draws(x)
        if self.average == "logits":
            return torch.cat(blocks).mean(dim=0)
        logp = torch.cat([F.log_softmax(b, dim=-1) for b in blocks])
        return torch.logsumexp(logp, dim=0) - math.log(self.n)

    def extra_repr(self) -> str:
        return f"n={self.n}, average={self.average!r}, batched={self.batched}, max_batch_size={self.max_batch_size}"
