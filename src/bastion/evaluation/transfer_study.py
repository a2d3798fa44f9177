"""`transfer`: how well adversarial examples crafted on one model (or an ensemble) fool others.

For every surrogate (each model alone, plus optionally the ensemble of all of them) and every
attack, adversarial examples are crafted on the surrogate only (`bastion.attacks.transfer.Transfer`:
the target is never queried) and then classified by every target. The entry of the
**transfer-success matrix** at (surrogate × attack, target) is the fraction of the examples the
*target* classifies correctly that the crafted inputs turn into a misclassification. Where the
surrogate is the target itself the entry is the white-box success rate, the upper bound of a
transfer attack.

Papers: Papernot, McDaniel & Goodfellow 2016, "Transferability in Machine Learning"
(https://arxiv.org/abs/1605.07277); Liu, Chen, Liu & Song 2017, "Delving into Transferable
Adversarial Examples and Black-box Attacks" (https://arxiv.org/abs/1611.02770, ensembles);
Dong et al. 2018, "Boosting Adversarial Attacks with Momentum" (MI-FGSM transfers better).

Inner attacks run without early stop where they have one (a point that just crosses the
surrogate's boundary transfers poorly; see `Transfer`).

Example:
    >>> report = transfer({"a": model_a, "b": model_b}, {"a": model_a, "b": model_b, "c": model_c},
    ...                   (x, y), "linf:0.1", attacks=["fgsm", "pgd", "mifgsm"], ensemble=True)
    >>> print(report.table())
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..attacks.base import Attack, attack_mode, create_attack
from ..attacks.transfer import Transfer
from ..threat import ThreatModel
from .audit import _spread
from .audit_report import _finite, format_threat
from .evaluate import _as_tensors, _jsonable, attack_config

__all__ = ["TRANSFER_SCHEMA", "TransferReport", "transfer"]

TRANSFER_SCHEMA = "bastion-transfer/1"


@dataclass
class TransferReport:
    """The transfer-success matrix (``report.json``: schema ``bastion-transfer/1``).

    Attributes:
        threat, n: the threat and the number of examples crafted.
        surrogates, targets: names (the ensemble row is ``"ensemble(a+b)"``).
        attacks: attack names, in order.
        rows: one per (surrogate, attack): ``{"surrogate", "attack", "config", "success":
            {target: rate}, "n_correct": {target: count}, "time_s"}``; a rate is the fraction of
            the examples that target classifies correctly which the crafted inputs fool.
        clean_accuracy: {target: accuracy on the n examples}.
        white_box: {(surrogate, target) pairs that are the same model, as "s|t"}.
    """

    threat: str
    n: int
    surrogates: list[str]
    targets: list[str]
    attacks: list[str]
    rows: list[dict[str, Any]]
    clean_accuracy: dict[str, float]
    white_box: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    time_s: float = 0.0

    def success(self, surrogate: str, attack: str, target: str) -> float | None:
        """The matrix entry (None where the target classifies nothing correctly)."""
        for r in self.rows:
            if r["surrogate"] == surrogate and r["attack"] == attack:
                return r["success"][target]
        raise KeyError(f"no row for surrogate {surrogate!r} and attack {attack!r}")

    def matrix(self) -> list[list[float | None]]:
        """Rows (surrogate × attack, in `rows` order) × targets."""
        return [[r["success"][t] for t in self.targets] for r in self.rows]

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"schema": TRANSFER_SCHEMA, **_finite(_jsonable(d))}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TransferReport":
        if d.get("schema") != TRANSFER_SCHEMA:
            raise ValueError(f"not a transfer report: schema {d.get('schema')!r} (expected {TRANSFER_SCHEMA!r})")
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def save(self, path: str | Path) -> Path:
        from ..checkpoint import atomic_write_text

        return atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "TransferReport":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def table(self) -> str:
        """The matrix as text; white-box entries are marked with *."""
        wb = set(self.white_box)
        head = ["surrogate", "attack", *self.targets]
        rows = [head, ["(clean accuracy)", "", *[_pct(self.clean_accuracy[t]) for t in self.targets]]]
        for r in self.rows:
            rows.append([r["surrogate"], r["attack"],
                         *[_pct(r["success"][t]) + ("*" if f"{r['surrogate']}|{t}" in wb else "")
                           for t in self.targets]])
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines) + (f"\ntransfer success at {format_threat(self.threat)} on {self.n} examples "
                                   "(of the examples each target classifies correctly); * = white box")

    def to_html(self) -> str:
        from .html import _CSS, _e, _pct as hpct

        wb = set(self.white_box)
        out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
               f"<title>Bastion transfer — {_e(format_threat(self.threat))}</title>",
               f"<style>{_CSS}</style></head><body>", "<h1>Bastion transfer study</h1>",
               f'<p class="sub">{_e(format_threat(self.threat))} · {self.n} examples · {self.time_s:.1f} s</p>',
               "<p class='ev'>Entry: the fraction of the examples the target (column) classifies correctly that the "
               "adversarial examples crafted on the surrogate (row) misclassify. Bold: white box (surrogate = "
               "target), the upper bound of a transfer attack.</p>",
               "<table id='matrix'><tr><th>surrogate</th><th>attack</th>"
               + "".join(f"<th>{_e(t)}</th>" for t in self.targets) + "</tr>",
               "<tr><td colspan='2'><i>clean accuracy</i></td>"
               + "".join(f"<td class='num'>{hpct(self.clean_accuracy[t])}</td>" for t in self.targets) + "</tr>"]
        for r in self.rows:
            cells = []
            for t in self.targets:
                v = hpct(r["success"][t])
                if f"{r['surrogate']}|{t}" in wb:
                    v = f"<b>{v}</b>"
                cells.append(f"<td class='num'>{v}</td>")
            out.append(f"<tr><td>{_e(r['surrogate'])}</td><td>{_e(r['attack'])}</td>{''.join(cells)}</tr>")
        out.append("</table>")
        out.append("<h2>Configuration</h2><details><summary>what was run</summary><pre>"
                   + _e(json.dumps(self.config, indent=2, sort_keys=True, default=str)) + "</pre></details>")
        out.append("</body></html>")
        return "\n".join(out)

    def save_html(self, path: str | Path) -> Path:
        from ..checkpoint import atomic_write_text

        return atomic_write_text(path, self.to_html())


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _named(models: Mapping[str, nn.Module] | Sequence[nn.Module] | nn.Module, arg: str,
           prefix: str) -> dict[str, nn.Module]:
    if isinstance(models, nn.Module):
        models = [models]
    if isinstance(models, Mapping):
        out = dict(models)
    elif isinstance(models, Sequence) and not isinstance(models, str):
        out = {f"{prefix}{i}": m for i, m in enumerate(models)}
    else:
        raise TypeError(f"`{arg}` must be a model, a list of models or a dict name -> model, "
                        f"got {type(models).__name__}")
    if not out:
        raise ValueError(f"`{arg}` must hold at least one model")
    for k, m in out.items():
        if not isinstance(m, nn.Module):
            raise TypeError(f"`{arg}[{k!r}]` must be an nn.Module returning logits, got {type(m).__name__}")
    return out


def _inner(entry: Any, steps: int) -> Attack:
    if isinstance(entry, Attack):
        return entry
    name, kw = (entry, {}) if isinstance(entry, str) else (entry[0], dict(entry[1]))
    probe = create_attack(name)
    fields = {f.name for f in dataclasses.fields(probe)} if dataclasses.is_dataclass(probe) else set()
    if "steps" in fields:
        kw.setdefault("steps", steps)
    if "early_stop" in fields:
        kw.setdefault("early_stop", False)
    return create_attack(name, **kw)


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    with attack_mode(model):
        return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)])


def transfer(surrogates: Mapping[str, nn.Module] | Sequence[nn.Module] | nn.Module,
             targets: Mapping[str, nn.Module] | Sequence[nn.Module] | nn.Module, data: Any,
             threat: ThreatModel | str, *, attacks: Sequence[Any] = ("fgsm", "pgd", "mifgsm"),
             ensemble: bool = False, combine: str = "logits", n: int | None = 500, steps: int = 20, seed: int = 0,
             batch_size: int = 256) -> TransferReport:
    """The transfer-success matrix: rows surrogate × attack, columns targets.

    Args:
        surrogates: the models to craft on: a dict name -> model (names label the rows), a
            list (named s0, s1, ...) or one model. A model that is also a target (the same
            object, or the same name) gives white-box entries.
        targets: the models to fool (dict, list named t0, t1, ..., or one model).
        data: a bastion `Dataset` or ``(images, labels)``.
        threat: a `ThreatModel` or a string like ``"linf:0.1"``.
        attacks: registered attack names (iterative ones get ``steps`` and no early stop),
            ``(name, kwargs)`` or `Attack` instances. (Default: fgsm, pgd, mifgsm)
        ensemble: also craft on the ensemble of all surrogates (row ``ensemble(a+b+...)``).
        combine: how the ensemble combines its members ("logits", "probs" or "loss"; see
            `Transfer`). (Default: "logits")
        n: examples, spread evenly over `data`; None: all. (Default: 500)
        steps: steps of the iterative attacks given by name. (Default: 20)
        seed: seeds the attacks. (Default: 0)
        batch_size: examples per attack call. (Default: 256)

    Returns:
        a `TransferReport`.
    """
    t_start = time.perf_counter()
    threat = ThreatModel.parse(threat)
    sur = _named(surrogates, "surrogates", "s")
    tgt = _named(targets, "targets", "t")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"`n` must be a positive int or None, got {n!r}")
    if not attacks:
        raise ValueError("`attacks` must name at least one attack")
    inners = [_inner(a, steps) for a in attacks]
    names = [a.name for a in inners]
    if len(set(names)) != len(names):
        names = [f"{nm}#{i + 1}" for i, nm in enumerate(names)]
    rows_models: list[tuple[str, tuple[nn.Module, ...]]] = [(k, (m,)) for k, m in sur.items()]
    if ensemble:
        if len(sur) < 2:
            raise ValueError("`ensemble=True` needs at least two surrogates")
        rows_models.append((f"ensemble({'+'.join(sur)})", tuple(sur.values())))
    x_all, y_all = _as_tensors(data)
    total = int(y_all.shape[0])
    if total == 0:
        raise ValueError("`data` is empty")
    idx = _spread(total, total if n is None else n)
    first = next(iter(tgt.values()))
    p = next(first.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    x, y = x_all[idx].to(dev).float(), y_all[idx].to(dev).long()
    correct = {t: (_predict(m, x, batch_size) == y) for t, m in tgt.items()}
    clean = {t: float(c.float().mean()) for t, c in correct.items()}
    white_box = [f"{s}|{t}" for s, members in rows_models for t, tm in tgt.items()
                 if len(members) == 1 and (members[0] is tm or s == t)]
    rows: list[dict[str, Any]] = []
    for s, members in rows_models:
        for name, inner in zip(names, inners):
            t0 = time.perf_counter()
            atk = Transfer(surrogates=members, attack=inner, combine=combine)
            # craft once on every example (the target passed is a surrogate; it only judges the
            # attack's own early-stop bookkeeping — the crafted points do not depend on it)
            parts = [atk(members[0], x[i:i + batch_size], y[i:i + batch_size], threat, seed=seed).x_adv
                     for i in range(0, x.shape[0], batch_size)]
            x_adv = torch.cat(parts)
            success, n_correct = {}, {}
            for t, m in tgt.items():
                ok = correct[t]
                fooled = (_predict(m, x_adv, batch_size) != y) & ok
                n_correct[t] = int(ok.sum())
                success[t] = int(fooled.sum()) / n_correct[t] if n_correct[t] else None
            rows.append({"surrogate": s, "attack": name, "config": attack_config(inner), "success": success,
                         "n_correct": n_correct, "time_s": round(time.perf_counter() - t0, 3)})
    config = {"threat": str(threat), "n": int(idx.numel()), "data_size": total, "seed": seed, "steps": steps,
              "combine": combine, "ensemble": ensemble, "batch_size": batch_size,
              "selection": "evenly spaced: index (i·N)//n", "device": str(dev)}
    report = TransferReport(threat=str(threat), n=int(idx.numel()), surrogates=[s for s, _ in rows_models],
                            targets=list(tgt), attacks=names, rows=rows, clean_accuracy=clean, white_box=white_box,
                            config=config, time_s=round(time.perf_counter() - t_start, 3))
    return TransferReport.from_dict(report.to_dict())
