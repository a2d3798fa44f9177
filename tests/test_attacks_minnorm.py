"""Minimum-norm and saliency attacks: C&W L2, DeepFool, JSMA and L-BFGS.

Strength is checked on the session's `digits_model` with few examples and cheap settings;
correctness is checked where the answer is known exactly (a linear two-class model, whose
nearest boundary point is analytic) and against scipy's L-BFGS-B.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from bastion.attacks import AttackResult, create_attack
from bastion.attacks.cw import CW
from bastion.attacks.deepfool import DeepFool, logit_gradients
from bastion.attacks.jsma import JSMA
from bastion.attacks.lbfgs import LBFGS, projected_lbfgs
from bastion.threat import ThreatModel

N = 24  # test images per strength check (first N of the digits test split)

# cheap settings that keep each attack strong on 8×8 digits (the defaults are the papers')
CW_FAST: dict[str, Any] = {"binary_search_steps": 5, "max_iterations": 200, "initial_const": 1.0,
                           "learning_rate": 0.05}
LBFGS_FAST: dict[str, Any] = {"binary_search_steps": 5, "max_iterations": 50, "initial_const": 1.0}



@pytest.fixture(scope="module")
def batch(digits) -> tuple[torch.Tensor, torch.Tensor]:
    return digits["x_test"][:N].clone(), digits["y_test"][:N].clone()


_cache: dict[str, AttackResult] = {}


@pytest.fixture(scope="module")
def runs(digits_model, batch):
    """Each attack run once on the batch (lazily), shared by the tests below."""
    x, y = batch

    def get(key: str) -> AttackResult:
        if key not in _cache:
            _cache[key] = {
                "deepfool": lambda: DeepFool()(digits_model, x, y, seed=0),
                "deepfool-linf": lambda: DeepFool()(digits_model, x, y, "linf:inf", seed=0),
                "cw": lambda: CW(**CW_FAST)(digits_model, x, y, seed=0),
                "lbfgs": lambda: LBFGS(**LBFGS_FAST)(digits_model, x, y, seed=0),
            }[key]()
        return _cache[key]

    return get


def _median(v: torch.Tensor) -> float:
    return float(v.median())


# --------------------------------------------------------------------------- exact answers
class Linear2(nn.Module):
    """z = W x + b with two classes: the nearest boundary point is known in closed form."""

    def __init__(self, d: int = 64, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc = nn.Linear(d, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(2, d, generator=g))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def linear_case() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A linear model, images near 0.5 (so the nearest boundary point is inside the box), the
    labels the model gives them, and each image's exact l2 distance to the boundary."""
    model = Linear2().eval()
    g = torch.Generator().manual_seed(1)
    x = (0.5 + 0.02 * torch.randn(8, 1, 8, 8, generator=g)).clamp(0, 1)
    with torch.no_grad():
        z = model(x)
    y = z.argmax(dim=1)
    w = model.fc.weight.detach()
    dist = (z[:, 0] - z[:, 1]).abs() / (w[0] - w[1]).norm()
    return model, x, y, dist


def test_deepfool_is_exact_on_a_linear_model(linear_case):
    model, x, y, dist = linear_case
    res = DeepFool(overshoot=0.02)(model, x, y)
    assert bool(res.success.all())
    # one step lands (distance + 1e-4) past the boundary along w, then the overshoot
    torch.testing.assert_close(res.norms["l2"], 1.02 * (dist + 1e-4), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", [
    lambda: CW(**CW_FAST),
    # L-BFGS's minimizer sits past the boundary by a margin that shrinks as c grows: its
    # precision is that of the search over c, so give it the default number of values
    lambda: LBFGS(binary_search_steps=10, max_iterations=50, initial_const=1.0, untargeted=True),
], ids=["cw", "lbfgs"])
def test_minimum_norm_attacks_find_the_nearest_boundary_of_a_linear_model(make, linear_case):
    model, x, y, dist = linear_case
    res = make()(model, x, y, seed=0)
    assert bool(res.success.all())
    ratio = res.norms["l2"] / dist
    # never below the true minimum (that would mean a wrong norm or a wrong success), and close
    assert bool((ratio >= 1 - 1e-4).all()), ratio
    assert bool((ratio <= 1.05).all()), ratio


