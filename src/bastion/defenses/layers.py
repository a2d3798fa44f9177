"""Model-side defenses: bounded ReLU, stochastic activation pruning, ensembles.

Each is an `nn.Module` carrying the defense contract of the design (DESIGN.md):

* ``differentiable`` — gradients through `forward` are meaningful;
* ``randomized`` — `forward` samples randomness (the evaluator then attacks it with EOT);
* ``bpda(x)`` — a differentiable stand-in, where `forward` is not differentiable.

=================================  ==============  ===========  ==========================
component                          differentiable  randomized   bpda
=================================  ==============  ===========  ==========================
`BoundedReLU`                      yes             no           —
`StochasticActivationPruning`      yes             yes          — (attack with EOT)
`Ensemble` (logits / probs)        yes             if a member  —
`Ensemble` (vote)                  no              if a member  the mean-probability path
=================================  ==============  ===========  ==========================

Named layers (`LAYERS`, `apply_layers`): ``bounded-relu``, ``sap`` and ``thermometer-input``
rewrite a `Classifier` in place *and record themselves in its spec*, so the model's checkpoint
rebuilds them (`load_model`) and the CLI reaches them (``bastion train --layer bounded-relu:t=1``,
``bastion audit --layer sap``).

`bound_relus` and `add_sap` rewrite a model's `nn.ReLU` *modules*. A ReLU called as a function
inside a ``forward`` (``F.relu``, ``torch.relu``, ``x.relu()``, as in Bastion's pre-activation
ResNet blocks) is not a module and cannot be swapped; pass ``example=`` to have such calls
detected and refused instead of silently leaving part of the model undefended.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .._checks import check_choice, check_positive
from .._registry import Registry

__all__ = ["LAYERS", "BoundedReLU", "Ensemble", "StochasticActivationPruning", "add_sap", "apply_layers",
           "bound_relus", "count_functional_relus", "ensemble_model"]


# ============================================================================================
# Rewriting a model's ReLUs
# ============================================================================================

_FUNCTIONAL_RELUS = {F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_}


class _CountReLUCalls(TorchFunctionMode):
    """Counts the functional ReLU calls of a forward pass (including those of nn.ReLU modules)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in _FUNCTIONAL_RELUS:
            self.calls += 1
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def count_functional_relus(model: nn.Module, example: Tensor) -> int:
    """How many ReLUs one forward pass of `model` on `example` computes as function calls.

    Calls made by `nn.ReLU` modules (which call ``F.relu``) are not counted: what is counted
    are the ReLUs written into some ``forward`` (``F.relu``, ``torch.relu``, ``Tensor.relu``),
    which `bound_relus` and `add_sap` cannot reach. The model runs in eval mode
    and its mode is restored, and so are the global RNG and the generators of its SAP layers.
    """
    was_training = model.training
    # A check must not consume randomness: randomized layers (SAP) would otherwise advance the
    # global RNG or their own generators, and a later seeded run would differ.
    gens = {id(m.generator): m.generator for m in model.modules()
            if isinstance(m, StochasticActivationPruning) and m.generator is not None}
    saved = {k: g.get_state() for k, g in gens.items()}
    devices = [example.device] if example.device.type == "cuda" else []
    # nn.ReLU modules call F.relu once per forward: count those calls to subtract them.
    module_calls = [0]

    def hook(*_: Any) -> None:
        module_calls[0] += 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if type(m) is nn.ReLU]
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices), _CountReLUCalls() as counter:
            model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
        for k, g in gens.items():
            g.set_state(saved[k])
    return counter.calls - module_calls[0]


