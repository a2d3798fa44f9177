"""Shared helpers of the benchmarks: threads, interleaved timing, the cached Fashion-MNIST model.

* `set_threads` — pin torch's intra-op threads (the issue's setting is 2), so that runs on
  different machines or under different loads use the same parallelism.
* `interleaved` — time several competitors *in one run*, alternating them (round-robin,
  the order rotated every round) after one warm-up each, so that a change of machine load
  (the benchmark machine is often shared) hits every competitor alike. Report medians and
  ratios; absolute seconds on a loaded machine mean little, ratios measured this way do.
* `fmnist_model` — a `cnn-small` trained on Fashion-MNIST with the library's `Trainer`, cached
  in a run folder (``runs/bench-fmnist-cnn``, ignored by git) and reused by later runs.
* `machine_info` — what the numbers were measured on (cores, torch, load, peer versions).

Nothing here is a test: a timing is never a pass/fail unit (DESIGN.md, "Honest numbers").
"""

from __future__ import annotations

import logging
import sys
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bastion.checkpoint import load_model
from bastion.data import Dataset, load_dataset
from bastion.models import create_model

__all__ = ["DEFAULT_AT_DIR", "DEFAULT_MODEL_DIR", "Timing", "count_forwards", "fmnist_at_model", "fmnist_model",
           "fmnist_test", "interleaved", "machine_info", "set_threads"]

log = logging.getLogger("bastion.bench")

# runs/ is in .gitignore: the cached model never ends up in a commit
DEFAULT_MODEL_DIR = Path("runs/bench-fmnist-cnn")
DEFAULT_AT_DIR = Path("runs/bench-fmnist-cnn-pgdat")


# --------------------------------------------------------------------------- threads
def quiet_setup(threads: int) -> list[float]:
    """A benchmark's start: progress logged to stderr, the peers' warning chatter off, `threads`
    intra-op threads; returns the load average at the start."""
    import warnings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    set_threads(threads)
    return machine_info()["loadavg"]


def set_threads(n: int | None) -> int:
    """Use `n` intra-op threads (None: leave torch's choice); returns the number in use.

    The inter-op pool is also set to 1 where torch still allows it (before any parallel work):
    the benchmarks run one operation at a time, and a second pool only adds contention on a
    shared machine.
    """
    if n is not None:
        if n < 1:
            raise ValueError(f"`threads` must be >= 1, got {n}")
        torch.set_num_threads(n)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already started: harmless, intra-op threads are what matter
            pass
    return torch.get_num_threads()


# --------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Wall-clock samples (seconds) of one competitor, and the result of its last run."""

    name: str
    samples: list[float] = field(default_factory=list)
    rounds: list[float | None] = field(default_factory=list)  # per round (None: skipped), for pairing
    warmup_s: float | None = None
    result: Any = None
    error: str | None = None

    @property
    def times(self) -> list[float]:
        """The timed runs; the warm-up counts only when it is the only run (a slow competitor)."""
        if self.samples:
            return self.samples
        return [] if self.warmup_s is None else [self.warmup_s]

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    @property
    def best(self) -> float | None:
        return min(self.times) if self.times else None

    def ratio_to(self, ref: "Timing") -> float | None:
        """This time / `ref`'s time: the median over the rounds both ran of the per-round ratio.

        Pairing by round cancels a load change that spans rounds (on a shared machine the load
        can double between one round and the next, which a ratio of medians would pass on);
        without a common round it falls back to the ratio of medians.
        """
        pairs = [a / b for a, b in zip(self.rounds, ref.rounds) if a is not None and b]
        if pairs:
            return statistics.median(pairs)
        if self.median is None or not ref.median:
            return None
        return self.median / ref.median

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "median_s": self.median, "min_s": self.best, "samples_s": self.samples,
                "warmup_s": self.warmup_s, "repeats": len(self.times), "error": self.error}


def interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int = 3, *, warmup: bool = True,
                budget_s: float | None = None, on_sample: Callable[[str, float], None] | None = None
                ) -> dict[str, Timing]:
    """Time each callable of `fns`, alternating them, and keep the last result of each.

    Args:
        fns: name -> a callable taking no argument (it does the whole piece of work being timed).
        repeats: timed rounds after the warm-up. Each round runs every competitor once; the
            order rotates by one every round, so no competitor always runs first or last.
            (Default: 3)
        warmup: run each callable once, untimed as a sample, before the rounds (first-call
            costs: lazy imports, allocator growth, one-off checks). Its time is kept in
            ``warmup_s`` and counts as the sample of a competitor that gets no other. (Default: True)
        budget_s: a competitor that has already used this many seconds (warm-up included)
            gets no more rounds; slow peers (ART's C&W) then have fewer samples, which
            ``Timing.times`` shows. None: no limit. (Default: None)
        on_sample: called with (name, seconds) after every timed run (progress logging).

    A competitor that raises is recorded with its error and dropped from later rounds; the
    others go on.

    Returns:
        name -> `Timing`, in the order of `fns`; compare two with `Timing.ratio_to` (paired by round).
    """
    out = {name: Timing(name) for name in fns}
    spent = dict.fromkeys(fns, 0.0)

    def run(name: str) -> float | None:
        t = out[name]
        try:
            t0 = time.perf_counter()
            t.result = fns[name]()
            dt = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - a broken competitor must not stop the others
            t.error = f"{type(e).__name__}: {e}"
            log.warning("%s failed: %s", name, t.error)
            return None
        spent[name] += dt
        if on_sample is not None:
            on_sample(name, dt)
        return dt

    names = list(fns)
    if warmup:
        for name in names:
            out[name].warmup_s = run(name)
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)] if names else []
        for name in names:
            out[name].rounds.append(None)
        for name in order:
            if out[name].error is not None or (budget_s is not None and spent[name] >= budget_s):
                continue
            dt = run(name)
            if dt is not None:
                out[name].samples.append(dt)
                out[name].rounds[r] = dt
    return out


