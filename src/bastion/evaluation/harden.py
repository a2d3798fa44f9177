"""`harden`: add defenses one at a time until an *adaptive* attack's success rate meets a target.

The loop (one round per defense of the list, plus round 0 for the model as given):

1. attack the current pipeline with the attack pool twice: **naive** (straight through the real
   pipeline, as most papers did) and **adaptive** (the audit's `adaptive_plan`: BPDA through
   every non-differentiable component with its declared stand-in, EOT over randomized ones,
   detector-aware PGD where there is a detector — Athalye, Carlini & Wagner 2018, "Obfuscated
   Gradients Give a False Sense of Security", https://arxiv.org/abs/1802.00420);
2. the **success rate** of a view is the fraction of the correctly classified examples that
   some attack of the pool turned into a misclassified, undetected input (worst case per example,
   judged on the real pipeline, over ``passes`` forward passes when it is randomized);
3. if the success rate — worst case per example over both views, so in practice the adaptive
   one — is at most the target, stop; otherwise apply the next defense
   and go to 1.

The naive number alone never decides: a defense that merely masks gradients (JPEG, bit-depth
reduction) lowers the naive number and fools a loop that trusts it, but not this one.

Defenses (``"name:key=value,..."``, the name looked up in this order):

* a **training objective** (`bastion.defenses.training`, e.g. ``fast-at:epochs=2``): the
  current classifier is fine-tuned on `train` with it through the `Trainer`. The keys of
  `TrainConfig` (``epochs``, ``lr``, ``batch_size``, ``optimizer``, ``schedule``, ...) go to
  the loop, the others to the objective; an adversarial objective trains at the harden
  threat unless given ``eps``/``threat``. Defaults of the fine-tune: 2 epochs, SGD (Nesterov)
  with peak lr 0.02, batch 64 (the demo's hardening fine-tune), the paper's schedule. The
  classifier is fine-tuned on the raw images, not through transforms already in the pipeline;
* an **input transform** (`bastion.defenses.transforms`, e.g. ``jpeg:quality=75``): appended to
  the pipeline's transforms (`Defended`);
* a **detector** (`bastion.defenses.detectors`, e.g. ``kde``): fit on `train` images, calibrated
  on other `train` images at ``detector_fpr`` and attached (a later detector replaces it; it is
  re-fit whenever the classifier changes);
* a **combination**: a list/tuple of specs (``"a+b"`` on the command line) applied in one round.

Example (the digits TinyCNN of the tests; ``pytest tests/test_harden.py -k cli -s`` runs the CLI):
    >>> report = harden(model, test, "linf:0.2", target=0.5, train=train,
    ...                 defenses=["bit-depth:bits=1", "fast-at:epochs=3"])
    >>> print(report.table())
    >>> report.save("report.json"); report.save_html("report.html")
    >>> hardened = report.pipeline   # the final `Defended` pipeline (not serialized)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..attacks.base import Attack, create_attack
from ..threat import Norm, ThreatModel
from .audit import AuditBudget, _Auditor, _spread, adaptive_plan
from .audit_report import _finite, format_threat
from .evaluate import _as_tensors, _jsonable, attack_config, model_digest

__all__ = ["HARDEN_SCHEMA", "HardenReport", "HardenRound", "harden", "parse_defense"]

HARDEN_SCHEMA = "bastion-harden/1"
# Fine-tune defaults (the demo's hardening fine-tune: the model is already trained).
FINETUNE_DEFAULTS: dict[str, Any] = {"epochs": 2, "batch_size": 64, "lr": 0.02, "momentum": 0.9, "nesterov": True,
                                     "weight_decay": 5e-4}


# ============================================================================================
# Defense specs
# ============================================================================================

def _options(spec: str) -> tuple[str, dict[str, Any]]:
    from ..defenses.transforms.base import _split_options

    name, _, opts = spec.strip().partition(":")
    kw: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in _split_options(opts))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"defense option {item!r} in {spec!r} must be key=value")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        kw[key.strip().replace("-", "_")] = value
    return name.strip().lower(), kw


def parse_defense(spec: str) -> tuple[str, str, dict[str, Any]]:
    """``"name:key=value,..."`` -> (kind, name, options); kind is "training", "transform" or "detector".

    Example:
        >>> parse_defense("fast-at:epochs=2")
        ('training', 'fast-at', {'epochs': 2})
    """
    from ..defenses.detectors import DETECTORS
    from ..defenses.training import OBJECTIVES
    from ..defenses.transforms import TRANSFORMS

    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a defense must be a non-empty spec string like 'fast-at:epochs=2', got {spec!r}")
    name, kw = _options(spec)
    for kind, reg in (("training", OBJECTIVES), ("transform", TRANSFORMS), ("detector", DETECTORS)):
        if name in reg.names():
            return kind, name, kw
    raise ValueError(f"`defenses`: unknown defense {name!r} in {spec!r}: not a training objective "
                     f"({', '.join(OBJECTIVES.names())}), a transform ({', '.join(TRANSFORMS.names())}) or a "
                     f"detector ({', '.join(DETECTORS.names())})")


def _round_specs(item: str | Sequence[str]) -> list[str]:
    if isinstance(item, str):
        return [s.strip() for s in item.split("+") if s.strip()] or [item]
    if isinstance(item, (list, tuple)) and item and all(isinstance(s, str) for s in item):
        return list(item)
    raise ValueError(f"each entry of `defenses` must be a spec string or a list of them, got {item!r}")


# ============================================================================================
# The report
# ============================================================================================

@dataclass
class HardenRound:
    """One round: the defense applied (None: the model as given), and the attacks' outcome after it.

    Attributes:
        round: 0 for the model as given, then 1, 2, ...
        defense: the spec(s) applied this round ("a + b" for a combination), None in round 0.
        kinds: "training" / "transform" / "detector" of each spec.
        pipeline: every defense applied so far, in order.
        clean_accuracy: of the pipeline on the ``n`` examples (every pass right, if randomized).
        naive_success, adaptive_success: fraction of the correctly classified examples that some
            attack of the pool broke (misclassified and not flagged), naive / adaptive view.
        success: the worst case per example over both views (what decides; a weak BPDA stand-in
            can never make the loop stop early).
        met: success ≤ target.  naive_met: what a loop trusting the naive number would say.
        techniques: what the adaptive attack needed ("BPDA through jpeg", "EOT over 8 draws").
        attacks: per attack: label, view, success rate alone, time.
        train_time_s, attack_time_s, time_s: seconds spent applying the defense, attacking, both.
        notes: e.g. the fine-tune's schedule, a detector re-fit.
    """

    round: int
    defense: str | None
    kinds: list[str]
    pipeline: list[str]
    clean_accuracy: float
    naive_success: float | None
    adaptive_success: float | None
    success: float | None
    met: bool
    naive_met: bool
    techniques: list[str]
    attacks: list[dict[str, Any]]
    train_time_s: float
    attack_time_s: float
    time_s: float
    notes: list[str] = field(default_factory=list)


@dataclass
class HardenReport:
    """What `harden` did, round by round (``report.json``: schema ``bastion-harden/1``).

    ``{"schema", "threat", "target", "n", "pool", "defenses", "met", "verdict",
    "rounds": [HardenRound as a dict, ...], "config", "time_s"}``; ``pipeline`` (the final
    `Defended`) is kept on the object only.
    """

    threat: str
    target: float
    n: int
    pool: list[Any]
    defenses: list[str]
    rounds: list[HardenRound]
    met: bool
    verdict: str
    config: dict[str, Any] = field(default_factory=dict)
    time_s: float = 0.0
    pipeline: Any = field(default=None, repr=False, compare=False)

    @property
    def final(self) -> HardenRound:
        return self.rounds[-1]

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "pipeline"}
        d["rounds"] = [dataclasses.asdict(r) for r in self.rounds]
        return {"schema": HARDEN_SCHEMA, **_finite(_jsonable(d))}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HardenReport":
        if d.get("schema") != HARDEN_SCHEMA:
            raise ValueError(f"not a harden report: schema {d.get('schema')!r} (expected {HARDEN_SCHEMA!r})")
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d and f.name != "pipeline"}
        kw["rounds"] = [HardenRound(**r) for r in d["rounds"]]
        return cls(**kw)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, allow_nan=False)

    def save(self, path: str | Path) -> Path:
        from ..checkpoint import atomic_write_text

        return atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "HardenReport":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_html(self) -> str:
        return render_harden(self)

    def save_html(self, path: str | Path) -> Path:
        from ..checkpoint import atomic_write_text

        return atomic_write_text(path, self.to_html())

    def table(self) -> str:
        """The rounds as a text table, then the verdict."""
        rows = [["round", "defense", "clean", "naive success", "adaptive success", "worst case", "target met",
                 "time"]]
        for r in self.rounds:
            rows.append([str(r.round), r.defense or "(as given)", _pct(r.clean_accuracy), _pct(r.naive_success),
                         _pct(r.adaptive_success), _pct(r.success), "yes" if r.met else "no", f"{r.time_s:.1f} s"])
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines) + "\n" + self.verdict


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def render_harden(report: HardenReport) -> str:
    """A self-contained HTML page: the verdict and the rounds table (the audit page's style)."""
    from .html import _CSS, _e, _pct as hpct

    r = report
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>Bastion harden — {_e(format_threat(r.threat))}</title>", f"<style>{_CSS}</style></head><body>",
           "<h1>Bastion hardening loop</h1>",
           f'<p class="sub">{_e(format_threat(r.threat))} · target attack success ≤ {hpct(r.target)} · '
           f"{r.n} examples"
           f" · {r.time_s:.1f} s</p>",
           f'<div class="verdict {"v-ok" if r.met else "v-bad"}" id="verdict">{_e(r.verdict)}</div>',
           "<h2>Rounds</h2><p class='ev'>Success rate: the fraction of the correctly classified examples that some "
           "attack of the pool turned into a misclassified, undetected input. The worst case over both views "
           "(in practice the adaptive one: BPDA, EOT, detector loss, from the declarations) decides whether the "
           "target is met.</p>",
           "<table id='rounds'><tr><th>round</th><th>defense applied</th><th>clean accuracy</th><th>naive success</th>"
           "<th>adaptive success</th><th>worst case</th><th>target met</th><th>adaptive attack</th><th>time</th></tr>"]
    for rd in r.rounds:
        out.append(f"<tr><td class='num'>{rd.round}</td><td>{_e(rd.defense or '(as given)')}</td>"
                   f"<td class='num'>{hpct(rd.clean_accuracy)}</td><td class='num'>{hpct(rd.naive_success)}</td>"
                   f"<td class='num'>{hpct(rd.adaptive_success)}</td><td class='num'>{hpct(rd.success)}</td>"
                   f"<td>{'yes' if rd.met else 'no'}"
                   f"{' (naive: yes)' if rd.naive_met and not rd.met else ''}</td>"
                   f"<td>{_e(', '.join(rd.techniques) or 'same as naive')}</td>"
                   f"<td class='num'>{rd.time_s:.1f} s</td></tr>")
    out.append("</table>")
    out.append("<h2>Attacks per round</h2><table><tr><th>round</th><th>attack</th><th>view</th><th>success</th>"
               "<th>time</th></tr>")
    for rd in r.rounds:
        for a in rd.attacks:
            out.append(f"<tr><td class='num'>{rd.round}</td><td>{_e(a['label'])}</td><td>{_e(a['view'])}</td>"
                       f"<td class='num'>{hpct(a['success'])}</td><td class='num'>{a['time_s']:.1f} s</td></tr>")
    out.append("</table>")
    notes = [f"round {rd.round}: {n}" for rd in r.rounds for n in rd.notes]
    if notes:
        out.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    out.append("<h2>Configuration</h2><details><summary>what was run</summary><pre>"
               + _e(json.dumps(r.config, indent=2, sort_keys=True, default=str)) + "</pre></details>")
    out.append("</body></html>")
    return "\n".join(out)


