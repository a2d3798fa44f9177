"""`evaluate`: robust accuracy under a suite of attacks, worst case per example, streamed and resumable.

The rules (DESIGN.md, "Honest numbers"; AutoAttack's ``run_standard_evaluation``):

* clean accuracy first; an example the model already gets wrong counts as non-robust and is
  never attacked;
* the attacks run in order, each only on the examples that every earlier attack failed on, so
  an example is robust only if *every* attack failed (worst case per example) and the strong,
  slow attacks at the end of a suite cost only what is still standing;
* every number is over the same examples, and every example keeps its own record (which
  attack broke it, the adversarial prediction, the perturbation's norms).

Data is streamed in batches: only per-example scalars are kept (and, when asked, the tensors
of the first K examples for a picture), so memory does not grow with the dataset.

Resume: with ``state_file`` every finished batch is appended to a JSON Lines file (a header
line with the configuration, then one line per batch) and flushed to disk before the next
batch starts. A rerun with the same file and the same configuration reads the finished
batches back instead of recomputing them; a line torn by a crash is dropped and recomputed. The
report is always built from those per-batch records, so a resumed run and an uninterrupted one
go through the same code and give the same per-example results: the attacks' randomness is
per example (`bastion._rng.ExampleRNG`), with the seed ``seed + i`` for the i-th attack of the
suite, so an example's result does not depend on the batch it falls in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import distributed as D
from .._checks import check_images, check_labels
from ..attacks.base import ATTACKS, Attack, attack_mode, create_attack
from ..checkpoint import atomic_write_json
from ..threat import ThreatModel
from .presets import preset
from .report import NORMS, AttackStats, CurvePoint, Report

__all__ = ["STATE_SCHEMA", "evaluate", "resolve_attacks"]

log = logging.getLogger("bastion.evaluate")

STATE_SCHEMA = "bastion-eval-state/1"


# --------------------------------------------------------------------------- the suite
@dataclasses.dataclass(frozen=True)
class SuiteEntry:
    """One attack of a suite: a unique label, the attack (None if not installed) and its config."""

    label: str
    name: str
    attack: Attack | None
    config: dict[str, Any]
    unavailable: str | None = None

    def skip_reason(self, threat: ThreatModel) -> str | None:
        """Why this attack cannot run under `threat` (None: it can)."""
        if self.attack is None:
            return self.unavailable
        norms = tuple(self.attack.supports_norms)
        if threat.norm.value not in norms:
            return f"supports {', '.join(norms)} only; the threat is {threat}"
        if not threat.bounded and not self.attack.minimum_norm:
            return f"needs a finite eps; the threat is {threat}"
        return None


def _jsonable(value: Any) -> Any:
    """Hyper-parameter values as JSON: primitives as they are, attacks as their config, others by type."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Attack):
        return attack_config(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    # models, tensors, callables: not data we can (or should) write; name the type
    return f"<{type(value).__name__}>"


def attack_config(attack: Attack) -> dict[str, Any]:
    """``{"name": ..., field: value, ...}`` of an attack, JSON-ready.

    Unlike `Attack.config` (``dataclasses.asdict``) this never deep-copies a field, which matters
    for attacks holding models (transfer surrogates) or data.
    """
    out: dict[str, Any] = {"name": attack.name}
    for f in dataclasses.fields(attack):
        out[f.name] = _jsonable(getattr(attack, f.name))
    return out


def resolve_attacks(attacks: Any) -> list[SuiteEntry]:
    """A suite from a preset name, an `Attack`, or a list of attacks / names / ``(name, kwargs)`` pairs.

    Names are looked up in the attack registry (an unknown name raises, listing the valid
    ones). An attack of a *preset* that is not installed becomes an entry that is skipped with
    a note, so a preset keeps working while the registry grows.
    """
    from_preset = isinstance(attacks, str)
    if from_preset:
        items: list[Any] = list(preset(attacks))
    elif isinstance(attacks, Attack):
        items = [attacks]
    elif isinstance(attacks, Sequence) and not isinstance(attacks, (bytes, bytearray)):
        items = list(attacks)
    else:
        raise TypeError("`attacks` must be a preset name ('quick', 'standard', 'full'), an Attack, or a list of "
                        f"attacks, attack names or (name, kwargs) pairs; got {type(attacks).__name__}")
    if not items:
        raise ValueError("`attacks` is empty: give at least one attack")
    entries: list[SuiteEntry] = []
    seen: dict[str, int] = {}
    for item in items:
        attack: Attack | None
        unavailable = None
        if isinstance(item, Attack):
            attack, name, config = item, item.name, attack_config(item)
        else:
            if isinstance(item, str):
                name, kwargs = item, {}
            elif (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)
                  and isinstance(item[1], Mapping)):
                name, kwargs = item[0], dict(item[1])
            else:
                raise TypeError(f"each entry of `attacks` must be an Attack, a name or a (name, kwargs) pair; got {item!r}")
            if from_preset and name not in ATTACKS:
                attack, config = None, {"name": name, **_jsonable(kwargs)}
                unavailable = f"not installed (no attack {name!r} in the registry)"
            else:
                attack = create_attack(name, **kwargs)  # unknown names / options raise, listing valid ones
                name, config = attack.name, attack_config(attack)
        k = seen.get(name, 0) + 1
        seen[name] = k
        label = name if k == 1 else f"{name}#{k}"
        entries.append(SuiteEntry(label, name, attack, config, unavailable))
    return entries


