"""Detectors on a small real model: each separates clean digits from FGSM ones, thresholds keep
their false-positive promise on held-out data, supervised detectors never see their test data,
MRR is trained without adversarial examples, detector-aware attacks evade what plain ones do
not, and bad input gets errors that name the argument.

One cnn-small (dropout 0.25) is trained briefly on scikit-learn's 8×8 digits for the module.
Splits: detectors are fit on 800 training images, thresholds set on 150 test images
(validation), and everything is measured on the other 247 test images. Squeezers are bit-depth
reductions: a 2×2 median wipes out most of an 8×8 digit (it is the paper's choice for 28×28).
"""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from bastion.attacks import create_attack
from bastion.attacks.detector_aware import DetectorAwareCW, DetectorAwarePGD
from bastion.defenses.detectors import (KDEBU, MRR, BayesianUncertainty, Detection, FeatureSqueeze, KernelDensity,
                                        LayerTap, MagNetDetector, Metzen, NotFittedError, create_detector,
                                        example_hashes, list_detectors, magnet_defense)
from bastion.defenses.detectors.metzen import dynamic_bim
from bastion.defenses.detectors.squeeze import EvenMedian
from bastion.defenses.pipeline import Defended
from bastion.evaluation.detection import DetectionEval, roc_auc
from bastion.models import create_model

from conftest import TinyCNN, train_tiny

EPS = 0.15
SPECS = {
    "kde": "kde",
    "kde-auto": 'kde:bandwidth="auto"',
    "bayes-uncertainty": "bayes-uncertainty:seed=0",
    "feature-squeeze": 'feature-squeeze:squeezers=["bit-depth:bits=1","bit-depth:bits=2"]',
    "metzen": 'metzen:attack="fgsm",threat="linf:0.15",epochs=10',
    "magnet": "magnet:structure=[16],ae_epochs=25",
    "mrr": "mrr:n=4,epochs=20",
}


@pytest.fixture(scope="module")
def setup(digits):
    torch.manual_seed(0)
    model = create_model("cnn-small", 10, (1, 8, 8), dropout=0.25)
    train_tiny(model, digits["x_train"], digits["y_train"], epochs=8)
    x_test, y_test = digits["x_test"], digits["y_test"]
    d = {
        "model": model,
        "x_fit": digits["x_train"][:800], "y_fit": digits["y_train"][:800],
        "x_val": x_test[:150], "y_val": y_test[:150],
        "x": x_test[150:], "y": y_test[150:],
    }
    res = create_attack("fgsm")(model, d["x"], d["y"], f"linf:{EPS}", seed=0)
    with torch.no_grad():
        correct = model(d["x"]).argmax(1) == d["y"]
    d["x_adv"] = res.x_adv
    d["positive"] = res.success & correct  # successful adversarial examples only
    return d


_fitted: dict[str, object] = {}


def fitted(name: str, setup) -> object:
    """Each detector is fit once per module (and calibrated at FPR 10% on the validation split)."""
    if name not in _fitted:
        det = create_detector(SPECS[name]).fit(setup["model"], setup["x_fit"], setup["y_fit"])
        det.calibrate(setup["x_val"], 0.1)
        _fitted[name] = det
    return _fitted[name]


def auc_vs_fgsm(det, setup) -> float:
    return roc_auc(det.scores(setup["x"]), det.scores(setup["x_adv"][setup["positive"]]))


# --------------------------------------------------------------------------- registry
def test_registry_and_specs():
    assert set(list_detectors()) == {"metzen", "kde", "bayes-uncertainty", "kde-bu", "feature-squeeze", "magnet", "mrr"}
    det = create_detector("mrr:n=4,dim=8,combine=max")
    assert isinstance(det, MRR) and det.n == 4 and det.dim == 8 and det.combine == "max"
    fs = create_detector('feature-squeeze:squeezers=["bit-depth:bits=1","median:size=2"]')
    assert isinstance(fs.squeezers[1], EvenMedian)
    with pytest.raises(KeyError, match="Valid detectors: bayes-uncertainty"):
        create_detector("mr")
    with pytest.raises(TypeError, match="bad options for detector 'kde'"):
        create_detector("kde:nope=1")


