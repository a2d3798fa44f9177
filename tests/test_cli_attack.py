"""`bastion attack`, `bastion evaluate` and the demo's evaluation, on a small model trained by the CLI."""

from __future__ import annotations

import json
import re
import struct

import pytest
import torch
from safetensors.torch import load_file

from bastion.cli import main
from bastion.evaluation import Report
from bastion.threat import ThreatModel


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """An mlp trained on digits for a few epochs by `bastion train` (a real run folder)."""
    out = tmp_path_factory.mktemp("cli") / "digits-mlp"
    assert main(["-q", "train", "--data", "digits", "--model", "mlp", "--epochs", "4", "--lr", "0.1",
                 "--out", str(out), "--no-progress"]) == 0
    return out


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_attack_writes_examples_report_grid_and_table(run_dir, tmp_path, capsys):
    out = tmp_path / "atk"
    argv = ["-q", "attack", "--model-path", str(run_dir), "--split", "test", "--limit", "40", "--attack", "pgd",
            "--attack-opt", "steps=5", "--attack-opt", "step_size=1/50", "--threat", "linf:0.1", "--seed", "3",
            "--batch-size", "16", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "worst case" in text and "pgd" in text and "adversarial.safetensors" in text
    t = load_file(str(out / "adversarial.safetensors"))
    assert set(t) == {"x", "x_adv", "y", "clean_pred", "adv_pred", "success"}
    assert t["x"].shape == t["x_adv"].shape == (40, 1, 8, 8) and t["y"].shape == (40,)
    assert torch.equal(t["success"], t["adv_pred"] != t["y"])
    assert bool(ThreatModel.parse("linf:0.1").contains(t["x_adv"], t["x"]).all())
    assert bool(t["success"].any())
    report = Report.load(out / "report.json")
    assert report.n == 40 and report.attacks[0].config["steps"] == 5 and report.attacks[0].config["step_size"] == 0.02
    assert report.per_example["adv_pred"] == t["adv_pred"].tolist()
    # data defaulted to the run's dataset; the resolved config is saved with the command line
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["name"] == "digits" and cfg["command"] == "attack" and cfg["argv"] == argv
    assert cfg["evaluation"]["attacks"][0]["steps"] == 5 and cfg["model"]["digest"]
    w, h = _png_size(out / "grid.png")
    assert (w, h) == (8 * 150, 750)  # 5 rows: original, adversarial, perturbation, the two CAMs
    # never overwrites
    assert main(argv) == 2
    assert "already holds an evaluation" in capsys.readouterr().err


def test_evaluate_suite_curve_and_resume(run_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    argv = ["-q", "evaluate", "--model-path", str(run_dir / "model"), "--data", "digits", "--limit", "48",
            "--attack", "fgsm", "--attack", "pgd", "--attack-opt", "pgd:steps=4", "--threat", "linf:0.1",
            "--epsilons", "0.05,0.1,1/5", "--batch-size", "16", "--grid", "4", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "Security curve" in text and "fgsm" in text and "state.jsonl" in text
    rep = Report.load(out / "report.json")
    assert [a.label for a in rep.attacks] == ["fgsm", "pgd"] and rep.attacks[1].config["steps"] == 4
    assert [c.eps for c in rep.curve] == [0.05, 0.1, 0.2]
    assert rep.attacks[1].n_attacked == sum(rep.per_example["success"]["fgsm"][i] is False for i in range(48))
    assert _png_size(out / "grid.png") == (4 * 150, 750)
    assert len((out / "state.jsonl").read_text().splitlines()) == 1 + 3
    assert f"{100 * rep.robust_accuracy:.2f}%" in text

    assert main(argv) == 2  # an existing report is not overwritten ...
    assert "--resume" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0  # ... but a finished evaluation resumes instantly from its state
    again = Report.load(out / "report.json")
    assert again.per_example == rep.per_example and any("resumed: 3 of 3" in n for n in again.notes)
    capsys.readouterr()
    other = [a if a != "linf:0.1" else "linf:0.2" for a in argv]
    assert main([*other, "--resume"]) == 2
    assert "cannot resume" in capsys.readouterr().err


def test_evaluate_from_a_config_file(run_dir, tmp_path, capsys):
    cfg = tmp_path / "eval.toml"
    cfg.write_text(f'model-path = "{run_dir}"\nthreat = "linf:0.1"\nattack = ["fgsm", "pgd"]\nlimit = 20\n'
                   'epsilons = [0.05, "1/10"]\ngrid = 0\n[attack_opt.pgd]\nsteps = 2\nrandom_start = false\n')
    out = tmp_path / "cfg"
    assert main(["-q", "evaluate", "--config", str(cfg), "--limit", "24", "--out", str(out), "--no-progress"]) == 0
    rep = Report.load(out / "report.json")
    assert rep.n == 24  # the flag won over the file
    assert rep.attacks[1].config["steps"] == 2 and rep.attacks[1].config["random_start"] is False
    assert [c.eps for c in rep.curve] == [0.05, 0.1]
    assert not (out / "grid.png").exists()
    assert json.loads((out / "config.json").read_text())["cli"]["config"] == str(cfg)


def test_evaluate_quick_preset_on_an_untrained_model(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["-q", "evaluate", "--model", "mlp", "--data", "digits", "--limit", "8", "--preset", "quick",
                 "--threat", "linf:0.1", "--out", str(out), "--no-progress"]) == 0
    assert "pgd" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["evaluation"]["preset"] == "quick" and cfg["model"]["trained"] is False
    assert Report.load(out / "report.json").attacks[0].config["steps"] == 20


@pytest.mark.parametrize("args, match", [
    (["evaluate", "--preset", "strongest", "--threat", "linf:0.1"], r"unknown preset 'strongest'.*quick, standard, full"),
    (["evaluate", "--attack", "pgdd", "--threat", "linf:0.1"], r"unknown attack 'pgdd'.*Valid attacks:.*fgsm.*pgd"),
    (["attack", "--attack", "pgdd", "--threat", "linf:0.1"], r"unknown attack 'pgdd'.*pgd"),
    (["attack", "--attack-opt", "stepz=3", "--threat", "linf:0.1"], r"no hyper-parameter 'stepz'; valid: steps"),
    (["evaluate", "--attack", "pgd", "--threat", "linf-0.1"], r"must look like 'NORM:EPS'"),
    (["evaluate", "--attack", "pgd", "--threat", "linf:abc"], r"not a number or fraction"),
    (["evaluate", "--attack", "pgd"], r"--threat is required"),
    (["evaluate", "--attack", "fgsm", "--attack", "pgd", "--attack-opt", "steps=3", "--threat", "linf:0.1"],
     r"say which attack"),
    (["evaluate", "--preset", "quick", "--attack", "pgd", "--threat", "linf:0.1"], r"either --preset or --attack"),
])
def test_bad_input_is_one_clear_line(args, match, run_dir, tmp_path, capsys):
    assert main(["-q", *args, "--model-path", str(run_dir), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "report.json").exists()


def test_missing_model_path_and_wrong_data(run_dir, tmp_path, capsys):
    assert main(["-q", "attack", "--model-path", str(tmp_path / "nope"), "--threat", "linf:0.1",
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert re.search(r"--model-path .*nope not found", capsys.readouterr().err)
    assert main(["-q", "attack", "--model-path", str(run_dir), "--data", "mnist-5k", "--limit", "4",
                 "--threat", "linf:0.1", "--out", str(tmp_path / "o2"), "--no-progress"]) == 2
    assert "wrong --data?" in capsys.readouterr().err
    assert main(["-q", "attack", "--threat", "linf:0.1", "--out", str(tmp_path / "o3")]) == 2
    assert "exactly one of --model-path" in capsys.readouterr().err


def test_list_attacks(capsys):
    assert main(["list", "attacks"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("attacks:") and re.search(r"^\s+fgsm\s", out, re.M) and re.search(r"^\s+pgd\s", out, re.M)
    assert main(["list", "attacks", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"attacks"} and {"fgsm", "pgd"} <= set(data["attacks"])
    assert data["attacks"]["pgd"].startswith("Projected Gradient Descent")


def test_demo_attacks_its_model(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--epochs", "1", "--audit-transform", "none", "--detector", "none", "--eval-limit", "16", "--harden", "none", "--out", str(out),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "robust accuracy" in text and "fgsm" in text and "apgd" in text and "Security curve" in text
    ev = Report.load(out / "evaluation.json")
    assert ev.n == 16 and [a.label for a in ev.attacks] == ["fgsm", "pgd", "apgd"]
    assert [c.eps for c in ev.curve] == [0.1, 0.2, 0.3]
    assert ev.curve[-1].robust_accuracy < ev.curve[0].robust_accuracy <= ev.clean_accuracy  # an undefended model falls
    assert _png_size(out / "grid.png")[1] == 750
