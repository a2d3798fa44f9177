"""Robustness of a training run's latest checkpoint, mid-training, on a small probe of test images.

    python benchmarks/probe_checkpoint.py runs/training/fashion-mnist/fast-at-mixed-a0.2-0.1-nall-e15

Loads the newest ``checkpoints/ckpt-*`` of each run folder given (or its ``model`` when training
finished), and prints clean, FGSM and naive PGD-20 accuracy (``preset="quick"``) at L∞ ``--eps``
on ``--n`` test images taken every ``len(test) // n``-th from ``--offset`` — by default 200
images that are not among the training benchmark's 1,000 (every 10th from the 0th). A quick
look, not a robustness claim: FGSM far above PGD-20 is the mark of catastrophic overfitting,
which single-step training without Fast AT's probe can reach unnoticed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `_common`, when run as a script

from _common import quiet_setup  # noqa: E402

from bastion.checkpoint import load_checkpoint  # noqa: E402
from bastion.data import load_dataset  # noqa: E402
from bastion.evaluation import evaluate  # noqa: E402


def latest(run: Path) -> Path:
    """The newest checkpoint stem of a run folder (its final ``model`` when there is one)."""
    if (run / "model.json").is_file():
        return run / "model"
    stems = sorted((run / "checkpoints").glob("ckpt-*.json"))
    if not stems:
        raise SystemExit(f"run folder {run}: no model.json and no checkpoints/ckpt-*.json")
    return stems[-1].with_suffix("")


def probe(run: Path, data: str, n: int, offset: int, eps: float) -> dict[str, float | str]:
    stem = latest(run)
    model, meta = load_checkpoint(stem)
    model.eval()
    test = load_dataset(data, "test")
    stride = len(test) // n
    if not 0 <= offset < stride:
        raise SystemExit(f"--offset must be in [0, {stride}) for --n {n}, got {offset}")
    sub = test.subset(torch.arange(n) * stride + offset)
    threat = f"linf:{eps:g}"
    fgsm = evaluate(model, sub, threat, [("fgsm", {})], progress=False, seed=0)
    pgd = evaluate(model, sub, threat, "quick", progress=False, seed=0)
    return {"checkpoint": str(stem), "step": meta.get("state", {}).get("step", "final"),
            "clean": pgd.clean_accuracy, "fgsm": fgsm.robust_accuracy, "pgd20": pgd.robust_accuracy}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (benchmarks/training.py or bastion train)")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--n", type=int, default=200, help="probe images")
    p.add_argument("--offset", type=int, default=5, help="first probe image (every len(test)//n-th after it)")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    quiet_setup(args.threads)
    print("| run | checkpoint step | clean % | FGSM % | PGD-20 % |\n|---|---|---|---|---|")
    for run in args.runs:
        r = probe(run, args.data, args.n, args.offset, args.eps)
        print(f"| {run.name} | {r['step']} | {100 * r['clean']:.1f} | {100 * r['fgsm']:.1f} | {100 * r['pgd20']:.1f} |")


if __name__ == "__main__":
    main()
