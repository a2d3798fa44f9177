"""A user model factory for the CLI tests (`slow_factory:build`): a small MLP whose forward
sleeps a few milliseconds, so a subprocess can be killed reliably in the middle of training."""

from __future__ import annotations

import time

import torch
from torch import nn


class SlowMLP(nn.Module):
    def __init__(self, num_classes: int, in_features: int, delay: float, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, 32), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(32, num_classes))
        self.delay = delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.delay:
            time.sleep(self.delay)
        return self.net(x)


def build(num_classes: int, in_shape: tuple[int, int, int], delay: float = 0.01, dropout: float = 0.1) -> nn.Module:
    c, h, w = in_shape
    return SlowMLP(num_classes, c * h * w, delay, dropout)
