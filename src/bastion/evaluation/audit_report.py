"""`AuditReport`: what `bastion.audit` found, as JSON (``bastion-audit/1``), text and HTML.

Schema of ``report.json`` (every accuracy is a fraction of the ``n`` audited examples unless a
``"n"`` beside it says otherwise; the checks and curves run on a spread subset of ``check_n``).
The values shown are those of the masked digits defense of ``tests/test_audit.py`` (1-bit
quantization in front of a TinyCNN, ``pytest tests/test_audit.py -k masked_defense -s``)::

    {
      "schema": "bastion-audit/1",
      "threat": "linf:0.2", "n": 100, "budget": "quick",
      "verdict": "naive 87.0% → adaptive 39.0%: this defense relies on obfuscated gradients ...",
      "clean_accuracy": 0.92,              # correct on every pass (one pass unless randomized)
      "clean_accuracy_single_pass": null,  # randomized defenses: mean accuracy of one pass; else null
      "detector_fpr": null,                # clean inputs the detector flags (a detector only)
      "naive_accuracy": 0.87,              # worst case over the naive suite (straight through the pipeline)
      "adaptive_accuracy": 0.39,           # worst case over the adaptive suite (BPDA, EOT, detector loss)
      "robust_accuracy": 0.30,             # worst case over every attack at the threat (both suites,
                                           # black-box, random sampling, convergence runs)
      "adaptive": {                        # how the defense was attacked, from its declarations
        "choices": ["bit-depth: not differentiable → BPDA (identity)", ...],
        "declarations": [{"name": "bit-depth", "bits": 1, "differentiable": false, "randomized": false}, ...],
        "detector": {...config...} | null,
        "randomized": false, "eot": null | 8, "passes": 1,
        "final_rule": "...how a prediction is counted...", "same_as_naive": false
      },
      "attacks": [                         # every attack run at the threat (and the curve's other radii)
        {"label": "adaptive:pgd", "view": "adaptive", "name": "pgd", "config": {...}, "eps": 0.2,
         "scope": "all" | "checks", "n_attacked": 92, "n_broken": 51, "accuracy": 0.41,
         "time_s": 0.3}, ...],
      "checks": [                          # Athalye et al. 2018 §3.1, plus gradients, randomness, convergence
        {"name": "one_step_vs_iterative", "view": "naive" | "adaptive" | "both" | "system",
         "status": "pass" | "warning" | "info" | "skipped", "message": "...", "evidence": {...}}, ...],
      "curve": [{"eps": 0.1, "naive": 0.88, "adaptive": 0.68}, ...],   # accuracy vs eps (check subset)
      "convergence": {"n": 100, "view": "adaptive", "steps": [..., [20, 0.41], [40, 0.40]],
                      "restarts": [[1, 0.41], ...]},
      "loss_histogram": {"steps": 20, "starts": 8, "view": "adaptive",
                         "losses": [[...one per start...], ...one row per example]} | null,
      "per_example": {"label": [...], "clean_pred": [...], "clean_correct": [...], "naive_robust": [...],
                      "adaptive_robust": [...], "robust": [...], "broken_by": [...]},
      "examples": {"shape": [k, C, H, W], "x": base64 float16, "x_adv": base64 float16,
                   "y": [...], "clean_pred": [...], "adv_pred": [...], "classes": [...] | null} | null,
      "notes": ["..."], "config": {...}, "time_s": 6.1
    }
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

__all__ = ["AUDIT_SCHEMA", "AuditReport", "Check", "decode_examples", "encode_examples", "format_threat"]

AUDIT_SCHEMA = "bastion-audit/1"
STATUSES = ("pass", "warning", "info", "skipped")
_NORM_SYMBOL = {"linf": "L∞", "l2": "L2", "l1": "L1", "l0": "L0"}


def format_threat(threat: str) -> str:
    """``"linf:0.1"`` -> ``"L∞ 0.1"`` (for sentences)."""
    norm, _, eps = threat.partition(":")
    return f"{_NORM_SYMBOL.get(norm, norm)} {eps}"


@dataclass
class Check:
    """One sanity check: what it compared (``evidence``), what that means (``message``)."""

    name: str
    view: str
    status: str
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"`status` must be one of {', '.join(STATUSES)}, got {self.status!r}")


# --------------------------------------------------------------------------- example tensors
def encode_examples(x: Tensor, x_adv: Tensor, y: Tensor, clean_pred: Tensor, adv_pred: Tensor,
                    classes: list[str] | None) -> dict[str, Any]:
    """The grid's examples as JSON: images as base64 little-endian float16 (display precision)."""
    def pack(t: Tensor) -> str:
        arr = t.detach().cpu().to(torch.float16).numpy().astype("<f2")
        return base64.b64encode(arr.tobytes()).decode("ascii")

    return {"shape": list(x.shape), "x": pack(x), "x_adv": pack(x_adv), "y": [int(v) for v in y.tolist()],
            "clean_pred": [int(v) for v in clean_pred.tolist()], "adv_pred": [int(v) for v in adv_pred.tolist()],
            "classes": None if classes is None else [str(c) for c in classes]}


