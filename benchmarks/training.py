"""Hardening by training: every training defense on one architecture, evaluated honestly, and timed.

    python benchmarks/training.py --quick                                  # smoke run (minutes)
    python benchmarks/training.py --data fashion-mnist                     # the issue's full table
    python benchmarks/training.py --data fashion-mnist --train-n 10000 --epochs 2 --eval-n 200 \\
        --methods standard,fast-at,fgsm-at,fgsm-at@0.3,pgd-at              # a reduced setting
    python benchmarks/training.py --data mnist-5k --methods fast --epochs 3 --eval-n 200
    python benchmarks/training.py --speed --speed-n 1024                   # Trainer vs hand loop vs ART
    python benchmarks/training.py --cost --methods all --epochs 2          # every method's epoch, side by side
    python benchmarks/training.py --data fashion-mnist --train-n 10000 --epochs 2 --eval-n 200 --table-only

The setting (issue 4): `cnn-small` (430,890 parameters on 28×28 grey images; ``--arch madry-cnn``,
3,274,634 parameters at the same cost per step, puts another network under every row), SGD with momentum
0.9, weight decay 5e-4, batch 128, peak learning rate 0.05 with the one-cycle schedule (Fast AT:
the cyclic schedule of its paper; Free AT: ceil(epochs / m) epochs, see
`bastion.cli.paper_training_loop`), L∞ eps ``--eps`` = 0.1, images in [0, 1]. Each method is
trained from scratch with Bastion's `Trainer`; evaluation is on the test images spread evenly over
the test split (``--eval-n`` of them):

* clean accuracy, on the attacked images and on the whole test split;
* FGSM and naive PGD-20 (CE, one random start): what a weak evaluation would report;
* robust accuracy under ``evaluate(preset="standard")`` (APGD-CE, APGD-T, Square; worst case per
  example): the number to read.

SAP is not a training method: it is the ``standard`` model with stochastic activation pruning
after every ReLU (``add_sap``, SAP-100), attacked naively (PGD-20 on single random draws) and
adaptively (the standard suite on ``EOT(model, n=--eot)``, the expected logits; its clean and
robust numbers are those of the EOT-averaged classifier). Bounded ReLU is cnn-small with its ReLUs
capped at 1 (``bound_relus``), trained with plain cross-entropy. Distillation trains a teacher at
temperature T (``distillation-teacher``) and then the student on its soft labels.

Resumable and incremental: each method trains into its own folder,
``--root/<data>/<method>[-<eps>]-n<train images>-e<epochs>[-<arch>]``, resuming from its last checkpoint
when interrupted (Ctrl-C and rerun the same command); its evaluation is cached in that folder as
``eval-linf<eps>-n<eval images>-<suite>.json`` (the standard suite also keeps a resumable state file). The
tables are assembled from whatever is finished, so a later session (or ``--device cuda``)
completes them with the same command. Nothing in the tables is estimated: a method not yet
trained or evaluated shows "not measured".

Training time is the `Trainer`'s own clock (report.json ``train_time_s``, summed over sessions);
the ratio divides it by the ``standard`` run of the same setting. On a shared machine these
seconds move with the load (each run's load average is saved in ``bench.json`` beside it), so
rows trained at different times cannot be divided by each other: ``--cost`` times one epoch of
every method side by side (interleaved, same initial weights, ratios paired by round) and writes
``<root>/<data>/cost-n<N>-b<batch>-eps<eps>.json``; when that file exists for the setting, the
table's "× standard" column comes from it (scaled by the epochs each method trains, plus
distillation's teacher).

``--speed``: one epoch of PGD-AT (7 steps of 2.5·eps/7 from a random start, batch 128) and of TRADES
(10 KL steps of 2.5·eps/10, beta 6; ART: its TRADES trainer with its PGD) on the
first ``--speed-n`` Fashion-MNIST training images, through Bastion's `Trainer` vs a minimal
hand-written loop vs ART's ``AdversarialTrainerMadryPGD``, all from the same initial weights,
interleaved (`_common.interleaved`); the ratios are paired by round.

Progress goes to stderr; the markdown tables to stdout (and ``--json`` gets every number).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `_common`, when run as a script

from _common import interleaved, machine_info, set_threads  # noqa: E402

from bastion.attacks.adaptive import EOT  # noqa: E402
from bastion.checkpoint import atomic_write_json, load_checkpoint  # noqa: E402
from bastion.cli import paper_training_loop  # noqa: E402
from bastion.data import Dataset, load_dataset  # noqa: E402
from bastion.defenses.layers import add_sap, apply_layers, bound_relus  # noqa: E402
from bastion.defenses.training import TrainConfig, Trainer, create_objective  # noqa: E402
from bastion.defenses.training.trainer import accuracy, resolve_device  # noqa: E402
from bastion.evaluation import evaluate  # noqa: E402
from bastion.models import create_model  # noqa: E402

log = logging.getLogger("bastion.bench")

ARCH = "cnn-small"
# The robust-accuracy column: the standard suite (the number), or APGD-CE alone where the
# standard suite does not fit the machine (APGD-CE is its first attack, so its number is an upper
# bound of the standard suite's: the table header says which one was run).
SUITES: dict[str, Any] = {"standard": "standard", "apgd-ce": [("apgd", {"loss": "ce", "steps": 100})]}


# --------------------------------------------------------------------------- the methods
@dataclass(frozen=True)
class Method:
    """One row of the table: how to build, train and attack it.

    Args:
        objective: registry name of the training objective (``bastion list defenses``).
        options: the objective's options (besides eps).
        adversarial: the objective takes ``eps`` (its folder name then carries it).
        layer: ``"bounded-relu"`` or ``"sap"``: a model-side defense (see the module docstring).
        base: a method whose trained weights this one reuses instead of training (SAP).
        teacher: a method whose trained model is this one's distillation teacher.
        note: shown under the table.
        eps_options: options that depend on the training eps (called with it).
    """

    objective: str
    options: dict[str, Any] = field(default_factory=dict)
    adversarial: bool = False
    layer: str | None = None
    base: str | None = None
    teacher: str | None = None
    note: str = ""
    eps_options: Callable[[float], dict[str, Any]] | None = None

    def options_at(self, eps: float) -> dict[str, Any]:
        """The objective's options for training at `eps`."""
        options = dict(self.options)
        if self.adversarial:
            options["eps"] = eps
        if self.eps_options is not None:
            options.update(self.eps_options(eps))
        return options


