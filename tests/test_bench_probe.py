"""benchmarks/probe_checkpoint.py: which checkpoint it reads, and its numbers' contract."""

from __future__ import annotations

import pytest
import torch
from conftest import benchmark_module

from bastion.checkpoint import save_checkpoint
from bastion.data import load_dataset
from bastion.models import create_model


@pytest.fixture(scope="module")
def probe_mod():
    with benchmark_module("probe_checkpoint.py") as mod:
        yield mod


def _model(seed: int):
    data = load_dataset("digits", "test")
    torch.manual_seed(seed)
    return create_model("mlp", data.num_classes, data.shape, data.mean, data.std)


def test_latest_prefers_the_final_model_then_the_newest_checkpoint(probe_mod, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(SystemExit, match="no model.json and no checkpoints"):
        probe_mod.latest(run)
    for step in (25, 100, 75):
        save_checkpoint(run / "checkpoints" / f"ckpt-{step:09d}", _model(step), state={"step": step})
    assert probe_mod.latest(run).name == "ckpt-000000100"
    save_checkpoint(run / "model", _model(0), with_rng=False)
    assert probe_mod.latest(run) == run / "model"


def test_probe_reports_the_checkpoints_step_and_ordered_accuracies(probe_mod, tmp_path):
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "ckpt-000000040", _model(1), state={"step": 40})
    r = probe_mod.probe(run, "digits", 20, 3, 0.1)
    assert r["step"] == 40 and r["checkpoint"].endswith("ckpt-000000040")
    # accuracies on 20 images are multiples of 1/20; an attack never lifts accuracy above clean
    assert all(abs(r[k] * 20 - round(r[k] * 20)) < 1e-9 for k in ("clean", "fgsm", "pgd20"))
    assert r["pgd20"] <= r["clean"] and r["fgsm"] <= r["clean"]
    with pytest.raises(SystemExit, match="--offset must be in"):
        probe_mod.probe(run, "digits", 20, 500, 0.1)
