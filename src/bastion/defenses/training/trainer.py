"""The Trainer: a resumable training loop with a pluggable objective and a run folder.

Run folder layout::

    config.json        the resolved configuration (written once, checked on resume)
    metrics.jsonl      one JSON line per finished epoch
    checkpoints/       ckpt-<step>.safetensors + .json (model, optimizer, RNG, loop position)
    model.safetensors  final weights (+ model.json: architecture and metrics); the averaged
                       weights when ``ema_decay`` is set
    report.json        what was trained, how long it took, the final numbers

Exact resume: the data order of epoch ``e`` is a permutation drawn from a generator seeded with
``(seed, e)``, the learning rate is a pure function of the step, and checkpoints carry every RNG
state, so a run killed at any point (even by SIGKILL, mid-epoch) and resumed from its last
checkpoint ends with bit-identical weights on CPU.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..._checks import check_choice, check_positive
from ... import distributed as D
from ...checkpoint import atomic_write_json, load_checkpoint, read_checkpoint, save_checkpoint
from ...data.base import Dataset
from ...speed import AMP_MODES, autocast, channels_last
from .objectives import Objective, Standard, StopTraining
from .schedules import SCHEDULES, make_schedule

log = logging.getLogger("bastion.train")

OPTIMIZERS = ("sgd", "adam", "adamw")
AUGMENTS = ("none", "crop", "crop-flip")


class RunExistsError(FileExistsError):
    """The run folder already holds a run; resume it or choose another folder."""


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Options of the training loop (the objective has its own).

    Args:
        epochs: passes over the training set.
        batch_size: examples per step.
        optimizer: ``sgd`` (with ``momentum``, ``nesterov``), ``adam`` or ``adamw``.
        lr: peak learning rate; ``schedule`` shapes it over training (see `make_schedule`).
        weight_decay: L2 penalty (decoupled for ``adamw``).
        warmup_epochs: linear warm-up length for ``constant``/``step``/``cosine``.
        augment: ``none``, ``crop`` (random shifts of up to 2 pixels) or ``crop-flip`` (4-pixel
            shifts and horizontal flips, for natural images).
        seed: makes data order, initialization and augmentation reproducible.
        checkpoint_every: also checkpoint every this many steps inside an epoch (0: only at epoch ends).
        keep_checkpoints: how many checkpoints to keep on disk.
        eval_batch_size: batch size of the per-epoch evaluation.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        amp: ``none`` or ``bf16`` (bfloat16 autocast of the loss computation, inner attacks
            included; for CUDA — on CPUs without bf16 units it is slower).
        channels_last: convert the model to the NHWC layout before training (faster
            convolutions on recent CPUs and GPUs; see `bastion.speed`).
        ema_decay: keep an exponential moving average of the weights (Polyak averaging; see
            `WeightAverage`) with this decay per optimizer step, e.g. 0.999 (0: off). The averaged
            weights are what the per-epoch evaluation measures and what the run's final model is;
            checkpoints carry both, so a resumed run continues both.
    """

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    augment: str = "none"
    seed: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    eval_batch_size: int = 500
    device: str = "auto"
    amp: str = "none"
    channels_last: bool = False
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        check_positive(self.epochs, "epochs", integer=True)
        check_positive(self.batch_size, "batch_size", integer=True)
        check_choice(self.optimizer, "optimizer", OPTIMIZERS)
        check_positive(self.lr, "lr")
        check_positive(self.momentum, "momentum", allow_zero=True)
        check_positive(self.weight_decay, "weight_decay", allow_zero=True)
        check_choice(self.schedule, "schedule", SCHEDULES)
        check_positive(self.warmup_epochs, "warmup_epochs", allow_zero=True)
        check_choice(self.augment, "augment", AUGMENTS)
        check_positive(self.checkpoint_every, "checkpoint_every", allow_zero=True, integer=True)
        check_positive(self.keep_checkpoints, "keep_checkpoints", integer=True)
        check_positive(self.eval_batch_size, "eval_batch_size", integer=True)
        check_choice(self.amp, "amp", AMP_MODES)
        if not isinstance(self.ema_decay, (int, float)) or isinstance(self.ema_decay, bool) \
                or not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must be a number in [0, 1) (0 turns the average off), got {self.ema_decay!r}")
        if not isinstance(self.channels_last, bool):
            raise TypeError(f"`channels_last` must be a bool, got {self.channels_last!r}")
        if not isinstance(self.seed, int):
            raise TypeError(f"`seed` must be an integer, got {self.seed!r}")


