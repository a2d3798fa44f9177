"""Gradient-free (SPSA, Square) and gray-box (Transfer, Substitute) attacks on the digits models.

Each strength check compares with white-box PGD on the same examples, or with the clean
accuracy, and prints its numbers (``pytest -s``) so they can be quoted.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import train_tiny
from torch import nn

from bastion.attacks import PGD, list_attacks
from bastion.attacks.spsa import SPSA
from bastion.attacks.square import Square, p_schedule, pseudo_gaussian_square
from bastion.attacks.substitute import Substitute
from bastion.attacks.transfer import Ensemble, Transfer

N = 32
EPS = 0.15  # linf on 8×8 digits: PGD leaves roughly 20% robust accuracy



@pytest.fixture(scope="module")
def batch(digits):
    return digits["x_test"][:N].clone(), digits["y_test"][:N].clone()


@pytest.fixture(scope="module")
def pgd_robust(digits_model, batch) -> float:
    x, y = batch
    return PGD(steps=20)(digits_model, x, y, f"linf:{EPS}", seed=0).robust_accuracy(y)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_registered():
    assert {"spsa", "square", "transfer", "substitute"} <= set(list_attacks())
    assert SPSA.gradient_free and Square.gradient_free and Substitute.gradient_free
    assert not Transfer.gradient_free  # never queries the target, but may be white-box (no surrogates)


# --------------------------------------------------------------------------- SPSA
def test_spsa_close_to_pgd_within_its_budget(digits_model, batch, pgd_robust):
    x, y = batch
    attack = SPSA(steps=40, nb_sample=32, lr=0.02)  # a larger lr than the default 0.01: 40 steps, not 100
    res = attack(digits_model, x, y, f"linf:{EPS}", seed=0)
    clean = accuracy(digits_model, x, y)
    print(f"\nSPSA linf {EPS}: clean {clean:.3f}, PGD-20 {pgd_robust:.3f}, SPSA {res.robust_accuracy(y):.3f}, "
          f"mean queries {res.queries.float().mean():.0f}")
    assert res.robust_accuracy(y) <= pgd_robust + 0.15
    assert res.robust_accuracy(y) <= clean - 0.4
    budget = 1 + (attack.steps + 1) + attack.steps * attack.nb_sample  # clean, iterates, estimates
    assert res.queries is not None and bool((res.queries <= budget).all())
    # early stop: broken examples stopped before the budget ran out
    assert bool((res.queries[res.success] < budget).all())


def test_spsa_l2_runs_and_breaks(digits_model, batch):
    x, y = batch
    res = SPSA(steps=20, nb_sample=32, lr=0.05)(digits_model, x, y, "l2:1.5", seed=0)
    assert bool((res.norms["l2"] <= 1.5 + 1e-5).all())
    assert res.robust_accuracy(y) <= accuracy(digits_model, x, y) - 0.3


# --------------------------------------------------------------------------- Square
def test_square_linf_close_to_pgd(digits_model, batch, pgd_robust):
    x, y = batch
    res = Square(n_queries=300)(digits_model, x, y, f"linf:{EPS}", seed=0)
    print(f"\nSquare linf {EPS}: PGD-20 {pgd_robust:.3f}, Square-300 {res.robust_accuracy(y):.3f}, "
          f"median queries {res.queries.float().median():.0f}")
    assert res.robust_accuracy(y) <= pgd_robust + 0.1
    assert res.queries is not None and bool((res.queries <= 300).all())
    assert bool((res.queries[res.success] < 300).all())
    # linf random search only ever uses the corners ±eps (or the box)
    d = (res.x_adv - x).abs()
    assert bool(((d < 1e-6) | ((d - EPS).abs() < 1e-6) | (res.x_adv == 0) | (res.x_adv == 1)).all())


def test_square_l2_close_to_pgd(digits_model, batch):
    x, y = batch
    pgd = PGD(steps=20)(digits_model, x, y, "l2:1.0", seed=0).robust_accuracy(y)
    res = Square(n_queries=300)(digits_model, x, y, "l2:1.0", seed=0)
    print(f"\nSquare l2 1.0: PGD-20 {pgd:.3f}, Square-300 {res.robust_accuracy(y):.3f}")
    assert res.robust_accuracy(y) <= pgd + 0.2
    assert bool((res.norms["l2"] <= 1.0 + 1e-5).all())


@pytest.mark.parametrize("attack", [SPSA(steps=5, nb_sample=8), Square(n_queries=50)], ids=["spsa", "square"])
def test_already_misclassified_cost_one_query(attack, digits_model, batch):
    x, y = batch
    y_wrong = y.clone()
    y_wrong[:4] = (y[:4] + 1) % 10  # the model's prediction differs from these labels already
    pred = digits_model(x).argmax(1)
    assert bool((pred[:4] != y_wrong[:4]).all())
    res = attack(digits_model, x, y_wrong, f"linf:{EPS}", seed=0)
    assert res.queries is not None
    assert res.queries[:4].tolist() == [1, 1, 1, 1]
    assert torch.equal(res.x_adv[:4], x[:4])
    assert bool((res.queries[4:] > 1).all())


def test_spsa_chunked_forward_gives_the_same_result(digits_model, batch):
    x, y = batch
    a = SPSA(steps=3, nb_sample=8)(digits_model, x[:6], y[:6], f"linf:{EPS}", seed=0)
    b = SPSA(steps=3, nb_sample=8, max_batch_size=7)(digits_model, x[:6], y[:6], f"linf:{EPS}", seed=0)
    assert torch.allclose(a.x_adv, b.x_adv, atol=1e-6) and torch.equal(a.queries, b.queries)


@pytest.mark.parametrize("threat", ["linf:0.05", "l2:0.5"])
def test_square_on_colour_non_square_images(threat):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 10, 5)).eval()
    x = torch.rand(6, 3, 12, 10)
    y = model(x).argmax(1)
    res = Square(n_queries=60)(model, x, y, threat, seed=0)
    assert res.x_adv.shape == x.shape
    assert bool(((res.queries >= 2) & (res.queries <= 60)).all())
    # it moved every example away from x, within the budget (the base class would project otherwise)
    assert bool((res.norms["linf"] > 0).all())


def test_square_schedule_and_bump():
    assert p_schedule(0.8, 0, 10000) == 0.8 and p_schedule(0.8, 10, 10000) == 0.8
    assert p_schedule(0.8, 11, 10000) == 0.4 and p_schedule(0.8, 9000, 10000) == 0.8 / 512
    assert p_schedule(0.8, 50, 1000) == 0.8 / 8  # rescaled: 50 of 1000 is 500 of 10000
    b = pseudo_gaussian_square(5)
    assert math.isclose(float(b.norm()), 1.0, rel_tol=1e-5)
    assert bool((b[:2] > 0).all()) and bool((b[2:] < 0).all())
    assert int(b[:2].abs().argmax()) == 2 + 5  # the top bump peaks at its centre column, lower row


def test_hyperparameters_name_the_field():
    with pytest.raises(ValueError, match="`nb_sample`"):
        SPSA(nb_sample=7)
    with pytest.raises(ValueError, match="`delta`"):
        SPSA(delta=0.0)
    with pytest.raises(ValueError, match="`n_queries`"):
        Square(n_queries=0)
    with pytest.raises(ValueError, match="`p_init`"):
        Square(p_init=0.0)
    with pytest.raises(ValueError, match="`loss`"):
        Square(loss="dlr")
    with pytest.raises(ValueError, match="`combine`"):
        Transfer(combine="votes")
    with pytest.raises(ValueError, match="`combine='loss'`"):
        Transfer(attack="fgsm", combine="loss")
    with pytest.raises(TypeError, match="`surrogates\\[0\\]`"):
        Transfer(surrogates=("not a model",))
    with pytest.raises(ValueError, match="`lmbda`"):
        Substitute(lmbda=-0.1)
    with pytest.raises(TypeError, match="no hyper-parameter 'bogus'"):
        Substitute(attack="fgsm", attack_kwargs={"bogus": 1})


# --------------------------------------------------------------------------- Transfer
@pytest.fixture(scope="module")
def mlp(digits) -> nn.Module:
    """A third, architecturally different model for the ensemble (a few seconds)."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    return train_tiny(net, digits["x_train"], digits["y_train"], epochs=20, seed=2)


