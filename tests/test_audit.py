"""`bastion.audit`: the adaptive attack read from the declarations, the gradient-masking checks that
fire on a masked defense and stay quiet on honest models, the report's JSON and HTML.

Models: TinyCNNs on scikit-learn's 8×8 digits (conftest), one normally trained, one trained
with PGD (built here, a few seconds). The masked defense is a 1-bit input quantization
(`bit-depth:bits=1`): its gradient is exactly zero, so naive attacks look helpless.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch
from torch import nn

from bastion import AuditReport, audit
from bastion.attacks import create_attack
from bastion.attacks.adaptive import EOT
from bastion.defenses.detectors import create_detector
from bastion.defenses.layers import Ensemble
from bastion.defenses.output import LabelOnly
from bastion.defenses.pipeline import Defended
from bastion.defenses.transforms import create_transform
from bastion.evaluation import AuditBudget, adaptive_plan
from bastion.evaluation.audit_report import AUDIT_SCHEMA, decode_examples

from conftest import TinyCNN

# A small budget for the tests that are about plumbing, not about the checks' calibration.
TINY = AuditBudget("tiny", steps=10, square_queries=60, check_n=40, random_samples=6, unbounded_steps=10,
                   curve=(0.5, 1.0, 2.0), conv_steps=(5, 10), conv_restarts=2, hist_examples=4, hist_starts=3,
                   eot=4, passes=3)



@pytest.fixture(scope="module")
def test_data(digits):
    return digits["x_test"], digits["y_test"]


@pytest.fixture(scope="module")
def masked_report(digits_model, test_data):
    """1-bit quantization in front of the digits model, at L∞ 0.2, quick budget."""
    target = Defended([create_transform("bit-depth:bits=1")], digits_model)
    return audit(target, test_data, "linf:0.2", n=100, budget="quick", progress=False)


@pytest.fixture(scope="module")
def clean_report(digits_model, test_data):
    return audit(digits_model, test_data, "linf:0.1", n=100, budget="quick", progress=False)


@pytest.fixture(scope="module")
def at_model(digits):
    """PGD adversarial training (Madry et al. 2018) of a TinyCNN at L∞ 0.1, PGD-3 inner steps, 10 epochs."""
    torch.manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = digits["x_train"], digits["y_train"]
    pgd = create_attack("pgd", steps=3, early_stop=False)
    g = torch.Generator().manual_seed(0)
    for epoch in range(10):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 128):
            idx = perm[i:i + 128]
            x_adv = pgd(model, x[idx], y[idx], "linf:0.1", seed=epoch * 100 + i).x_adv
            model.train()
            loss = nn.functional.cross_entropy(model(x_adv), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def warnings_of(report: AuditReport, view: str) -> set[str]:
    return {c.name for c in report.warnings(view)}


# --------------------------------------------------------------------------- the adaptive plan
def test_plan_reads_bpda_from_the_declarations(digits_model):
    plan = adaptive_plan(Defended([create_transform("jpeg:quality=50,bpda=\"approx\""),
                                   create_transform("bit-depth:bits=3")], digits_model))
    assert plan.choices[0] == "jpeg: not differentiable → BPDA (approx stand-in)"
    assert plan.choices[1] == "bit-depth: not differentiable → BPDA (identity)"
    assert plan.choices[2] == "classifier (TinyCNN): differentiable → its own gradient"
    assert not plan.same_as_naive and plan.eot is None and plan.passes == 1 and plan.detector is None
    assert plan.techniques == ["BPDA through jpeg", "BPDA through bit-depth"]


def test_plan_for_an_honest_model_changes_nothing(digits_model):
    plan = adaptive_plan(digits_model, probe=torch.rand(4, 1, 8, 8))
    assert plan.same_as_naive and plan.model is digits_model and not plan.randomized
    assert plan.choices == ["TinyCNN: differentiable → its own gradient"]


def test_plan_bpda_through_a_nested_module_by_hooks(digits_model, test_data):
    """A bare nn.Sequential with a declared non-differentiable layer: the naive gradient is zero,
    the adaptive one is not, and both give the same outputs."""
    net = nn.Sequential(create_transform("bit-depth:bits=1"), digits_model)
    plan = adaptive_plan(net)
    assert plan.choices == ["0 (bit-depth): not differentiable → BPDA (identity)"]
    x = test_data[0][:16].clone().requires_grad_(True)
    (g_naive,) = torch.autograd.grad(net(x).sum(), [x])
    (g_adapt,) = torch.autograd.grad(plan.model(x).sum(), [x])
    assert bool((g_naive == 0).all()) and float(g_adapt.abs().sum()) > 0
    with torch.no_grad():
        assert torch.equal(net(x), plan.model(x))
    assert not net._forward_hooks and not net[0]._forward_hooks  # the hooks live only during a call


def test_plan_eot_for_declared_and_for_observed_randomness(digits_model, test_data):
    plan = adaptive_plan(Defended([create_transform("gaussian-noise:sigma=0.2")], digits_model), eot=6, passes=5)
    assert isinstance(plan.model, EOT) and plan.model.n == 6 and plan.passes == 5 and plan.randomized
    assert "gaussian-noise: randomized → EOT over 6 draws per gradient" in plan.choices

    class Jitter(nn.Module):  # random, but declares nothing
        def forward(self, x):
            return (x + 0.2 * torch.randn_like(x)).clamp(0, 1)

    sneaky = nn.Sequential(Jitter(), digits_model)
    assert not adaptive_plan(sneaky).randomized  # declarations alone miss it ...
    plan = adaptive_plan(sneaky, probe=test_data[0][:8])  # ... two forward passes do not
    assert plan.randomized and plan.probe["observed"] and plan.probe["per_example"]
    assert any(c.startswith("randomness observed") for c in plan.choices)


def test_plan_output_hardening_ensemble_vote_and_detector(digits_model, digits):
    plan = adaptive_plan(Defended([], digits_model, output=LabelOnly()))
    assert plan.choices[-1] == ("label-only output: hides the logits (not differentiable) → attacked on the logits "
                                "underneath")
    vote = Ensemble([digits_model, TinyCNN().eval()], mode="vote")  # the plan reads declarations: no training needed
    plan = adaptive_plan(Defended([], vote))
    assert plan.choices == ["classifier (Ensemble): not differentiable → BPDA (Ensemble.bpda: a differentiable "
                            "stand-in for the vote: the log of the mean probability (\"probs\" mode))"]
    det = create_detector("kde").fit(digits_model, digits["x_train"][:400], digits["y_train"][:400])
    with pytest.raises(ValueError, match="calibrate"):
        adaptive_plan(Defended([], digits_model, detector=det))
    det.calibrate(digits["x_train"][400:600], 0.1)
    plan = adaptive_plan(Defended([], digits_model, detector=det))
    assert plan.choices[-1] == "kde detector: differentiable → detector-aware PGD (loss − λ·adaptive_loss)"
    assert plan.detector is det and not plan.same_as_naive


# --------------------------------------------------------------------------- the checks
def test_checks_fire_on_a_masked_defense(masked_report):
    r = masked_report
    print("\n" + r.table())
    assert r.naive_accuracy >= r.clean_accuracy - 0.1  # the false sense of security ...
    assert r.adaptive_accuracy <= r.naive_accuracy - 0.3  # ... that BPDA removes
    assert r.robust_accuracy <= r.adaptive_accuracy
    assert "relies on obfuscated gradients" in r.verdict and "BPDA through bit-depth" in r.verdict
    expected = {"naive_vs_adaptive", "zero_gradients", "unbounded_attack", "black_box_vs_white_box"}
    assert expected <= warnings_of(r, "naive")
    zero = r.check("zero_gradients", "naive").evidence
    assert zero["fraction_zero_gradient"] == 1.0  # exactly zero: a shattered gradient
    assert r.check("unbounded_attack", "naive").evidence["success_rate"] < 0.5
    assert r.check("unbounded_attack", "adaptive").evidence["success_rate"] == 1.0
    assert r.check("zero_gradients", "adaptive").status == "pass"
    assert r.adaptive["choices"][0] == "bit-depth: not differentiable → BPDA (identity)"


class Quantize(nn.Module):
    """round(4x)/4 with nothing declared: the audit cannot know to use BPDA."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 4) / 4


