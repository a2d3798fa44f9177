"""Honest detection metrics: ROC / AUC, TPR at a fixed FPR, the threshold's real false-positive
rate, the system view (detector + classifier), and the perturbation a successful attack needs.

Conventions (stated once, used everywhere):

* **Negatives are clean inputs, positives are adversarial examples.** By default only
  *successful* adversarial examples count as positives: the clean input was classified
  correctly and the perturbed one is not (``only_successful=True``). An unsuccessful attack
  is not an adversarial example, and counting it inflates or deflates a detector's numbers
  for reasons that have nothing to do with detection (weak attacks make detectors look good:
  their failed outputs sit next to the clean inputs, but so do their "successes").
* **The threshold is fixed on clean validation data before any attack is seen.**
  `DetectionEval(detector, threshold_from=x_val, fpr=...)` calibrates once, at construction;
  `evaluate` refuses validation examples among the test data, examples the detector was fit
  on (content hashes recorded by `Detector.fit`: this is what keeps the supervised "kde-bu"
  and "metzen" from being scored on their own training data), and a detector whose threshold
  changed since (recalibrated on test data).
* **System view** per attacked example: *defense success* = detected OR still correctly
  classified; *attack success* = undetected AND misclassified (the two are complements).
* **Distortion**: the median L2 of the attack's successful perturbations against the defended
  system divided by the median L2 the same attack needs against the undefended model (MRR
  article, Table 2: 1.00 means the detector costs the attacker nothing).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._checks import check_images, check_labels

__all__ = ["DetectionEval", "DetectionReport", "adaptive_counterpart", "evaluate_detector", "normalized_distortion",
           "roc", "roc_auc", "system_view", "tpr_at_fpr"]

SCHEMA = "bastion-detection-report/1"

log = logging.getLogger("bastion.detection")


def _np(scores: Any, name: str) -> np.ndarray:
    if isinstance(scores, Tensor):
        scores = scores.detach().cpu().double().numpy()
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"`{name}` must be a 1-D array of scores, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"`{name}` contains non-finite scores")
    return arr


def _both(clean: Any, adv: Any) -> tuple[np.ndarray, np.ndarray]:
    c, a = _np(clean, "clean_scores"), _np(adv, "adv_scores")
    if c.size == 0 or a.size == 0:
        raise ValueError(f"ROC needs clean and adversarial scores; got {c.size} clean and {a.size} adversarial")
    y = np.concatenate([np.zeros(c.size), np.ones(a.size)])
    return y, np.concatenate([c, a])


def roc_auc(clean_scores: Any, adv_scores: Any) -> float:
    """Area under the ROC curve, clean = negatives, adversarial = positives (scikit-learn)."""
    from sklearn.metrics import roc_auc_score

    y, s = _both(clean_scores, adv_scores)
    return float(roc_auc_score(y, s))


def roc(clean_scores: Any, adv_scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of the ROC curve (scikit-learn's `roc_curve`)."""
    from sklearn.metrics import roc_curve

    y, s = _both(clean_scores, adv_scores)
    fpr, tpr, thr = roc_curve(y, s)
    return fpr, tpr, thr


def tpr_at_fpr(clean_scores: Any, adv_scores: Any, fpr: float) -> float:
    """The best true-positive rate among ROC points whose false-positive rate is ≤ `fpr`.

    Measured on the data given (both rates on the same test set): a *curve* summary, not the
    rate at a threshold fixed beforehand (that is `DetectionReport.detection_rate`).
    """
    if not (0.0 <= fpr <= 1.0):
        raise ValueError(f"`fpr` must be in [0, 1], got {fpr!r}")
    f, t, _ = roc(clean_scores, adv_scores)
    ok = f <= fpr + 1e-12
    return float(t[ok].max()) if ok.any() else 0.0


