"""The detector tables of issue 6: AUC per detector and attack, adaptive attacks, MRR vs N and SP, overhead.

    python benchmarks/detectors.py --data mnist-5k --out runs/detectors-mnist5k
    python benchmarks/detectors.py --data fashion-mnist --out runs/detectors-fmnist --tables auc,adaptive,overhead
    python benchmarks/detectors.py --quick --out /tmp/det-quick       # digits, a few minutes: checks the script

Four tables (printed as Markdown, and written to ``--out``: ``config.json``, ``results.json``
(merged run after run, so tables can be made one at a time), ``tables.md``):

1. ``auc`` — **AUC** of every detector (`bastion.defenses.detectors`) against FGSM, BIM,
   DeepFool, C&W L2 and JSMA crafted against the *undefended* classifier (the detector is
   unknown to the attacker: the MRR article's Table 1 setting), with only *successful*
   adversarial examples as positives and the same clean test images as negatives
   (`bastion.evaluation.detection`). C&W and JSMA run on the first ``--n-slow`` / ``--n-jsma``
   test images (their AUC uses those clean images as negatives). Plus each detector's
   false-positive rate on clean test images at the threshold set on the validation images
   (SP 5%).
2. ``mrr`` — **adaptive white-box C&W L2 against MRR** (the article's Table 2 layout): N = 0,
   1, 2, 4, 8, 16 defenders at security parameters 1% and 5%. `DetectorAwareCW` must fool the
   classifier and all N defenders at once (sum of per-defender margins). Columns: defense
   success (detected, or still correctly classified), L2 distortion of the successful attacks
   normalized by the same C&W without the detector term on the undefended model (ratio of
   medians), and the false-positive rate on clean test images.
3. ``adaptive`` — **every detector under its adaptive attacks**, threshold at SP 5%: naive BIM
   (from table 1) beside detector-pgd (same L∞ budget, 40 steps, EOT for randomized detectors)
   and detector-cw (normalized L2 as in table 2).
4. ``overhead`` — **inference overhead**: batch latency of each detector's score (which includes
   the classifier's own forward pass) relative to the bare classifier on the same batch, timed
   interleaved in one run (`benchmarks/_common.interleaved`); MRR for N = 1 … 16.

Data: the classifier is a cnn-small — on mnist-5k trained here (10 epochs, Adam, dropout 0.25)
and cached in ``--out/classifier``; on Fashion-MNIST the benchmarks' cached model
(``runs/bench-fmnist-cnn``, `_common.fmnist_model`). Detectors are fit on the training split
(``--fit-limit`` images drawn at random; kde-bu: densities on all but ``--lr-examples`` of
them, its regression on those) and saved in ``--out/detectors`` (`save_detector`), so a later
run of another table reuses them. The test split is shuffled (seeded: mnist-5k's is sorted by
class): its first ``--n-val`` images set the thresholds, the next ``--n-test`` are measured.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import fmnist_model, interleaved, machine_info, set_threads  # noqa: E402

from bastion.attacks import create_attack  # noqa: E402
from bastion.attacks.detector_aware import DetectorAwareCW, DetectorAwarePGD  # noqa: E402
from bastion.checkpoint import atomic_write_json, load_model, save_model  # noqa: E402
from bastion.data import load_dataset  # noqa: E402
from bastion.defenses.detectors import create_detector, load_detector, save_detector  # noqa: E402
from bastion.evaluation.detection import DetectionEval  # noqa: E402
from bastion.models import create_model  # noqa: E402

log = logging.getLogger("bench.detectors")

TABLES = ("auc", "mrr", "adaptive", "overhead")
ATTACKS = ("fgsm", "bim", "deepfool", "cw-l2", "jsma")
#: DeepFense (Rouhani et al. 2018, arXiv:1709.02538), MRR on MNIST: the AUCs the article reports
DEEPFENSE_MNIST_AUC = {"fgsm": 0.996, "jsma": 0.995, "deepfool": 0.996, "cw-l2": 0.989, "bim": 0.994}
#: the MRR article's Table 2 (MNIST, adaptive C&W), SP 5%, N = 16
ARTICLE_TABLE2_SP5_N16 = {"defense_success": 0.84, "normalized_l2": 1.57, "fp_rate": 0.276}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="digits, small splits, cheap settings (validates the script)")
    p.add_argument("--data", default=None, help="mnist-5k, fashion-mnist or digits (default mnist-5k; digits with --quick)")
    p.add_argument("--out", type=Path, required=True, help="folder for config.json, results.json, tables.md")
    p.add_argument("--tables", default=",".join(TABLES), help=f"comma-separated subset of {', '.join(TABLES)}")
    p.add_argument("--detectors", default=None,
                   help="comma-separated detectors of tables 1, 3 and 4 (default: all of `detector_specs`)")
    p.add_argument("--epochs", type=int, default=None, help="mnist-5k/digits classifier epochs (default 10; 5 quick)")
    p.add_argument("--fit-limit", type=int, default=None,
                   help="training images the detectors are fit on (default: all; 10000 on fashion-mnist)")
    p.add_argument("--n-val", type=int, default=None, help="validation images for thresholds (default 500; 120)")
    p.add_argument("--n-test", type=int, default=None, help="test images measured (default 500; 150)")
    p.add_argument("--n-slow", type=int, default=None, help="test images attacked by C&W in table 1 (default 200; 40)")
    p.add_argument("--n-jsma", type=int, default=None, help="test images attacked by JSMA (default 100; 30)")
    p.add_argument("--n-adaptive", type=int, default=None, help="test images of the adaptive attacks (default 100; 30)")
    p.add_argument("--lr-examples", type=int, default=500, help="fit images kept for kde-bu's regression")
    p.add_argument("--eps", type=float, default=None,
                   help="linf radius of FGSM/BIM/detector-pgd (default 0.3 mnist-5k, 0.1 fashion-mnist, 0.15 digits)")
    p.add_argument("--cw-search", type=int, default=None, help="C&W binary-search steps (default 5; 3 quick)")
    p.add_argument("--cw-steps", type=int, default=None, help="C&W Adam steps per constant (default 200; 50 quick)")
    p.add_argument("--defenders", default=None, help="MRR sizes N for table 2 (default 0,1,2,4,8,16; 0,1,2,4 quick)")
    p.add_argument("--sps", default="0.01,0.05", help="security parameters (clean FP rates) of table 2")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds of the overhead table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    q = a.quick
    a.data = a.data or ("digits" if q else "mnist-5k")
    a.epochs = a.epochs or (5 if q else 10)
    a.n_val = a.n_val or (120 if q else 500)
    a.n_test = a.n_test or (150 if q else 500)
    a.n_slow = min(a.n_test, a.n_slow or (40 if q else 200))
    a.n_jsma = min(a.n_test, a.n_jsma or (30 if q else 100))
    a.n_adaptive = min(a.n_test, a.n_adaptive or (30 if q else 100))
    a.eps = a.eps or {"digits": 0.15, "fashion-mnist": 0.1}.get(a.data, 0.3)
    a.cw_search = a.cw_search or (3 if q else 5)
    a.cw_steps = a.cw_steps or (50 if q else 200)
    if a.fit_limit is None and a.data == "fashion-mnist":
        a.fit_limit = 10000
    a.defenders = [int(n) for n in (a.defenders or ("0,1,2,4" if q else "0,1,2,4,8,16")).split(",")]
    a.sps = [float(s) for s in a.sps.split(",")]
    a.tables = [t for t in a.tables.split(",") if t]
    a.detectors = None if a.detectors is None else [d for d in a.detectors.split(",") if d]
    bad = sorted(set(a.tables) - set(TABLES))
    if bad:
        p.error(f"--tables: unknown {', '.join(bad)}; choose from {', '.join(TABLES)}")
    return a


# --------------------------------------------------------------------------- setup
def train_classifier(data, epochs: int, seed: int) -> torch.nn.Module:
    """cnn-small with dropout 0.25 (so MC dropout has a rate of its own), Adam, batch 128."""
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
        log.info("classifier epoch %d/%d: loss %.4f", epoch + 1, epochs, float(loss.detach()))
    return model.eval()


def classifier(args, train) -> torch.nn.Module:
    if args.data == "fashion-mnist":
        model = fmnist_model()
    else:
        stem = args.out / "classifier"
        if stem.with_suffix(".json").exists():
            model = load_model(stem)
        else:
            model = train_classifier(train, args.epochs, args.seed)
            save_model(stem, model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def detector_specs(args) -> dict[str, str]:
    """Each detector's settings. 28×28 gets the papers' MNIST squeezers; digits (8×8) and
    Fashion-MNIST (textures a 1-bit squeeze destroys) milder ones; digits a wider, shallower AE."""
    eps = args.eps
    specs = {
        "metzen": f'metzen:attack="bim",threat="linf:{eps}"',
        "kde": 'kde:bandwidth="auto"',
        "bayes-uncertainty": "bayes-uncertainty:seed=0",
        "kde-bu": f'kde-bu:bandwidth="auto",seed=0,threat="linf:{eps}"',
        "feature-squeeze": "feature-squeeze",
        "magnet": "magnet",
        "mrr-penultimate": "mrr:n=16",
        "mrr": mrr_spec(args, 16),
    }
    if args.data == "fashion-mnist":
        specs["feature-squeeze"] = 'feature-squeeze:squeezers=["bit-depth:bits=4","median:size=2"]'
    if args.data == "digits":
        specs["metzen"] += ",epochs=10"
        specs["feature-squeeze"] = 'feature-squeeze:squeezers=["bit-depth:bits=1","bit-depth:bits=2"]'
        specs["magnet"] = "magnet:structure=[16],ae_epochs=25"
        specs["mrr-penultimate"] = "mrr:n=16,epochs=20"
    return specs


def mrr_spec(args, n: int) -> str:
    """MRR with n defenders spread over the penultimate layer and the pixels, combined by mean log-odds."""
    return f'mrr:n={n},layer=[null,"input"],combine="logit"' + (",epochs=20" if args.data == "digits" else "")


def cw_kw(args) -> dict[str, Any]:
    return dict(binary_search_steps=args.cw_search, max_iterations=args.cw_steps, initial_const=0.1)


def run_attack(attack, model, x, y, threat, seed: int, batch: int = 250):
    res = [attack(model, x[i:i + batch], y[i:i + batch], threat, seed=seed) for i in range(0, len(y), batch)]
    return (torch.cat([r.x_adv for r in res]), torch.cat([r.success for r in res]),
            torch.cat([r.norms["l2"] for r in res]))


class Context:
    """Data, classifier and (lazily fitted or loaded) detectors of one run."""

    def __init__(self, args) -> None:
        self.args = args
        self.train = load_dataset(args.data, "train")
        test = load_dataset(args.data, "test")
        if args.quick:
            self.train = self.train.take(1000)
        g = torch.Generator().manual_seed(args.seed)
        perm = torch.randperm(len(test), generator=g)  # mnist-5k's test split is sorted by class
        if args.n_val + args.n_test > len(test):
            raise SystemExit(f"--n-val {args.n_val} + --n-test {args.n_test} exceed the {len(test)} test images")
        self.x_val = test.images[perm[:args.n_val]]
        sel = perm[args.n_val:args.n_val + args.n_test]
        self.x, self.y = test.images[sel], test.labels[sel]
        fit = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(args.seed + 1))
        if args.fit_limit is not None:
            fit = fit[:args.fit_limit]
        self.fit_idx = fit
        self.model = classifier(args, self.train)
        with torch.no_grad():
            self.clean_accuracy = float((self.model(test.images).argmax(1) == test.labels).float().mean())
        log.info("classifier test accuracy %.4f", self.clean_accuracy)
        self.dets: dict[str, Any] = {}
        self.fit_seconds: dict[str, float] = {}

    def detector(self, name: str, spec: str | None = None):
        """The detector `name` (fit once, then loaded from ``--out/detectors``)."""
        if name in self.dets:
            return self.dets[name]
        spec = spec or detector_specs(self.args)[name]
        stem = self.args.out / "detectors" / name
        if stem.with_suffix(".json").exists():
            det = load_detector(stem, self.model)
        else:
            t = time.perf_counter()
            det = create_detector(spec)
            xf, yf = self.train.images[self.fit_idx], self.train.labels[self.fit_idx]
            if det.name == "kde-bu":
                k = min(self.args.lr_examples, len(xf) // 4)
                det.fit(self.model, xf[-k:], yf[-k:], x_density=xf[:-k], y_density=yf[:-k], seed=self.args.seed)
            else:
                det.fit(self.model, xf, yf)
            self.fit_seconds[name] = time.perf_counter() - t
            log.info("fit %s in %.1fs", name, self.fit_seconds[name])
            stem.parent.mkdir(parents=True, exist_ok=True)
            save_detector(det, stem)
        self.dets[name] = det
        return det

    def all_detectors(self) -> dict[str, Any]:
        names = self.args.detectors or list(detector_specs(self.args))
        unknown = sorted(set(names) - set(detector_specs(self.args)))
        if unknown:
            raise SystemExit(f"--detectors: unknown {', '.join(unknown)}; choose from {', '.join(detector_specs(self.args))}")
        return {name: self.detector(name) for name in names}

    def adversarial(self, name: str, attack, threat: str | None, n: int) -> tuple[torch.Tensor, ...]:
        """(x_adv, success, l2) of `attack` on the first n test images, cached in ``--out/advs`` (keyed by config)."""
        from safetensors.torch import load_file, save_file

        key = json.dumps({"config": attack.config(), "threat": threat, "n": n, "seed": self.args.seed}, sort_keys=True,
                         default=str)
        path = self.args.out / "advs" / f"{name}.safetensors"
        if path.exists():
            t = load_file(str(path))
            if json.loads(bytes(t["key"].tolist()).decode()) == json.loads(key):
                return t["x_adv"], t["success"], t["l2"], None
        t0 = time.perf_counter()
        x_adv, success, l2 = run_attack(attack, self.model, self.x[:n], self.y[:n], threat, self.args.seed)
        secs = time.perf_counter() - t0
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"x_adv": x_adv.contiguous(), "success": success, "l2": l2,
                   "key": torch.tensor(list(key.encode()), dtype=torch.uint8)}, str(path))
        return x_adv, success, l2, secs


# --------------------------------------------------------------------------- tables
def table_auc(ctx: Context) -> dict[str, Any]:
    a = ctx.args
    m, x, y = ctx.model, ctx.x, ctx.y
    suite = {
        "fgsm": (create_attack("fgsm"), f"linf:{a.eps}", len(y)),
        "bim": (create_attack("bim", steps=10), f"linf:{a.eps}", len(y)),
        "deepfool": (create_attack("deepfool"), None, len(y)),
        "cw-l2": (create_attack("cw", **cw_kw(a)), None, a.n_slow),
        "jsma": (create_attack("jsma", gamma=0.1), None, a.n_jsma),
    }
    advs, attacks = {}, {}
    old = (ctx.results.get("auc") or {}).get("attacks", {})
    fresh = False
    for name, (atk, threat, n) in suite.items():
        x_adv, succ, l2_all, secs = ctx.adversarial(name, atk, threat, n)
        advs[name] = (x_adv, succ, l2_all)
        if secs is None:  # read back from the cache: keep the time of the run that made it
            secs = (old.get(name) or {}).get("seconds")
        else:
            fresh = True
        l2 = l2_all[succ]
        attacks[name] = {"n": n, "threat": threat, "config": atk.config(), "success_rate": float(succ.float().mean()),
                         "median_l2": float(l2.median()) if l2.numel() else None, "seconds": secs}
        log.info("attack %s on %d: success %.3f (%s s)", name, n, attacks[name]["success_rate"], secs)
    rows = {}
    for dname, det in ctx.all_detectors().items():
        ev = DetectionEval(det, threshold_from=ctx.x_val, fpr=0.05)
        fp = float(det.detect(x).is_adv.float().mean())
        row: dict[str, Any] = {"fp_rate": fp}
        for aname, (xa, succ, _) in advs.items():
            n = xa.shape[0]
            rep = ev.evaluate(x[:n], y[:n], xa, success=succ, attack=aname)
            row[aname] = {"auc": rep.auc, "positives": rep.n_positive, "detection_rate": rep.detection_rate,
                          "defense_success": rep.defense_success}
        rows[dname] = row
        log.info("AUC %s: %s", dname, {k: round(v["auc"], 3) if isinstance(v, dict) and v["auc"] is not None else v
                                       for k, v in row.items()})
    # rows of detectors measured by earlier runs on the very same (cached) adversarial examples
    merged = {} if fresh else dict((ctx.results.get("auc") or {}).get("rows", {}))
    merged.update(rows)
    return {"attacks": attacks, "rows": merged, "deepfense_mnist_auc": DEEPFENSE_MNIST_AUC}


def adaptive_key(ctx: Context) -> dict[str, Any]:
    """What the cells of the adaptive tables depend on: a stored cell is reused only under the same key."""
    a = ctx.args
    return {"n": a.n_adaptive, "cw": cw_kw(a), "eps": a.eps, "seed": a.seed, "n_val": a.n_val}


def partial_rows(ctx: Context, table: str) -> Any:
    """Rows of `table` stored by an earlier (possibly interrupted) run with the same `adaptive_key`."""
    old = ctx.results.get(table) or {}
    return old.get("rows") if old.get("key") == adaptive_key(ctx) else None


def plain_cw(ctx: Context) -> dict[str, Any]:
    """detector-cw without a detector (plain C&W, same optimizer) on the first n_adaptive images: the reference L2.

    Stored in results.json (``plain_cw``, with the norms) so that a resumed run normalizes by the same reference.
    """
    if "plain_cw" not in ctx.__dict__:
        a = ctx.args
        n = a.n_adaptive
        old = ctx.results.get("plain_cw") or {}
        if old.get("key") == adaptive_key(ctx):
            ctx.plain_cw = {**old, "l2": torch.tensor(old["l2"])}
            return ctx.plain_cw
        t = time.perf_counter()
        _, ok, l2 = run_attack(DetectorAwareCW(**cw_kw(a)), ctx.model, ctx.x[:n], ctx.y[:n], None, a.seed)
        ctx.plain_cw = {"l2": l2[ok], "success_rate": float(ok.float().mean()),
                        "median_l2": float(l2[ok].median()) if bool(ok.any()) else None,
                        "seconds": time.perf_counter() - t}
        ctx.save("plain_cw", {**ctx.plain_cw, "l2": ctx.plain_cw["l2"].tolist(), "key": adaptive_key(ctx)})
        log.info("plain C&W on the undefended model: success %.3f, median L2 %s (%.0fs)", ctx.plain_cw["success_rate"],
                 ctx.plain_cw["median_l2"], ctx.plain_cw["seconds"])
    return ctx.plain_cw


def _adaptive_cw(ctx: Context, det, sp: float) -> dict[str, Any]:
    a = ctx.args
    n = a.n_adaptive
    xa, ya = ctx.x[:n], ctx.y[:n]
    ref = plain_cw(ctx)
    ev = DetectionEval(det, threshold_from=ctx.x_val, fpr=sp)
    t = time.perf_counter()
    adv, _, _ = run_attack(DetectorAwareCW(detector=det, combine="sum", **cw_kw(a)), ctx.model, xa, ya, None, a.seed)
    rep = ev.evaluate(xa, ya, adv, attack="detector-cw", l2_reference=ref["l2"])
    return {"defense_success": rep.defense_success, "attack_success": rep.attack_success,
            "normalized_l2": rep.l2_normalized, "median_l2": rep.l2_median,
            "fp_rate": float(det.detect(ctx.x).is_adv.float().mean()), "seconds": time.perf_counter() - t}


def table_mrr(ctx: Context) -> dict[str, Any]:
    a = ctx.args
    done = {(r["N"], r["SP"]): r for r in (partial_rows(ctx, "mrr") or [])}
    grid = {(n_def, sp) for n_def in a.defenders for sp in a.sps}
    rows = [r for k, r in done.items() if k not in grid]  # cells of other --defenders/--sps runs are kept

    def table() -> dict[str, Any]:
        ref = plain_cw(ctx)
        return {"n": a.n_adaptive, "cw": cw_kw(a), "key": adaptive_key(ctx),
                "plain_cw": {"success_rate": ref["success_rate"], "median_l2": ref["median_l2"]},
                "rows": sorted(rows, key=lambda r: (r["SP"], r["N"])), "article_sp5_n16": ARTICLE_TABLE2_SP5_N16}

    for n_def in a.defenders:
        name = "mrr" if n_def == 16 else f"mrr-n{n_def}"
        det = ctx.detector(name, mrr_spec(a, n_def))
        for sp in a.sps:
            if (n_def, sp) in done:
                rows.append(done[(n_def, sp)])
                continue
            r = {"N": n_def, "SP": sp, **_adaptive_cw(ctx, det, sp)}
            if n_def == 0:
                r["normalized_l2_measured"] = r["normalized_l2"]
                r["normalized_l2"] = 1.0  # no detector: the attack is plain C&W by construction
            rows.append(r)
            ctx.save("mrr", table())  # after every cell: an interrupted run resumes here
            log.info("MRR N=%d SP=%.2f: %s", n_def, sp, {k: (round(v, 3) if isinstance(v, float) else v)
                                                         for k, v in r.items()})
    return table()


def table_adaptive(ctx: Context) -> dict[str, Any]:
    a = ctx.args
    n = a.n_adaptive
    xa, ya = ctx.x[:n], ctx.y[:n]
    rows = dict(partial_rows(ctx, "adaptive") or {})
    bim = create_attack("bim", steps=10)
    x_bim, _, _ = run_attack(bim, ctx.model, xa, ya, f"linf:{a.eps}", a.seed)
    names = ctx.args.detectors or list(detector_specs(ctx.args))
    for dname in names:
        if dname in rows:
            continue
        det = ctx.detector(dname)
        t = time.perf_counter()
        ev = DetectionEval(det, threshold_from=ctx.x_val, fpr=0.05)
        naive = ev.evaluate(xa, ya, x_bim, attack="bim")
        pgd = DetectorAwarePGD(detector=det, steps=40, combine="sum")
        x_pgd, _, _ = run_attack(pgd, ctx.model, xa, ya, f"linf:{a.eps}", a.seed)
        aware = ev.evaluate(xa, ya, x_pgd, attack="detector-pgd")
        cw = _adaptive_cw(ctx, det, 0.05)
        rows[dname] = {
            "fp_rate": cw["fp_rate"], "declaration": {k: det.declaration()[k] for k in ("differentiable", "randomized",
                                                                                       "supervised", "eot", "bpda")},
            "bim": {"detection_rate": naive.detection_rate, "defense_success": naive.defense_success},
            "detector_pgd": {"detection_rate": aware.detection_rate, "defense_success": aware.defense_success,
                             "attack_success": aware.attack_success},
            "detector_cw": cw, "seconds": time.perf_counter() - t}
        log.info("adaptive %s: BIM defense %.3f -> detector-pgd %.3f; detector-cw defense %.3f, L2 x%s (%.0fs)", dname,
                 naive.defense_success, aware.defense_success, cw["defense_success"], cw["normalized_l2"],
                 rows[dname]["seconds"])
        ctx.save("adaptive", {"n": n, "eps": a.eps, "cw": cw_kw(a), "key": adaptive_key(ctx), "rows": rows})
    return {"n": n, "eps": a.eps, "cw": cw_kw(a), "key": adaptive_key(ctx), "rows": rows}


def table_overhead(ctx: Context) -> dict[str, Any]:
    a = ctx.args
    xb = ctx.x[:256]
    dets = dict(ctx.all_detectors())
    for n_def in (1, 2, 4, 8):  # timing does not depend on how well the defenders are trained
        name = f"mrr-n{n_def}"
        dets[name] = ctx.detector(name, mrr_spec(a, n_def))
    fns = {"model": lambda: ctx.model(xb)}
    for name, det in dets.items():
        fns[name] = (lambda d=det: d.scores(xb))
    with torch.no_grad():
        timings = interleaved(fns, repeats=a.repeats)
    base = timings["model"]
    rows = {name: {"median_s": t.median, "ratio": t.ratio_to(base), "samples": len(t.times)}
            for name, t in timings.items()}
    return {"batch": int(xb.shape[0]), "repeats": a.repeats, "rows": rows}


# --------------------------------------------------------------------------- output
def _f(v: Any, d: int = 3) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"


def markdown(results: dict[str, Any], data: str) -> str:
    out = []
    if "auc" in results:
        t = results["auc"]
        names = [n for n in ATTACKS if n in t["attacks"]]
        head = [f"{n} (n={t['attacks'][n]['n']}, {t['attacks'][n]['success_rate']:.0%} succ.)" for n in names]
        out += [f"AUC on {data} (successful adversarial examples only; attacks crafted against the bare classifier)",
                "", "| detector | " + " | ".join(head) + " | clean FP at SP 5% |", "|---" * (len(names) + 2) + "|"]
        for d, row in t["rows"].items():
            out.append(f"| {d} | " + " | ".join(_f(row[n]["auc"]) for n in names) + f" | {_f(row['fp_rate'])} |")
        if data == "mnist-5k":
            ref = t["deepfense_mnist_auc"]
            out.append("| *DeepFense MRR, MNIST (article)* | " + " | ".join(_f(ref.get(n)) for n in names) + " | |")
        out.append("")
    if "mrr" in results:
        t = results["mrr"]
        out += [f"Adaptive C&W L2 against MRR on {data} (n={t['n']}; plain C&W on the bare model: "
                f"{_f(t['plain_cw']['success_rate'])} success, median L2 {_f(t['plain_cw']['median_l2'])})", "",
                "| SP | N | defense success | normalized L2 | clean FP rate |", "|---|---|---|---|---|"]
        for r in t["rows"]:
            out.append(f"| {r['SP']:.0%} | {r['N']} | {_f(r['defense_success'])} | {_f(r['normalized_l2'], 2)} "
                       f"| {_f(r['fp_rate'])} |")
        out.append("")
    if "adaptive" in results:
        t = results["adaptive"]
        out += [f"Every detector under its adaptive attacks on {data} (n={t['n']}, SP 5%, L∞ {t['eps']})", "",
                "| detector | clean FP | BIM: detected / defense succ. | detector-pgd: detected / defense succ. "
                "| detector-cw: defense succ. / normalized L2 |", "|---|---|---|---|---|"]
        for d, r in t["rows"].items():
            out.append(f"| {d} | {_f(r['fp_rate'])} | {_f(r['bim']['detection_rate'])} / "
                       f"{_f(r['bim']['defense_success'])} | {_f(r['detector_pgd']['detection_rate'])} / "
                       f"{_f(r['detector_pgd']['defense_success'])} | {_f(r['detector_cw']['defense_success'])} / "
                       f"{_f(r['detector_cw']['normalized_l2'], 2)} |")
        out.append("")
    if "overhead" in results:
        t = results["overhead"]
        out += [f"Inference overhead on {data} (batch {t['batch']}, median of {t['repeats']} interleaved rounds)", "",
                "| | ms / batch | × bare model |", "|---|---|---|"]
        for name, r in t["rows"].items():
            out.append(f"| {name} | {1000 * r['median_s']:.1f} | {_f(r['ratio'], 2)} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(message)s")
    set_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    res_path = args.out / "results.json"
    results: dict[str, Any] = json.loads(res_path.read_text()) if res_path.exists() else {}
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    atomic_write_json(args.out / "config.json", {**cfg, "argv": sys.argv, "machine": machine_info()})
    t0 = time.perf_counter()
    ctx = Context(args)
    ctx.results = results

    def save(table: str, value: Any) -> None:
        """Store a (partial) table at once: results.json survives an interrupted run."""
        results[table] = value
        atomic_write_json(res_path, json.loads(json.dumps(results, default=float)))

    ctx.save = save
    results.update({"data": args.data, "clean_accuracy": ctx.clean_accuracy, "n_val": args.n_val,
                    "n_test": args.n_test, "n_fit": int(len(ctx.fit_idx))})
    results.setdefault("seconds", {})
    for table in args.tables:
        t = time.perf_counter()
        results[table] = {"auc": table_auc, "mrr": table_mrr, "adaptive": table_adaptive,
                          "overhead": table_overhead}[table](ctx)
        results["seconds"][table] = time.perf_counter() - t
        results["seconds"].update({f"fit-{k}": v for k, v in ctx.fit_seconds.items()})
        atomic_write_json(res_path, json.loads(json.dumps(results, default=float)))  # after every table
        log.info("table %s done in %.0fs", table, results["seconds"][table])
    results["seconds"]["last_run"] = time.perf_counter() - t0
    atomic_write_json(res_path, json.loads(json.dumps(results, default=float)))
    md = markdown(results, args.data)
    (args.out / "tables.md").write_text(md + "\n")
    print(md)
    print(f"total {results['seconds']['last_run']:.0f}s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