# --------------------------------------------------------------------------- digests
def _tensor_bytes(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def model_digest(model: nn.Module) -> str:
    """SHA-1 of the model's state (names, dtypes, shapes, values): a resumed run must attack the same model."""
    h = hashlib.sha1()
    for k, v in sorted(model.state_dict().items()):
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(_tensor_bytes(v))
    return h.hexdigest()


def _batch_digest(x: Tensor, y: Tensor) -> str:
    h = hashlib.sha1(_tensor_bytes(x))
    h.update(_tensor_bytes(y))
    return h.hexdigest()


# --------------------------------------------------------------------------- the state file
class _StateFile:
    """JSON Lines: a header ``{"schema", "config"}``, then one finished batch per line."""

    def __init__(self, path: str | Path, config: dict[str, Any], batches: Sequence[int]) -> None:
        """`batches`: the batch indices this process handles, in order (its records must follow them)."""
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._rewrite(config, [])
            return
        lines = self.path.read_text().split("\n")
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError:
            header = None
        if not isinstance(header, dict) or header.get("schema") != STATE_SCHEMA:
            raise ValueError(f"`state_file` {self.path} is not a Bastion evaluation state ({STATE_SCHEMA}); "
                             "delete it or choose another file")
        saved, mine = header.get("config"), json.loads(json.dumps(config))
        if saved != mine:
            keys = sorted(k for k in set(saved or {}) | set(mine) if (saved or {}).get(k) != mine.get(k))
            detail = "; ".join(f"{k}: saved {(saved or {}).get(k)!r}, now {mine.get(k)!r}" for k in keys[:3])
            raise ValueError(f"`state_file` {self.path} belongs to another evaluation (its {', '.join(keys)} "
                             f"differ: {detail}); delete it, or rerun with the same configuration")
        torn = False
        for line in lines[1:]:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                torn = True  # a write cut short by a crash: this batch and anything after it is redone
                break
            if not isinstance(rec, dict) or len(self.records) >= len(batches) \
                    or rec.get("batch") != batches[len(self.records)]:
                torn = True
                break
            self.records.append(rec)
        if torn:
            log.warning("state file %s: dropping an incomplete record after batch %d", self.path, len(self.records))
            self._rewrite(config, self.records)

    def _rewrite(self, config: dict[str, Any], records: list[dict[str, Any]]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(json.dumps({"schema": STATE_SCHEMA, "config": config}, sort_keys=True) + "\n")
            for rec in records:
                f.write(json.dumps(rec, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def append(self, record: dict[str, Any]) -> None:
        """Append one batch as one line, on disk (fsync) before returning."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)


# --------------------------------------------------------------------------- one batch
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _floats(t: Tensor) -> list[float | None]:
    return [None if math.isnan(v) else v for v in t.tolist()]


def _run_suite(model: nn.Module, x: Tensor, y: Tensor, clean_pred: Tensor, entries: list[SuiteEntry],
               threat: ThreatModel, seed: int, standalone: bool, want_adv: bool
               ) -> tuple[dict[str, Any], Tensor | None, Tensor]:
    """Run the suite on one batch at one threat; returns (record, x_adv or None, adv_pred)."""
    n = y.shape[0]
    clean_correct = clean_pred == y
    robust = clean_correct.clone()
    broken_at = torch.full((n,), -1, dtype=torch.long, device=y.device)  # index of the breaking attack
    adv_pred = clean_pred.clone()
    norms = {k: torch.full((n,), math.nan, dtype=torch.float64) for k in NORMS}
    queries = torch.full((n,), -1, dtype=torch.long)
    x_adv = x.clone() if want_adv else None
    success: dict[str, list[bool | None]] = {}
    times: dict[str, float] = {}
    attacked: dict[str, int] = {}
    qtotal: dict[str, int] = {}
    for i, e in enumerate(entries):
        col: list[bool | None] = [None] * n
        success[e.label], times[e.label], attacked[e.label] = col, 0.0, 0
        if e.skip_reason(threat) is not None:
            continue
        assert e.attack is not None
        # Worst case per example: only what every earlier attack failed on (standalone: all correct ones).
        idx = (clean_correct if standalone else robust).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        _sync(x.device)
        t0 = time.perf_counter()
        res = e.attack(model, x[idx], y[idx], threat, seed=seed + i)
        _sync(x.device)
        times[e.label] = time.perf_counter() - t0
        attacked[e.label] = int(idx.numel())
        new = res.success & robust[idx]  # first success of an example in suite order
        sel = idx[new]
        broken_at[sel] = i
        adv_pred[sel] = res.adv_pred[new]
        sel_cpu = sel.cpu()
        for k in NORMS:
            norms[k][sel_cpu] = res.norms[k][new].detach().cpu().double()
        if res.queries is not None:
            queries[sel_cpu] = res.queries[new].cpu()
            qtotal[e.label] = int(res.queries.sum())
        if x_adv is not None:
            x_adv[sel] = res.x_adv[new]
            failed = ~res.success & robust[idx]  # keep the last failed attempt of a robust example
            x_adv[idx[failed]] = res.x_adv[failed]
        robust[sel] = False
        for j, s in zip(idx.tolist(), res.success.tolist()):
            col[j] = bool(s)
    labels = [e.label for e in entries]
    record = {
        "eps": threat.eps,
        "broken_by": [labels[i] if i >= 0 else None for i in broken_at.tolist()],
        "adv_pred": adv_pred.tolist(),
        **{k: _floats(norms[k]) for k in NORMS},
        "queries": [None if q < 0 else q for q in queries.tolist()],
        "success": success,
        "time_s": times,
        "attacked": attacked,
        "queries_total": qtotal,
    }
    return record, x_adv, adv_pred


# --------------------------------------------------------------------------- the report
def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None}
    return {"mean": float(statistics.fmean(values)), "median": float(statistics.median(values))}


def _build(records: list[dict[str, Any]], entries: list[SuiteEntry], threats: list[ThreatModel], main: int,
           n: int, standalone: bool) -> tuple[dict[str, Any], list[AttackStats], list[CurvePoint], list[str]]:
    labels = [e.label for e in entries]
    label = [v for r in records for v in r["label"]]
    clean_pred = [v for r in records for v in r["clean_pred"]]
    clean_correct = [a == b for a, b in zip(label, clean_pred)]
    n_correct = sum(clean_correct)
    per_eps: list[tuple[dict[str, Any], list[AttackStats], float]] = []
    for j, threat in enumerate(threats):
        runs = [r["runs"][j] for r in records]
        cols: dict[str, Any] = {k: [v for run in runs for v in run[k]] for k in ("broken_by", "adv_pred", *NORMS, "queries")}
        cols["success"] = {lb: [v for run in runs for v in run["success"][lb]] for lb in labels}
        stats: list[AttackStats] = []
        broken_so_far = 0
        for e in entries:
            skip = e.skip_reason(threat)
            mine = [i for i, b in enumerate(cols["broken_by"]) if b == e.label]
            broken_so_far += len(mine)
            n_att = sum(run["attacked"][e.label] for run in runs)
            n_succ = sum(1 for s in cols["success"][e.label] if s)
            gradient_free = e.attack is not None and e.attack.gradient_free
            q = None
            if gradient_free and skip is None:
                total = sum(run["queries_total"].get(e.label, 0) for run in runs)
                q = {"total": float(total), "mean": total / n_att if n_att else 0.0}
            stats.append(AttackStats(
                label=e.label, name=e.name, config=e.config, skipped=skip, n_attacked=n_att, n_success=n_succ,
                success_rate=n_succ / n_att if n_att else None,
                robust_accuracy=(n_correct - broken_so_far) / n,
                standalone_accuracy=(n_correct - n_succ) / n if standalone and skip is None else None,
                time_s=float(sum(run["time_s"][e.label] for run in runs)),
                queries=q,
                norms={k: _stats([cols[k][i] for i in mine]) for k in NORMS} if skip is None else {},
            ))
        robust = (n_correct - broken_so_far) / n
        per_eps.append((cols, stats, robust))

    cols, stats, robust = per_eps[main]
    broken = [i for i, b in enumerate(cols["broken_by"]) if b is not None]
    per_example = {"label": label, "clean_pred": clean_pred, "clean_correct": clean_correct, **cols}
    summary = {"clean_accuracy": n_correct / n, "robust_accuracy": robust,
               "norms": {k: _stats([cols[k][i] for i in broken]) for k in NORMS}, "per_example": per_example}
    curve = [CurvePoint(t.eps, r, {s.label: s.robust_accuracy for s in st}) for t, (_, st, r) in zip(threats, per_eps)]
    notes = [f"{s.label} skipped: {s.skipped}" for s in stats if s.skipped]
    for a, b in zip(curve, curve[1:]):
        if b.robust_accuracy > a.robust_accuracy:
            notes.append(f"robust accuracy rises from {a.robust_accuracy:.2%} at eps {a.eps:.4g} to "
                         f"{b.robust_accuracy:.2%} at eps {b.eps:.4g}: a larger ball contains the smaller one, so the "
                         "attacks are failing at the larger radius (too few steps, or gradient masking)")
    return summary, stats, curve, notes


# --------------------------------------------------------------------------- entry point
def _check_same_model(digest: str) -> None:
    """Every rank must attack the same weights, or the gathered report mixes models."""
    digests: list[Any] = [None] * D.world()[1]
    dist.all_gather_object(digests, digest)
    if len(set(digests)) > 1:
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        raise ValueError(f"`model` differs between processes (ranks {bad} differ from rank 0): load the same "
                         "checkpoint on every rank")


def _gather_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's batch records, on every rank, in batch order."""
    parts: list[Any] = [None] * D.world()[1]
    dist.all_gather_object(parts, records)
    return sorted((r for part in parts for r in part), key=lambda r: r["batch"])


def _as_tensors(data: Any) -> tuple[Tensor, Tensor]:
    from ..data.base import Dataset

    if isinstance(data, Dataset):
        return data.images, data.labels
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        check_labels(y, None, x.shape[0] if x.dim() else None, "data[1] (labels)")
        if x.dim() != 4:
            raise ValueError(f"`data` images must have shape N×C×H×W, got {tuple(x.shape)}")
        return x, y
    raise TypeError(f"`data` must be a bastion Dataset or an (images, labels) tuple of tensors, got {type(data).__name__}")


def evaluate(model: nn.Module, data: Any, threat: ThreatModel | str, attacks: Any = "standard",
             epsilons: Sequence[float] | None = None, batch_size: int = 256, seed: int = 0,
             state_file: str | Path | None = None, progress: bool = True, device: str | torch.device | None = None,
             *, standalone: bool = False, keep_examples: int = 0) -> Report:
    """Robust accuracy of `model` on `data` under a suite of attacks, worst case per example.

    Args:
        model: an `nn.Module` returning logits for images in [0, 1] (normalization inside).
        data: a bastion `Dataset` or an ``(images, labels)`` tuple (N×C×H×W in [0, 1], (N,) ints).
        threat: the threat model, a `ThreatModel` or a string like ``"linf:8/255"``.
        attacks: a preset name (``"quick"``, ``"standard"``, ``"full"``, see `PRESETS`), an
            `Attack`, or a list of attacks, registry names and ``(name, kwargs)`` pairs, run in
            order. Attacks that do not support the threat's norm are skipped with a note.
            (Default: "standard", AutoAttack's suite)
        epsilons: radii for a security curve (``Report.curve``): the same suite at each eps, in
            the threat's norm, each run independently (a curve that rises gets a note); the main
            results stay at ``threat.eps``, which joins the curve. (Default: None)
        batch_size: examples per batch; memory is bounded by one batch. (Default: 256)
        seed: the i-th attack of the suite runs with seed ``seed + i`` (per-example randomness:
            the result of an example does not depend on its batch). (Default: 0)
        state_file: a JSON Lines file that receives every finished batch; rerunning with the
            same file and configuration resumes after the last finished batch (a different
            configuration raises). (Default: None)
        progress: show a progress bar. (Default: True)
        device: where to run; the model is moved there. None: where the model's parameters are.
            (Default: None)
        standalone: run every attack on every correctly classified example (not only on the
            survivors of the earlier ones), which adds each attack's stand-alone accuracy to the
            report at the cost of more attack runs. (Default: False)
        keep_examples: keep the tensors of the first K examples (x, x_adv, y, predictions) in
            ``Report.examples`` for a picture (`save_grid`); batches read back from a state file
            have none, and under several processes only each rank's own batches are kept. (Default: 0)

    Under ``torchrun`` (an initialized `torch.distributed` process group, see
    `bastion.distributed.init_from_env`) the batches are dealt round-robin to the processes and
    the per-batch results gathered, so every rank returns the same report, equal to the
    single-process one; with a `state_file` each rank keeps its own ``<state_file>.rankR-of-W``.

    Returns:
        a `Report` (``report.table()``, ``report.save("report.json")``).

    Shape:
        data: images (N, C, H, W), labels (N,); the report holds per-example columns of length N.

    Example:
        >>> report = evaluate(model, load_dataset("mnist-5k", "test"), "linf:0.3", attacks="quick")
        >>> print(report.table())
        >>> report = evaluate(model, (x, y), "linf:8/255", [("apgd", {"loss": "dlr"}), "square"],
        ...                   epsilons=[2/255, 4/255, 8/255], state_file="eval.state.jsonl")
    """
    t_start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module returning logits, got {type(model).__name__}")
    threat = ThreatModel.parse(threat)
    for name, value, lo in (("batch_size", batch_size, 1), ("keep_examples", keep_examples, 0)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"`{name}` must be an int, got {type(value).__name__}")
        if value < lo:
            raise ValueError(f"`{name}` must be >= {lo}, got {value}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**62:
        raise ValueError(f"`seed` must be an int in [0, 2**62), got {seed!r}")
    for name, flag in (("progress", progress), ("standalone", standalone)):
        if not isinstance(flag, bool):
            raise TypeError(f"`{name}` must be a bool, got {type(flag).__name__}")
    threats = [threat]
    if epsilons is not None:
        if isinstance(epsilons, (str, bytes)) or not isinstance(epsilons, Sequence) or not epsilons:
            raise ValueError(f"`epsilons` must be a non-empty list of radii, got {epsilons!r}")
        threats = [ThreatModel(threat.norm, e) for e in epsilons]
        if threat not in threats:
            threats.append(threat)
        threats = sorted(set(threats), key=lambda t: t.eps)
    main = threats.index(threat)
    entries = resolve_attacks(attacks)
    x_all, y_all = _as_tensors(data)
    n = int(y_all.shape[0])
    if n == 0:
        raise ValueError("`data` is empty")
    if device is None:
        p = next(model.parameters(), None)
        dev = p.device if p is not None else torch.device("cpu")
    else:
        dev = torch.device(device)
        model.to(dev)

    config = {
        "threat": str(threat), "epsilons": [t.eps for t in threats] if epsilons is not None else None,
        "attacks": [{"label": e.label, "seed": seed + i, **e.config} for i, e in enumerate(entries)],
        "batch_size": batch_size, "seed": seed, "standalone": standalone, "n": n,
        "model_digest": model_digest(model),
    }
    rank, world_size = D.world()
    if world_size > 1:
        _check_same_model(config["model_digest"])
        if state_file is not None:  # one state file per rank: no two processes append to one file
            state_file = Path(f"{state_file}.rank{rank}-of-{world_size}")
    n_batches = math.ceil(n / batch_size)
    # Batches are dealt round-robin to the ranks. Every per-example result is independent of
    # which process computes it (per-example randomness, attacks seeded per suite entry), so the
    # gathered report equals the single-process one exactly.
    mine = list(range(rank, n_batches, world_size))
    state = _StateFile(state_file, config, mine) if state_file is not None else None
    records: list[dict[str, Any]] = list(state.records) if state else []
    if len(records) > len(mine):
        raise ValueError(f"`state_file` {state_file} holds {len(records)} batches but the data has only {len(mine)}"
                         + (f" for rank {rank} of {world_size}" if world_size > 1 else ""))
    resumed = len(records)
    if resumed:
        log.info("resuming from %s: %d of %d batches already done", state_file, resumed, len(mine))

    kept: list[dict[str, Tensor]] = []
    n_kept = 0
    from tqdm.auto import tqdm

    bar = tqdm(total=len(mine), initial=resumed, disable=not progress or rank != 0, desc=f"evaluate {threat}",
               unit="batch", leave=False, dynamic_ncols=True)
    try:
        with attack_mode(model):
            for i, b in enumerate(mine):
                lo, hi = b * batch_size, min(n, (b + 1) * batch_size)
                xb_cpu, yb_cpu = x_all[lo:hi], y_all[lo:hi]
                digest = _batch_digest(xb_cpu, yb_cpu)
                if i < resumed:
                    if records[i].get("batch") != b or records[i].get("digest") != digest:
                        raise ValueError(f"`state_file` {state_file}: batch {b} holds other examples than this data "
                                         "(different dataset, order or limit); delete it or use the original data")
                    continue
                xb = check_images(xb_cpu.to(dev), "data (images)")
                yb = yb_cpu.to(dev, dtype=torch.long)
                with torch.no_grad():
                    clean_pred = model(xb).argmax(dim=1)
                want = n_kept < keep_examples
                runs = []
                for j, t in enumerate(threats):
                    rec, x_adv, adv_pred = _run_suite(model, xb, yb, clean_pred, entries, t, seed, standalone,
                                                      want and j == main)
                    runs.append(rec)
                    if x_adv is not None:
                        k = min(keep_examples - n_kept, hi - lo)
                        kept.append({"x": xb_cpu[:k].clone(), "x_adv": x_adv[:k].cpu(), "y": yb_cpu[:k].clone(),
                                     "clean_pred": clean_pred[:k].cpu(), "adv_pred": adv_pred[:k].cpu()})
                        n_kept += k
                record = {"batch": b, "start": lo, "stop": hi, "digest": digest, "label": yb_cpu.tolist(),
                          "clean_pred": clean_pred.tolist(), "runs": runs}
                if state is not None:
                    state.append(record)
                records.append(record)
                bar.update(1)
    finally:
        bar.close()
    if world_size > 1:
        records = _gather_records(records)

    summary, stats, curve, notes = _build(records, entries, threats, main, n, standalone)
    if resumed:
        notes.append(f"resumed: {resumed} of {len(mine)} batches were read from {state_file}")
    if world_size > 1:
        notes.append(f"sharded over {world_size} processes (batches dealt round-robin, results gathered)")
    report = Report(threat=str(threat), n=n, clean_accuracy=summary["clean_accuracy"],
                    robust_accuracy=summary["robust_accuracy"], attacks=stats, norms=summary["norms"],
                    per_example=summary["per_example"], curve=curve if epsilons is not None else None,
                    notes=notes, config=config, time_s=time.perf_counter() - t_start)
    if kept:
        report.examples = {k: torch.cat([d[k] for d in kept]) for k in kept[0]}
    log.info("evaluated %d examples under %s: clean %.2f%%, robust %.2f%%", n, threat,
             100 * report.clean_accuracy, 100 * report.robust_accuracy)
    return report