def system_view(detected: Tensor, correct: Tensor) -> dict[str, float]:
    """Defense and attack success rates of detector + classifier on attacked examples.

    Args:
        detected: bool (N,), the detector flagged the attacked input.
        correct: bool (N,), the classifier still predicts the true label on it.

    Returns:
        ``{"defense_success": mean(detected | correct), "attack_success": mean(~detected & ~correct),
        "detected": mean(detected), "correct": mean(correct)}`` (NaN for an empty batch).
    """
    detected, correct = detected.bool().flatten(), correct.bool().flatten().to(detected.device)
    if detected.shape != correct.shape:
        raise ValueError(f"`detected` and `correct` must have the same length, got {detected.numel()} and "
                         f"{correct.numel()}")
    if detected.numel() == 0:
        return {"defense_success": math.nan, "attack_success": math.nan, "detected": math.nan, "correct": math.nan}
    return {"defense_success": float((detected | correct).float().mean()),
            "attack_success": float((~detected & ~correct).float().mean()),
            "detected": float(detected.float().mean()), "correct": float(correct.float().mean())}


def normalized_distortion(l2_defended: Any, l2_undefended: Any) -> float:
    """median(L2 of successful attacks on the defended system) / median(L2 against the bare model).

    NaN when either side has no successful example.
    """
    a, b = _np(l2_defended, "l2_defended"), _np(l2_undefended, "l2_undefended")
    if a.size == 0 or b.size == 0:
        return math.nan
    ref = float(np.median(b))
    return float(np.median(a)) / ref if ref > 0 else math.nan


# ============================================================================================
# The report
# ============================================================================================

def _clean_json(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _clean_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean_json(x) for x in v]
    return v