DISTILLATION_T = 20.0


def _mixed(alpha: float, eps: float) -> dict[str, Any]:
    """FGSM-AT's options for alpha·CE(x) + (1 − alpha)·CE(x'), x' = Fast AT's adversary at `eps`."""
    return {"alpha": alpha, "attacks": [{"name": "pgd", "steps": 1, "step_size": 1.25 * eps, "restarts": 1}]}


METHODS: dict[str, Method] = {
    "standard": Method("standard"),
    "fgsm-at": Method("fgsm-at", adversarial=True, note="Goodfellow et al. 2015: 0.5·CE(x) + 0.5·CE(FGSM(x))"),
    "pgd-at": Method("pgd-at", {"steps": 10}, adversarial=True, note="Madry et al. 2018: 10 steps of 2.5·eps/10"),
    "fast-at": Method("fast-at", adversarial=True, note="Wong et al. 2020: FGSM from a random start, step 1.25·eps, "
                                                         "cyclic learning rate"),
    "fast-at-mixed": Method("fgsm-at", adversarial=True, eps_options=lambda eps: _mixed(0.5, eps),
                            note="Goodfellow's 0.5·CE(x) + 0.5·CE(x') with Fast AT's adversary (a random start and "
                                 "one step of 1.25·eps): clean accuracy for some robustness"),
    "fast-at-mixed-a0.2": Method("fgsm-at", adversarial=True, eps_options=lambda eps: _mixed(0.2, eps),
                                 note="as fast-at-mixed with alpha 0.2: 0.2·CE(x) + 0.8·CE(x')"),
    "fast-at-0.8eps": Method("fast-at", adversarial=True, eps_options=lambda eps: {"eps": 0.8 * eps},
                             note="Fast AT trained at 0.8·eps (0.08 at eps 0.1), attacked at eps: a smaller training "
                                  "ball buys clean accuracy with robustness at the evaluated eps"),
    "fast-at-0.7eps": Method("fast-at", adversarial=True, eps_options=lambda eps: {"eps": 0.7 * eps},
                             note="as fast-at-0.8eps, trained at 0.7·eps"),
    "free-at": Method("free-at", {"replays": 8}, adversarial=True,
                      note="Shafahi et al. 2019: m = 8 replays, ceil(epochs/8) epochs"),
    "alp": Method("alp", adversarial=True, note="Kannan et al. 2018: mixed CE + 0.5·logit pairing, PGD-10"),
    "clp": Method("clp", note="Kannan et al. 2018: clean logit pairing, lam 0.5"),
    "trades": Method("trades", adversarial=True, note="Zhang et al. 2019: beta 6, 10 KL steps"),
    "trades-b1": Method("trades", {"beta": 1.0, "steps": 5}, adversarial=True,
                        note="TRADES at beta 1 (the clean end of its trade), 5 KL steps of 2.5·eps/5"),
    "mma": Method("mma", adversarial=True,
                  note="Ding et al. 2020: dmax = 1.5·eps (the reference's MNIST ratio), AN-PGD-10"),
    "mart": Method("mart", adversarial=True, note="Wang et al. 2020: beta 6, PGD-10"),
    "gaussian-augmentation": Method("gaussian-augmentation", note="Zantedeschi et al. 2017: sigma 0.1"),
    "label-smoothing": Method("label-smoothing", note="Warde-Farley & Goodfellow 2016: max value 0.9"),
    "distillation-teacher": Method("distillation", {"temperature": DISTILLATION_T},
                                   note=f"the teacher of distillation (T = {DISTILLATION_T:g})"),
    "distillation": Method("distillation", {"temperature": DISTILLATION_T}, teacher="distillation-teacher",
                           note=f"Papernot et al. 2016 at T = {DISTILLATION_T:g} (the paper: 100)"),
    "gradient-regularization": Method("gradient-regularization", note="Ross & Doshi-Velez 2018: lam 1, L2"),
    "contractive": Method("contractive", note="Gu & Rigazio 2015: lam 1e-3"),
    "bounded-relu": Method("standard", layer="bounded-relu", note="Zantedeschi et al. 2017: ReLUs capped at 1, CE"),
    "sap": Method("standard", layer="sap", base="standard",
                  note="Dhillon et al. 2018: SAP-100 after every ReLU of the standard model (no training)"),
}
# Variants of the methods tried for the clean half of the target (not in "all": its table is
# the methods, one row each, and every variant is another full training).
VARIANTS = ("fast-at-mixed", "fast-at-mixed-a0.2", "fast-at-0.8eps", "fast-at-0.7eps", "trades-b1")
GROUPS = {
    "all": [m for m in METHODS if m != "distillation-teacher" and m not in VARIANTS],
    "variants": list(VARIANTS),
    "fast": ["standard", "fgsm-at", "fast-at", "gaussian-augmentation", "label-smoothing"],
}


def parse_methods(text: str) -> list[tuple[str, float | None]]:
    """``standard,fgsm-at@0.3,fast`` -> [(method, eps or None: --eps)], groups expanded, order kept."""
    out: list[tuple[str, float | None]] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, eps = part.partition("@")
        names = GROUPS.get(name, [name])
        for n in names:
            if n not in METHODS:
                raise SystemExit(f"--methods: unknown method {n!r}; known: {', '.join(METHODS)} "
                                 f"or the groups {', '.join(GROUPS)}")
            item = (n, float(eps) if eps else None)
            if item not in out:
                out.append(item)
    return out


