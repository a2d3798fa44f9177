"""Detection metrics: ROC/AUC conventions, TPR at FPR, the system view, normalized distortion,
`DetectionReport` JSON round trip, and `DetectionEval`'s data-hygiene refusals — on crafted data
where every number is known in advance (no training, well under a second)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bastion.defenses.detectors.base import Detector, conformal_threshold
from bastion.evaluation.detection import (DetectionEval, DetectionReport, normalized_distortion, roc, roc_auc,
                                          system_view, tpr_at_fpr)


# --------------------------------------------------------------------------- AUC / ROC
def test_auc_of_perfect_random_and_inverted_detectors():
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(200, generator=g)
    adv = torch.rand(150, generator=g) + 1.0  # every adversarial scores above every clean
    assert roc_auc(clean, adv) == 1.0
    assert roc_auc(adv, clean) == 0.0  # a detector that ranks backwards
    same = torch.full((50,), 0.3)  # a detector that cannot tell: all ties
    assert roc_auc(same, same[:20]) == 0.5
    # an uninformative random detector: AUC near 0.5 (n = 4000 each: sd ≈ 0.0065)
    r = torch.rand(8000, generator=g)
    assert abs(roc_auc(r[:4000], r[4000:]) - 0.5) < 0.03


def test_auc_counts_pairs():
    # AUC = P(adv score > clean score) + 0.5 P(tie): 2 clean {0, 2}, 2 adv {1, 3} -> pairs (1>0), (3>0), (3>2): 3/4
    assert roc_auc([0.0, 2.0], [1.0, 3.0]) == pytest.approx(0.75)


def test_roc_curve_and_tpr_at_fpr():
    clean = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])
    adv = torch.tensor([8.5, 9.5, 10.0, 3.5])
    f, t, _ = roc(clean, adv)
    assert f[0] == 0.0 and f[-1] == 1.0 and t[-1] == 1.0
    assert tpr_at_fpr(clean, adv, 0.0) == pytest.approx(0.5)  # 9.5 and 10 above every clean score
    assert tpr_at_fpr(clean, adv, 0.1) == pytest.approx(0.75)  # 8.5 passes once one clean (9) is flagged
    assert tpr_at_fpr(clean, adv, 0.6) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="`fpr`"):
        tpr_at_fpr(clean, adv, 1.5)


def test_roc_rejects_empty_and_bad_scores():
    with pytest.raises(ValueError, match="0 adversarial"):
        roc_auc([0.1, 0.2], [])
    with pytest.raises(ValueError, match="non-finite"):
        roc_auc([0.1, float("nan")], [0.3])
    with pytest.raises(ValueError, match="1-D"):
        roc_auc([[0.1, 0.2]], [0.3])


# --------------------------------------------------------------------------- system view
def test_system_view_arithmetic():
    # 5 attacked examples:        0      1      2      3      4
    detected = torch.tensor([True, True, False, False, False])
    correct = torch.tensor([True, False, True, False, False])
    sv = system_view(detected, correct)
    # defense success = detected or correct: 0, 1, 2 -> 3/5; attack success = undetected and wrong: 3, 4 -> 2/5
    assert sv["defense_success"] == pytest.approx(0.6)
    assert sv["attack_success"] == pytest.approx(0.4)
    assert sv["defense_success"] + sv["attack_success"] == pytest.approx(1.0)
    assert sv["detected"] == pytest.approx(0.4) and sv["correct"] == pytest.approx(0.4)
    assert math.isnan(system_view(torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool))["attack_success"])
    with pytest.raises(ValueError, match="same length"):
        system_view(detected, correct[:3])


def test_normalized_distortion_is_a_ratio_of_medians():
    assert normalized_distortion([1.0, 2.0, 30.0], [1.0, 1.0, 2.0]) == pytest.approx(2.0)
    assert math.isnan(normalized_distortion([], [1.0]))


def test_conformal_threshold_rank_and_minimum_size():
    s = torch.arange(1, 101, dtype=torch.float32)  # scores 1..100
    thr, k = conformal_threshold(s, 0.05)
    assert k == 96 and thr == 96.0  # ceil(0.95 * 101) = 96
    assert int((s > thr).sum()) == 4  # at most fpr·n flagged on the calibration set itself
    with pytest.raises(ValueError, match="at least 19"):
        conformal_threshold(torch.rand(10), 0.05)


# --------------------------------------------------------------------------- the report
def _report(**over):
    base = dict(detector={"name": "kde"}, attack={"name": "fgsm"}, n_clean=10, n_attacked=10, n_positive=4,
                only_successful=True, auc=0.9, roc_fpr=[0.0, 1.0], roc_tpr=[0.0, 1.0], tpr_at_fpr={"0.05": 0.5},
                threshold=1.5, fpr_requested=0.05, fpr_validation=0.04, fpr_test=0.1, detection_rate=0.75,
                clean_accuracy=0.9, defense_success=0.8, attack_success=0.2)
    base.update(over)
    return DetectionReport(**base)


def test_report_json_round_trip(tmp_path):
    r = _report(l2_median=0.5, l2_reference_median=0.4, l2_normalized=1.25, notes=["x"])
    assert DetectionReport.from_json(r.to_json()) == r
    r.save(tmp_path / "r.json")
    assert DetectionReport.load(tmp_path / "r.json") == r
    undefined = _report(auc=None, detection_rate=None, defense_success=float("nan"))
    back = DetectionReport.from_json(undefined.to_json())  # NaN is written as null, never as invalid JSON
    assert back.auc is None and back.defense_success is None
    with pytest.raises(ValueError, match="unknown detection-report field"):
        DetectionReport.from_dict({**r.to_dict(), "bogus": 1})
    assert "AUC 0.900" in r.summary()


# --------------------------------------------------------------------------- DetectionEval
class MeanPixel(Detector):
    """A crafted detector: score = mean pixel value."""

    name = "mean-pixel"

    def _fit(self, model, x, y, x_adv, **kw):
        pass

    def _score(self, x):
        return x.mean(dim=(1, 2, 3))


class Threshold(nn.Module):
    """A crafted classifier: class 1 iff the top-left pixel > 0.5."""

    def forward(self, x):
        v = x[:, 0, 0, 0]
        return torch.stack([0.5 - v, v - 0.5], 1) * 10


def _img(value, corner):
    x = torch.full((1, 1, 2, 2), value)
    x[0, 0, 0, 0] = corner
    return x


def test_detection_eval_counts_only_successful_adversarial_examples():
    model = Threshold()
    fit_x = torch.cat([_img(0.105 + 0.001 * i, 0.2) for i in range(5)])
    det = MeanPixel().fit(model, fit_x, torch.zeros(5, dtype=torch.long))
    val = torch.cat([_img(0.01 * i, 0.2) for i in range(1, 40)])  # clean mean-pixel scores up to ~0.34
    ev = DetectionEval(det, threshold_from=val, fpr=0.05)
    # 4 test examples, label 0 (corner 0.2 -> predicted 0 = correct)
    x = torch.cat([_img(0.055, 0.2), _img(0.065, 0.2), _img(0.075, 0.2), _img(0.085, 0.9)])  # last one misclassified
    y = torch.zeros(4, dtype=torch.long)
    x_adv = torch.cat([
        _img(0.9, 0.9),   # 0: successful and detected (high mean)
        _img(0.05, 0.9),  # 1: successful, undetected (low mean, corner flipped)
        _img(0.9, 0.2),   # 2: unsuccessful (still class 0), detected
        _img(0.9, 0.9),   # 3: clean input was already misclassified: not an adversarial example
    ])
    rep = ev.evaluate(x, y, x_adv, attack="crafted")
    assert rep.n_positive == 2  # examples 0 and 1
    assert rep.detection_rate == pytest.approx(0.5)  # 0 flagged, 1 not
    assert rep.clean_accuracy == pytest.approx(0.75)
    # system view over the 4 attacked: defense success = detected or correct -> 0, 2 (3 is detected too) -> 3/4
    assert rep.defense_success == pytest.approx(0.75) and rep.attack_success == pytest.approx(0.25)
    assert rep.fpr_test == 0.0  # clean test scores are all small
    # clean scores (mean pixel) 0.091, 0.099, 0.106, 0.289; positives 0.9 and 0.2625: 7 of 8 pairs ranked right
    assert rep.auc == pytest.approx(7 / 8)
    rep_all = ev.evaluate(x, y, x_adv, only_successful=False)
    assert rep_all.n_positive == 4
    # normalized distortion: the one successful undetected example (1), against a reference
    rep_l2 = ev.evaluate(x, y, x_adv, l2_reference=torch.tensor([0.7, 0.7, 0.7]))
    assert rep_l2.l2_normalized == pytest.approx(float((x_adv[1] - x[1]).norm()) / 0.7)


def test_detection_eval_refuses_reused_data_and_recalibration():
    model = Threshold()
    fit_x = torch.cat([_img(0.105 + 0.001 * i, 0.2) for i in range(5)])
    det = MeanPixel().fit(model, fit_x, torch.zeros(5, dtype=torch.long))
    val = torch.cat([_img(0.01 * i, 0.2) for i in range(1, 40)])
    with pytest.raises(ValueError, match="fit on"):
        det.calibrate(fit_x.repeat(5, 1, 1, 1), 0.1)  # calibrate on training data: refused
    ev = DetectionEval(det, threshold_from=val, fpr=0.05)
    y = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="validation"):
        ev.evaluate(val[:3], y, val[:3])
    with pytest.raises(ValueError, match="fit on"):
        ev.evaluate(fit_x[:3], y, fit_x[:3])
    x = torch.cat([_img(0.55 + 0.01 * i, 0.2) for i in range(3)])
    with pytest.raises(ValueError, match="paired"):
        ev.evaluate(x, y, x[:2])
    det.calibrate(val, 0.2)  # someone moves the threshold after the fact
    with pytest.raises(RuntimeError, match="threshold changed"):
        ev.evaluate(x, y, x)


def test_detection_eval_checks_its_arguments():
    with pytest.raises(TypeError, match="`detector`"):
        DetectionEval(nn.Linear(2, 2), threshold_from=torch.rand(5, 1, 2, 2))
    det = MeanPixel()
    with pytest.raises(RuntimeError, match="not fitted"):
        DetectionEval(det, threshold_from=torch.rand(30, 1, 2, 2))
    det.fit(Threshold(), torch.rand(4, 1, 2, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="`fpr`"):
        DetectionEval(det, threshold_from=torch.rand(30, 1, 2, 2), fpr=1.0)
    with pytest.raises(ValueError, match="`threshold_from`"):
        DetectionEval(det, threshold_from=torch.rand(30, 4))