def test_undeclared_masking_is_flagged_on_the_reported_number(digits_model, test_data):
    """Without declarations the adaptive attack is the naive one; the checks still see the zero gradient and
    the verdict calls the number an upper bound instead of a robustness claim."""
    r = audit(nn.Sequential(Quantize(), digits_model), test_data, "linf:0.2", n=60, budget=TINY, progress=False)
    assert r.adaptive["same_as_naive"]
    assert {"zero_gradients", "unbounded_attack"} <= warnings_of(r, "adaptive")
    assert "signs of gradient masking" in r.verdict and "upper bound" in r.verdict


@pytest.mark.slow
def test_standard_budget_on_the_masked_defense(digits_model, test_data):
    r = audit(Defended([create_transform("bit-depth:bits=1")], digits_model), test_data, "linf:0.2", n=200,
              budget="standard", progress=False)
    assert [a["label"] for a in r.attacks][:6] == ["naive:fgsm", "naive:pgd", "naive:apgd", "adaptive:fgsm",
                                                   "adaptive:pgd", "adaptive:apgd"]
    assert "adaptive:apgd-t" in [a["label"] for a in r.attacks]
    assert "relies on obfuscated gradients" in r.verdict and r.convergence["steps"][-1][0] == 200


def test_checks_stay_quiet_on_a_normally_trained_model(clean_report):
    r = clean_report
    print("\n" + r.table())
    assert r.adaptive["same_as_naive"] and r.naive_accuracy == r.adaptive_accuracy
    assert r.warnings() == [], [c.message for c in r.warnings()]
    assert r.verdict.endswith("no sign of gradient masking")
    assert r.verdict.startswith(f"robust accuracy {100 * r.robust_accuracy:.1f}% at L∞ 0.1")
    assert r.check("unbounded_attack").evidence["success_rate"] == 1.0
    assert r.check("randomness").status == "pass"