def _transfer(surrogates, combine="logits"):
    return Transfer(surrogates=surrogates, attack="pgd", attack_kwargs={"steps": 20, "early_stop": False},
                    combine=combine)


def test_transfer_from_another_model(digits_model, digits_model_b, batch):
    x, y = batch
    res = _transfer((digits_model_b,))(digits_model, x, y, f"linf:{EPS}", seed=0)
    clean = accuracy(digits_model, x, y)
    on_surrogate = accuracy(digits_model_b, res.x_adv, y)
    print(f"\nTransfer B -> A linf {EPS}: clean {clean:.3f}, on surrogate {on_surrogate:.3f}, "
          f"on target {res.robust_accuracy(y):.3f}")
    assert res.robust_accuracy(y) <= clean - 0.3
    assert torch.equal(res.adv_pred, digits_model(res.x_adv).argmax(1))  # success is judged on the target
    assert res.queries is None


def test_transfer_without_surrogates_is_the_white_box_attack(digits_model, batch):
    x, y = batch
    a = Transfer(attack="pgd", attack_kwargs={"steps": 5})(digits_model, x, y, f"linf:{EPS}", seed=3)
    b = PGD(steps=5)(digits_model, x, y, f"linf:{EPS}", seed=3)
    assert torch.equal(a.x_adv, b.x_adv)


