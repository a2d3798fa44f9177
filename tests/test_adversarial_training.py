"""Adversarial-training objectives: hand-computed losses, inner maximization, Free/Fast AT hooks, resume.

The hand-computed checks use a tiny linear model (4 inputs, float64) whose weights the test
sets, and recompute the expected loss independently from closed forms — the input gradient of
the cross-entropy of a linear model is Wᵀ(softmax(z) − onehot(y)) — so a wrong sign, a missing
term or a wrong reduction fails. Inner attacks are made deterministic (no random start, or a
step long enough that the start does not matter), or the loss is checked for a given x'.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bastion.defenses.training.methods  # noqa: F401  (registers the objectives)
from bastion.data import Dataset, load_dataset
from bastion.defenses.training import OBJECTIVES, TrainConfig, Trainer, create_objective
from bastion.defenses.training.adversarial import ALP, CLP, FGSMAT, PGDAT, FastAT, FreeAT, generation_mode
from bastion.defenses.training.mma import MMA, soft_logit_margin
from bastion.defenses.training.trades import MART, TRADES
from bastion.models import create_model
from bastion.threat import ThreatModel

NAMES = ["fgsm-at", "pgd-at", "fast-at", "free-at", "alp", "clp", "trades", "mma", "mart"]

# Small but complete settings: every objective's machinery runs, in a fraction of the paper's cost.
CHEAP: dict[str, dict] = {
    "fgsm-at": dict(attacks=["fgsm", {"name": "pgd", "steps": 2, "early_stop": False}], pool_order="cycle"),
    "pgd-at": dict(steps=2),
    "fast-at": dict(probe_size=32, probe_steps=2),
    "free-at": dict(replays=2),
    "alp": dict(steps=2),
    "clp": dict(noise_std=0.1),
    "trades": dict(steps=2),
    "mma": dict(steps=2, search_steps=4, memory_slots=1024),
    "mart": dict(steps=2),
}


# --------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def digits_ds() -> tuple[Dataset, Dataset]:
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def _mlp(ds: Dataset, seed: int = 0, name: str = "mlp") -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, ds.num_classes, ds.shape, ds.mean, ds.std)


@pytest.fixture(scope="module")
def trained(digits_ds) -> nn.Module:
    """An mlp trained normally on digits (about 95% test accuracy, not robust), in eval mode."""
    tr, te = digits_ds
    model = _mlp(tr)
    Trainer(model, tr, te, TrainConfig(epochs=4, batch_size=64, lr=0.05, schedule="onecycle"), progress=False).fit()
    return model.eval()


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


W3 = [[0.8, -0.5, 0.3, 0.1], [-0.2, 0.9, -0.4, 0.6], [0.1, 0.2, 0.7, -0.8]]
B3 = [0.05, -0.1, 0.02]
X2 = [[0.40, 0.55, 0.62, 0.35], [0.58, 0.45, 0.38, 0.66]]
Y2 = [0, 2]


def _linear(weight, bias) -> nn.Module:
    w = torch.tensor(weight, dtype=torch.float64)
    m = nn.Sequential(nn.Flatten(), nn.Linear(w.shape[1], w.shape[0])).double()
    with torch.no_grad():
        m[1].weight.copy_(w)
        m[1].bias.copy_(torch.tensor(bias, dtype=torch.float64))
    return m


def _batch(xs=X2, ys=Y2) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(xs, dtype=torch.float64).view(-1, 1, 2, 2), torch.tensor(ys)


# Independent closed forms for a linear model z = W x + b.
def _z(weight, bias, x):
    return x.flatten(1) @ torch.tensor(weight, dtype=torch.float64).T + torch.tensor(bias, dtype=torch.float64)


def _ce(z, y):
    return torch.logsumexp(z, dim=1) - z[torch.arange(len(y)), y]


def _grad_ce(weight, bias, x, y):
    z = _z(weight, bias, x)
    p = torch.exp(z - torch.logsumexp(z, dim=1, keepdim=True))
    p[torch.arange(len(y)), y] -= 1.0
    return (p @ torch.tensor(weight, dtype=torch.float64)).view_as(x)


def _pgd_by_hand(weight, bias, x, y, eps, steps, step):
    xa = x.clone()
    for _ in range(steps):
        xa = xa + step * torch.sign(_grad_ce(weight, bias, xa, y))
        xa = torch.minimum(torch.maximum(xa, x - eps), x + eps).clamp(0, 1)
    return xa


# --------------------------------------------------------------------------- registry and options
def test_all_objectives_registered_with_json_config():
    for name in NAMES:
        assert name in OBJECTIVES
        obj = create_objective(name)
        cfg = obj.config()
        assert cfg["name"] == name and json.loads(json.dumps(cfg)) == json.loads(json.dumps(cfg))
    assert create_objective("pgd-at").config()["eps"] == 0.1


def test_threat_string_sets_norm_and_eps():
    obj = PGDAT(threat="l2:1/2")
    assert obj.norm == "l2" and obj.eps == 0.5 and obj.threat_model == ThreatModel("l2", 0.5)
    assert FastAT(eps=0.2).fgsm_step == pytest.approx(0.25)
    assert MMA(eps=0.3).dmax == pytest.approx(0.45) and MMA(eps=0.3).initial_eps == pytest.approx(0.1)


@pytest.mark.parametrize("cls, kwargs, field, exc", [
    (PGDAT, dict(eps=-0.1), "eps", ValueError),
    (PGDAT, dict(norm="l1"), "norm", ValueError),
    (PGDAT, dict(threat="linf:abc"), "threat", ValueError),
    (PGDAT, dict(steps=0), "steps", ValueError),
    (PGDAT, dict(steps=2.5), "steps", TypeError),
    (PGDAT, dict(bn_mode="test"), "bn_mode", ValueError),
    (FGSMAT, dict(alpha=1.5), "alpha", ValueError),
    (FGSMAT, dict(attacks=["no-such-attack"]), "attacks", ValueError),
    (FGSMAT, dict(attacks=[{"name": "pgd", "stepz": 3}]), "attacks", TypeError),
    (FGSMAT, dict(attacks="fgsm"), "attacks", TypeError),
    (FGSMAT, dict(ratio=0.0), "ratio", ValueError),
    (FGSMAT, dict(pool_order="sorted"), "pool_order", ValueError),
    (FastAT, dict(max_drop=2.0), "max_drop", ValueError),
    (FastAT, dict(probe_size=0), "probe_size", ValueError),
    (FreeAT, dict(replays=0), "replays", ValueError),
    (ALP, dict(lam=-1.0), "lam", ValueError),
    (CLP, dict(noise_std=-0.1), "noise_std", ValueError),
    (TRADES, dict(beta=-1.0), "beta", ValueError),
    (MART, dict(init_std=-1.0), "init_std", ValueError),
    (MMA, dict(clean_weight=2.0), "clean_weight", ValueError),
    (MMA, dict(eps=0.1, min_eps=0.5), "min_eps", ValueError),
    (MMA, dict(memory_slots=-1), "memory_slots", ValueError),
])
def test_bad_options_name_the_field(cls, kwargs, field, exc):
    with pytest.raises(exc, match=f"`{field}`"):
        cls(**kwargs)


# --------------------------------------------------------------------------- hand-computed losses
@pytest.mark.parametrize("alpha", [0.5, 0.2])
def test_fgsm_at_loss_by_hand(alpha):
    model, (x, y) = _linear(W3, B3), _batch()
    eps = 0.1
    x_adv = (x + eps * torch.sign(_grad_ce(W3, B3, x, y))).clamp(0, 1)
    expected = alpha * _ce(_z(W3, B3, x), y).mean() + (1 - alpha) * _ce(_z(W3, B3, x_adv), y).mean()
    loss, logits = FGSMAT(eps=eps, alpha=alpha).loss(model, x, y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert torch.allclose(logits, _z(W3, B3, x))  # clean logits for the train accuracy


def test_fgsm_at_l2_step_is_normalized_gradient():
    model, (x, y) = _linear(W3, B3), _batch()
    g = _grad_ce(W3, B3, x, y)
    expected = (x + 0.5 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).clamp(0, 1)
    assert torch.allclose(FGSMAT(threat="l2:0.5").perturb(model, x, y), expected)


def test_fgsm_at_ratio_replaces_that_many_examples():
    model = _linear(W3, B3)
    x, y = _batch(X2 * 4, Y2 * 4)
    seen = []
    model.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach().clone()))
    FGSMAT(eps=0.1, ratio=0.5).loss(model, x, y)
    adv_half = seen[-1][8:]  # the mixed minibatch is cat([x, x'])
    changed = (adv_half != x).flatten(1).any(dim=1)
    assert int(changed.sum()) == 4


def test_fgsm_at_attack_pool_cycles_and_carries_position():
    model, (x, y) = _linear(W3, B3), _batch(ys=[2, 0])  # both correctly classified: registry FGSM perturbs them
    obj = FGSMAT(eps=0.1, attacks=["fgsm", {"name": "pgd", "steps": 3, "early_stop": False}], pool_order="cycle")
    a, b, c = (obj.perturb(model, x, y) for _ in range(3))
    fgsm = (x + 0.1 * torch.sign(_grad_ce(W3, B3, x, y))).clamp(0, 1)
    assert torch.allclose(a, fgsm) and torch.allclose(c, fgsm)  # positions 0 and 2 are the FGSM
    assert not torch.allclose(b, fgsm) and ThreatModel("linf", 0.1).contains(b, x).all()  # position 1: PGD
    assert obj.state_dict()["pool_step"].item() == 3
    fresh = FGSMAT(eps=0.1, attacks=obj.attacks, pool_order="cycle")
    fresh.load_state_dict(obj.state_dict())
    assert fresh._pool_step == 3


def test_pgd_at_loss_by_hand():
    model, (x, y) = _linear(W3, B3), _batch()
    obj = PGDAT(eps=0.1, steps=3, step_size=0.04, random_start=False)
    x_adv = _pgd_by_hand(W3, B3, x, y, 0.1, 3, 0.04)
    assert torch.allclose(obj.perturb(model, x, y), x_adv)
    loss, logits = obj.loss(model, x, y)
    assert loss.item() == pytest.approx(_ce(_z(W3, B3, x_adv), y).mean().item(), rel=1e-12)
    assert torch.allclose(logits, _z(W3, B3, x_adv))  # adversarial logits (Madry's train accuracy)


def test_fast_at_loss_by_hand():
    # Two classes: the CE input gradient of a linear model is (p_y − 1)(w_y − w_o), whose sign
    # does not depend on the point; with alpha >= 2·eps the step from any start in the ball
    # ends on the corner x − eps·sign(w_y − w_o), so the random start does not matter.
    w, b = [[0.8, -0.5, 0.3, -0.1], [-0.2, 0.9, -0.4, 0.6]], [0.1, -0.1]
    model, (x, y) = _linear(w, b), _batch(ys=[0, 1])
    wd = torch.tensor(w, dtype=torch.float64)
    direction = torch.stack([wd[0] - wd[1], wd[1] - wd[0]]).view_as(x)
    x_adv = (x - 0.1 * torch.sign(direction)).clamp(0, 1)
    torch.manual_seed(0)
    loss, _ = FastAT(eps=0.1, alpha=0.25).loss(model, x, y)
    assert loss.item() == pytest.approx(_ce(_z(w, b, x_adv), y).mean().item(), rel=1e-12)


def test_free_at_loss_and_delta_update_by_hand():
    model, (x, y) = _linear(W3, B3), _batch()
    obj = FreeAT(eps=0.1, replays=2)
    loss, _ = obj.loss(model, x, y)  # δ starts at 0
    assert loss.item() == pytest.approx(_ce(_z(W3, B3, x), y).mean().item(), rel=1e-12)
    loss.backward()  # the Trainer's backward also fills δ's gradient
    obj.after_step(model)
    delta = 0.1 * torch.sign(_grad_ce(W3, B3, x, y))
    assert torch.allclose(obj.state_dict()["delta"], delta)
    loss2, _ = obj.loss(model, x, y)  # the replay trains on x + δ
    assert loss2.item() == pytest.approx(_ce(_z(W3, B3, (x + delta).clamp(0, 1)), y).mean().item(), rel=1e-12)


def test_alp_loss_by_hand():
    model, (x, y) = _linear(W3, B3), _batch()
    obj = ALP(eps=0.1, alpha=0.5, lam=0.7, steps=1, step_size=0.1, random_start=False)
    x_adv = (x + 0.1 * torch.sign(_grad_ce(W3, B3, x, y))).clamp(0, 1)
    z, za = _z(W3, B3, x), _z(W3, B3, x_adv)
    expected = 0.5 * _ce(z, y).mean() + 0.5 * _ce(za, y).mean() + 0.7 * ((z - za) ** 2).mean()
    loss, _ = obj.loss(model, x, y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


def test_clp_loss_by_hand():
    model, (x, y) = _linear(W3, B3), _batch()  # two examples: the only pair is (0, 1)
    z = _z(W3, B3, x)
    expected = _ce(z, y).mean() + 0.3 * ((z[0] - z[1]) ** 2).mean()
    loss, _ = CLP(lam=0.3).loss(model, x, y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


def _fixed_adv(x):
    return (x + torch.tensor([[0.1, -0.1, 0.1, -0.1], [-0.1, -0.1, 0.1, 0.1]], dtype=x.dtype).view_as(x)).clamp(0, 1)


def test_trades_loss_by_hand_for_given_adversary(monkeypatch):
    model, (x, y) = _linear(W3, B3), _batch()
    obj = TRADES(eps=0.1, beta=6.0)
    x_adv = _fixed_adv(x)
    monkeypatch.setattr(obj, "perturb", lambda m, xx, yy: x_adv)
    z, za = _z(W3, B3, x), _z(W3, B3, x_adv)
    p, q = torch.softmax(z, 1), torch.softmax(za, 1)
    kl = (p * (p.log() - q.log())).sum(1).mean()  # batchmean KL(p(x) || p(x'))
    loss, _ = obj.loss(model, x, y)
    assert loss.item() == pytest.approx((_ce(z, y).mean() + 6.0 * kl).item(), rel=1e-10)


def test_mart_loss_by_hand_for_given_adversary(monkeypatch):
    model, (x, y) = _linear(W3, B3), _batch()
    obj = MART(eps=0.1, beta=6.0)
    x_adv = _fixed_adv(x)
    monkeypatch.setattr(obj, "perturb", lambda m, xx, yy: x_adv)
    z, za = _z(W3, B3, x), _z(W3, B3, x_adv)
    p, q = torch.softmax(z, 1), torch.softmax(za, 1)
    rows = torch.arange(2)
    q_wrong = torch.stack([max(q[i, k] for k in range(3) if k != int(y[i])) for i in range(2)])
    bce = -q[rows, y].log() - (1 - q_wrong).log()
    kl = (p * (p.log() - q.log())).sum(1)
    expected = (bce + 6.0 * kl * (1 - p[rows, y])).mean()
    loss, _ = obj.loss(model, x, y)
    # the reference's stabilizers (1.0001, 1e-12) move the value by about 1e-4
    assert loss.item() == pytest.approx(expected.item(), rel=1e-3)
    assert loss.item() != pytest.approx((bce.mean() - 6.0 * (kl * (1 - p[rows, y])).mean()).item(), rel=1e-3)


def test_mma_loss_by_hand_for_given_search(monkeypatch):
    # three examples: 0 correct with margin below dmax, 1 correct but beyond dmax (hinge flat),
    # 2 misclassified (clean CE)
    model = _linear(W3, B3)
    x, y = _batch([[0.9, 0.1, 0.5, 0.5], [0.95, 0.0, 0.6, 0.4], X2[0]], [0, 0, 1])
    z = _z(W3, B3, x)
    assert (soft_logit_margin(z, y) < 0).tolist() == [True, True, False]
    obj = MMA(eps=0.1)  # dmax 0.15
    x_adv = _fixed_adv(x[:2])
    monkeypatch.setattr(obj, "an_pgd", lambda m, xx, yy, e0: (x_adv, torch.tensor([0.08, 0.155], dtype=xx.dtype)))
    za = _z(W3, B3, x_adv)
    mma = (_ce(za[:1], y[:1]).sum() + _ce(z[2:], y[2:]).sum()) / 3
    expected = _ce(z, y).mean() / 3 + 2 / 3 * mma
    loss, logits = obj.loss(model, x, y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert torch.allclose(logits, z)


# --------------------------------------------------------------------------- inner maximization
def test_mma_an_pgd_finds_the_linear_margin_and_remembers_it():
    # Two classes, y = 0: the soft margin is −(a·x + b0); along any direction the closest
    # boundary point in linf is at distance (a·x + b0)/‖a‖₁.
    a = [1.0, -2.0, 0.5, 1.5]
    model = _linear([a, [0.0] * 4], [-0.15, 0.0])
    x, y = _batch([[0.5] * 4], [0])
    dist = (0.5 * sum(a) - 0.15) / sum(abs(v) for v in a)  # 0.07
    obj = MMA(eps=0.1, steps=10, search_steps=10)
    torch.manual_seed(0)
    x_mix, eps, correct = obj.adversary(model, x, y)
    width = (obj.search_max - obj.initial_eps) / 2**10
    assert bool(correct[0]) and dist - 1e-9 <= eps[0].item() <= dist + width + 1e-9
    assert soft_logit_margin(model(x_mix), y).item() >= -1e-12  # the point returned is on/over the boundary
    assert ThreatModel("linf", eps[0].item() + 1e-9).contains(x_mix, x).all()
    assert obj._recall(x).item() == pytest.approx(eps[0].item())  # remembered for next time
    # beyond 1.05·dmax (0.063 < 0.07) nothing is found: ε = 1.05·dmax and the hinge drops the example
    far = MMA(eps=0.04)
    _, eps_far, _ = far.adversary(model, x, y)
    assert eps_far[0].item() == pytest.approx(far.search_max) and eps_far[0].item() >= far.dmax
    assert MMA(eps=0.1, memory_slots=0)._recall(x).item() == pytest.approx(0.1 / 3)


def test_trades_inner_maximization_increases_kl(digits_ds, trained):
    x, y = digits_ds[1].images[:64], digits_ds[1].labels[:64]
    obj = TRADES(eps=0.1, steps=5)
    torch.manual_seed(0)
    x_adv = obj.perturb(trained, x, y)
    with torch.no_grad():
        p = F.log_softmax(trained(x), 1)

        def kl(xa):
            return F.kl_div(F.log_softmax(trained(xa), 1), p, reduction="batchmean", log_target=True).item()
        start = x + 0.001 * torch.randn_like(x)
        assert kl(x_adv) > 10 * kl(start) and kl(x_adv) > 0.05
    assert ThreatModel("linf", 0.1).contains(x_adv, x).all()


@pytest.mark.parametrize("cls", [PGDAT, FastAT, MART, ALP])
def test_ce_adversaries_increase_the_loss_and_stay_in_the_ball(cls, digits_ds, trained):
    x, y = digits_ds[1].images[:64], digits_ds[1].labels[:64]
    torch.manual_seed(0)
    x_adv = cls(eps=0.1).perturb(trained, x, y)
    with torch.no_grad():
        clean = F.cross_entropy(trained(x), y).item()
        adv = F.cross_entropy(trained(x_adv), y).item()
    assert adv > clean + 0.5
    assert ThreatModel("linf", 0.1).contains(x_adv, x).all()


@pytest.mark.parametrize("name", ["fgsm-at", "pgd-at", "trades", "mma"])
def test_adversary_restores_model_mode_and_leaves_no_parameter_grads(name, digits_ds):
    tr, _ = digits_ds
    model = _mlp(tr)
    model.train()
    model.net.dropout.eval()  # a mixed-mode model must come back exactly as it was
    obj = create_objective(name, **CHEAP.get(name, {}))
    obj.perturb(model, tr.images[:32], tr.labels[:32])
    assert model.training and not model.net.dropout.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_generation_mode_eval_uses_running_statistics():
    bn = nn.Sequential(nn.BatchNorm2d(1), nn.Flatten(), nn.Linear(4, 2))
    bn.train()
    before = bn[0].running_mean.clone()
    with generation_mode(bn, "eval"):
        assert not bn.training
        bn(torch.rand(8, 1, 2, 2))
    assert torch.equal(bn[0].running_mean, before) and bn.training
    with generation_mode(bn, "train"):
        bn(torch.rand(8, 1, 2, 2))
    assert not torch.equal(bn[0].running_mean, before)  # "train" updates the running statistics


# --------------------------------------------------------------------------- Free AT
def test_free_at_carries_delta_between_batches_and_in_state_dict():
    model = _linear(W3, B3)
    (xa, ya), (xb, yb) = _batch(), _batch([X2[1], X2[0]], [1, 0])
    obj = FreeAT(eps=0.1)
    obj.loss(model, xa, ya)[0].backward()
    obj.after_step(model)
    carried = obj.state_dict()["delta"].clone()
    assert carried.abs().max().item() == pytest.approx(0.1)
    loss_b, _ = obj.loss(model, xb, yb)  # the next minibatch starts from the carried δ
    assert torch.equal(obj._leaf.detach(), carried)
    assert loss_b.item() == pytest.approx(_ce(_z(W3, B3, (xb + carried).clamp(0, 1)), yb).mean().item())
    other = FreeAT(eps=0.1)
    other.load_state_dict(obj.state_dict())
    assert torch.equal(other.state_dict()["delta"], carried)
    # a smaller batch uses the first rows and keeps the rest; another image shape resets δ
    small = FreeAT(eps=0.1)
    small.load_state_dict({"delta": carried})
    small.loss(model, xa[:1], ya[:1])[0].backward()
    small.after_step(model)
    kept = small.state_dict()["delta"]
    assert kept.shape == carried.shape and torch.equal(kept[1:], carried[1:])
    flat = nn.Sequential(nn.Flatten(), nn.Linear(9, 3)).double()
    small.loss(flat, torch.full((2, 1, 3, 3), 0.5, dtype=torch.float64), ya)
    assert small._leaf.shape == (2, 1, 3, 3) and small._leaf.abs().sum() == 0


def test_free_at_makes_exactly_m_optimizer_steps_per_batch(digits_ds, monkeypatch):
    tr, _ = digits_ds
    data = tr.take(130)  # batches of 64, 64 and 2
    obj = FreeAT(eps=0.1, replays=3)
    calls = {"loss": 0, "after": 0}
    loss, after = obj.loss, obj.after_step

    def count_loss(m, x, y):
        calls["loss"] += 1
        return loss(m, x, y)

    def count_after(m):
        calls["after"] += 1
        return after(m)

    monkeypatch.setattr(obj, "loss", count_loss)
    monkeypatch.setattr(obj, "after_step", count_after)
    steps = []
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: steps.append(1))
    Trainer(_mlp(tr), data, None, TrainConfig(epochs=1, batch_size=64, lr=0.05), obj, progress=False).fit()
    assert calls == {"loss": 9, "after": 9} and len(steps) == 9
    assert obj.state_dict()["delta"].shape == (64, 1, 8, 8)


# --------------------------------------------------------------------------- Fast AT overfitting stop
def _scripted_probe(monkeypatch, obj, accuracies):
    """Replace the probe's attacks by scripted (PGD, FGSM) accuracies; keep each epoch's weights."""
    script, seen = iter(accuracies), []

    def fake(model):
        seen.append(_weights(model))
        return next(script)

    monkeypatch.setattr(obj, "probe_accuracies", fake)
    return seen


def test_fast_at_stops_on_catastrophic_overfitting_and_restores_best(digits_ds, tmp_path, monkeypatch):
    tr, _ = digits_ds
    obj = FastAT(eps=0.1, probe_size=32)
    seen = _scripted_probe(monkeypatch, obj, [(0.5, 0.55), (0.7, 0.72), (0.3, 0.95), (0.9, 0.9)])
    model = _mlp(tr)
    run = tmp_path / "run"
    report = Trainer(model, tr.take(200), None, TrainConfig(epochs=4, batch_size=64, lr=0.05), obj,
                     run_dir=run, progress=False).fit()
    assert report["stopped"].startswith("catastrophic overfitting at epoch 3")
    assert len(seen) == 3  # no fourth epoch
    now = _weights(model)
    assert all(torch.equal(now[k], seen[1][k]) for k in now)  # epoch 2's weights are back
    assert not all(torch.equal(now[k], seen[2][k]) for k in now)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[1]["pgd_acc"] == 0.7 and rows[1]["fgsm_acc"] == 0.72 and "stopped" in rows[2]
    assert obj.state_dict()["probe_x"].shape == (32, 1, 8, 8)


def test_fast_at_does_not_stop_when_fgsm_accuracy_falls_too(digits_ds, monkeypatch):
    tr, _ = digits_ds
    obj = FastAT(eps=0.1, probe_size=32)
    seen = _scripted_probe(monkeypatch, obj, [(0.5, 0.6), (0.7, 0.8), (0.3, 0.5)])
    report = Trainer(_mlp(tr), tr.take(200), None, TrainConfig(epochs=3, batch_size=64, lr=0.05), obj,
                     progress=False).fit()
    assert report["stopped"] is None and len(seen) == 3


def test_fast_at_probe_measures_real_accuracies(digits_ds, trained):
    obj = FastAT(eps=0.15, probe_steps=5)
    obj.set_probe(digits_ds[1].images[:64], digits_ds[1].labels[:64])
    pgd_acc, fgsm_acc = obj.probe_accuracies(trained)
    assert 0.0 <= pgd_acc <= fgsm_acc < 0.95  # PGD is at least as strong as FGSM; both hurt


# --------------------------------------------------------------------------- training through the Trainer
@pytest.mark.parametrize("name", NAMES)
def test_trains_one_epoch_on_digits(name, digits_ds):
    tr, te = digits_ds
    model = _mlp(tr)
    report = Trainer(model, tr, te, TrainConfig(epochs=1, batch_size=64, lr=0.05, schedule="onecycle"),
                     create_objective(name, **CHEAP[name]), progress=False).fit()
    assert math.isfinite(report["final"]["train_loss"])
    assert report["final"]["test_acc"] > 0.5


@pytest.mark.parametrize("name", NAMES)
def test_resume_is_bit_identical(name, digits_ds, tmp_path):
    """Crash mid-way through epoch 2 (after a mid-epoch checkpoint), resume, compare with an uninterrupted run."""
    tr, _ = digits_ds
    data = tr.take(300)  # 5 batches per epoch
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.05, schedule="onecycle", seed=3, checkpoint_every=2)
    ref = _mlp(tr)
    Trainer(ref, data, None, cfg, create_objective(name, **CHEAP[name]), progress=False).fit()

    crashing = create_objective(name, **CHEAP[name])
    inner, calls = crashing.loss, [0]
    stop_after = 8 * crashing.replays  # 8 batches: the last checkpoint is mid-epoch 2 (step 7)

    def crash(model, x, y):
        calls[0] += 1
        if calls[0] > stop_after:
            raise KeyboardInterrupt
        return inner(model, x, y)

    crashing.loss = crash
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        Trainer(_mlp(tr), data, None, cfg, crashing, run_dir=run, progress=False).fit()
    resumed = _mlp(tr)
    Trainer(resumed, data, None, cfg, create_objective(name, **CHEAP[name]), run_dir=run, resume=True,
            progress=False).fit()
    a, b = _weights(ref), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pgd_at_is_more_robust_than_standard(digits_ds):
    tr, te = digits_ds
    from bastion.attacks import create_attack

    cfg = TrainConfig(epochs=5, batch_size=64, lr=0.05, schedule="onecycle", seed=0)
    attack = create_attack("pgd", steps=10)
    robust = {}
    for name, kw in (("standard", {}), ("pgd-at", dict(eps=0.15, steps=2))):
        model = _mlp(tr)
        report = Trainer(model, tr, te, cfg, create_objective(name, **kw), progress=False).fit()
        assert report["final"]["test_acc"] > 0.9
        robust[name] = attack(model, te.images, te.labels, "linf:0.15", seed=0).robust_accuracy(te.labels)
    assert robust["standard"] < 0.35 and robust["pgd-at"] > robust["standard"] + 0.25, robust
