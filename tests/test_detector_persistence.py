"""Detectors saved and loaded (safetensors + JSON, never pickle) score exactly as before; `Defended`
declares its detector; a loaded detector is evaluated with the threshold it was saved with.

One cnn-small (dropout 0.25) is trained briefly on scikit-learn's 8×8 digits for the module;
every detector is fit cheaply (a few epochs): these tests are about storage, not quality.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from bastion.checkpoint import CheckpointError, save_model
from bastion.defenses.detectors import (KDEBU, NotFittedError, create_detector, list_detectors, load_detector,
                                        save_detector)
from bastion.defenses.detectors.squeeze import EvenMedian
from bastion.defenses.pipeline import Defended
from bastion.defenses.transforms import create_transform
from bastion.evaluation.detection import DetectionEval, evaluate_detector
from bastion.models import create_model

from conftest import train_tiny

SPECS = {
    "kde": 'kde:bandwidth="auto"',
    "bayes-uncertainty": "bayes-uncertainty:seed=0,passes=8",
    "feature-squeeze": 'feature-squeeze:squeezers=["bit-depth:bits=1","bit-depth:bits=2"]',
    "metzen": 'metzen:attack="fgsm",threat="linf:0.15",epochs=2',
    "magnet": "magnet:structure=[8],ae_epochs=2",
    "mrr": "mrr:n=3,epochs=3",
}


@pytest.fixture(scope="module")
def setup(digits):
    torch.manual_seed(0)
    model = create_model("cnn-small", 10, (1, 8, 8), dropout=0.25)
    train_tiny(model, digits["x_train"][:800], digits["y_train"][:800], epochs=3)
    x_test, y_test = digits["x_test"], digits["y_test"]
    return {"model": model, "x_fit": digits["x_train"][:400], "y_fit": digits["y_train"][:400],
            "x_lr": digits["x_train"][400:500], "y_lr": digits["y_train"][400:500],
            "x_val": x_test[:100], "x": x_test[100:], "y": y_test[100:]}


def _fit(name: str, s) -> object:
    if name == "kde-bu":
        det = KDEBU(seed=0, passes=8, threat="linf:0.15").fit(s["model"], s["x_lr"], s["y_lr"], x_density=s["x_fit"],
                                                            y_density=s["y_fit"])
    else:
        det = create_detector(SPECS[name]).fit(s["model"], s["x_fit"], s["y_fit"])
    det.calibrate(s["x_val"], 0.1)
    return det


def _restart(det) -> None:
    """Randomized detectors: restart the seeded mask stream (a loaded detector starts at its seed)."""
    if hasattr(det, "reseed"):
        det.reseed()


def test_every_registered_detector_is_covered():
    assert set(SPECS) | {"kde-bu"} == set(list_detectors())


@pytest.mark.parametrize("name", [*SPECS, "kde-bu"])
def test_round_trip_scores_identically(name, setup, tmp_path):
    det = _fit(name, setup)
    stem = save_detector(det, tmp_path / "det")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["det.json", "det.safetensors"]
    meta = json.loads((tmp_path / "det.json").read_text())  # plain JSON: nothing to unpickle
    assert meta["state"]["kind"] == "detector" and meta["state"]["name"] == det.name
    loaded = load_detector(stem, setup["model"])
    assert type(loaded) is type(det) and loaded.fitted and not loaded.training
    assert loaded.threshold == det.threshold and loaded.fpr == det.fpr and loaded.scale == det.scale
    assert loaded.calibration == json.loads(json.dumps(det.calibration))
    assert loaded.fit_hashes == det.fit_hashes and len(loaded.fit_hashes) >= 100
    assert loaded.calibration_hashes == det.calibration_hashes and len(loaded.calibration_hashes) == 100
    assert loaded.config() == json.loads(json.dumps(det.config()))
    x = torch.cat([setup["x"][:40], (setup["x"][:20] + 0.2 * torch.randn_like(setup["x"][:20])).clamp(0, 1)])
    _restart(det)
    a = det.scores(x)
    b = loaded.scores(x)
    assert torch.equal(a, b), f"{name}: max score difference {float((a - b).abs().max()):.3g}"
    _restart(det)
    _restart(loaded)
    assert torch.equal(det.detect(x).is_adv, loaded.detect(x).is_adv)
    if not det.randomized:  # what an adaptive attacker differentiates is restored too (MRR's a*, MagNet's parts)
        _restart(det)
        assert torch.equal(det.adaptive_terms(x), loaded.adaptive_terms(x))


def test_multi_layer_mrr_round_trip(setup, tmp_path):
    """MRR on several layers keeps one group of defenders per layer: each group's networks,
    densities, CDFs and evasion thresholds come back."""
    det = create_detector('mrr:n=3,layer=[null,"input"],combine="logit",epochs=2').fit(
        setup["model"], setup["x_fit"], setup["y_fit"])
    det.calibrate(setup["x_val"], 0.1)
    loaded = load_detector(save_detector(det, tmp_path / "mrr"), setup["model"])
    assert loaded.layer == [None, "input"] and [g.n for g in loaded.groups] == [2, 1]
    x = torch.cat([setup["x"][:30], (setup["x"][:20] + 0.2 * torch.randn_like(setup["x"][:20])).clamp(0, 1)])
    assert torch.equal(det.scores(x), loaded.scores(x))
    assert torch.equal(det.adaptive_terms(x), loaded.adaptive_terms(x))


def test_sklearn_parts_are_stored_as_arrays(setup, tmp_path):
    det = _fit("kde-bu", setup)
    save_detector(det, tmp_path / "kdebu")
    t = load_file(str(tmp_path / "kdebu.safetensors"))
    assert torch.equal(t["model.coef"], det.coef) and torch.equal(t["model.kde.ref"], det.kde.ref)
    assert t["extra.fit_hashes"].dtype == torch.uint8 and t["extra.fit_hashes"].shape == (len(det.fit_hashes), 12)
    loaded = load_detector(tmp_path / "kdebu", setup["model"])
    assert loaded.kde.sigma == det.kde.sigma and loaded.bu.rate == det.bu.rate
    # a seeded stream restarts at its seed: two loads agree with each other
    again = load_detector(tmp_path / "kdebu", setup["model"])
    assert torch.equal(loaded.scores(setup["x"][:30]), again.scores(setup["x"][:30]))


def test_load_checks_the_model_and_the_files(setup, tmp_path):
    det = _fit("mrr", setup)
    save_detector(det, tmp_path)  # a folder: folder/detector.*
    assert (tmp_path / "detector.json").is_file()
    save_model(tmp_path / "model", setup["model"])
    by_path = load_detector(tmp_path, tmp_path / "model")  # the model by its checkpoint path
    assert torch.equal(by_path.scores(setup["x"][:10]), det.scores(setup["x"][:10]))
    other = create_model("cnn-small", 10, (1, 8, 8), dropout=0.25).eval()
    with pytest.raises(CheckpointError, match="not the classifier this detector was fit on"):
        load_detector(tmp_path, other)
    assert load_detector(tmp_path, other, check_model=False).model is other
    with pytest.raises(CheckpointError, match="not a saved detector"):
        load_detector(tmp_path / "model", setup["model"])
    (tmp_path / "detector.safetensors").unlink()
    with pytest.raises(CheckpointError, match="not found"):
        load_detector(tmp_path, setup["model"])


def test_save_refuses_what_it_cannot_rebuild(setup, tmp_path):
    with pytest.raises(NotFittedError, match="not fitted"):
        save_detector(create_detector("kde"), tmp_path / "a")
    with pytest.raises(TypeError, match="`detector`"):
        save_detector(setup["model"], tmp_path / "b")
    fs = create_detector("feature-squeeze", squeezers=[EvenMedian(2)]).fit(setup["model"], setup["x_fit"][:20],
                                                                           setup["y_fit"][:20])
    with pytest.raises(TypeError, match="EvenMedian.*transform specs"):
        save_detector(fs, tmp_path / "c")
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_loaded_detector_keeps_its_threshold_in_evaluation(setup, tmp_path):
    det = _fit("kde", setup)
    save_detector(det, tmp_path / "kde")
    loaded = load_detector(tmp_path / "kde", setup["model"])
    ev = DetectionEval(loaded, threshold_from=None)
    assert ev.threshold == det.threshold and ev.fpr == 0.1
    with pytest.raises(ValueError, match="validation data the threshold was set on"):
        ev.evaluate(setup["x_val"][:10], torch.zeros(10, dtype=torch.long), setup["x_val"][:10])
    with pytest.raises(ValueError, match="differs from the rate"):
        DetectionEval(loaded, threshold_from=None, fpr=0.05)
    with pytest.raises(NotFittedError, match="no threshold"):
        DetectionEval(create_detector("kde").fit(setup["model"], setup["x_fit"], setup["y_fit"]), None)
    reps = evaluate_detector(loaded, setup["x"][:60], setup["y"][:60], ["fgsm"], "linf:0.15", adaptive=True,
                             adaptive_options={"detector-pgd": {"steps": 10}})
    assert [r.attack["label"] for r in reps] == ["fgsm", "detector-pgd (adaptive, for fgsm)"]
    assert [r.attack["adaptive"] for r in reps] == [False, True] and reps[1].attack["steps"] == 10
    assert reps[0].threshold == det.threshold and reps[0].n_positive >= 10
    # the attacker who knows the detector gets caught less often than the one who does not
    assert reps[1].detection_rate < reps[0].detection_rate
    with pytest.raises(ValueError, match="needs a threat model"):
        evaluate_detector(loaded, setup["x"][:5], setup["y"][:5], ["fgsm"])


def test_defended_declares_its_detector(setup):
    model = setup["model"]
    mrr = create_detector("mrr:n=2,epochs=1").fit(model, setup["x_fit"], setup["y_fit"])
    d = Defended([create_transform("bit-depth:bits=4")], model, detector=mrr)
    decl = d.declarations()
    assert [e["role"] for e in decl] == ["transform", "model", "detector"]
    det = decl[-1]
    assert det["name"] == "mrr" and det["n"] == 2 and det["differentiable"] is True and det["randomized"] is False
    assert det["calibrated"] is False and det["threshold"] is None and det["fpr"] is None
    assert det["adaptive_loss"] is True and det["adaptive_parts"] is None
    mrr.calibrate(setup["x_val"], 0.05)
    det = d.declarations()[-1]
    assert det["calibrated"] is True and det["threshold"] == mrr.threshold and det["fpr"] == 0.05
    assert det["adaptive_parts"] == 2 and det["supervised"] is False and set(det["adaptive_attacks"]) == {
        "detector-pgd", "detector-cw"}
    json.dumps(d.declarations())  # JSON-ready, for reports
    fs = create_detector('feature-squeeze:squeezers=["bit-depth:bits=1"]').fit(model, setup["x_fit"][:20],
                                                                             setup["y_fit"][:20])
    bu = create_detector("bayes-uncertainty:passes=4").fit(model, setup["x_fit"][:20], setup["y_fit"][:20])
    assert Defended([], model, detector=fs).declarations()[-1]["bpda"] is True
    last = Defended([], model, detector=bu).declarations()[-1]
    assert last["eot"] is True and last["randomized"] is True
    assert "detector" not in [e["role"] for e in Defended([], model).declarations()]
