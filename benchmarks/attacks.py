"""Speed and agreement of Bastion's attacks against the hand-written loop and the peer libraries.

    python benchmarks/attacks.py --quick                  # smoke run: a few images, one repeat
    python benchmarks/attacks.py --json runs/bench.json   # the issue's setting (slow on a CPU)
    python benchmarks/attacks.py --only pgd,eval --n 500 --repeats 5

The setting (issue 3): `cnn-small` trained on Fashion-MNIST (cached in ``runs/bench-fmnist-cnn``,
see `_common.fmnist_model`; ``--model-path`` takes any trained run folder instead), the first
``--n`` test images, L∞ eps ``--eps`` = 0.1, ``--threads`` = 2 intra-op threads. Every
competitor gets the same model object, in eval mode with its parameters frozen (so nobody pays
for parameter gradients), and the same input tensors.

Sections (``--only``, comma-separated):

* ``fgsm``  Bastion FGSM vs torchattacks FGSM: time and the largest pixel difference.
* ``pgd``   PGD-20 (step 2.5·eps/20): Bastion (early stopping off: the same work) vs a hand-written
            loop (the physical limit: 20 forward+backward passes) vs torchattacks, ART and
            foolbox. Agreement without random start (one run each, which is also the warm-up);
            time and robust accuracy with random start (interleaved repeats).
* ``eval``  `bastion.evaluate` with the ``quick`` preset (PGD-20, early stopping per example)
            vs torchattacks PGD-20, interleaved with the ``pgd`` rounds when both run.
* ``cw``    C&W L2 on ``--n-small`` images, the same budget for Bastion and ART (and
            torchattacks' fixed-c CW as a third column): time, success rate, median L2.
* ``deepfool`` DeepFool (L2) on ``--n-small`` images: Bastion vs foolbox, torchattacks, ART.
* ``autoattack`` on the PGD-AT model (``--at-model-path``, default a cached PGD-AT fine-tune),
            ``--n-aa`` images: Bastion APGD-CE + APGD-T and ``evaluate(preset="standard")`` vs
            torchattacks AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square): robust accuracy, time.

Timing: each competitor runs once as a warm-up, then ``--repeats`` rounds that alternate the
competitors (order rotated every round) so that a change of machine load hits all of them
alike; times are medians, and a ratio is the median over rounds of the per-round ratio (paired:
a load change between rounds cancels). A competitor that has used ``--budget`` seconds gets
no more rounds (its sample count is shown). On a shared, loaded machine the absolute seconds
mean little; the ratios, measured interleaved, still do.

Output: markdown tables on stdout and, with ``--json``, every number (samples, counts of
forward passes, machine) in a JSON file. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `_common`, when run as a script

from _common import DEFAULT_AT_DIR, DEFAULT_MODEL_DIR, Timing, count_forwards, fmnist_at_model, fmnist_model, \
    fmnist_test, interleaved, machine_info, quiet_setup  # noqa: E402

from bastion.attacks import create_attack  # noqa: E402
from bastion.checkpoint import load_model  # noqa: E402
from bastion.evaluation import evaluate  # noqa: E402

log = logging.getLogger("bastion.bench")

SECTIONS = ("fgsm", "pgd", "eval", "cw", "deepfool", "autoattack")


# --------------------------------------------------------------------------- options
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=int, default=1000, help="test images for fgsm, pgd, eval and autoattack")
    p.add_argument("--n-small", type=int, default=200, help="test images for cw and deepfool")
    p.add_argument("--n-aa", type=int, default=1000, help="test images for autoattack (at most --n)")
    p.add_argument("--aa-published", action="store_true",
                   help="autoattack: also run torchattacks' four AutoAttack attacks at the published budget "
                        "(100 steps for APGD-CE, APGD-T and FAB-T; torchattacks' AutoAttack runs 10)")
    p.add_argument("--at-model-path", type=Path, default=None,
                   help=f"the adversarially trained run folder for autoattack; default: {DEFAULT_AT_DIR} "
                        "(fine-tuned on first use)")
    p.add_argument("--eps", type=float, default=0.1, help="L-inf radius (pixel units)")
    p.add_argument("--steps", type=int, default=20, help="PGD steps")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up")
    p.add_argument("--budget", type=float, default=900.0,
                   help="seconds a competitor may use in a section before it gets no more rounds")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    p.add_argument("--model-path", type=Path, default=None,
                   help=f"a trained run folder (or model stem) to attack; default: {DEFAULT_MODEL_DIR} "
                        "(trained on first use)")
    p.add_argument("--cw-steps", type=int, default=50, help="C&W iterations per binary-search step (max_iterations)")
    p.add_argument("--cw-search", type=int, default=1,
                   help="C&W binary-search steps (1 with c = 1: the problem torchattacks' CW solves too)")
    p.add_argument("--cw-const", type=float, default=1.0, help="C&W initial constant c")
    p.add_argument("--cw-lr", type=float, nargs="+", default=[0.05, 0.01],
                   help="C&W learning rates, each run by every library (the first is Bastion's headline row): "
                        "Adam's step for Bastion and torchattacks, the starting step of ART's line search")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 16 images (8 for cw/deepfool), 1 round, short budgets; checks that every path runs")
    p.add_argument("--json", type=Path, default=None, help="write every number to this JSON file")
    p.add_argument("-v", "--verbose", action="store_true", help="log every timed run")
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.only) - set(SECTIONS))
    if unknown:
        p.error(f"--only: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    if args.quick:
        args.n, args.n_small, args.n_aa, args.repeats, args.cw_steps = 16, 8, 16, 1, 10
    for name in ("n", "n_small", "n_aa", "steps", "threads", "cw_steps", "cw_search"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.repeats < 0:
        p.error("--repeats must be >= 0")
    if not (0 < args.eps <= 1):
        p.error("--eps must be in (0, 1]")
    return args


# --------------------------------------------------------------------------- shared state
@dataclass
class Bench:
    """What every section needs: the model, the data and the options."""

    model: nn.Module
    x: Tensor
    y: Tensor
    args: argparse.Namespace
    clean_pred: Tensor = field(init=False)
    num_classes: int = field(init=False)

    def __post_init__(self) -> None:
        self.clean_pred = predict(self.model, self.x)
        with torch.no_grad():
            self.num_classes = int(self.model(self.x[:1]).shape[1])

    @property
    def eps(self) -> float:
        return self.args.eps

    @property
    def alpha(self) -> float:
        # Bastion's default step (Madry's rule 2.5·eps/steps), given explicitly to every library
        return 2.5 * self.args.eps / self.args.steps

    def at_model(self) -> nn.Module:
        """The adversarially trained model (``--at-model-path`` or the cached PGD-AT fine-tune), frozen."""
        path = self.args.at_model_path
        model = load_model(path) if path is not None else fmnist_at_model()
        return model.eval().requires_grad_(False)

    def small(self) -> tuple[Tensor, Tensor]:
        k = min(self.args.n_small, self.x.shape[0])
        return self.x[:k], self.y[:k]

    def time(self, fns: dict[str, Callable[[], Any]], *, warmup: bool = True, repeats: int | None = None
             ) -> dict[str, Timing]:
        def tell(name: str, dt: float) -> None:
            (log.info if self.args.verbose else log.debug)("  %-28s %8.2f s", name, dt)

        return interleaved(fns, self.args.repeats if repeats is None else repeats, warmup=warmup,
                           budget_s=self.args.budget, on_sample=tell)


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch: int = 1000) -> Tensor:
    """Predicted classes (N,) of `model` on `x`, in batches."""
    return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, x.shape[0], batch)]) if len(x) else \
        torch.zeros(0, dtype=torch.long)


def as_tensor(a: Any) -> Tensor:
    """An attack's output (tensor or NumPy array) as a float32 CPU tensor."""
    return torch.as_tensor(np.asarray(a)) if not isinstance(a, Tensor) else a.detach()


