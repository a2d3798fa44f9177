"""`bastion detect fit` / `bastion detect evaluate` on a tiny digits model, and `bastion list detectors`."""

from __future__ import annotations

import json

import pytest
import torch

from bastion.checkpoint import save_model
from bastion.cli import main
from bastion.defenses.detectors import list_detectors, load_detector
from bastion.evaluation.detection import DetectionReport
from bastion.models import create_model

from conftest import train_tiny


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits):
    """A cnn-small trained on the digits train split, saved as a run folder holding `model.*` (no config.json)."""
    torch.manual_seed(0)
    model = create_model("cnn-small", 10, (1, 8, 8), dropout=0.25)
    train_tiny(model, digits["x_train"], digits["y_train"], epochs=4)
    out = tmp_path_factory.mktemp("detect") / "run"
    out.mkdir()
    save_model(out / "model", model)
    return out


@pytest.fixture(scope="module")
def fitted(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("detect") / "kde"
    argv = ["-q", "detect", "fit", "--detector", "kde", "--detector-opt", 'bandwidth="auto"', "--model", str(run_dir),
            "--data", "digits", "--fit-limit", "600", "--val-size", "100", "--fpr", "0.1", "--out", str(out)]
    assert main(argv) == 0
    return out, argv


def test_list_detectors(capsys):
    assert main(["list", "detectors"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in list_detectors()) and len(list_detectors()) == 7


def test_fit_saves_detector_model_and_config(fitted, run_dir, capsys):
    out, argv = fitted
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "detector.json", "detector.safetensors", "model.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["command"] == "detect fit" and cfg["argv"] == argv
    assert cfg["fit"]["n"] == 600 and cfg["validation"] == {**cfg["validation"], "split": "test", "n": 100}
    assert len(set(cfg["validation"]["indices"])) == 100
    assert cfg["detector"]["name"] == "kde" and cfg["detector"]["fpr"] == 0.1 and cfg["detector"]["sigma"] > 0
    det = load_detector(out, out / "model")
    assert det.fpr == 0.1 and len(det.calibration_hashes) == 100 and len(det.fit_hashes) == 600
    assert det.calibration["fpr_calibration"] <= 0.1
    # never overwrites
    assert main(argv) == 2
    assert "not empty" in capsys.readouterr().err


def test_evaluate_naive_and_adaptive(fitted, tmp_path, capsys):
    out, _ = fitted
    ev = tmp_path / "ev"
    assert main(["-q", "detect", "evaluate", "--detector-path", str(out), "--attack", "fgsm", "--attack", "deepfool",
                 "--threat", "linf:0.15", "--adaptive", "--adaptive-opt", "detector-pgd:steps=10",
                 "--adaptive-opt", "detector-cw:max_iterations=20", "--adaptive-opt", "detector-cw:binary_search_steps=2",
                 "--limit", "80", "--out", str(ev)]) == 0
    text = capsys.readouterr().out
    assert "AUC" in text and "detector-pgd (adaptive, for fgsm)" in text and "clean FP" in text
    rep = json.loads((ev / "report.json").read_text())
    assert rep["n"] == 80 and rep["detector"]["name"] == "kde"
    reports = [DetectionReport.from_dict(r) for r in rep["reports"]]
    labels = [r.attack["label"] for r in reports]
    assert labels == ["fgsm", "detector-pgd (adaptive, for fgsm)", "deepfool", "detector-cw (adaptive, for deepfool)"]
    fgsm, dpgd = reports[0], reports[1]
    assert fgsm.n_positive >= 20 and 0.5 < fgsm.auc <= 1.0 and fgsm.fpr_requested == 0.1
    assert dpgd.detection_rate < fgsm.detection_rate  # knowing the detector helps the attacker
    assert all(r.n_clean == 80 and r.threshold == reports[0].threshold for r in reports)
    cfg = json.loads((ev / "config.json").read_text())
    # the 100 calibration images (and any fit image) were left out before the 80 were drawn
    assert cfg["data"]["left_out"] >= 100 and cfg["adaptive"] is True


def test_fit_from_a_config_file(run_dir, tmp_path):
    cfg = tmp_path / "fit.toml"
    cfg.write_text('detector = "mrr:n=2,epochs=2"\ndata = "digits"\nfit-limit = 300\nval-size = 50\nfpr = 0.2\n')
    out = tmp_path / "mrr"
    assert main(["-q", "detect", "fit", "--config", str(cfg), "--model", str(run_dir), "--fpr", "0.1",
                 "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["fit"]["n"] == 300 and saved["detector"]["fpr"] == 0.1  # the flag won over the file
    assert saved["detector"]["n"] == 2 and saved["detector"]["adaptive_parts"] == 2


@pytest.mark.parametrize("args, match", [
    (["fit", "--model", "{run}", "--data", "digits"], "--detector is required"),
    (["fit", "--detector", "nope", "--model", "{run}", "--data", "digits"], "unknown detector 'nope'"),
    (["fit", "--detector", "kde", "--model", "{run}", "--data", "digits", "--fpr", "1.5"], "--fpr"),
    (["fit", "--detector", "kde", "--model", "{run}", "--data", "digits", "--val-size", "5"], "too small for --fpr"),
    (["fit", "--detector", "kde", "--model", "{tmp}/none", "--data", "digits"], "not found"),
    (["evaluate", "--detector-path", "{tmp}", "--attack", "fgsm"], "holds no detector.json"),
    (["evaluate", "--detector-path", "{fitted}"], "at least one --attack"),
    (["evaluate", "--detector-path", "{fitted}", "--attack", "fgsm", "--limit", "5"], "needs a threat model"),
    (["evaluate", "--detector-path", "{fitted}", "--attack", "cw", "--adaptive-opt", "pgd:steps=3"],
     "--adaptive-opt"),
])
def test_errors_are_one_clear_line(args, match, run_dir, fitted, tmp_path, capsys):
    subst = {"{run}": str(run_dir), "{tmp}": str(tmp_path), "{fitted}": str(fitted[0])}
    argv = ["-q", "detect"] + [subst.get(a, a.replace("{tmp}", str(tmp_path))) for a in args]
    if args[0] == "fit":
        argv += ["--out", str(tmp_path / "out")]
    else:
        argv += ["--out", str(tmp_path / "ev")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match.lower() in err.lower(), err
