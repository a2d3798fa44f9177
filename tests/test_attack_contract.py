"""The contract every registered attack keeps, checked for each attack × norm it supports.

Parametrized over `list_attacks()`, so an attack added later is covered with no edit here. An
attack that is slow at its defaults gets cheap hyper-parameters in `FAST` (unknown names use
their defaults).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from bastion.attacks import ATTACKS, Attack, AttackResult, create_attack, list_attacks
from bastion.attacks import losses as L
from bastion.threat import ThreatModel
from conftest import _digits

# Cheap settings per attack for these tests (contract, not strength). Add your attack here if
# its defaults take more than a second or two on 32 digits.
FAST: dict[str, dict[str, Any]] = {
    "pgd": {"steps": 5},
    "bim": {"steps": 5},
    "mifgsm": {"steps": 5},
    "apgd": {"steps": 10},
    "apgd-t": {"steps": 10, "n_target_classes": 2},
    "cw": {"binary_search_steps": 3, "max_iterations": 60, "learning_rate": 0.05},
    "lbfgs": {"binary_search_steps": 3, "max_iterations": 30},
    "detector-cw": {"binary_search_steps": 2, "max_iterations": 20},
    "detector-pgd": {"steps": 5},
    "spsa": {"steps": 20, "nb_sample": 16, "lr": 0.02},
    "square": {"n_queries": 100},
    # A fixed seed set (not the attacked batch) makes the substitute independent of the batch, so
    # batch-then-slice agreement holds; the inner PGD makes its targeted transfer succeed.
    "substitute": {"rounds": 1, "epochs": 10, "seed_data": _digits()[0][:300],
                   "attack": "pgd", "attack_kwargs": {"steps": 10, "early_stop": False}},
}

# Radii per norm on 8×8 digits (64 coordinates): large enough that attacks do something.
EPS: dict[str, float] = {"linf": 0.1, "l2": 1.0, "l1": 4.0, "l0": 6}
N = 32


def make(name: str) -> Attack:
    return create_attack(name, **FAST.get(name, {}))


def threat_for(name: str, norm: str) -> ThreatModel:
    return ThreatModel(norm, EPS[norm])


CASES = [(name, norm) for name in list_attacks() for norm in ATTACKS.get(name).supports_norms if norm in EPS]
TARGETED = [c for c in CASES if ATTACKS.get(c[0]).supports_targeted]
MIN_NORM = [c for c in CASES if ATTACKS.get(c[0]).minimum_norm]


@pytest.fixture(scope="module")
def batch(digits) -> tuple[torch.Tensor, torch.Tensor]:
    return digits["x_test"][:N].clone(), digits["y_test"][:N].clone()


def observed_call(attack: Attack, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                  **kw: Any) -> tuple[AttackResult, dict[str, bool]]:
    """Call the attack on a model put in train mode with trainable parameters; record what it left."""
    x0, y0 = x.clone(), y.clone()
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None  # training left gradients behind; the attack must not write new ones
    try:
        res = attack(model, x, y, threat, **kw)
        seen = {
            "x_unchanged": torch.equal(x, x0),
            "y_unchanged": torch.equal(y, y0),
            "mode_restored": all(m.training for m in model.modules()),
            "requires_grad_restored": all(p.requires_grad for p in model.parameters()),
            "no_param_grad": all(p.grad is None for p in model.parameters()),
        }
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
    return res, seen


_cache: dict[tuple, tuple[AttackResult, dict[str, bool]]] = {}


def run_cached(name: str, norm: str, model, x, y, seed: int = 0, targeted: bool = False):
    key = (name, norm, seed, targeted)
    if key not in _cache:
        kw: dict[str, Any] = {"seed": seed}
        if targeted:
            kw["targets"] = (y + 1) % 10
        _cache[key] = observed_call(make(name), model, x, y, threat_for(name, norm), **kw)
    return _cache[key]


@pytest.mark.parametrize("name,norm", CASES)
def test_result_stays_in_ball_and_box(name, norm, digits_model, batch):
    x, y = batch
    res, _ = run_cached(name, norm, digits_model, x, y)
    threat = threat_for(name, norm)
    assert bool(threat.contains(res.x_adv, x, tol=1e-6).all())
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    assert not torch.isnan(res.x_adv).any()


@pytest.mark.parametrize("name,norm", CASES)
def test_leaves_inputs_and_model_as_found(name, norm, digits_model, batch):
    x, y = batch
    _, seen = run_cached(name, norm, digits_model, x, y)
    assert seen == {k: True for k in seen}, seen


@pytest.mark.parametrize("name,norm", CASES)
def test_result_fields(name, norm, digits_model, batch):
    x, y = batch
    res, _ = run_cached(name, norm, digits_model, x, y)
    assert res.x_adv.shape == x.shape and res.x_adv.dtype == x.dtype
    assert res.success.shape == (N,) and res.success.dtype == torch.bool
    assert res.adv_pred.shape == (N,) and res.adv_pred.dtype == torch.int64
    assert set(res.norms) >= {"linf", "l2", "l0"}
    for v in res.norms.values():
        assert v.shape == (N,)
    # the reported numbers are recomputed from x_adv, not taken from the attack's word
    with torch.no_grad():
        pred = digits_model(res.x_adv).argmax(1)
    assert torch.equal(res.adv_pred, pred)
    assert torch.equal(res.success, pred != y)
    delta = (res.x_adv - x).flatten(1)
    assert torch.allclose(res.norms["linf"], delta.abs().amax(1))
    assert torch.allclose(res.norms["l2"], delta.norm(dim=1))
    assert torch.equal(res.norms["l0"], (delta != 0).sum(1).float())
    if ATTACKS.get(name).gradient_free:
        assert res.queries is not None and res.queries.shape == (N,) and (res.queries >= 0).all()
    assert res.seed == 0
    # a sound attack must break something on a non-robust model at these radii
    assert res.success.sum() > 0


@pytest.mark.parametrize("name,norm", CASES)
def test_seed_reproducible(name, norm, digits_model, batch):
    x, y = batch
    a, _ = run_cached(name, norm, digits_model, x, y, seed=0)
    b = make(name)(digits_model, x, y, threat_for(name, norm), seed=0)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.success, b.success)
    if make(name).randomized:
        c, _ = run_cached(name, norm, digits_model, x, y, seed=1)
        assert not torch.equal(a.x_adv, c.x_adv), "a randomized attack ignored its seed"


@pytest.mark.parametrize("name,norm", CASES)
def test_batch_then_slice_equals_slice(name, norm, digits_model, batch):
    x, y = batch
    full, _ = run_cached(name, norm, digits_model, x, y)
    part = make(name)(digits_model, x[5:13], y[5:13], threat_for(name, norm), seed=0)
    assert torch.equal(full.success[5:13], part.success)
    if name == "lbfgs":
        # L-BFGS solves each row alone, but the model's batched and sliced matmuls differ in the
        # last bits, and the solver's line search and ftol stop turn that into a different last
        # step along a flat valley of its objective: on one CPU a pixel moved by 1.4e-3 while
        # the perturbation's L2 norm agreed to 6e-5. The decisions (above) and the size of the
        # perturbation, what a minimum-norm attack reports, must agree; the points within 1e-2.
        torch.testing.assert_close(full.norms["l2"][5:13], part.norms["l2"], rtol=1e-3, atol=1e-5)
        assert torch.allclose(full.x_adv[5:13], part.x_adv, atol=1e-2)
    else:
        assert torch.allclose(full.x_adv[5:13], part.x_adv, atol=1e-5)


@pytest.mark.parametrize("name,norm", TARGETED)
def test_targeted(name, norm, digits_model, batch):
    x, y = batch
    targets = (y + 1) % 10
    res, seen = run_cached(name, norm, digits_model, x, y, targeted=True)
    assert seen == {k: True for k in seen}
    assert torch.equal(res.success, res.adv_pred == targets)
    assert bool(threat_for(name, norm).contains(res.x_adv, x).all())
    assert res.success.sum() > 0


@pytest.mark.parametrize("name,norm", MIN_NORM)
def test_minimum_norm_respects_finite_eps(name, norm, digits_model, batch):
    x, y = batch
    small = ThreatModel(norm, EPS[norm] / 4 if norm != "l0" else 1)
    res = make(name)(digits_model, x, y, small, seed=0)
    assert bool(small.contains(res.x_adv, x).all())
    free = make(name)(digits_model, x, y, None, seed=0)  # unbounded run works without a threat
    assert free.x_adv.shape == x.shape
    assert bool((free.norms[norm] >= 0).all())


def test_empty_batch(digits_model, batch):
    x, y = batch
    res = make("pgd")(digits_model, x[:0], y[:0], "linf:0.1", seed=0)
    assert res.x_adv.shape == (0, *x.shape[1:]) and res.success.shape == (0,)


def test_seed_none_draws_from_torch_generator(digits_model, batch):
    x, y = batch
    torch.manual_seed(123)
    a = make("pgd")(digits_model, x, y, "linf:0.1")
    torch.manual_seed(123)
    b = make("pgd")(digits_model, x, y, "linf:0.1")
    assert a.seed == b.seed and torch.equal(a.x_adv, b.x_adv)
    c = make("pgd")(digits_model, x, y, "linf:0.1", seed=a.seed)
    assert torch.equal(a.x_adv, c.x_adv)


# --------------------------------------------------------------------------- bad input
def _pgd() -> Attack:
    return make("pgd")


@pytest.mark.parametrize("bad,arg", [
    (lambda x: x * 2.0, "`x`"),
    (lambda x: x - 0.5, "`x`"),
    (lambda x: torch.where(torch.arange(x.numel()).view_as(x) == 3, torch.nan, x), "`x`"),
    (lambda x: x[:, 0], "`x`"),
])
def test_bad_images(bad, arg, digits_model, batch):
    x, y = batch
    with pytest.raises((ValueError, TypeError), match=arg):
        _pgd()(digits_model, bad(x), y, "linf:0.1")


def test_bad_labels(digits_model, batch):
    x, y = batch
    with pytest.raises(ValueError, match="`y`"):
        _pgd()(digits_model, x, y + 10, "linf:0.1")
    with pytest.raises(ValueError, match="`y`"):
        _pgd()(digits_model, x, y[:-1], "linf:0.1")
    with pytest.raises(TypeError, match="`y`"):
        _pgd()(digits_model, x, y.float(), "linf:0.1")


def test_bad_targets(digits_model, batch):
    x, y = batch
    with pytest.raises(ValueError, match="`targets`"):
        _pgd()(digits_model, x, y, "linf:0.1", targets=y.clone())
    with pytest.raises(ValueError, match="`targets`"):
        _pgd()(digits_model, x, y, "linf:0.1", targets=torch.full_like(y, 10))


def test_bad_threat(digits_model, batch):
    x, y = batch
    with pytest.raises(ValueError, match="threat"):
        _pgd()(digits_model, x, y)  # a bounded attack needs a threat
    with pytest.raises(ValueError, match="`threat`"):
        create_attack("fgsm")(digits_model, x, y, "l2:0.5")  # unsupported norm
    with pytest.raises(ValueError, match="`threat`"):
        _pgd()(digits_model, x, y, ThreatModel("linf", math.inf))  # unbounded for a bounded attack
    with pytest.raises(ValueError, match="`eps`"):
        _pgd()(digits_model, x, y, "linf:0")
    with pytest.raises(ValueError, match="`eps`"):
        ThreatModel("l2", -1.0)


def test_bad_model_and_seed(digits_model, batch):
    x, y = batch
    with pytest.raises(TypeError, match="`model`"):
        _pgd()(lambda t: t, x, y, "linf:0.1")
    with pytest.raises(TypeError, match="`seed`"):
        _pgd()(digits_model, x, y, "linf:0.1", seed=1.5)
    with pytest.raises(ValueError, match="`model`"):
        _pgd()(torch.nn.Flatten(0), x, y, "linf:0.1")  # returns a 1-D tensor, not logits


@pytest.mark.parametrize("name", list_attacks())
def test_bad_hyperparameters_name_the_field(name):
    cls = ATTACKS.get(name)
    fields = {f for f in cls.__dataclass_fields__}
    if "steps" in fields:
        with pytest.raises(ValueError, match="`steps`"):
            create_attack(name, steps=-1)
        with pytest.raises(TypeError, match="`steps`"):
            create_attack(name, steps=2.5)
    if "loss" in fields:
        with pytest.raises(ValueError, match="`loss`"):
            create_attack(name, loss="nope")
    if "step_size" in fields:
        with pytest.raises(ValueError, match="`step_size`"):
            create_attack(name, step_size=-0.1)
    with pytest.raises(TypeError, match="no_such_option"):
        create_attack(name, no_such_option=1)


def test_unknown_attack_lists_the_valid_ones():
    with pytest.raises(KeyError, match="pgd"):
        create_attack("pgdd")


# --------------------------------------------------------------------------- losses
def test_losses_values_and_signs():
    z = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, 0.5]])
    y = torch.tensor([0, 0])  # first example correct, second misclassified (pred 1)
    t = torch.tensor([2, 1])
    assert torch.allclose(L.ce(z, y), torch.nn.functional.cross_entropy(z, y, reduction="none"))
    assert torch.allclose(L.ce_targeted(z, y, t), -torch.nn.functional.cross_entropy(z, t, reduction="none"))
    assert torch.allclose(L.cw(z, y), torch.tensor([-2.0, 2.0]))  # > 0 exactly when misclassified
    assert torch.allclose(L.cw(z, y, kappa=1.0), torch.tensor([-2.0, 1.0]))
    assert torch.allclose(L.cw_targeted(z, y, t), torch.tensor([-3.0, 1.0]))  # > 0 exactly at the target
    # DLR: -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)
    assert torch.allclose(L.dlr(z, y), torch.tensor([-(3.0 - 1.0) / (3.0 - 0.0), -(0.0 - 2.0) / (2.0 - 0.5)]))
    # targeted DLR: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)
    assert torch.allclose(L.dlr_targeted(z, y, t), torch.tensor([-(3.0 - 0.0) / (3.0 + 0.5), -(0.0 - 2.0) / (2.0 - 0.25)]))


def test_dlr_is_shift_and_scale_invariant():
    z = torch.randn(20, 10, generator=torch.Generator().manual_seed(0))
    y = torch.arange(20) % 10
    t = (y + 3) % 10
    assert torch.allclose(L.dlr(7.0 * z + 3.0, y), L.dlr(z, y), atol=1e-5)
    assert torch.allclose(L.dlr_targeted(7.0 * z - 2.0, y, t), L.dlr_targeted(z, y, t), atol=1e-5)
    assert not torch.allclose(L.ce(7.0 * z, y), L.ce(z, y))  # unlike CE


def test_loss_errors():
    with pytest.raises(ValueError, match="`loss`"):
        L.get_loss("hinge")
    with pytest.raises(ValueError, match="3 classes"):
        L.dlr(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="4 classes"):
        L.dlr_targeted(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match="`targets`"):
        L.get_loss("ce", targeted=True)(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), None)
    assert L.get_loss("dlr", targeted=True) is L.dlr_targeted and L.get_loss("cw") is L.cw
