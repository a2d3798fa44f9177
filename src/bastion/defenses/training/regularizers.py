"""Non-adversarial training defenses: noise augmentation, smoothed labels, gradient penalties.

Four objectives, each a dataclass whose fields are the paper's hyper-parameters:

* ``gaussian-augmentation`` — Zantedeschi, Nicolae & Rawat 2017 (arXiv:1707.06728);
* ``label-smoothing`` — Szegedy et al. 2016 (arXiv:1512.00567), as a defense in
  Warde-Farley & Goodfellow 2016 ("Adversarial perturbations of deep neural networks");
* ``contractive`` — Gu & Rigazio 2015, deep contractive networks (arXiv:1412.5068);
* ``gradient-regularization`` — Ross & Doshi-Velez 2018 (arXiv:1711.09404), the double
  backpropagation of Drucker & LeCun 1992.

None of them makes a model robust to a strong adaptive attacker by itself; the last two mostly
flatten the gradients an attacker sees (the survey in the design documents files them under
gradient masking), which is exactly why Bastion evaluates them with the adaptive suite.

All randomness (noise, projection vectors) comes from the global torch RNG, whose state the
Trainer saves in every checkpoint, so resumed runs are bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..._checks import check_in_range, check_positive
from .objectives import OBJECTIVES, Objective

__all__ = ["Contractive", "GaussianAugmentation", "GradientRegularization", "LabelSmoothing",
           "contractive_penalty", "hooked_layers", "input_gradient_penalty", "smoothed_targets"]


def _soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over the batch of -Σ_k target_k · log softmax(logits)_k (target rows sum to 1)."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


# ============================================================================================
# Gaussian data augmentation
# ============================================================================================

@OBJECTIVES.register("gaussian-augmentation",
                     "Cross-entropy on clean + Gaussian-noised copies (Zantedeschi et al. 2017).")
@dataclass
class GaussianAugmentation(Objective):
    """Gaussian data augmentation (GDA): train on inputs with isotropic Gaussian noise.

    Zantedeschi, Nicolae & Rawat, "Efficient Defenses Against Adversarial Attacks", 2017,
    arXiv:1707.06728 (the method behind ART's ``GaussianAugmentation``).

    For a batch ``(x, y)`` of size N, with ``M = round(ratio · N)`` noisy copies::

        x̃_j = clip(x_{i_j} + σ·ε_j, 0, 1),   ε_j ~ N(0, I)
        augmentation=True:  loss = 1/(N+M) · [ Σ_i CE(f(x_i), y_i) + Σ_j CE(f(x̃_j), y_{i_j}) ]
        augmentation=False: loss = 1/N · Σ_i CE(f(x̃_i), y_i)          (noise replaces the input)

    With ``augmentation=True`` the noisy copies are *appended* to the batch, as ART's
    ``GaussianAugmentation(augmentation=True, ratio=...)`` appends them to the data set: every
    clean and noisy example weighs the same. The copies are taken from the batch in order:
    ``floor(ratio)`` copies of every example, then a random subset (without replacement, drawn
    with ``torch.randperm``) for the fractional part — ART draws all copies with replacement;
    taking each example once when ``ratio = 1`` lowers the variance and changes nothing in
    expectation. Draw order (fixed, so a test can replay it): the subset first (only when the
    ratio is fractional), then the noise ``torch.randn`` of shape (M, C, H, W).

    Noise is in pixel units (inputs in [0, 1]) and clipped back to the box, as images are.

    Args:
        sigma: noise standard deviation in pixel units. The default 0.1 keeps digits and MNIST
            legible and suits CIFAR-like data; as a rule take sigma at least the L∞ budget one
            hopes to resist (e.g. 0.3 for MNIST at eps 0.3, 8/255–0.1 for CIFAR-10), keeping in
            mind that clean accuracy falls as sigma grows.
        augmentation: append noisy copies (True, ART's default) or replace the inputs (False).
        ratio: noisy copies per clean example when appending (ART's ``ratio``); ignored (one
            noisy version of each example) when replacing.

    The accuracy the Trainer logs is measured on the clean rows when appending, on the noisy
    inputs when replacing.
    """

    name: ClassVar[str] = "gaussian-augmentation"
    sigma: float = 0.1
    augmentation: bool = True
    ratio: float = 1.0

    def __post_init__(self) -> None:
        check_positive(self.sigma, "sigma")
        if not isinstance(self.augmentation, bool):
            raise TypeError(f"`augmentation` must be a bool, got {self.augmentation!r}")
        check_positive(self.ratio, "ratio")

    def augment(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The noisy inputs and their labels (M rows when appending, N when replacing)."""
        n = x.shape[0]
        if not self.augmentation:
            idx = torch.arange(n, device=x.device)
        else:
            m = int(round(self.ratio * n))
            whole, rest = divmod(m, n) if n else (0, 0)
            idx = torch.arange(n, device=x.device).repeat(whole)
            if rest:
                idx = torch.cat([idx, torch.randperm(n, device=x.device)[:rest]])
        noise = torch.randn((idx.numel(), *x.shape[1:]), device=x.device, dtype=x.dtype)
        return (x[idx] + self.sigma * noise).clamp(0.0, 1.0), y[idx]

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x_noisy, y_noisy = self.augment(x, y)
        if not self.augmentation:
            logits = model(x_noisy)
            return F.cross_entropy(logits, y), logits
        # One forward pass over clean + noisy rows: BatchNorm then sees the same mixed batch
        # the method trains on (ART feeds both to the model as one data set).
        out = model(torch.cat([x, x_noisy]))
        return F.cross_entropy(out, torch.cat([y, y_noisy])), out[: x.shape[0]]


# ============================================================================================
# Label smoothing
# ============================================================================================

def smoothed_targets(y: Tensor, num_classes: int, max_value: float) -> Tensor:
    """ART's smoothed one-hot targets: `max_value` on the true class, (1 − max_value)/(K − 1) elsewhere."""
    if num_classes < 2:
        raise ValueError(f"label smoothing needs at least 2 classes, got {num_classes}")
    if max_value < 1.0 / num_classes:
        raise ValueError(f"`max_value` must be at least 1/K = {1.0 / num_classes:.4g} for K = {num_classes} "
                         f"classes (otherwise the true class is not the most likely target), got {max_value!r}")
    off = (1.0 - max_value) / (num_classes - 1)
    target = torch.full((y.shape[0], num_classes), off, device=y.device)
    return target.scatter(1, y[:, None], max_value)


@OBJECTIVES.register("label-smoothing",
                     "Cross-entropy against smoothed one-hot labels, ART style (Warde-Farley & Goodfellow 2016).")
@dataclass
class LabelSmoothing(Objective):
    """Label smoothing as a defense: train against targets that are not fully confident.

    Szegedy et al., "Rethinking the Inception Architecture for Computer Vision", 2016,
    arXiv:1512.00567; proposed as a cheap defense by Warde-Farley & Goodfellow, "Adversarial
    perturbations of deep neural networks", 2016 (in *Perturbations, Optimization, and
    Statistics*). The parameterization is ART's ``LabelSmoothing(max_value=0.9)``::

        q_k = max_value                    if k = y
              (1 − max_value) / (K − 1)    otherwise
        loss = 1/N · Σ_i −Σ_k q_{i,k} · log softmax(f(x_i))_k

    This is *not* the uniform mix of Szegedy et al. / ``torch.nn.functional.cross_entropy(...,
    label_smoothing=ε)`` (which puts 1 − ε + ε/K on the true class); the two coincide for
    ε = (1 − max_value)·K/(K − 1). The uniform mix is available as
    ``create_objective("standard", label_smoothing=ε)``.

    Args:
        max_value: target probability of the true class, in [1/K, 1] (1 is plain cross-entropy).
    """

    name: ClassVar[str] = "label-smoothing"
    max_value: float = 0.9

    def __post_init__(self) -> None:
        check_in_range(self.max_value, "max_value", 0.0, 1.0)
        if self.max_value == 0.0:
            raise ValueError("`max_value` must be > 0 (the target probability of the true class)")

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(x)
        target = smoothed_targets(y, logits.shape[1], self.max_value).to(logits.dtype)
        return _soft_cross_entropy(logits, target), logits


# ============================================================================================
# Input-gradient regularization (double backpropagation)
# ============================================================================================

def input_gradient_penalty(model: nn.Module, x: Tensor, y: Tensor, p: int = 2) -> tuple[Tensor, Tensor, Tensor]:
    """Cross-entropy, the input-gradient penalty and the logits, all differentiable in the weights.

    Returns ``(ce, penalty, logits)`` with ``ce`` the mean cross-entropy and
    ``penalty = 1/N · Σ_i ||∇_{x_i} CE(f(x_i), y_i)||_p^p`` (p = 1 or 2), computed with
    ``create_graph=True`` so that the penalty itself can be backpropagated (double backprop).

    The gradient is taken of the *summed* per-example losses, which equals the per-example
    gradient for every model whose examples do not interact; with BatchNorm in train mode the
    batch statistics couple the examples and the cross terms are included, as in every
    double-backprop implementation that works on batches.
    """
    x = x.detach().requires_grad_(True)
    logits = model(x)
    ce_each = F.cross_entropy(logits, y, reduction="none")
    (grad,) = torch.autograd.grad(ce_each.sum(), x, create_graph=True)
    g = grad.flatten(1)
    per_example = g.pow(2).sum(1) if p == 2 else g.abs().sum(1)
    return ce_each.mean(), per_example.mean(), logits


@OBJECTIVES.register("gradient-regularization",
                     "Cross-entropy + lam·||∇_x CE||_p^p, double backpropagation (Ross & Doshi-Velez 2018).")
@dataclass
class GradientRegularization(Objective):
    """Input-gradient regularization (double backpropagation).

    Ross & Doshi-Velez, "Improving the Adversarial Robustness and Interpretability of Deep Neural
    Networks by Regularizing their Input Gradients", AAAI 2018, arXiv:1711.09404; the idea is
    Drucker & LeCun's double backpropagation (IEEE TNN 1992)::

        loss = 1/N · Σ_i [ CE(f(x_i), y_i) + lam · ||∇_{x_i} CE(f(x_i), y_i)||_p^p ]

    Ross & Doshi-Velez penalize the squared L2 norm (p = 2, the default); p = 1 penalizes the
    L1 norm, the dual of the L∞ threat (a first-order bound on the loss increase under an L∞
    perturbation of size eps is eps·||∇_x CE||_1). Gradients are w.r.t. the input in pixel units
    ([0, 1], normalization is inside the model), so `lam` does not depend on the dataset's
    normalization statistics. The forward pass runs in the model's current (train) mode.

    Args:
        lam: weight of the penalty (λ). Ross & Doshi-Velez tune it per dataset; 1.0 is a mild
            default for 8×8/28×28 digits, where pixel-space gradient norms of a trained net are
            of order 0.1–1; raise it (10–100) for a stronger effect at some clean accuracy.
        p: 2 (squared L2 norm, the paper) or 1 (L1 norm).
    """

    name: ClassVar[str] = "gradient-regularization"
    lam: float = 1.0
    p: int = 2

    def __post_init__(self) -> None:
        check_positive(self.lam, "lam", allow_zero=True)
        if isinstance(self.p, bool) or self.p not in (1, 2):
            raise ValueError(f"`p` must be 1 or 2, got {self.p!r}")

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        ce, penalty, logits = input_gradient_penalty(model, x, y, self.p)
        return ce + self.lam * penalty, logits


# ============================================================================================
# Deep contractive network
# ============================================================================================

HOOKED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def hooked_layers(model: nn.Module, names: tuple[str, ...] | list[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The (qualified name, module) pairs the contractive penalty hooks.

    Default: every `nn.Linear` / `nn.Conv{1,2,3}d` of the model. With `names`, exactly those
    modules (any type); an unknown name is an error that lists the valid ones.
    """
    if names is None:
        found = [(n, m) for n, m in model.named_modules() if isinstance(m, HOOKED_TYPES)]
        if not found:
            raise ValueError("the contractive penalty found no Linear or Conv layer in the model; "
                             "name the layers to hook with `layers`")
        return found
    table = dict(model.named_modules())
    missing = [n for n in names if n not in table]
    if missing:
        valid = [n for n, m in model.named_modules() if isinstance(m, HOOKED_TYPES)]
        raise ValueError(f"`layers` names modules the model does not have: {missing}; "
                         f"its Linear/Conv layers are {valid}")
    return [(n, table[n]) for n in names]


def contractive_penalty(model: nn.Module, x: Tensor, layers: list[tuple[str, nn.Module]],
                        samples: int = 1) -> tuple[Tensor, Tensor, list[Tensor]]:
    """One forward pass of `model` on `x` plus the layer-wise contractive penalty.

    Forward hooks record, in execution order, the input ``a_k`` and the output of every call of
    a hooked layer ``k = 1..L``. The penalized pairs of consecutive representations are::

        (a_k, a_{k+1})      for k = 1..L−1: the input of one hooked layer to the input of the
                            next, i.e. the layer itself and whatever follows it (activation,
                            pooling, flatten, dropout) up to the next hooked layer;
        (a_L, f(x))         the last hooked layer's input to its output (the logits when the
                            last hooked layer is the classifier head).

    ``a_1`` is the normalized image (the input of the first layer, after the model's `Normalize`).
    For each pair the squared Frobenius norm of the Jacobian is estimated without bias by
    Hutchinson-style random projections, ``||J||_F² = E_v ||Jᵀ v||²`` with ``v ~ N(0, I)`` in the
    output space, averaged over `samples` draws; ``Jᵀ v`` is one `torch.autograd.grad` call with
    ``create_graph=True``. The draws come from the global RNG in a fixed order (pair by pair in
    the order above, `samples` draws of ``torch.randn_like(output)`` each), so a seeded call can
    be replayed. Jacobians are per example (the vector-Jacobian product of the batch
    sums per-example products, examples being independent up to BatchNorm's batch statistics).
    A pair whose output does not depend on its input (parallel branches), or is the same tensor
    (one input feeding two hooked layers, e.g. a residual block's 1×1 shortcut and its first
    conv), contributes 0.

    Returns:
        ``(logits, penalty, per_pair)``: penalty = Σ_pairs mean_over_batch ||J||_F² (estimate).
    """
    records: list[tuple[Tensor, Tensor]] = []

    def hook(_module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if inputs and isinstance(inputs[0], Tensor) and isinstance(output, Tensor):
            records.append((inputs[0], output))

    handles = [m.register_forward_hook(hook) for _, m in layers]
    try:
        # The input must be in the graph, or the first layer's input (Normalize(x)) would be a
        # constant that autograd cannot differentiate with respect to.
        logits = model(x.detach().requires_grad_(True))
    finally:
        for h in handles:
            h.remove()
    if not records:
        raise RuntimeError("none of the hooked layers ran in the forward pass")
    pairs = [(records[k][0], records[k + 1][0]) for k in range(len(records) - 1)]
    pairs.append(records[-1])
    n = x.shape[0]
    per_pair: list[Tensor] = []
    for src, dst in pairs:
        total = dst.new_zeros(())
        if dst is src:  # one tensor feeding two hooked layers (a shortcut beside a conv): no layer between
            per_pair.append(total)
            continue
        for _ in range(samples):
            v = torch.randn_like(dst)
            (jtv,) = torch.autograd.grad(dst, src, grad_outputs=v, create_graph=True, allow_unused=True)
            if jtv is not None:
                total = total + jtv.pow(2).sum() / n
        per_pair.append(total / samples)
    return logits, torch.stack(per_pair).sum(), per_pair


@OBJECTIVES.register("contractive",
                     "Cross-entropy + layer-wise contractive penalty, deep contractive network (Gu & Rigazio 2015).")
@dataclass
class Contractive(Objective):
    """Deep contractive network: penalize the Jacobian of every layer w.r.t. the previous one.

    Gu & Rigazio, "Towards Deep Neural Network Architectures Robust to Adversarial Examples",
    ICLR 2015 workshop, arXiv:1412.5068; the penalty is the contractive auto-encoder's
    (Rifai et al. 2011) applied layer by layer::

        loss = 1/N · Σ_i [ CE(f(x_i), y_i) + lam · Σ_{j=1..H+1} ||∂h_j(x_i) / ∂h_{j−1}(x_i)||_F² ]

    with h_0 the (normalized) input and h_{H+1} the logits. Exact Jacobian norms cost one
    backward pass per output unit; this uses the unbiased random-projection estimator of
    `contractive_penalty` (``samples`` draws per pair per batch) and hooks the model's Linear and
    Conv layers, whose consecutive inputs are the h_j (see `contractive_penalty` for the exact
    pairs). The paper uses one λ for all layers; so does this.

    Args:
        lam: weight of the penalty (λ). The squared Frobenius norm grows with a layer's width
            and, for convolutions, with the number of spatial positions, so the scale is
            model-dependent; 1e-3 keeps the penalty of cnn-small/mlp on digits below the
            cross-entropy at initialization. Tune it per model.
        samples: random projections per layer pair and batch (more: less variance, more time).
        layers: qualified module names to hook instead of every Linear/Conv layer (their
            execution order defines the pairs), or None.
    """

    name: ClassVar[str] = "contractive"
    lam: float = 1e-3
    samples: int = 1
    layers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        check_positive(self.lam, "lam", allow_zero=True)
        check_positive(self.samples, "samples", integer=True)
        if self.layers is not None:
            if isinstance(self.layers, str) or not all(isinstance(n, str) for n in self.layers) or not self.layers:
                raise TypeError(f"`layers` must be a non-empty list of module names, got {self.layers!r}")
            self.layers = tuple(self.layers)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "lam": self.lam, "samples": self.samples,
                "layers": None if self.layers is None else list(self.layers)}

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits, penalty, _ = contractive_penalty(model, x, hooked_layers(model, self.layers), self.samples)
        return F.cross_entropy(logits, y) + self.lam * penalty, logits

