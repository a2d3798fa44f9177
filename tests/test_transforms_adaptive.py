"""The literature's pattern, reproduced on the digits model: naive attacks fail, adaptive ones don't.

A gradient attack straight through a non-differentiable input transformation (bit depth,
median filter, JPEG) sees a zero gradient and leaves robust accuracy near the clean accuracy;
the same attack through `Defended.adaptive_view()` (BPDA) breaks the defense (Athalye, Carlini
& Wagner 2018). Likewise, hiding the logits behind label-only outputs stops gradient attacks
only until the attacker attacks the logits underneath.

The numbers are robust accuracies of the *real* pipeline on the adaptive attack's points.
8×8 digits are coarse: eps = 0.2 in L∞ (about 3 of the 16 grey levels) is the budget.
"""

from __future__ import annotations

import pytest
import torch

from bastion.attacks import create_attack, logits_and_grad
from bastion.attacks.losses import get_loss
from bastion.defenses.output import LabelOnly, RoundedProbs
from bastion.defenses.pipeline import Defended
from bastion.defenses.transforms import create_transform

N = 48
THREAT = "linf:0.2"


@pytest.fixture(scope="module")
def batch(digits):
    return digits["x_test"][:N], digits["y_test"][:N]


def _acc(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _naive_and_adaptive(defended: Defended, x, y, steps: int = 10) -> tuple[float, float, float]:
    """Clean, naive-PGD and adaptive-PGD robust accuracies of the real pipeline."""
    pgd = create_attack("pgd", steps=steps)
    naive = pgd(defended, x, y, THREAT, seed=0)
    adaptive = pgd(defended.adaptive_view(), x, y, THREAT, seed=0)
    return _acc(defended, x, y), _acc(defended, naive.x_adv, y), _acc(defended, adaptive.x_adv, y)


@pytest.mark.parametrize("spec", ["bit-depth:bits=2", "bit-depth:bits=3", "median:size=3", "jpeg:quality=75"])
def test_bpda_breaks_what_naive_pgd_cannot(spec, digits_model, batch):
    x, y = batch
    defended = Defended([create_transform(spec)], digits_model)
    clean, naive, adaptive = _naive_and_adaptive(defended, x, y)
    assert clean >= 0.75  # the defense keeps the model usable (median 3×3 costs most on 8×8 digits)
    assert naive >= clean - 0.15  # zero gradients: PGD barely moves beyond its random start
    assert adaptive <= naive - 0.4  # the adaptive attack breaks it
    assert adaptive <= 0.4


def test_the_naive_gradient_is_exactly_zero(digits_model, batch):
    """What the obfuscated-gradient checks look for: a zero input gradient through the defense."""
    x, y = batch
    for spec in ("bit-depth:bits=3", "median", "jpeg", "tvm", "shield", "bart:k=2"):
        defended = Defended([create_transform(spec)], digits_model)
        _, _, grad = logits_and_grad(defended, x[:8], y[:8], get_loss("ce"))
        assert torch.count_nonzero(grad) == 0, spec
        _, _, grad = logits_and_grad(defended.adaptive_view(), x[:8], y[:8], get_loss("ce"))
        assert torch.count_nonzero(grad) > 0, spec


@pytest.mark.parametrize("output", [LabelOnly(), RoundedProbs(2)], ids=["label-only", "rounded-probs"])
def test_output_hardening_stops_gradient_attacks_but_not_the_adaptive_view(output, digits_model, batch):
    x, y = batch
    defended = Defended([], digits_model, output=output)
    clean, naive, adaptive = _naive_and_adaptive(defended, x, y)
    assert clean == _acc(digits_model, x, y)  # the decision is unchanged
    assert naive >= clean - 0.15
    assert adaptive <= 0.3 and adaptive <= naive - 0.5


@pytest.mark.slow
def test_differentiable_jpeg_stand_in_also_breaks_jpeg(digits_model, batch):
    x, y = batch
    defended = Defended([create_transform("jpeg:quality=75,bpda=approx")], digits_model)
    clean, naive, adaptive = _naive_and_adaptive(defended, x, y, steps=20)
    assert adaptive <= naive - 0.4


@pytest.mark.slow
def test_eot_and_bpda_break_shield(digits_model, batch):
    from bastion.attacks.adaptive import EOT

    x, y = batch
    torch.manual_seed(0)
    defended = Defended([create_transform("shield:block=4")], digits_model)
    pgd = create_attack("pgd", steps=20)
    naive = pgd(defended, x, y, THREAT, seed=0)
    adaptive = pgd(EOT(defended.adaptive_view(), n=8), x, y, THREAT, seed=0)
    clean = sum(_acc(defended, x, y) for _ in range(4)) / 4
    naive_acc = sum(_acc(defended, naive.x_adv, y) for _ in range(4)) / 4
    adaptive_acc = sum(_acc(defended, adaptive.x_adv, y) for _ in range(4)) / 4
    assert naive_acc >= clean - 0.15
    assert adaptive_acc <= naive_acc - 0.4


def test_vaccinated_shield_ensemble(digits_model, digits):
    from bastion.defenses.layers import Ensemble
    from bastion.defenses.transforms.shield import shield_defense, vaccinate

    x, y = digits["x_train"][:400], digits["y_train"][:400]
    before = [p.clone() for p in digits_model.parameters()]
    ens = vaccinate(digits_model, x, y, qualities=(30, 70), epochs=1, seed=0)
    assert isinstance(ens, Ensemble) and len(ens.members) == 2
    assert all(torch.equal(a, b) for a, b in zip(before, digits_model.parameters()))  # original untouched
    assert any(not torch.equal(a, b) for a, b in zip(before, ens.members[0].parameters()))  # copies trained
    d = shield_defense(ens, qualities=(30, 70), block=4, seed=0)
    assert d.randomized and _acc(d, digits["x_test"][:100], digits["y_test"][:100]) >= 0.8


def test_adaptive_view_routes_through_a_non_differentiable_model():
    """A majority-vote ensemble as the model: the adaptive view must still give gradients (its bpda)."""
    import torch
    from torch import nn

    from bastion.defenses.layers import Ensemble
    from bastion.defenses.pipeline import Defended

    torch.manual_seed(0)
    members = [nn.Sequential(nn.Flatten(), nn.Linear(16, 3)) for _ in range(3)]
    d = Defended([], Ensemble(members, mode="vote"))
    x = torch.rand(4, 1, 4, 4, requires_grad=True)
    g_naive = torch.autograd.grad(d(x).sum() + 0 * x.sum(), x, allow_unused=True)[0]
    y = d.adaptive_view()(x)
    assert torch.allclose(y.detach(), d(x).detach(), atol=1e-5)
    g = torch.autograd.grad(y[:, 0].sum(), x)[0]
    assert (g_naive is None or g_naive.abs().sum() == 0) and g.abs().sum() > 0


def test_transform_options_accept_lists():
    from bastion.defenses.transforms import create_transform

    assert create_transform("shield:qualities=[30,90],block=4").config()["qualities"] == [30, 90]
