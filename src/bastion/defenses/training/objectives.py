"""Training objectives: what the Trainer minimizes on a batch.

An objective is a small configurable object with ``loss(model, x, y) -> (loss, logits)``; the
logits are those the training accuracy is measured on. Adversarial objectives (PGD-AT, TRADES,
...) register here too, so ``bastion train --defense NAME`` and ``bastion list`` find them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from ..._checks import check_in_range
from ..._registry import Registry

OBJECTIVES: Registry[type["Objective"]] = Registry("defense")


@dataclass
class Objective:
    """Base class: subclasses are dataclasses whose fields are the method's options."""

    name: ClassVar[str] = "objective"

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The training loss of one batch and the logits its accuracy is measured on."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """JSON-ready options (saved in config.json and checked on resume)."""
        return {"name": self.name, **asdict(self)}

    # Hooks the Trainer calls; the defaults do nothing.
    @property
    def replays(self) -> int:
        """Optimizer steps per minibatch (Free AT replays each batch m times)."""
        return 1

    def after_step(self, model: nn.Module) -> None:
        """Called after each optimizer step (e.g. to update a carried-over perturbation)."""

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict[str, Any]:
        """Called after each epoch; returns extra metrics for metrics.jsonl, or raises `StopTraining`."""
        return {}

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors the objective carries between steps (saved in checkpoints for exact resume)."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what `state_dict` returned."""


class StopTraining(Exception):
    """Raised by an objective's `on_epoch_end` to end training early (e.g. catastrophic overfitting).

    Args:
        reason: written to the training log and report.json.
        restore: a model state_dict to restore before finishing (e.g. the last good epoch), or None.
        metrics: the stopped epoch's metrics (written to its metrics.jsonl row).
    """

    def __init__(self, reason: str, restore: dict[str, Tensor] | None = None,
                 metrics: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.restore = restore
        self.metrics = metrics or {}


@OBJECTIVES.register("standard", "Cross-entropy on clean inputs (no defense), optional label smoothing.")
@dataclass
class Standard(Objective):
    """Plain empirical risk minimization: cross-entropy on clean examples.

    Args:
        label_smoothing: mix the one-hot target with the uniform distribution (Szegedy et al. 2016);
            0 disables it.
    """

    name: ClassVar[str] = "standard"
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        check_in_range(self.label_smoothing, "label_smoothing", 0.0, 1.0)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(x)
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing), logits


def create_objective(name: str, **kwargs: Any) -> Objective:
    """Build a registered objective, e.g. ``create_objective("standard", label_smoothing=0.1)``."""
    cls = OBJECTIVES.get(name)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise TypeError(f"bad options for defense {name!r}: {e}") from e


def list_objectives() -> list[str]:
    return OBJECTIVES.names()