def test_declarations():
    assert FeatureSqueeze.differentiable is False and KernelDensity.differentiable is True
    assert BayesianUncertainty.randomized and KDEBU.randomized and not MRR.randomized
    assert Metzen.supervised and KDEBU.supervised and not MRR.supervised and not MagNetDetector.supervised


# --------------------------------------------------------------------------- separation
@pytest.mark.parametrize("name", list(SPECS))
def test_detector_separates_clean_from_fgsm(name, setup):
    assert int(setup["positive"].sum()) >= 60  # enough successful adversarial examples to measure
    det = fitted(name, setup)
    auc = auc_vs_fgsm(det, setup)
    assert auc > 0.8, f"{name}: AUC {auc:.3f}"


def test_kde_bu_separates_and_refuses_its_own_data(setup):
    m, x_val, y_val = setup["model"], setup["x_val"], setup["y_val"]
    # regression data: the first 100 validation images (and their FGSM versions); thresholds: the other 50
    x_lr, y_lr, x_cal = x_val[:100], y_val[:100], x_val[100:]
    with pytest.raises(ValueError, match="disjoint from the density data"):
        KDEBU().fit(m, setup["x_fit"][:100], setup["y_fit"][:100], x_density=setup["x_fit"], y_density=setup["y_fit"])
    with pytest.raises(ValueError, match="x_density"):
        KDEBU().fit(m, x_lr, y_lr)
    det = KDEBU(seed=0, threat=f"linf:{EPS}").fit(m, x_lr, y_lr, x_density=setup["x_fit"], y_density=setup["y_fit"])
    assert det.fit_info["n_adv"] >= 20
    assert auc_vs_fgsm(det, setup) > 0.8
    # its regression data can be neither calibration nor test data
    with pytest.raises(ValueError, match="fit on"):
        det.calibrate(x_lr, 0.1)
    ev = DetectionEval(det, threshold_from=x_cal, fpr=0.1)
    with pytest.raises(ValueError, match="fit on"):
        ev.evaluate(x_lr, y_lr, x_lr)
    adv_lr = create_attack("fgsm")(m, x_lr, y_lr, f"linf:{EPS}", seed=0).x_adv  # the same adversarial examples
    with pytest.raises(ValueError, match="`x_adv` holds"):
        ev.evaluate(setup["x"][:len(adv_lr)], setup["y"][:len(adv_lr)], adv_lr)
    rep = ev.evaluate(setup["x"], setup["y"], setup["x_adv"], attack="fgsm")
    assert rep.auc is not None and rep.auc > 0.8


# --------------------------------------------------------------------------- thresholds
def fpr_bound(n_cal: int, n_test: int, fpr: float, q: float = 0.999) -> float:
    """The q-quantile of the held-out false-positive rate under the conformal threshold.

    With k = ceil((1 − fpr)(n_cal + 1)), the true FPR is Beta(n_cal + 1 − k, k) distributed,
    and the count on n_test clean examples is beta-binomial.
    """
    import math

    k = math.ceil((1 - fpr) * (n_cal + 1))
    return stats.betabinom(n_test, n_cal + 1 - k, k).ppf(q) / n_test


@pytest.mark.parametrize("name", ["kde", "bayes-uncertainty", "magnet", "mrr"])
def test_threshold_respects_fpr_on_held_out_clean_data(name, setup):
    det = fitted(name, setup)
    assert det.fpr == 0.1 and det.calibrated
    flagged = det.detect(setup["x"]).is_adv.float().mean().item()
    assert flagged <= fpr_bound(150, len(setup["y"]), 0.1), f"{name}: {flagged:.3f} of clean test flagged"
    assert det.calibration["fpr_calibration"] <= 0.1


