"""Input transformations on Fashion-MNIST: naive vs adaptive robustness, and throughput vs ART.

    python benchmarks/transforms.py --only robust --json runs/bench/transforms-robust.json
    python benchmarks/transforms.py --only robust --json runs/bench/transforms-robust.json --resume \
        --harder bit-depth-1,pixeldefend                         # add a stronger attack on rows kept
    python benchmarks/transforms.py --only speed --budget 120 --json runs/bench/transforms-speed.json
    python benchmarks/transforms.py --quick                      # smoke run: a few images, every row

The JSON is rewritten after every row; ``--resume`` keeps the rows already there and runs only
the missing ones (and ``--harder`` on kept rows), so a cut-off run loses at most one row.

The setting (issue 5): `cnn-small` trained on Fashion-MNIST (``runs/bench-fmnist-cnn``, see
`_common.fmnist_model`), L∞ eps ``--eps`` = 0.1, ``--threads`` = 1 intra-op thread (Bastion and ART alike).

Section ``robust`` — one row per defense, each a `Defended` pipeline in front of that model:

* *clean*: accuracy of the deployed pipeline on the first n test images;
* *naive*: PGD-``--steps`` straight through the real pipeline — autograd through JPEG, bit
  depth, median, TVM, quilting, BaRT, PixelDefend, Defense-GAN and the thermometer code gives
  zero, randomized parts are sampled once per step — what many papers reported;
* *adaptive*: PGD through ``Defended.attack_view``, built from the declarations alone: BPDA
  (each transform's `bpda` stand-in on the backward pass) for non-differentiable parts, and
  for randomized pipelines EOT over ``--eot`` draws with ``--eot-steps`` steps and no early
  stop (every step on every example, so the point returned is adversarial for the expectation,
  not for one lucky draw).

Robust accuracy is always the accuracy of the *deployed* pipeline on the adversarial images
(randomized pipelines: the mean over ``--draws`` independent single draws, the number a user
of the defense sees), never the attacked surrogate's. PGD's step is 2.5·eps/steps with a
random start. Slow defenses run on fewer images (``--n-slow``, ``--n-purifier``); each row
says how many.

The generative purifiers need their models: ``benchmarks/train_generative.py --data
fashion-mnist --max-examples 10000 --out runs/generative/fmnist`` (``--gen-dir``). The
thermometer defense needs a classifier of encoded images: the standard model's first layer
widened by `adapt_model` and fine-tuned for ``--thermo-epochs`` on encoded training images
(cached in ``runs/bench-fmnist-thermometer``; no adversarial training).

``--harder`` rows are also attacked with PGD-``--hard-steps`` (twice the EOT draws when
randomized) and, on deterministic cheap pipelines, the gradient-free Square attack; the worst
case per example over all three is reported.

Section ``speed`` — throughput (images/s, one call on ``--n-speed`` images, no autograd) of
every transform, and side by side, interleaved in the same run, ART's equivalent
(`art.defences.preprocessor`): JpegCompression, FeatureSqueezing, SpatialSmoothing (scipy) and
SpatialSmoothingPyTorch (needs kornia: recorded as not run when it is missing), TotalVarMin,
ThermometerEncoding, GaussianAugmentation (``augmentation=False``: noise only), PixelDefend
(fed our PixelCNN's probabilities; see `_ARTPixelCNN` and `_WideInt` for the two adapters it
needs). Ratios are ART's time over Bastion's, paired by round (`_common.interleaved`); > 1
means Bastion is faster. ``max |Δ|`` compares the outputs of deterministic transforms.

Output: markdown tables on stdout and, with ``--json``, every number plus the machine.
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
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `_common`, when run as a script

from _common import DEFAULT_MODEL_DIR, fmnist_model, fmnist_test, interleaved, machine_info, quiet_setup  # noqa: E402

from bastion.attacks import create_attack  # noqa: E402
from bastion.data import load_dataset  # noqa: E402
from bastion.defenses.layers import add_sap  # noqa: E402
from bastion.defenses.pipeline import Defended  # noqa: E402
from bastion.defenses.transforms import create_transform  # noqa: E402
from bastion.defenses.transforms.quilting import Quilting  # noqa: E402
from bastion.defenses.transforms.thermometer import adapt_model  # noqa: E402

log = logging.getLogger("bastion.bench")

SECTIONS = ("robust", "speed")
THERMO_DIR = Path("runs/bench-fmnist-thermometer")


# --------------------------------------------------------------------------- options
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    p.add_argument("--defenses", default=None, help="comma-separated subset of the rows (default: all)")
    p.add_argument("--n", type=int, default=200, help="test images for the cheap defenses")
    p.add_argument("--n-slow", type=int, default=100, help="test images for tvm and quilting")
    p.add_argument("--n-purifier", type=int, default=50, help="test images for pixeldefend and defense-gan")
    p.add_argument("--eps", type=float, default=0.1, help="L-inf radius (pixel units)")
    p.add_argument("--steps", type=int, default=20, help="PGD steps of the naive attack and of the adaptive one "
                                                         "on deterministic pipelines")
    p.add_argument("--eot-steps", type=int, default=20, help="PGD steps of the adaptive attack with EOT")
    p.add_argument("--eot", type=int, default=5, help="EOT draws per step (cheap randomized defenses)")
    p.add_argument("--eot-slow", type=int, default=5, help="EOT draws per step for tvm and quilting")
    p.add_argument("--dgan-eot", type=int, default=2, help="EOT draws per step for defense-gan (each draw is a "
                                                           "whole L×R latent search)")
    p.add_argument("--dgan-eot-steps", type=int, default=20, help="PGD steps of the adaptive attack on defense-gan")
    p.add_argument("--draws", type=int, default=5, help="single draws averaged to score a randomized pipeline")
    p.add_argument("--batch", type=int, default=100, help="images per attack batch (without EOT)")
    p.add_argument("--eot-rows", type=int, default=400, help="rows per forward with EOT (images per batch = "
                                                             "rows / draws)")
    p.add_argument("--harder", default="", help="comma-separated rows to attack harder as well (PGD-"
                                                  "--hard-steps, EOT ×2 when randomized; Square on deterministic "
                                                  "pipelines); reported as the worst case per example")
    p.add_argument("--hard-steps", type=int, default=100, help="PGD steps of the harder attack")
    p.add_argument("--square-queries", type=int, default=1000, help="Square's query budget in the harder attack")
    p.add_argument("--quilting-patches", type=int, default=20000, help="quilting database size (patches)")
    p.add_argument("--bart-k", type=int, default=2, help="BaRT: transformation groups per image")
    p.add_argument("--dgan-restarts", type=int, default=4, help="Defense-GAN restarts L (paper: 10)")
    p.add_argument("--dgan-steps", type=int, default=50, help="Defense-GAN steps R (paper: 200)")
    p.add_argument("--pixeldefend-eps", type=float, default=0.1, help="PixelDefend eps_defend (the paper's advice: "
                                                                      "the attack's eps when known)")
    p.add_argument("--gen-dir", type=Path, default=Path("runs/generative/fmnist"),
                   help="folder of benchmarks/train_generative.py (pixelcnn, generator, autoencoder)")
    p.add_argument("--thermo-epochs", type=int, default=1, help="fine-tuning epochs of the thermometer classifier")
    p.add_argument("--n-speed", type=int, default=1000, help="images per throughput call")
    p.add_argument("--n-speed-slow", type=int, default=100,
                   help="images per throughput call for TVM (ART's takes ~0.4 s an image), PixelDefend, "
                        "Defense-GAN and BaRT")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up (speed)")
    p.add_argument("--budget", type=float, default=300.0, help="seconds after which a competitor gets no more rounds")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (the same for Bastion and ART)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: 16 images, 3 steps, 2 draws, 1 repeat")
    p.add_argument("--json", type=Path, default=None, help="write every number to this JSON file (rewritten after "
                                                           "every row, so a cut-off run keeps its rows)")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --json (same section) and run "
                                                         "only the missing ones")
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.only) - set(SECTIONS))
    if unknown:
        p.error(f"--only: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    if args.quick:
        args.n = args.n_slow = args.n_purifier = 16
        args.steps = args.eot_steps = 3
        args.eot = args.eot_slow = args.dgan_eot = args.draws = 2
        args.dgan_eot_steps = 3
        args.n_speed, args.n_speed_slow, args.repeats = 64, 8, 1
        args.dgan_restarts, args.dgan_steps, args.quilting_patches = 2, 5, 2000
    return args


# --------------------------------------------------------------------------- the defenses
@dataclass
class Case:
    """One row: how to build the defended pipeline, and the size of its run."""

    name: str
    setting: str
    build: Callable[[], Defended]
    size: str = "n"  # which image count: "n", "n_slow" or "n_purifier"
    note: str = ""
    eot: int | None = None  # EOT draws per step when randomized (None: --eot, or --eot-slow for a slow row)
    eot_steps: int | None = None  # PGD steps with EOT (None: --eot-steps)


@dataclass
class Ctx:
    model: nn.Module
    args: argparse.Namespace
    _cache: dict[str, Any] = field(default_factory=dict)

    def gen(self, name: str) -> str:
        stem = self.args.gen_dir / name
        if not stem.with_suffix(".json").exists():
            raise FileNotFoundError(f"{stem}.json not found: run benchmarks/train_generative.py --data fashion-mnist "
                                    f"--max-examples 10000 --out {self.args.gen_dir}")
        return str(stem)

    def train_images(self) -> Tensor:
        if "train" not in self._cache:
            self._cache["train"] = load_dataset("fashion-mnist", "train").images
        return self._cache["train"]


def thermometer_model(base: nn.Module, levels: int, epochs: int, seed: int = 0) -> nn.Module:
    """`base` with its first layer widened for the thermometer code, fine-tuned on encoded images, cached.

    A warm start (`adapt_model`) then `epochs` of Adam on the thermometer-encoded Fashion-MNIST
    training set (no adversarial training: Buckman et al.'s strongest models also used it).
    """
    from safetensors.torch import load_file, save_file

    from bastion.defenses.transforms.thermometer import Thermometer

    model = adapt_model(base, levels, channels=1)
    path = THERMO_DIR / f"levels{levels}-epochs{epochs}-seed{seed}.safetensors"
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        return model.eval().requires_grad_(False)
    log.info("fine-tuning the thermometer classifier (%d levels, %d epoch(s)) into %s", levels, epochs, path)
    train = load_dataset("fashion-mnist", "train")
    enc = Thermometer(levels)
    model.train().requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(train), generator=g)
        for i in range(0, len(train), 128):
            idx = perm[i:i + 128]
            with torch.no_grad():
                xb = enc(train.images[idx])
            loss = nn.functional.cross_entropy(model(xb), train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval().requires_grad_(False)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model


def cases(ctx: Ctx) -> list[Case]:
    m, a = ctx.model, ctx.args
    t = create_transform

    def quilting() -> Defended:
        q = Quilting(patch_size=5, overlap=2, k=10).fit(ctx.train_images(), num_patches=a.quilting_patches, seed=0)
        return Defended([q], m)

    def thermometer() -> Defended:
        return Defended([t("thermometer:levels=16")], thermometer_model(m, 16, a.thermo_epochs, a.seed))

    return [
        Case("none", "the undefended model", lambda: Defended([], m)),
        Case("jpeg", "quality 75", lambda: Defended([t("jpeg:quality=75")], m)),
        Case("shield", "qualities 20/40/60/80, 8×8 blocks", lambda: Defended([t("shield")], m),
             note="no vaccinated ensemble"),
        Case("bit-depth", "4 bits", lambda: Defended([t("bit-depth:bits=4")], m)),
        Case("bit-depth-1", "1 bit (binarization)", lambda: Defended([t("bit-depth:bits=1")], m)),
        Case("median", "3×3", lambda: Defended([t("median:size=3")], m)),
        Case("gaussian-blur", "sigma 1", lambda: Defended([t("gaussian-blur:sigma=1.0")], m)),
        Case("tvm", "keep 0.5, weight 0.03, 200 iterations", lambda: Defended([t("tvm")], m), "n_slow"),
        Case("quilting", f"5×5 patches, overlap 2, k 10, {a.quilting_patches} training patches", quilting, "n_slow"),
        Case("bart", f"k={a.bart_k} of the 8 grayscale groups", lambda: Defended([t(f"bart:k={a.bart_k}")], m),
             note="model not fine-tuned on BaRT"),
        Case("sap", "SAP-100 after every ReLU", lambda: Defended([], add_sap(m, fraction=1.0))),
        Case("thermometer", "16 levels, fine-tuned classifier", thermometer),
        Case("magnet", "reformer (denoising autoencoder)", lambda: Defended([t(f"magnet:model={ctx.gen('autoencoder')}")], m)),
        Case("gaussian-noise", "sigma 0.1", lambda: Defended([t("gaussian-noise:sigma=0.1")], m)),
        Case("random-resize-pad", "ratio 331/299", lambda: Defended([t("random-resize-pad")], m)),
        Case("pixeldefend", f"eps_defend {a.pixeldefend_eps:g}, PixelCNN",
             lambda: Defended([t(f"pixeldefend:model={ctx.gen('pixelcnn')},eps_defend={a.pixeldefend_eps}")], m),
             "n_purifier"),
        Case("defense-gan", f"L={a.dgan_restarts}, R={a.dgan_steps}",
             lambda: Defended([t(f"defense-gan:model={ctx.gen('generator')},restarts={a.dgan_restarts},"
                                 f"steps={a.dgan_steps}")], m), "n_purifier", eot=a.dgan_eot,
             eot_steps=a.dgan_eot_steps),
    ]


# --------------------------------------------------------------------------- section: robust
def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


@torch.no_grad()
def correct(d: nn.Module, x: Tensor, y: Tensor, draws: int, batch: int) -> Tensor:
    """Per example, the share of `draws` independent forwards of `d` that classify it right (1 draw if deterministic)."""
    k = draws if getattr(d, "randomized", False) else 1
    hits = torch.zeros(len(y))
    for _ in range(k):
        for s in _batches(len(y), batch):
            hits[s] += (d(x[s]).argmax(1) == y[s]).float()
    return hits / k


def accuracy(d: nn.Module, x: Tensor, y: Tensor, draws: int, batch: int) -> float:
    """Mean accuracy of `d` over `draws` independent forwards (1 when `d` is deterministic)."""
    return float(correct(d, x, y, draws, batch).mean())


def attack(target: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, early_stop: bool, batch: int,
           seed: int) -> Tensor:
    pgd = create_attack("pgd", steps=steps, step_size=2.5 * eps / steps, early_stop=early_stop)
    out = [pgd(target, x[s], y[s], f"linf:{eps}", seed=seed).x_adv for s in _batches(len(y), batch)]
    return torch.cat(out)


def run_case(case: Case, ctx: Ctx, x_all: Tensor, y_all: Tensor) -> dict[str, Any]:
    a = ctx.args
    n = {"n": a.n, "n_slow": a.n_slow, "n_purifier": a.n_purifier}[case.size]
    x, y = x_all[:n], y_all[:n]
    t0 = time.perf_counter()
    torch.manual_seed(a.seed)
    d = case.build().eval()
    build_s = time.perf_counter() - t0
    randomized = d.randomized
    slow = case.size != "n"
    eot = (case.eot or (a.eot_slow if slow else a.eot)) if randomized else None
    batch = max(1, a.eot_rows // eot) if eot else a.batch
    row: dict[str, Any] = {"name": case.name, "setting": case.setting, "note": case.note, "n": n,
                           "randomized": randomized, "differentiable": d.differentiable,
                           "declarations": d.declarations()[:-1], "eot": eot, "build_s": build_s}
    torch.manual_seed(a.seed + 1)
    t0 = time.perf_counter()
    row["clean"] = accuracy(d, x, y, a.draws, a.batch)
    row["clean_s"] = time.perf_counter() - t0
    # naive: PGD straight through the real pipeline (zero gradients through the non-differentiable parts)
    torch.manual_seed(a.seed + 2)
    t0 = time.perf_counter()
    x_naive = attack(d, x, y, a.eps, a.steps, True, a.batch, a.seed)
    row["naive_s"] = time.perf_counter() - t0
    row["naive"] = accuracy(d, x_naive, y, a.draws, a.batch)
    # adaptive: the view the declarations call for (BPDA; EOT when randomized), scored on the real pipeline
    target = d.attack_view(eot=eot or 1)
    steps = (case.eot_steps or a.eot_steps) if randomized else a.steps
    torch.manual_seed(a.seed + 3)
    t0 = time.perf_counter()
    x_adapt = attack(target, x, y, a.eps, steps, not randomized, batch, a.seed)
    row["adaptive_s"] = time.perf_counter() - t0
    row["adaptive_steps"] = steps
    ok_adapt = correct(d, x_adapt, y, a.draws, a.batch)
    row["adaptive"] = float(ok_adapt.mean())
    assert float((x_adapt - x).abs().max()) <= a.eps + 1e-6 and float((x_naive - x).abs().max()) <= a.eps + 1e-6
    row["adaptive_correct"] = [round(float(v), 4) for v in ok_adapt]  # per example: lets --resume add --harder later
    if case.name in _harder_rows(a):
        row["harder"] = harder(d, x, y, ok_adapt, a, eot, square=case.size == "n")
    return row


def _harder_rows(a: argparse.Namespace) -> set[str]:
    return {h.strip() for h in a.harder.split(",") if h.strip()}


def add_harder(case: Case, ctx: Ctx, row: dict[str, Any], x_all: Tensor, y_all: Tensor) -> dict[str, Any]:
    """The harder attack for a row kept from an earlier run (``--resume --harder NAME``)."""
    a = ctx.args
    n = row["n"]
    torch.manual_seed(a.seed)
    d = case.build().eval()
    ok_adapt = torch.tensor(row["adaptive_correct"])
    return {**row, "harder": harder(d, x_all[:n], y_all[:n], ok_adapt, a, row["eot"], square=case.size == "n")}


def harder(d: Defended, x: Tensor, y: Tensor, ok_adapt: Tensor, a: argparse.Namespace, eot: int | None,
           square: bool = True) -> dict[str, Any]:
    """A stronger attack on a row whose adaptive robustness stays high; the worst case per example.

    PGD-``--hard-steps`` on the same BPDA (+EOT, twice the draws) view, no early stop on
    randomized pipelines; and on deterministic ones Square (Andriushchenko et al. 2020,
    ``--square-queries``, margin loss) on the deployed pipeline — gradient-free, so a weak BPDA
    stand-in cannot fool it (skipped with ``square=False``: the slow purifiers, where each query
    is a purification). Each example counts as robust only if it survives every attack
    (randomized: the lowest mean over ``--draws`` draws).
    """
    out: dict[str, Any] = {}
    worst = ok_adapt.clone()
    eot2 = 2 * eot if eot else None
    target = d.attack_view(eot=eot2 or 1)
    batch = max(1, a.eot_rows // eot2) if eot2 else a.batch
    torch.manual_seed(a.seed + 4)
    t0 = time.perf_counter()
    x_pgd = attack(target, x, y, a.eps, a.hard_steps, not d.randomized, batch, a.seed + 1)
    ok = correct(d, x_pgd, y, a.draws, a.batch)
    out["pgd"] = {"steps": a.hard_steps, "eot": eot2, "accuracy": float(ok.mean()), "seconds": time.perf_counter() - t0}
    worst = torch.minimum(worst, ok)
    if square and not d.randomized:
        t0 = time.perf_counter()
        sq = create_attack("square", n_queries=a.square_queries)
        x_sq = torch.cat([sq(d, x[s], y[s], f"linf:{a.eps}", seed=a.seed).x_adv for s in _batches(len(y), a.batch)])
        assert float((x_sq - x).abs().max()) <= a.eps + 1e-6
        ok = correct(d, x_sq, y, a.draws, a.batch)
        out["square"] = {"queries": a.square_queries, "accuracy": float(ok.mean()),
                         "seconds": time.perf_counter() - t0}
        worst = torch.minimum(worst, ok)
    out["worst"] = float(worst.mean())
    log.info("  harder: %s", {k: (v["accuracy"] if isinstance(v, dict) else v) for k, v in out.items()})
    return out


def _wanted(a: argparse.Namespace) -> set[str] | None:
    return None if a.defenses is None else {s.strip() for s in a.defenses.split(",") if s.strip()}


def section_robust(ctx: Ctx, done: dict[str, dict[str, Any]], save: Callable[[list[dict[str, Any]]], None]
                   ) -> dict[str, Any]:
    """One row per defense; rows in `done` (from ``--resume``) are kept, `save` is called after every row."""
    a = ctx.args
    n_max = max(a.n, a.n_slow, a.n_purifier)
    data = fmnist_test(n_max)
    x, y = data.images, data.labels
    wanted = _wanted(a)
    rows: list[dict[str, Any]] = []
    for case in cases(ctx):
        if wanted is not None and case.name not in wanted:
            if case.name in done:
                rows.append(done[case.name])
            continue
        if case.name in done and "skipped" not in done[case.name]:
            log.info("robust: %s kept from the earlier run", case.name)
            row = done[case.name]
            if case.name in _harder_rows(a) and "harder" not in row and "adaptive_correct" in row:
                log.info("robust: %s attacked harder", case.name)
                row = add_harder(case, ctx, row, x, y)
            rows.append(row)
            save(rows)
            continue
        log.info("robust: %s (%s)", case.name, case.setting)
        try:
            row = run_case(case, ctx, x, y)
        except FileNotFoundError as e:
            log.warning("robust: %s skipped: %s", case.name, e)
            rows.append({"name": case.name, "setting": case.setting, "skipped": str(e)})
            continue
        log.info("  n %d: clean %.3f, naive %.3f, adaptive %.3f (%.0f s)", row["n"], row["clean"], row["naive"],
                 row["adaptive"], row["clean_s"] + row["naive_s"] + row["adaptive_s"])
        rows.append(row)
        save(rows)
    return {"rows": rows}


# --------------------------------------------------------------------------- section: speed
def _art() -> Any:
    import art.defences.preprocessor as pre

    return pre


class _ARTPixelCNN(nn.Module):
    """Our PixelCNN as ART's PixelDefend wants it: 0–255 or [0, 1] pixels in, N×(C·H·W·256) probabilities out.

    Probabilities, not logits: ART's search starts from ``best_prob = -1`` and would keep no
    value at all where every logit is below -1.
    """

    def __init__(self, pcnn: nn.Module) -> None:
        super().__init__()
        self.pcnn = pcnn

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        x = x / 255.0 if float(x.max()) > 1.0 else x
        logits = self.pcnn(x)  # N×levels×C×H×W
        probs = logits.softmax(1)
        return probs.permute(0, 2, 3, 4, 1).reshape(x.shape[0], -1)  # features in NCHW order, 256 values each


class _WideInt(int):
    """An int whose sums and differences with numpy's uint8 scalars are Python ints.

    ART 1.20.1's PixelDefend computes ``x_i[feat] - eps`` with ``x_i`` uint8; under numpy >= 2
    (NEP 50) that stays uint8 and overflows for dark pixels (OverflowError). Passing eps as this
    int subclass (numpy defers to its reflected operators) gives the arithmetic ART intended,
    without touching ART's code.
    """

    __array_priority__ = 1000

    def __rsub__(self, other: Any) -> int:
        return int(other) - int(self)

    def __radd__(self, other: Any) -> int:
        return int(other) + int(self)


def speed_pairs(ctx: Ctx) -> list[tuple[str, str, Callable[[], nn.Module], Callable[[], Any] | None, str]]:
    """(row, Bastion setting, Bastion builder, ART builder or None, size) for the speed table."""
    a = ctx.args
    t = create_transform

    def art_pixeldefend() -> Any:
        from art.estimators.classification import PyTorchClassifier

        from bastion.defenses.generative import load_generative

        pcnn = load_generative(ctx.gen("pixelcnn"))
        net = nn.Sequential(_ARTPixelCNN(pcnn)).eval()
        clf = PyTorchClassifier(net, loss=nn.CrossEntropyLoss(), input_shape=(1, 28, 28), nb_classes=784 * 256,
                                clip_values=(0.0, 1.0))
        return _art().PixelDefend(clip_values=(0.0, 1.0), eps=_WideInt(round(255 * a.pixeldefend_eps)),
                                  pixel_cnn=clf, batch_size=128)

    def quilting() -> nn.Module:
        return Quilting(patch_size=5, overlap=2, k=10).fit(ctx.train_images(), num_patches=a.quilting_patches, seed=0)

    pre = _art
    return [
        ("jpeg", "quality 75", lambda: t("jpeg:quality=75"),
         lambda: pre().JpegCompression(clip_values=(0.0, 1.0), quality=75, channels_first=True), "n"),
        ("bit-depth", "4 bits", lambda: t("bit-depth:bits=4"),
         lambda: pre().FeatureSqueezing(clip_values=(0.0, 1.0), bit_depth=4), "n"),
        ("median", "3×3", lambda: t("median:size=3"),
         lambda: pre().SpatialSmoothing(window_size=3, channels_first=True), "n"),
        ("median (vs ART PyTorch)", "3×3", lambda: t("median:size=3"),
         lambda: pre().SpatialSmoothingPyTorch(window_size=3, channels_first=True), "n"),
        ("tvm", "keep 0.5, weight 0.03, 200 it.", lambda: t("tvm"),
         lambda: pre().TotalVarMin(prob=0.5, clip_values=(0.0, 1.0)), "n_slow"),
        ("thermometer", "16 levels", lambda: t("thermometer:levels=16"),
         lambda: pre().ThermometerEncoding(clip_values=(0.0, 1.0), num_space=16, channels_first=True), "n"),
        ("pixeldefend", f"eps_defend {a.pixeldefend_eps:g}",
         lambda: t(f"pixeldefend:model={ctx.gen('pixelcnn')},eps_defend={a.pixeldefend_eps}"), art_pixeldefend,
         "n_slow"),
        ("shield", "20/40/60/80", lambda: t("shield"), None, "n"),
        ("gaussian-blur", "sigma 1", lambda: t("gaussian-blur:sigma=1.0"), None, "n"),
        ("quilting", f"{a.quilting_patches} patches", quilting, None, "n"),
        ("bart", f"k={a.bart_k}", lambda: t(f"bart:k={a.bart_k}"), None, "n_slow"),
        ("gaussian-noise", "sigma 0.1", lambda: t("gaussian-noise:sigma=0.1"),
         lambda: pre().GaussianAugmentation(sigma=0.1, augmentation=False, clip_values=(0.0, 1.0), apply_predict=True),
         "n"),
        ("random-resize-pad", "ratio 331/299", lambda: t("random-resize-pad"), None, "n"),
        ("jpeg-approx", "quality 75 (differentiable)", lambda: t("jpeg-approx:quality=75"), None, "n"),
        ("defense-gan", f"L={a.dgan_restarts}, R={a.dgan_steps}",
         lambda: t(f"defense-gan:model={ctx.gen('generator')},restarts={a.dgan_restarts},steps={a.dgan_steps}"),
         None, "n_slow"),
        ("magnet", "reformer", lambda: t(f"magnet:model={ctx.gen('autoencoder')}"), None, "n"),
    ]


def section_speed(ctx: Ctx, done: dict[str, dict[str, Any]], save: Callable[[list[dict[str, Any]]], None]
                  ) -> dict[str, Any]:
    """One row per transform; rows in `done` (from ``--resume``) are kept, `save` is called after every row."""
    a = ctx.args
    data = fmnist_test(a.n_speed)
    wanted = _wanted(a)
    rows: list[dict[str, Any]] = []
    for name, setting, ours, theirs, size in speed_pairs(ctx):
        if wanted is not None and name.split(" ")[0] not in wanted:
            if name in done:
                rows.append(done[name])
            continue
        if name in done and "skipped" not in done[name]:
            log.info("speed: %s kept from the earlier run", name)
            rows.append(done[name])
            continue
        n = a.n_speed if size == "n" else a.n_speed_slow
        x = data.images[:n].contiguous()
        x_np = x.numpy().copy()
        try:
            tr = ours().eval()
        except FileNotFoundError as e:
            rows.append({"name": name, "setting": setting, "skipped": str(e)})
            save(rows)
            continue
        art_pre, art_missing = None, None
        if theirs is not None:
            try:
                art_pre = theirs()
            except ImportError as e:  # e.g. ART's SpatialSmoothingPyTorch needs kornia, not installed here
                art_missing = f"ART's equivalent could not be built: {type(e).__name__}: {e}"
                log.warning("speed: %s: %s", name, art_missing)
        fns: dict[str, Callable[[], Any]] = {}
        seed = [a.seed]

        def run_ours(tr: nn.Module = tr, x: Tensor = x) -> Tensor:
            with torch.no_grad():
                return tr(x)

        fns["bastion"] = run_ours
        if art_pre is not None:
            def run_art(p: Any = art_pre, x_np: np.ndarray = x_np) -> Any:
                np.random.seed(seed[0])
                return p(x_np.copy())[0]
            fns["art"] = run_art
        log.info("speed: %s on %d images", name, n)
        res = interleaved(fns, a.repeats, budget_s=a.budget)
        ours_t, art_t = res["bastion"], res.get("art")
        row: dict[str, Any] = {"name": name, "setting": setting, "n": n, "bastion": ours_t.to_dict(),
                               "bastion_img_s": n / ours_t.median if ours_t.median else None,
                               "randomized": bool(getattr(tr, "randomized", False))}
        if art_missing is not None:
            row["art_missing"] = art_missing
        if art_t is not None:
            row["art"] = art_t.to_dict()
            row["art_img_s"] = n / art_t.median if art_t.median else None
            ratio = art_t.ratio_to(ours_t)  # ART time / Bastion time: > 1 means Bastion is faster
            row["speedup"] = ratio
            if (not row["randomized"] and art_t.result is not None and ours_t.result is not None
                    and art_t.result.shape == tuple(ours_t.result.shape)):  # outputs of random draws differ anyway
                diff = np.abs(np.asarray(art_t.result, dtype=np.float32) - ours_t.result.numpy())
                row["max_abs_diff"] = float(diff.max())
                row["mean_abs_diff"] = float(diff.mean())
        log.info("  bastion %.0f img/s%s", row["bastion_img_s"] or float("nan"),
                 f", ART {row['art_img_s']:.0f} img/s, ×{row['speedup']:.2f}" if art_t is not None and row.get("speedup")
                 else "")
        rows.append(row)
        save(rows)
    return {"rows": rows}


# --------------------------------------------------------------------------- formatting
def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _num(v: float | None, fmt: str = ".0f") -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def markdown(res: dict[str, Any], args: argparse.Namespace) -> str:
    m = res["machine"]
    out = [f"Machine: {m['nproc']} cores ({m['cpu']}), torch {m['torch']}, {m['threads']} threads, load average "
           f"at start {m['loadavg_start']}, at end {m.get('loadavg')}; ART {m['peers'].get('adversarial-robustness-toolbox')}."]
    s = res["sections"]
    if "robust" in s:
        rows = []
        for r in s["robust"]["rows"]:
            if "skipped" in r:
                rows.append([r["name"], r["setting"], "–", "–", "skipped", "–", "–", "–"])
                continue
            how = ("PGD-%d" % r["adaptive_steps"]) + (f", EOT-{r['eot']}" if r["eot"] else "")
            decl = r["declarations"]
            if any(not d["differentiable"] for d in decl):
                how = "BPDA, " + how
            rows.append([r["name"], r["setting"] + (f" ({r['note']})" if r["note"] else ""), str(r["n"]),
                         _pct(r["clean"]), _pct(r["naive"]), _pct(r["adaptive"]), how,
                         f"{r['clean_s'] + r['naive_s'] + r['adaptive_s']:.0f}"])
        out.append(f"### Robust accuracy, L∞ eps {args.eps} (naive PGD-{args.steps} vs the adaptive attack)\n\n"
                   + _table(["defense", "setting", "n", "clean", f"naive PGD-{args.steps}", "adaptive", "adaptive attack",
                             "time s"], rows))
        hard = []
        for r in s["robust"]["rows"]:
            h = r.get("harder")
            if not h:
                continue
            pgd = h["pgd"]
            sq = h.get("square")
            hard.append([r["name"], str(r["n"]), _pct(r["adaptive"]),
                         f"{_pct(pgd['accuracy'])} (PGD-{pgd['steps']}" + (f", EOT-{pgd['eot']})" if pgd["eot"] else ")"),
                         "–" if sq is None else f"{_pct(sq['accuracy'])} ({sq['queries']} queries)", _pct(h["worst"]),
                         f"{pgd['seconds'] + (sq['seconds'] if sq else 0):.0f}"])
        if hard:
            out.append("### Attacked harder (rows whose adaptive robustness stayed high)\n\n"
                       + _table(["defense", "n", "adaptive (above)", "stronger PGD", "Square", "worst case per example",
                                 "time s"], hard))
    if "speed" in s:
        rows = []
        for r in s["speed"]["rows"]:
            if "skipped" in r:
                rows.append([r["name"], "", "–", "skipped", "–", "–", "–"])
                continue
            ratio = _num(r.get("speedup"), ".2f") + ("×" if r.get("speedup") else "")
            if "art_missing" in r:
                ratio = "ART's not run: " + r["art_missing"].rsplit(": ", 1)[-1]
            rows.append([r["name"], r["setting"], str(r["n"]), _num(r["bastion_img_s"]), _num(r.get("art_img_s")),
                         ratio,
                         _num(r.get("max_abs_diff"), ".3g")])
        out.append(f"### Throughput (images/s, one call, median of {args.repeats} interleaved rounds)\n\n"
                   + _table(["transform", "setting", "images", "Bastion img/s", "ART img/s", "ART time / Bastion time",
                             "max \\|Δ\\| vs ART"], rows))
    return "\n\n".join(out)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    load_start = quiet_setup(args.threads)  # the peers' deprecation chatter is not part of the output
    model = fmnist_model().eval().requires_grad_(False)
    ctx = Ctx(model, args)
    res: dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                           "model": str(DEFAULT_MODEL_DIR), "sections": {}}
    earlier: dict[str, Any] = {}
    if args.resume and args.json is not None and args.json.exists():
        earlier = json.loads(args.json.read_text()).get("sections", {})
        res["sections"] = dict(earlier)  # sections not run now are kept as they were

    def write() -> None:
        if args.json is None:
            return
        res["machine"] = {**machine_info(), "loadavg_start": load_start}
        res["markdown"] = markdown(res, args)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1, default=str))
        tmp.replace(args.json)

    t_all = time.perf_counter()
    for name in args.only:
        t0 = time.perf_counter()
        done = {r["name"]: r for r in earlier.get(name, {}).get("rows", [])}

        def save(rows: list[dict[str, Any]], name: str = name) -> None:
            res["sections"][name] = {"rows": rows, "partial": True}
            write()

        out = (section_robust if name == "robust" else section_speed)(ctx, done, save)
        out["section_s"] = time.perf_counter() - t0
        res["sections"][name] = out
        write()
        log.info("section %s done in %.0f s", name, out["section_s"])
    res["machine"] = {**machine_info(), "loadavg_start": load_start}
    res["total_s"] = time.perf_counter() - t_all
    res["markdown"] = markdown(res, args)
    print(res["markdown"])
    write()
    if args.json is not None:
        log.info("wrote %s", args.json)
    return res


if __name__ == "__main__":
    main()
