"""Defensive distillation (Papernot et al. 2016): a teacher and a student trained at temperature T.

The recipe takes two training runs, both with this objective:

1. the teacher: ``Distillation(teacher=None, temperature=T)`` trains on the hard labels with the
   softmax at temperature T, ``CE(softmax(z/T), y)``;
2. the student (the defended model, usually the same architecture):
   ``Distillation(teacher="runs/teacher", temperature=T)`` trains on the teacher's soft labels
   ``softmax(z_teacher/T)`` with its own softmax at the same temperature.

At test time the student's logits are used unchanged (temperature 1): they were trained to be
about T times larger than a normal network's, so its softmax saturates and the gradients of the
softmax/cross-entropy vanish. That is gradient masking, not robustness — Carlini & Wagner 2016
(arXiv:1607.04311) break it with a margin loss on the logits, which Bastion's adaptive suite
uses.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..._checks import check_positive
from .objectives import OBJECTIVES, Objective

__all__ = ["Distillation", "distillation_loss", "weights_digest"]


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state_dict (names, dtypes, shapes and values): identifies a teacher in JSON."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def distillation_loss(student_logits: Tensor, soft_labels: Tensor, temperature: float,
                      t_squared: bool = False) -> Tensor:
    """Mean soft cross-entropy −Σ_k soft_k · log softmax(z_s/T)_k (× T² if `t_squared`)."""
    loss = -(soft_labels * F.log_softmax(student_logits / temperature, dim=1)).sum(1).mean()
    return loss * temperature**2 if t_squared else loss


@OBJECTIVES.register("distillation",
                     "Defensive distillation at temperature T; teacher=None trains the teacher (Papernot et al. 2016).")
@dataclass
class Distillation(Objective):
    """Defensive distillation.

    Papernot, McDaniel, Wu, Jha & Swami, "Distillation as a Defense to Adversarial Perturbations
    against Deep Neural Networks", IEEE S&P 2016, arXiv:1511.04508 (after Hinton, Vinyals &
    Dean's knowledge distillation, arXiv:1503.02531)::

        teacher=None (train the teacher):  loss = 1/N · Σ_i CE(softmax(z(x_i)/T), y_i)
        student:                           loss = 1/N · Σ_i −Σ_k softmax(z_t(x_i)/T)_k · log softmax(z(x_i)/T)_k
                                           (× T² when ``t_squared``)

    where z is the network being trained and z_t the frozen teacher. The soft labels are computed
    on the fly on each batch (the same as labelling the training set once when the inputs are
    not augmented; with augmentation the teacher labels the augmented inputs). The logits the
    Trainer measures accuracy on, and the model's outputs at test time, are z itself: the
    temperature is 1 at inference, which is what saturates the student's softmax.

    The teacher is deep-copied, put in eval mode and frozen (``requires_grad`` off, evaluated
    under ``torch.no_grad``), so later changes to the module that was passed in cannot change the
    labels, and nothing here writes to it. It follows the batch's device.

    Args:
        teacher: None (train the teacher itself at temperature T), a trained ``nn.Module``, or a
            path to a run folder / checkpoint stem, loaded with `bastion.checkpoint.load_model`.
            `config()` stores the path (when given) and a SHA-256 digest of the teacher's
            weights, never the module, so a resumed run checks it got the same teacher.
        temperature: T. Papernot et al. report the strongest effect at T = 100 on MNIST and
            CIFAR-10 (the default here, and the setting Carlini & Wagner attacked); replications
            often use T = 20, which trains faster with few epochs.
        t_squared: multiply the student loss by T² (Hinton et al.'s scaling, which keeps the
            gradient magnitude of soft targets independent of T). Papernot et al. do not scale;
            off by default. With plain SGD and large T, scaling makes steps T² larger.
    """

    name: ClassVar[str] = "distillation"
    teacher: nn.Module | str | Path | None = None
    temperature: float = 100.0
    t_squared: bool = False

    def __post_init__(self) -> None:
        check_positive(self.temperature, "temperature")
        if not isinstance(self.t_squared, bool):
            raise TypeError(f"`t_squared` must be a bool, got {self.t_squared!r}")
        self._teacher_path: str | None = None
        self._teacher: nn.Module | None = None
        if self.teacher is None:
            return
        if isinstance(self.teacher, (str, Path)):
            from ...checkpoint import load_model  # lazy: keeps the objectives importable alone

            self._teacher_path = str(self.teacher)
            net = load_model(self.teacher)
        elif isinstance(self.teacher, nn.Module):
            net = copy.deepcopy(self.teacher)
        else:
            raise TypeError(f"`teacher` must be None, an nn.Module or a path to a run folder/checkpoint, "
                            f"got {type(self.teacher).__name__}")
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        self._teacher = net
        self._teacher_digest = weights_digest(net)

    def config(self) -> dict[str, Any]:
        teacher: dict[str, Any] | None = None
        if self._teacher is not None:
            teacher = {"path": self._teacher_path, "weights": self._teacher_digest,
                       "class": type(self._teacher).__name__}
        return {"name": self.name, "temperature": self.temperature, "t_squared": self.t_squared,
                "teacher": teacher}

    @torch.no_grad()
    def soft_labels(self, x: Tensor) -> Tensor:
        """softmax(z_teacher(x) / T): the student's targets."""
        if self._teacher is None:
            raise ValueError("this objective trains a teacher (teacher=None): it has no soft labels")
        self._teacher.to(x.device)
        self._teacher.eval()  # stays frozen even if someone switched it back to train mode
        return F.softmax(self._teacher(x) / self.temperature, dim=1)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(x)
        if self._teacher is None:
            return F.cross_entropy(logits / self.temperature, y), logits
        return distillation_loss(logits, self.soft_labels(x), self.temperature, self.t_squared), logits
