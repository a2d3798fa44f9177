"""The result of `evaluate`: a JSON-serializable record of robust accuracy, per attack and per example.

Schema of ``report.json`` (``schema = "bastion-report/1"``; every accuracy is a fraction of all
``n`` examples, every rate a fraction of the examples it is about)::

    {
      "schema": "bastion-report/1",
      "threat": "linf:0.1",                 # the main threat model
      "n": 1000,                            # examples evaluated
      "clean_accuracy": 0.989,
      "robust_accuracy": 0.023,             # worst case per example over the whole suite
      "attacks": [                          # in suite order, at the main threat
        {"label": "pgd", "name": "pgd", "config": {...hyper-parameters...},
         "skipped": null,                   # or why the attack did not run (unsupported norm, ...)
         "n_attacked": 989,                 # examples it ran on (robust before it)
         "n_success": 966, "success_rate": 0.9767,   # over the examples it ran on (null if none)
         "robust_accuracy": 0.023,          # cumulative: after this attack and all before it
         "standalone_accuracy": null,       # this attack alone (evaluate(standalone=True) only)
         "time_s": 12.3,
         "queries": null,                   # gradient-free attacks: {"total", "mean"} over attacked examples
         "norms": {"l2": {"mean": 1.2, "median": 1.1}, ...}},   # of the examples it broke first
        ...],
      "norms": {"l0": {"mean", "median"}, "l1": ..., "l2": ..., "linf": ...},  # all broken examples
      "curve": [{"eps": 0.05, "robust_accuracy": 0.41, "attacks": {"pgd": 0.41}}, ...] | null,
      "per_example": {                      # columns, one entry per example, at the main threat
        "label": [...], "clean_pred": [...], "clean_correct": [...],
        "broken_by": [...],                 # label of the first attack that broke it; null if it
                                            # survived every attack or was misclassified clean
        "adv_pred": [...],                  # prediction on the breaking example (else the clean one)
        "l0": [...], "l1": [...], "l2": [...], "linf": [...],   # of the breaking perturbation, else null
        "queries": [...],                   # queries of the breaking attack if gradient-free, else null
        "success": {"pgd": [true, false, null, ...], ...}       # per attack; null = not attacked
      },
      "notes": ["..."],                     # skipped attacks, sanity warnings
      "config": {...},                      # what was run: threat, epsilons, attacks, seed, batch size, digests
      "time_s": 45.6
    }
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor

__all__ = ["SCHEMA", "AttackStats", "CurvePoint", "Report"]

SCHEMA = "bastion-report/1"
NORMS = ("l0", "l1", "l2", "linf")


@dataclass
class AttackStats:
    """One attack of the suite, at one threat: what it ran on, what it broke, what it cost."""

    label: str
    name: str
    config: dict[str, Any]
    skipped: str | None
    n_attacked: int
    n_success: int
    success_rate: float | None
    robust_accuracy: float
    standalone_accuracy: float | None
    time_s: float
    queries: dict[str, float] | None
    norms: dict[str, dict[str, float | None]]


@dataclass
class CurvePoint:
    """Robust accuracy at one eps of the security curve (cumulative accuracy after each attack)."""

    eps: float
    robust_accuracy: float
    attacks: dict[str, float]


@dataclass
class Report:
    """What `evaluate` measured; see the module docstring for the JSON schema.

    ``examples`` (not serialized) holds the first K examples' tensors when `evaluate` was asked
    to keep them (``keep_examples=K``): ``x``, ``x_adv``, ``y``, ``clean_pred``, ``adv_pred``.

    Example:
        >>> report = evaluate(model, data, "linf:8/255", attacks="quick")
        >>> print(report.table())
        >>> report.save("report.json"); Report.load("report.json") == report
        True
    """

    threat: str
    n: int
    clean_accuracy: float
    robust_accuracy: float
    attacks: list[AttackStats]
    norms: dict[str, dict[str, float | None]]
    per_example: dict[str, Any]
    curve: list[CurvePoint] | None = None
    notes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    time_s: float = 0.0
    examples: dict[str, Tensor] | None = field(default=None, compare=False, repr=False)

    schema: ClassVar[str] = SCHEMA

    # ------------------------------------------------------------------ derived numbers
    @property
    def success_rate(self) -> float | None:
        """Fraction of the correctly classified examples that some attack broke (None if none were)."""
        pe = self.per_example
        correct = sum(1 for c in pe["clean_correct"] if c)
        if correct == 0:
            return None
        broken = sum(1 for c, b in zip(pe["clean_correct"], pe["broken_by"]) if c and b is not None)
        return broken / correct

    def robust_set(self) -> list[int]:
        """Indices of the examples that survived every attack (correct clean, never broken)."""
        pe = self.per_example
        return [i for i, (c, b) in enumerate(zip(pe["clean_correct"], pe["broken_by"])) if c and b is None]

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the ``schema`` key (tensors in ``examples`` are left out)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "examples"}
        d["attacks"] = [asdict(a) for a in self.attacks]
        d["curve"] = None if self.curve is None else [asdict(c) for c in self.curve]
        return {"schema": SCHEMA, **json.loads(json.dumps(d))}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Report":
        """Inverse of `to_dict`; refuses another schema version."""
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            got = d.get("schema") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"not a Bastion evaluation report (schema {got!r}, expected {SCHEMA!r})")
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d and f.name != "examples"}
        kw["attacks"] = [AttackStats(**a) for a in d["attacks"]]
        kw["curve"] = None if d.get("curve") is None else [CurvePoint(**c) for c in d["curve"]]
        return cls(**kw)

    def save(self, path: str | Path) -> Path:
        """Write the report as JSON, atomically (readers see the old file or the new one)."""
        from ..checkpoint import atomic_write_json

        path = Path(path)
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Report":
        """Read a report written by `save`."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"report file {path} not found") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"report file {path} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    # ------------------------------------------------------------------ text
    def table(self) -> str:
        """A readable text table: one row per attack (cumulative robust accuracy), then the curve."""
        head = (f"Robust accuracy under {self.threat} on {self.n} examples "
                f"(worst case per example over the attacks above each row)")
        cols = ["attack", "ran on", "success", "robust acc", "med L2", "med Linf", "med L0", "queries", "time"]
        rows = [["clean", "", "", _pct(self.clean_accuracy), "", "", "", "", ""]]
        for a in self.attacks:
            if a.skipped:
                rows.append([a.label, "", "", "skipped", "", "", "", "", ""])
                continue
            med = {k: (a.norms.get(k) or {}).get("median") for k in ("l2", "linf", "l0")}
            q = "" if a.queries is None else f"{a.queries['mean']:.0f}"
            rows.append([a.label, str(a.n_attacked), _pct(a.success_rate), _pct(a.robust_accuracy),
                         _num(med["l2"]), _num(med["linf"]), _num(med["l0"], 0), q, f"{a.time_s:.1f}s"])
        rows.append(["worst case", "", _pct(self.success_rate), _pct(self.robust_accuracy),
                     _num(self.norms["l2"]["median"]), _num(self.norms["linf"]["median"]),
                     _num(self.norms["l0"]["median"], 0), "", f"{sum(a.time_s for a in self.attacks):.1f}s"])
        lines = [head, _format_rows([cols, *rows])]
        if any(a.standalone_accuracy is not None for a in self.attacks):
            alone = ", ".join(f"{a.label} {_pct(a.standalone_accuracy)}" for a in self.attacks
                              if a.standalone_accuracy is not None)
            lines.append(f"each attack alone: {alone}")
        if self.curve:
            labels = [a.label for a in self.attacks]
            crow = [["eps", *labels, "worst case"]]
            for c in self.curve:
                crow.append([f"{c.eps:.4g}", *(_pct(c.attacks.get(lb)) for lb in labels), _pct(c.robust_accuracy)])
            lines += ["", "Security curve (cumulative robust accuracy per eps):", _format_rows(crow)]
        lines.append(f"total time {self.time_s:.1f} s" + (f" ({len(self.curve)} radii)" if self.curve else ""))
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def summary(self) -> str:
        """One paragraph: clean and robust accuracy, the suite, the norms, the curve."""
        ran = [a.label for a in self.attacks if not a.skipped]
        parts = [f"{self.n} examples, threat {self.threat}: clean accuracy {_pct(self.clean_accuracy)}, "
                 f"robust accuracy {_pct(self.robust_accuracy)} (worst case over {', '.join(ran) or 'no attack'})"]
        if self.success_rate is not None:
            parts.append(f"attack success rate {_pct(self.success_rate)} of the correctly classified examples")
        med = self.norms["l2"]["median"]
        if med is not None:
            parts.append(f"median perturbation of the broken examples: L2 {_num(med)}, "
                         f"Linf {_num(self.norms['linf']['median'])}, L0 {_num(self.norms['l0']['median'], 0)}")
        if self.curve:
            parts.append("curve: " + ", ".join(f"eps {c.eps:.4g} -> {_pct(c.robust_accuracy)}" for c in self.curve))
        skipped = [a.label for a in self.attacks if a.skipped]
        if skipped:
            parts.append(f"skipped: {', '.join(skipped)}")
        return "; ".join(parts) + "."


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}%"


def _num(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.{digits}f}" if digits else f"{v:.0f}"


def _format_rows(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)