DEFAULT_SCHEDULE = "onecycle"  # `paper_training_loop`'s schedule where neither the user nor the paper chose one


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
                     f"replayed {m} times, so ceil({budget}/{m}) = {epochs} epoch{'s' if epochs != 1 else ''} cost "
                     f"what {epochs * m} epochs of natural training do (Shafahi et al. 2019: N/m epochs for a budget "
                     f"of N; rounded up, so at least {budget}); for {budget} full epochs pass --epochs {budget * m}")
    return epochs, schedule, notes


def _field_defaults(obj: Any) -> dict[str, Any]:
    """JSON-ready default values of a dataclass instance's fields (those that have one)."""
    if not is_dataclass(obj):
        return {}
    out = {}
    for f in fields(obj):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return json.loads(json.dumps(out, default=str))


def _fill_defaults(saved: Any, defaults: dict[str, Any]) -> Any:
    """A saved config section with the options it predates set to their defaults.

    A run folder written before an option existed (e.g. ``amp``, added later to `TrainConfig`)
    trained as that option's default does; resuming it with the default must not be refused.
    """
    if not isinstance(saved, dict):
        return saved
    return {**{k: v for k, v in defaults.items() if k not in saved}, **saved}


def _same_config(a: Any, b: Any, rel_tol: float = 1e-9) -> bool:
    """Equal JSON values, floats up to `rel_tol` (a data set's mean/std recomputed in another order
    of summation differs in its last digits; that must not block a resume)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_config(a[k], b[k], rel_tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_config(x, y, rel_tol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=rel_tol, abs_tol=0.0)
    return type(a) is type(b) and a == b


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device` {name!r} was asked for but CUDA is not available")
    return dev


def epoch_permutation(seed: int, epoch: int, n: int) -> Tensor:
    """The data order of one epoch: depends only on (seed, epoch), which makes resume exact."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def augment_batch(x: Tensor, kind: str) -> Tensor:
    """Random shifts (zero padding) and flips, vectorized over the batch (global torch RNG)."""
    if kind == "none":
        return x
    pad = 2 if kind == "crop" else 4
    n, c, h, w = x.shape
    padded = nn.functional.pad(x, (pad, pad, pad, pad))
    off = torch.randint(0, 2 * pad + 1, (2, n), device=x.device)
    rows = (off[0, :, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (off[1, :, None] + torch.arange(w, device=x.device))[:, None, None, :]
    out = padded[torch.arange(n, device=x.device)[:, None, None, None],
                 torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
    if kind == "crop-flip":
        flip = torch.rand(n, device=x.device) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset, batch_size: int = 500, device: torch.device | None = None) -> tuple[float, float]:
    """(clean accuracy, mean cross-entropy) of `model` on `data`, in eval mode."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    idx = D.shard_indices(len(data))  # all of it in one process; this rank's block under torchrun
    images, labels = data.images[idx], data.labels[idx]
    for i in range(0, len(idx), batch_size):
        x = images[i:i + batch_size].to(device)
        y = labels[i:i + batch_size].to(device)
        logits = model(x)
        correct += int((logits.argmax(1) == y).sum())
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
    model.train(was_training)
    correct, loss_sum = D.all_reduce_sum([correct, loss_sum], device)
    n = max(1, len(data))
    return correct / n, loss_sum / n


def _make_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class WeightAverage:
    """An exponential moving average of a model's weights, updated after every optimizer step.

    ``avg <- d·avg + (1 − d)·w`` over every floating-point entry of the state dict (parameters and
    batch-norm statistics alike); integer entries (``num_batches_tracked``) are copied. The decay
    of the ``t``-th update is ``min(decay, (1 + t) / (10 + t))``, so the first updates follow the
    weights closely instead of keeping the random initialization for thousands of steps.

    Averaging the weights along the trajectory raises both clean and robust accuracy of
    adversarially trained models by smoothing the last, noisy steps: Gowal et al., "Uncovering
    the Limits of Adversarial Training against Norm-Bounded Adversarial Examples" (2020), Sec. 4;
    Izmailov et al., "Averaging Weights Leads to Wider Optima" (UAI 2018). Under a schedule that
    anneals the learning rate to zero (``onecycle``, ``cyclic``) the last weights and the average
    end close together: on Fashion-MNIST FGSM-AT it changed nothing measurable (docs/results.md).

    Args:
        model: the trained model (its current weights start the average).
        decay: the average's decay per update, in (0, 1).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"`decay` must be in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.updates = 0
        self.reset(model)

    def reset(self, model: nn.Module) -> None:
        """Restart the average at `model`'s current weights (keeping the update count)."""
        live = model.state_dict()
        self.shadow = {k: v.detach().clone() for k, v in live.items()}
        floats = [k for k, v in live.items() if v.is_floating_point()]
        self._avg = [self.shadow[k] for k in floats]
        self._live = [live[k] for k in floats]
        self._copy = [(self.shadow[k], v) for k, v in live.items() if not v.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the model's current weights into the average."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self._avg, [w.detach() for w in self._live], 1.0 - d)
        for avg, w in self._copy:
            avg.copy_(w)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into `model` (the model the average follows stays tracked)."""
        for k, v in model.state_dict().items():
            v.copy_(self.shadow[k])

    def swapped(self, model: nn.Module) -> "_Swapped":
        """A context in which `model` holds the averaged weights; its own come back on exit."""
        return _Swapped(self, model)

    def state_dict(self) -> dict[str, Tensor]:
        return {**{f"w.{k}": v for k, v in self.shadow.items()},
                "updates": torch.tensor(self.updates, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = [k for k in self.shadow if f"w.{k}" not in state]
        if missing or "updates" not in state:
            raise ValueError(f"the saved weight average lacks {missing[:3] or ['updates']}")
        with torch.no_grad():
            for k, v in self.shadow.items():
                v.copy_(state[f"w.{k}"])
        self.updates = int(state["updates"])


class _Swapped:
    def __init__(self, average: WeightAverage, model: nn.Module) -> None:
        self.average, self.model = average, model

    def __enter__(self) -> nn.Module:
        self.saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.average.copy_to(self.model)
        return self.model

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                v.copy_(self.saved[k])


@dataclass
class _LoopState:
    """Where the loop is: saved in every checkpoint's JSON."""

    epoch: int = 0            # current epoch (0-based)
    batch: int = 0            # next batch within the epoch
    step: int = 0             # global optimizer steps done
    loss_sum: float = 0.0     # running sums of the current epoch
    correct: int = 0
    seen: int = 0
    elapsed: float = 0.0      # training seconds so far (over all sessions)
    stopped: str | None = None  # why training ended early (an objective's StopTraining), if it did
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Train `model` on `train` with an objective, writing a resumable run folder.

    Example:
        >>> from bastion import load_dataset, create_model
        >>> tr, te = load_dataset("digits", "train"), load_dataset("digits", "test")
        >>> m = create_model("cnn-small", tr.num_classes, tr.shape, tr.mean, tr.std)
        >>> report = Trainer(m, tr, te, TrainConfig(epochs=2), run_dir="runs/digits").fit()
    """

    def __init__(self, model: nn.Module, train: Dataset, test: Dataset | None = None,
                 config: TrainConfig | None = None, objective: Objective | None = None, *,
                 run_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
                 extra_config: dict[str, Any] | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(train, Dataset):
            raise TypeError(f"`train` must be a bastion Dataset, got {type(train).__name__}")
        if len(train) == 0:
            raise ValueError("`train` is empty")
        if test is not None and test.shape != train.shape:
            raise ValueError(f"`test` images have shape {test.shape}, `train` images {train.shape}")
        self.cfg = config or TrainConfig()
        self.objective = objective or Standard()
        self.model, self.train, self.test = model, train, test
        self.device = resolve_device(self.cfg.device)
        self.progress = progress
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.resume = resume
        self.extra_config = extra_config or {}
        self.steps_per_epoch = math.ceil(len(train) / self.cfg.batch_size)
        self.total_steps = self.steps_per_epoch * self.cfg.epochs
        self.average: WeightAverage | None = None  # set by `fit` when `ema_decay` is

    # ------------------------------------------------------------------ run folder
    def full_config(self) -> dict[str, Any]:
        spec = getattr(self.model, "spec", None)
        return {"train": asdict(self.cfg), "objective": self.objective.config(),
                "model": (json.loads(json.dumps(spec.to_dict(), default=str)) if spec is not None
                          else {"name": type(self.model).__name__}),
                "data": {"train": self.train.meta(), "test": self.test.meta() if self.test else None},
                **self.extra_config}

    def _prepare_run_dir(self) -> None:
        assert self.run_dir is not None
        cfg_path = self.run_dir / "config.json"
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not cfg_path.exists() and any(self.run_dir.iterdir()):
                raise RunExistsError(f"run folder {self.run_dir} is not empty and holds no run; "
                                     "choose an empty or new folder (nothing there is overwritten)")
            (self.run_dir / "checkpoints").mkdir(exist_ok=True)
            probe = self.run_dir / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except RunExistsError:
            raise
        except OSError as e:
            raise PermissionError(f"run folder `run_dir` {self.run_dir} is not writable: {e.strerror or e}") from e
        if cfg_path.exists():
            if not self.resume:
                raise RunExistsError(f"run folder {self.run_dir} already holds a run (config.json); "
                                     "resume it (--resume / resume=True) or choose another folder")
            saved = json.loads(cfg_path.read_text())
            mine = json.loads(json.dumps(self.full_config()))
            defaults = {"train": _field_defaults(self.cfg), "objective": _field_defaults(self.objective)}
            diffs = [k for k in ("model", "objective", "train")
                     if not _same_config(_fill_defaults(saved.get(k), defaults.get(k, {})), mine.get(k))]
            if diffs:
                raise RunExistsError(f"cannot resume {self.run_dir}: its {', '.join(diffs)} configuration differs "
                                     f"from this one (saved {saved.get(diffs[0])!r}, now {mine.get(diffs[0])!r})")
        else:
            atomic_write_json(cfg_path, self.full_config())

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints of this run (JSON written last), oldest first."""
        if self.run_dir is None:
            return []
        return sorted(p.with_suffix("") for p in (self.run_dir / "checkpoints").glob("ckpt-*.json")
                      if p.with_suffix(".safetensors").exists())

    def _save(self, opt: torch.optim.Optimizer, st: _LoopState) -> None:
        if self.run_dir is None:
            return
        if not D.is_main():  # one writer; the others wait so nobody reads a half-written folder
            D.barrier()
            return
        stem = self.run_dir / "checkpoints" / f"ckpt-{st.step:09d}"
        extra = {f"objective.{k}": v for k, v in self.objective.state_dict().items()}
        if self.average is not None:
            extra.update({f"ema.{k}": v for k, v in self.average.state_dict().items()})
        save_checkpoint(stem, self.model, optimizer=opt, state=asdict(st), extra_tensors=extra)
        for old in self.checkpoints()[:-self.cfg.keep_checkpoints]:
            old.with_suffix(".json").unlink(missing_ok=True)  # JSON first: the pair is then incomplete
            old.with_suffix(".safetensors").unlink(missing_ok=True)
        D.barrier()

    def _write_metrics(self, history: list[dict[str, Any]]) -> None:
        if self.run_dir is None or not D.is_main():
            return
        path = self.run_dir / "metrics.jsonl"
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(json.dumps(h, sort_keys=True) + "\n" for h in history))
        os.replace(tmp, path)

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        """Train (or resume) to the end; returns the report (also written to report.json)."""
        cfg = self.cfg
        rank, world_size = D.init_from_env()
        if world_size > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if world_size > cfg.batch_size:
            raise ValueError(f"`batch_size` {cfg.batch_size} is smaller than the number of processes {world_size}")
        if self.run_dir is not None and rank == 0:
            self._prepare_run_dir()
        D.barrier()
        torch.manual_seed(cfg.seed)
        self.model.to(self.device)
        if cfg.channels_last:
            channels_last(self.model)
        D.broadcast_module(self.model)  # every rank starts from rank 0's weights
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("`model` has no trainable parameters")
        opt = _make_optimizer(cfg, params)
        self.average = WeightAverage(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        lr_at = make_schedule(cfg.schedule, cfg.lr, self.total_steps, int(cfg.warmup_epochs * self.steps_per_epoch))
        st = _LoopState()
        ckpts = self.checkpoints()
        if ckpts:
            _, meta = load_checkpoint(ckpts[-1], self.model, opt, restore_rng=True, map_location=self.device)
            st = _LoopState(**meta["state"])
            tensors, _ = read_checkpoint(ckpts[-1])
            prefix = "extra.objective."
            self.objective.load_state_dict({k[len(prefix):]: v.to(self.device) for k, v in tensors.items()
                                            if k.startswith(prefix)})
            if self.average is not None:
                self.average.load_state_dict({k[len("extra.ema."):]: v.to(self.device) for k, v in tensors.items()
                                              if k.startswith("extra.ema.")})
            log.info("resumed %s at epoch %d, batch %d (step %d)", ckpts[-1], st.epoch + 1, st.batch, st.step)
        elif self.resume and self.run_dir is not None:
            log.info("no checkpoint in %s yet: starting from scratch", self.run_dir)
        self._write_metrics(st.history)

        x_all, y_all = self.train.images, self.train.labels
        while st.epoch < cfg.epochs:
            perm = epoch_permutation(cfg.seed, st.epoch, len(self.train))
            bar = tqdm(total=self.steps_per_epoch, initial=st.batch, disable=not self.progress or rank != 0, leave=False,
                       desc=f"epoch {st.epoch + 1}/{cfg.epochs}", unit="batch", dynamic_ncols=True)
            t0 = time.perf_counter()
            self.model.train()
            while st.batch < self.steps_per_epoch:
                idx = perm[st.batch * cfg.batch_size:(st.batch + 1) * cfg.batch_size]
                share = len(idx)
                if world_size > 1:  # this rank's part of the global batch
                    idx = idx.tensor_split(world_size)[rank]
                x = augment_batch(x_all[idx].to(self.device, non_blocking=True), cfg.augment)
                y = y_all[idx].to(self.device, non_blocking=True)
                lr = lr_at(st.step)
                for group in opt.param_groups:
                    group["lr"] = lr
                for _ in range(self.objective.replays):
                    with autocast(self.device, cfg.amp):
                        loss, logits = self.objective.loss(self.model, x, y)
                    bad = not bool(torch.isfinite(loss))
                    if world_size > 1:  # every rank must stop together
                        bad = D.all_reduce_sum([float(bad)], self.device)[0] > 0
                    if bad:
                        last = self.checkpoints()[-1] if self.checkpoints() else None
                        raise TrainingDiverged(f"loss became {float(loss.detach())} at epoch {st.epoch + 1}, "
                                               f"batch {st.batch + 1}; training stopped; "
                                               f"last good checkpoint: {last or 'none'}")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    D.all_reduce_gradients(params, len(y) / share)
                    opt.step()
                    self.objective.after_step(self.model)
                    if self.average is not None:
                        self.average.update()
                stats = [float(loss.detach()) * len(y), float((logits.detach().argmax(1) == y).sum()), float(len(y))]
                if world_size > 1:
                    stats = D.all_reduce_sum(stats, self.device)
                st.loss_sum += stats[0]
                st.correct += int(stats[1])
                st.seen += int(stats[2])
                st.batch += 1
                st.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{st.loss_sum / st.seen:.4f}", acc=f"{st.correct / st.seen:.3f}", lr=f"{lr:.3g}")
                if cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0 and st.batch < self.steps_per_epoch:
                    st.elapsed += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    self._save(opt, st)
            bar.close()
            st.elapsed += time.perf_counter() - t0
            row: dict[str, Any] = {"epoch": st.epoch + 1, "step": st.step, "lr": lr_at(max(0, st.step - 1)),
                                   "train_loss": st.loss_sum / max(1, st.seen),
                                   "train_acc": st.correct / max(1, st.seen), "time_s": round(st.elapsed, 3)}
            if self.test is not None:
                if self.average is not None:  # the averaged weights are the run's model
                    with self.average.swapped(self.model):
                        row["test_acc"], row["test_loss"] = accuracy(self.model, self.test, cfg.eval_batch_size,
                                                                     self.device)
                else:
                    row["test_acc"], row["test_loss"] = accuracy(self.model, self.test, cfg.eval_batch_size, self.device)
            stop: StopTraining | None = None
            try:
                row.update(self.objective.on_epoch_end(self.model, st.epoch + 1))
            except StopTraining as e:
                stop = e
                row.update(e.metrics)
                row["stopped"] = e.reason
            st.history.append(row)
            log.info("epoch %d/%d  loss %.4f  train acc %.4f%s", st.epoch + 1, cfg.epochs, row["train_loss"],
                     row["train_acc"], f"  test acc {row['test_acc']:.4f}" if "test_acc" in row else "")
            st.epoch, st.batch, st.loss_sum, st.correct, st.seen = st.epoch + 1, 0, 0.0, 0, 0
            self._write_metrics(st.history)
            if stop is not None:
                log.warning("training stopped after epoch %d: %s", st.epoch, stop.reason)
                if stop.restore is not None:
                    self.model.load_state_dict(stop.restore)
                    if self.average is not None:  # the restored epoch's weights are the model, not an average past them
                        log.warning("the weight average restarts at the restored weights")
                        self.average.reset(self.model)
                st.stopped = stop.reason
                st.epoch = cfg.epochs  # a resumed run must not continue past the stop
                self._save(opt, st)
                break
            self._save(opt, st)
        return self._finish(st)

    def _finish(self, st: _LoopState) -> dict[str, Any]:
        last = st.history[-1] if st.history else {}
        if self.average is not None:
            self.average.copy_to(self.model)
        report = {"kind": "train", "epochs": len(st.history), "steps": st.step, "train_time_s": round(st.elapsed, 3),
                  "world_size": D.world()[1],
                  "weights": f"exponential moving average (decay {self.cfg.ema_decay:g})" if self.average else "last",
                  "stopped": st.stopped, "final": last, "config": self.full_config()}
        if self.run_dir is not None and D.is_main():
            spec = getattr(self.model, "spec", None)
            save_checkpoint(self.run_dir / "model", self.model, spec=spec, with_rng=False,
                            state={"metrics": last})
            atomic_write_json(self.run_dir / "report.json", report)
        D.barrier()
        self.model.eval()
        return report


def checkpoint_state(stem: str | Path) -> dict[str, Any]:
    """The loop state saved in a checkpoint (epoch, batch, step, history, ...)."""
    return read_checkpoint(stem)[1]["state"]
