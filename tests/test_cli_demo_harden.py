"""`bastion demo` hardens its model after attacking it, and prints robust accuracy before and after."""

from __future__ import annotations

import json

from bastion.cli import DEMO_EPSILONS, DEMO_HARDEN_EPS, main
from bastion.evaluation import Report


def test_demo_hardens_its_model(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--epochs", "1", "--audit-transform", "none", "--detector", "none", "--eval-limit", "40", "--harden-epochs", "1", "--out", str(out),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "Hardening — fast-at" in text and "hardening time" in text and "->" in text
    hard = out / "hardened"
    cfg = json.loads((hard / "config.json").read_text())
    assert cfg["objective"]["name"] == "fast-at" and cfg["objective"]["eps"] == DEMO_HARDEN_EPS
    assert cfg["train"]["schedule"] == "cyclic" and cfg["train"]["epochs"] == 1
    assert cfg["init"] == str(out / "model")                          # a fine-tune of the demo model
    before, after = Report.load(out / "evaluation.json"), Report.load(hard / "evaluation.json")
    assert before.n == after.n == 40 and [c.eps for c in after.curve] == list(DEMO_EPSILONS)
    rob = {c.eps: c.robust_accuracy for c in before.curve}, {c.eps: c.robust_accuracy for c in after.curve}
    # one epoch of Fast AT at eps 0.2 makes the model much harder to break at 0.2 than plain training
    assert rob[1][DEMO_HARDEN_EPS] >= rob[0][DEMO_HARDEN_EPS] + 0.2
    assert json.loads((hard / "report.json").read_text())["final"]["test_acc"] > 0.8
    assert not (hard / "grid.png").exists()                           # the picture is of the undefended model


def test_demo_harden_none_skips_it(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--epochs", "1", "--audit-transform", "none", "--detector", "none", "--eval-limit", "0", "--harden", "none", "--out", str(out),
                 "--no-progress"]) == 0
    assert "Hardening" not in capsys.readouterr().out and not (out / "hardened").exists()


def test_demo_audit_shows_the_transform_is_broken(tmp_path, capsys):
    """The demo's last steps: JPEG looks robust to the naive attack, the adaptive audit breaks it;
    then a detector is fit and attacked naively and adaptively."""
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--epochs", "1", "--eval-limit", "0", "--harden", "none", "--audit-n", "40",
                 "--detector", "mrr:n=2", "--detector-n", "20", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "Audit — the undefended model behind jpeg:quality=75" in text and "verdict" in text
    report = json.loads((out / "audit" / "report.json").read_text())
    assert report["naive_accuracy"] > report["adaptive_accuracy"] + 0.2   # BPDA through JPEG breaks what PGD could not
    assert "obfuscated" in report["verdict"]
    page = (out / "audit" / "report.html").read_text()
    assert report["verdict"].split(":")[0] in page and "data:image/png;base64," in page
    # the detector step: fit with a calibrated threshold, then evaluated naive and adaptive
    assert "Detector — mrr:n=2" in text
    config = json.loads((out / "detector" / "config.json").read_text())
    assert config["calibration"] is not None and config["fit"]["n"] == 1000
    det = json.loads((out / "detector" / "evaluate" / "report.json").read_text())
    assert det["n"] == 20 and len(det["reports"]) >= 2
    names = " ".join(json.dumps(r) for r in det["reports"])
    assert "fgsm" in names and "pgd" in names and "adaptive" in names
    # one attack unaware of the detector and one aware of it (the key is in every attack's config)
    assert {r["attack"]["adaptive"] for r in det["reports"]} == {False, True}