def _seed_all(seed: int) -> None:
    # torchattacks and the hand loop draw from torch's generator, ART from NumPy's
    torch.manual_seed(seed)
    np.random.seed(seed)


# --------------------------------------------------------------------------- competitors
def hand_pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, alpha: float, steps: int,
             random_start: bool) -> Tensor:
    """The physical limit: `steps` forward+backward passes and nothing else.

    ``autograd.grad`` of the summed CE w.r.t. the input, a sign step, the clamp to the ball and
    the box. No input checks, no bookkeeping, no evaluation of the result.
    """
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1) if random_start else x
    lo, hi = x - eps, x + eps
    for _ in range(steps):
        xg = x_adv.detach().requires_grad_(True)
        loss = F.cross_entropy(model(xg), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, [xg])
        x_adv = torch.minimum(torch.maximum(x_adv.detach() + alpha * g.sign(), lo), hi).clamp(0, 1)
    return x_adv


def art_classifier(model: nn.Module, x: Tensor, num_classes: int) -> Any:
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                             nb_classes=num_classes, clip_values=(0.0, 1.0), device_type="cpu")


def pgd_competitors(b: Bench, random_start: bool) -> dict[str, Callable[[], Tensor]]:
    """name -> a callable returning x_adv for PGD-`steps` on (b.x, b.y), every library configured alike."""
    import foolbox as fb
    import torchattacks
    from art.attacks.evasion import ProjectedGradientDescentPyTorch

    model, x, y, eps, alpha, steps = b.model, b.x, b.y, b.eps, b.alpha, b.args.steps
    seed = b.args.seed
    bastion_pgd = create_attack("pgd", steps=steps, step_size=alpha, random_start=random_start, early_stop=False)
    ta = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start)
    art = ProjectedGradientDescentPyTorch(art_classifier(model, x, b.num_classes),
                                          norm=np.inf, eps=eps, eps_step=alpha, max_iter=steps,
                                          num_random_init=1 if random_start else 0, batch_size=x.shape[0],
                                          verbose=False)
    fmodel = fb.PyTorchModel(model, bounds=(0.0, 1.0), device="cpu")
    fba = fb.attacks.LinfPGD(abs_stepsize=alpha, steps=steps, random_start=random_start)
    x_np, y_np = x.numpy(), y.numpy()

    def run_ta() -> Tensor:
        _seed_all(seed)
        return ta(x, y)

    def run_art() -> Tensor:
        _seed_all(seed)
        return as_tensor(art.generate(x_np, y_np))

    def run_fb() -> Tensor:
        _seed_all(seed)
        _, clipped, _ = fba(fmodel, x, y, epsilons=eps)
        return clipped

    def run_hand() -> Tensor:
        _seed_all(seed)
        return hand_pgd(model, x, y, eps, alpha, steps, random_start)

    return {
        "hand loop": run_hand,
        "bastion pgd": lambda: bastion_pgd(model, x, y, f"linf:{eps!r}", seed=seed).x_adv,
        "torchattacks PGD": run_ta,
        "ART PGD": run_art,
        "foolbox LinfPGD": run_fb,
    }


