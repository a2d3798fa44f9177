"""Model-side defenses: bounded ReLU, stochastic activation pruning (SAP), ensembles."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bastion.attacks import create_attack
from bastion.defenses.layers import (
    BoundedReLU,
    Ensemble,
    StochasticActivationPruning,
    add_sap,
    bound_relus,
    count_functional_relus,
)
from bastion.models import create_model



def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Sequential(nn.Linear(64, 16), nn.ReLU()), nn.Linear(16, 3))


class FunctionalReLU(nn.Module):
    """A ReLU module beside a ReLU written into forward (as pre-activation ResNet blocks do)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.act(self.fc1(x.flatten(1))) - 0.1))


# ============================================================================================ bounded ReLU

def test_bounded_relu_values_gradient_and_contract():
    layer = BoundedReLU(t=0.5)
    x = torch.tensor([-1.0, 0.0, 0.2, 0.5, 3.0], requires_grad=True)
    out = layer(x)
    assert out.tolist() == pytest.approx([0.0, 0.0, 0.2, 0.5, 0.5])
    (g,) = torch.autograd.grad(out.sum(), x)
    assert g[0] == 0 and g[2] == 1 and g[4] == 0  # flat outside [0, t], identity inside
    big = 100 * torch.randn(10_000)
    assert BoundedReLU(2.0)(big).max() == 2.0 and BoundedReLU(2.0)(big).min() == 0.0
    assert layer.differentiable is True and layer.randomized is False
    with pytest.raises(ValueError, match="`t`"):
        BoundedReLU(0.0)


def test_bound_relus_replaces_every_relu_copy_and_in_place():
    model = small_cnn()
    x = torch.rand(8, 1, 4, 4) * 50  # large inputs: unbounded activations would exceed t
    bounded = bound_relus(model, t=0.25)  # a bound float32 represents exactly
    assert bounded is not model
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 3  # the original is untouched
    assert not any(isinstance(m, nn.ReLU) for m in bounded.modules())
    assert sum(isinstance(m, BoundedReLU) for m in bounded.modules()) == 3
    captured = []
    for m in bounded.modules():
        if isinstance(m, BoundedReLU):
            m.register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        bounded(x)
    assert len(captured) == 3 and all(float(c.max()) <= 0.25 for c in captured)
    assert float(captured[0].max()) == 0.25  # the bound was reached (the first layer sees inputs up to 50)
    # Only the activations change: with a bound no activation reaches, the outputs are the original's.
    assert torch.equal(bound_relus(model, t=1e9)(x), model(x))
    assert not torch.allclose(bounded(x), model(x))
    same = bound_relus(model, t=1.0, copy=False)
    assert same is model and not any(isinstance(m, nn.ReLU) for m in model.modules())


def test_bound_relus_refuses_models_it_cannot_fully_bound():
    with pytest.raises(ValueError, match="no nn.ReLU"):
        bound_relus(nn.Sequential(nn.Flatten(), nn.Linear(4, 2), nn.Tanh()))
    model = FunctionalReLU()
    x = torch.rand(2, 1, 4, 4)
    assert count_functional_relus(model, x) == 1  # the functional one, not the module's
    with pytest.raises(ValueError, match="1 ReLU.*function calls"):
        bound_relus(model, 1.0, copy=False, example=x)
    assert isinstance(model.act, nn.ReLU)  # refused before touching the model
    # Without `example` the module is swapped and the functional ReLU is left (documented).
    assert isinstance(bound_relus(model, 1.0).act, BoundedReLU)
    # The zoo's pre-activation ResNet writes its block ReLUs into forward: detected.
    resnet = create_model("preact-resnet18", 10, (3, 8, 8), width=4)
    with pytest.raises(ValueError, match="function calls"):
        bound_relus(resnet, 1.0, example=torch.rand(2, 3, 8, 8))
    # The zoo's cnn has only ReLU modules: fully bounded.
    cnn = create_model("cnn-small", 10, (1, 8, 8))
    assert count_functional_relus(bound_relus(cnn, 1.0, example=torch.rand(2, 1, 8, 8)), torch.rand(2, 1, 8, 8)) == 0


