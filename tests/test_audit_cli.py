"""`bastion audit` and `bastion report` on an mlp trained by `bastion train` on digits."""

from __future__ import annotations

import json

import pytest

from bastion.cli import main
from bastion.evaluation import AuditReport


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit-cli") / "digits-mlp"
    assert main(["-q", "train", "--data", "digits", "--model", "mlp", "--epochs", "4", "--lr", "0.1",
                 "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def audit_dir(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit-out") / "masked"
    code = main(["-q", "audit", "--model", str(run_dir), "--transform", "bit-depth:bits=1", "--threat", "linf:0.2",
                 "--n", "60", "--out", str(out), "--no-progress"])
    assert code == 0
    return out


def test_audit_writes_json_html_config_and_prints_the_verdict(audit_dir, run_dir, capsys):
    report = AuditReport.load(audit_dir / "report.json")
    assert report.n == 60 and report.threat == "linf:0.2" and report.budget == "quick"
    assert report.adaptive["choices"][0] == "bit-depth: not differentiable → BPDA (identity)"
    assert "relies on obfuscated gradients" in report.verdict  # naive high, adaptive low
    page = (audit_dir / "report.html").read_text()
    assert report.verdict in page and "data:image/png;base64," in page
    cfg = json.loads((audit_dir / "config.json").read_text())
    assert cfg["command"] == "audit" and cfg["defense"][0]["name"] == "bit-depth"
    assert cfg["data"]["name"] == "digits"  # read from the run folder
    assert report.config["argv"][:3] == ["-q", "audit", "--model"]


def test_audit_never_overwrites(audit_dir, run_dir, capsys):
    code = main(["-q", "audit", "--model", str(run_dir), "--threat", "linf:0.2", "--n", "8", "--out", str(audit_dir),
                 "--no-progress"])
    assert code == 2
    assert "already holds an audit" in capsys.readouterr().err


def test_report_rerenders_the_html_from_json(audit_dir, tmp_path, capsys):
    before = (audit_dir / "report.html").read_text()
    (audit_dir / "report.html").unlink()
    assert main(["report", str(audit_dir)]) == 0
    out = capsys.readouterr().out
    assert "relies on obfuscated gradients" in out and "report.html" in out
    assert (audit_dir / "report.html").read_text() == before  # the page is a function of report.json
    assert main(["report", str(audit_dir / "report.json"), "--out", str(tmp_path / "copy.html")]) == 0
    assert (tmp_path / "copy.html").read_text() == before


def test_report_refuses_what_is_not_an_audit(run_dir, tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    ev = tmp_path / "ev"
    assert main(["-q", "evaluate", "--model-path", str(run_dir), "--limit", "8", "--preset", "quick",
                 "--threat", "linf:0.1", "--out", str(ev), "--no-progress", "--grid", "0"]) == 0
    capsys.readouterr()
    assert main(["report", str(ev)]) == 2
    assert "evaluation report" in capsys.readouterr().err


def test_audit_with_a_detector(run_dir, tmp_path, capsys):
    out = tmp_path / "det"
    assert main(["-q", "audit", "--model", str(run_dir), "--detector", "kde", "--detector-fit", "300",
                 "--detector-calibrate", "200", "--detector-fpr", "0.1", "--threat", "linf:0.1", "--n", "40",
                 "--out", str(out), "--no-progress"]) == 0
    report = AuditReport.load(out / "report.json")
    assert report.detector_fpr is not None
    assert report.adaptive["detector"]["name"] == "kde" and report.adaptive["detector"]["fpr"] == 0.1
    assert any(a["name"] == "detector-pgd" for a in report.attacks)
    assert "kde detector: differentiable → detector-aware PGD" in report.adaptive["choices"][-1]


def test_audit_fits_quilting_on_the_training_split(run_dir, tmp_path, monkeypatch):
    """Quilting needs a patch database: `bastion audit` builds it from the training images
    before the audit starts (the audit itself is replaced: only what it is given matters)."""
    import bastion.evaluation as ev

    seen = {}

    class Stop(Exception):
        pass

    def fake_audit(target, data, threat, **kw):
        seen["fitted"] = [getattr(t, "fitted", None) for t in target.transforms]
        seen["size"] = [t.database.shape[0] for t in target.transforms]
        raise Stop

    monkeypatch.setattr(ev, "audit", fake_audit)
    with pytest.raises(Stop):
        main(["-q", "audit", "--model", str(run_dir), "--transform", "quilting:patch_size=2,overlap=0,k=2,num_patches=30",
              "--threat", "linf:0.1", "--n", "20", "--out", str(tmp_path / "quilt"), "--no-progress"])
    assert seen["fitted"] == [True] and seen["size"] == [30]  # the size the option asked for


@pytest.mark.parametrize("args, match", [
    (["--threat", "linf:0.1"], "--model RUN_DIR is required"),
    (["--model", "RUN", "--threat", "linf:0.1", "--transform", "nope"], "nope"),
    (["--model", "RUN"], "--threat is required"),
])
def test_bad_input_is_one_clear_line(args, match, run_dir, tmp_path, capsys):
    args = [str(run_dir) if a == "RUN" else a for a in args]
    assert main(["-q", "audit", *args, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1


def test_audit_layer_sap_is_attacked_with_eot(run_dir, tmp_path, monkeypatch):
    """``--layer sap`` puts stochastic activation pruning into the audited model; the adaptive
    plan, built from the declarations, then attacks through EOT."""
    import bastion.evaluation as ev
    from bastion.evaluation.audit import adaptive_plan

    seen = {}

    class Stop(Exception):
        pass

    def fake_audit(target, data, threat, **kw):
        seen["plan"] = adaptive_plan(target, eot=kw.get("eot") or 8)
        seen["kinds"] = [type(m).__name__ for m in target.modules()]
        raise Stop

    monkeypatch.setattr(ev, "audit", fake_audit)
    with pytest.raises(Stop):
        main(["-q", "audit", "--model", str(run_dir), "--layer", "sap:fraction=0.5", "--threat", "linf:0.1",
              "--n", "20", "--out", str(tmp_path / "sap"), "--no-progress"])
    assert seen["plan"].randomized and "StochasticActivationPruning" in seen["kinds"]
    assert any("EOT" in c for c in seen["plan"].choices)
    cfg = json.loads((tmp_path / "sap" / "config.json").read_text())
    assert cfg["model"]["spec"]["layers"] == [{"name": "sap", "kwargs": {"fraction": 0.5}}]
