"""`bastion.evaluation.transfer` and `bastion transfer`: the transfer-success matrix on digits with
three small models (two TinyCNN seeds, one MLP)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bastion.cli import main
from bastion.evaluation import TransferReport, transfer

from conftest import train_tiny



@pytest.fixture(scope="module")
def mlp(digits):
    torch.manual_seed(2)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    return train_tiny(net, digits["x_train"], digits["y_train"], epochs=15, seed=2)


@pytest.fixture(scope="module")
def study(digits_model, digits_model_b, mlp, digits):
    models = {"cnn0": digits_model, "cnn1": digits_model_b, "mlp": mlp}
    return transfer(models, models, (digits["x_test"], digits["y_test"]), "linf:0.15",
                    attacks=["fgsm", "pgd", "mifgsm"], ensemble=True, n=150, steps=10)


def test_matrix_shape_and_rows(study):
    assert study.targets == ["cnn0", "cnn1", "mlp"] and study.attacks == ["fgsm", "pgd", "mifgsm"]
    assert study.surrogates == ["cnn0", "cnn1", "mlp", "ensemble(cnn0+cnn1+mlp)"]
    m = study.matrix()
    assert len(m) == 4 * 3 and all(len(row) == 3 for row in m)
    assert all(v is not None and 0.0 <= v <= 1.0 for row in m for v in row)
    assert sorted(study.white_box) == ["cnn0|cnn0", "cnn1|cnn1", "mlp|mlp"]
    assert all(0.9 < a <= 1.0 for a in study.clean_accuracy.values())
    assert study.rows[0]["config"]["name"] == "fgsm" and study.rows[1]["config"]["early_stop"] is False


def test_white_box_beats_transfer(study):
    """The diagonal (white box) is at least every off-diagonal entry of its row, for every attack."""
    for s in ("cnn0", "cnn1", "mlp"):
        for a in study.attacks:
            diag = study.success(s, a, s)
            assert diag > 0.5
            assert all(diag >= study.success(s, a, t) for t in study.targets if t != s)
    # PGD transfers to an independently trained net, but less than it breaks its own surrogate
    assert 0.1 < study.success("cnn0", "pgd", "cnn1") < study.success("cnn0", "pgd", "cnn0")


def test_ensemble_row_transfers_at_least_as_well_as_a_member_on_average(study):
    for a in study.attacks:
        ens = study.success("ensemble(cnn0+cnn1+mlp)", a, "cnn1")
        assert ens > study.success("mlp", a, "cnn1")  # the ensemble holds cnn1 itself


def test_json_round_trip_table_and_html(study, tmp_path):
    back = TransferReport.load(study.save(tmp_path / "report.json"))
    assert back.to_dict() == study.to_dict()
    assert json.loads((tmp_path / "report.json").read_text())["schema"] == "bastion-transfer/1"
    text = study.table()
    assert text.count("*") >= 9 and "ensemble(cnn0+cnn1+mlp)" in text
    page = study.save_html(tmp_path / "report.html").read_text()
    assert page.count("<b>") == 9 and "ensemble(cnn0+cnn1+mlp)" in page


def test_errors(digits_model, digits):
    data = (digits["x_test"], digits["y_test"])
    with pytest.raises(ValueError, match="at least two surrogates"):
        transfer(digits_model, digits_model, data, "linf:0.1", ensemble=True)
    with pytest.raises(TypeError, match="`targets"):
        transfer(digits_model, "model", data, "linf:0.1")
    with pytest.raises(ValueError, match="`n`"):
        transfer(digits_model, digits_model, data, "linf:0.1", n=0)


def test_cli_transfer(tmp_path, capsys):
    runs = []
    for model, seed in (("mlp", "0"), ("mlp", "1")):
        run = tmp_path / f"{model}-{seed}"
        assert main(["-q", "train", "--data", "digits", "--model", model, "--epochs", "3", "--lr", "0.1",
                     "--seed", seed, "--out", str(run), "--no-progress"]) == 0
        runs.append(str(run))
    out = tmp_path / "transfer"
    code = main(["-q", "transfer", "--surrogate", runs[0], "--surrogate", runs[1], "--ensemble", "--target", runs[0],
                 "--target", runs[1], "--threat", "linf:0.15", "--attack", "fgsm", "--attack", "pgd", "--steps", "5",
                 "--n", "60", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    report = TransferReport.load(out / "report.json")
    assert report.surrogates == ["mlp-0", "mlp-1", "ensemble(mlp-0+mlp-1)"] and report.targets == ["mlp-0", "mlp-1"]
    assert len(report.matrix()) == 6 and report.n == 60
    assert "ensemble(mlp-0+mlp-1)" in text and (out / "report.html").exists()
    assert report.config["models"]["targets"]["mlp-1"] == runs[1]
    assert main(["-q", "transfer", "--surrogate", runs[0], "--target", runs[0], "--threat", "linf:0.1",
                 "--out", str(out)]) == 2  # never overwrites