# ============================================================================================ SAP

def test_sap_hand_computed_rescaling_and_sparsity():
    h = torch.tensor([[3.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    sap = StochasticActivationPruning(r=2, generator=torch.Generator().manual_seed(0))
    for _ in range(20):
        out = sap(h)
        # Row 0: p = (3/4, 1/4, 0, 0); a kept unit j is h_j / (1 − (1 − p_j)^2).
        for j, expected in [(0, 3.0 / (1 - 0.25**2)), (1, 1.0 / (1 - 0.75**2))]:
            assert out[0, j].item() in (0.0, pytest.approx(expected))
        assert out[0, 2:].eq(0).all() and out[0].ne(0).any()
        # Row 1: a single non-zero unit is always drawn and kept as it is.
        assert out[1].tolist() == pytest.approx([0.0, 0.0, 2.0, 0.0])


def test_sap_is_random_unbiased_and_keeps_at_most_r():
    torch.manual_seed(0)
    h = torch.relu(torch.randn(1, 2, 5, 3))  # 30 activations, about half zero
    r, n = 10, 20_000
    sap = StochasticActivationPruning(r=r).eval()  # active in eval mode: that is the defense
    out = sap(h.expand(n, -1, -1, -1))
    assert not torch.equal(out[0], out[1])  # random
    mean = out.mean(0)
    p = h.abs() / h.abs().sum()
    q = 1 - (1 - p[0]) ** r  # keep probability; Var(out_j) = h_j² (1/q_j − 1)
    tol = 5 * h[0] * torch.sqrt((1 / q.clamp_min(1e-12) - 1) / n) + 1e-6
    assert ((mean - h[0]).abs() <= tol).all()  # E[out] = h within 5 standard errors, per unit
    assert (mean - h[0]).abs().max() > 0  # (and it is an estimate, not a copy)
    # Sampling r indices jointly with replacement: never more than r survivors per example
    # (independent Bernoulli keeps with the same marginals would exceed r in some rows).
    x = torch.rand(2000, 50) + 0.5
    kept = StochasticActivationPruning(r=3)(x).ne(0).sum(1)
    assert kept.max() <= 3 and kept.min() >= 1
    assert StochasticActivationPruning(fraction=0.5).samples_for(30) == 15
    assert StochasticActivationPruning(r=4, fraction=0.1).samples_for(30) == 4


def test_sap_seeded_reproducible_modes_and_gradients():
    h = torch.rand(4, 20)
    a = StochasticActivationPruning(r=5, generator=torch.Generator().manual_seed(7))(h)
    b = StochasticActivationPruning(r=5, generator=torch.Generator().manual_seed(7))(h)
    c = StochasticActivationPruning(r=5, generator=torch.Generator().manual_seed(8))(h)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(3)
    d = StochasticActivationPruning(r=5)(h)
    torch.manual_seed(3)
    assert torch.equal(d, StochasticActivationPruning(r=5)(h))  # the global RNG, when no generator
    off = StochasticActivationPruning(r=5, active_in_train=False)
    assert torch.equal(off.train()(h), h) and not torch.equal(off.eval()(h), h)
    assert off.randomized is True and off.differentiable is True
    x = h.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(StochasticActivationPruning(r=5)(x).sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    zero = torch.zeros(2, 6, requires_grad=True)  # an all-zero row: zero out, finite gradient
    out = StochasticActivationPruning(r=3)(zero)
    assert out.eq(0).all() and torch.isfinite(torch.autograd.grad(out.sum(), zero)[0]).all()
    with pytest.raises(ValueError, match="`r`"):
        StochasticActivationPruning(r=0)
    with pytest.raises(TypeError, match="generator"):
        StochasticActivationPruning(r=2, generator=0)  # type: ignore[arg-type]


def test_add_sap_after_every_relu():
    model = small_cnn().eval()
    keys = list(model.state_dict())
    defended = add_sap(model, fraction=0.5, generator=torch.Generator().manual_seed(0))
    saps = [m for m in defended.modules() if isinstance(m, StochasticActivationPruning)]
    assert len(saps) == 3 and list(defended.state_dict()) == keys
    for m in defended.modules():  # each SAP directly follows its ReLU
        if isinstance(m, nn.Sequential) and len(m) == 2 and isinstance(m[0], nn.ReLU):
            assert isinstance(m[1], StochasticActivationPruning)
    x = torch.rand(4, 1, 4, 4)
    assert not torch.equal(defended(x), defended(x))  # random in eval mode
    assert torch.equal(model(x), model(x))  # the original is untouched
    with pytest.raises(ValueError, match="no nn.ReLU"):
        add_sap(nn.Linear(3, 2), r=2)
    # The `example` check runs a forward pass but consumes no randomness.
    g = torch.Generator().manual_seed(5)
    checked = add_sap(model, r=3, generator=g, example=x)
    torch.manual_seed(0)
    first = checked(x)
    fresh = add_sap(model, r=3, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    assert torch.equal(first, fresh(x))


# ============================================================================================ ensembles

def _linear(w: list[list[float]]) -> nn.Module:
    m = nn.Sequential(nn.Flatten(), nn.Linear(2, 3, bias=False))
    with torch.no_grad():
        m[1].weight.copy_(torch.tensor(w))
    return m


MEMBERS = [[[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]],   # votes class 0 on X[0]
           [[0.0, 0.0], [0.0, 3.0], [1.0, 0.0]],   # votes class 1
           [[0.5, 0.0], [0.0, 0.1], [1.0, 0.0]]]   # votes class 2 on X[0]: a three-way tie
X = torch.tensor([[[[1.0, 0.5]]], [[[0.2, 1.0]]]])


def test_ensemble_modes_compute_what_they_say():
    members = [_linear(w) for w in MEMBERS]
    z = torch.stack([m(X) for m in members])
    mean_logits = Ensemble(members, "logits")(X)
    assert torch.allclose(mean_logits, z.mean(0))
    probs_out = Ensemble(members, "probs")(X)
    mean_probs = torch.stack([F.softmax(zi, 1) for zi in z]).mean(0)
    assert torch.allclose(probs_out, mean_probs.log()) and torch.allclose(F.softmax(probs_out, 1), mean_probs)
    # Cross-entropy on the "probs" output is −log of the mean probability of the true class.
    y = torch.tensor([0, 1])
    assert F.cross_entropy(probs_out, y).item() == pytest.approx(-mean_probs[[0, 1], y].log().mean().item())
    vote = Ensemble(members, "vote")(X)
    preds = z.argmax(2)
    assert preds[:, 0].tolist() == [0, 1, 2]  # X[0]: one vote each, the tie goes to the mean probability
    assert vote[0].argmax().item() == mean_probs[0].argmax().item()
    counts = torch.stack([torch.bincount(preds[:, i], minlength=3) for i in range(2)]).float()
    assert torch.allclose(vote, (counts + 0.5 * mean_probs) / 3)
    assert vote[1].argmax().item() == counts[1].argmax().item()  # X[1]: the majority wins
    with pytest.raises(ValueError, match="mode"):
        Ensemble(members, "median")
    with pytest.raises(ValueError, match="output shape"):
        Ensemble([members[0], nn.Sequential(nn.Flatten(), nn.Linear(2, 4))])(X)


def test_ensemble_gradients_declarations_and_bpda():
    members = [_linear(w) for w in MEMBERS]
    x = X.clone().requires_grad_(True)
    y = torch.tensor([0, 1])
    for mode in ("logits", "probs"):
        ens = Ensemble(members, mode)
        (g,) = torch.autograd.grad(F.cross_entropy(ens(x), y), x)
        assert ens.differentiable is True and g.abs().sum() > 0
    vote = Ensemble(members, "vote")
    assert vote.differentiable is False
    (g,) = torch.autograd.grad(F.cross_entropy(vote(x), y), x)  # connected, exactly zero: piecewise constant
    assert torch.equal(g, torch.zeros_like(g))
    assert torch.allclose(vote.bpda(X), Ensemble(members, "probs")(X))
    (gb,) = torch.autograd.grad(F.cross_entropy(vote.bpda(x), y), x)
    assert gb.abs().sum() > 0
    assert vote.randomized is False
    noisy = Ensemble([members[0], nn.Sequential(members[1], StochasticActivationPruning(r=2))])
    assert noisy.randomized is True
    noisy.eval()
    assert all(not m.training for m in noisy.modules())


def test_ensemble_is_an_attackable_classifier():
    torch.manual_seed(0)
    members = [create_model("mlp", 3, (1, 4, 4), hidden=[8]) for _ in range(3)]
    ens = Ensemble(members, "probs").eval()
    x, y = torch.rand(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    res = create_attack("pgd", steps=5)(ens, x, y, "linf:0.3", seed=0)
    assert res.x_adv.shape == x.shape and (res.x_adv - x).abs().max() <= 0.3 + 1e-6
    clean_correct = ens(x).argmax(1) == y
    assert res.success.sum() >= (~clean_correct).sum()  # never fewer errors than on clean inputs
    with torch.no_grad():
        assert math.isfinite(float(F.cross_entropy(ens(res.x_adv), y)))


# ---------------------------------------------------------------------------------------------
# Named layers: recorded in the spec, rebuilt by the checkpoint
# ---------------------------------------------------------------------------------------------


def test_named_layers_are_recorded_and_rebuilt_by_the_checkpoint(tmp_path):
    from bastion.checkpoint import load_model, save_model
    from bastion.defenses.layers import apply_layers

    torch.manual_seed(0)
    model = apply_layers(create_model("cnn-small", 10, (1, 28, 28)), ["bounded-relu:t=0.5", ("sap", {"fraction": 0.5})])
    assert model.spec.layers == [{"name": "bounded-relu", "kwargs": {"t": 0.5}},
                                 {"name": "sap", "kwargs": {"fraction": 0.5}}]
    save_model(tmp_path / "model", model)
    back = load_model(tmp_path / "model")
    kinds = [type(m).__name__ for m in back.modules()]
    assert kinds.count("BoundedReLU") == 4 and kinds.count("StochasticActivationPruning") == 4
    assert "ReLU" not in kinds  # every ReLU bounded, SAP after each bounded one
    x = torch.rand(5, 1, 28, 28)
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(1)
    b = back(x)
    assert torch.equal(a, b)  # the same network, the same draws
    assert back.spec.layers == model.spec.layers


def test_a_model_without_layers_saves_as_before():
    from bastion.models.base import ModelSpec

    spec = create_model("mlp", 3, (1, 4, 4)).spec
    assert "layers" not in spec.to_dict()  # old checkpoints and run configs stay byte-identical
    assert ModelSpec.from_dict(spec.to_dict()).layers == []


def test_thermometer_input_layer_reads_the_code_and_round_trips(tmp_path):
    from bastion.checkpoint import load_model, save_model
    from bastion.defenses.layers import apply_layers
    from bastion.defenses.transforms import create_transform

    torch.manual_seed(0)
    model = apply_layers(create_model("cnn-small", 10, (1, 28, 28)), ["thermometer-input:levels=8"])
    code = create_transform("thermometer:levels=8")(torch.rand(3, 1, 28, 28))
    assert code.shape[1] == 8
    save_model(tmp_path / "model", model)
    back = load_model(tmp_path / "model")
    assert torch.equal(model(code), back(code))
    with pytest.raises(RuntimeError):
        back(torch.rand(3, 1, 28, 28))  # it takes the code, not the image


def test_named_layer_errors_name_the_layer():
    from bastion.defenses.layers import apply_layers

    with pytest.raises(ValueError, match="bounded-relu"):  # the valid names are listed
        apply_layers(create_model("mlp", 3, (1, 4, 4)), ["bounded-rleu"])
    with pytest.raises(TypeError, match="layer 'sap'"):
        apply_layers(create_model("mlp", 3, (1, 4, 4)), ["sap:keep=3"])
    with pytest.raises(ValueError, match="t"):
        apply_layers(create_model("mlp", 3, (1, 4, 4)), ["bounded-relu:t=-1"])