def test_projected_lbfgs_matches_scipy_lbfgsb():
    from scipy.optimize import minimize

    g = torch.Generator().manual_seed(0)
    d, n = 20, 5
    w = torch.randn(3, d, generator=g, dtype=torch.float64)
    x = torch.rand(n, d, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 0, 1])
    c = torch.tensor([0.1, 0.5, 1.0, 2.0, 0.05], dtype=torch.float64)

    def fg(z: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = z.detach().requires_grad_(True)
        obj = c[rows] * (z - x[rows]).square().sum(1) + nn.functional.cross_entropy(z @ w.T, t[rows],
                                                                                   reduction="none")
        (grad,) = torch.autograd.grad(obj.sum(), [z])
        return obj.detach(), grad

    tight = {"max_iter": 500, "ftol": 1e-14, "pgtol": 1e-10}  # converge fully: compare minimizers
    ours = projected_lbfgs(fg, x.clone(), 0.0, 1.0, **tight)
    # rows 1 and 2 solved on their own take the same iterates
    part = projected_lbfgs(lambda z, rows: fg(z, rows + 1), x[1:3].clone(), 0.0, 1.0, **tight)
    torch.testing.assert_close(part, ours[1:3], rtol=0, atol=1e-12)
    assert bool(((ours == 0) | (ours == 1)).any()), "the box should be active somewhere in this problem"
    for i in range(n):
        row = torch.tensor([i])

        def fun(v: np.ndarray, row: torch.Tensor = row) -> tuple[float, np.ndarray]:
            f, gr = fg(torch.from_numpy(v).unsqueeze(0), row)
            return float(f[0]), gr[0].numpy()

        ref = minimize(fun, x[i].numpy(), jac=True, method="L-BFGS-B", bounds=[(0.0, 1.0)] * d,
                       options={"ftol": 1e-14, "gtol": 1e-10})
        assert float(fg(ours[i:i + 1], row)[0]) <= ref.fun + 1e-7
        np.testing.assert_allclose(ours[i].numpy(), ref.x, atol=1e-5)


@pytest.mark.parametrize("batched", [False, True], ids=["loop", "vmap"])
def test_logit_gradients_match_one_backward_per_row(batched, digits_model, batch):
    x, _ = batch
    weights = torch.randn(3, x.shape[0], 10, generator=torch.Generator().manual_seed(0))
    logits, grads = logit_gradients(digits_model, x, weights, batched=batched)
    assert grads.shape == (3, *x.shape)
    for m in range(3):
        xg = x.clone().requires_grad_(True)
        (ref,) = torch.autograd.grad((digits_model(xg) * weights[m]).sum(), [xg])
        torch.testing.assert_close(grads[m], ref)
    torch.testing.assert_close(logits, digits_model(x))


class _Opaque(torch.autograd.Function):
    """A custom autograd op vmap cannot batch (no vmap rule): exercises the loop fallback."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        # a trip through numpy: fine in a plain backward pass, impossible under vmap
        return torch.from_numpy(g.detach().numpy() * 2)


def test_logit_gradients_fall_back_when_vmap_cannot(digits_model, batch):
    x, _ = batch
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    weights = torch.randn(2, x.shape[0], 10)

    class Wrapped(nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return model(_Opaque.apply(t))

    _, grads = logit_gradients(Wrapped(), x, weights, batched=True)
    expected = torch.stack([2 * (weights[m] @ model[1].weight).view_as(x) for m in range(2)])
    torch.testing.assert_close(grads, expected.detach())


# --------------------------------------------------------------------------- strength on digits
def test_deepfool_breaks_everything(runs):
    assert runs("deepfool").success_rate >= 0.95


def test_deepfool_linf_variant(runs):
    res, l2 = runs("deepfool-linf"), runs("deepfool")
    assert res.success_rate >= 0.95
    both = res.success & l2.success
    # each variant is the smaller in its own norm
    assert _median(res.norms["linf"][both]) < _median(l2.norms["linf"][both])
    assert _median(l2.norms["l2"][both]) < _median(res.norms["l2"][both])


def test_cw_breaks_everything(runs):
    assert runs("cw").success_rate >= 0.95


def _fgm_minimal_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per example, the l2 norm of FGM's first success on a grid of eps (inf if none)."""
    fgm = create_attack("fgm")
    out = torch.full((x.shape[0],), math.inf)
    for eps in np.arange(0.1, 4.01, 0.05):
        res = fgm(model, x, y, ThreatModel("l2", float(eps)))
        new = res.success & torch.isinf(out)
        out[new] = res.norms["l2"][new]
    return out


def test_cw_finds_smaller_perturbations_than_deepfool_and_fgm(runs, digits_model, batch):
    x, y = batch
    cw, df = runs("cw"), runs("deepfool")
    fgm = _fgm_minimal_l2(digits_model, x, y)
    both = cw.success & df.success & torch.isfinite(fgm)
    assert int(both.sum()) >= N * 0.8
    m_cw, m_df, m_fgm = (_median(v[both]) for v in (cw.norms["l2"], df.norms["l2"], fgm))
    assert m_cw < m_df < m_fgm, (m_cw, m_df, m_fgm)


def test_cw_targeted_reaches_the_target(digits_model, batch):
    x, y = batch
    x, y = x[:12], y[:12]
    targets = (y + 3) % 10
    res = CW(**CW_FAST)(digits_model, x, y, targets=targets, seed=0)
    assert torch.equal(res.success, res.adv_pred == targets)
    assert res.success_rate >= 0.9


def test_cw_kappa_buys_a_margin(digits_model, batch):
    x, y = batch
    x, y = x[:8], y[:8]
    res = CW(**CW_FAST, kappa=5.0)(digits_model, x, y, seed=0)
    with torch.no_grad():
        z = digits_model(res.x_adv)
    true = z.gather(1, y.unsqueeze(1)).squeeze(1)
    other = z.scatter(1, y.unsqueeze(1), -math.inf).amax(1)
    assert bool((other[res.success] - true[res.success] >= 5.0 - 1e-3).all())
    assert res.success_rate >= 0.75


def test_jsma_targeted_within_gamma(digits_model, batch):
    x, y = batch
    targets = (y + 1) % 10
    res = JSMA(gamma=0.4)(digits_model, x, y, targets=targets, seed=0)
    assert torch.equal(res.success, res.adv_pred == targets)
    assert res.success_rate >= 0.8
    assert float(res.norms["l0"].max()) <= math.floor(0.4 * 64)
    assert bool((res.x_adv >= x).all()), "theta > 0 only increases features"


def test_jsma_default_gamma_and_decreasing_features(digits_model, batch):
    x, y = batch
    x, y = x[:12], y[:12]
    res = JSMA()(digits_model, x, y, seed=0)  # random targets, untargeted success
    assert float(res.norms["l0"].max()) <= math.floor(0.1 * 64)
    assert res.success.sum() > 0
    dec = JSMA(theta=-1.0, gamma=0.2)(digits_model, x, y, targets=(y + 1) % 10, seed=0)
    assert bool((dec.x_adv <= x).all())
    assert float(dec.norms["l0"].max()) <= math.floor(0.2 * 64)
    assert dec.success.sum() > 0


def test_jsma_finite_l0_budget(digits_model, batch):
    x, y = batch
    x, y = x[:12], y[:12]
    res = JSMA(gamma=0.5)(digits_model, x, y, "l0:4", targets=(y + 1) % 10, seed=0)
    assert float(res.norms["l0"].max()) <= 4


def test_lbfgs_reaches_random_targets(runs):
    assert runs("lbfgs").success_rate >= 0.8


def test_lbfgs_untargeted(digits_model, batch):
    x, y = batch
    x, y = x[:12], y[:12]
    res = LBFGS(**LBFGS_FAST, untargeted=True)(digits_model, x, y, seed=0)
    assert res.success_rate >= 0.8
    assert bool((res.x_adv >= 0).all() and (res.x_adv <= 1).all())


# --------------------------------------------------------------------------- finite budgets
@pytest.mark.parametrize("key", ["cw", "deepfool", "lbfgs"])
def test_finite_threat_keeps_results_inside_and_claims_success_only_inside(key, runs, digits_model, batch):
    x, y = batch
    threat = ThreatModel("l2", 0.5)
    attack = {"cw": CW(**CW_FAST), "deepfool": DeepFool(), "lbfgs": LBFGS(**LBFGS_FAST)}[key]
    free = runs(key)
    res = attack(digits_model, x, y, threat, seed=0)
    assert bool(threat.contains(res.x_adv, x).all())
    assert bool((res.norms["l2"][res.success] <= 0.5 + 1e-6).all())
    # the search runs unbounded: within budget the result is the same, beyond it is x
    inside = free.norms["l2"] <= 0.5
    assert torch.equal(res.success, free.success & inside)
    assert torch.equal(res.x_adv[~inside], x[~inside])
    assert 0 < int(res.success.sum()) < N


# --------------------------------------------------------------------------- hyper-parameters
@pytest.mark.parametrize("cls,kwargs,field,exc", [
    (CW, {"binary_search_steps": 0}, "binary_search_steps", ValueError),
    (CW, {"max_iterations": 1.5}, "max_iterations", TypeError),
    (CW, {"initial_const": 0.0}, "initial_const", ValueError),
    (CW, {"learning_rate": -1.0}, "learning_rate", ValueError),
    (CW, {"kappa": -0.1}, "kappa", ValueError),
    (CW, {"abort_early": 1}, "abort_early", TypeError),
    (DeepFool, {"steps": 0}, "steps", ValueError),
    (DeepFool, {"overshoot": -0.01}, "overshoot", ValueError),
    (DeepFool, {"num_classes": 1}, "num_classes", ValueError),
    (DeepFool, {"num_classes": 2.0}, "num_classes", TypeError),
    (JSMA, {"theta": 0.0}, "theta", ValueError),
    (JSMA, {"theta": 1.5}, "theta", ValueError),
    (JSMA, {"gamma": 0.0}, "gamma", ValueError),
    (JSMA, {"gamma": 2.0}, "gamma", ValueError),
    (JSMA, {"gamma": "0.1"}, "gamma", TypeError),
    (LBFGS, {"binary_search_steps": -1}, "binary_search_steps", ValueError),
    (LBFGS, {"max_iterations": 0}, "max_iterations", ValueError),
    (LBFGS, {"initial_const": math.inf}, "initial_const", ValueError),
    (LBFGS, {"history": 0}, "history", ValueError),
    (LBFGS, {"untargeted": "yes"}, "untargeted", TypeError),
])
def test_bad_hyperparameters_name_the_field(cls, kwargs, field, exc):
    with pytest.raises(exc, match=f"`{field}`"):
        cls(**kwargs)


def test_deepfool_is_untargeted_only(digits_model, batch):
    x, y = batch
    with pytest.raises(ValueError, match="`targets`"):
        DeepFool()(digits_model, x[:2], y[:2], targets=(y[:2] + 1) % 10)
    with pytest.raises(ValueError, match="`threat`"):
        JSMA()(digits_model, x[:2], y[:2], "l2:1.0")