class count_forwards:  # noqa: N801 - used as a context manager, reads like a function
    """Count a module's forward calls, split by whether autograd was recording, and their batch rows.

    Example:
        >>> with count_forwards(model) as c:
        ...     attack(model, x, y, "linf:0.1")
        >>> c.grad_calls, c.nograd_calls, c.grad_rows
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.grad_calls = self.nograd_calls = self.grad_rows = self.nograd_rows = 0

    def _hook(self, _m: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
        rows = int(args[0].shape[0]) if args and isinstance(args[0], torch.Tensor) and args[0].dim() else 0
        if torch.is_grad_enabled():
            self.grad_calls += 1
            self.grad_rows += rows
        else:
            self.nograd_calls += 1
            self.nograd_rows += rows

    def __enter__(self) -> "count_forwards":
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()

    def to_dict(self) -> dict[str, int]:
        return {"grad_calls": self.grad_calls, "grad_rows": self.grad_rows,
                "nograd_calls": self.nograd_calls, "nograd_rows": self.nograd_rows}


# --------------------------------------------------------------------------- model and data
def fmnist_test(n: int | None) -> Dataset:
    """The first `n` images of the Fashion-MNIST test split (all when None)."""
    return load_dataset("fashion-mnist", "test").take(n)


def fmnist_model(run_dir: str | Path = DEFAULT_MODEL_DIR, *, epochs: int = 2, seed: int = 0,
                 progress: bool = False) -> nn.Module:
    """The benchmark's model: `cnn-small` trained on Fashion-MNIST, trained once and cached.

    If `run_dir` holds a finished run (``model.json``) it is loaded; otherwise the library's
    `Trainer` trains it there (standard cross-entropy, SGD with momentum, cosine schedule,
    `epochs` passes, `seed`) — an interrupted training resumes from its last checkpoint. About
    90% test accuracy after 2 epochs; a few minutes on two idle CPU cores.

    Returns:
        the model in eval mode, on the CPU.
    """
    run_dir = Path(run_dir)
    if (run_dir / "model.json").exists():
        return load_model(run_dir)
    from bastion.defenses.training import TrainConfig, Trainer

    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    model = create_model("cnn-small", train.num_classes, train.shape, train.mean, train.std)
    cfg = TrainConfig(epochs=epochs, batch_size=128, lr=0.05, seed=seed, device="cpu",
                      checkpoint_every=100, eval_batch_size=1000)
    log.info("training the benchmark model into %s (%d epochs; reused by later runs)", run_dir, epochs)
    report = Trainer(model, train, test, cfg, run_dir=run_dir, resume=True, progress=progress).fit()
    log.info("trained: test accuracy %.4f in %.0f s", report["final"].get("test_acc", float("nan")),
             report["train_time_s"])
    return load_model(run_dir)


def fmnist_at_model(run_dir: str | Path = DEFAULT_AT_DIR, *, eps: float = 0.1, steps: int = 5,
                    examples: int = 20000, epochs: int = 1, seed: int = 0, progress: bool = False) -> nn.Module:
    """A PGD-AT fine-tune of `fmnist_model` (Madry et al. 2018), trained once and cached.

    Full PGD-AT from scratch (10 steps, many epochs) takes hours on a shared 2-core CPU; this
    starts from the standard benchmark model and fine-tunes it with ``pgd-at`` (L∞ `eps`,
    `steps` PGD steps from a random start) on the first `examples` training images for
    `epochs` epochs. It is robust enough that AutoAttack and APGD leave a non-trivial robust
    accuracy to compare — a benchmark model, not a strong defense.
    """
    run_dir = Path(run_dir)
    if (run_dir / "model.json").exists():
        return load_model(run_dir)
    from bastion.defenses.training import TrainConfig, Trainer, create_objective

    base = fmnist_model()
    train = load_dataset("fashion-mnist", "train").take(examples)
    test = load_dataset("fashion-mnist", "test").take(2000)
    cfg = TrainConfig(epochs=epochs, batch_size=128, lr=0.02, seed=seed, device="cpu", checkpoint_every=20,
                      eval_batch_size=1000)
    objective = create_objective("pgd-at", eps=eps, steps=steps)
    log.info("PGD-AT fine-tuning the benchmark model into %s (eps %g, %d steps, %d images, %d epochs)",
             run_dir, eps, steps, len(train), epochs)
    base.train().requires_grad_(True)
    Trainer(base, train, test, cfg, objective, run_dir=run_dir, resume=True, progress=progress,
            extra_config={"init": str(DEFAULT_MODEL_DIR)}).fit()
    return load_model(run_dir)


# --------------------------------------------------------------------------- the machine
def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Where and with what the numbers were measured (load average included: it matters)."""
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {
        "nproc": os.cpu_count(), "cpu": _cpu_model(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "loadavg": load,
        "peers": {d: _version(d) for d in ("torchattacks", "adversarial-robustness-toolbox", "foolbox", "numpy")},
        "bastion": _version("bastion"),
    }


if __name__ == "__main__":  # python benchmarks/_common.py [--pgd-at]: build the cached models
    import argparse

    p = argparse.ArgumentParser(description="Train (once) the benchmark models into runs/.")
    p.add_argument("--pgd-at", action="store_true", help=f"also the PGD-AT fine-tune ({DEFAULT_AT_DIR})")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    set_threads(a.threads)
    fmnist_model(progress=True)
    if a.pgd_at:
        fmnist_at_model(progress=True)
