"""The detector contract: fit, score, calibrate at a false-positive rate, detect, and be attacked.

A detector flags inputs it believes adversarial. Every detector here is an `nn.Module` with

* ``fit(model, x_clean, y_clean, x_adv=None, ...)`` — learn what clean inputs look like to
  `model` (unsupervised detectors ignore `x_adv`; supervised ones generate it when not given);
* ``score(x) -> (N,)`` — higher = more suspicious;
* ``calibrate(x_clean, fpr)`` — fix ``threshold`` so that at most a fraction `fpr` of clean
  inputs are flagged, on *held-out* clean data (see below);
* ``detect(x) -> Detection(is_adv, score, info)`` — ``is_adv = score > threshold``;
* ``adaptive_loss(x) -> (N,)`` — the penalty an attacker who knows the detector adds to the
  loss it *minimizes* (a PGD attacker maximizes ``CE − λ·adaptive_loss``): the hinge
  ``max(0, (score − threshold)/scale + kappa)``, zero once the input passes undetected with
  margin `kappa`. `scale` is the spread of the clean calibration scores, so one λ means about
  the same for every detector. Non-differentiable detectors compute it through differentiable
  stand-ins (BPDA), see `adaptive_score`;
* the declarations ``differentiable`` (autograd through `score` is meaningful) and
  ``randomized`` (`score` samples randomness: attack it with EOT).

Thresholds. ``calibrate`` takes the ⌈(1 − fpr)(n + 1)⌉-th smallest of n clean scores: for
a new clean input exchangeable with the calibration set, P(score > threshold) ≤ fpr (the
split-conformal guarantee, Vovk et al. 2005; Lei et al. 2018, arXiv:1604.04173). It refuses
sets too small for the requested rate, and data the detector was fit on (training scores are
optimistic, so the real false-positive rate would exceed the one requested).

Features. Detectors that read a hidden layer take ``layer``: None (the default) is the
penultimate representation, found generically as the *input of the last* `nn.Linear` of the
model (``net.head`` in Bastion's zoo); ``"input"`` is the image itself; ``"name"`` is the output
of the named submodule (``model.named_modules()``), ``"name:input"`` its input. The activations
are read with a forward hook while the model computes its logits, so gradients flow through them.

Data hygiene. `fit` records a content hash of every example it saw (`example_hashes`);
`calibrate` and `bastion.evaluation.detection.DetectionEval` refuse data that overlaps it.
`calibrate` records the hashes of its clean validation data too (``calibration_hashes``), so
a detector saved and loaded later still refuses to be evaluated on the data that set its
threshold.

Persistence. `bastion.defenses.detectors.save_detector` / `load_detector` store a fitted
detector as safetensors (every tensor: ``state_dict()``) + JSON (constructor options, threshold,
fit record). Subclasses take part through three hooks: ``init_kwargs`` (what rebuilds an
unfitted twin), ``_extra_state`` (JSON-ready fitted state that is not a tensor) and ``_rebuild``
(create the fitted submodules with their shapes before the tensors are loaded).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from ..._checks import check_images, check_labels
from ..._registry import Registry

__all__ = [
    "DETECTORS", "Detection", "Detector", "LayerTap", "MultiLayerTap", "NotFittedError", "check_fpr", "create_detector",
    "example_hashes", "find_last_linear", "list_detectors", "register_detector",
]


class NotFittedError(RuntimeError):
    """A detector used before `fit` (or before `calibrate`, where a threshold is needed)."""


@dataclass
class Detection:
    """What `Detector.detect` returns.

    Attributes:
        is_adv: bool (N,), ``score > threshold``.
        score: (N,) the detector's scores (higher = more suspicious).
        info: detector-specific extras (threshold, fpr, per-component scores, ...).
    """

    is_adv: Tensor
    score: Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.is_adv.shape[0])

    @property
    def rate(self) -> float:
        """Fraction flagged (0.0 for an empty batch)."""
        return float(self.is_adv.float().mean()) if len(self) else 0.0


# --------------------------------------------------------------------------- checks
def check_fpr(fpr: Any, name: str = "fpr") -> float:
    """A false-positive rate strictly inside (0, 1)."""
    if isinstance(fpr, bool) or not isinstance(fpr, (int, float)):
        raise TypeError(f"`{name}` must be a number in (0, 1), got {type(fpr).__name__}")
    if not (0.0 < float(fpr) < 1.0):
        raise ValueError(f"`{name}` must be a false-positive rate strictly between 0 and 1, got {fpr!r}")
    return float(fpr)


def check_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value!r}")
    return value


def check_number(value: Any, name: str, *, minimum: float = 0.0, allow_equal: bool = False) -> float:
    """A finite number > minimum (>= with `allow_equal`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}")
    ok = value >= minimum if allow_equal else value > minimum
    if not math.isfinite(value) or not ok:
        raise ValueError(f"`{name}` must be a finite number {'>=' if allow_equal else '>'} {minimum}, got {value!r}")
    return float(value)


