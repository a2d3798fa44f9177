"""`bastion evaluate|attack --transform ...`: the defended pipeline, attacked the way its transforms declare.

A small mlp trained on scikit-learn's digits by `bastion train`; a few dozen test images.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from bastion.checkpoint import load_model
from bastion.cli import main
from bastion.data import load_dataset
from bastion.defenses.pipeline import Defended
from bastion.defenses.transforms import create_transform
from bastion.evaluation import Report
from bastion.threat import ThreatModel

N = 48


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-tr") / "digits-mlp"
    assert main(["-q", "train", "--data", "digits", "--model", "mlp", "--epochs", "4", "--lr", "0.1",
                 "--out", str(out), "--no-progress"]) == 0
    return out


def _evaluate(run_dir, out, *extra: str) -> list[str]:
    return ["-q", "evaluate", "--model-path", str(run_dir), "--limit", str(N), "--attack", "pgd",
            "--attack-opt", "steps=10", "--threat", "linf:0.1", "--grid", "0", "--out", str(out), "--no-progress",
            *extra]


def test_bpda_breaks_what_the_naive_attack_cannot(run_dir, tmp_path, capsys):
    out = tmp_path / "bd"
    assert main(_evaluate(run_dir, out, "--transform", "bit-depth:bits=2", "--naive")) == 0
    text = capsys.readouterr().out
    adaptive, naive = Report.load(out / "report.json"), Report.load(out / "report-naive.json")
    # the same clean predictions (a deterministic transform: the adaptive view's forward is the real one)
    assert adaptive.per_example["clean_pred"] == naive.per_example["clean_pred"]
    # straight through round(): zero gradient, PGD cannot move off its random start; BPDA can
    assert adaptive.robust_accuracy < naive.robust_accuracy - 0.1
    assert "BPDA on the backward pass of bit-depth" in adaptive.notes[0]
    assert any("overstates robustness" in n for n in adaptive.notes)
    assert "Naive (straight through" in text and "Adaptive (BPDA / EOT" in text and "report-naive.json" in text
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["defense"]["transforms"] == ["bit-depth:bits=2"] and cfg["model"]["defense"]["eot"] is None
    assert (out / "state-naive.jsonl").exists()


def test_transforms_are_applied_in_the_order_given(run_dir, tmp_path):
    specs = ["gaussian-blur:sigma=1.0", "bit-depth:bits=1"]
    x = load_dataset("digits", "test").take(N).images
    model = load_model(run_dir)
    preds = {}
    for order in (specs, specs[::-1]):
        out = tmp_path / "-".join(s.split(":")[0] for s in order)
        argv = _evaluate(run_dir, out)
        for s in order:
            argv += ["--transform", s]
        assert main(argv) == 0
        rep = Report.load(out / "report.json")
        with torch.no_grad():
            expected = Defended([create_transform(s) for s in order], model)(x).argmax(1).tolist()
        assert rep.per_example["clean_pred"] == expected
        assert [d["name"] for d in rep.config["defense"]["declarations"][:2]] == [s.split(":")[0] for s in order]
        preds[tuple(order)] = expected
    assert preds[tuple(specs)] != preds[tuple(specs[::-1])]  # the order matters, so the test can tell


def test_randomized_transforms_are_attacked_with_eot(run_dir, tmp_path):
    out = tmp_path / "eot"
    assert main(_evaluate(run_dir, out, "--transform", "jpeg:quality=60", "--transform",
                          "gaussian-noise:sigma=0.05", "--eot", "3", "--seed", "1")) == 0
    rep = Report.load(out / "report.json")
    assert rep.config["defense"]["eot"] == 3
    assert "EOT over 3 draws (randomized: gaussian-noise)" in rep.notes[0] and "BPDA" in rep.notes[0]
    decl = rep.config["defense"]["declarations"]
    assert [d["randomized"] for d in decl[:2]] == [False, True] and decl[0]["differentiable"] is False
    assert 0 <= rep.robust_accuracy <= rep.clean_accuracy


def test_a_randomized_layer_is_attacked_with_eot_too(run_dir, tmp_path):
    """`--layer sap` alone (no transform) makes the model randomized: the evaluation attacks it
    through EOT and says so, instead of a naive single-draw attack."""
    out = tmp_path / "sap"
    assert main(_evaluate(run_dir, out, "--layer", "sap:fraction=0.5", "--eot", "3", "--naive")) == 0
    rep = Report.load(out / "report.json")
    assert rep.config["defense"]["eot"] == 3
    assert "EOT over 3 draws (randomized: StochasticActivationPruning)" in rep.notes[0]
    model = json.loads((out / "config.json").read_text())["model"]
    assert model["spec"]["layers"] == [{"name": "sap", "kwargs": {"fraction": 0.5}}]
    assert (out / "report-naive.json").exists()  # --naive: the single-draw attack beside it


def test_attack_with_a_transform_scores_the_real_pipeline(run_dir, tmp_path, capsys):
    out = tmp_path / "atk"
    assert main(["-q", "attack", "--model-path", str(run_dir), "--limit", "32", "--attack", "pgd",
                 "--attack-opt", "steps=5", "--threat", "linf:0.1", "--transform", "jpeg:quality=50",
                 "--grid", "0", "--out", str(out), "--no-progress"]) == 0
    t = load_file(str(out / "adversarial.safetensors"))
    assert bool(ThreatModel.parse("linf:0.1").contains(t["x_adv"], t["x"]).all())
    with torch.no_grad():
        real = Defended([create_transform("jpeg:quality=50")], load_model(run_dir))(t["x_adv"]).argmax(1)
    assert torch.equal(real, t["adv_pred"])  # the reported predictions are the real JPEG pipeline's
    assert bool(t["success"].any())
    assert "jpeg(quality=50" in capsys.readouterr().out


def test_quilting_gets_its_database_from_the_training_split(run_dir, tmp_path):
    out = tmp_path / "q"
    assert main(["-q", "evaluate", "--model-path", str(run_dir), "--limit", "16", "--attack", "fgsm", "--threat",
                 "linf:0.1", "--grid", "0", "--out", str(out), "--no-progress", "--transform",
                 "quilting:patch_size=4,overlap=0,k=1"]) == 0
    decl = Report.load(out / "report.json").config["defense"]["declarations"][0]
    assert decl["name"] == "quilting" and decl["database_size"] > 0 and decl["randomized"] is False


def test_a_model_widened_for_the_thermometer_code_is_evaluated_behind_it(tmp_path):
    """A model whose spec says it takes the 1×8×8 images but whose `thermometer-input` layer reads
    their 4-level code passes the shape check; the probe runs it on the code."""
    from bastion.checkpoint import save_model
    from bastion.defenses.layers import apply_layers
    from bastion.models import create_model

    torch.manual_seed(0)
    save_model(tmp_path / "thermo" / "model",
               apply_layers(create_model("mlp", 10, (1, 8, 8), hidden=[16]), ["thermometer-input:levels=4"]))
    out = tmp_path / "ev"
    assert main(["-q", "evaluate", "--model-path", str(tmp_path / "thermo" / "model"), "--data", "digits", "--limit",
                 "16", "--attack", "fgsm", "--threat", "linf:0.1", "--grid", "0", "--transform", "thermometer:levels=4",
                 "--out", str(out), "--no-progress"]) == 0
    assert Report.load(out / "report.json").n == 16


def test_transforms_from_a_config_file(run_dir, tmp_path):
    cfg = tmp_path / "ev.toml"
    cfg.write_text(f'model-path = "{run_dir}"\nthreat = "linf:0.1"\nattack = ["fgsm"]\nlimit = 16\ngrid = 0\n'
                   'transform = ["bit-depth:bits=3", "median:size=3"]\n')
    out = tmp_path / "cfg"
    assert main(["-q", "evaluate", "--config", str(cfg), "--out", str(out), "--no-progress"]) == 0
    rep = Report.load(out / "report.json")
    assert rep.config["defense"]["transforms"] == ["bit-depth:bits=3", "median:size=3"]


@pytest.mark.parametrize("extra, match", [
    (["--transform", "jpg"], r"unknown transform 'jpg'.*Did you mean 'jpeg'"),
    (["--transform", "jpeg:qualty=3"], r"bad options for transform 'jpeg'"),
    (["--transform", "jpeg:quality=300"], r"`quality` must be an integer in \[1, 100\]"),
    (["--transform", "thermometer"], r"into \(16, 8, 8\), but the model takes \(1, 8, 8\)"),
    (["--naive"], r"--naive .* needs at least one --transform"),
])
def test_bad_transforms_are_one_clear_line(extra, match, run_dir, tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(_evaluate(run_dir, out, *extra)) == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing written