# --------------------------------------------------------------------------- one run
@dataclass
class Setting:
    data: str
    train_n: int | None
    epochs: int
    eval_n: int
    eps: float
    root: Path
    device: str
    eot: int
    suite: str = "standard"
    batch_size: int = 128
    lr: float = 0.05
    seed: int = 0
    cost_n: int = 512
    arch: str = ARCH
    ema_decay: float = 0.0

    def tag(self) -> str:
        extra = (f"-b{self.batch_size}" if self.batch_size != 128 else "") + (f"-lr{self.lr:g}" if self.lr != 0.05 else "")
        extra += f"-{self.arch}" if self.arch != ARCH else ""
        extra += f"-ema{self.ema_decay:g}" if self.ema_decay else ""
        return f"n{self.train_n or 'all'}-e{self.epochs}{extra}"


def run_dir(s: Setting, method: str, eps: float) -> Path:
    m = METHODS[method]
    if m.base is not None:  # SAP reuses its base's weights: its folder only holds evaluations
        return s.root / s.data / f"{method}-{s.tag()}"
    return s.root / s.data / (f"{method}-{eps:g}-{s.tag()}" if m.adversarial else f"{method}-{s.tag()}")


def spread(data: Dataset, n: int | None) -> Dataset:
    """`n` images spread evenly over `data` (class-balanced on splits sorted by class, like mnist-5k's)."""
    if n is None or n >= len(data):
        return data
    return data.subset((torch.arange(n) * len(data)) // n)


def build_model(s: Setting, method: str, train: Dataset) -> nn.Module:
    torch.manual_seed(s.seed)
    model = create_model(s.arch, train.num_classes, train.shape, train.mean, train.std)
    if METHODS[method].layer == "bounded-relu":
        model = apply_layers(model, [("bounded-relu", {"t": 1.0})])  # recorded: `bastion evaluate` rebuilds it
    return model


def train_method(s: Setting, method: str, eps: float, train: Dataset, test: Dataset, progress: bool) -> Path:
    """Train (or resume, or find finished) one method's run folder; returns it."""
    m = METHODS[method]
    out = run_dir(s, method, eps)
    if m.base is not None:
        return train_method(s, m.base, eps, train, test, progress)
    if (out / "report.json").exists():
        return out
    options = m.options_at(eps)
    if m.teacher is not None:
        options["teacher"] = str(train_method(s, m.teacher, eps, train, test, progress) / "model")
    objective = create_objective(m.objective, **options)
    epochs, schedule, notes = paper_training_loop(objective, s.epochs, None)
    for note in notes:
        log.info("%s", note)
    cfg = TrainConfig(epochs=epochs, batch_size=s.batch_size, lr=s.lr, momentum=0.9, weight_decay=5e-4,
                      schedule=schedule, seed=s.seed, device=s.device, checkpoint_every=25, eval_batch_size=500,
                      ema_decay=s.ema_decay)
    model = build_model(s, method, train)
    log.info("training %s%s on %d %s images, %d epochs, into %s", method, f" (eps {eps:g})" if m.adversarial else "",
             len(train), s.data, epochs, out)
    out.mkdir(parents=True, exist_ok=True)
    before = machine_info()
    report = Trainer(model, train, test, cfg, objective, run_dir=out, resume=True, progress=progress,
                     extra_config={"benchmark": {"method": method, "setting": s.tag(), "notes": notes,
                                                 "layer": m.layer}}).fit()
    atomic_write_json(out / "bench.json", {"machine_before": before, "machine_after": machine_info(),
                                           "train_time_s": report["train_time_s"]})
    log.info("trained %s: test accuracy %.4f in %.0f s", method, report["final"].get("test_acc", float("nan")),
             report["train_time_s"])
    return out


def load_trained(s: Setting, method: str, eps: float, train: Dataset) -> nn.Module:
    m = METHODS[method]
    folder = run_dir(s, m.base or method, eps)
    model = build_model(s, m.base or method, train)
    load_checkpoint(folder / "model", model)  # into the same structure (a rebuilt spec would lose BoundedReLU)
    model.eval()
    if m.layer == "sap":
        model = add_sap(model, fraction=1.0, copy=False)
    return model.to(s.device if s.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


def naive_cache_path(cache: Path) -> Path:
    """Where the naive half (clean, FGSM, PGD-20) of an evaluation cache is kept until the suite finishes."""
    return cache.with_name(cache.stem + "-naive.json")


def eval_method(s: Setting, method: str, eps: float, train: Dataset, test: Dataset, progress: bool,
                test_all: Dataset | None = None) -> dict[str, Any]:
    """Clean, FGSM, PGD-20 and standard-suite accuracies of a trained method (cached in its folder).

    `test` is the attacked subset; with `test_all` (the whole test split) the clean accuracy on all
    of it is added as ``clean_all`` (also to caches written before this column existed): the
    evenly spread subset is not exactly as hard as the whole split.
    """
    out = run_dir(s, method, eps)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / f"eval-linf{eps:g}-n{len(test)}-{s.suite}.json"
    if cache.exists():
        res = json.loads(cache.read_text())
        if test_all is not None and "clean_all" not in res:
            res.update(clean_all=accuracy(load_trained(s, method, eps, train), test_all)[0], n_all=len(test_all))
            atomic_write_json(cache, res)
        return res
    model = load_trained(s, method, eps, train)
    threat = f"linf:{eps:g}"
    randomized = METHODS[method].layer == "sap"
    naive_cache = naive_cache_path(cache)
    if naive_cache.exists():  # the naive part finished in an earlier session
        res: dict[str, Any] = json.loads(naive_cache.read_text())
    else:
        res = {"method": method, "eps": eps, "n": len(test), "threat": threat}
        torch.manual_seed(s.seed)
        t0 = time.perf_counter()
        fgsm = evaluate(model, test, threat, [("fgsm", {})], progress=False, seed=s.seed)
        pgd = evaluate(model, test, threat, "quick", progress=False, seed=s.seed)
        res.update(clean=pgd.clean_accuracy, fgsm=fgsm.robust_accuracy, pgd20=pgd.robust_accuracy,
                   naive_s=round(time.perf_counter() - t0, 1))
        if test_all is not None:
            res.update(clean_all=accuracy(model, test_all)[0], n_all=len(test_all))
        atomic_write_json(naive_cache, res)
    target = EOT(model, n=s.eot) if randomized else model
    log.info("%s: clean %.3f, FGSM %.3f, PGD-20 %.3f; now the %s suite%s on %d images", method, res["clean"],
             res["fgsm"], res["pgd20"], s.suite, f" on EOT(n={s.eot})" if randomized else "", len(test))
    t0 = time.perf_counter()
    std = evaluate(target, test, threat, SUITES[s.suite], progress=progress, seed=s.seed,
                   state_file=out / f"state-linf{eps:g}-n{len(test)}-{s.suite}.jsonl")
    res.update(standard=std.robust_accuracy, standard_clean=std.clean_accuracy,
               per_attack={a.label: a.robust_accuracy for a in std.attacks},
               standard_s=round(time.perf_counter() - t0, 1), notes=std.notes,
               suite=s.suite, eot=s.eot if randomized else None, machine=machine_info())
    atomic_write_json(cache, res)
    log.info("%s: %s suite %.3f (%.0f s)", method, s.suite, res["standard"], res["standard_s"])
    return res


# --------------------------------------------------------------------------- tables
def _pct(v: float | None) -> str:
    return "not measured" if v is None else f"{100 * v:.1f}"


def collect(s: Setting, methods: list[tuple[str, float | None]]) -> list[dict[str, Any]]:
    """Whatever is finished for these methods: training report and cached evaluation, or None."""
    rows = []
    for method, eps_opt in methods:
        eps = eps_opt if eps_opt is not None else s.eps
        m = METHODS[method]
        folder = run_dir(s, m.base or method, eps)
        rep = json.loads((folder / "report.json").read_text()) if (folder / "report.json").exists() else None
        cache = run_dir(s, method, eps) / f"eval-linf{eps:g}-n{s.eval_n}-{s.suite}.json"
        naive = naive_cache_path(cache)
        # a finished evaluation, or its naive half alone (the suite column then says "not measured")
        ev = json.loads(cache.read_text()) if cache.exists() else (json.loads(naive.read_text()) if naive.exists()
                                                                   else None)
        rows.append({"method": method, "eps": eps, "train": rep, "eval": ev, "folder": str(run_dir(s, method, eps))})
    return rows


def load_cost(s: Setting) -> dict[str, Any] | None:
    """The `--cost` result for this setting's data, batch size and eps, if it was run."""
    path = cost_path(s.root, s.data, s.cost_n, s.batch_size, s.eps, s.arch)
    return json.loads(path.read_text()) if path.exists() else None


def table(s: Setting, rows: list[dict[str, Any]]) -> str:
    cost_res = load_cost(s)
    std_time = None
    std_rows = [r for r in rows if r["method"] == "standard" and r["train"]]
    std_dir = run_dir(s, "standard", s.eps) / "report.json"
    if std_rows:
        std_time = std_rows[0]["train"]["train_time_s"]
    elif std_dir.exists():
        std_time = json.loads(std_dir.read_text())["train_time_s"]
    suite = "standard suite" if s.suite == "standard" else f"{s.suite} (not the standard suite)"
    # The rows' own training times were taken whenever each row ran, at the machine's load of the
    # moment: with a cost run, the ratio column comes from it (all methods timed side by side).
    ratio_head = "× standard (interleaved cost run)" if cost_res else "× standard (as run)"
    lines = [f"| method | eps | clean % | clean % (whole test split) | FGSM % | PGD-20 % (naive) | {suite} % | "
             f"train time s (as run) | {ratio_head} |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ev, tr, m = r["eval"] or {}, r["train"], METHODS[r["method"]]
        if m.base is not None:
            t, ratio = "0 (reuses standard)", "0"
        elif tr is None:
            t, ratio = "not measured", "—"
        else:
            t = f"{tr['train_time_s']:.0f}"
            ratio = f"{tr['train_time_s'] / std_time:.1f}" if std_time else "—"
        if cost_res and m.base is None:
            cost_ratio = training_cost_ratio(cost_res, r["method"], s.epochs)
            ratio = "not measured" if cost_ratio is None else f"{cost_ratio:.1f}"
            if cost_ratio is not None and m.adversarial and r["eps"] != cost_res["eps"]:
                ratio += f" (timed at eps {cost_res['eps']:g}: same work per step)"
        std_col = _pct(ev.get("standard"))
        if ev.get("eot"):
            std_col += f" (EOT-{ev['eot']})"
        clean = ev.get("standard_clean", ev.get("clean")) if ev.get("eot") else ev.get("clean")
        clean_all = _pct(ev.get("clean_all")) + (" (one SAP draw)" if ev.get("eot") and "clean_all" in ev else "")
        lines.append(f"| {r['method']} | {r['eps']:g} | {_pct(clean)} | {clean_all} | {_pct(ev.get('fgsm'))} | "
                     f"{_pct(ev.get('pgd20'))} | {std_col} | {t} | {ratio} |")
    return "\n".join(lines)


def suite_table(rows: list[dict[str, Any]]) -> str:
    """Robust accuracy after each attack of the suite (worst case so far), for the evaluated rows.

    Shows where a CE-only number would have stopped (the first column) and what the targeted DLR
    attack and Square add: a large drop after APGD-CE is the mark of a loss surface that misleads
    cross-entropy gradients (gradient masking), not of robustness.
    """
    done = [r for r in rows if r["eval"] and r["eval"].get("per_attack")]
    if not done:
        return ""
    attacks = list(done[0]["eval"]["per_attack"])
    if len(attacks) < 2:  # a one-attack suite: the main table already says it all
        return ""
    head = " | ".join(("" if i == 0 else "+ ") + a for i, a in enumerate(attacks))
    lines = [f"| method | eps | clean % | PGD-20 % (naive) | {head} | suite s |",
             "|" + "---|" * (5 + len(attacks))]
    for r in done:
        ev = r["eval"]
        cells = " | ".join(_pct(ev["per_attack"].get(a)) for a in attacks)
        lines.append(f"| {r['method']} | {r['eps']:g} | {_pct(ev['clean'])} | {_pct(ev['pgd20'])} | {cells} | "
                     f"{ev.get('standard_s', 0):.0f} |")
    return "\n".join(lines)


def findings(rows: list[dict[str, Any]], suite: str = "standard", cost_res: dict[str, Any] | None = None,
             epochs: int = 1, train_n: int = 0) -> list[str]:
    """Plain sentences about catastrophic overfitting, Fast AT vs PGD-AT and naive-vs-suite gaps."""
    by = {(r["method"], r["eps"]): r for r in rows}
    suite = "standard suite" if suite == "standard" else suite
    out = []
    for (method, eps), r in by.items():
        ev = r["eval"]
        if ev is None or "standard" not in ev:  # not evaluated, or its suite has not finished
            continue
        if METHODS[method].objective in ("fgsm-at", "fast-at"):   # single-step adversaries, the mixed rows too
            gap = ev["fgsm"] - ev["standard"]
            stopped = (r["train"] or {}).get("stopped")
            co = gap > 0.3 or (ev["fgsm"] > 0.5 and ev["standard"] < 0.05)
            out.append(f"{method} at eps {eps:g}: FGSM {100 * ev['fgsm']:.1f}% vs "
                       f"{100 * ev['standard']:.1f}% ({suite}) — "
                       + ("catastrophic overfitting (robust to its own single-step attack only)" if co
                          else "no catastrophic overfitting")
                       + (f"; training stopped early: {stopped}" if stopped else ""))
        if ev["pgd20"] - ev["standard"] > 0.1:
            out.append(f"{method}: naive PGD-20 says {100 * ev['pgd20']:.1f}% but the {suite} "
                       f"{100 * ev['standard']:.1f}%: the naive number overstates its robustness")
    fast = next((r for r in rows if r["method"] == "fast-at"), None)
    pgd = next((r for r in rows if r["method"] == "pgd-at" and fast and r["eps"] == fast["eps"]), None)
    if (fast and pgd and fast["eval"] and pgd["eval"] and "standard" in fast["eval"] and "standard" in pgd["eval"]
            and fast["train"] and pgd["train"]):
        rob = fast["eval"]["standard"] / max(pgd["eval"]["standard"], 1e-9)
        tim = fast["train"]["train_time_s"] / pgd["train"]["train_time_s"]
        ok = rob >= 0.9 and tim <= 1 / 3
        fc = training_cost_ratio(cost_res, "fast-at", epochs) if cost_res else None
        pc = training_cost_ratio(cost_res, "pgd-at", epochs) if cost_res else None
        if fc is None or pc is None:
            out.append(f"Fast AT vs PGD-AT: {100 * rob:.0f}% of PGD-AT's robust accuracy ({suite}) in "
                       f"{100 * tim:.0f}% of its training time as run (each row at its own machine load) — "
                       f"target (≥ 90% in ≤ 1/3) {'met' if ok else 'not met'}")
        else:
            by = {r["method"]: r for r in cost_res["rows"]}
            probe = by.get(COST_PROBE, {}).get("median_s")
            std_s = by["standard"]["median_s"]
            extra = ""
            if probe is not None and std_s and train_n:
                # the probe runs once per epoch, outside the Trainer's clock: add it per epoch of this setting
                fc_probe = fc + probe / (std_s * train_n / cost_res["n"])
                extra = f" ({100 * fc_probe / pc:.0f}% with its once-per-epoch overfitting probe)"
            tim2 = fc / pc
            ok2 = rob >= 0.9 and tim2 <= 1 / 3
            out.append(f"Fast AT vs PGD-AT, times from the interleaved cost run: {100 * rob:.0f}% of PGD-AT's robust "
                       f"accuracy in {100 * tim2:.0f}% of its training time{extra} — target "
                       f"{'met' if ok2 else 'not met'}")
    return out


# --------------------------------------------------------------------------- speed: Trainer vs hand loop vs ART
def hand_pgd_at_epoch(model: nn.Module, x_all: Tensor, y_all: Tensor, *, eps: float, steps: int, lr: float,
                      batch_size: int, seed: int) -> nn.Module:
    """The physical limit: one epoch of PGD-AT written by hand (steps+1 forward/backward passes per batch)."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    alpha = 2.5 * eps / steps
    model.train()
    perm = torch.randperm(len(x_all))
    for i in range(0, len(x_all), batch_size):
        idx = perm[i:i + batch_size]
        x, y = x_all[idx], y_all[idx]
        delta = torch.empty_like(x).uniform_(-eps, eps)
        delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
        for _ in range(steps):
            loss = F.cross_entropy(model(x + delta), y)
            (g,) = torch.autograd.grad(loss, [delta])
            delta = (delta.detach() + alpha * g.sign()).clamp(-eps, eps)
            delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
        loss = F.cross_entropy(model((x + delta).detach()), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


def hand_trades_epoch(model: nn.Module, x_all: Tensor, y_all: Tensor, *, eps: float, steps: int, lr: float,
                      batch_size: int, beta: float, seed: int) -> nn.Module:
    """One epoch of TRADES written by hand, as the reference code does it.

    Inner maximization in eval mode: start at x + 0.001·N(0, 1), `steps` sign steps of
    2.5·eps/steps on KL(p(x) ‖ p(x')), projected; then in train mode the loss
    CE(f(x), y) + beta · KL(p(x) ‖ p(x')) (batchmean): 1 + steps forward/backward passes for the
    attack (the first without backward) and two forward passes with one backward for the update.
    """
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    alpha = 2.5 * eps / steps
    perm = torch.randperm(len(x_all))
    for i in range(0, len(x_all), batch_size):
        idx = perm[i:i + batch_size]
        x, y = x_all[idx], y_all[idx]
        model.eval()
        with torch.no_grad():
            p_nat = F.log_softmax(model(x), dim=1)
        x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
        for _ in range(steps):
            xg = x_adv.detach().requires_grad_(True)
            kl = F.kl_div(F.log_softmax(model(xg), dim=1), p_nat, reduction="sum", log_target=True)
            (g,) = torch.autograd.grad(kl, [xg])
            x_adv = torch.min(torch.max(x_adv.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
        model.train()
        logits_nat, logits_adv = model(x), model(x_adv)
        kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.log_softmax(logits_nat, dim=1), reduction="batchmean",
                      log_target=True)
        loss = F.cross_entropy(logits_nat, y) + beta * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


SPEED_METHODS = ("pgd-at", "trades")


def speed(args: argparse.Namespace) -> dict[str, Any]:
    """One epoch per method in ``--speed-methods``: Bastion's Trainer vs a hand loop vs ART, interleaved."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TQDM_DISABLE", "1")  # ART's progress bars
    train = load_dataset("fashion-mnist", "train").take(args.speed_n)
    x_all, y_all = train.images.contiguous(), train.labels.contiguous()
    torch.manual_seed(0)
    init = create_model(ARCH, train.num_classes, train.shape, train.mean, train.std)
    eps, lr, bs, beta = args.eps, 0.01, 128, 6.0
    steps = {"pgd-at": 7, "trades": 10}
    x_np, y_np = x_all.numpy(), y_all.numpy()

    def fresh() -> nn.Module:
        return copy.deepcopy(init).train()

    def bastion(method: str) -> Callable[[], nn.Module]:
        def run() -> nn.Module:
            model = fresh()
            cfg = TrainConfig(epochs=1, batch_size=bs, lr=lr, momentum=0.9, weight_decay=0.0, schedule="constant",
                              seed=0, device="cpu")
            kw = {"beta": beta} if method == "trades" else {}
            Trainer(model, train, None, cfg, create_objective(method, eps=eps, steps=steps[method], **kw),
                    progress=False).fit()
            return model
        return run

    def art(method: str) -> Callable[[], nn.Module]:
        from art.attacks.evasion import ProjectedGradientDescent
        from art.defences.trainer import AdversarialTrainerMadryPGD, AdversarialTrainerTRADESPyTorch
        from art.estimators.classification import PyTorchClassifier

        def run() -> nn.Module:
            model = fresh()
            clf = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(),
                                    optimizer=torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9),
                                    input_shape=train.shape, nb_classes=train.num_classes, clip_values=(0.0, 1.0),
                                    device_type="cpu")
            k = steps[method]
            if method == "pgd-at":
                AdversarialTrainerMadryPGD(clf, nb_epochs=1, batch_size=bs, eps=eps, eps_step=2.5 * eps / k,
                                           max_iter=k, num_random_init=1).fit(x_np, y_np)
            else:  # ART's TRADES trainer takes any attack; its examples use PGD on the cross-entropy
                pgd = ProjectedGradientDescent(clf, eps=eps, eps_step=2.5 * eps / k, max_iter=k, num_random_init=1,
                                               batch_size=bs, verbose=False)
                AdversarialTrainerTRADESPyTorch(clf, attack=pgd, beta=beta).fit(x_np, y_np, nb_epochs=1,
                                                                                 batch_size=bs)
            return model
        return run

    hands = {"pgd-at": lambda: hand_pgd_at_epoch(fresh(), x_all, y_all, eps=eps, steps=steps["pgd-at"], lr=lr,
                                                 batch_size=bs, seed=0),
             "trades": lambda: hand_trades_epoch(fresh(), x_all, y_all, eps=eps, steps=steps["trades"], lr=lr,
                                                 batch_size=bs, beta=beta, seed=0)}
    arts = {"pgd-at": "ART AdversarialTrainerMadryPGD", "trades": "ART AdversarialTrainerTRADESPyTorch"}
    rows = []
    for method in args.speed_methods:
        fns: dict[str, Callable[[], Any]] = {f"bastion Trainer + {method}": bastion(method),
                                             "hand-written loop": hands[method]}
        try:
            fns[arts[method]] = art(method)
        except ImportError as e:  # pragma: no cover - ART is a bench extra
            log.warning("ART not installed (%s): no ART column", e)
        log.info("%s: one epoch, %d steps", method, steps[method])
        timings = interleaved(fns, repeats=args.repeats, on_sample=lambda n, dt: log.info("  %-36s %.2f s", n, dt))
        hand_t = timings["hand-written loop"]
        for name, t in timings.items():
            rows.append({"method": method, "steps": steps[method], "name": name, "median_s": t.median,
                         "samples_s": t.samples, "warmup_s": t.warmup_s, "ratio_to_hand": t.ratio_to(hand_t),
                         "error": t.error})
    return {"n": len(train), "batch_size": bs, "eps": eps, "steps": steps, "beta": beta, "repeats": args.repeats,
            "rows": rows, "machine": machine_info()}


def speed_table(res: dict[str, Any]) -> str:
    lines = ["| method | trainer | median s per epoch | × hand loop | samples s |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        head = f"| {r.get('method', 'pgd-at')} ({r.get('steps', 7)} steps) | {r['name']}"
        if r["error"]:
            lines.append(f"{head} | failed: {r['error']} | | |")
            continue
        lines.append(f"{head} | {r['median_s']:.2f} | {r['ratio_to_hand']:.3f} | "
                     f"{', '.join(f'{v:.2f}' for v in r['samples_s'])} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- cost: every method's step time, interleaved
COST_PROBE = "fast-at probe (once per epoch)"


def cost_path(root: Path, data: str, n: int, batch_size: int, eps: float, arch: str = ARCH) -> Path:
    """Where `--cost` writes its result for this data set, image count, batch size, eps and architecture."""
    return root / data / f"cost-n{n}-b{batch_size}-eps{eps:g}{'' if arch == ARCH else '-' + arch}.json"


def cost(args: argparse.Namespace) -> dict[str, Any]:
    """One Trainer epoch of every method on the same `--cost-n` images, interleaved with ``standard``.

    The training times of the table's rows were taken whenever each row ran, at whatever load the
    shared machine had then; their ratios to the ``standard`` row mix methods with loads. Here every
    method runs one epoch (Trainer clock: optimizer steps and the objective's own work; Free AT's
    epoch is its m replays) from the same initial weights, alternated round by round
    (`_common.interleaved`), and each ratio to ``standard`` is the median over rounds of the
    per-round ratio — so all methods see the same load. Fast AT runs without its overfitting probe
    (which the Trainer's clock excludes too); the probe (PGD-10 + FGSM on 256 examples, once per
    epoch) is timed as its own entry. Distillation's teacher is an untrained copy of the initial
    model (its cost does not depend on its weights); the teacher's own training is timed as
    ``distillation-teacher``. SAP trains nothing.
    """
    warnings.filterwarnings("ignore")
    train = load_dataset(args.data, "train").take(args.cost_n)
    torch.manual_seed(0)
    init = create_model(args.arch, train.num_classes, train.shape, train.mean, train.std)
    names: list[str] = []
    for method, _ in parse_methods(args.methods):
        m = METHODS[method]
        for n in ([m.teacher] if m.teacher else []) + [method]:
            if METHODS[n].base is None and n not in names:
                names.append(n)
    if "standard" not in names:
        names.insert(0, "standard")

    def objective_of(method: str) -> Any:
        m = METHODS[method]
        options = m.options_at(args.eps)
        if m.objective == "fast-at":
            options["overfit_check"] = False
        if m.teacher is not None:
            options["teacher"] = init
        return create_objective(m.objective, **options)

    def epoch(method: str) -> Callable[[], nn.Module]:
        def run() -> nn.Module:
            model = copy.deepcopy(init)
            if METHODS[method].layer == "bounded-relu":
                model = bound_relus(model, 1.0, copy=False)
            cfg = TrainConfig(epochs=1, batch_size=args.batch_size, lr=args.lr, momentum=0.9, weight_decay=5e-4,
                              schedule="constant", seed=0, device=args.device)
            Trainer(model, train, None, cfg, objective_of(method), progress=False).fit()
            return model
        return run

    fns: dict[str, Callable[[], Any]] = {n: epoch(n) for n in names}
    if "fast-at" in names:
        dev = resolve_device(args.device)
        probe = create_objective("fast-at", eps=args.eps)
        probe.set_probe(train.images[:probe.probe_size].to(dev), train.labels[:probe.probe_size].to(dev))
        fns[COST_PROBE] = lambda: probe.probe_accuracies(copy.deepcopy(init).to(dev).eval())
    timings = interleaved(fns, repeats=args.repeats, on_sample=lambda n, dt: log.info("  %-32s %.2f s", n, dt))
    std = timings["standard"]
    rows = []
    for name, t in timings.items():
        replays = 1 if name == COST_PROBE else int(getattr(objective_of(name), "replays", 1))
        rows.append({"method": name, "median_s": t.median, "samples_s": t.samples, "warmup_s": t.warmup_s,
                     "ratio_to_standard": t.ratio_to(std), "replays": replays, "error": t.error})
    return {"data": args.data, "n": len(train), "batch_size": args.batch_size, "eps": args.eps,
            "repeats": args.repeats, "rows": rows, "machine": machine_info()}


def training_cost_ratio(res: dict[str, Any], method: str, epochs: int) -> float | None:
    """Predicted (training time of `method`) / (training time of ``standard``) for an `epochs` budget.

    Each method trains for the epochs `paper_training_loop` gives it (Free AT: ceil(epochs/m) of its
    m-replay epochs), distillation adds its teacher's training, SAP trains nothing; the per-epoch
    ratios come from the interleaved `cost` run. None when the cost run has no row for it.
    """
    by = {r["method"]: r for r in res["rows"] if r.get("ratio_to_standard") is not None}
    m = METHODS[method]
    if m.base is not None:
        return 0.0
    parts = ([m.teacher] if m.teacher else []) + [method]
    if any(p not in by for p in parts):
        return None
    total = 0.0
    for p in parts:
        replays = by[p]["replays"]
        own_epochs = max(1, math.ceil(epochs / replays)) if replays > 1 else epochs
        total += by[p]["ratio_to_standard"] * own_epochs / epochs
    return total


def cost_table(res: dict[str, Any], epochs: int) -> str:
    lines = ["| method | median s per epoch | × standard per epoch | epochs trained for a budget of "
             f"{epochs} | × standard training time | samples s |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        name = r["method"]
        if r["error"]:
            lines.append(f"| {name} | failed: {r['error']} | | | | |")
            continue
        samples = ", ".join(f"{v:.2f}" for v in r["samples_s"])
        if name == COST_PROBE:
            lines.append(f"| {name} | {r['median_s']:.2f} | {r['ratio_to_standard']:.2f} | — | — | {samples} |")
            continue
        own = max(1, math.ceil(epochs / r["replays"])) if r["replays"] > 1 else epochs
        total = training_cost_ratio(res, name, epochs) if name in METHODS else None
        lines.append(f"| {name} | {r['median_s']:.2f} | {r['ratio_to_standard']:.2f} | {own} | "
                     f"{'—' if total is None else f'{total:.2f}'} | {samples} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="fashion-mnist", choices=("fashion-mnist", "mnist-5k", "digits"))
    p.add_argument("--methods", default="all",
                   help=f"comma-separated methods, METHOD@EPS for another eps, or a group ({', '.join(GROUPS)}); "
                        f"known: {', '.join(METHODS)}")
    p.add_argument("--eps", type=float, default=0.1, help="L∞ radius of training and evaluation")
    p.add_argument("--arch", default=ARCH, choices=("cnn-small", "madry-cnn", "mlp"),
                   help="the network of every row (and of --cost); run folders of another than cnn-small carry its name")
    p.add_argument("--train-n", type=int, default=None, help="first N training images (default: all)")
    p.add_argument("--epochs", type=int, default=10, help="epoch budget per method (free-at: ceil(epochs/8))")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate")
    p.add_argument("--ema-decay", type=float, default=0.0,
                   help="every row's model is the moving average of its weights with this decay per step "
                        "(TrainConfig.ema_decay; 0: off); run folders then carry -emaD")
    p.add_argument("--eval-n", type=int, default=1000, help="test images, spread evenly over the test split")
    p.add_argument("--suite", choices=tuple(SUITES), default="standard",
                   help="robust-accuracy suite: the standard preset, or APGD-CE-100 alone (an upper bound of it, "
                        "for machines where the standard suite does not fit)")
    p.add_argument("--eot", type=int, default=8, help="EOT draws for the adaptive evaluation of SAP")
    p.add_argument("--root", type=Path, default=Path("runs/training"), help="where the run folders go")
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: digits, standard and fast-at, 1 epoch, 50 evaluation images")
    p.add_argument("--table-only", action="store_true", help="train and evaluate nothing: print what is finished")
    p.add_argument("--no-eval", action="store_true", help="train only")
    p.add_argument("--speed", action="store_true", help="only the PGD-AT epoch timing: Trainer vs hand loop vs ART")
    p.add_argument("--speed-n", type=int, default=1024, help="training images of the timed epoch")
    p.add_argument("--speed-methods", type=lambda v: [m for m in v.split(",") if m], default=list(SPEED_METHODS),
                   help=f"comma-separated methods of --speed ({', '.join(SPEED_METHODS)})")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds of --speed/--cost (after one warm-up each)")
    p.add_argument("--cost", action="store_true",
                   help="only the interleaved cost run: one epoch of every method in --methods on --cost-n images, "
                        "ratios to standard (written next to the run folders; the tables read it)")
    p.add_argument("--cost-n", type=int, default=512, help="training images of the --cost epoch")
    p.add_argument("--json", type=Path, default=None, help="write every number to this JSON file")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False)
    a = p.parse_args(argv)
    if a.quick:
        a.data, a.methods, a.epochs, a.eval_n, a.train_n = "digits", "standard,fast-at", 1, 50, None
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    set_threads(args.threads)
    if args.speed:
        unknown = sorted(set(args.speed_methods) - set(SPEED_METHODS))
        if unknown or not args.speed_methods:
            raise SystemExit(f"--speed-methods: unknown {unknown or 'empty list'}; known: {', '.join(SPEED_METHODS)}")
        res = speed(args)
        print(f"One epoch of adversarial training (PGD-AT: 7 steps, TRADES: 10 steps, beta 6; eps {args.eps:g}, "
              f"batch 128) on {res['n']} Fashion-MNIST training images, {args.repeats} interleaved rounds after a "
              f"warm-up, {torch.get_num_threads()} threads:\n")
        print(speed_table(res))
    elif args.cost:
        res = cost(args)
        path = cost_path(args.root, args.data, args.cost_n, args.batch_size, args.eps, args.arch)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, res)
        print(f"One Trainer epoch per method on {res['n']} {args.data} training images (batch {args.batch_size}, "
              f"eps {args.eps:g}), {args.repeats} interleaved rounds after a warm-up, {torch.get_num_threads()} "
              f"thread(s); ratios paired by round; training time for a budget of {args.epochs} epochs:\n")
        print(cost_table(res, args.epochs))
    else:
        s = Setting(args.data, args.train_n, args.epochs, args.eval_n, args.eps, args.root, args.device, args.eot,
                    args.suite, args.batch_size, args.lr, cost_n=args.cost_n, arch=args.arch, ema_decay=args.ema_decay)
        methods = parse_methods(args.methods)
        train = load_dataset(args.data, "train").take(args.train_n)
        test_all = load_dataset(args.data, "test")
        test = spread(test_all, args.eval_n)
        if not args.table_only:
            for method, eps_opt in methods:
                eps = eps_opt if eps_opt is not None else args.eps
                t0 = time.perf_counter()
                train_method(s, method, eps, train, test, args.progress)
                if not args.no_eval:
                    eval_method(s, method, eps, train, test, args.progress, test_all)
                log.info("%s done (%.0f s this session)", method, time.perf_counter() - t0)
        rows = collect(s, methods)
        res = {"setting": {**vars(s), "root": str(s.root), "train_images": len(train), "eval_images": len(test),
                           "arch": s.arch, "params": sum(p.numel() for p in build_model(s, "standard", train).parameters())},
               "rows": rows, "findings": findings(rows, s.suite, load_cost(s), s.epochs, len(train))}
        print(f"{args.data}, {s.arch} ({res['setting']['params']:,} parameters), {len(train)} training images, "
              f"{args.epochs} epochs, batch {args.batch_size}, peak lr {args.lr:g}, evaluation on {len(test)} test "
              f"images, L∞ eps {args.eps:g}:\n")
        print(table(s, rows))
        per_attack = suite_table(rows)
        if per_attack:
            print(f"\nRobust accuracy after each attack of the {s.suite} suite (worst case so far):\n")
            print(per_attack)
        for line in res["findings"]:
            print(f"\n* {line}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2, default=str))
    return res


if __name__ == "__main__":
    main()