def example_hashes(x: Tensor) -> list[str]:
    """A content hash per example (BLAKE2b of its float32 bytes), to detect reused data.

    Exact bytes: an adversarial example made from a training image hashes differently from
    it, a copy of the training image hashes the same, however the data was indexed or sliced.
    """
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise TypeError("`x` must be a tensor with a batch dimension")
    arr = x.detach().to("cpu", torch.float32).contiguous().reshape(x.shape[0], -1).numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=12).hexdigest() for row in arr]


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the block under ``torch.manual_seed(seed)`` and restore the global RNG afterwards."""
    if seed is None:
        yield
        return
    device = torch.device(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------- features
def find_last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last registered `nn.Linear` of `model` (its final classification layer, by convention)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError("the model has no nn.Linear layer, so its penultimate features cannot be found "
                         "generically; pass `layer` (a submodule name, or 'input')")
    return found[-1]


class LayerTap:
    """Reads one layer's activations with a forward hook while the model computes its logits.

    Args:
        layer: None (input of the last `nn.Linear`: the penultimate features), ``"input"`` (the
            image), ``"name"`` (output of submodule `name`) or ``"name:input"`` (its input).

    Calling ``tap(model, x)`` returns ``(logits, features)``; both carry gradients w.r.t. `x`.
    If the layer runs several times in one forward pass, its last call is kept.
    """

    def __init__(self, layer: str | None = None) -> None:
        if layer is not None and (not isinstance(layer, str) or not layer.strip()):
            raise ValueError(f"`layer` must be None, 'input', a submodule name or 'name:input', got {layer!r}")
        self.layer = layer

    def resolve(self, model: nn.Module) -> tuple[str, nn.Module | None, str]:
        """(description, module or None for the image, 'input' | 'output')."""
        if self.layer is None:
            name, lin = find_last_linear(model)
            return f"{name}:input", lin, "input"
        if self.layer == "input":
            return "input", None, "input"
        name, _, which = self.layer.partition(":")
        which = which or "output"
        if which not in ("input", "output"):
            raise ValueError(f"`layer` {self.layer!r}: the part after ':' must be 'input' or 'output'")
        modules = dict(model.named_modules())
        if name not in modules:
            near = [n for n in modules if n and (name in n or n in name)][:5]
            hint = f" (close: {', '.join(near)})" if near else ""
            raise ValueError(f"`layer` {name!r} is not a submodule of the model{hint}")
        return self.layer if ":" in self.layer else f"{name}:output", modules[name], which

    def __call__(self, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        _, module, which = self.resolve(model)
        if module is None:
            return model(x), x
        store: list[Tensor] = []

        def hook(mod: nn.Module, args: tuple, out: Any) -> None:
            t = args[0] if which == "input" else out
            if not isinstance(t, Tensor):
                raise TypeError(f"layer {self.layer or 'penultimate'!r} produced a {type(t).__name__}, not a tensor")
            store.append(t)

        handle = module.register_forward_hook(hook)
        try:
            logits = model(x)
        finally:
            handle.remove()
        if not store:
            raise RuntimeError(f"layer {self.layer or 'penultimate'!r} was not called during the forward pass")
        return logits, store[-1]


class MultiLayerTap:
    """Several layers' activations from *one* forward pass: ``tap(model, x) -> (logits, [features])``.

    Args:
        layers: a list of `LayerTap` layer specs (None, ``"input"``, ``"name"``, ``"name:input"``).
    """

    def __init__(self, layers: list[str | None]) -> None:
        self.taps = [LayerTap(layer) for layer in layers]

    def __call__(self, model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        resolved = [t.resolve(model) for t in self.taps]
        store: list[list[Tensor]] = [[] for _ in resolved]
        handles = []

        def make_hook(j: int, which: str) -> Callable[..., None]:
            def hook(mod: nn.Module, args: tuple, out: Any) -> None:
                t = args[0] if which == "input" else out
                if not isinstance(t, Tensor):
                    raise TypeError(f"layer {self.taps[j].layer or 'penultimate'!r} produced a {type(t).__name__}, "
                                    f"not a tensor")
                store[j].append(t)
            return hook

        try:
            for j, (_, module, which) in enumerate(resolved):
                if module is not None:
                    handles.append(module.register_forward_hook(make_hook(j, which)))
            logits = model(x)
        finally:
            for h in handles:
                h.remove()
        feats = []
        for j, (_, module, _) in enumerate(resolved):
            if module is None:
                feats.append(x)
            elif not store[j]:
                raise RuntimeError(f"layer {self.taps[j].layer or 'penultimate'!r} was not called during the forward pass")
            else:
                feats.append(store[j][-1])
        return logits, feats


# --------------------------------------------------------------------------- the base class
class Detector(nn.Module):
    """Base class of adversarial-example detectors (see the module docstring for the contract).

    Subclasses set the class flags and implement ``_fit`` and ``_score``; they override
    ``adaptive_score`` where `_score` is not differentiable (BPDA) and ``config`` to list
    their options.

    Class attributes:
        differentiable: autograd through `score` gives meaningful gradients.
        randomized: `score` samples randomness (the attacker must average: EOT).
        supervised: `fit` uses adversarial examples (given as `x_adv`, or generated).

    Attributes:
        threshold: set by `calibrate` (None before); ``is_adv = score > threshold``.
        fpr: the false-positive rate `calibrate` was asked for.
        scale: the spread of the clean calibration scores (normalizes `margin`).
        fit_hashes: content hashes of every example `fit` saw.
        calibration_hashes: content hashes of the clean data `calibrate` set the threshold on.
    """

    name: ClassVar[str] = "detector"
    differentiable: ClassVar[bool] = True
    randomized: ClassVar[bool] = False
    supervised: ClassVar[bool] = False
    #: examples scored per forward pass when no gradient is needed
    batch_size: int = 512

    def __init__(self) -> None:
        super().__init__()
        self.threshold: float | None = None
        self.fpr: float | None = None
        self.scale: float = 1.0
        self.calibration: dict[str, Any] = {}
        self.fit_hashes: set[str] = set()
        self.calibration_hashes: set[str] = set()
        self.fit_info: dict[str, Any] = {}
        self._fitted = False
        # The classifier is referenced, not registered: the detector's state_dict, `.to()` and
        # `train()` do not touch the model, which is usually saved and moved on its own.
        self.__dict__["_model"] = None

    # ----------------------------------------------------------------------- properties
    @property
    def model(self) -> nn.Module:
        if self.__dict__.get("_model") is None:
            raise NotFittedError(f"detector {self.name!r} is not fitted: call fit(model, x_clean, y_clean) first")
        return self.__dict__["_model"]

    @property
    def fitted(self) -> bool:
        return self._fitted

    @property
    def calibrated(self) -> bool:
        return self.threshold is not None

    # ----------------------------------------------------------------------- fitting
    def fit(self, model: nn.Module, x_clean: Tensor, y_clean: Tensor, x_adv: Tensor | None = None,
            **kwargs: Any) -> "Detector":
        """Fit on clean data (and adversarial data for supervised detectors); returns self.

        Args:
            model: the classifier (any `nn.Module` returning logits), used as is (eval mode).
            x_clean: clean images N×C×H×W in [0, 1] (typically the classifier's training data).
            y_clean: their labels (N,).
            x_adv: adversarial images for supervised detectors (ignored by unsupervised ones);
                generated from `x_clean` by the detector's attack when None.
            **kwargs: detector-specific data (e.g. ``x_density`` for "kde-bu").

        Refitting discards the threshold: calibrate again.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module returning logits, got {type(model).__name__}")
        check_images(x_clean, "x_clean")
        check_labels(y_clean, None, x_clean.shape[0], "y_clean")
        if x_clean.shape[0] < 2:
            raise ValueError(f"`x_clean` must hold at least 2 examples, got {x_clean.shape[0]}")
        if x_adv is not None:
            check_images(x_adv, "x_adv")
            if x_adv.shape[1:] != x_clean.shape[1:]:
                raise ValueError(f"`x_adv` images have shape {tuple(x_adv.shape[1:])}, `x_clean` images "
                                 f"{tuple(x_clean.shape[1:])}; they must match")
        self.__dict__["_model"] = model
        self.threshold, self.fpr, self.calibration = None, None, {}
        self.calibration_hashes = set()
        self.fit_hashes = set(example_hashes(x_clean))
        if x_adv is not None and self.supervised:
            self.fit_hashes |= set(example_hashes(x_adv))
        was_training = model.training
        model.eval()
        try:
            self._fit(model, x_clean, y_clean.to(x_clean.device).long(), x_adv if self.supervised else None, **kwargs)
        finally:
            model.train(was_training)
        self._fitted = True
        self.eval()
        return self

    def _fit(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor | None, **kwargs: Any) -> None:
        raise NotImplementedError

    # ----------------------------------------------------------------------- scoring
    def _check_ready(self, x: Tensor, name: str = "x") -> None:
        if not self._fitted:
            raise NotFittedError(f"detector {self.name!r} is not fitted: call fit(model, x_clean, y_clean) first")
        check_images(x, name)

    def score(self, x: Tensor) -> Tensor:
        """Suspicion scores (N,), higher = more likely adversarial. Differentiable if declared."""
        self._check_ready(x)
        return self._score(x)

    def _score(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def adaptive_score(self, x: Tensor) -> Tensor:
        """The score as an attacker differentiates it: `score`'s forward value with usable
        gradients (BPDA through non-differentiable steps). Equals `score` by default."""
        self._check_ready(x)
        return self._score(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.score(x)

    @torch.no_grad()
    def scores(self, x: Tensor) -> Tensor:
        """`score` without gradients, in batches of `batch_size` (for calibration and evaluation)."""
        self._check_ready(x)
        if x.shape[0] == 0:
            return torch.zeros(0, device=x.device)
        return torch.cat([self._score(x[i:i + self.batch_size]).detach()
                          for i in range(0, x.shape[0], self.batch_size)])

    # ----------------------------------------------------------------------- thresholds
    def calibrate(self, x_clean: Tensor, fpr: float, *, allow_fit_data: bool = False) -> float:
        """Set ``threshold`` for false-positive rate `fpr` on held-out clean data; returns it.

        The threshold is the ⌈(1 − fpr)(n + 1)⌉-th smallest clean score (split-conformal):
        a new clean input is flagged with probability at most `fpr`. `x_clean` must hold at
        least ⌈1/fpr⌉ − 1 examples and none the detector was fit on (unless `allow_fit_data`).
        """
        fpr = check_fpr(fpr)
        if not self._fitted:
            raise NotFittedError(f"detector {self.name!r} is not fitted: call fit(...) before calibrate(...)")
        check_images(x_clean, "x_clean")
        self._refuse_fit_data(x_clean, "x_clean", allow_fit_data)
        s = self.scores(x_clean)
        threshold, k = conformal_threshold(s, fpr, "x_clean")
        spread = robust_spread(s)
        self.threshold, self.fpr, self.scale = threshold, fpr, spread
        self.calibration = {"n": int(s.numel()), "rank": k, "fpr_requested": fpr,
                            "fpr_calibration": float((s > threshold).float().mean()), "scale": spread}
        self.calibration_hashes = set(example_hashes(x_clean))
        return threshold

    def _refuse_fit_data(self, x: Tensor, name: str, allow: bool) -> None:
        if allow or not self.fit_hashes:
            return
        overlap = sum(h in self.fit_hashes for h in example_hashes(x))
        if overlap:
            raise ValueError(f"`{name}` holds {overlap} example(s) the detector was fit on; calibrate and "
                             f"evaluate on held-out clean data (scores on training data are optimistic, so "
                             f"the false-positive rate would exceed the one requested). Pass "
                             f"allow_fit_data=True to override.")

    def _check_calibrated(self) -> float:
        if self.threshold is None:
            raise NotFittedError(f"detector {self.name!r} has no threshold: call calibrate(x_val, fpr) on "
                                 f"held-out clean data first")
        return self.threshold

    @torch.no_grad()
    def detect(self, x: Tensor) -> Detection:
        """``Detection(is_adv = score > threshold, score, info)``; needs `calibrate` first."""
        threshold = self._check_calibrated()
        s = self.scores(x)
        return Detection(s > threshold, s, {"threshold": threshold, "fpr": self.fpr, "detector": self.name})

    # ----------------------------------------------------------------------- attacks
    def margin(self, x: Tensor) -> Tensor:
        """``(adaptive_score − threshold) / scale`` (N,): > 0 exactly when flagged; differentiable."""
        threshold = self._check_calibrated()
        return (self.adaptive_score(x) - threshold) / self.scale

    def adaptive_terms(self, x: Tensor) -> Tensor:
        """Per-component margins (N, m) an attacker must push below 0 *all at once*.

        One column (`margin`) by default; detectors made of several parts (MRR's defenders,
        MagNet's components) return one column per part, so an attack can sum or max them.
        """
        return self.margin(x).unsqueeze(1)

    def adaptive_loss(self, x: Tensor, y: Tensor | None = None, *, kappa: float = 0.0) -> Tensor:
        """What an attacker who knows the detector adds to the loss it minimizes (N,).

        ``max(0, margin(x) + kappa)``: zero once x passes undetected with margin `kappa` (in
        units of the clean scores' spread). Differentiable (through BPDA stand-ins where the
        detector is not). `y` is unused by most detectors (they read the model's prediction).
        """
        return (self.margin(x) + kappa).clamp_min(0.0)

    # ----------------------------------------------------------------------- reports
    def options(self) -> dict[str, Any]:
        """The constructor options (JSON-ready); subclasses extend."""
        return {}

    def config(self) -> dict[str, Any]:
        """JSON-ready description for reports: name, options, declarations, threshold."""
        return {"name": self.name, **self.options(), "differentiable": self.differentiable,
                "randomized": self.randomized, "supervised": self.supervised, "threshold": self.threshold,
                "fpr": self.fpr}

    def declaration(self) -> dict[str, Any]:
        """How this detector must be attacked, for reports and the audit (JSON-ready).

        ``config()`` (name, options, ``differentiable``, ``randomized``, ``supervised``,
        ``threshold``, ``fpr``) plus: ``role`` "detector"; ``calibrated``; ``adaptive_loss``
        (True: it has the hinge an informed attacker adds to its loss); ``adaptive_parts`` (the
        number of margins in `adaptive_terms` that must all go below zero, None before
        calibration); ``bpda`` (the adaptive score differentiates through stand-ins: the
        detector is not differentiable); ``eot`` (randomized: attack the expectation); and
        ``adaptive_attacks``, the registered attacks that use all this.
        """
        parts: int | None = None
        if self.calibrated and self.fitted:
            parts = self._adaptive_parts()
        return {"role": "detector", **self.config(), "calibrated": self.calibrated,
                "adaptive_loss": callable(getattr(self, "adaptive_loss", None)), "adaptive_parts": parts,
                "bpda": not self.differentiable, "eot": bool(self.randomized),
                "adaptive_attacks": ["detector-pgd", "detector-cw"]}

    def _adaptive_parts(self) -> int:
        """The number of columns of `adaptive_terms` (1 unless a subclass says otherwise)."""
        return 1

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options().items())

    # ----------------------------------------------------------------------- persistence hooks
    def init_kwargs(self) -> dict[str, Any]:
        """Constructor arguments (JSON-ready) that rebuild an unfitted twin of this detector.

        By default the entries of `options` that `__init__` takes; subclasses whose options
        are not constructor arguments override it.
        """
        params = inspect.signature(type(self).__init__).parameters
        return {k: v for k, v in self.options().items() if k in params and k != "self"}

    def _extra_state(self) -> dict[str, Any]:
        """Fitted state that is neither a tensor of `state_dict` nor a common attribute (JSON-ready)."""
        return {}

    def _rebuild(self, extra: dict[str, Any], model: nn.Module) -> None:
        """Before loading: create the submodules `fit` creates (with their shapes) and restore `extra`.

        ``fit_info`` is already restored when this runs (shapes recorded there can be read).
        """

    def fitted_state(self) -> dict[str, Any]:
        """Everything about the fit and the threshold except tensors and hashes (JSON-ready)."""
        return {"fitted": self._fitted, "threshold": self.threshold, "fpr": self.fpr, "scale": self.scale,
                "calibration": self.calibration, "fit_info": self.fit_info, "extra": self._extra_state()}

    def restore_fitted_state(self, state: dict[str, Any], model: nn.Module) -> None:
        """Inverse of `fitted_state` on an unfitted twin (`init_kwargs`), attached to `model`."""
        self.__dict__["_model"] = model
        self.fit_info = dict(state.get("fit_info") or {})
        self._rebuild(dict(state.get("extra") or {}), model)
        self.threshold = None if state.get("threshold") is None else float(state["threshold"])
        self.fpr = None if state.get("fpr") is None else float(state["fpr"])
        self.scale = float(state.get("scale", 1.0))
        self.calibration = dict(state.get("calibration") or {})
        self._fitted = bool(state.get("fitted", True))
        self.eval()


# --------------------------------------------------------------------------- helpers
def conformal_threshold(scores: Tensor, fpr: float, name: str = "x_clean") -> tuple[float, int]:
    """(threshold, rank): the ⌈(1 − fpr)(n + 1)⌉-th smallest score, 1-based rank."""
    n = int(scores.numel())
    k = math.ceil((1.0 - fpr) * (n + 1) - 1e-9)
    if k > n:
        need = math.ceil(1.0 / fpr - 1.0 - 1e-9)
        raise ValueError(f"`{name}` holds {n} clean example(s), too few to set a threshold at fpr={fpr:g}: "
                         f"need at least {need}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"the detector gave non-finite scores on `{name}`")
    sorted_s = torch.sort(scores.flatten().double()).values
    return float(sorted_s[k - 1]), k


def robust_spread(scores: Tensor) -> float:
    """A scale of the clean scores: their standard deviation (1.0 if it is 0 or undefined)."""
    s = scores.flatten().double()
    spread = float(s.std()) if s.numel() > 1 else 0.0
    return spread if math.isfinite(spread) and spread > 0 else 1.0


def generate_adversarial(model: nn.Module, x: Tensor, y: Tensor, attack: Any, threat: Any,
                         seed: int | None) -> Tensor:
    """Adversarial examples for a supervised detector's training set (`attack`: a name or an Attack)."""
    from ...attacks import Attack, create_attack

    atk = create_attack(attack) if isinstance(attack, str) else attack
    if not isinstance(atk, Attack):
        raise TypeError(f"`attack` must be an attack name or an Attack, got {type(attack).__name__}")
    out = []
    for i in range(0, x.shape[0], 512):
        out.append(atk(model, x[i:i + 512], y[i:i + 512], threat, seed=seed).x_adv)
    return torch.cat(out)


# --------------------------------------------------------------------------- registry
DETECTORS: Registry[type[Detector]] = Registry("detector")
D = TypeVar("D", bound=type[Detector])


def register_detector(name: str, summary: str | None = None) -> Callable[[D], D]:
    """Class decorator: register a `Detector` subclass under `name` and set its ``name``."""

    def deco(cls: D) -> D:
        if not (isinstance(cls, type) and issubclass(cls, Detector)):
            raise TypeError(f"register_detector({name!r}) must decorate a Detector subclass")
        cls.name = name.lower()
        DETECTORS.register(name, summary)(cls)
        return cls

    return deco


def create_detector(spec: str, **kwargs: Any) -> Detector:
    """Build a detector from ``"name"`` or ``"name:key=value,key=value"`` (values parsed as JSON).

    Example:
        >>> create_detector("mrr:n=16,dim=8")
        >>> create_detector('feature-squeeze:squeezers=["bit-depth:bits=1","median:size=2"]')
    """
    from ..transforms.base import _split_options

    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"`spec` must be a detector name like 'mrr:n=16', got {spec!r}")
    name, _, opts = spec.strip().partition(":")
    for item in filter(None, (s.strip() for s in _split_options(opts))):
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"detector option {item!r} in {spec!r} must be key=value")
        try:
            kwargs[key.strip().replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            kwargs[key.strip().replace("-", "_")] = raw.strip()
    cls = DETECTORS.get(name)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise TypeError(f"bad options for detector {name!r}: {e}") from e


def list_detectors() -> list[str]:
    return DETECTORS.names()