@dataclass
class DetectionReport:
    """One detector against one attack: detection quality and the system view.

    Rates are fractions in [0, 1]; a field is None (JSON null) where it is undefined (e.g. the
    AUC when the attack produced no successful adversarial example).
    """

    detector: dict[str, Any]
    attack: Any
    n_clean: int
    n_attacked: int
    n_positive: int
    only_successful: bool
    auc: float | None
    roc_fpr: list[float]
    roc_tpr: list[float]
    tpr_at_fpr: dict[str, float]
    threshold: float
    fpr_requested: float
    fpr_validation: float
    fpr_test: float
    detection_rate: float | None
    clean_accuracy: float
    defense_success: float | None
    attack_success: float | None
    l2_median: float | None = None
    l2_reference_median: float | None = None
    l2_normalized: float | None = None
    notes: list[str] = field(default_factory=list)
    schema: str = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return _clean_json(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DetectionReport":
        if d.get("schema", SCHEMA) != SCHEMA:
            raise ValueError(f"not a detection report of schema {SCHEMA!r}: {d.get('schema')!r}")
        names = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown detection-report field(s): {', '.join(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "DetectionReport":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "DetectionReport":
        return cls.from_json(Path(path).read_text())

    def summary(self) -> str:
        f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        attack = self.attack if isinstance(self.attack, str) else (self.attack or {}).get("name")
        return (f"{self.detector.get('name')} vs {attack}: "
                f"AUC {f(self.auc)} on {self.n_positive} adversarial / {self.n_clean} clean; at FPR "
                f"{self.fpr_requested:.3g} (test {self.fpr_test:.3f}) detects {f(self.detection_rate)}; "
                f"defense success {f(self.defense_success)}, attack success {f(self.attack_success)}")


# ============================================================================================
# The evaluation
# ============================================================================================

class DetectionEval:
    """Evaluate a detector with its threshold fixed on clean validation data *before* any attack.

    Args:
        detector: a fitted `bastion.defenses.detectors.Detector`.
        threshold_from: clean validation images, disjoint from the detector's fit data and from
            the test data given to `evaluate`; the detector is calibrated on them at `fpr`. None:
            keep the threshold the detector already has (calibrated earlier, or loaded with
            `load_detector`); the test data must then be disjoint from the data it was
            calibrated on (``detector.calibration_hashes``).
        fpr: the false-positive budget on clean data (MRR's security parameter). Default 0.05
            with `threshold_from`; without it, the detector's own (a different value is refused).
        fprs: the rates at which the report lists TPR at FPR. Default (0.01, 0.05, 0.1).

    Example:
        >>> ev = DetectionEval(det, threshold_from=x_val, fpr=0.05)
        >>> res = PGD()(model, x_test, y_test, "linf:0.1")
        >>> report = ev.evaluate(x_test, y_test, res.x_adv, attack=PGD().config())
    """

    def __init__(self, detector: nn.Module, threshold_from: Tensor | None, fpr: float | None = None,
                 fprs: tuple[float, ...] = (0.01, 0.05, 0.1)) -> None:
        from ..defenses.detectors.base import Detector, NotFittedError, example_hashes

        if not isinstance(detector, Detector):
            raise TypeError(f"`detector` must be a bastion Detector, got {type(detector).__name__}")
        self.detector = detector
        if threshold_from is not None:
            check_images(threshold_from, "threshold_from")
            self.threshold = detector.calibrate(threshold_from, 0.05 if fpr is None else fpr)
            self._val_hashes = set(example_hashes(threshold_from))
        else:
            if not detector.calibrated:
                raise NotFittedError(f"detector {detector.name!r} has no threshold: pass `threshold_from` (clean "
                                     f"validation images) or calibrate it first")
            if fpr is not None and abs(float(fpr) - float(detector.fpr)) > 1e-12:
                raise ValueError(f"`fpr` {fpr!r} differs from the rate the detector was calibrated at "
                                 f"({detector.fpr!r}); pass `threshold_from` to recalibrate")
            self.threshold = float(detector.threshold)
            self._val_hashes = set(detector.calibration_hashes)
        self.fpr = float(detector.fpr)
        self.fprs = tuple(float(f) for f in fprs)
        self.fpr_validation = float(detector.calibration.get("fpr_calibration", math.nan))

    def _check_data(self, x: Tensor, name: str) -> None:
        from ..defenses.detectors.base import example_hashes

        hs = example_hashes(x)
        fit = sum(h in self.detector.fit_hashes for h in hs)
        if fit:
            raise ValueError(f"`{name}` holds {fit} example(s) the detector was fit on; evaluate on held-out "
                             f"data (a detector scored on its own training data reports optimistic numbers)")
        val = sum(h in self._val_hashes for h in hs)
        if val:
            raise ValueError(f"`{name}` holds {val} example(s) of the validation data the threshold was set on "
                             f"(`threshold_from`, or the detector's calibration data); the test data must be "
                             f"disjoint from it")

    @torch.no_grad()
    def evaluate(self, x_clean: Tensor, y_clean: Tensor, x_adv: Tensor, *, success: Tensor | None = None,
                 only_successful: bool = True, attack: Any = None,
                 l2_reference: Tensor | None = None) -> DetectionReport:
        """Score clean test images and their adversarial versions; return a `DetectionReport`.

        Args:
            x_clean, y_clean: clean test images and labels (N).
            x_adv: the attack's outputs for them (N, paired with `x_clean`).
            success: the attack's own success flags (N,) (e.g. `AttackResult.success` of a
                targeted attack); default: the classifier's prediction on `x_adv` ≠ `y_clean`.
            only_successful: positives = successful adversarial examples of correctly
                classified clean inputs (the honest default); False: every `x_adv`.
            attack: a description of the attack for the report (its config dict or a name).
            l2_reference: L2 norms of the *same attack's* successful examples against the
                undefended model, for the normalized distortion.
        """
        det = self.detector
        if det.threshold != self.threshold:
            raise RuntimeError("the detector's threshold changed after DetectionEval fixed it on the validation "
                               "data (was it recalibrated?); build a new DetectionEval")
        check_images(x_clean, "x_clean")
        check_images(x_adv, "x_adv")
        check_labels(y_clean, None, x_clean.shape[0], "y_clean")
        if x_adv.shape != x_clean.shape:
            raise ValueError(f"`x_adv` must be paired with `x_clean` (same shape), got {tuple(x_adv.shape)} "
                             f"and {tuple(x_clean.shape)}")
        self._check_data(x_clean, "x_clean")
        self._check_data(x_adv, "x_adv")  # e.g. the adversarial examples a supervised detector was trained on
        model = det.model
        y = y_clean.to(x_clean.device).long()
        pred_clean = _predict(model, x_clean)
        pred_adv = _predict(model, x_adv)
        clean_ok = pred_clean == y
        adv_wrong = pred_adv != y if success is None else success.to(y.device).bool()
        if success is not None and success.shape != y.shape:
            raise ValueError(f"`success` must have shape ({y.numel()},), got {tuple(success.shape)}")
        s_clean = det.scores(x_clean)
        s_adv = det.scores(x_adv)
        positive = (clean_ok & adv_wrong) if only_successful else torch.ones_like(clean_ok)
        notes = []
        pos_scores = s_adv[positive]
        auc, f_curve, t_curve, tprs = None, [], [], {}
        if pos_scores.numel() and s_clean.numel():
            auc = roc_auc(s_clean, pos_scores)
            f, t, _ = roc(s_clean, pos_scores)
            keep = _thin(len(f), 200)
            f_curve, t_curve = [float(v) for v in f[keep]], [float(v) for v in t[keep]]
            tprs = {f"{p:g}": tpr_at_fpr(s_clean, pos_scores, p) for p in self.fprs}
        else:
            notes.append("no successful adversarial example: AUC and detection rate undefined")
        flagged_adv = s_adv > self.threshold
        sv = system_view(flagged_adv, pred_adv == y)
        l2 = (x_adv - x_clean).flatten(1).norm(dim=1)
        broke = (~flagged_adv & (pred_adv != y) & clean_ok)
        l2_med = float(l2[broke].median()) if bool(broke.any()) else None
        l2_ref_med, l2_norm = None, None
        if l2_reference is not None and l2_reference.numel():
            l2_ref_med = float(l2_reference.double().median())
            if l2_med is not None:
                l2_norm = normalized_distortion(l2[broke], l2_reference)
        return DetectionReport(
            detector=det.config(), attack=attack, n_clean=int(x_clean.shape[0]), n_attacked=int(x_adv.shape[0]),
            n_positive=int(positive.sum()), only_successful=bool(only_successful), auc=auc,
            roc_fpr=f_curve, roc_tpr=t_curve, tpr_at_fpr=tprs, threshold=float(self.threshold),
            fpr_requested=self.fpr, fpr_validation=self.fpr_validation,
            fpr_test=float((s_clean > self.threshold).float().mean()),
            detection_rate=float(flagged_adv[positive].float().mean()) if bool(positive.any()) else None,
            clean_accuracy=float(clean_ok.float().mean()), defense_success=sv["defense_success"],
            attack_success=sv["attack_success"], l2_median=l2_med, l2_reference_median=l2_ref_med,
            l2_normalized=l2_norm, notes=notes)


# ============================================================================================
# A detector against a list of attacks
# ============================================================================================

#: C&W hyper-parameters an adaptive C&W copies from the plain C&W it stands for
_CW_FIELDS = ("binary_search_steps", "max_iterations", "initial_const", "learning_rate", "kappa", "abort_early")


def _as_attack(item: Any, detector: Any) -> Any:
    """An `Attack` from a name, a ``(name, kwargs)`` pair or an instance; detector-aware ones get `detector`."""
    from ..attacks import Attack, create_attack

    if isinstance(item, Attack):
        return item
    if isinstance(item, str):
        name, kwargs = item, {}
    elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], dict):
        name, kwargs = item[0], dict(item[1])
    else:
        raise TypeError(f"`attacks` items must be attack names, (name, kwargs) pairs or Attack instances, got {item!r}")
    if name.lower().startswith("detector-"):
        kwargs.setdefault("detector", detector)
    return create_attack(name.lower(), **kwargs)


def _threat_for(attack: Any, threat: Any) -> Any:
    """The threat an attack runs under: `threat`; minimum-norm attacks run unbounded (None) unless it fits them."""
    from ..threat import ThreatModel

    t = ThreatModel.parse(threat) if isinstance(threat, str) else threat
    if attack.minimum_norm:
        return t if t is not None and t.norm.value in attack.supports_norms else None
    if t is None:
        raise ValueError(f"attack {attack.name!r} needs a threat model (e.g. 'linf:0.3'): pass `threat` (the CLI's "
                         f"--threat); minimum-norm attacks (cw, deepfool, jsma) run without one")
    return t


def adaptive_counterpart(attack: Any, detector: Any, options: dict[str, dict[str, Any]] | None = None) -> Any:
    """The white-box attack on classifier + `detector` that stands for `attack` (None if it already is one).

    * a minimum-norm attack (C&W, DeepFool, JSMA, L-BFGS) → ``detector-cw`` (C&W L2 with the
      detector's margins in the loss, every part at once: ``combine="sum"``), with a plain C&W's
      hyper-parameters copied so the normalized distortion compares like with like;
    * a bounded attack (FGSM, BIM, PGD, ...) → ``detector-pgd`` at the same threat (40 steps,
      or the attack's own ``steps`` when it has more).

    `options` (``{"detector-pgd": {...}, "detector-cw": {...}}``) override those settings.
    """
    from ..attacks.detector_aware import DetectorAwareCW, DetectorAwarePGD

    if isinstance(attack, (DetectorAwareCW, DetectorAwarePGD)):
        return None
    options = options or {}
    if attack.minimum_norm:
        kw: dict[str, Any] = {"combine": "sum"}
        if attack.name == "cw":
            kw.update({f: getattr(attack, f) for f in _CW_FIELDS if hasattr(attack, f)})
        kw.update(options.get("detector-cw", {}))
        return DetectorAwareCW(detector=detector, **kw)
    kw = {"steps": max(40, int(getattr(attack, "steps", 0) or 0))}
    kw.update(options.get("detector-pgd", {}))
    return DetectorAwarePGD(detector=detector, **kw)


def _run(attack: Any, model: nn.Module, x: Tensor, y: Tensor, threat: Any, seed: int, batch_size: int
         ) -> tuple[Tensor, Tensor, Tensor]:
    """(x_adv, success, l2) over batches; each batch seeded alike (per-example RNG: batching does not matter)."""
    xs, ss, ls = [], [], []
    for i in range(0, x.shape[0], batch_size):
        r = attack(model, x[i:i + batch_size], y[i:i + batch_size], threat, seed=seed)
        xs.append(r.x_adv)
        ss.append(r.success)
        ls.append(r.norms["l2"])
    return torch.cat(xs), torch.cat(ss), torch.cat(ls)


def evaluate_detector(detector: nn.Module, x: Tensor, y: Tensor, attacks: Sequence[Any], threat: Any = None, *,
                      adaptive: bool = False, threshold_from: Tensor | None = None, fpr: float | None = None,
                      adaptive_options: dict[str, dict[str, Any]] | None = None, seed: int = 0,
                      batch_size: int = 250, fprs: tuple[float, ...] = (0.01, 0.05, 0.1)) -> list[DetectionReport]:
    """A detector against a list of attacks: one `DetectionReport` per attack (and adaptive counterpart).

    Each attack is crafted against the *bare* classifier (``detector.model``): the detector is
    unknown to it (the setting of most detection papers, and of the MRR article's Table 1).
    With ``adaptive=True`` each attack is followed by its white-box counterpart
    (`adaptive_counterpart`: detector-pgd / detector-cw, which know the detector's threshold
    and margins and must fool classifier and detector at once); identical counterparts run
    once. An attack given as ``detector-pgd`` / ``detector-cw`` is adaptive by itself and gets
    the detector. The naive rows stay beside the adaptive ones, never instead of them.

    Args:
        detector: a fitted `Detector`.
        x, y: clean test images and labels (disjoint from the fit and calibration data).
        attacks: names (``"fgsm"``), ``(name, kwargs)`` pairs or `Attack` instances.
        threat: the threat of bounded attacks (``"linf:0.3"``); minimum-norm attacks ignore a
            threat of another norm and run unbounded.
        adaptive: add the adaptive counterparts.
        threshold_from, fpr: as `DetectionEval` (None: the detector's own threshold).
        adaptive_options: settings of the counterparts, ``{"detector-cw": {"max_iterations": 200}}``.
        seed: the attacks' seed.
        batch_size: examples per attack call.
        fprs: rates at which each report lists TPR at FPR.

    Returns:
        reports in order; ``report.attack`` is the attack's config plus ``label`` and
        ``adaptive``. The L2 distortion of a detector-cw row is normalized by the same C&W
        optimizer, same settings, without the detector term, run on the bare classifier (one
        extra run per setting): the MRR article's "normalized distortion".
    """
    from ..attacks.detector_aware import DetectorAwareCW

    ev = DetectionEval(detector, threshold_from, fpr, fprs)
    model = detector.model
    x = x.detach()
    y = y.to(x.device).long()
    plan: list[tuple[str, Any, bool]] = []
    seen: set[str] = set()
    for item in attacks:
        atk = _as_attack(item, detector)
        is_adaptive = isinstance(getattr(atk, "detector", None), nn.Module)
        plan.append((atk.name, atk, is_adaptive))
        if adaptive and not is_adaptive:
            counter = adaptive_counterpart(atk, detector, adaptive_options)
            key = json.dumps({k: v for k, v in counter.config().items() if k != "detector"}, sort_keys=True,
                             default=str) + str(_threat_for(counter, threat))
            if key not in seen:
                seen.add(key)
                plan.append((f"{counter.name} (adaptive, for {atk.name})", counter, True))
    if not plan:
        raise ValueError("`attacks` is empty: name at least one attack")
    for _, atk, _ in plan:  # fail on a missing threat before any attack runs
        _threat_for(atk, threat)
    reports: list[DetectionReport] = []
    cw_l2: dict[str, Tensor] = {}  # successful L2 norms of detector-cw without a detector, by settings
    for label, atk, is_adaptive in plan:
        t = _threat_for(atk, threat)
        x_adv, success, l2 = _run(atk, model, x, y, t, seed, batch_size)
        ref = None
        if isinstance(atk, DetectorAwareCW) and atk.detector is not None:
            # the reference is the very same optimizer without the detector term, on the bare model
            key = json.dumps({f: getattr(atk, f) for f in _CW_FIELDS}, sort_keys=True)
            if key not in cw_l2:
                plain = DetectorAwareCW(**{f: getattr(atk, f) for f in _CW_FIELDS})
                _, ok, l2p = _run(plain, model, x, y, None, seed, batch_size)
                cw_l2[key] = l2p[ok]
            ref = cw_l2[key]
        cfg = {"label": label, "adaptive": is_adaptive, "threat": None if t is None else str(t), **atk.config()}
        rep = ev.evaluate(x, y, x_adv, attack=cfg, l2_reference=ref)
        log.info("%s", rep.summary())
        reports.append(rep)
    return reports


def _predict(model: nn.Module, x: Tensor, batch: int = 512) -> Tensor:
    was = model.training
    model.eval()
    try:
        return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, x.shape[0], batch)]) \
            if x.shape[0] else torch.zeros(0, dtype=torch.long, device=x.device)
    finally:
        model.train(was)


def _thin(n: int, most: int) -> np.ndarray:
    """Indices of at most `most` points of a curve of n, keeping both ends."""
    if n <= most:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, most).round().astype(int))
