"""Transfer across architectures on Fashion-MNIST: train three or four models, then `bastion transfer`.

The issue's "Transfer" paragraph: adversarial examples crafted on one model (or an ensemble)
and classified by models of other architectures and seeds. This script runs the whole study
through the command line, so that one command reproduces the table in docs/results.md:

1. `bastion train` three standard models of different architectures on the first
   ``--train-limit`` Fashion-MNIST training images (``--epochs`` epochs each, the default SGD +
   one-cycle recipe, each its own seed): ``cnn-small`` (seed 1), ``madry-cnn`` (seed 2) and
   ``mlp`` (seed 3); ``--with-resnet`` adds ``preact-resnet18`` at width 16 (seed 4), which
   costs about ten times the rest on a CPU;
2. for every model T, `bastion transfer` with the others as surrogates, ``--ensemble`` (so the
   ensemble is "all but T") and all models as targets, with FGSM, PGD-20 and MI-FGSM (20 steps)
   at L∞ ``--eps`` on ``--n`` test images (evenly spread over the split);
3. the matrix: single-surrogate rows (each surrogate's row is taken from the first run it
   appears in; runs are seeded, so the others repeat it: the script prints the largest
   difference between repeats) and one "ensemble of the others" row per target, written as
   ``transfer_study.json`` and ``transfer_study.md`` into ``--out``.

Every step is skipped when its output already exists, so an interrupted study continues where
it stopped. Each subprocess runs with one intra-op thread (``OMP_NUM_THREADS=1``) under
``nice``-friendly settings: the numbers are success rates, not timings.

Usage:
    PYTHONPATH=src python benchmarks/transfer_study.py --out runs/transfer-study
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

# name -> (architecture, --model-opt values, seed)
MODELS: dict[str, tuple[str, list[str], int]] = {
    "cnn-small": ("cnn-small", [], 1),
    "madry-cnn": ("madry-cnn", [], 2),
    "mlp": ("mlp", [], 3),
}
RESNET = ("preact-resnet18-w16", ("preact-resnet18", ["width=16"], 4))
ATTACKS = ("fgsm", "pgd", "mifgsm")


def _bastion(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "bastion", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def train(out: Path, train_limit: int, epochs: int, test_limit: int) -> None:
    """Step 1: one `bastion train` per model (skipped when its model file exists)."""
    for name, (arch, opts, seed) in MODELS.items():
        run = out / name
        if (run / "model.safetensors").exists():
            cli = json.loads((run / "config.json").read_text())["cli"]
            if (cli["train_limit"], cli["epochs"], cli["seed"]) != (train_limit, epochs, seed):
                raise SystemExit(f"{run} was trained with train_limit={cli['train_limit']}, epochs={cli['epochs']}, "
                                 f"seed={cli['seed']}: choose another --out")
            print(f"= {run} already trained", flush=True)
            continue
        _bastion("train", "--data", "fashion-mnist", "--train-limit", str(train_limit), "--model", arch,
                 *[a for o in opts for a in ("--model-opt", o)], "--epochs", str(epochs), "--seed", str(seed),
                 "--test-limit", str(test_limit),
                 "--out", str(run), "--no-progress")


def transfer_runs(out: Path, n: int, eps: float, steps: int) -> dict[str, dict[str, Any]]:
    """Step 2: per held-out target, the others as surrogates plus their ensemble."""
    reports = {}
    for held in MODELS:
        run = out / f"transfer-without-{held}"
        others = sorted(m for m in MODELS if m != held)
        if (run / "report.json").exists():
            done = sorted(json.loads((run / "report.json").read_text())["config"]["models"]["surrogates"])
            if done != others:  # e.g. a study without the ResNet, continued with --with-resnet
                raise SystemExit(f"{run} was crafted on {done}, this study needs {others}: choose another --out")
        else:
            sur = [a for m in MODELS if m != held for a in ("--surrogate", str(out / m))]
            tgt = [a for m in MODELS for a in ("--target", str(out / m))]
            _bastion("transfer", *sur, *tgt, "--ensemble", *[a for at in ATTACKS for a in ("--attack", at)],
                     "--steps", str(steps), "--threat", f"linf:{eps}", "--data", "fashion-mnist", "--n", str(n),
                     "--out", str(run))
        reports[held] = json.loads((run / "report.json").read_text())
    return reports


def assemble(reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Step 3: single-surrogate rows and the leave-one-out ensemble row per target."""
    names = list(MODELS)
    first = next(iter(reports.values()))
    single: dict[str, dict[str, dict[str, float | None]]] = {a: {} for a in ATTACKS}
    repeat_gap = 0.0  # the largest difference between repeats of one single-surrogate row
    ensemble: dict[str, dict[str, float | None]] = {a: {} for a in ATTACKS}
    for held, rep in reports.items():
        for row in rep["rows"]:
            attack = row["attack"]
            if row["surrogate"].startswith("ensemble("):
                ensemble[attack][held] = row["success"][held]  # the other targets are in the ensemble
            elif row["surrogate"] in single[attack]:
                prev = single[attack][row["surrogate"]]
                repeat_gap = max([repeat_gap, *(abs((prev[t] or 0) - (row["success"][t] or 0)) for t in names)])
            else:
                single[attack][row["surrogate"]] = row["success"]

    def mean(vals: list[float | None]) -> float | None:
        v = [x for x in vals if x is not None]
        return sum(v) / len(v) if v else None

    summary = {}
    for a in ATTACKS:
        off = [single[a][s][t] for s in names for t in names if s != t]
        summary[a] = {"single_transfer_mean": mean(off), "ensemble_transfer_mean": mean(list(ensemble[a].values())),
                      "white_box_mean": mean([single[a][s][s] for s in names])}
    return {"models": {k: {"arch": v[0], "opts": v[1], "seed": v[2]} for k, v in MODELS.items()},
            "clean_accuracy": first["clean_accuracy"], "n": first["n"], "threat": first["threat"],
            "single": single, "ensemble_without_target": ensemble, "summary": summary,
            "repeat_gap": repeat_gap}