def test_checks_stay_quiet_on_an_adversarially_trained_model(at_model, test_data):
    r = audit(at_model, test_data, "linf:0.1", n=100, budget="quick", progress=False)
    print("\n" + r.table())
    assert r.robust_accuracy >= 0.3  # adversarial training works on digits at this budget
    assert r.warnings() == [], [c.message for c in r.warnings()]
    assert "no sign of gradient masking" in r.verdict
    curve = [p["adaptive"] for p in r.curve]
    assert curve == sorted(curve, reverse=True) and curve[-1] < curve[0]


def test_randomized_defense_is_judged_on_every_pass(digits_model, test_data):
    target = Defended([create_transform("gaussian-noise:sigma=0.25")], digits_model)
    r = audit(target, test_data, "linf:0.1", n=40, budget=TINY, progress=False)
    assert r.adaptive["eot"] == 4 and r.adaptive["passes"] == 3 and r.adaptive["randomized"]
    assert "every pass" in r.adaptive["final_rule"]
    # correct on all of 3 passes is rarer than correct on one
    assert r.clean_accuracy_single_pass is not None and r.clean_accuracy <= r.clean_accuracy_single_pass
    assert r.check("randomness").status == "info"
    assert r.config["budget"]["eot"] == 4


class CoinFlip(nn.Module):
    """Declared randomized: each example's prediction is wrong with probability 1/2 on every call."""

    randomized = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model(x)
        flip = (torch.rand(x.shape[0], device=x.device) < 0.5).unsqueeze(1)
        return torch.where(flip, z.roll(1, dims=1), z)  # rolled logits: the arg-max moves to another class


def test_a_lucky_draw_never_counts(digits_model, test_data):
    """Right on one pass with probability 1/2, on all 3 passes with probability 1/8: the audit uses the latter."""
    r = audit(CoinFlip(digits_model), test_data, "linf:0.1", n=100, budget=TINY, progress=False)
    single, every = r.clean_accuracy_single_pass, r.clean_accuracy
    assert 0.3 <= single <= 0.7 and every <= 0.3 and every < single / 2
    assert r.robust_accuracy <= every
    assert r.check("randomness").status == "info" and "CoinFlip" in r.check("randomness").message