# --------------------------------------------------------------------------- sections
def section_fgsm(b: Bench) -> dict[str, Any]:
    import torchattacks

    model, x, y, eps = b.model, b.x, b.y, b.eps
    fgsm = create_attack("fgsm")
    ta = torchattacks.FGSM(model, eps=eps)
    t = b.time({"bastion fgsm": lambda: fgsm(model, x, y, f"linf:{eps!r}", seed=0).x_adv,
                "torchattacks FGSM": lambda: ta(x, y)})
    ours, theirs = t["bastion fgsm"].result, t["torchattacks FGSM"].result
    correct = b.clean_pred == y
    # Bastion returns an already misclassified input unchanged (nothing to attack there);
    # torchattacks perturbs every input. Agreement is measured where both attack.
    diff = (ours - theirs).abs().flatten(1).amax(1)
    max_diff = float(diff[correct].max()) if bool(correct.any()) else 0.0
    rows = []
    for name, tm in t.items():
        adv = tm.result
        rows.append({"name": name, **tm.to_dict(), "x_bastion": tm.ratio_to(t["bastion fgsm"]),
                     "robust_accuracy": _acc(model, adv, y) if adv is not None else None})
    return {"rows": rows, "max_abs_diff_on_correct": max_diff,
            "max_abs_diff_all": float(diff.max()) if len(diff) else 0.0,
            "misclassified_clean": int((~correct).sum()),
            "notes": [f"max |Δx_adv| over the {int(correct.sum())} correctly classified images: {max_diff:.3g} "
                      f"(target ≤ 1e-6); the {int((~correct).sum())} misclassified ones Bastion leaves unchanged "
                      "by design, torchattacks perturbs them."]}


def section_pgd(b: Bench, with_eval: bool) -> dict[str, Any]:
    model, x, y = b.model, b.x, b.y
    # 1) agreement: no random start, one run each; it is also every competitor's warm-up
    agree: dict[str, dict[str, Any]] = {}
    for name, fn in pgd_competitors(b, random_start=False).items():
        with count_forwards(model) as c:
            t0 = time.perf_counter()
            try:
                adv = as_tensor(fn())
            except Exception as e:  # noqa: BLE001 - report, go on with the others
                log.warning("%s failed: %s", name, e)
                agree[name] = {"error": f"{type(e).__name__}: {e}"}
                continue
            dt = time.perf_counter() - t0
        agree[name] = {"x_adv": adv, "time_s": dt, "forwards": c.to_dict()}
        log.info("  pgd (no random start) %-20s %8.2f s", name, dt)
    ref = agree.get("hand loop", {}).get("x_adv")
    for name, a in agree.items():
        if "x_adv" not in a:
            continue
        a["robust_accuracy"] = _acc(model, a["x_adv"], y)
        if ref is not None:
            d = (a["x_adv"] - ref).abs().flatten(1).amax(1)
            a["max_abs_diff_vs_hand"] = float(d.max())
            a["identical_images_vs_hand"] = float((d <= 1e-6).float().mean())
            a["same_prediction_vs_hand"] = float((predict(model, a["x_adv"]) == predict(model, ref)).float().mean())
        del a["x_adv"]

    # 2) time and robust accuracy with random start, interleaved (the warm-up was step 1)
    fns: dict[str, Callable[[], Any]] = dict(pgd_competitors(b, random_start=True))
    eval_report: dict[str, Any] = {}
    if with_eval:
        fns["bastion evaluate(quick)"] = lambda: _evaluate_quick(b, eval_report)
        # its warm-up: evaluate has first-call costs of its own (resolving the suite, checks)
        _evaluate_quick(b, {})
    fns["forward only"] = lambda: predict(model, x, batch=x.shape[0])
    timings = b.time(fns, warmup=False)

    rows = []
    for name, tm in timings.items():
        row = {"name": name, **tm.to_dict(), "x_hand": tm.ratio_to(timings["hand loop"]),
               "x_bastion": tm.ratio_to(timings["bastion pgd"])}
        if name == "bastion evaluate(quick)":
            row["robust_accuracy"] = eval_report.get("robust_accuracy")
        elif name != "forward only" and tm.result is not None:
            row["robust_accuracy"] = _acc(model, as_tensor(tm.result), y)
        rows.append(row)
    out = {"agreement": agree, "rows": rows, "alpha": b.alpha,
           "overhead": _pgd_overhead(b, timings, agree)}
    if with_eval:
        out["eval"] = _eval_summary(timings["bastion evaluate(quick)"], timings["torchattacks PGD"], eval_report,
                                    _acc(model, as_tensor(timings["torchattacks PGD"].result), y)
                                    if timings["torchattacks PGD"].result is not None else None)
    return out


