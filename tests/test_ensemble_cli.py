"""Ensembles saved as one model: `ensemble_model`, the ``ensemble`` architecture, `bastion ensemble`."""

from __future__ import annotations

import json

import pytest
import torch

from bastion.checkpoint import load_model, save_model
from bastion.cli import main
from bastion.defenses.layers import Ensemble, ensemble_model
from bastion.evaluation import Report
from bastion.models import create_model


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    runs = []
    for seed in (0, 1):
        out = root / f"mlp-{seed}"
        assert main(["-q", "train", "--data", "digits", "--model", "mlp", "--model-opt", "hidden=[32]", "--epochs", "2",
                     "--lr", "0.1", "--seed", str(seed), "--out", str(out), "--no-progress"]) == 0
        runs.append(out)
    return runs


@pytest.mark.parametrize("mode", ["logits", "probs", "vote"])
def test_ensemble_model_round_trips_and_equals_the_plain_ensemble(mode, tmp_path):
    torch.manual_seed(0)
    a = create_model("mlp", 4, (1, 6, 6), hidden=(8,))
    b = create_model("cnn-small", 4, (1, 6, 6), mean=(0.5,), std=(0.25,))
    ens = ensemble_model([a, b], mode).eval()
    save_model(tmp_path / "model", ens)
    back = load_model(tmp_path / "model")
    x = torch.rand(5, 1, 6, 6)
    want = Ensemble([a.eval(), b.eval()], mode)(x)
    assert torch.allclose(back(x), want, atol=1e-6) and torch.allclose(ens(x), want, atol=1e-6)
    assert [m["name"] for m in back.spec.kwargs["members"]] == ["mlp", "cnn-small"]


def test_ensemble_model_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="no spec"):
        ensemble_model([torch.nn.Linear(3, 2)])
    with pytest.raises(ValueError, match=r"members\[1\]"):
        ensemble_model([create_model("mlp", 4, (1, 6, 6)), create_model("mlp", 3, (1, 6, 6))])


def test_bastion_ensemble_writes_a_model_every_command_loads(members, tmp_path, capsys):
    out = tmp_path / "ens"
    assert main(["-q", "ensemble", *map(str, members), "--mode", "probs", "--out", str(out)]) == 0
    ens = load_model(out)
    x = torch.rand(7, 1, 8, 8)
    m0, m1 = load_model(members[0]), load_model(members[1])
    assert torch.allclose(ens(x), Ensemble([m0, m1], "probs")(x), atol=1e-6)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mode"] == "probs" and cfg["data"]["train"]["name"] == "digits"
    # the dataset comes from the members' run folders; the ensemble is attacked as one model
    ev = tmp_path / "ev"
    assert main(["-q", "evaluate", "--model-path", str(out), "--limit", "30", "--attack", "pgd", "--attack-opt",
                 "steps=5", "--threat", "linf:0.1", "--grid", "0", "--out", str(ev), "--no-progress"]) == 0
    rep = Report.load(ev / "report.json")
    assert rep.n == 30 and 0 <= rep.robust_accuracy <= rep.clean_accuracy
    assert main(["-q", "ensemble", *map(str, members), "--out", str(out)]) == 2  # never overwrites
    assert "already holds a model" in capsys.readouterr().err


def test_bastion_ensemble_errors_are_one_line(members, tmp_path, capsys):
    assert main(["-q", "ensemble", str(members[0]), "--out", str(tmp_path / "e")]) == 2
    assert "at least two members" in capsys.readouterr().err
    assert main(["-q", "ensemble", str(members[0]), str(tmp_path / "nope"), "--out", str(tmp_path / "e")]) == 2
    assert "nope not found" in capsys.readouterr().err