def test_detector_pipeline_adds_detector_aware_pgd(digits_model, digits, test_data):
    det = create_detector("kde").fit(digits_model, digits["x_train"][:400], digits["y_train"][:400])
    det.calibrate(digits["x_train"][400:700], 0.1)
    r = audit(Defended([], digits_model, detector=det), test_data, "linf:0.1", n=40, budget=TINY, progress=False)
    labels = [a["label"] for a in r.attacks]
    assert "adaptive:detector-pgd" in labels and "naive:pgd" in labels
    assert r.detector_fpr is not None and 0.0 <= r.detector_fpr <= 0.5
    assert r.adaptive["detector"]["name"] == "kde"
    acc = {a["label"]: a["accuracy"] for a in r.attacks}
    # broken = misclassified and not flagged: the attack that knows the detector breaks more than plain PGD
    assert acc["adaptive:detector-pgd"] < acc["naive:pgd"]
    assert r.robust_accuracy <= r.adaptive_accuracy <= acc["adaptive:detector-pgd"]


# --------------------------------------------------------------------------- the report
def test_report_json_round_trip(masked_report, tmp_path):
    r = masked_report
    path = r.save(tmp_path / "report.json")
    back = AuditReport.load(path)
    assert back == r and back.to_json() == r.to_json()
    d = r.to_dict()
    assert d["schema"] == AUDIT_SCHEMA
    assert len(d["per_example"]["robust"]) == r.n and sum(d["per_example"]["robust"]) == round(r.robust_accuracy * r.n)
    ex = decode_examples(d["examples"])
    assert ex["x"].shape == ex["x_adv"].shape and ex["x"].shape[1:] == (1, 8, 8)
    # the grid shows broken examples first, each within the threat
    assert float((ex["x_adv"] - ex["x"]).abs().amax()) <= 0.2 + 1e-3
    assert int((ex["adv_pred"] != ex["y"]).sum()) >= 1
    with pytest.raises(ValueError, match="not a Bastion audit report"):
        AuditReport.from_dict({**d, "schema": "bastion-report/1"})
    with pytest.raises(ValueError, match="unknown audit-report field"):
        AuditReport.from_dict({**d, "surprise": 1})


def test_html_is_self_contained_with_verdict_and_plots(masked_report):
    page = masked_report.to_html()
    assert "relies on obfuscated gradients" in page
    assert re.search(r'<div class="verdict [^"]+" id="verdict">naive ', page)
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert {a for a, _ in images} == {"security curve", "convergence", "loss histogram", "example grid"}
    assert all(len(b) > 1000 for _, b in images)
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing from the network


@pytest.mark.skipif(shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
                    reason="no headless Chromium on this machine (Debian package `chromium`)")
def test_html_verdict_is_displayed_by_a_browser(masked_report, tmp_path):
    path = masked_report.save_html(tmp_path / "report.html")
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    dom = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", path.as_uri()],
                         capture_output=True, text=True, timeout=60).stdout
    assert "relies on obfuscated gradients" in dom and 'id="verdict"' in dom


# --------------------------------------------------------------------------- errors
def test_errors_name_the_argument(digits_model, test_data):
    with pytest.raises(ValueError, match="`threat`"):
        audit(digits_model, test_data, "l0:3", progress=False)
    with pytest.raises(ValueError, match="`n`"):
        audit(digits_model, test_data, "linf:0.1", n=0, progress=False)
    with pytest.raises(ValueError, match="`budget`"):
        audit(digits_model, test_data, "linf:0.1", budget="thorough", progress=False)
    with pytest.raises(TypeError, match="`defended_or_model`"):
        audit(lambda x: x, test_data, "linf:0.1", progress=False)
    with pytest.raises(ValueError, match="`curve`"):
        AuditBudget("x", curve=(0.5, 2.0))
    with pytest.raises(ValueError, match="`eot`"):
        adaptive_plan(digits_model, eot=0)