def _evaluate_quick(b: Bench, sink: dict[str, Any]) -> Any:
    report = evaluate(b.model, (b.x, b.y), f"linf:{b.eps!r}", attacks="quick", batch_size=b.x.shape[0],
                      seed=b.args.seed, progress=False)
    sink["robust_accuracy"] = report.robust_accuracy
    sink["clean_accuracy"] = report.clean_accuracy
    sink["n_attacked"] = report.attacks[0].n_attacked if report.attacks else None
    return report


def _eval_summary(ours: Timing, ta: Timing, report: dict[str, Any], ta_acc: float | None) -> dict[str, Any]:
    return {"bastion": {**ours.to_dict(), **report}, "torchattacks": {**ta.to_dict(), "robust_accuracy": ta_acc},
            "speedup": ta.ratio_to(ours)}


def section_eval_alone(b: Bench) -> dict[str, Any]:
    """`evaluate(quick)` vs torchattacks PGD-20 when the pgd section does not run."""
    import torchattacks

    ta = torchattacks.PGD(b.model, eps=b.eps, alpha=b.alpha, steps=b.args.steps, random_start=True)
    report: dict[str, Any] = {}

    def run_ta() -> Tensor:
        _seed_all(b.args.seed)
        return ta(b.x, b.y)

    t = b.time({"bastion evaluate(quick)": lambda: _evaluate_quick(b, report), "torchattacks PGD": run_ta})
    res = t["torchattacks PGD"].result
    return _eval_summary(t["bastion evaluate(quick)"], t["torchattacks PGD"], report,
                         _acc(b.model, res, b.y) if res is not None else None)