def test_ensemble_surrogates_transfer(digits_model, digits_model_b, mlp, batch):
    x, y = batch
    clean = accuracy(digits_model, x, y)
    single = {name: _transfer((m,))(digits_model, x, y, f"linf:{EPS}", seed=0).robust_accuracy(y)
              for name, m in (("cnn-b", digits_model_b), ("mlp", mlp))}
    ens = {c: _transfer((digits_model_b, mlp), c)(digits_model, x, y, f"linf:{EPS}", seed=0).robust_accuracy(y)
           for c in ("logits", "probs", "loss")}
    print(f"\nTransfer to A, linf {EPS}: clean {clean:.3f}; single {single}; ensemble {ens}")
    for c, acc in ens.items():
        assert acc <= clean - 0.25, c
        # at least as well as the best single surrogate (up to 2 of 32 examples)
        assert acc <= min(single.values()) + 0.0625, c


def test_ensemble_of_copies_equals_one_model(digits_model, digits_model_b, batch):
    x, y = batch
    ens = Ensemble([digits_model_b, digits_model_b], "probs")
    with torch.no_grad():
        assert torch.allclose(ens(x), torch.log_softmax(digits_model_b(x), 1), atol=1e-5)
        assert torch.equal(Ensemble([digits_model_b, digits_model_b])(x), digits_model_b(x))
    # the averaged loss of two copies is the loss of one: PGD's exact path, the same points
    kw = {"steps": 5, "early_stop": False}
    a = Transfer(surrogates=(digits_model_b, digits_model_b), attack=PGD(**kw), combine="loss")
    b = Transfer(surrogates=(digits_model_b,), attack=PGD(**kw))
    ra, rb = a(digits_model, x, y, f"linf:{EPS}", seed=1), b(digits_model, x, y, f"linf:{EPS}", seed=1)
    assert torch.allclose(ra.x_adv, rb.x_adv, atol=1e-6)


def test_transfer_leaves_surrogates_as_found(digits_model, digits_model_b, batch):
    x, y = batch
    sur = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    sur.train()
    _transfer((sur, digits_model_b), "loss")(digits_model, x, y, f"linf:{EPS}", seed=0)
    assert sur.training and all(p.requires_grad and p.grad is None for p in sur.parameters())
    assert Transfer(surrogates=(sur,)).config()["surrogates"] == ["Sequential"]


# --------------------------------------------------------------------------- Substitute
class LabelsOnly(nn.Module):
    """The target seen through a label-only API: one-hot of its prediction, nothing more."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(self.model(x).argmax(1), 10).float()


def test_substitute_from_a_small_seed_set(digits, digits_model, batch):
    x, y = batch
    seed_x = digits["x_train"][:100]  # unlabelled: the attack labels it with the oracle
    res = Substitute(rounds=4, epochs=5, seed_data=seed_x)(digits_model, x, y, "linf:0.2", seed=0)
    clean = accuracy(digits_model, x, y)
    print(f"\nSubstitute (100 seeds, 4 rounds) FGSM linf 0.2: clean {clean:.3f}, robust {res.robust_accuracy(y):.3f}, "
          f"oracle queries {int(res.queries[0])}")
    assert res.robust_accuracy(y) <= clean - 0.3
    # 100 · 2^4 labelled points, plus the one label query of the example itself
    assert res.queries.tolist() == [100 * 2**4 + 1] * N


def test_substitute_needs_labels_only(digits, digits_model, batch):
    """The same run against an API that returns only one-hot labels gives the same points."""
    x, y = batch
    attack = Substitute(rounds=1, epochs=2, seed_data=digits["x_train"][:64])
    a = attack(digits_model, x, y, "linf:0.2", seed=0)
    b = attack(LabelsOnly(digits_model), x, y, "linf:0.2", seed=0)
    assert torch.equal(a.x_adv, b.x_adv)


def test_substitute_on_the_batch_counts_lineage_queries(digits_model, batch):
    x, y = batch
    res = Substitute(rounds=3, epochs=5, reservoir=None)(digits_model, x, y, "linf:0.2", seed=0)
    assert res.queries.tolist() == [2**3] * N  # each example and its 7 augmented descendants
    res_r = Substitute(rounds=3, epochs=5, reservoir=16)(digits_model, x, y, "linf:0.2", seed=0)
    assert int(res_r.queries.sum()) == N + 3 * 16  # reservoir: a fixed number of new points per round
    assert bool(Substitute.batch_dependent)
