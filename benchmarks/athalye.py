"""The Athalye table re-done with `bastion audit`: naive vs adaptive robust accuracy per defense.

Athalye, Carlini & Wagner (ICML 2018) broke seven of nine ICLR 2018 defenses by attacking them
adaptively (BPDA through non-differentiable parts, EOT over randomness, reparameterization).
This script audits each defense of that kind on Fashion-MNIST with `bastion audit` — which
builds the adaptive attack from the defense's declarations and runs the obfuscated-gradient
checks — and collects, per defense: clean accuracy, the naive suite's robust accuracy (what a
straight-through evaluation reports), the adaptive suite's, the worst case over everything, the
checks that fired, and the verdict. Adversarially trained models are the controls that should
hold.

Each audit is one ``bastion audit`` command (printed, and stored in its report's config), run
into ``--root/<row>/``; a row whose ``report.json`` exists is reused, so an interrupted run
resumes. Rows whose model does not exist yet (``--models`` entries produced by
``benchmarks/training.py``) are listed as not measured, with the command that makes them.

    python benchmarks/athalye.py --n 100 --root runs/athalye            # run what is missing, print the table
    python benchmarks/athalye.py --table-only --root runs/athalye       # only the table
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STANDARD = "runs/bench-fmnist-cnn"
TRAINING = "runs/training/fashion-mnist"
GENERATIVE = "runs/generative/fmnist"  # benchmarks/train_generative.py: PixelCNN, GAN generator
THERMOMETER = "runs/bench-fmnist-thermometer/levels16-run"


@dataclass(frozen=True)
class Row:
    """One audited defense: a model run folder plus transforms and/or a detector."""

    name: str
    model: str
    transforms: tuple[str, ...] = ()
    detector: str | None = None
    note: str = ""
    extra: tuple[str, ...] = field(default_factory=tuple)
    n: int | None = None  # a cap on --n for the slow defenses (the audit multiplies their cost)
    needs: tuple[str, ...] = ()  # files that must exist (e.g. a generative model's .json)


ROWS = (
    Row("none (standard model)", STANDARD, note="the undefended baseline"),
    Row("JPEG (quality 75)", STANDARD, ("jpeg:quality=75",)),
    Row("bit depth (3 bits)", STANDARD, ("bit-depth:bits=3",)),
    Row("TV minimization", STANDARD, ("tvm",)),
    Row("image quilting", STANDARD, ("quilting:num_patches=20000",), n=50,
        note="database of 20,000 training patches (as in benchmarks/transforms.py); randomized: EOT"),
    Row("BaRT", STANDARD, ("bart",), note="randomized: EOT"),
    Row("SAP", STANDARD, extra=("--layer", "sap:fraction=1"),
        note="stochastic activation pruning after every ReLU of the standard model; randomized: EOT"),
    Row("thermometer encoding", THERMOMETER, ("thermometer:levels=16",),
        note="16 levels; the classifier fine-tuned on encoded images (benchmarks/transforms.py)"),
    Row("PixelDefend", STANDARD, (f"pixeldefend:model={GENERATIVE}/pixelcnn,eps_defend=0.1",), n=20,
        needs=(f"{GENERATIVE}/pixelcnn.json",), note="PixelCNN of benchmarks/train_generative.py; 20 images"),
    Row("Defense-GAN", STANDARD, (f"defense-gan:model={GENERATIVE}/generator,restarts=4,steps=50",), n=20,
        needs=(f"{GENERATIVE}/generator.json",), extra=("--eot", "2"),
        note="GAN of benchmarks/train_generative.py, L=4, R=50; EOT over 2 draws (each draw is L·R generator "
             "steps); 20 images"),
    Row("defensive distillation", f"{TRAINING}/distillation-n5000-e2-b64",
        note="benchmarks/training.py --methods distillation (5,000 images, 2 epochs)"),
    Row("detector: kernel density", STANDARD, detector="kde"),
    Row("detector: feature squeezing", STANDARD, detector="feature-squeeze"),
    Row("PGD-AT (control)", "runs/bench-fmnist-cnn-pgdat", note="PGD-AT fine-tune of the standard model"),
    Row("TRADES (control)", f"{TRAINING}/trades-0.1-n5000-e2-b64",
        note="benchmarks/training.py --methods trades (5,000 images, 2 epochs)"),
)


def slug(name: str) -> str:
    return "-".join(w for w in "".join(c if c.isalnum() else " " for c in name.lower()).split())


def command(row: Row, args: argparse.Namespace, out: Path) -> list[str]:
    n = min(args.n, row.n) if row.n else args.n
    cmd = [sys.executable, "-m", "bastion", "audit", "--model", row.model, "--data", "fashion-mnist",
           "--threat", args.threat, "--n", str(n), "--budget", args.budget, "--seed", "0", "--out", str(out),
           "--no-progress"]
    for t in row.transforms:
        cmd += ["--transform", t]
    if row.detector:
        cmd += ["--detector", row.detector]
    return cmd + list(row.extra)


def prepare_thermometer() -> None:
    """The thermometer row's run folder: the standard model with its first layer widened for the
    16-level code (the `thermometer-input` layer, recorded in model.json) and the weights that
    benchmarks/transforms.py fine-tuned on encoded images (trained there, and cached, if absent)."""
    out = ROOT / THERMOMETER
    if (out / "model.json").exists():
        return
    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from transforms import thermometer_model  # noqa: E402  (the cached fine-tune)

    from bastion.checkpoint import load_model, save_model
    from bastion.defenses.layers import apply_layers

    base = load_model(ROOT / STANDARD)
    tuned = thermometer_model(base, 16, 1, 0)
    model = apply_layers(base, ["thermometer-input:levels=16"])
    model.load_state_dict(tuned.state_dict())
    out.mkdir(parents=True, exist_ok=True)
    save_model(out / "model", model)


def shown(cmd: list[str]) -> str:
    return " ".join(["bastion", *cmd[3:]])


def run_missing(args: argparse.Namespace) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(args.threads))
    for row in ROWS:
        out = args.root / slug(row.name)
        if (out / "report.json").exists() or (args.only and not any(k in slug(row.name) for k in args.only)):
            continue
        if row.model == THERMOMETER:
            prepare_thermometer()
        missing = [f for f in (f"{row.model}/model.json", *row.needs) if not (ROOT / f).exists()]
        if missing:
            print(f"skip {row.name}: {', '.join(missing)} not found "
                  f"({'benchmarks/train_generative.py makes it' if row.needs else row.note})", file=sys.stderr)
            continue
        cmd = command(row, args, out)
        print(f"$ {shown(cmd)}", file=sys.stderr)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            print(f"  failed ({p.returncode}): {p.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            continue
        print(f"  done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def table(args: argparse.Namespace) -> str:
    lines = ["| defense | clean | naive suite | adaptive suite | worst case | checks that fired | verdict |",
             "|---|---|---|---|---|---|---|"]
    cmds = []
    for row in ROWS:
        out = args.root / slug(row.name)
        path = out / "report.json"
        cmds.append(shown(command(row, args, out)))
        if not path.exists():
            lines.append(f"| {row.name} | not measured | | | | | {row.note} |")
            continue
        r = json.loads(path.read_text())
        fired = sorted({c["name"] for c in r["checks"] if c["status"] == "warning"})
        clean = pct(r["clean_accuracy"])
        if r.get("detector_fpr") is not None:
            clean += f" (FPR {pct(r['detector_fpr'])})"
        lines.append(f"| {row.name} | {clean} | {pct(r['naive_accuracy'])} | {pct(r['adaptive_accuracy'])} | "
                     f"{pct(r['robust_accuracy'])} | {', '.join(fired) or 'none'} | {r['verdict']} |")
    return "\n".join(lines) + "\n\nCommands (one per row):\n\n```bash\n" + "\n".join(cmds) + "\n```\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=Path("runs/athalye"), help="one audit folder per row below it")
    p.add_argument("--n", type=int, default=100, help="test images per audit, spread over the test split")
    p.add_argument("--threat", default="linf:0.1")
    p.add_argument("--budget", choices=("quick", "standard"), default="quick")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--table-only", action="store_true", help="collect the finished audits, run nothing")
    p.add_argument("--only", type=lambda v: [k for k in v.split(",") if k], default=[],
                   help="run only the rows whose folder name contains one of these comma-separated words")
    args = p.parse_args(argv)
    if not args.table_only:
        run_missing(args)
    print(table(args))


if __name__ == "__main__":
    main()
