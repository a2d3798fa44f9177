"""The detector tables of issue 6: AUC per detector and attack, adaptive C&W against MRR, overhead.

    python benchmarks/detectors.py --out runs/detectors              # mnist-5k, the full tables
    python benchmarks/detectors.py --quick --out /tmp/det-quick      # digits, minutes: checks the script

Three tables (printed as Markdown, and written to ``--out``: ``config.json``, ``results.json``,
``tables.md``):

1. **AUC** of every detector (`bastion.defenses.detectors`) against FGSM, JSMA, DeepFool, C&W L2
   and BIM (each attack that the registry has), crafted against the *undefended* model (the
   article's black-box-to-the-detector setting, its Table 1), with only *successful*
   adversarial examples as positives (`bastion.evaluation.detection`). Plus each detector's
   false-positive rate on clean test data at the threshold set on validation data (5%).
2. **Adaptive white-box C&W L2 against MRR** (the MRR article's Table 2): N = 0, 1, 2, 4, 8, 16
   defenders at security parameters 1% and 5%; `DetectorAwareCW` must fool the classifier and
   all N defenders at once (sum of per-defender margins). Columns: defense success (detected or
   still correct), L2 distortion of the successful attacks normalized by plain C&W's on the
   undefended model (ratio of medians), and the false-positive rate on clean test data.
3. **Inference overhead**: seconds per image of the model alone and with each detector's score.

Data: detectors are fit on the training split (kde-bu: its densities on all but the last
``--lr-examples`` training images, its regression on those); thresholds on the first
``--n-val`` test images; everything is measured on the next ``--n-test`` test images.

What a run costs. ``--quick`` (digits 8×8, 1,000 training images, 150 test, N ≤ 4): about 6 CPU
minutes (10 minutes of wall time on a shared machine). A full run (mnist-5k, N up to 16),
estimated from a measured 0.6 ms per image-gradient of cnn-small on 28×28 with two idle cores:
classifier and detectors ~5 min; table 1 ~10–20 min (C&W's 6×500 Adam steps on 500 images
dominate); table 2 ~1–3 h (plain C&W plus 12 adaptive C&W runs on 200 images, each step
costing about 2.5 model passes: the classifier, the defenders' feature pass and the success
check). ``--n-adaptive 100`` or ``--tables auc,overhead`` cut it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bastion.attacks import ATTACKS, create_attack
from bastion.attacks.detector_aware import DetectorAwareCW
from bastion.checkpoint import atomic_write_json
from bastion.data import load_dataset
from bastion.defenses.detectors import create_detector
from bastion.evaluation.detection import DetectionEval
from bastion.models import create_model

log = logging.getLogger("bench.detectors")

TABLES = ("auc", "mrr", "overhead")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="digits, small splits, cheap settings (validates the script)")
    p.add_argument("--data", default=None, help="dataset (default: mnist-5k; digits with --quick)")
    p.add_argument("--out", type=Path, required=True, help="folder for config.json, results.json, tables.md")
    p.add_argument("--tables", default=",".join(TABLES), help=f"comma-separated subset of {', '.join(TABLES)}")
    p.add_argument("--epochs", type=int, default=None, help="classifier training epochs (default 10; 5 with --quick)")
    p.add_argument("--n-val", type=int, default=None, help="validation images for thresholds (default 300; 150)")
    p.add_argument("--n-test", type=int, default=None, help="test images (default 500; 150)")
    p.add_argument("--n-adaptive", type=int, default=None,
                   help="test images attacked by adaptive C&W (default 200; 30)")
    p.add_argument("--lr-examples", type=int, default=500, help="training images kept for kde-bu's regression")
    p.add_argument("--eps", type=float, default=None, help="linf radius of FGSM/BIM (default 0.3; 0.15 with --quick)")
    p.add_argument("--defenders", default=None, help="MRR sizes N for table 2 (default 0,1,2,4,8,16; 0,1,2,4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    q = a.quick
    a.data = a.data or ("digits" if q else "mnist-5k")
    a.epochs = a.epochs or (5 if q else 10)
    a.n_val = a.n_val or (150 if q else 300)
    a.n_test = a.n_test or (150 if q else 500)
    a.n_adaptive = a.n_adaptive or (30 if q else 200)
    a.eps = a.eps or (0.15 if q else 0.3)
    a.defenders = [int(n) for n in (a.defenders or ("0,1,2,4" if q else "0,1,2,4,8,16")).split(",")]
    a.tables = [t for t in a.tables.split(",") if t]
    bad = sorted(set(a.tables) - set(TABLES))
    if bad:
        p.error(f"--tables: unknown {', '.join(bad)}; choose from {', '.join(TABLES)}")
    return a


# --------------------------------------------------------------------------- setup
def train_classifier(data, epochs: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model("cnn-small", data.num_classes, data.shape, mean=data.mean, std=data.std, dropout=0.25)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(data), generator=g)
        for i in range(0, len(data), 128):
            idx = perm[i:i + 128]
            loss = F.cross_entropy(model(data.images[idx]), data.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        log.info("classifier epoch %d/%d: loss %.4f", epoch + 1, epochs, float(loss))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def detector_specs(quick: bool, eps: float) -> dict[str, str]:
    """The detectors and their settings (28×28 defaults; digits get bit-depth squeezers and a wider AE)."""
    if quick:
        return {
            "metzen": f'metzen:attack="bim",threat="linf:{eps}",epochs=10',
            "kde": 'kde:bandwidth="auto"',
            "bayes-uncertainty": "bayes-uncertainty:seed=0",
            "kde-bu": f'kde-bu:bandwidth="auto",seed=0,threat="linf:{eps}"',
            "feature-squeeze": 'feature-squeeze:squeezers=["bit-depth:bits=1","bit-depth:bits=2"]',
            "magnet": "magnet:structure=[16],ae_epochs=25",
            "mrr": "mrr:n=16,epochs=20",
        }
    return {
        "metzen": f'metzen:attack="bim",threat="linf:{eps}"',
        "kde": "kde:bandwidth=\"auto\"",
        "bayes-uncertainty": "bayes-uncertainty:seed=0",
        "kde-bu": f'kde-bu:bandwidth="auto",seed=0,threat="linf:{eps}"',
        "feature-squeeze": "feature-squeeze",
        "magnet": "magnet",
        "mrr": "mrr:n=16",
    }


def attack_suite(quick: bool, eps: float) -> dict[str, tuple[Any, Any]]:
    """name -> (attack, threat) for the attacks the registry has (others are reported as missing)."""
    cw_kw = cw_settings(quick)
    wanted = {
        "fgsm": (lambda: create_attack("fgsm"), f"linf:{eps}"),
        "jsma": (lambda: create_attack("jsma", gamma=0.1), None),
        "deepfool": (lambda: create_attack("deepfool"), None),
        "cw-l2": (lambda: create_attack("cw", **cw_kw) if "cw" in ATTACKS else DetectorAwareCW(**cw_kw), None),
        "bim": (lambda: create_attack("bim", steps=10), f"linf:{eps}"),
    }
    out = {}
    for name, (make, threat) in wanted.items():
        try:
            out[name] = (make(), threat)
        except (KeyError, ValueError) as e:
            log.warning("attack %s unavailable: %s", name, e)
    return out


def cw_settings(quick: bool) -> dict[str, int]:
    return dict(binary_search_steps=4, max_iterations=100) if quick else dict(binary_search_steps=6, max_iterations=500)


def run_attack(attack, model, x, y, threat, seed: int):
    res = [attack(model, x[i:i + 250], y[i:i + 250], threat, seed=seed) for i in range(0, len(y), 250)]
    cat = torch.cat
    return cat([r.x_adv for r in res]), cat([r.success for r in res]), cat([r.norms["l2"] for r in res])


# --------------------------------------------------------------------------- tables
def table_auc(args, model, train, x_val, x, y, dets) -> dict[str, Any]:
    suite = attack_suite(args.quick, args.eps)
    advs = {}
    for name, (atk, threat) in suite.items():
        t = time.perf_counter()
        advs[name] = run_attack(atk, model, x, y, threat, args.seed)
        log.info("attack %s: success %.3f (%.1fs)", name, float(advs[name][1].float().mean()), time.perf_counter() - t)
    rows = {}
    for dname, det in dets.items():
        ev = DetectionEval(det, threshold_from=x_val, fpr=0.05)
        row = {}
        for aname, (xa, succ, _) in advs.items():
            rep = ev.evaluate(x, y, xa, success=succ, attack=aname)
            row[aname] = {"auc": rep.auc, "positives": rep.n_positive, "detection_rate": rep.detection_rate,
                          "fpr_test": rep.fpr_test}
        rows[dname] = row
        log.info("AUC %s: %s", dname, {a: None if r["auc"] is None else round(r["auc"], 3) for a, r in row.items()})
    return {"attacks": {a: {"success_rate": float(s.float().mean())} for a, (_, s, _) in advs.items()},
            "missing_attacks": sorted({"fgsm", "jsma", "deepfool", "cw-l2", "bim"} - set(advs)), "rows": rows}


def table_mrr(args, model, train, x_val, x, y) -> dict[str, Any]:
    n = args.n_adaptive
    xa, ya = x[:n], y[:n]
    kw = cw_settings(args.quick)
    plain = DetectorAwareCW(**kw)(model, xa, ya, seed=args.seed)
    ref_l2 = plain.norms["l2"][plain.success]
    log.info("plain C&W on the undefended model: success %.3f, median L2 %.3f", plain.success_rate,
             float(ref_l2.median()) if ref_l2.numel() else math.nan)
    rows = []
    for n_def in args.defenders:
        t = time.perf_counter()
        mrr = create_detector(f"mrr:n={n_def}" + (",epochs=20" if args.quick else ""), seed=args.seed)
        mrr.fit(model, train.images, train.labels)
        for sp in (0.01, 0.05):
            ev = DetectionEval(mrr, threshold_from=x_val, fpr=sp)
            adv = DetectorAwareCW(detector=mrr, combine="sum", det_kappa=0.1, **kw)(model, xa, ya, seed=args.seed)
            rep = ev.evaluate(xa, ya, adv.x_adv, attack="detector-cw", l2_reference=ref_l2)
            clean_fpr = float(mrr.detect(x).is_adv.float().mean())
            rows.append({"N": n_def, "SP": sp, "defense_success": rep.defense_success,
                         "normalized_l2": rep.l2_normalized if n_def else 1.0, "fp_rate": clean_fpr,
                         "attack_success": rep.attack_success})
            log.info("MRR N=%d SP=%.2f: %s (%.0fs)", n_def, sp, rows[-1], time.perf_counter() - t)
    return {"plain_cw": {"success_rate": plain.success_rate,
                         "median_l2": float(ref_l2.median()) if ref_l2.numel() else None}, "rows": rows}


def table_overhead(args, model, x, dets) -> dict[str, Any]:
    xb = x[:256]
    reps = 3 if args.quick else 10

    def per_image(fn) -> float:
        with torch.no_grad():
            fn()  # warm-up
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2] / xb.shape[0]

    base = per_image(lambda: model(xb))
    rows = {"model": {"seconds_per_image": base, "ratio": 1.0}}
    for name, det in dets.items():
        s = per_image(lambda d=det: (model(xb), d.scores(xb)))
        rows[name] = {"seconds_per_image": s, "ratio": s / base}
    return rows


# --------------------------------------------------------------------------- output
def markdown(results: dict[str, Any]) -> str:
    out = []
    f = lambda v: "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"  # noqa: E731
    if "auc" in results:
        t = results["auc"]
        attacks = list(t["attacks"])
        out += ["### AUC (successful adversarial examples only)", "",
                "| detector | " + " | ".join(attacks) + " | FP rate (test, SP 5%) |",
                "|---" * (len(attacks) + 2) + "|"]
        for d, row in t["rows"].items():
            fp = next(iter(row.values()))["fpr_test"] if row else None
            out.append(f"| {d} | " + " | ".join(f(row[a]["auc"]) for a in attacks) + f" | {f(fp)} |")
        if t["missing_attacks"]:
            out.append(f"\nnot in the registry: {', '.join(t['missing_attacks'])}")
        out.append("")
    if "mrr" in results:
        t = results["mrr"]
        out += ["### Adaptive C&W L2 vs MRR", "", "| SP | N | defense success | normalized L2 | FP rate |",
                "|---|---|---|---|---|"]
        for r in t["rows"]:
            out.append(f"| {r['SP']:.0%} | {r['N']} | {f(r['defense_success'])} | {f(r['normalized_l2'])} "
                       f"| {f(r['fp_rate'])} |")
        out.append("")
    if "overhead" in results:
        out += ["### Inference overhead", "", "| | s / image | × model |", "|---|---|---|"]
        for name, r in results["overhead"].items():
            out.append(f"| {name} | {r['seconds_per_image']:.2e} | {r['ratio']:.1f} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    atomic_write_json(args.out / "config.json", {**cfg, "argv": sys.argv})
    t0 = time.perf_counter()
    train, test = load_dataset(args.data, "train"), load_dataset(args.data, "test")
    if args.quick:
        train = train.take(1000)
    model = train_classifier(train, args.epochs, args.seed)
    with torch.no_grad():
        acc = float((model(test.images).argmax(1) == test.labels).float().mean())
    log.info("classifier test accuracy %.4f", acc)
    x_val = test.images[:args.n_val]
    x, y = test.images[args.n_val:args.n_val + args.n_test], test.labels[args.n_val:args.n_val + args.n_test]
    results: dict[str, Any] = {"clean_accuracy": acc, "seconds": {}}

    dets = {}
    if "auc" in args.tables or "overhead" in args.tables:
        n_lr = min(args.lr_examples, len(train) // 4)
        for name, spec in detector_specs(args.quick, args.eps).items():
            t = time.perf_counter()
            det = create_detector(spec)
            if name == "kde-bu":
                det.fit(model, train.images[-n_lr:], train.labels[-n_lr:], x_density=train.images[:-n_lr],
                        y_density=train.labels[:-n_lr], seed=args.seed)
            else:
                det.fit(model, train.images, train.labels)
            dets[name] = det
            results["seconds"][f"fit-{name}"] = time.perf_counter() - t
            log.info("fit %s in %.1fs", name, results["seconds"][f"fit-{name}"])
    for table in args.tables:
        t = time.perf_counter()
        if table == "auc":
            results["auc"] = table_auc(args, model, train, x_val, x, y, dets)
        elif table == "mrr":
            results["mrr"] = table_mrr(args, model, train, x_val, x, y)
        else:
            results["overhead"] = table_overhead(args, model, x, dets)
        results["seconds"][table] = time.perf_counter() - t
    results["seconds"]["total"] = time.perf_counter() - t0
    atomic_write_json(args.out / "results.json", json.loads(json.dumps(results, default=float)))
    md = markdown(results)
    (args.out / "tables.md").write_text(md + "\n")
    print(md)
    print(f"total {results['seconds']['total']:.0f}s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