def _replace_relus(model: nn.Module, make: Callable[[nn.Module], nn.Module],
                   kinds: tuple[type, ...] = (nn.ReLU,)) -> int:
    """Replace every submodule (at any depth) of exactly a type in `kinds` by ``make(it)``; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) in kinds:
                setattr(parent, child_name, make(child))
                count += 1
    return count


def _rewrite(model: nn.Module, make: Callable[[nn.Module], nn.Module], what: str, *, copy_model: bool,
             example: Tensor | None, kinds: tuple[type, ...] = (nn.ReLU,)) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if type(model) is nn.ReLU:
        raise ValueError(f"`model` is itself an nn.ReLU; build the {what} layer directly")
    # Rewrite a copy first, so that a refusal (no ReLU, functional ReLUs) leaves `model` intact.
    trial = copy.deepcopy(model)
    if _replace_relus(trial, make, kinds) == 0:
        raise ValueError(f"{what}: found no nn.ReLU module in the model; ReLUs called as functions "
                         "(F.relu / torch.relu in a forward) cannot be replaced")
    if example is not None:
        left = count_functional_relus(trial, example)
        if left:
            raise ValueError(f"{what}: the model still computes {left} ReLU(s) as function calls in its forward "
                             "(F.relu / torch.relu / Tensor.relu), which cannot be replaced; the defense would "
                             "cover only part of the network")
    if copy_model:
        return trial
    _replace_relus(model, make, kinds)
    return model


# ============================================================================================
# Bounded ReLU
# ============================================================================================

class BoundedReLU(nn.Module):
    """min(max(x, 0), t): a ReLU capped at `t`.

    Zantedeschi, Nicolae & Rawat, "Efficient Defenses Against Adversarial Attacks", 2017,
    arXiv:1707.06728 (BReLU; with Gaussian augmentation, the defense ART's docs describe).
    Capping the activations bounds how far a small input change can propagate. The function
    is piecewise linear, so gradients are meaningful (zero where the unit is saturated at 0 or t).

    Args:
        t: the upper bound (> 0). Zantedeschi et al. try small bounds such as 1 to 2 for
            networks on [0, 1] inputs; too small a bound costs clean accuracy.
    """

    differentiable = True
    randomized = False

    def __init__(self, t: float = 1.0) -> None:
        super().__init__()
        check_positive(t, "t")
        self.t = float(t)

    def forward(self, x: Tensor) -> Tensor:
        # clamp, not F.relu: keeps count_functional_relus meaningful after bound_relus.
        return x.clamp(0.0, self.t)

    def extra_repr(self) -> str:
        return f"t={self.t}"


def bound_relus(model: nn.Module, t: float = 1.0, *, copy: bool = True, example: Tensor | None = None) -> nn.Module:
    """Replace every `nn.ReLU` module of `model` by `BoundedReLU(t)`.

    Args:
        model: any module; ReLU modules are found at any depth (exact type `nn.ReLU`).
        t: the bound.
        copy: True (default) returns a rewritten deep copy and leaves `model` untouched; False
            rewrites `model` in place and returns it.
        example: an input batch; when given, a forward pass checks that no ReLU is left as a
            function call (see the module docstring) and raises ValueError otherwise.

    Raises:
        ValueError: the model has no `nn.ReLU` module, or `example` reveals functional ReLUs
            (`model` is then left unchanged, also with ``copy=False``).
    """
    check_positive(t, "t")
    return _rewrite(model, lambda _relu: BoundedReLU(t), "bound_relus", copy_model=copy, example=example)


# ============================================================================================
# Stochastic activation pruning
# ============================================================================================

class StochasticActivationPruning(nn.Module):
    """Stochastic activation pruning (SAP): keep activations sampled by magnitude, rescale them.

    Dhillon, Azizzadenesheli, Lipton, Bernstein, Kossaifi, Khanna & Anandkumar, "Stochastic
    Activation Pruning for Robust Adversarial Defense", ICLR 2018, arXiv:1803.01442. For each
    example, over the layer's activations h (all features flattened, j = 1..a)::

        p_j = |h_j| / Σ_k |h_k|
        draw r indices with replacement from Categorical(p)    (torch.multinomial, jointly)
        out_j = h_j / (1 − (1 − p_j)^r)   if j was drawn at least once,   0 otherwise

    ``1 − (1 − p_j)^r`` is the probability that j is drawn at least once, so E[out_j] = h_j: the
    layer is unbiased and can be dropped into a trained network. This is the paper's joint
    sampling with replacement, not independent Bernoulli keeps (which share the marginals but
    not the joint law); at most r distinct activations survive per example.

    The layer is active in eval mode — that is the defense — and, by default, in train mode.
    Gradients flow through the kept activations and their rescaling (SAP is differentiable but
    random: Athalye et al. 2018 break it with EOT, which Bastion's evaluator applies because
    ``randomized`` is True).

    Args:
        r: samples per example, or None to use `fraction`.
        fraction: r as a fraction of the layer's activation count per example,
            ``r = max(1, round(fraction · a))`` (the paper reports SAP-100, i.e. r = a, as its
            main setting). Used only when `r` is None.
        active_in_train: prune in train mode too (True) or act as the identity while training.
        generator: a `torch.Generator` for reproducible draws; None uses the global RNG. When
            it lives on another device than the activations, the draw happens on its device.
    """

    differentiable = True
    randomized = True

    def __init__(self, r: int | None = None, fraction: float = 1.0, *, active_in_train: bool = True,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if r is not None:
            check_positive(r, "r", integer=True)
        check_positive(fraction, "fraction")
        if not isinstance(active_in_train, bool):
            raise TypeError(f"`active_in_train` must be a bool, got {active_in_train!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be a torch.Generator or None, got {type(generator).__name__}")
        self.r, self.fraction, self.active_in_train, self.generator = r, float(fraction), active_in_train, generator

    def samples_for(self, features: int) -> int:
        """r for a layer with `features` activations per example."""
        return self.r if self.r is not None else max(1, round(self.fraction * features))

    def forward(self, h: Tensor) -> Tensor:
        if self.training and not self.active_in_train:
            return h
        n = h.shape[0]
        flat = h.reshape(n, -1)
        if flat.shape[1] == 0 or n == 0:
            return h
        r = self.samples_for(flat.shape[1])
        mag = flat.detach().abs()
        total = mag.sum(1, keepdim=True)
        dead = total == 0  # an all-zero row: nothing to sample, the output is zero anyway
        # Sampling probabilities; a dead row gets uniform ones (its draws are discarded below).
        p = torch.where(dead, torch.ones_like(mag), mag) / torch.where(dead, float(flat.shape[1]), total)
        gen_device = self.generator.device if self.generator is not None else p.device
        probs = p.to(gen_device, torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype)
        draws = torch.multinomial(probs, r, replacement=True, generator=self.generator).to(p.device)
        kept = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, draws, True) & ~dead
        # Survival probability 1 − (1 − p)^r in a form that stays accurate for tiny p; it is
        # recomputed from the (non-detached) activations so gradients see the rescaling too.
        # p is kept just below 1 (a row with a single non-zero unit) so that log1p stays finite
        # and its derivative is not inf·0 = NaN; the value is then 1 − (2^-23)^r, i.e. 1.
        absf = flat.abs()
        p_grad = absf / absf.sum(1, keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny)
        one_minus = 1.0 - torch.finfo(flat.dtype).eps
        keep_prob = -torch.expm1(r * torch.log1p(-p_grad.clamp(max=one_minus)))
        # Divide only where kept: elsewhere keep_prob may be 0 and 0/0 would poison the gradient.
        safe = torch.where(kept, keep_prob, torch.ones_like(keep_prob))
        out = torch.where(kept, flat / safe, torch.zeros_like(flat))
        return out.reshape(h.shape)

    def extra_repr(self) -> str:
        size = f"r={self.r}" if self.r is not None else f"fraction={self.fraction}"
        return f"{size}, active_in_train={self.active_in_train}"


def add_sap(model: nn.Module, r: int | None = None, fraction: float = 1.0, *, active_in_train: bool = True,
            generator: torch.Generator | None = None, copy: bool = True,
            example: Tensor | None = None) -> nn.Module:
    """Insert `StochasticActivationPruning` after every `nn.ReLU` (and `BoundedReLU`) module of `model`.

    Each ReLU becomes ``nn.Sequential(ReLU(), StochasticActivationPruning(...))``; neither has
    parameters or buffers, so the model's state_dict (and its checkpoints) are unchanged. All
    inserted layers share `generator`. `copy` and `example` work as in `bound_relus`.
    """
    StochasticActivationPruning(r, fraction, active_in_train=active_in_train, generator=generator)  # validates

    def make(relu: nn.ReLU) -> nn.Module:
        return nn.Sequential(relu, StochasticActivationPruning(r, fraction, active_in_train=active_in_train,
                                                               generator=generator))

    return _rewrite(model, make, "add_sap", copy_model=copy, example=example, kinds=(nn.ReLU, BoundedReLU))


# ============================================================================================
# Ensembles
# ============================================================================================

ENSEMBLE_MODES = ("logits", "probs", "vote")


class Ensemble(nn.Module):
    """Several classifiers combined into one (itself a classifier returning logits, attackable).

    Modes, for member logits z_1..z_M (each N×K)::

        "logits":  (1/M) Σ_m z_m
        "probs":   log( (1/M) Σ_m softmax(z_m) )            log of the mean probability: its
                                                            softmax is the mean probability, so
                                                            cross-entropy attacks work unchanged
        "vote":    (c + ½·p̄) / M,  c_k = #{m : argmax z_m = k},  p̄ = (1/M) Σ_m softmax(z_m)
                                                            the vote shares, ties broken by the
                                                            mean probability (½·p̄ < 1 never
                                                            outweighs one vote)

    The vote is piecewise constant in the input: its true gradient is zero almost everywhere,
    and that is what it returns (the output stays connected to the graph with a zero
    derivative, so a naive gradient attack sees exactly zero gradients — visible to the
    obfuscated-gradient checks — instead of crashing). It declares ``differentiable = False``
    and its `bpda` is the "probs" path, which an adaptive attack differentiates instead.

    Members run in whatever mode the ensemble is in (`train()`/`eval()` propagate).
    ``randomized`` is True when any member (or any of its submodules) declares it.

    Args:
        models: two or more classifiers with the same number of classes (one is allowed).
        mode: ``"logits"`` (default), ``"probs"`` or ``"vote"``.
    """

    def __init__(self, models: Iterable[nn.Module], mode: str = "logits") -> None:
        super().__init__()
        members = list(models) if not isinstance(models, nn.Module) else None
        if members is None:
            raise TypeError("`models` must be a list of nn.Modules (wrap a single model in a list)")
        if not members:
            raise ValueError("`models` is empty: an ensemble needs at least one member")
        for i, m in enumerate(members):
            if not isinstance(m, nn.Module):
                raise TypeError(f"`models[{i}]` must be a torch.nn.Module, got {type(m).__name__}")
        self.members = nn.ModuleList(members)
        self.mode = check_choice(mode, "mode", ENSEMBLE_MODES)

    @property
    def differentiable(self) -> bool:
        return self.mode != "vote"

    @property
    def randomized(self) -> bool:
        return any(getattr(m, "randomized", False) is True for m in self.modules() if m is not self)

    def member_logits(self, x: Tensor) -> Tensor:
        """The stacked logits of every member, M×N×K."""
        outs = [m(x) for m in self.members]
        shapes = {tuple(o.shape) for o in outs}
        if len(shapes) != 1:
            raise ValueError(f"ensemble members disagree on the output shape: {[tuple(o.shape) for o in outs]}")
        return torch.stack(outs)

    @staticmethod
    def _log_mean_probs(z: Tensor) -> Tensor:
        # log((1/M) Σ softmax) computed in log space: stable even for saturated members.
        return torch.logsumexp(F.log_softmax(z, dim=2), dim=0) - math.log(z.shape[0])

    def forward(self, x: Tensor) -> Tensor:
        z = self.member_logits(x)
        if self.mode == "logits":
            return z.mean(0)
        if self.mode == "probs":
            return self._log_mean_probs(z)
        m, k = z.shape[0], z.shape[2]
        votes = F.one_hot(z.argmax(2), k).to(z.dtype).sum(0)
        mean_probs = F.softmax(z, dim=2).mean(0)
        scores = (votes + 0.5 * mean_probs.detach()) / m
        # Zero derivative, but still part of the graph (mean_probs is finite: no 0·inf NaN).
        return scores + 0.0 * mean_probs

    def bpda(self, x: Tensor) -> Tensor:
        """A differentiable stand-in for the vote: the log of the mean probability ("probs" mode)."""
        return self._log_mean_probs(self.member_logits(x))

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


# ============================================================================================
# Layers by name: recorded in the model's spec, rebuilt with its checkpoint
# ============================================================================================

# name -> (model, **options) -> the rewritten model (in place where the rewrite allows)
LAYERS: Registry[Callable[..., nn.Module]] = Registry("layer")


@LAYERS.register("bounded-relu", "every nn.ReLU capped at t (Zantedeschi et al. 2017); option t (default 1)")
def _bounded_relu_layer(model: nn.Module, t: float = 1.0) -> nn.Module:
    return bound_relus(model, t, copy=False)


@LAYERS.register("sap", "stochastic activation pruning after every nn.ReLU (Dhillon et al. 2018), randomized: "
                        "audited with EOT; options fraction (default 1) or r")
def _sap_layer(model: nn.Module, fraction: float = 1.0, r: int | None = None) -> nn.Module:
    return add_sap(model, r=r, fraction=fraction, copy=False)


@LAYERS.register("thermometer-input", "the first Conv2d/Linear widened to read the thermometer code of the images "
                                      "(Buckman et al. 2018; use with --transform thermometer:levels=L); option levels")
def _thermometer_layer(model: nn.Module, levels: int) -> nn.Module:
    from .transforms.thermometer import adapt_model

    spec = getattr(model, "spec", None)
    return adapt_model(model, levels, channels=int(spec.in_shape[0]) if spec is not None else 1)


def apply_layers(model: nn.Module, layers: Iterable[str | tuple[str, dict[str, Any]]]) -> nn.Module:
    """Apply named model-side defenses in order and record each in ``model.spec.layers``.

    Args:
        model: usually a `bastion.models.Classifier` (its spec is what a checkpoint saves; a
            module without a spec is rewritten all the same, but nothing records it).
        layers: specs ``"name"`` / ``"name:key=value,..."`` (values parsed as JSON) or
            ``(name, options)`` pairs; names from `LAYERS` (``bastion list layers``).

    Returns:
        the rewritten model (the same object, except for ``thermometer-input``, which widens a
        copy's first layer).

    Raises:
        ValueError / TypeError: an unknown name (the message lists the valid ones), bad options,
            or a model the layer cannot rewrite (no nn.ReLU module).

    Example:
        >>> from bastion.models import create_model
        >>> m = apply_layers(create_model("cnn-small", 10, (1, 28, 28)), ["bounded-relu:t=1"])
        >>> m.spec.layers
        [{'name': 'bounded-relu', 'kwargs': {'t': 1}}]
    """
    from .transforms.base import parse_spec

    for item in layers:
        name, options = parse_spec(item, "layer") if isinstance(item, str) else (item[0], dict(item[1]))
        build = LAYERS.get(name)
        try:
            model = build(model, **options)
        except TypeError as e:
            raise TypeError(f"bad options for layer {name!r}: {e}") from e
        spec = getattr(model, "spec", None)
        if spec is not None:
            model.spec = dataclasses.replace(spec, layers=[*spec.layers, {"name": name.lower(), "kwargs": options}])
    return model


def ensemble_model(models: Iterable[nn.Module], mode: str = "logits") -> nn.Module:
    """Trained `Classifier`s as one savable `Classifier` (the ``"ensemble"`` architecture).

    Unlike ``Ensemble(models)``, the result carries a spec that lists every member's spec, so
    `bastion.checkpoint.save_model` / `load_model` round-trip it and the CLI can load it as one
    model (``bastion ensemble RUN RUN ... --out DIR``, then ``bastion evaluate --model-path DIR``).

    Args:
        models: trained classifiers built by Bastion (each with a ``spec``), same classes and
            input shape; their weights are copied.
        mode: ``"logits"``, ``"probs"`` or ``"vote"`` (see `Ensemble`).

    Raises:
        ValueError: no models, a model without a spec, or members that disagree on classes/shape.
    """
    from ..models import create_model

    models = list(models)
    if not models:
        raise ValueError("`models` is empty: an ensemble needs at least one member")
    specs = []
    for i, m in enumerate(models):
        spec = getattr(m, "spec", None)
        if spec is None:
            raise ValueError(f"`models[{i}]` has no spec (build it with bastion.models.create_model or load it "
                             "with bastion.checkpoint.load_model); wrap plain modules in `Ensemble` instead")
        specs.append(spec)
    first = specs[0]
    ens = create_model("ensemble", first.num_classes, first.in_shape, members=[s.to_dict() for s in specs],
                       mode=mode)
    for dst, src in zip(ens.net.members, models):
        dst.load_state_dict(src.state_dict())
    return ens
