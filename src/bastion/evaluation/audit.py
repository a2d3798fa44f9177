"""`audit`: attack a defense the way an adversary who knows it would, and look for gradient masking.

An audit answers one question — how robust is this defense really? — with the evidence a
reviewer asks for (Athalye, Carlini & Wagner 2018, "Obfuscated Gradients Give a False Sense of
Security", ICML, https://arxiv.org/abs/1802.00420; Carlini et al. 2019, "On Evaluating
Adversarial Robustness", https://arxiv.org/abs/1902.06705):

1. **clean accuracy** (and the detector's false-positive rate on clean inputs, if there is one);
2. the **naive suite**: FGSM, PGD (and APGD) straight through the pipeline, as most papers did;
3. the **adaptive suite**, built from the components' declarations (`adaptive_plan`): BPDA
   through every non-differentiable component (its declared `bpda` stand-in), EOT over many
   draws for every randomized one, the detector's `adaptive_loss` where there is a detector —
   every choice recorded as a sentence in the report; robust accuracy is the worst case per
   example over *every* attack run at the threat;
4. the **obfuscated-gradient checks** of Athalye et al. §3.1 — one-step attacks beat iterative
   ones; black-box (Square) beats white-box; an unbounded attack does not reach ~100% success;
   random sampling in the ball finds what the gradient attack missed; a larger eps does not
   raise success — plus the fraction of exactly-zero input gradients and whether two forward
   passes differ, each with its numbers and a pass / warning status;
5. a **security curve** (accuracy vs eps, naive beside adaptive), **convergence** evidence
   (accuracy vs PGD steps and vs restarts; still falling at the end is flagged) and Madry et
   al.'s histogram of final losses over random PGD starts (Madry et al. 2018, Fig. 1,
   https://arxiv.org/abs/1706.06083);
6. a one-line **verdict**.

Randomized defenses. Attacks differentiate EOT(view, n) (the mean logits of n draws), but a
randomized defense's prediction is itself a random variable, so the audit judges every point —
clean or attacked — with ``passes`` independent forward passes and counts it as correct only
if **every** pass is right (misclassified-and-undetected on any pass is a success of the
attacker). A lucky draw therefore never counts as robust; clean accuracy follows the same rule
(its one-pass mean is reported beside it).

Detectors. An example counts as robust when no attack produced an input that is misclassified
*and* not flagged by the detector (the system view). The naive suite ignores the detector; the
adaptive suite adds detector-aware PGD (`bastion.attacks.detector_aware`). The gradient checks
(unbounded attack, zero gradients) look at the classifier alone.

Costs are bounded by ``n`` (the suites) and the budget: the checks, curves and convergence runs
use a spread subset of ``budget.check_n`` examples (`AuditBudget`).

Example (the digits TinyCNN of the tests; ``pytest tests/test_audit.py -k masked -s`` prints it):
    >>> from bastion.defenses.pipeline import Defended
    >>> from bastion.defenses.transforms import create_transform
    >>> report = audit(Defended([create_transform("bit-depth:bits=1")], model), (x_test, y_test), "linf:0.2", n=100)
    >>> print(report.verdict)
    naive 87.0% → adaptive 39.0%: this defense relies on obfuscated gradients (BPDA through bit-depth broke it);
    robust accuracy 30.0% at L∞ 0.2 under the adaptive suite
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._rng import ExampleRNG
from ..attacks.adaptive import EOT
from ..attacks.base import Attack, attack_mode, create_attack
from ..attacks.losses import margin
from ..threat import Norm, ThreatModel
from .audit_report import AuditReport, Check, encode_examples, format_threat
from .evaluate import _as_tensors, _jsonable, attack_config, model_digest

__all__ = ["BUDGETS", "AdaptivePlan", "AuditBudget", "AuditReport", "adaptive_plan", "audit"]

log = logging.getLogger("bastion.audit")

# The checks that speak about gradient masking (convergence speaks about the attack's budget).
MASKING_CHECKS = ("one_step_vs_iterative", "black_box_vs_white_box", "unbounded_attack", "random_sampling",
                  "eps_increase", "zero_gradients", "randomness")

CHECK_ORDER = ("naive_vs_adaptive", "one_step_vs_iterative", "black_box_vs_white_box", "unbounded_attack",
               "random_sampling", "eps_increase", "zero_gradients", "convergence", "loss_histogram", "randomness")


# ============================================================================================
# Budgets
# ============================================================================================

@dataclass(frozen=True)
class AuditBudget:
    """How much an audit may spend. The suites run on all ``n`` examples; everything else on
    a spread subset of ``check_n`` of them.

    Attributes:
        name: "quick", "standard" or your own.
        steps: PGD steps in both suites (the step size is 2.5·eps/steps).
        apgd_steps: APGD-CE steps in both suites (0: no APGD).
        apgd_t_steps: APGD-T steps in the adaptive suite (0: none); ``apgd_t_targets`` target classes.
        square_queries: queries of the black-box Square attack (check subset).
        check_n: examples the checks, curves and convergence runs use (at most ``n``).
        random_samples: random points of the eps-ball per example (random-sampling check).
        unbounded_steps: steps of the unbounded attack (from x, margin loss).
        curve: eps multipliers of the security curve (1.0 is the threat itself).
        conv_steps: PGD steps of the convergence sweep (its last two points are compared).
        conv_restarts: restarts of the convergence sweep (accuracy after 1..conv_restarts).
        hist_examples, hist_starts: Madry's loss histogram: examples × random PGD starts.
        eot: draws per gradient for randomized defenses (EOT).
        passes: forward passes that judge a randomized defense's prediction.
        detector_lams: λ values of detector-aware PGD (one attack per value).
    """

    name: str
    steps: int = 20
    apgd_steps: int = 0
    apgd_t_steps: int = 0
    apgd_t_targets: int = 3
    square_queries: int = 200
    check_n: int = 100
    random_samples: int = 20
    unbounded_steps: int = 20
    curve: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    conv_steps: tuple[int, ...] = (5, 10, 20, 40)
    conv_restarts: int = 4
    hist_examples: int = 8
    hist_starts: int = 8
    eot: int = 8
    passes: int = 4
    detector_lams: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        for name in ("steps", "square_queries", "check_n", "random_samples", "unbounded_steps", "conv_restarts",
                     "hist_examples", "hist_starts", "eot", "passes", "apgd_t_targets"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"budget `{name}` must be a positive int, got {v!r}")
        for name in ("apgd_steps", "apgd_t_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"budget `{name}` must be an int >= 0, got {v!r}")
        bad_curve = any(isinstance(m, bool) or not isinstance(m, (int, float)) or m <= 0 for m in self.curve)
        if not self.curve or bad_curve or 1.0 not in self.curve:
            raise ValueError(f"budget `curve` must be positive eps multipliers including 1.0, got {self.curve!r}")
        bad_steps = any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.conv_steps)
        if len(self.conv_steps) < 2 or bad_steps:
            raise ValueError(f"budget `conv_steps` must be at least two positive step counts, got {self.conv_steps!r}")
        if not self.detector_lams or any(not (isinstance(v, (int, float)) and v >= 0) for v in self.detector_lams):
            raise ValueError(f"budget `detector_lams` must be non-negative numbers, got {self.detector_lams!r}")


BUDGETS: dict[str, AuditBudget] = {
    # a first look: PGD-20 suites, Square-200, checks on 100 examples
    "quick": AuditBudget("quick"),
    # AutoAttack-like strength: PGD-50, APGD-CE-100, APGD-T-100 (3 targets), Square-1000 on 500
    "standard": AuditBudget("standard", steps=50, apgd_steps=100, apgd_t_steps=100, square_queries=1000, check_n=500,
                            random_samples=100, unbounded_steps=100, curve=(0.25, 0.5, 1.0, 2.0, 4.0),
                            conv_steps=(10, 25, 50, 100, 200), conv_restarts=5, hist_examples=32, hist_starts=20,
                            eot=32, passes=10, detector_lams=(1.0, 4.0)),
}


def _budget(budget: str | AuditBudget) -> AuditBudget:
    if isinstance(budget, AuditBudget):
        return budget
    if isinstance(budget, str) and budget.lower() in BUDGETS:
        return BUDGETS[budget.lower()]
    raise ValueError(f"`budget` must be one of {', '.join(map(repr, BUDGETS))} or an AuditBudget, got {budget!r}")


# ============================================================================================
# The adaptive attack, from the declarations
# ============================================================================================

def _name(m: nn.Module) -> str:
    n = getattr(m, "name", None)
    return n if isinstance(n, str) and n else type(m).__name__


def _is_output_hardening(m: nn.Module) -> bool:
    from ..defenses.output import OutputHardening

    return isinstance(m, OutputHardening)


def _non_differentiable(m: nn.Module) -> bool:
    return getattr(m, "differentiable", True) is False


def _randomized(m: nn.Module) -> bool:
    return getattr(m, "randomized", False) is True


def _outermost(root: nn.Module, pred: Callable[[nn.Module], bool],
               skip_root: bool = False) -> list[tuple[str, nn.Module]]:
    """Submodules of `root` satisfying `pred`, none inside another one chosen (pre-order)."""
    chosen: list[tuple[str, nn.Module]] = []
    for path, m in root.named_modules():
        if skip_root and m is root:
            continue
        if any(p == "" or path == p or path.startswith(p + ".") for p, _ in chosen):
            continue
        if pred(m):
            chosen.append((path, m))
    return chosen


def _stand_in(m: nn.Module) -> str | None:
    """How the backward pass treats a non-differentiable module (None: no stand-in at all)."""
    from ..defenses.transforms.base import Transform

    if _is_output_hardening(m):
        return "the logits underneath"
    bpda = getattr(type(m), "bpda", None)
    if not callable(bpda):
        return None
    if bpda is Transform.bpda:
        return "identity"
    cfg = m.config() if callable(getattr(m, "config", None)) else None
    if isinstance(cfg, dict) and isinstance(cfg.get("bpda"), str):
        return "identity" if cfg["bpda"] == "identity" else f"{cfg['bpda']} stand-in"
    doc = (bpda.__doc__ or "").strip().split("\n")[0].rstrip(".")
    return f"{type(m).__name__}.bpda" + (f": {doc[0].lower() + doc[1:]}" if doc else "")


def _straight_through_hook(module: nn.Module, args: tuple, out: Any) -> Any:
    """Forward hook: the module's real output, with the gradient of its `bpda` stand-in."""
    if not torch.is_grad_enabled() or not isinstance(out, Tensor) or not args or not isinstance(args[0], Tensor):
        return None
    x = args[0]
    if not x.requires_grad:
        return None
    if _is_output_hardening(module):
        return x  # attack the logits the output hides (as `Defended.adaptive_view` does)
    bpda = getattr(module, "bpda", None)
    if callable(bpda):
        approx = bpda(x)
    elif x.shape == out.shape:
        approx = x  # nothing declared: the straight-through (identity) estimator
    else:
        return None
    return approx + (out - approx).detach()