def test_detect_returns_a_detection(setup):
    det = fitted("kde", setup)
    out = det.detect(setup["x_adv"][:20])
    assert isinstance(out, Detection) and out.is_adv.dtype == torch.bool and out.score.shape == (20,)
    assert torch.equal(out.is_adv, out.score > det.threshold) and out.info["fpr"] == 0.1


# --------------------------------------------------------------------------- MRR
def test_mrr_is_unsupervised_and_outputs_a_risk(setup, monkeypatch):
    import bastion.attacks.base as ab

    def no_attacks(*a, **k):
        raise AssertionError("MRR.fit ran an attack")

    monkeypatch.setattr(ab.Attack, "__call__", no_attacks)
    m = setup["model"]
    det1 = MRR(n=1, epochs=20).fit(m, setup["x_fit"], setup["y_fit"])
    det4 = fitted("mrr", setup)
    assert det1.fit_info["adversarial_examples_used"] == 0
    noise = torch.rand(30, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for x in (setup["x"], setup["x_adv"], noise):
        r = det4.risk(x)
        assert r.shape == (x.shape[0],) and float(r.min()) >= 0.0 and float(r.max()) <= 1.0
    a1, a4 = auc_vs_fgsm(det1, setup), auc_vs_fgsm(det4, setup)
    assert a1 > 0.8 and a4 > a1 - 0.05
    # the N defenders differ (their own initializations and centres)
    _, u = det4.defender_values(setup["x"][:50])
    assert u.shape == (50, 4) and not torch.allclose(u[:, 0], u[:, 1])


def test_mrr_on_several_layers(setup):
    """Defenders spread round-robin over the penultimate layer and the pixels, read in one forward pass."""
    m = setup["model"]
    det = MRR(n=3, layer=[None, "input"], combine="logit", epochs=20).fit(m, setup["x_fit"], setup["y_fit"])
    det.calibrate(setup["x_val"], 0.1)
    assert det.fit_info["defenders_per_layer"] == [2, 1] and det.fit_info["layers"][1] == "input"
    assert det.fit_info["adversarial_examples_used"] == 0
    x = torch.cat([setup["x"][:60], setup["x_adv"][:60]])
    a, u = det.defender_values(x)
    assert a.shape == u.shape == (120, 3)
    # the logit rule: the sigmoid of the mean log-odds of the defenders' CDF values
    expected = torch.sigmoid(torch.logit(u.clamp(1e-6, 1 - 1e-6)).mean(1))
    assert torch.allclose(det.risk(x), expected)
    # the pixel defender sees what the penultimate ones see (its own column, its own values)
    assert not torch.allclose(u[:, 2], u[:, 0])
    assert auc_vs_fgsm(det, setup) > 0.8
    terms = det.adaptive_terms(x)
    assert terms.shape == (120, 3)
    assert not ((terms <= 0).all(1) & det.detect(x).is_adv).any()  # all fooled => under the threshold
    # N = 1 uses the first listed layer only
    one = MRR(n=1, layer=[None, "input"], epochs=2).fit(m, setup["x_fit"], setup["y_fit"])
    assert one.fit_info["defenders_per_layer"] == [1]
    with pytest.raises(ValueError, match="`layer`"):
        MRR(layer=[])
    with pytest.raises(ValueError, match="`layer`"):
        MRR(layer=[None, 3])


def test_mrr_without_defenders_flags_nothing(setup):
    det = MRR(n=0).fit(setup["model"], setup["x_fit"], setup["y_fit"])
    det.calibrate(setup["x_val"], 0.05)
    assert not det.detect(setup["x_adv"]).is_adv.any()
    assert det.adaptive_terms(setup["x"][:5]).shape == (5, 0)
    assert torch.equal(det.adaptive_loss(setup["x"][:5]), torch.zeros(5))


def test_mrr_margins_agree_with_detection(setup):
    det = fitted("mrr", setup)
    x = torch.cat([setup["x"][:60], setup["x_adv"][:60]])
    terms = det.adaptive_terms(x)
    passes_all = (terms <= 0).all(1)
    flagged = det.detect(x).is_adv
    assert passes_all.any() and flagged.any()
    assert not (passes_all & flagged).any()  # all defenders fooled => the risk is under the threshold


# --------------------------------------------------------------------------- single detectors
def test_bayes_uncertainty_seed_and_created_dropout(setup):
    det = fitted("bayes-uncertainty", setup)
    assert det.fit_info["created_dropout"] is False and det.rate == 0.25  # cnn-small's own net.dropout
    x = setup["x"][:16]
    a = BayesianUncertainty(seed=3).fit(setup["model"], setup["x_fit"][:50], setup["y_fit"][:50]).scores(x)
    b = BayesianUncertainty(seed=3).fit(setup["model"], setup["x_fit"][:50], setup["y_fit"][:50]).scores(x)
    assert torch.equal(a, b)
    # TinyCNN has no dropout (and needs no training for this): head mode creates it (p = 0.5), mode 'all' refuses
    torch.manual_seed(0)
    bare = TinyCNN().eval()
    bu = BayesianUncertainty(passes=10).fit(bare, setup["x_fit"][:50], setup["y_fit"][:50])
    assert bu.fit_info["created_dropout"] is True and bu.rate == 0.5
    assert float(bu.scores(x).max()) > 0
    with pytest.raises(ValueError, match="needs a model with dropout"):
        BayesianUncertainty(mode="all").fit(bare, setup["x_fit"][:50], setup["y_fit"][:50])
    allmode = BayesianUncertainty(mode="all", passes=8, seed=0)
    allmode.fit(setup["model"], setup["x_fit"][:50], setup["y_fit"][:50])
    assert allmode.scores(x).shape == (16,)
    assert not setup["model"].training  # the model's dropout modules were put back


def test_even_median_matches_scipy_and_squeezing_uses_bpda(setup):
    from scipy.ndimage import median_filter

    x = torch.rand(3, 2, 7, 6, generator=torch.Generator().manual_seed(1))
    ours = EvenMedian(2)(x)
    ref = median_filter(x.numpy(), size=(1, 1, 2, 2), mode="nearest")
    assert torch.allclose(ours, torch.from_numpy(ref))
    det = fitted("feature-squeeze", setup)
    xg = setup["x"][:8].clone().requires_grad_(True)
    (g_adaptive,) = torch.autograd.grad(det.adaptive_score(xg).sum(), [xg])
    assert torch.allclose(det.adaptive_score(xg).detach(), det.score(xg).detach())  # same forward value
    assert float(g_adaptive.abs().sum()) > 0


def test_metzen_dynamic_adversary(setup):
    m = setup["model"]
    x, y = setup["x_fit"][:150], setup["y_fit"][:150]
    det = Metzen(attack="fgsm", threat="linf:0.15", dynamic=True, epochs=2, dynamic_steps=3).fit(m, x, y)
    assert det.fit_info["dynamic"] and len(det.fit_info["train_bce"]) == 2
    sig = torch.linspace(0, 1, 20)
    adv = dynamic_bim(m, det, x[:20], y[:20], 0.15, sig, steps=3)
    assert float((adv - x[:20]).abs().max()) <= 0.15 + 1e-6 and float(adv.min()) >= 0 and float(adv.max()) <= 1
    conv = Metzen(layer="net.features.7", attack="fgsm", threat="linf:0.15", epochs=3).fit(m, x, y)
    assert conv.fit_info["activation_shape"][0] == 64 and conv.scores(setup["x"][:5]).shape == (5,)


def test_magnet_components_and_pipeline(setup):
    det = fitted("magnet", setup)
    assert det.components == ["recon-l1", "jsd-T10", "jsd-T40"]
    cal = det.calibration
    assert cal["fpr_per_component"] == pytest.approx(0.1 / 3) and det.threshold == 1.0
    terms = det.adaptive_terms(setup["x_adv"][:10])
    assert terms.shape == (10, 3)
    assert torch.equal((terms > 0).any(1), det.detect(setup["x_adv"][:10]).is_adv)  # any component over => flagged
    pipe = magnet_defense(det)
    assert isinstance(pipe, Defended) and pipe.detector is det
    assert pipe(setup["x"][:4]).shape == (4, 10)


def test_layer_tap_and_hashes(setup):
    m = setup["model"]
    x = setup["x"][:4]
    logits, h = LayerTap()(m, x)
    assert h.shape == (4, 128) and torch.allclose(m.net.head(h), logits)
    _, conv = LayerTap("net.features.7")(m, x)
    assert conv.shape[1] == 64 and conv.dim() == 4
    _, img = LayerTap("input")(m, x)
    assert img is x
    with pytest.raises(ValueError, match="not a submodule"):
        LayerTap("net.nope")(m, x)
    assert example_hashes(x) == example_hashes(x.clone())
    assert example_hashes(x)[0] != example_hashes(x + 1e-6)[0]


# --------------------------------------------------------------------------- adaptive attacks
def test_detector_aware_pgd_evades_kde(setup):
    det = fitted("kde", setup)
    m, x, y = setup["model"], setup["x"][:80], setup["y"][:80]
    plain = create_attack("pgd", steps=20)(m, x, y, f"linf:{EPS}", seed=0)
    aware = DetectorAwarePGD(detector=det, lam=2.0, steps=20)(m, x, y, f"linf:{EPS}", seed=0)
    rate_plain = det.detect(plain.x_adv).is_adv[plain.success].float().mean()
    rate_aware = det.detect(aware.x_adv).is_adv[aware.success].float().mean()
    assert plain.success.sum() >= 30 and aware.success.sum() >= 30
    assert rate_aware < rate_plain - 0.2, (float(rate_plain), float(rate_aware))
    # system view: more attacks succeed against classifier + detector
    ev_plain = (plain.success & ~det.detect(plain.x_adv).is_adv).float().mean()
    ev_aware = (aware.success & ~det.detect(aware.x_adv).is_adv).float().mean()
    assert ev_aware > ev_plain


def test_detector_aware_cw_against_all_mrr_defenders(setup):
    det = fitted("mrr", setup)
    m, x, y = setup["model"], setup["x"][:30], setup["y"][:30]
    kw = dict(binary_search_steps=3, max_iterations=40, initial_const=1.0)
    plain = DetectorAwareCW(**kw)(m, x, y, seed=0)
    aware = DetectorAwareCW(detector=det, combine="sum", det_kappa=0.1, **kw)(m, x, y, seed=0)
    assert aware.success.any()
    caught_plain = det.detect(plain.x_adv).is_adv[plain.success].float().mean()
    caught_aware = det.detect(aware.x_adv).is_adv[aware.success].float().mean()
    assert caught_aware < caught_plain
    assert float(caught_aware) <= 0.1


def test_detector_aware_attacks_need_a_calibrated_detector(setup):
    det = MRR(n=1, epochs=1).fit(setup["model"], setup["x_fit"][:100], setup["y_fit"][:100])
    with pytest.raises(ValueError, match="calibrate"):
        DetectorAwarePGD(detector=det, steps=1)(setup["model"], setup["x"][:2], setup["y"][:2], "linf:0.1")
    with pytest.raises(TypeError, match="`detector`"):
        DetectorAwarePGD(detector=object())
    with pytest.raises(ValueError, match="`combine`"):
        DetectorAwareCW(combine="mean")
    assert DetectorAwarePGD(detector=det).config()["detector"]["name"] == "mrr"


# --------------------------------------------------------------------------- errors
def test_errors_name_the_argument(setup):
    m, x, y = setup["model"], setup["x_fit"][:40], setup["y_fit"][:40]
    det = KernelDensity()
    with pytest.raises(NotFittedError, match="not fitted"):
        det.score(x)
    with pytest.raises(NotFittedError, match="not fitted"):
        det.calibrate(x, 0.1)
    det.fit(m, x, y)
    with pytest.raises(NotFittedError, match="calibrate"):
        det.detect(x)
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="`fpr`"):
            det.calibrate(setup["x_val"], bad)
    with pytest.raises(TypeError, match="`fpr`"):
        det.calibrate(setup["x_val"], "5%")
    with pytest.raises(ValueError, match="too few"):
        det.calibrate(setup["x_val"][:10], 0.01)
    with pytest.raises(ValueError, match="fit on"):
        det.calibrate(x, 0.1)
    with pytest.raises(ValueError, match="`x`"):
        det.score(x[:, 0])  # N×H×W: wrong shape
    with pytest.raises(ValueError, match="`x`"):
        det.score(x * 2)  # outside [0, 1]
    with pytest.raises(ValueError, match="`y_clean`"):
        KernelDensity().fit(m, x, y[:5])
    with pytest.raises(TypeError, match="`model`"):
        KernelDensity().fit(lambda t: t, x, y)
    with pytest.raises(ValueError, match="`x_adv`"):
        Metzen().fit(m, x, y, x_adv=torch.rand(5, 1, 4, 4))
    with pytest.raises(ValueError, match="`n`"):
        MRR(n=-1)
    with pytest.raises(ValueError, match="`combine`"):
        MRR(combine="vote")
    with pytest.raises(ValueError, match="`holdout`"):
        MRR(holdout=1.0)
    with pytest.raises(ValueError, match="`bandwidth`"):
        KernelDensity(bandwidth=-1.0)
    with pytest.raises(ValueError, match="`bandwidth`"):
        KernelDensity(bandwidth="wide")
    with pytest.raises(ValueError, match="`passes`"):
        BayesianUncertainty(passes=1)
    with pytest.raises(ValueError, match="`mode`"):
        BayesianUncertainty(mode="some")
    with pytest.raises(ValueError, match="`p`"):
        BayesianUncertainty(p=1.0)
    with pytest.raises(ValueError, match="`dynamic=True` needs an linf"):
        Metzen(dynamic=True, threat="l2:1.0")
    with pytest.raises(ValueError, match="`sigma`"):
        Metzen(sigma=2.0)
    with pytest.raises(ValueError, match="`squeezers`"):
        FeatureSqueeze(squeezers=[])
    with pytest.raises(ValueError, match="both empty"):
        MagNetDetector(norms=[], temperatures=[])
    with pytest.raises(ValueError, match="`size`"):
        EvenMedian(3)
    with pytest.raises(ValueError, match="needs at least"):
        MRR(n=1).fit(m, x[:15], y[:15])
    with pytest.raises(ValueError, match="`layer`"):
        KernelDensity(layer="net.missing").fit(m, x, y)
    with pytest.raises(ValueError, match="no nn.Linear"):
        LayerTap().resolve(TinyCNN().features)


