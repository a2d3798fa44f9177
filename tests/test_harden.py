"""`bastion.evaluation.harden` and `bastion harden`: the loop records every round, stops when the
adaptive target is met, is not fooled by a gradient-masking transform, and a training defense
lowers the success rate. Models: the digits TinyCNN of conftest; the CLI runs on an mlp trained
by `bastion train` on digits."""

from __future__ import annotations

import json

import pytest
import torch

from bastion.cli import main
from bastion.data.base import Dataset
from bastion.defenses.pipeline import Defended
from bastion.evaluation import HardenReport, harden
from bastion.evaluation.harden import parse_defense



@pytest.fixture(scope="module")
def train_ds(digits):
    return Dataset("digits", "train", digits["x_train"], digits["y_train"], [str(i) for i in range(10)], (0.0,), (1.0,))


@pytest.fixture(scope="module")
def loop(digits_model, digits, train_ds):
    """bit-depth (masks gradients) then a Fast-AT fine-tune, at L∞ 0.2, target 50%."""
    params = [p.detach().clone() for p in digits_model.parameters()]
    report = harden(digits_model, (digits["x_test"], digits["y_test"]), "linf:0.2", target=0.5, train=train_ds,
                    n=100, steps=10, defenses=["bit-depth:bits=1", "fast-at:epochs=3,lr=0.01", "jpeg"])
    assert all(torch.equal(a, b) for a, b in zip(params, digits_model.parameters()))  # the model is not touched
    return report


def test_rounds_are_recorded_and_the_loop_stops_when_the_target_is_met(loop):
    assert [r.round for r in loop.rounds] == [0, 1, 2]  # "jpeg" (round 3) is never applied
    assert [r.defense for r in loop.rounds] == [None, "bit-depth:bits=1", "fast-at:epochs=3,lr=0.01"]
    assert [r.kinds for r in loop.rounds] == [[], ["transform"], ["training"]]
    assert loop.rounds[2].pipeline == ["bit-depth:bits=1", "fast-at:epochs=3,lr=0.01"]
    assert [r.met for r in loop.rounds] == [False, False, True] and loop.met
    assert loop.final.success <= 0.5 < loop.rounds[1].success
    assert all(r.success >= max(r.naive_success, r.adaptive_success) for r in loop.rounds)
    for r in loop.rounds:
        assert 0.5 < r.clean_accuracy <= 1.0 and r.time_s >= r.attack_time_s > 0
        assert {a["label"] for a in r.attacks} >= {"naive:fgsm", "naive:pgd"}
    assert loop.rounds[2].train_time_s > 0 and loop.rounds[1].train_time_s < loop.rounds[2].train_time_s
    assert "target met in round 2" in loop.verdict
    assert isinstance(loop.pipeline, Defended) and loop.pipeline.model is not None


def test_a_transform_alone_does_not_fool_the_loop(loop):
    """Bit-depth reduction drives the naive success to ~0 (zero gradients) — a naive loop would stop
    there; the adaptive attack (BPDA) keeps it above the target."""
    r1 = loop.rounds[1]
    assert r1.naive_met and not r1.met
    assert r1.naive_success + 0.3 < r1.adaptive_success
    assert r1.techniques == ["BPDA through bit-depth"]
    assert "naive attack alone would have declared the target met in round(s) 1" in loop.verdict


def test_a_training_defense_lowers_the_success_rate(digits_model, digits, train_ds):
    report = harden(digits_model, (digits["x_test"], digits["y_test"]), "linf:0.15", target=0.0, train=train_ds,
                    n=100, steps=10, defenses=["fast-at:epochs=3,lr=0.01"])
    r0, r1 = report.rounds
    assert r0.naive_success == r0.adaptive_success  # nothing to adapt to: the same attack
    assert r1.adaptive_success + 0.2 < r0.adaptive_success
    assert not report.met and "target not met" in report.verdict  # 0% is out of reach: list exhausted


def test_json_round_trip_and_html(loop, tmp_path):
    path = loop.save(tmp_path / "report.json")
    back = HardenReport.load(path)
    assert back.to_dict() == loop.to_dict() and back.rounds[2].met
    assert json.loads(path.read_text())["schema"] == "bastion-harden/1"
    page = loop.save_html(tmp_path / "report.html").read_text()
    assert loop.verdict.split(":")[0] in page and page.count("<tr><td class='num'>") >= 3
    assert "BPDA through bit-depth" in page


def test_defense_specs_and_errors(digits_model, digits):
    assert parse_defense("fast-at:epochs=2") == ("training", "fast-at", {"epochs": 2})
    assert parse_defense("jpeg:quality=75")[0] == "transform"
    assert parse_defense("kde")[0] == "detector"
    with pytest.raises(ValueError, match="unknown defense 'nope'"):
        parse_defense("nope")
    data = (digits["x_test"], digits["y_test"])
    with pytest.raises(ValueError, match="`train`"):
        harden(digits_model, data, "linf:0.1", defenses=["fast-at"])
    with pytest.raises(ValueError, match="`target`"):
        harden(digits_model, data, "linf:0.1", target=1.5)


def test_cli_harden(tmp_path, capsys):
    run = tmp_path / "mlp"
    assert main(["-q", "train", "--data", "digits", "--model", "mlp", "--epochs", "4", "--lr", "0.1",
                 "--out", str(run), "--no-progress"]) == 0
    out = tmp_path / "harden"
    code = main(["-q", "harden", "--model", str(run), "--threat", "linf:0.2", "--target", "0.5", "--n", "60",
                 "--steps", "10", "--defense", "bit-depth:bits=1", "--defense", "fast-at:epochs=2,lr=0.02",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    report = HardenReport.load(out / "report.json")
    assert report.rounds[1].defense == "bit-depth:bits=1" and report.rounds[1].naive_met and not report.rounds[1].met
    assert "round" in text and report.verdict in text
    assert (out / "report.html").exists() and json.loads((out / "config.json").read_text())["command"] == "harden"
    assert (out / "model.json").exists() == (len(report.rounds) == 3)  # the fine-tuned classifier, when trained
    assert main(["-q", "harden", "--model", str(run), "--threat", "linf:0.2", "--defense", "jpeg",
                 "--out", str(out)]) == 2  # never overwrites
    assert main(["-q", "harden", "--model", str(run), "--threat", "linf:0.2", "--defense", "nope",
                 "--out", str(tmp_path / "x")]) == 2
    assert "unknown defense 'nope'" in capsys.readouterr().err


def test_detector_round_uses_the_detector_loss_and_is_refit_after_training(digits_model, digits, train_ds):
    report = harden(digits_model, (digits["x_test"], digits["y_test"]), "linf:0.1", target=0.0, train=train_ds,
                    n=60, steps=5, detector_fit=400, detector_calibrate=200, defenses=["kde", "fast-at:epochs=1"])
    r1, r2 = report.rounds[1], report.rounds[2]
    assert r1.kinds == ["detector"] and r1.techniques == ["the kde detector's loss"]
    assert "adaptive:detector-pgd" in {a["label"] for a in r1.attacks}
    assert r1.success >= max(r1.adaptive_success, r1.naive_success)  # worst case over both views
    assert "detector kde re-fit on the fine-tuned classifier" in r2.notes
    assert report.pipeline.detector is not None and report.pipeline.model is not digits_model