class _StraightThrough(nn.Module):
    """`inner` with BPDA through the given (nested) non-differentiable modules, via forward hooks
    that exist only while this module runs (the naive pipeline is never changed)."""

    differentiable = True

    def __init__(self, inner: nn.Module, targets: Sequence[nn.Module]) -> None:
        super().__init__()
        self.inner = inner
        self.__dict__["_targets"] = list(targets)  # already submodules of `inner`: not registered twice

    @property
    def randomized(self) -> bool:
        return any(_randomized(m) for m in self.inner.modules())

    def forward(self, x: Tensor) -> Tensor:
        handles = [m.register_forward_hook(_straight_through_hook) for m in self.__dict__["_targets"]]
        try:
            return self.inner(x)
        finally:
            for h in handles:
                h.remove()


@dataclass
class AdaptivePlan:
    """How an informed attacker attacks a defense, read from its declarations.

    Attributes:
        naive: the real pipeline (what the naive suite attacks and what judges every point).
        model: what the adaptive attacks differentiate: BPDA through non-differentiable
            components, output hardening skipped, wrapped in EOT when randomized.
        detector: the detector (None if none).
        choices: one sentence per decision ("jpeg: not differentiable → BPDA (identity)").
        techniques: the short names of what was needed ("BPDA through jpeg", "EOT over 8 draws").
        declarations: what each component declares.
        randomized: declared or observed randomness in the classifier's path.
        eot: EOT draws per gradient (None when deterministic).
        passes: forward passes that judge a prediction.
        same_as_naive: nothing to adapt to: naive and adaptive attacks coincide.
        probe: what the randomness probe measured (None when not probed).
    """

    naive: nn.Module
    model: nn.Module
    detector: Any
    choices: list[str]
    techniques: list[str]
    declarations: list[dict[str, Any]]
    randomized: bool
    eot: int | None
    passes: int
    same_as_naive: bool
    probe: dict[str, Any] | None = None
    random_parts: list[str] = field(default_factory=list)

    @property
    def final_rule(self) -> str:
        rule = ("one forward pass per prediction" if self.passes == 1 else
                f"{self.passes} forward passes per prediction; an example counts as correct (clean) or robust "
                "(attacked) only if every pass is right")
        if self.detector is not None:
            rule += "; an attacked example is broken only if misclassified and not flagged by the detector"
        return rule


@torch.no_grad()
def _probe_randomness(target: nn.Module, x: Tensor, detector: Any) -> dict[str, Any]:
    """Two forward passes on the same inputs: do they differ? In one batch ([x; x]) and across calls?"""
    k = x.shape[0]
    with attack_mode(target):
        a = target(torch.cat([x, x]))
        b = target(x)
    rows = (a[:k] - a[k:]).abs().amax().item()
    calls = (a[:k] - b).abs().amax().item()
    scale = max(a.abs().amax().item(), 1e-6)
    tol = 1e-4 * scale + 1e-5  # batch-size-dependent kernels differ in the last bits, randomness does not
    out = {"examples": k, "max_logit_change_in_batch": rows, "max_logit_change_across_calls": calls,
           "observed": bool(rows > tol or calls > tol), "per_example": bool(rows > tol)}
    if detector is not None:
        s1, s2 = detector.scores(x), detector.scores(x)
        out["max_detector_score_change"] = (s1 - s2).abs().amax().item()
        out["detector_observed"] = bool(out["max_detector_score_change"] > 1e-6 * max(s1.abs().amax().item(), 1.0))
    return out