@pytest.mark.parametrize("abort_early", [True, False])
def test_detector_aware_cw_without_a_detector_is_plain_cw(abort_early):
    """With no detector the detector-aware C&W is the very same optimizer as `CW` (same Adam,
    binary search, early abort and success rule), so its distortion is the reference that the
    detector's extra cost is measured against (the "normalized L2" of the detection tables)."""
    from bastion.attacks.cw import CW
    from bastion.attacks.detector_aware import DetectorAwareCW
    from bastion.models import create_model

    torch.manual_seed(0)
    model = create_model("mlp", 10, (1, 8, 8), hidden=(32,)).eval()
    x = torch.rand(16, 1, 8, 8)
    y = model(x).argmax(1)
    y[:3] = (y[:3] + 1) % 10  # three already misclassified: both return them (within 1e-6)
    kw = dict(binary_search_steps=4, max_iterations=60, initial_const=0.1, learning_rate=0.05, abort_early=abort_early)
    plain = CW(**kw)(model, x, y, seed=0).x_adv
    aware = DetectorAwareCW(**kw)(model, x, y, seed=0).x_adv
    assert torch.allclose(plain, aware, atol=1e-5)
    assert (plain - x).flatten(1).norm(dim=1)[3:].gt(0).all()  # the rest really were attacked