# ============================================================================================
# The loop
# ============================================================================================

def _pool_attacks(pool: Sequence[Any], steps: int) -> list[Attack]:
    out = []
    for i, entry in enumerate(pool):
        if isinstance(entry, Attack):
            out.append(entry)
        elif isinstance(entry, str):
            fields = {f.name for f in dataclasses.fields(create_attack(entry))}
            out.append(create_attack(entry, steps=steps) if "steps" in fields else create_attack(entry))
        elif isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str):
            out.append(create_attack(entry[0], **dict(entry[1])))
        else:
            raise ValueError(f"`pool[{i}]` must be an Attack, a registered attack name or (name, kwargs), "
                             f"got {entry!r}")
    if not out:
        raise ValueError("`pool` must hold at least one attack")
    return out


class _State:
    """The pipeline being built: the classifier, the transforms, the detector (and how to re-fit it)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.transforms: list[nn.Module] = []
        self.detector: Any = None
        self.detector_spec: str | None = None

    def pipeline(self) -> nn.Module:
        from ..defenses.pipeline import Defended

        if not self.transforms and self.detector is None:
            return self.model
        return Defended(list(self.transforms), self.model, detector=self.detector)


def _finetune(model: nn.Module, name: str, kw: dict[str, Any], train: Any, threat: ThreatModel, seed: int,
              device: torch.device, progress: bool) -> tuple[nn.Module, list[str]]:
    from ..cli import paper_training_loop
    from ..defenses.training import TrainConfig, Trainer, create_objective
    from ..defenses.training.adversarial import AdversarialObjective
    from ..defenses.training.objectives import OBJECTIVES

    cfg_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    loop = {**FINETUNE_DEFAULTS, **{k: v for k, v in kw.items() if k in cfg_keys}}
    obj_kw = {k: v for k, v in kw.items() if k not in cfg_keys}
    cls = OBJECTIVES.get(name)
    if isinstance(cls, type) and issubclass(cls, AdversarialObjective) and not {"eps", "threat", "norm"} & set(obj_kw):
        obj_kw["threat"] = str(threat)
    objective = create_objective(name, **obj_kw)
    epochs, schedule, notes = paper_training_loop(objective, int(loop.pop("epochs")), loop.pop("schedule", None))
    loop.setdefault("seed", seed)
    cfg = TrainConfig(epochs=epochs, schedule=schedule, device=str(device), **loop)
    tuned = copy.deepcopy(model)
    frozen = not any(p.requires_grad for p in tuned.parameters())
    tuned.requires_grad_(True)
    Trainer(tuned, train, None, cfg, objective, progress=progress).fit()
    tuned.eval()
    if frozen:
        tuned.requires_grad_(False)
    opts = ", ".join(f"{k}={v}" for k, v in objective.config().items() if k != "name")
    notes.append(f"fine-tuned with {name} ({opts}"
                 f"), {epochs} epoch(s), lr {cfg.lr}, schedule {schedule}, on {len(train)} training images")
    return tuned, notes


def _fit_detector(spec: str, model: nn.Module, train: Any, fit_n: int, cal_n: int, fpr: float, seed: int) -> Any:
    from ..defenses.detectors import create_detector

    need = fit_n + cal_n
    if need > len(train):
        raise ValueError(f"`detector_fit` {fit_n} + `detector_calibrate` {cal_n} = {need} exceeds the {len(train)} "
                         "`train` images")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    fit, cal = perm[:fit_n], perm[fit_n:need]
    p = next(model.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    det = create_detector(spec)
    det.fit(model, train.images[fit].to(dev), train.labels[fit].to(dev))
    det.calibrate(train.images[cal].to(dev), fpr)
    return det.to(dev)


def harden(model: nn.Module, data: Any, threat: ThreatModel | str, *, pool: Sequence[Any] = ("fgsm", "pgd"),
           target: float = 0.5, defenses: Sequence[str | Sequence[str]] = (), train: Any = None,
           n: int | None = 200, steps: int = 20, seed: int = 0, eot: int = 8, passes: int = 4,
           batch_size: int = 256, detector_fpr: float = 0.05, detector_fit: int = 1000,
           detector_calibrate: int = 500, progress: bool = False) -> HardenReport:
    """Apply `defenses` in order until the adaptive attack's success rate is at most `target`.

    Args:
        model: the classifier (an `nn.Module` returning logits; it is never modified: a fine-tune
            trains a copy).
        data: the examples attacked each round: a bastion `Dataset` or ``(images, labels)``.
        threat: a `ThreatModel` or a string like ``"linf:0.2"`` (bounded linf, l2 or l1).
        pool: the attacks, names (``"pgd"`` gets ``steps``), ``(name, kwargs)`` or `Attack`s.
            (Default: ("fgsm", "pgd"))
        target: the attack-success rate to reach, in [0, 1]. (Default: 0.5)
        defenses: the specs to apply, in order (see the module docstring); one round each.
        train: a bastion `Dataset` for fine-tunes and detector fits (needed by those kinds).
        n: examples attacked, spread evenly over `data`; None: all. (Default: 200)
        steps: steps of the iterative attacks named in `pool`. (Default: 20)
        seed: seeds the attacks, the fine-tunes and the detector splits. (Default: 0)
        eot, passes: EOT draws per gradient and judging passes for randomized pipelines.
        batch_size: examples per attack call. (Default: 256)
        detector_fpr, detector_fit, detector_calibrate: a detector's clean false-positive rate and
            the `train` images it is fit / calibrated on.
        progress: show the fine-tunes' progress bars. (Default: False)

    Returns:
        a `HardenReport` (``.rounds``, ``.met``, ``.verdict``, ``.pipeline``: the final pipeline).
    """
    from ..data.base import Dataset

    t_start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module returning logits, got {type(model).__name__}")
    threat = ThreatModel.parse(threat)
    if threat.norm is Norm.L0 or not threat.bounded:
        raise ValueError(f"`threat` must be a bounded linf, l2 or l1 threat, got {threat}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 <= float(target) <= 1.0:
        raise ValueError(f"`target` must be an attack-success rate in [0, 1], got {target!r}")
    if isinstance(defenses, str):
        defenses = [defenses]
    rounds_specs = [_round_specs(d) for d in defenses]
    parsed = [[parse_defense(s) for s in specs] for specs in rounds_specs]  # bad names fail before any work
    needs_train = any(kind != "transform" for specs in parsed for kind, _, _ in specs)
    if needs_train and not isinstance(train, Dataset):
        raise ValueError("`train` (a bastion Dataset) is required for training and detector defenses")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"`n` must be a positive int or None, got {n!r}")
    attacks = _pool_attacks(pool, steps)
    budget = AuditBudget("harden", steps=steps, eot=eot, passes=passes)

    x_all, y_all = _as_tensors(data)
    if int(y_all.shape[0]) == 0:
        raise ValueError("`data` is empty")
    idx = _spread(int(y_all.shape[0]), int(y_all.shape[0]) if n is None else n)
    p = next(model.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    x, y = x_all[idx].to(dev).float(), y_all[idx].to(dev).long()

    state = _State(model)
    rounds: list[HardenRound] = []
    devices = [dev] if dev.type == "cuda" else []
    flat_specs = [" + ".join(s) for s in rounds_specs]
    for r in range(len(parsed) + 1):
        t0 = time.perf_counter()
        notes: list[str] = []
        kinds: list[str] = []
        if r > 0:
            for (kind, name, kw), spec in zip(parsed[r - 1], rounds_specs[r - 1]):
                kinds.append(kind)
                if kind == "training":
                    with torch.random.fork_rng(devices=devices):
                        torch.manual_seed(seed + r)
                        state.model, tn = _finetune(state.model, name, kw, train, threat, seed + r, dev, progress)
                    notes += tn
                    if state.detector_spec is not None:
                        state.detector = _fit_detector(state.detector_spec, state.model, train, detector_fit,
                                                       detector_calibrate, detector_fpr, seed)
                        notes.append(f"detector {state.detector_spec} re-fit on the fine-tuned classifier")
                elif kind == "transform":
                    from ..defenses.transforms import create_transform

                    t = create_transform(spec).to(dev)
                    if getattr(t, "fitted", True) is False and callable(getattr(t, "fit", None)):
                        if not isinstance(train, Dataset):
                            raise ValueError(f"transform {spec!r} needs `train` images to fit")
                        t.fit(train.images)
                    state.transforms.append(t)
                else:
                    if state.detector_spec is not None:
                        notes.append(f"detector {spec} replaces {state.detector_spec}")
                    state.detector_spec = spec
                    state.detector = _fit_detector(spec, state.model, train, detector_fit, detector_calibrate,
                                                   detector_fpr, seed)
        train_time = time.perf_counter() - t0
        t1 = time.perf_counter()
        rounds.append(_attack_round(r, flat_specs[r - 1] if r else None, kinds, flat_specs[:r], state, x, y, threat,
                                    attacks, budget, seed, batch_size, float(target), devices, notes))
        rounds[-1].train_time_s = round(train_time, 3)
        rounds[-1].attack_time_s = round(time.perf_counter() - t1, 3)
        rounds[-1].time_s = round(time.perf_counter() - t0, 3)
        if rounds[-1].met:
            break

    last = rounds[-1]
    t = format_threat(str(threat))
    if last.met:
        how = "the model as given" if last.round == 0 else " → ".join(last.pipeline)
        verdict = (f"target met in round {last.round} ({how}): attack success {_pct(last.success)} "
                   f"≤ {_pct(float(target))} at {t}, clean accuracy {_pct(last.clean_accuracy)}")
    else:
        verdict = (f"target not met: the defense list is exhausted after {len(rounds) - 1} round(s); attack "
                   f"success {_pct(last.success)} > {_pct(float(target))} at {t}")
    fooled = [rd.round for rd in rounds if rd.naive_met and not rd.met]
    if fooled:
        verdict += (f"; the naive attack alone would have declared the target met in round(s) "
                    f"{', '.join(map(str, fooled))} (obfuscated gradients)")
    config = {"threat": str(threat), "target": float(target), "n": int(idx.numel()), "data_size": int(y_all.shape[0]),
              "pool": [attack_config(a) for a in attacks], "steps": steps, "seed": seed, "eot": eot, "passes": passes,
              "batch_size": batch_size, "detector_fpr": detector_fpr, "detector_fit": detector_fit,
              "detector_calibrate": detector_calibrate, "model_digest": model_digest(model),
              "final_digest": model_digest(state.model), "selection": "evenly spaced: index (i·N)//n",
              "device": str(dev)}
    report = HardenReport(threat=str(threat), target=float(target), n=int(idx.numel()),
                          pool=[a.name for a in attacks], defenses=flat_specs, rounds=rounds, met=last.met,
                          verdict=verdict, config=config, time_s=round(time.perf_counter() - t_start, 3))
    final = HardenReport.from_dict(report.to_dict())  # JSON-normal form: equal to what report.json reads back
    final.pipeline = state.pipeline()
    return final


def _attack_round(r: int, defense: str | None, kinds: list[str], pipeline: list[str], state: _State, x: Tensor,
                  y: Tensor, threat: ThreatModel, attacks: list[Attack], budget: AuditBudget, seed: int,
                  batch_size: int, target: float, devices: list[torch.device], notes: list[str]) -> HardenRound:
    """Attack the current pipeline with the pool, naive and adaptive; judge on the real pipeline."""
    pipe = state.pipeline()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        plan = adaptive_plan(pipe, eot=budget.eot, passes=budget.passes, probe=x[:16])
        aud = _Auditor(pipe, x, y, threat, budget, seed, batch_size, False, None)
        aud.plan = plan
        wrong, _, _, _ = aud._judge(x, y)
        clean_ok = (~wrong).cpu()
        idx = clean_ok.nonzero().squeeze(1)
        n_ok = int(idx.numel())
        views = ["naive", "adaptive"]
        per_view: dict[str, Tensor] = {v: torch.zeros(len(clean_ok), dtype=torch.bool) for v in views}
        rows: list[dict[str, Any]] = []
        for view in views:
            if view == "adaptive" and plan.same_as_naive:
                per_view["adaptive"] = per_view["naive"].clone()
                continue
            model = plan.naive if view == "naive" else plan.model
            items: list[Attack] = list(attacks)
            if view == "adaptive" and plan.detector is not None:
                from ..attacks.detector_aware import DetectorAwarePGD

                items.append(DetectorAwarePGD(detector=plan.detector, lam=1.0, steps=budget.steps))
            for atk in items:
                run = aud._attack(f"{view}:{atk.name}", view, atk, model, idx, threat, "all", keep=False)
                broken = run.win & clean_ok
                per_view[view] |= broken
                rows.append({"label": run.label, "view": view if not plan.same_as_naive else "both",
                             "config": run.config, "success": int(broken.sum()) / n_ok if n_ok else None,
                             "time_s": round(run.time_s, 3)})
    rate = {v: (int(per_view[v].sum()) / n_ok if n_ok else None) for v in views}
    worst = int((per_view["naive"] | per_view["adaptive"]).sum()) / n_ok if n_ok else None
    met = worst is not None and worst <= target + 1e-12
    naive_met = rate["naive"] is not None and rate["naive"] <= target + 1e-12
    if n_ok == 0:
        notes = [*notes, "no example is classified correctly: nothing to attack, the target counts as not met"]
    return HardenRound(round=r, defense=defense, kinds=kinds, pipeline=list(pipeline),
                       clean_accuracy=n_ok / len(clean_ok), naive_success=rate["naive"],
                       adaptive_success=rate["adaptive"], success=worst, met=met, naive_met=naive_met,
                       techniques=list(plan.techniques), attacks=rows,
                       train_time_s=0.0, attack_time_s=0.0, time_s=0.0, notes=notes)