def markdown(res: dict[str, Any]) -> str:
    names = list(MODELS)

    def pct(v: float | None) -> str:
        return "–" if v is None else f"{100 * v:.1f}"

    lines = ["| attack | surrogate | " + " | ".join(f"→ {t}" for t in names) + " | mean transfer |",
             "|---|---|" + "---:|" * (len(names) + 1),
             "| | *(clean accuracy)* | " + " | ".join(pct(res["clean_accuracy"][t]) for t in names) + " | |"]
    for a in ATTACKS:
        for s in names:
            row = res["single"][a][s]
            cells = [f"*{pct(row[t])}*" if s == t else pct(row[t]) for t in names]
            off = [row[t] for t in names if t != s and row[t] is not None]
            lines.append(f"| {a} | {s} | " + " | ".join(cells) + f" | {pct(sum(off) / len(off) if off else None)} |")
        ens = res["ensemble_without_target"][a]
        lines.append(f"| {a} | **ensemble of the others** | " + " | ".join(pct(ens.get(t)) for t in names)
                     + f" | {pct(res['summary'][a]['ensemble_transfer_mean'])} |")
    k = len(names)
    sm = res["summary"]
    lines += ["", "| mean over transfer pairs | " + " | ".join(ATTACKS) + " |", "|---|" + "---:|" * len(ATTACKS),
              f"| single surrogate ({k * (k - 1)} pairs) | "
              + " | ".join(pct(sm[a]["single_transfer_mean"]) for a in ATTACKS) + " |",
              f"| ensemble of the others ({k} targets) | "
              + " | ".join(pct(sm[a]["ensemble_transfer_mean"]) for a in ATTACKS) + " |",
              f"| white box ({k} models) | " + " | ".join(pct(sm[a]["white_box_mean"]) for a in ATTACKS) + " |",
              "| single transfer / white box | "
              + " | ".join(f"{sm[a]['single_transfer_mean'] / sm[a]['white_box_mean']:.2f}" for a in ATTACKS) + " |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/transfer-study", help="folder of the runs and the result")
    p.add_argument("--train-limit", type=int, default=60000, help="training images per model (default 60000: all)")
    p.add_argument("--epochs", type=int, default=1, help="epochs per model (default 1)")
    p.add_argument("--test-limit", type=int, default=2000,
                   help="test images of each training run's own evaluation (default 2000)")
    p.add_argument("--with-resnet", action="store_true", help="add a width-16 PreAct ResNet-18 (seed 4)")
    p.add_argument("--n", type=int, default=200, help="test images attacked (default 200)")
    p.add_argument("--eps", type=float, default=0.1, help="L∞ radius (default 0.1)")
    p.add_argument("--steps", type=int, default=20, help="steps of PGD and MI-FGSM (default 20)")
    args = p.parse_args(argv)
    if args.with_resnet:
        MODELS[RESNET[0]] = RESNET[1]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train(out, args.train_limit, args.epochs, args.test_limit)
    res = assemble(transfer_runs(out, args.n, args.eps, args.steps))
    res["config"] = vars(args)
    (out / "transfer_study.json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    (out / "transfer_study.md").write_text(md)
    print(md)
    print(json.dumps(res["summary"], indent=2))
    print(f"largest difference between repeats of a single-surrogate row: {res['repeat_gap']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