def adaptive_plan(target: nn.Module, *, eot: int = 8, passes: int = 4, probe: Tensor | None = None) -> AdaptivePlan:
    """Build the adaptive attack for `target` from its components' declarations.

    * a component declaring ``differentiable = False`` is attacked through BPDA with its
      ``bpda`` stand-in (`Defended` transforms and model via `Defended.adaptive_view`, nested
      modules of a model by forward hooks); output hardening is skipped (the attacker attacks
      the logits it hides);
    * a component declaring ``randomized = True`` — or randomness observed on `probe` although
      nothing declares it — makes the attacked model ``EOT(view, eot)``, and predictions are
      judged over `passes` forward passes;
    * a detector with ``adaptive_loss`` is attacked with detector-aware PGD.

    Args:
        target: a `bastion.defenses.pipeline.Defended` or any `nn.Module` returning logits.
        eot: draws per gradient for randomized pipelines. (Default: 8)
        passes: forward passes that judge a randomized pipeline's prediction. (Default: 4)
        probe: a few images to check for undeclared randomness (two forward passes). (Default: None)

    Returns:
        an `AdaptivePlan`; ``plan.choices`` says, one sentence per component, what was done.

    Example:
        >>> plan = adaptive_plan(Defended([create_transform("jpeg")], model))
        >>> plan.choices
        ['jpeg: not differentiable → BPDA (identity)', 'classifier (Classifier): differentiable → its own gradient']
    """
    from ..defenses.pipeline import Defended

    if not isinstance(target, nn.Module):
        raise TypeError(f"`target` must be a Defended pipeline or an nn.Module returning logits, "
                        f"got {type(target).__name__}")
    for name, v in (("eot", eot), ("passes", passes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"`{name}` must be a positive int, got {v!r}")
    choices: list[str] = []
    techniques: list[str] = []
    detector = None
    nested: list[tuple[str, nn.Module]] = []
    random_parts: list[str] = []

    def describe_random(label: str) -> None:
        random_parts.append(label)
        choices.append(f"{label}: randomized → EOT over {eot} draws per gradient")

    def describe_nondiff(label: str, m: nn.Module) -> None:
        stand_in = _stand_in(m)
        if _is_output_hardening(m):
            choices.append(f"{label}: hides the logits (not differentiable) → attacked on the logits underneath")
            techniques.append(f"attacking the logits under {_name(m)}")
        elif stand_in is None:
            choices.append(f"{label}: not differentiable and no `bpda` declared → BPDA (identity, where "
                           "shapes allow)")
            techniques.append(f"BPDA through {_name(m)}")
        else:
            choices.append(f"{label}: not differentiable → BPDA ({stand_in})")
            techniques.append(f"BPDA through {_name(m)}")

    if isinstance(target, Defended):
        detector = target.detector
        declarations = target.declarations()
        for t in target.transforms:
            label = _name(t)
            if _non_differentiable(t):
                describe_nondiff(label, t)
            if _randomized(t):
                describe_random(label)
            if not _non_differentiable(t) and not _randomized(t):
                choices.append(f"{label}: differentiable → its own gradient")
        model = target.model
        mlabel = f"classifier ({_name(model)})"
        if _non_differentiable(model):
            if not callable(getattr(model, "bpda", None)):
                raise ValueError(f"the classifier ({_name(model)}) declares differentiable=False but has no `bpda` "
                                 "stand-in; give it one (e.g. its soft path) so that it can be attacked")
            describe_nondiff(mlabel, model)
        nested = _outermost(model, _non_differentiable, skip_root=True)
        for path, m in nested:
            describe_nondiff(f"classifier.{path} ({_name(m)})", m)
        rand_nested = _outermost(model, _randomized)
        for path, m in rand_nested:
            describe_random(f"classifier.{path} ({_name(m)})" if path else mlabel)
        if not _non_differentiable(model) and not nested and not rand_nested:
            choices.append(f"{mlabel}: differentiable → its own gradient")
        if target.output is not None:
            if _non_differentiable(target.output):
                describe_nondiff(f"{_name(target.output)} output", target.output)
            else:
                choices.append(f"{_name(target.output)} output: differentiable → its own gradient")
        base: nn.Module = target.adaptive_view()
        changed = bool(nested) or not target.differentiable or target.output is not None
    else:
        declarations = [{"name": _name(target), "differentiable": not _non_differentiable(target),
                         "randomized": any(_randomized(m) for m in target.modules())}]
        nested = _outermost(target, _non_differentiable)
        for path, m in nested:
            describe_nondiff(f"{path} ({_name(m)})" if path else _name(m), m)
        for path, m in _outermost(target, _randomized):
            describe_random(f"{path} ({_name(m)})" if path else _name(m))
        if not nested and not random_parts:
            choices.append(f"{_name(target)}: differentiable → its own gradient")
        base = target
        changed = bool(nested)
    if nested:
        base = _StraightThrough(base, [m for _, m in nested])

    probed = None
    if probe is not None:
        probed = _probe_randomness(target, probe, detector)
    observed = bool(probed and probed["observed"])
    randomized = bool(random_parts) or observed
    per_example = True if probed is None or not probed["observed"] else probed["per_example"]
    eot_n = None
    if randomized:
        eot_n = eot
        if observed and not random_parts:
            choices.append(f"randomness observed (two forward passes differ) though no component declares it → "
                           f"EOT over {eot} draws per gradient anyway")
        if not per_example:
            choices.append("the randomness is drawn once per forward call (identical rows of one batch agree) → "
                           "EOT draws one forward call per draw")
        choices.append(f"randomized predictions: judged over {passes} forward passes, robust only if right on "
                       "every pass")
        techniques.append(f"EOT over {eot} draws")
        base = EOT(base, n=eot, average="logits", batched=per_example, max_batch_size=8192)
        changed = True
    if detector is not None:
        for attr in ("adaptive_loss", "score", "threshold"):
            if not hasattr(detector, attr):
                raise TypeError(f"the pipeline's detector must be a bastion Detector (with {attr}), got "
                                f"{type(detector).__name__}")
        if getattr(detector, "threshold", None) is None:
            raise ValueError("the pipeline's detector has no threshold: calibrate it on held-out clean data "
                             "(detector.calibrate(x_val, fpr)) before auditing")
        how = ("differentiable" if not _non_differentiable(detector)
               else "not differentiable → through its BPDA stand-ins")
        text = f"{_name(detector)} detector: {how} → detector-aware PGD (loss − λ·adaptive_loss)"
        if _randomized(detector) or bool(probed and probed.get("detector_observed")):
            text += ", its score averaged over 4 draws per step (EOT)"
        choices.append(text)
        techniques.append(f"the {_name(detector)} detector's loss")
        changed = True
    det_random = detector is not None and (_randomized(detector) or bool(probed and probed.get("detector_observed")))
    n_passes = passes if (randomized or det_random) else 1
    return AdaptivePlan(naive=target, model=base, detector=detector, choices=choices, techniques=techniques,
                        declarations=declarations, randomized=randomized, eot=eot_n, passes=n_passes,
                        same_as_naive=not changed, probe=probed, random_parts=random_parts)


# ============================================================================================
# The audit
# ============================================================================================

GRID_POOL = 256  # the example grid picks among the first 256 audited examples: memory does not grow with n


def _tol(n: int) -> float:
    """The smallest accuracy difference a check calls real: 3 examples, and at least 3 points."""
    return max(0.03, 3.0 / max(n, 1))


@dataclass
class _Run:
    """One attack's outcome on every example (full-length CPU tensors; False where not attacked)."""

    label: str
    view: str
    name: str
    config: dict[str, Any]
    eps: float
    scope: str
    attacked: Tensor
    win: Tensor
    wrong: Tensor
    pred: Tensor
    x_adv: Tensor | None  # the first GRID_POOL examples only (attacked rows replaced): the grid's candidates
    time_s: float
    worst_case: bool = True  # counts toward the worst case at the threat

    def summary(self, clean_ok: Tensor, scope_mask: Tensor) -> dict[str, Any]:
        n_scope = int(scope_mask.sum())
        robust = clean_ok & scope_mask & ~self.win
        return {"label": self.label, "view": self.view, "name": self.name, "config": self.config,
                "eps": self.eps, "scope": self.scope, "n_attacked": int(self.attacked.sum()),
                "n_broken": int(self.win.sum()), "accuracy": int(robust.sum()) / n_scope if n_scope else None,
                "time_s": round(self.time_s, 3)}


def _spread(n: int, k: int) -> Tensor:
    """k indices spread evenly over range(n) (every class of a split sorted by class)."""
    k = min(k, n)
    return (torch.arange(k) * n) // k


class _Auditor:
    def __init__(self, target: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, budget: AuditBudget, seed: int,
                 batch_size: int, progress: bool, classes: Sequence[str] | None) -> None:
        self.target, self.x, self.y, self.threat, self.b = target, x, y, threat, budget
        self.seed, self.batch_size, self.classes = seed, batch_size, classes
        self.n = int(y.shape[0])
        self.runs: list[_Run] = []
        self.checks: list[Check] = []
        self.notes: list[str] = []
        self.progress = progress
        self.bar: Any = None

    # ------------------------------------------------------------------ helpers
    def _seed(self, tag: str) -> int:
        return (self.seed + zlib.crc32(tag.encode())) % (2**62)

    def _stage(self, text: str) -> None:
        log.info("audit: %s", text)
        if self.bar is not None:
            self.bar.set_description(f"audit: {text}")
            self.bar.update(1)

    @torch.no_grad()
    def _judge(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(wrong, win, shown prediction, wrong passes) over the plan's passes of the real pipeline.

        wrong: misclassified on some pass; win: misclassified and not flagged on some pass.
        """
        n = y.shape[0]
        wrong = torch.zeros(n, dtype=torch.bool, device=y.device)
        win = torch.zeros_like(wrong)
        shown = y.clone()
        wrong_passes = torch.zeros(n, dtype=torch.long, device=y.device)
        det = self.plan.detector
        with attack_mode(self.target):
            for _ in range(self.plan.passes):
                bs = max(self.batch_size, 1024)  # forward only: larger batches are cheaper per example
                pred = torch.cat([self.target(x[i:i + bs]).argmax(1) for i in range(0, n, bs)]) if n else y.clone()
                w = pred != y
                flagged = det.detect(x).is_adv.to(y.device) if det is not None and n else torch.zeros_like(w)
                shown = torch.where(w & ~wrong, pred, shown)
                wrong |= w
                win |= w & ~flagged
                wrong_passes += w.long()
        return wrong, win, shown, wrong_passes

    def _pool(self, idx: Tensor, x_adv: Tensor) -> Tensor:
        """The first GRID_POOL audited images with the rows `idx` (< GRID_POOL) replaced by `x_adv` (CPU)."""
        out = self.x[:GRID_POOL].detach().cpu().clone()
        sel = (idx < GRID_POOL).cpu()
        out[idx.cpu()[sel]] = x_adv.detach().cpu()[sel]
        return out

    def _full(self, idx: Tensor, values: Tensor, fill: Any) -> Tensor:
        out = torch.full((self.n,), fill, dtype=values.dtype)
        out[idx.cpu()] = values.cpu()
        return out

    def _attack(self, label: str, view: str, attack: Attack, model: nn.Module, idx: Tensor, threat: ThreatModel,
                scope: str, *, keep: bool = True, worst_case: bool | None = None) -> _Run:
        """Run `attack` on `model` for examples `idx`, judge the points on the real pipeline."""
        t0 = time.perf_counter()
        idx = idx.to(self.x.device)
        seed = self._seed(label)
        parts = []
        for s in range(0, idx.numel(), self.batch_size):
            b = idx[s:s + self.batch_size]
            parts.append(attack(model, self.x[b], self.y[b], threat, seed=seed).x_adv)
        x_adv = torch.cat(parts) if parts else self.x[:0].clone()
        wrong, win, pred, _ = self._judge(x_adv, self.y[idx])
        elapsed = time.perf_counter() - t0
        cfg = attack_config(attack)
        if getattr(attack, "detector", None) is not None:
            cfg["detector"] = _jsonable(attack.detector.config())
        full_x = self._pool(idx, x_adv) if keep else None
        run = _Run(label=label, view=view, name=attack.name, config=cfg, eps=threat.eps, scope=scope,
                   attacked=self._full(idx, torch.ones(idx.numel(), dtype=torch.bool), False),
                   win=self._full(idx, win, False), wrong=self._full(idx, wrong, False),
                   pred=self._full(idx, pred, -1), x_adv=full_x, time_s=elapsed,
                   worst_case=(threat.eps <= self.threat.eps) if worst_case is None else worst_case)
        self.runs.append(run)
        return run

    def _add(self, name: str, view: str, status: str, message: str, evidence: dict[str, Any] | None = None) -> None:
        self.checks.append(Check(name, view, status, message, evidence or {}))

    def _view_model(self, view: str) -> nn.Module:
        return self.plan.naive if view == "naive" else self.plan.model

    def _prefix(self, view: str, name: str) -> str:
        return name if view == "both" else f"{view}:{name}"

    # ------------------------------------------------------------------ the steps
    def run(self, plan: AdaptivePlan) -> AuditReport:
        t_start = time.perf_counter()
        self.plan = plan
        b, n = self.b, self.n
        views = ["both"] if plan.same_as_naive else ["naive", "adaptive"]
        self.views = views
        n_stages = 6 + 4 * len(views)
        from tqdm.auto import tqdm

        self.bar = tqdm(total=n_stages, disable=not self.progress, desc="audit", leave=False, dynamic_ncols=True)
        try:
            self._stage("clean accuracy")
            self._clean()
            suite_runs: dict[str, dict[str, _Run]] = {}
            for v in views:
                self._stage(f"{v} suite")
                suite_runs[v] = self._suite(v)
            self.suite_runs = suite_runs
            sub = _spread(n, b.check_n)
            self.sub_mask = torch.zeros(n, dtype=torch.bool)
            self.sub_mask[sub] = True
            self.sub_ok = (self.sub_mask & self.clean_ok).nonzero().squeeze(1)
            self.m = int(sub.numel())
            self._stage("black-box (Square)")
            self._square()
            self._stage("random sampling")
            self._random()
            for v in views:
                self._stage(f"{v}: gradients")
                self._zero_gradients(v)
                self._stage(f"{v}: unbounded attack")
                self._unbounded(v)
                self._stage(f"{v}: security curve")
                self._curve(v)
            adaptive_view = views[-1]
            self._stage("convergence (steps)")
            self._convergence_steps(adaptive_view)
            self._stage("convergence (restarts)")
            self._convergence_restarts(adaptive_view)
            self._stage("loss histogram")
            self._histogram(adaptive_view)
            for v in views:
                self._view_checks(v)
            self._randomness_check()
            rank = {name: i for i, name in enumerate(CHECK_ORDER)}
            vrank = {v: i for i, v in enumerate([*views, "system"])}
            self.checks.sort(key=lambda c: (vrank.get(c.view, 9), rank.get(c.name, 99)))
            report = self._report(time.perf_counter() - t_start)
        finally:
            self.bar.close()
        return report

    def _clean(self) -> None:
        wrong, _, pred, wrong_passes = self._judge(self.x, self.y)
        self.clean_ok = (~wrong).cpu()
        self.clean_pred = pred.cpu()
        passes = self.plan.passes
        self.clean_single = 1.0 - float(wrong_passes.double().mean()) / passes if passes > 1 else None
        self.detector_fpr = None
        det = self.plan.detector
        if det is not None:
            flagged = 0.0
            with torch.no_grad():
                for _ in range(passes):
                    flagged += float(det.detect(self.x).is_adv.float().mean())
            self.detector_fpr = flagged / passes
        with torch.no_grad(), attack_mode(self.target):
            self.num_classes = int(self.target(self.x[:1]).shape[1])

    def _one_step(self) -> Attack:
        return create_attack("fgsm") if self.threat.norm is Norm.LINF else create_attack("fgm")

    def _main_attack(self, view: str, steps: int | None = None, **kw: Any) -> tuple[str, Attack]:
        """The view's main iterative attack: detector-aware PGD (adaptive, with a detector) or PGD."""
        steps = steps or self.b.steps
        if view != "naive" and self.plan.detector is not None:
            from ..attacks.detector_aware import DetectorAwarePGD

            return "detector-pgd", DetectorAwarePGD(detector=self.plan.detector, lam=float(self.b.detector_lams[0]),
                                                    steps=steps, **kw)
        return "pgd", create_attack("pgd", steps=steps, **kw)

    def _suite(self, view: str) -> dict[str, _Run]:
        b, norm = self.b, self.threat.norm.value
        model = self._view_model(view)
        idx = self.clean_ok.nonzero().squeeze(1)
        items: list[tuple[str, Attack]] = [(self._one_step().name, self._one_step()),
                                           ("pgd", create_attack("pgd", steps=b.steps))]
        if b.apgd_steps and norm in ("linf", "l2"):
            items.append(("apgd", create_attack("apgd", steps=b.apgd_steps, loss="ce")))
        if view != "naive":
            if b.apgd_t_steps and norm in ("linf", "l2") and self.num_classes > 2:
                items.append(("apgd-t", create_attack("apgd-t", steps=b.apgd_t_steps,
                                                      n_target_classes=min(b.apgd_t_targets, self.num_classes - 1))))
            if self.plan.detector is not None:
                from ..attacks.detector_aware import DetectorAwarePGD

                for i, lam in enumerate(b.detector_lams):
                    name = "detector-pgd" if i == 0 else f"detector-pgd#{i + 1}"
                    items.append((name, DetectorAwarePGD(detector=self.plan.detector, lam=float(lam), steps=b.steps)))
        out = {}
        for name, atk in items:
            out[name] = self._attack(self._prefix(view, name), view, atk, model, idx, self.threat, "all")
        return out

    def _white_box_broken(self, view: str) -> Tensor:
        """Examples some white-box attack of the view broke (suite + curve at eps ≤ threat + convergence)."""
        broken = torch.zeros(self.n, dtype=torch.bool)
        for r in self.runs:
            if r.view == view and r.worst_case:
                broken |= r.win
        return broken

    def _square(self) -> None:
        if self.threat.norm.value not in ("linf", "l2"):
            self.square = None
            return
        atk = create_attack("square", n_queries=self.b.square_queries)
        self.square = self._attack("square", "black-box", atk, self.plan.naive, self.sub_ok, self.threat, "checks")

    def _random(self) -> None:
        """`random_samples` uniform points of the ball per example, judged like any attack (in large batches)."""
        t0 = time.perf_counter()
        idx = self.sub_ok.to(self.x.device)
        k = idx.numel()
        x, y = self.x[idx], self.y[idx]
        win = torch.zeros(k, dtype=torch.bool, device=y.device)
        wrong = torch.zeros_like(win)
        pred = y.clone()
        x_keep = x.clone()
        rng = ExampleRNG(self._seed("random"), x) if k else None
        per_chunk = max(1, 4096 // max(k, 1))  # samples judged together: at most ~4096 rows at a time
        for j0 in range(0, self.b.random_samples if k else 0, per_chunk):
            js = range(j0, min(j0 + per_chunk, self.b.random_samples))
            xr = torch.cat([self.threat.random_init(x, rng, tag=("audit-random", j)) for j in js])
            w, sw, p, _ = self._judge(xr, y.repeat(len(js)))
            for t in range(len(js)):
                rows = slice(t * k, (t + 1) * k)
                new = sw[rows] & ~win
                x_keep[new] = xr[rows][new]
                pred = torch.where(new, p[rows], pred)
                win |= sw[rows]
                wrong |= w[rows]
        full_x = self._pool(idx, x_keep)
        self.random = _Run("random", "random", "random", {"name": "random", "samples": self.b.random_samples},
                           self.threat.eps, "checks", self._full(idx, torch.ones(k, dtype=torch.bool), False),
                           self._full(idx, win, False), self._full(idx, wrong, False), self._full(idx, pred, -1),
                           full_x, time.perf_counter() - t0)
        self.runs.append(self.random)

    def _zero_gradients(self, view: str) -> None:
        model = self._view_model(view)
        idx = self.sub_ok.to(self.x.device)
        if idx.numel() == 0:
            self._add("zero_gradients", view, "skipped", "no correctly classified example to probe")
            return
        x, y = self.x[idx], self.y[idx]
        grads = []
        with attack_mode(model):
            for s in range(0, idx.numel(), self.batch_size):
                xb = x[s:s + self.batch_size].detach().requires_grad_(True)
                with torch.enable_grad():
                    loss = margin(model(xb), y[s:s + self.batch_size]).sum()
                    (g,) = torch.autograd.grad(loss, [xb], allow_unused=True)
                grads.append(torch.zeros_like(xb) if g is None else g.detach())
        g = torch.cat(grads).flatten(1)
        finite = torch.isfinite(g).all(1)
        zero = finite & (g.abs().amax(1) == 0)
        frac_zero = float(zero.float().mean())
        frac_nan = 1.0 - float(finite.float().mean())
        ev = {"n": int(idx.numel()), "loss": "margin (max other logit − true logit)",
              "fraction_zero_gradient": frac_zero, "fraction_nonfinite_gradient": frac_nan,
              "fraction_zero_coordinates": float((g[finite] == 0).float().mean()) if bool(finite.any()) else None,
              "median_gradient_l2": float(g[finite].norm(dim=1).median()) if bool(finite.any()) else None}
        if frac_nan > 0:
            status, msg = "warning", f"{frac_nan:.0%} of the input gradients are NaN/inf (exploding gradients)"
        elif frac_zero > 0.1:
            status = "warning"
            msg = (f"{frac_zero:.0%} of the examples have an input gradient of exactly zero: gradient attacks see "
                   "nothing (shattered gradients: a non-differentiable step or a saturated output)")
        else:
            status = "pass"
            msg = f"{frac_zero:.0%} of the examples have a zero input gradient"
        self._add("zero_gradients", view, status, msg, ev)

    def _unbounded(self, view: str) -> None:
        norm = self.threat.norm
        d = int(self.x[0].numel())
        eps = {Norm.LINF: 1.0, Norm.L2: math.sqrt(d), Norm.L1: float(d)}[norm]
        big = ThreatModel(norm, eps)
        # From x (a random start in a ball this large is a random image, which would hide a zero gradient), on
        # the margin loss (no softmax saturation), with steps that cross the ball once in total: Madry's
        # 2.5·eps/steps overshoots back and forth when eps is the whole box.
        atk = create_attack("pgd", steps=self.b.unbounded_steps, step_size=eps / self.b.unbounded_steps,
                            random_start=False, loss="cw")
        run = self._attack(self._prefix(view, "unbounded-pgd"), view, atk, self._view_model(view), self.sub_ok, big,
                           "checks", keep=False, worst_case=False)
        n_att = int(run.attacked.sum())
        rate = int(run.wrong.sum()) / n_att if n_att else None
        ev = {"n": n_att, "eps": eps, "steps": self.b.unbounded_steps, "success_rate": rate,
              "note": "classifier only (the detector is ignored)"
              + ("; the ball covers the whole [0, 1] box" if norm is Norm.LINF else "")}
        if rate is None:
            self._add("unbounded_attack", view, "skipped", "no correctly classified example", ev)
        elif rate < 0.95:
            self._add("unbounded_attack", view, "warning",
                      f"an unbounded attack (eps {eps:.4g}) succeeds on only {rate:.0%}: with no bound "
                      "every input can be changed into any other, so gradients are not leading the attack",
                      ev)
        else:
            self._add("unbounded_attack", view, "pass",
                      f"an unbounded attack (eps {eps:.4g}) succeeds on {rate:.0%}", ev)

    def _curve(self, view: str) -> None:
        name, _ = self._main_attack(view)
        main = self.suite_runs[view].get(name) or self.suite_runs[view]["pgd"]
        cap = 1.0 if self.threat.norm is Norm.LINF else math.inf
        points = []
        seen = set()
        for mult in sorted(self.b.curve):
            eps = min(self.threat.eps * mult, cap)
            if eps in seen:
                continue
            seen.add(eps)
            if mult == 1.0:
                run = main
            elif eps > self.threat.eps and self._sub_acc(main.win) == 0.0:
                points.append((eps, 0.0))  # a larger ball contains the smaller one: nothing left to break
                continue
            else:
                _, atk = self._main_attack(view)
                run = self._attack(f"{self._prefix(view, name)}@{eps:.4g}", view, atk, self._view_model(view),
                                   self.sub_ok, ThreatModel(self.threat.norm, eps), "checks",
                                   keep=eps <= self.threat.eps)
            points.append((eps, self._sub_acc(run.win)))
        self.curves = getattr(self, "curves", {})
        self.curves[view] = points

    def _sub_acc(self, win: Tensor) -> float:
        return int((self.clean_ok & self.sub_mask & ~win).sum()) / self.m if self.m else float("nan")

    def _convergence_steps(self, view: str) -> None:
        name, _ = self._main_attack(view)
        points = []
        main = self.suite_runs[view].get(name) or self.suite_runs[view]["pgd"]
        for s in sorted(set(self.b.conv_steps)):
            if s == self.b.steps:
                run = main
            elif s > self.b.steps and self._sub_acc(main.win) == 0.0:
                points.append((s, 0.0))  # nothing left to break
                continue
            else:
                _, atk = self._main_attack(view, steps=s)
                run = self._attack(f"{self._prefix(view, name)}-{s}", view, atk, self._view_model(view), self.sub_ok,
                                   self.threat, "checks")
            points.append((s, self._sub_acc(run.win)))
        self.conv_steps = points

    def _convergence_restarts(self, view: str) -> None:
        """Accuracy after 1, 2, ..., R independent random starts (restart r: a fresh seed)."""
        name, _ = self._main_attack(view)
        first = self.suite_runs[view].get(name) or self.suite_runs[view]["pgd"]
        broken = first.win.clone()
        points = [(1, self._sub_acc(broken))]
        for r in range(2, self.b.conv_restarts + 1):
            idx = (self.clean_ok & self.sub_mask & ~broken).nonzero().squeeze(1)
            _, atk = self._main_attack(view)
            run = self._attack(f"{self._prefix(view, name)}-restart{r}", view, atk, self._view_model(view), idx,
                               self.threat, "checks")
            broken |= run.win
            points.append((r, self._sub_acc(broken)))
        self.conv_restarts = points

    def _histogram(self, view: str) -> None:
        """Madry et al. 2018 (Fig. 1): final losses of PGD from random starts (no early stopping).

        All starts of all examples run as one batch through PGD's loop (`bastion.attacks.pgd.iterate`),
        each start from its own random point of the ball.
        """
        from ..attacks.losses import ce
        from ..attacks.pgd import iterate

        model = self._view_model(view)
        idx = self.sub_ok[:self.b.hist_examples].to(self.x.device)
        self.hist = None
        if idx.numel() == 0:
            return
        k, starts = idx.numel(), self.b.hist_starts
        x, y = self.x[idx], self.y[idx]
        t0 = time.perf_counter()
        rng = ExampleRNG(self._seed("hist"), x)
        x0 = torch.cat([self.threat.random_init(x, rng, tag=("audit-hist", s)) for s in range(starts)])
        xr, yr = x.repeat(starts, 1, 1, 1), y.repeat(starts)  # start-major rows: row s·k + i
        step = 2.5 * self.threat.eps / self.b.steps
        rows = torch.arange(xr.shape[0], device=xr.device)
        finals, loss_parts = [], []
        with attack_mode(model):
            for c in range(0, xr.shape[0], self.batch_size):
                sl = slice(c, c + self.batch_size)
                x_fin, loss_fin = iterate(model, xr[sl], yr[sl], None, self.threat, x0[sl], steps=self.b.steps,
                                          step_size=step, loss_fn=ce, tracker=None, idx=rows[sl], early_stop=False)
                finals.append(x_fin)
                loss_parts.append(loss_fin)
        x_fin = torch.cat(finals)
        losses = torch.cat(loss_parts).double().cpu().reshape(starts, k).T  # (examples, starts)
        w, win, pred, _ = self._judge(x_fin, yr)
        wrong_any = w.cpu().reshape(starts, k).T
        win_sk = win.reshape(starts, k)
        first = torch.where(win_sk.any(0), win_sk.float().argmax(0), torch.zeros(k, dtype=torch.long, device=y.device))
        pick = first * k + torch.arange(k, device=y.device)
        win_any = win_sk.any(0)
        x_keep = torch.where(win_any.view(-1, 1, 1, 1), x_fin[pick], x)
        pred_keep = torch.where(win_any, pred[pick], y)
        # all starts as one attack of the worst case: broken if any start broke it
        full_x = self._pool(idx, x_keep)
        cfg = {"name": "pgd", "steps": self.b.steps, "step_size": step, "loss": "ce", "early_stop": False,
               "starts": starts}
        attacked = self._full(idx, torch.ones(k, dtype=torch.bool), False)
        self.runs.append(_Run(f"{self._prefix(view, 'pgd')}-{starts}-starts", view, "pgd", cfg,
                              self.threat.eps, "checks", attacked, self._full(idx, win_any, False),
                              self._full(idx, wrong_any.any(1), False), self._full(idx, pred_keep, -1), full_x,
                              time.perf_counter() - t0))
        spread = (losses.amax(1) - losses.amin(1))
        mixed = wrong_any.any(1) & ~wrong_any.all(1)
        self.hist = {"steps": self.b.steps, "starts": self.b.hist_starts, "view": view,
                     "losses": [[round(float(v), 6) for v in row] for row in losses.tolist()]}
        ev = {"n": int(idx.numel()), "starts": self.b.hist_starts, "median_final_loss": float(losses.median()),
              "median_spread_per_example": float(spread.median()), "max_spread_per_example": float(spread.max()),
              "fraction_outcome_depends_on_start": float(mixed.float().mean())}
        msg = (f"final PGD losses over {self.b.hist_starts} random starts: median spread per example "
               f"{ev['median_spread_per_example']:.3g}; the outcome depends on the start for "
               f"{ev['fraction_outcome_depends_on_start']:.0%} of the examples")
        self._add("loss_histogram", view, "info", msg, ev)

    # ------------------------------------------------------------------ the checks
    def _view_acc(self, view: str, names: Sequence[str] | None = None) -> float:
        broken = torch.zeros(self.n, dtype=torch.bool)
        for name, r in self.suite_runs[view].items():
            if names is None or name in names:
                broken |= r.win
        return int((self.clean_ok & ~broken).sum()) / self.n

    def _view_checks(self, view: str) -> None:
        n, m = self.n, self.m
        one = self._one_step().name
        runs = self.suite_runs[view]
        # 1. one-step vs iterative (all n examples)
        main = self._main_attack(view)[0]
        acc_one = self._view_acc(view, [one])
        acc_it = self._view_acc(view, [main])
        it_name = f"{main.upper() if main == 'pgd' else main}-{self.b.steps}"
        ev = {"n": n, f"{one}_accuracy": acc_one, f"{main}_accuracy": acc_it, "steps": self.b.steps,
              "tolerance": _tol(n)}
        if acc_one < acc_it - _tol(n):
            self._add("one_step_vs_iterative", view, "warning",
                      f"one step ({one}) leaves {acc_one:.1%} but {it_name} leaves {acc_it:.1%}: an iterative "
                      "attack should never be weaker than one step of it", ev)
        else:
            self._add("one_step_vs_iterative", view, "pass",
                      f"{it_name} ({acc_it:.1%}) is at least as strong as {one} ({acc_one:.1%})", ev)
        # 2. black-box vs white-box (check subset)
        wb = self._white_box_broken(view)
        wb_acc = self._sub_acc(wb)
        if self.square is None:
            self._add("black_box_vs_white_box", view, "skipped",
                      f"Square supports linf and l2 only; the threat is {self.threat}")
        else:
            sq_acc = self._sub_acc(self.square.win)
            only = int((self.square.win & ~wb & self.sub_mask).sum())
            ev = {"n": m, "square_accuracy": sq_acc, "white_box_accuracy": wb_acc,
                  "square_queries": self.b.square_queries, "broken_only_by_square": only, "tolerance": _tol(m)}
            if sq_acc < wb_acc - _tol(m):
                self._add("black_box_vs_white_box", view, "warning",
                          f"black-box Square ({self.b.square_queries} queries) leaves {sq_acc:.1%} but the "
                          f"white-box attacks leave {wb_acc:.1%}: gradients are misleading the white-box "
                          "attacks", ev)
            else:
                self._add("black_box_vs_white_box", view, "pass",
                          f"white-box {wb_acc:.1%} ≤ black-box Square {sq_acc:.1%} (+ tolerance)", ev)
        # 4. random sampling
        cand = self.clean_ok & self.sub_mask & ~wb
        found = int((cand & self.random.win).sum())
        need = max(2, math.ceil(0.01 * m))
        ev = {"n": m, "samples_per_example": self.b.random_samples, "candidates": int(cand.sum()),
              "found_by_random_sampling": found, "threshold": need}
        if found >= need:
            self._add("random_sampling", view, "warning",
                      f"random points of the ball break {found} example(s) that every gradient attack "
                      "missed: the gradient is not pointing where the model is weak", ev)
        else:
            self._add("random_sampling", view, "pass",
                      f"random sampling found {found} example(s) the gradient attacks missed "
                      f"(of {int(cand.sum())} left)", ev)
        # 5. increasing eps
        pts = self.curves[view]
        acc_eps = self._sub_acc(runs.get(self._main_attack(view)[0], runs["pgd"]).win)
        rises = [(a, b) for a, b in zip(pts, pts[1:]) if b[1] > a[1] + _tol(m)]
        e_max, acc_max = pts[-1]
        ev = {"n": m, "curve": [[e, a] for e, a in pts], "tolerance": _tol(m)}
        if rises:
            (e1, a1), (e2, a2) = rises[0]
            self._add("eps_increase", view, "warning",
                      f"accuracy rises from {a1:.1%} at eps {e1:.4g} to {a2:.1%} at eps {e2:.4g}: a larger "
                      "ball contains the smaller one, so the attack is failing, not the model resisting", ev)
        elif e_max > self.threat.eps and acc_eps >= 0.1 and acc_max >= acc_eps - _tol(m):
            self._add("eps_increase", view, "warning",
                      f"raising eps from {self.threat.eps:.4g} to {e_max:.4g} leaves accuracy at "
                      f"{acc_max:.1%} (from {acc_eps:.1%}): a larger budget should break more", ev)
        else:
            self._add("eps_increase", view, "pass",
                      f"accuracy falls with eps: {', '.join(f'{e:.3g}: {a:.0%}' for e, a in pts)}", ev)
        if view in ("adaptive", "both"):
            self._convergence_check(view)
        if view == "naive":
            gap = self._view_acc("naive") - self._view_acc("adaptive")
            ev = {"n": n, "naive_accuracy": self._view_acc("naive"), "adaptive_accuracy": self._view_acc("adaptive"),
                  "tolerance": max(0.05, _tol(n))}
            if gap > max(0.05, _tol(n)):
                self._add("naive_vs_adaptive", "naive", "warning",
                          f"the naive attacks overestimate robustness by {100 * gap:.1f} points: what "
                          "survives them survives only because its gradients were obfuscated", ev)
            else:
                self._add("naive_vs_adaptive", "naive", "pass",
                          f"the naive and adaptive suites agree within {100 * max(gap, 0):.1f} points", ev)

    def _convergence_check(self, view: str) -> None:
        m = self.m
        ev = {"n": m, "steps": [list(p) for p in self.conv_steps], "restarts": [list(p) for p in self.conv_restarts],
              "tolerance": _tol(m)}
        (s1, a1), (s2, a2) = self.conv_steps[-2], self.conv_steps[-1]
        msgs = []
        if a2 < a1 - _tol(m):
            msgs.append(f"accuracy still falls from {a1:.1%} ({s1} steps) to {a2:.1%} ({s2} steps)")
        if len(self.conv_restarts) >= 2:
            (r1, b1), (r2, b2) = self.conv_restarts[-2], self.conv_restarts[-1]
            if b2 < b1 - _tol(m):
                msgs.append(f"accuracy still falls from {b1:.1%} ({r1} restarts) to {b2:.1%} ({r2} restarts)")
        if msgs:
            self._add("convergence", view, "warning",
                      "; ".join(msgs) + ": the attack has not converged, more steps or restarts would "
                      "lower the number further", ev)
        else:
            self._add("convergence", view, "pass",
                      f"flat at the end: {s1} → {s2} steps {a1:.1%} → {a2:.1%}; "
                      f"{self.conv_restarts[-1][0]} restarts {self.conv_restarts[-1][1]:.1%}", ev)

    def _randomness_check(self) -> None:
        p = self.plan.probe or {}
        ev = dict(p)
        declared = bool(self.plan.random_parts)
        observed = bool(p.get("observed"))
        if observed and not declared:
            self._add("randomness", "system", "warning",
                      "two forward passes on the same inputs differ, but no component declares "
                      "`randomized = True`: the audit attacked with EOT anyway; declare it", ev)
        elif observed:
            change = max(p["max_logit_change_in_batch"], p["max_logit_change_across_calls"])
            self._add("randomness", "system", "info",
                      f"randomized, as declared ({', '.join(self.plan.random_parts)}): two forward passes "
                      f"differ (max logit change {change:.3g}); attacked with EOT over {self.plan.eot} "
                      f"draws, judged over {self.plan.passes} passes", ev)
        elif declared:
            self._add("randomness", "system", "info",
                      f"declared randomized ({', '.join(self.plan.random_parts)}), but two forward passes "
                      f"agreed on the probe; attacked with EOT over {self.plan.eot} draws anyway", ev)
        else:
            self._add("randomness", "system", "pass",
                      "deterministic: two forward passes on the same inputs agree", ev)

    # ------------------------------------------------------------------ the report
    def _verdict(self, naive: float, adaptive: float, robust: float) -> str:
        t = format_threat(str(self.threat))
        adaptive_views = ("adaptive", "both")
        adv_warn = [c.name for c in self.checks if c.status == "warning" and c.view in adaptive_views
                    and c.name in MASKING_CHECKS]
        undeclared = any(c.status == "warning" and c.name == "randomness" for c in self.checks)
        naive_warn = [c.name for c in self.checks if c.status == "warning" and c.view == "naive"
                      and c.name in MASKING_CHECKS]
        conv = any(c.status == "warning" and c.name == "convergence" for c in self.checks)
        gap = naive - adaptive
        relies = not self.plan.same_as_naive and gap > max(0.05, _tol(self.n))
        if relies:
            how = ", ".join(self.plan.techniques) or "the adaptive attack"
            text = (f"naive {naive:.1%} → adaptive {adaptive:.1%}: this defense relies on obfuscated gradients "
                    f"({how} broke it); robust accuracy {robust:.1%} at {t} under the adaptive suite")
        else:
            text = f"robust accuracy {robust:.1%} at {t} under the adaptive suite"
        if adv_warn:
            text += (f"; the attacks still show signs of gradient masking ({', '.join(dict.fromkeys(adv_warn))}): "
                     f"{robust:.1%} is an upper bound")
        elif not relies:
            text += "; no sign of gradient masking"
            if naive_warn:
                text += f" under the adaptive attack (the naive one showed {', '.join(dict.fromkeys(naive_warn))})"
        if undeclared:
            text += "; undeclared randomness was found (attacked with EOT anyway)"
        if conv:
            text += (f"; the attack has not converged (more steps/restarts still lower it): {robust:.1%} is an "
                     "upper bound")
        return text

    def _report(self, elapsed: float) -> AuditReport:
        n = self.n
        views = self.views
        naive_view, adaptive_view = views[0], views[-1]
        naive = self._view_acc(naive_view)
        adaptive = self._view_acc(adaptive_view)
        # worst case per example, in this order of precedence for "broken_by"
        order = [r for r in self.runs if r.worst_case and r.view in ("adaptive", "both")]
        order += [r for r in self.runs if r.worst_case and r.view == "naive"]
        order += [r for r in self.runs if r.worst_case and r.view in ("black-box", "random")]
        broken_by: list[str | None] = [None] * n
        breaker: list[_Run | None] = [None] * n
        for r in order:
            for i in (r.win & self.clean_ok).nonzero().squeeze(1).tolist():
                if broken_by[i] is None:
                    broken_by[i], breaker[i] = r.label, r
        robust_mask = torch.tensor([b is None for b in broken_by]) & self.clean_ok
        robust = int(robust_mask.sum()) / n
        verdict = self._verdict(naive, adaptive, robust)

        def view_robust(view: str) -> list[bool]:
            broken = torch.zeros(n, dtype=torch.bool)
            for r in self.suite_runs[view].values():
                broken |= r.win
            return (self.clean_ok & ~broken).tolist()

        curve = []
        eps_all = sorted({e for v in views for e, _ in self.curves[v]})
        for e in eps_all:
            point: dict[str, Any] = {"eps": e}
            for v in views:
                acc = dict(self.curves[v]).get(e)
                if v == "both":
                    point["naive"] = point["adaptive"] = acc
                else:
                    point[v] = acc
            curve.append(point)
        scope_all = torch.ones(n, dtype=torch.bool)
        attacks = [r.summary(self.clean_ok, scope_all if r.scope == "all" else self.sub_mask) for r in self.runs]
        examples = self._examples(breaker)
        plan = self.plan
        adaptive_info = {"choices": plan.choices, "techniques": plan.techniques,
                         "declarations": _jsonable(plan.declarations),
                         "detector": None if plan.detector is None else _jsonable(plan.detector.config()),
                         "randomized": plan.randomized, "eot": plan.eot, "passes": plan.passes,
                         "final_rule": plan.final_rule, "same_as_naive": plan.same_as_naive}
        notes = list(self.notes)
        notes.append(f"the checks, curves and convergence runs use {self.m} of the {n} examples (spread evenly); "
                     "Square, random sampling and the convergence runs enter the worst case on those only")
        return AuditReport(
            threat=str(self.threat), n=n, budget=self.b.name, verdict=verdict,
            clean_accuracy=int(self.clean_ok.sum()) / n, naive_accuracy=naive, adaptive_accuracy=adaptive,
            robust_accuracy=robust, adaptive=adaptive_info, attacks=attacks, checks=self.checks,
            clean_accuracy_single_pass=self.clean_single, detector_fpr=self.detector_fpr, curve=curve,
            convergence={"n": self.m, "view": adaptive_view, "steps": [list(p) for p in self.conv_steps],
                         "restarts": [list(p) for p in self.conv_restarts]},
            loss_histogram=self.hist,
            per_example={"label": self.y.tolist(), "clean_pred": self.clean_pred.tolist(),
                         "clean_correct": self.clean_ok.tolist(), "naive_robust": view_robust(naive_view),
                         "adaptive_robust": view_robust(adaptive_view), "robust": robust_mask.tolist(),
                         "broken_by": broken_by},
            examples=examples, notes=notes, time_s=elapsed)

    def _examples(self, breaker: list[_Run | None], k: int = 8) -> dict[str, Any] | None:
        """Up to k correctly classified examples for the grid (among the first GRID_POOL): broken ones first,
        one class at a time."""
        y = self.y.cpu().tolist()
        ok = self.clean_ok.tolist()
        order: list[int] = []
        for want_broken in (True, False):
            group = [i for i in range(min(self.n, GRID_POOL))
                     if ok[i] and (breaker[i] is not None) == want_broken and (not want_broken or
                                                                             breaker[i].x_adv is not None)]
            seen: dict[int, int] = {}
            rank = {}
            for i in group:
                rank[i] = seen.get(y[i], 0)
                seen[y[i]] = rank[i] + 1
            order += sorted(group, key=lambda i: (rank[i], i))
        order = order[:k]
        if not order:
            return None
        name, _ = self._main_attack(self.views[-1])
        fallback = self.suite_runs[self.views[-1]].get(name) or self.suite_runs[self.views[-1]]["pgd"]
        xs, advs, preds = [], [], []
        for i in order:
            r = breaker[i] or fallback
            xs.append(self.x[i].cpu())
            advs.append(r.x_adv[i] if r.x_adv is not None else self.x[i].cpu())
            preds.append(int(r.pred[i]) if r.pred[i] >= 0 else y[i])
        idx = torch.tensor(order)
        return encode_examples(torch.stack(xs), torch.stack(advs), self.y.cpu()[idx], self.clean_pred[idx],
                               torch.tensor(preds), list(self.classes) if self.classes is not None else None)


def audit(defended_or_model: nn.Module, data: Any, threat: ThreatModel | str, *, n: int | None = 200, seed: int = 0,
          budget: str | AuditBudget = "quick", progress: bool = True, batch_size: int = 256,
          eot: int | None = None, passes: int | None = None, device: str | torch.device | None = None) -> AuditReport:
    """Audit a defense: clean accuracy, naive and adaptive suites, masking checks, curves, verdict.

    Args:
        defended_or_model: a `bastion.defenses.pipeline.Defended` (transforms → model →
            detector/output, each with its declarations) or any `nn.Module` returning logits
            (its submodules' declarations are read the same way).
        data: a bastion `Dataset` or an ``(images, labels)`` tuple (N×C×H×W in [0, 1]).
        threat: a `ThreatModel` or a string like ``"linf:0.1"`` (linf, l2 or l1).
        n: examples to audit, spread evenly over `data` (a split sorted by class keeps every
            class); None: all of them. (Default: 200)
        seed: seeds the attacks (per example) and the defense's own randomness (the global RNG
            is restored afterwards). (Default: 0)
        budget: "quick" (PGD-20 suites, checks on 100 examples: a first look), "standard"
            (PGD-50, APGD-CE-100, APGD-T, Square-1000, checks on 500), or an `AuditBudget`.
            (Default: "quick")
        progress: show a progress bar over the stages. (Default: True)
        batch_size: examples per attack call. (Default: 256)
        eot, passes: override the budget's EOT draws and judging passes (randomized defenses).
        device: where to run; the pipeline is moved there. None: where its parameters are.

    Returns:
        an `AuditReport` (``report.verdict``, ``report.table()``, ``report.save("report.json")``,
        ``report.save_html("report.html")``).

    Example:
        >>> report = audit(Defended([create_transform("jpeg:quality=60")], model), test, "linf:0.1", n=200)
        >>> print(report.verdict)
    """
    t0 = time.perf_counter()
    if not isinstance(defended_or_model, nn.Module):
        raise TypeError(f"`defended_or_model` must be a Defended pipeline or an nn.Module returning logits, got "
                        f"{type(defended_or_model).__name__}")
    threat = ThreatModel.parse(threat)
    if threat.norm is Norm.L0 or not threat.bounded:
        raise ValueError(f"`threat` must be a bounded linf, l2 or l1 threat (the audit's attacks are PGD-based), "
                         f"got {threat}")
    b = _budget(budget)
    if eot is not None or passes is not None:
        b = dataclasses.replace(b, eot=b.eot if eot is None else eot, passes=b.passes if passes is None else passes)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"`n` must be a positive int or None, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**62:
        raise ValueError(f"`seed` must be an int in [0, 2**62), got {seed!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
    if not isinstance(progress, bool):
        raise TypeError(f"`progress` must be a bool, got {type(progress).__name__}")
    x_all, y_all = _as_tensors(data)
    classes = getattr(data, "classes", None)
    total = int(y_all.shape[0])
    if total == 0:
        raise ValueError("`data` is empty")
    idx = _spread(total, total if n is None else n)
    target = defended_or_model
    if device is not None:
        target.to(torch.device(device))
    p = next(target.parameters(), None)
    dev = torch.device(device) if device is not None else (p.device if p is not None else torch.device("cpu"))
    x = x_all[idx].to(dev).float()
    y = y_all[idx].to(dev).long()
    if not (float(x.min()) >= 0.0 and float(x.max()) <= 1.0):
        raise ValueError("`data` images must lie in [0, 1] (normalization belongs inside the model)")
    devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        plan = adaptive_plan(target, eot=b.eot, passes=b.passes, probe=x[:16])
        auditor = _Auditor(target, x, y, threat, b, seed, batch_size, progress, classes)
        report = auditor.run(plan)
    report.config = {"threat": str(threat), "n": int(idx.numel()), "data_size": total, "seed": seed,
                     "budget": dataclasses.asdict(b), "check_n": auditor.m, "batch_size": batch_size,
                     "model_digest": model_digest(target), "selection": "evenly spaced: index (i·N)//n",
                     "device": str(dev)}
    report.time_s = time.perf_counter() - t0
    report = AuditReport.from_dict(report.to_dict())  # JSON-normal form: equal to what report.json reads back
    log.info("audit: %s", report.verdict)
    return report