def _pgd_overhead(b: Bench, t: dict[str, Timing], agree: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Where Bastion's PGD time goes beyond the model: forwards counted, model time priced, rest overhead.

    The hand loop's time / steps prices one forward+backward pass over the batch, "forward only"
    a forward pass without grad; their combination for the passes Bastion made (counted with a
    forward hook in the agreement run) is its model time, and the remainder is bookkeeping
    (input checks, projection, the tracker, indexing).
    """
    steps, n = b.args.steps, b.x.shape[0]
    hand, fwd, ours = t["hand loop"].median, t["forward only"].median, t["bastion pgd"].median
    counts = agree.get("bastion pgd", {}).get("forwards")
    if None in (hand, fwd, ours) or not counts:
        return {}
    fb_s = hand / steps
    model_s = counts["grad_rows"] / n * fb_s + counts["nograd_rows"] / n * fwd
    return {"forward_backward_s": fb_s, "forward_s": fwd, "bastion_forwards": counts,
            "bastion_model_s": model_s, "bastion_other_s": ours - model_s,
            "extra_forward_passes": counts["nograd_rows"] / n + max(0.0, counts["grad_rows"] / n - steps)}


def section_cw(b: Bench) -> dict[str, Any]:
    """C&W L2 at one iteration budget, each library at each learning rate in ``--cw-lr``.

    The libraries' learning rates mean different things: Bastion and torchattacks take a fixed
    Adam step (Carlini's optimizer), ART takes a gradient step whose size it searches per
    example and iteration (up to 5 halvings and 5 doublings, each a forward pass). So every
    library runs at every rate, and the headline compares Bastion at the first rate with ART at
    the rate that gave ART its best success.
    """
    import torchattacks
    from art.attacks.evasion import CarliniL2Method

    model, (x, y), a = b.model, b.small(), b.args
    x_np, y_np = x.numpy(), y.numpy()
    fns: dict[str, Callable[[], Any]] = {}
    for lr in a.cw_lr:
        ours = create_attack("cw", binary_search_steps=a.cw_search, max_iterations=a.cw_steps,
                             initial_const=a.cw_const, learning_rate=lr)
        art = CarliniL2Method(art_classifier(model, x, b.num_classes), confidence=0.0, learning_rate=lr,
                              binary_search_steps=a.cw_search, max_iter=a.cw_steps, initial_const=a.cw_const,
                              batch_size=x.shape[0], verbose=False)
        ta = torchattacks.CW(model, c=a.cw_const, kappa=0.0, steps=a.cw_steps, lr=lr)
        fns[f"bastion cw (lr {lr:g})"] = lambda ours=ours: ours(model, x, y, seed=a.seed).x_adv
        fns[f"ART CarliniL2Method (lr {lr:g})"] = lambda art=art: as_tensor(art.generate(x_np, y_np))
        fns[f"torchattacks CW (lr {lr:g})"] = lambda ta=ta: ta(x, y)
    # Bastion's per-example early abort trades distance for time at a budget this short: the row
    # without it shows the other side (torchattacks and Carlini abort on the batch's summed loss)
    full = create_attack("cw", binary_search_steps=a.cw_search, max_iterations=a.cw_steps,
                         initial_const=a.cw_const, learning_rate=a.cw_lr[0], abort_early=False)
    fns[f"bastion cw (lr {a.cw_lr[0]:g}, no early abort)"] = lambda: full(model, x, y, seed=a.seed).x_adv
    t = b.time(fns)
    return {"rows": _minnorm_rows(b, t, x, y, f"bastion cw (lr {a.cw_lr[0]:g})"),
            "config": {"n": x.shape[0], "max_iterations": a.cw_steps, "binary_search_steps": a.cw_search,
                       "initial_const": a.cw_const, "learning_rates": list(a.cw_lr),
                       "torchattacks": "fixed c = initial_const (no binary search: its only mode), same steps"}}


def section_deepfool(b: Bench) -> dict[str, Any]:
    import foolbox as fb
    import torchattacks
    from art.attacks.evasion import DeepFool as ARTDeepFool

    model, (x, y), a = b.model, b.small(), b.args
    ours = create_attack("deepfool", steps=50, overshoot=0.02, num_classes=b.num_classes)
    fmodel = fb.PyTorchModel(model, bounds=(0.0, 1.0), device="cpu")
    fba = fb.attacks.L2DeepFoolAttack(steps=50, candidates=b.num_classes, overshoot=0.02)
    ta = torchattacks.DeepFool(model, steps=50, overshoot=0.02)
    art = ARTDeepFool(art_classifier(model, x, b.num_classes), max_iter=50, epsilon=0.02, nb_grads=b.num_classes,
                      batch_size=x.shape[0], verbose=False)
    x_np = x.numpy()

    def run_fb() -> Tensor:
        _, clipped, _ = fba(fmodel, x, y, epsilons=None)  # None: unbounded (a minimum-norm run)
        return clipped

    t = b.time({"bastion deepfool": lambda: ours(model, x, y, seed=a.seed).x_adv,
                "foolbox L2DeepFool": run_fb,
                "torchattacks DeepFool": lambda: ta(x, y),
                "ART DeepFool": lambda: as_tensor(art.generate(x_np))})
    return {"rows": _minnorm_rows(b, t, x, y, "bastion deepfool"),
            "config": {"n": x.shape[0], "steps": 50, "overshoot": 0.02, "candidates": 10}}


def _minnorm_rows(b: Bench, t: dict[str, Timing], x: Tensor, y: Tensor, ours: str) -> list[dict[str, Any]]:
    """Time, success rate and median L2 over the correctly classified images, per competitor."""
    correct = predict(b.model, x) == y
    rows = []
    for name, tm in t.items():
        row: dict[str, Any] = {"name": name, **tm.to_dict(), "x_bastion": tm.ratio_to(t[ours])}
        if tm.result is not None:
            adv = as_tensor(tm.result).to(x.dtype)
            ok = (predict(b.model, adv) != y) & correct
            l2 = (adv - x).flatten(1).norm(dim=1)
            row.update(success_rate=float(ok.sum() / correct.sum().clamp_min(1)),
                       median_l2=float(l2[ok].median()) if bool(ok.any()) else None,
                       in_box=bool((adv >= 0).all() and (adv <= 1).all()), n_correct=int(correct.sum()))
        rows.append(row)
    return rows


def section_autoattack(b: Bench) -> dict[str, Any]:
    """On the PGD-AT model: Bastion's APGD-CE + APGD-T and its ``standard`` preset vs AutoAttack.

    AutoAttack (standard) runs APGD-CE, APGD-T (9 targets), FAB-T and Square (5,000 queries),
    each only on what is still robust. Bastion's ``standard`` preset runs APGD-CE, APGD-T and
    Square alike. Same model, images, eps and seed; one run each (minutes on a CPU).
    """
    import torchattacks

    from bastion.evaluation import PRESETS

    model = b.at_model()
    n = min(b.args.n_aa, b.x.shape[0])
    x, y, eps, seed = b.x[:n], b.y[:n], b.eps, b.args.seed
    two = [("apgd", {"loss": "ce", "steps": 100}), ("apgd-t", {"steps": 100, "n_target_classes": 9})]
    aa = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=b.num_classes,
                                seed=seed)
    sinks: dict[str, dict[str, Any]] = {"bastion apgd-ce + apgd-t": {}, "bastion evaluate(standard)": {}}

    def ours(name: str, suite: Any) -> Callable[[], Any]:
        def run() -> Any:
            r = evaluate(model, (x, y), f"linf:{eps!r}", attacks=suite, batch_size=n, seed=seed, progress=False)
            sinks[name].update(robust_accuracy=r.robust_accuracy, clean_accuracy=r.clean_accuracy,
                               per_attack={s.label: s.robust_accuracy for s in r.attacks})
            return r
        return run

    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
    fns: dict[str, Callable[[], Any]] = {
        "bastion apgd-ce + apgd-t": ours("bastion apgd-ce + apgd-t", two),
        "bastion evaluate(standard)": ours("bastion evaluate(standard)", PRESETS["standard"]),
        "torchattacks AutoAttack": lambda: aa(x, y)}
    if b.args.aa_published:
        # torchattacks' AutoAttack keeps its attacks' default 10 steps; Croce & Hein's AutoAttack
        # runs APGD-CE, APGD-T and FAB-T for 100: the same four attacks at the published budget
        k = b.num_classes
        published = torchattacks.MultiAttack([
            torchattacks.APGD(model, eps=eps, norm="Linf", steps=100, loss="ce", n_restarts=1, seed=seed),
            torchattacks.APGDT(model, eps=eps, norm="Linf", steps=100, n_classes=k, n_restarts=1, seed=seed),
            torchattacks.FAB(model, eps=eps, norm="Linf", steps=100, multi_targeted=True, n_classes=k, n_restarts=1,
                             seed=seed),
            torchattacks.Square(model, eps=eps, norm="Linf", n_queries=5000, n_restarts=1, seed=seed)])
        fns["torchattacks AutoAttack, published budget"] = lambda: published(x, y)
    t = b.time(fns, warmup=False, repeats=1 if not b.args.quick else b.args.repeats)
    ta = t["torchattacks AutoAttack"]
    rows = [{"name": k, **t[k].to_dict(), **v} for k, v in sinks.items()]
    for name in fns:
        if name.startswith("torchattacks"):
            res = t[name].result
            rows.append({"name": name, **t[name].to_dict(),
                         "robust_accuracy": _acc(model, res, y) if res is not None else None})
    return {"rows": rows, "n": n, "clean_accuracy": clean, "model": str(b.args.at_model_path or DEFAULT_AT_DIR),
            "speedup": {k: ta.ratio_to(t[k]) for k in sinks},
            "speedup_published": ({k: t["torchattacks AutoAttack, published budget"].ratio_to(t[k]) for k in sinks}
                                  if b.args.aa_published else None)}


# --------------------------------------------------------------------------- formatting
def _acc(model: nn.Module, adv: Tensor, y: Tensor) -> float:
    return float((predict(model, as_tensor(adv).to(torch.float32)) == y).float().mean())


def _s(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}×"


def _time(row: dict[str, Any]) -> str:
    if row.get("error"):
        return "error"
    return f"{_s(row.get('median_s'))} ({row.get('repeats', 0)})"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(res: dict[str, Any], args: argparse.Namespace) -> str:
    """The tables of every section that ran, and a headline table of the issue's targets."""
    s, out, head = res["sections"], [], []
    m = res["machine"]
    out.append(f"Machine: {m['nproc']} cores ({m['cpu']}), torch {m['torch']}, {m['threads']} threads, "
               f"load average at start {m['loadavg_start']}, at end {m.get('loadavg')}. "
               f"Model: {res['model']['name']} (clean accuracy {_pct(res['model']['clean_accuracy'])} on "
               f"{args.n} images). L∞ eps {args.eps}. Times: median seconds (number of timed runs); "
               "ratios: median of the per-round ratios.")
    if "fgsm" in s:
        f = s["fgsm"]
        out.append("### FGSM\n\n" + _table(
            ["implementation", "time s", "× Bastion", "robust acc."],
            [[r["name"], _time(r), _x(r["x_bastion"]), _pct(r.get("robust_accuracy"))] for r in f["rows"]])
            + "\n\n" + " ".join(f["notes"]))
        head.append(["FGSM agreement (max \\|Δ\\|)", "≤ 1e-6", f"{f['max_abs_diff_on_correct']:.2g}",
                     _ok(f["max_abs_diff_on_correct"] <= 1e-6)])
        ta = _row(f, "torchattacks FGSM")
        head.append(["FGSM time vs torchattacks", "≤ 1×", _x(_inv(ta.get("x_bastion"))),
                     _ok(_le(_inv(ta.get("x_bastion")), 1.0))])
    if "pgd" in s:
        p = s["pgd"]
        ag = p["agreement"]
        out.append(f"### PGD-{args.steps} (step {p['alpha']:.4g}), no random start: agreement with the hand loop "
                   "(one run each)\n\n" + _table(
                       ["implementation", "max \\|Δ\\| vs hand", "identical images", "same prediction", "robust acc.",
                        "forwards with grad / without (batch passes)"],
                       [[k, _s(v.get("max_abs_diff_vs_hand"), 3), _pct(v.get("identical_images_vs_hand")),
                         _pct(v.get("same_prediction_vs_hand")), _pct(v.get("robust_accuracy")),
                         _passes(v.get("forwards"), args.n)] if "error" not in v else [k, "error", "", "", "", ""]
                        for k, v in ag.items()]))
        out.append(f"### PGD-{args.steps} with random start: time and robust accuracy (interleaved)\n\n" + _table(
            ["implementation", "time s", "× hand loop", "× Bastion", "robust acc."],
            [[r["name"], _time(r), _x(r["x_hand"]), _x(r["x_bastion"]), _pct(r.get("robust_accuracy"))]
             for r in p["rows"]])
            + "\n\nBastion's times include what it reports besides x_adv (the prediction on x_adv, success, norms); "
              "the peers return x_adv only. \"forward only\" is one forward pass over the batch without grad.")
        ov = p.get("overhead")
        if ov:
            out.append(f"Bastion PGD time accounting: one forward+backward pass {ov['forward_backward_s']:.3f} s, "
                       f"one forward pass {ov['forward_s']:.3f} s; Bastion made "
                       f"{_passes(ov['bastion_forwards'], args.n)} batch passes (with grad / without), so its model "
                       f"time is {ov['bastion_model_s']:.2f} s and everything else {ov['bastion_other_s']:.2f} s.")
        ours = _row(p, "bastion pgd")
        head.append(["PGD time vs hand loop", "≤ 1.05×", _x(ours.get("x_hand")), _ok(_le(ours.get("x_hand"), 1.05))])
        peers = [r for r in p["rows"] if r["name"] in ("torchattacks PGD", "ART PGD", "foolbox LinfPGD")]
        fastest = min((r for r in peers if r.get("x_bastion")), key=lambda r: r["x_bastion"], default=None)
        if fastest is not None:
            ratio = _inv(fastest["x_bastion"])
            head.append([f"PGD time vs fastest peer ({fastest['name']})", "≤ 1×", _x(ratio), _ok(_le(ratio, 1.0))])
        for peer in ("torchattacks PGD", "ART PGD"):
            r = _row(p, peer)
            if r.get("robust_accuracy") is not None and ours.get("robust_accuracy") is not None:
                gap = abs(ours["robust_accuracy"] - r["robust_accuracy"])
                head.append([f"PGD robust acc. vs {peer.split()[0]}", "within 0.5 pt", f"{100 * gap:.1f} pt",
                             _ok(gap <= 0.005)])
    ev = s.get("eval") or s.get("pgd", {}).get("eval")
    if ev:
        out.append(f"### evaluate (preset quick, early stopping) vs torchattacks PGD-{args.steps}\n\n" + _table(
            ["implementation", "time s", "robust acc.", "examples attacked"],
            [["bastion evaluate(quick)", _time(ev["bastion"]), _pct(ev["bastion"].get("robust_accuracy")),
              str(ev["bastion"].get("n_attacked"))],
             ["torchattacks PGD", _time(ev["torchattacks"]), _pct(ev["torchattacks"].get("robust_accuracy")),
              str(args.n)]]))
        head.append(["evaluate(quick) speed-up vs torchattacks PGD", "≥ 3×", _x(ev["speedup"]),
                     _ok(ev["speedup"] is not None and ev["speedup"] >= 3)])
    for key, title, ref_peer, target in (("cw", "C&W L2", "ART CarliniL2Method", 10.0),
                                         ("deepfool", "DeepFool (L2)", "foolbox L2DeepFool", 5.0)):
        if key not in s:
            continue
        c = s[key]
        cfg = ", ".join(f"{k} {v}" for k, v in c["config"].items())
        out.append(f"### {title} ({cfg})\n\n" + _table(
            ["implementation", "time s", "× Bastion", "success rate", "median L2"],
            [[r["name"], _time(r), _x(r["x_bastion"]), _pct(r.get("success_rate")), _s(r.get("median_l2"), 3)]
             for r in c["rows"]]))
        ours, peer = c["rows"][0], _row(c, ref_peer)
        if key == "cw":  # ART at the learning rate that gave it its best success
            arts = [r for r in c["rows"] if r["name"].startswith(ref_peer)]
            peer = max(arts, key=lambda r: (r.get("success_rate") or 0.0), default={})
            ref_peer = peer.get("name", ref_peer)
        head.append([f"{title} speed-up vs {ref_peer}", f"≥ {target:g}×", _x(peer.get("x_bastion")),
                     _ok(_ge(peer.get("x_bastion"), target))])
        if key == "cw":
            head.append(["C&W success rate vs ART", "≥ ART", f"{_pct(ours.get('success_rate'))} vs "
                         f"{_pct(peer.get('success_rate'))}",
                         _ok(_ge(ours.get("success_rate"), peer.get("success_rate")))])
        else:
            head.append(["DeepFool success rate", "100%", _pct(ours.get("success_rate")),
                         _ok(ours.get("success_rate") == 1.0)])
    if "autoattack" in s:
        a = s["autoattack"]
        title = (f"### On the PGD-AT model ({a['model']}, clean {_pct(a['clean_accuracy'])} on {a['n']} images): "
                 "Bastion's APGD-CE + APGD-T and `standard` preset vs torchattacks AutoAttack (standard)")
        pub = a.get("speedup_published") or {}
        out.append(title + "\n\n" + _table(
            ["implementation", "time s", "× AutoAttack speed-up", "× published-budget speed-up", "robust acc."],
            [[r["name"], _time(r), _x(a["speedup"].get(r["name"])), _x(pub.get(r["name"])),
              _pct(r.get("robust_accuracy"))] for r in a["rows"]])
            + "\n\nOne run each. AutoAttack standard = APGD-CE, APGD-T, FAB-T, Square (5,000 queries), each on "
            "what is still robust; torchattacks' AutoAttack runs APGD-CE, APGD-T and FAB-T for 10 steps (its "
            "attacks' defaults), the published AutoAttack for 100 (the \"published budget\" row). Bastion's "
            "`standard` = APGD-CE (100 steps), APGD-T (100 steps, 9 targets), Square (5,000 queries).")
        ta = _row(a, "torchattacks AutoAttack")
        for name in ("bastion apgd-ce + apgd-t", "bastion evaluate(standard)"):
            ours = _row(a, name)
            gap = None if None in (ours.get("robust_accuracy"), ta.get("robust_accuracy")) else \
                ours["robust_accuracy"] - ta["robust_accuracy"]
            head.append([f"{name} robust acc. − AutoAttack's", "≤ 0", "–" if gap is None else f"{100 * gap:+.1f} pt",
                         _ok(gap is not None and gap <= 1e-9)])
        head.append(["evaluate(standard) speed-up vs AutoAttack", "≥ 2×",
                     _x(a["speedup"].get("bastion evaluate(standard)")),
                     _ok(_ge(a["speedup"].get("bastion evaluate(standard)"), 2.0))])
    summary = "### Targets\n\n" + _table(["check", "target", "measured", "met"], head)
    return "\n\n".join([summary, *out]) + "\n"


def _passes(c: dict[str, int] | None, n: int) -> str:
    if not c:
        return "–"
    return f"{c['grad_rows'] / n:.1f} / {c['nograd_rows'] / n:.1f}"


def _row(section: dict[str, Any], name: str) -> dict[str, Any]:
    return next((r for r in section.get("rows", []) if r["name"] == name), {})


def _inv(v: float | None) -> float | None:
    return None if not v else 1.0 / v


def _le(v: float | None, bound: float) -> bool | None:
    return None if v is None else v <= bound


def _ge(v: float | None, bound: float | None) -> bool | None:
    return None if v is None or bound is None else v >= bound


def _ok(v: bool | None) -> str:
    return "–" if v is None else ("yes" if v else "**no**")


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    load_start = quiet_setup(args.threads)  # the peers' deprecation chatter is not part of the output

    model = load_model(args.model_path) if args.model_path is not None else fmnist_model()
    model.eval().requires_grad_(False)  # every competitor gets a frozen model: nobody computes parameter grads
    data = fmnist_test(max(args.n, args.n_small))
    b = Bench(model, data.images[:args.n].contiguous(), data.labels[:args.n].contiguous(), args)
    model_name = str(args.model_path or DEFAULT_MODEL_DIR)
    clean = float((b.clean_pred == b.y).float().mean())
    log.info("model %s: clean accuracy %.4f on %d images; sections: %s", model_name, clean, args.n,
             ", ".join(args.only))

    res: dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                           "model": {"name": model_name, "clean_accuracy": clean}, "sections": {}}
    t_all = time.perf_counter()
    for name in args.only:
        if name == "eval" and "pgd" in args.only:
            continue  # measured inside the pgd rounds, interleaved with them
        log.info("section %s", name)
        t0 = time.perf_counter()
        if name == "fgsm":
            out = section_fgsm(b)
        elif name == "pgd":
            out = section_pgd(b, with_eval="eval" in args.only)
        elif name == "eval":
            out = section_eval_alone(b)
        elif name == "cw":
            out = section_cw(b)
        elif name == "deepfool":
            out = section_deepfool(b)
        else:
            out = section_autoattack(b)
        out["section_s"] = time.perf_counter() - t0
        res["sections"][name] = out
        log.info("section %s done in %.0f s", name, out["section_s"])
        _write(res, args, load_start, t_all, final=False)  # a later section that fails loses nothing
    _write(res, args, load_start, t_all, final=True)
    return res


def _write(res: dict[str, Any], args: argparse.Namespace, load_start: Any, t_all: float, *, final: bool) -> None:
    """Fill in the machine and the markdown; print it at the end; write the JSON after every section."""
    res["machine"] = {**machine_info(), "loadavg_start": load_start}
    res["total_s"] = time.perf_counter() - t_all
    res["complete"] = final
    res["markdown"] = markdown(res, args)
    if final:
        print(res["markdown"])
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1, default=_json_default))
        if final:
            log.info("wrote %s", args.json)


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, (Tensor, np.ndarray)):
        return o.tolist()
    return str(o)


if __name__ == "__main__":
    main()