def decode_examples(ex: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `encode_examples`: tensors (float32 images, int64 labels) and the class names."""
    shape = tuple(int(s) for s in ex["shape"])

    def unpack(s: str) -> Tensor:
        arr = np.frombuffer(base64.b64decode(s), dtype="<f2").astype(np.float32)
        return torch.from_numpy(arr.copy()).reshape(shape)

    return {"x": unpack(ex["x"]), "x_adv": unpack(ex["x_adv"]), "y": torch.tensor(ex["y"], dtype=torch.long),
            "clean_pred": torch.tensor(ex["clean_pred"], dtype=torch.long),
            "adv_pred": torch.tensor(ex["adv_pred"], dtype=torch.long), "classes": ex.get("classes")}


def _finite(v: Any) -> Any:
    """JSON has no NaN/inf: they become null (and the schema says where null can appear)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


# --------------------------------------------------------------------------- the report
@dataclass
class AuditReport:
    """What `bastion.audit` measured; see the module docstring for the JSON schema.

    Example:
        >>> report = audit(defended, data, "linf:0.1", n=200, budget="quick")
        >>> print(report.verdict)
        >>> report.save("report.json"); report.save_html("report.html")
        >>> AuditReport.load("report.json") == report
        True
    """

    threat: str
    n: int
    budget: str
    verdict: str
    clean_accuracy: float
    naive_accuracy: float
    adaptive_accuracy: float
    robust_accuracy: float
    adaptive: dict[str, Any]
    attacks: list[dict[str, Any]]
    checks: list[Check]
    clean_accuracy_single_pass: float | None = None
    detector_fpr: float | None = None
    curve: list[dict[str, Any]] = field(default_factory=list)
    convergence: dict[str, Any] = field(default_factory=dict)
    loss_histogram: dict[str, Any] | None = None
    per_example: dict[str, Any] = field(default_factory=dict)
    examples: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    time_s: float = 0.0

    schema: ClassVar[str] = AUDIT_SCHEMA

    # ------------------------------------------------------------------ derived
    def warnings(self, view: str | None = None) -> list[Check]:
        """The checks that warn (of one view: "naive", "adaptive"; "both" counts for either)."""
        return [c for c in self.checks if c.status == "warning"
                and (view is None or c.view == view or (c.view == "both" and view in ("naive", "adaptive")))]

    def check(self, name: str, view: str | None = None) -> Check:
        """The check called `name` (of `view`, where a check runs once per view)."""
        for c in self.checks:
            if c.name == name and (view is None or c.view in (view, "both", "system")):
                return c
        raise KeyError(f"no check {name!r}" + (f" for view {view!r}" if view else "") + "; checks: "
                       + ", ".join(sorted({c.name for c in self.checks})))

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the ``schema`` key first."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["checks"] = [asdict(c) for c in self.checks]
        return {"schema": AUDIT_SCHEMA, **_finite(json.loads(json.dumps(_finite(d))))}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AuditReport":
        """Inverse of `to_dict`; refuses another schema and unknown fields."""
        if not isinstance(d, dict) or d.get("schema") != AUDIT_SCHEMA:
            got = d.get("schema") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"not a Bastion audit report (schema {got!r}, expected {AUDIT_SCHEMA!r})")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names - {"schema"})
        if unknown:
            raise ValueError(f"unknown audit-report field(s): {', '.join(unknown)}")
        kw = {k: v for k, v in d.items() if k in names}
        kw["checks"] = [Check(**c) for c in d.get("checks", [])]
        return cls(**kw)

    def to_json(self) -> str:
        # keys keep their order (evidence reads in the order it was written): load -> save is the identity
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "AuditReport":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON: {e}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        """Write ``report.json`` atomically (readers see the old file or the new one)."""
        from ..checkpoint import atomic_write_text

        return atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "AuditReport":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"audit report {path} not found") from None
        try:
            return cls.from_json(text)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    # ------------------------------------------------------------------ HTML
    def to_html(self) -> str:
        """A self-contained HTML page (inline CSS, plots as base64 PNG; no network)."""
        from .html import render_audit

        return render_audit(self)

    def save_html(self, path: str | Path) -> Path:
        from ..checkpoint import atomic_write_text

        return atomic_write_text(path, self.to_html())

    # ------------------------------------------------------------------ text
    def table(self) -> str:
        """The verdict, the headline numbers, how it was attacked, and every check, as text."""
        pct = _pct
        lines = [f"Audit under {self.threat} on {self.n} examples (budget {self.budget})",
                 f"verdict: {self.verdict}", ""]
        rows = [["clean accuracy", pct(self.clean_accuracy)]]
        if self.clean_accuracy_single_pass is not None:
            rows.append(["clean accuracy (one pass)", pct(self.clean_accuracy_single_pass)])
        if self.detector_fpr is not None:
            rows.append(["detector false positives (clean)", pct(self.detector_fpr)])
        rows += [["naive suite", pct(self.naive_accuracy)], ["adaptive suite", pct(self.adaptive_accuracy)],
                 ["worst case (all attacks)", pct(self.robust_accuracy)]]
        w = max(len(r[0]) for r in rows)
        lines += [f"  {a.ljust(w)}  {b}" for a, b in rows]
        lines += ["", "attacked as:"] + [f"  - {c}" for c in self.adaptive.get("choices", [])]
        lines += ["", "attacks (each on every example it applies to; accuracy after it alone):"]
        arows = [["attack", "eps", "on", "broken", "accuracy", "time"]]
        for a in self.attacks:
            arows.append([a["label"], f"{a['eps']:.4g}", f"{a['n_attacked']}" + ("*" if a["scope"] == "checks" else ""),
                          str(a["n_broken"]), pct(a["accuracy"]), f"{a['time_s']:.1f}s"])
        lines += ["  " + r for r in _format_rows(arows).split("\n")]
        if any(a["scope"] == "checks" for a in self.attacks):
            lines.append(f"  * on the check subset ({self.config.get('check_n')} examples); accuracy over that subset")
        lines += ["", "checks:"]
        for c in self.checks:
            lines.append(f"  [{c.status.upper():7s}] {c.name} ({c.view}): {c.message}")
        for note in self.notes:
            lines.append(f"note: {note}")
        lines.append(f"total time {self.time_s:.1f} s")
        return "\n".join(lines)

    def summary(self) -> str:
        """The verdict and the headline numbers in one paragraph."""
        return (f"{self.verdict} (clean {_pct(self.clean_accuracy)}, naive {_pct(self.naive_accuracy)}, adaptive "
                f"{_pct(self.adaptive_accuracy)}, worst case {_pct(self.robust_accuracy)}; {self.n} examples, "
                f"{len(self.warnings())} warning(s)).")


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def _format_rows(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(wd) for c, wd in zip(r[1:], widths[1:])]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)
