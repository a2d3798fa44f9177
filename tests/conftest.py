"""Shared fixtures: small real data and small models trained once per test session.

Everything here is built from scikit-learn's digits (shipped with scikit-learn, no network), so
the fixtures work before and without any of Bastion's own loaders.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch import nn

# Test models are tiny: one intra-op thread avoids thread-sync overhead that dominates at this size
# (and keeps the suite steady on a busy 2-core machine).
torch.set_num_threads(1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every test module starts at one thread, whatever an earlier test (a benchmark smoke run) set."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # N×1×8×8 in [0, 1]
    y = torch.from_numpy(d.target.astype(np.int64))
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


@pytest.fixture(scope="session")
def digits() -> dict[str, torch.Tensor]:
    """scikit-learn digits, 8×8, fixed shuffle: 1,400 train / 397 test images in [0, 1]."""
    xtr, ytr, xte, yte = _digits()
    return {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}


class TinyCNN(nn.Module):
    """A small convolutional net for 1×8×8 inputs (about 20k parameters)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_tiny(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 30, seed: int = 0) -> nn.Module:
    """Full-batch-ish Adam training; a few seconds on 2 CPU cores."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 128):
            idx = perm[i:i + 128]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def digits_model(digits) -> nn.Module:
    """A TinyCNN trained on the digits train split (about 97% test accuracy), in eval mode."""
    torch.manual_seed(0)
    return train_tiny(TinyCNN(), digits["x_train"], digits["y_train"])


@pytest.fixture(scope="session")
def digits_model_b(digits) -> nn.Module:
    """A second, independently seeded TinyCNN (a transfer target / ensemble member)."""
    torch.manual_seed(1)
    return train_tiny(TinyCNN(), digits["x_train"], digits["y_train"], seed=1)


@contextlib.contextmanager
def benchmark_module(filename: str):
    """A script of benchmarks/ imported as a module, its folder on sys.path (for `_common`) while in use."""
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    name = "bench_" + Path(filename).stem
    sys.path.insert(0, str(root))
    try:
        spec = importlib.util.spec_from_file_location(name, root / filename)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up while being built
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(name, None)
        sys.path.remove(str(root))
