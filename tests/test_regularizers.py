"""Non-adversarial training defenses: each loss against a hand computation, training, exact resume.

The hand computations use tiny linear models whose weights the tests set, and plain Python
arithmetic (math.exp / math.log), so a wrong sign, a missing term or a wrong normalization fails.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bastion.defenses.training.methods_extra  # noqa: F401  (registers the objectives until __init__ does)
from bastion.data import Dataset, load_dataset
from bastion.defenses.training import Objective, TrainConfig, Trainer, create_objective
from bastion.defenses.training.distillation import Distillation, weights_digest
from bastion.defenses.training.regularizers import (
    Contractive,
    GaussianAugmentation,
    GradientRegularization,
    LabelSmoothing,
    contractive_penalty,
    hooked_layers,
    input_gradient_penalty,
)
from bastion.models import create_model


MINE = ["gaussian-augmentation", "label-smoothing", "distillation", "contractive", "gradient-regularization"]

# A 2-example batch of 1×1×2 "images" and a 3-class linear model on their 2 pixels.
X = torch.tensor([[[[0.2, 0.9]]], [[[0.6, 0.1]]]])
Y = torch.tensor([2, 0])
W = [[1.0, -2.0], [0.5, 0.3], [-1.0, 1.5]]
B = [0.1, -0.2, 0.05]


def linear(w=W, b=B, dtype=torch.float32) -> nn.Module:
    m = nn.Sequential(nn.Flatten(), nn.Linear(2, 3))
    with torch.no_grad():
        m[1].weight.copy_(torch.tensor(w, dtype=dtype))
        m[1].bias.copy_(torch.tensor(b, dtype=dtype))
    return m.to(dtype)


def py_logits(x: list[float], w=W, b=B) -> list[float]:
    return [sum(wi * xi for wi, xi in zip(row, x)) + bk for row, bk in zip(w, b)]


def py_softmax(z: list[float]) -> list[float]:
    e = [math.exp(v - max(z)) for v in z]
    return [v / sum(e) for v in e]


def py_ce(z: list[float], target: list[float]) -> float:
    p = py_softmax(z)
    return -sum(t * math.log(pk) for t, pk in zip(target, p))


def val(t: torch.Tensor) -> float:
    return float(t.detach())


def onehot(k: int, n: int = 3) -> list[float]:
    return [1.0 if i == k else 0.0 for i in range(n)]


def pixels(x: torch.Tensor) -> list[list[float]]:
    return x.flatten(1).tolist()


# ============================================================================================ Gaussian augmentation

def test_gaussian_augmentation_loss_appends_noisy_copies():
    obj, model = GaussianAugmentation(sigma=0.3), linear()  # built first: nn.Linear's init draws too
    torch.manual_seed(4)
    loss, logits = obj.loss(model, X, Y)
    torch.manual_seed(4)
    noise = torch.randn(2, 1, 1, 2)  # documented draw: the noise of the M = N copies
    noisy = pixels((X + 0.3 * noise).clamp(0, 1))
    assert any(v in (0.0, 1.0) for row in noisy for v in row)  # the seed makes the clip matter
    rows = [(x, y) for x, y in zip(pixels(X), Y.tolist())] + [(x, y) for x, y in zip(noisy, Y.tolist())]
    expected = sum(py_ce(py_logits(x), onehot(y)) for x, y in rows) / 4
    assert val(loss) == pytest.approx(expected, rel=1e-5)
    # The logged accuracy is measured on the clean rows.
    assert torch.allclose(logits, torch.tensor([py_logits(x) for x in pixels(X)]), atol=1e-6)


def test_gaussian_augmentation_replace_mode_and_fractional_ratio():
    obj, model = GaussianAugmentation(sigma=0.05, augmentation=False), linear()
    torch.manual_seed(1)
    loss, logits = obj.loss(model, X, Y)
    torch.manual_seed(1)
    noisy = pixels((X + 0.05 * torch.randn(2, 1, 1, 2)).clamp(0, 1))
    expected = sum(py_ce(py_logits(x), onehot(y)) for x, y in zip(noisy, Y.tolist())) / 2
    assert val(loss) == pytest.approx(expected, rel=1e-5)
    assert logits.shape == (2, 3)

    # ratio 1.5 on 4 examples: 6 copies, every example once + 2 distinct ones, labels follow.
    x = torch.rand(4, 1, 3, 3)
    y = torch.tensor([0, 1, 2, 3])
    xn, yn = GaussianAugmentation(sigma=1e-6, ratio=1.5).augment(x, y)
    assert xn.shape == (6, 1, 3, 3) and yn[:4].tolist() == [0, 1, 2, 3]
    assert len(set(yn[4:].tolist())) == 2
    assert torch.allclose(xn, x[yn], atol=1e-4)  # the noisy copy i comes from example y_i


def test_gaussian_noise_scale_and_box():
    x = torch.full((200, 1, 8, 8), 0.5)
    xn, _ = GaussianAugmentation(sigma=0.1).augment(x, torch.zeros(200, dtype=torch.long))
    assert (xn - x).std().item() == pytest.approx(0.1, rel=0.05)
    xb, _ = GaussianAugmentation(sigma=2.0).augment(x, torch.zeros(200, dtype=torch.long))
    assert xb.min() == 0.0 and xb.max() == 1.0  # clipped to the pixel box, and it did clip


# ============================================================================================ label smoothing

def test_label_smoothing_art_targets():
    loss, _ = LabelSmoothing(max_value=0.7).loss(linear(), X, Y)
    off = 0.3 / 2  # (1 − max_value)/(K − 1), K = 3
    targets = [[0.7 if k == y else off for k in range(3)] for y in Y.tolist()]
    expected = sum(py_ce(py_logits(x), t) for x, t in zip(pixels(X), targets)) / 2
    assert val(loss) == pytest.approx(expected, rel=1e-6)
    # The uniform mix of torch gives the same loss at eps = (1 − m)·K/(K − 1), not at eps = 1 − m.
    z = linear()(X)
    assert val(loss) == pytest.approx(val(F.cross_entropy(z, Y, label_smoothing=0.3 * 3 / 2)), rel=1e-6)
    assert val(loss) != pytest.approx(val(F.cross_entropy(z, Y, label_smoothing=0.3)), rel=1e-3)
    assert val(LabelSmoothing(max_value=1.0).loss(linear(), X, Y)[0]) == pytest.approx(val(F.cross_entropy(z, Y)))
    with pytest.raises(ValueError, match="max_value"):
        LabelSmoothing(max_value=0.2).loss(linear(), X, Y)  # below 1/K = 1/3


# ============================================================================================ gradient regularization

@pytest.mark.parametrize("p", [1, 2])
def test_gradient_regularization_hand_computed(p):
    lam = 0.7
    loss, _ = GradientRegularization(lam=lam, p=p).loss(linear(), X, Y)
    expected = 0.0
    for x, y in zip(pixels(X), Y.tolist()):
        z = py_logits(x)
        d = [pk - tk for pk, tk in zip(py_softmax(z), onehot(y))]   # ∂CE/∂z = softmax − onehot
        g = [sum(W[k][j] * d[k] for k in range(3)) for j in range(2)]  # ∂CE/∂x = Wᵀ (softmax − onehot)
        pen = sum(v * v for v in g) if p == 2 else sum(abs(v) for v in g)
        expected += (py_ce(z, onehot(y)) + lam * pen) / 2
    assert val(loss) == pytest.approx(expected, rel=1e-5)


def test_gradient_penalty_equals_per_example_input_gradients_and_is_differentiable():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 4)).double()
    x, y = torch.rand(5, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0])
    ce, pen, _ = input_gradient_penalty(net, x, y, p=2)
    norms = []
    for i in range(5):
        xi = x[i:i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(net(xi), y[i:i + 1]), xi)
        norms.append(val(g.pow(2).sum()))
    assert val(pen) == pytest.approx(sum(norms) / 5, rel=1e-10)
    # Double backprop: the penalty depends on the weights through the graph of the gradient.
    assert pen.requires_grad
    w = net[3].weight
    (gw,) = torch.autograd.grad(pen, w)
    eps = 1e-6
    d = torch.zeros_like(w)
    d[1, 7] = eps
    with torch.no_grad():
        w += d
    up = val(input_gradient_penalty(net, x, y, p=2)[1])
    with torch.no_grad():
        w -= 2 * d
    down = val(input_gradient_penalty(net, x, y, p=2)[1])
    assert val(gw[1, 7]) == pytest.approx((up - down) / (2 * eps), rel=1e-4)


# ============================================================================================ contractive

def _mlp2() -> nn.Module:
    m = nn.Sequential(nn.Flatten(), nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        m[1].weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 2.0], [-0.3, 0.4]]))
        m[1].bias.copy_(torch.tensor([0.0, -0.4, 0.1]))
        m[3].weight.copy_(torch.tensor([[0.2, -0.7, 1.1], [0.9, 0.3, -0.4]]))
        m[3].bias.zero_()
    return m


def test_contractive_loss_replays_the_projection_draws():
    """Pairs (input of Linear1, input of Linear2 = ReLU output) and (input of Linear2, logits)."""
    m, lam = _mlp2(), 0.25
    torch.manual_seed(3)
    loss, _ = Contractive(lam=lam, samples=2).loss(m, X, torch.tensor([0, 1]))
    torch.manual_seed(3)
    v1 = [torch.randn(2, 3), torch.randn(2, 3)]  # pair 1, samples 1 and 2 (documented order)
    v2 = [torch.randn(2, 2), torch.randn(2, 2)]  # pair 2
    W1 = [[1.0, -1.0], [0.5, 2.0], [-0.3, 0.4]]
    b1 = [0.0, -0.4, 0.1]  # no pre-activation exactly at the kink
    W2 = [[0.2, -0.7, 1.1], [0.9, 0.3, -0.4]]
    pen, ce = 0.0, 0.0
    for i, (x, y) in enumerate(zip(pixels(X), [0, 1])):
        pre = [sum(w * xj for w, xj in zip(row, x)) + b for row, b in zip(W1, b1)]
        h = [max(0.0, v) for v in pre]
        mask = [1.0 if v > 0 else 0.0 for v in pre]
        ce += py_ce(py_logits(h, W2, [0.0, 0.0]), onehot(y, 2)) / 2
        for s in range(2):
            a = v1[s][i].tolist()  # Jᵀv with J = diag(mask)·W1
            jtv = [sum(W1[k][j] * mask[k] * a[k] for k in range(3)) for j in range(2)]
            pen += sum(t * t for t in jtv) / 2 / 2          # / samples / N
            c = v2[s][i].tolist()  # Jᵀv with J = W2
            jtv = [sum(W2[k][j] * c[k] for k in range(2)) for j in range(3)]
            pen += sum(t * t for t in jtv) / 2 / 2
    assert val(loss) == pytest.approx(ce + lam * pen, rel=1e-5)


def test_contractive_estimator_matches_exact_jacobian_norms():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3))
    x = torch.rand(3, 1, 4, 4)
    # Many draws in one call: 2,000 copies of the 3 examples, one projection each. The estimate
    # is a mean over the batch, so this averages 2,000 draws per example.
    torch.manual_seed(1)
    _, total, per_pair = contractive_penalty(net, x.repeat(2000, 1, 1, 1), hooked_layers(net), samples=1)
    f1 = nn.Sequential(*net[:4])  # conv input -> linear input
    exact1 = sum(val(torch.autograd.functional.jacobian(f1, x[i:i + 1]).pow(2).sum()) for i in range(3)) / 3
    exact2 = val(net[4].weight.pow(2).sum())  # the head is linear: J = W for every example
    assert val(per_pair[0]) == pytest.approx(exact1, rel=0.05)
    assert val(per_pair[1]) == pytest.approx(exact2, rel=0.05)
    assert val(total) == pytest.approx(exact1 + exact2, rel=0.05)
    # `samples` averages draws: the same estimate from 3 draws on 700 copies.
    torch.manual_seed(2)
    _, total3, _ = contractive_penalty(net, x.repeat(700, 1, 1, 1), hooked_layers(net), samples=3)
    assert val(total3) == pytest.approx(exact1 + exact2, rel=0.05)


def test_contractive_layers_option_and_errors():
    m = _mlp2()
    assert [n for n, _ in hooked_layers(m)] == ["1", "3"]
    assert [n for n, _ in hooked_layers(m, ["3"])] == ["3"]
    with pytest.raises(ValueError, match="`layers`.*'9'"):
        hooked_layers(m, ["9"])
    with pytest.raises(ValueError, match="no Linear or Conv"):
        hooked_layers(nn.Sequential(nn.Flatten(), nn.ReLU()))
    # Only the head hooked: the single pair (head input, logits) has J = W2.
    torch.manual_seed(0)
    _, pen, _ = contractive_penalty(m, X.repeat(2000, 1, 1, 1), hooked_layers(m, ["3"]))
    assert val(pen) == pytest.approx(val(m[3].weight.pow(2).sum()), rel=0.06)
    assert json.loads(json.dumps(Contractive(layers=["3"]).config()))["layers"] == ["3"]


# ============================================================================================ distillation

def test_distillation_losses_hand_computed_and_teacher_frozen():
    T = 2.5
    teacher = linear([[0.3, 0.2], [-1.0, 0.8], [2.0, -0.5]], [0.0, 0.3, -0.1])
    student = linear()
    obj = Distillation(teacher=teacher, temperature=T)
    loss, logits = obj.loss(student, X, Y)
    expected = 0.0
    for x in pixels(X):
        zt = py_logits(x, [[0.3, 0.2], [-1.0, 0.8], [2.0, -0.5]], [0.0, 0.3, -0.1])
        soft = py_softmax([v / T for v in zt])
        expected += py_ce([v / T for v in py_logits(x)], soft) / 2
    assert val(loss) == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(logits, student(X))  # inference at T = 1: the logits unchanged
    t2, _ = Distillation(teacher=teacher, temperature=T, t_squared=True).loss(student, X, Y)
    assert val(t2) == pytest.approx(expected * T * T, rel=1e-6)
    # teacher=None trains the teacher: hard labels, softmax at temperature T.
    hard, _ = Distillation(temperature=T).loss(student, X, Y)
    assert val(hard) == pytest.approx(sum(py_ce([v / T for v in py_logits(x)], onehot(y))
                                            for x, y in zip(pixels(X), Y.tolist())) / 2, rel=1e-6)
    # Frozen: no gradient reaches the teacher, later edits of the passed module change nothing.
    loss.backward()
    assert teacher[1].weight.grad is None and student[1].weight.grad is not None
    soft_before = obj.soft_labels(X)
    with torch.no_grad():
        teacher[1].weight.mul_(3.0)
    assert torch.equal(obj.soft_labels(X), soft_before)
    cfg = json.loads(json.dumps(obj.config()))  # JSON-serializable: a digest, not the module
    assert cfg["teacher"]["weights"] == weights_digest(linear([[0.3, 0.2], [-1.0, 0.8], [2.0, -0.5]], [0.0, 0.3, -0.1]))
    assert cfg["teacher"]["weights"] != weights_digest(teacher)


def test_distillation_teacher_in_eval_mode_and_bad_options():
    teacher = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(2, 3))
    obj = Distillation(teacher=teacher, temperature=1.0)
    assert torch.equal(obj.soft_labels(X), obj.soft_labels(X))  # dropout off: deterministic labels
    assert teacher.training  # the caller's module is not touched
    with pytest.raises(ValueError, match="temperature"):
        Distillation(temperature=0.0)
    with pytest.raises(TypeError, match="teacher"):
        Distillation(teacher=42)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def digits_ds() -> tuple[Dataset, Dataset]:
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def _mlp(ds: Dataset, seed: int, hidden=(32,)) -> nn.Module:
    # A list, not a tuple: the checkpoint compares the JSON-saved spec kwargs (lists) with the
    # model's own, and a tuple would make resume report another architecture.
    hidden = list(hidden)
    torch.manual_seed(seed)
    return create_model("mlp", ds.num_classes, ds.shape, ds.mean, ds.std, hidden=hidden)


def test_defensive_distillation_student_matches_teacher_and_saturates(digits_ds, tmp_path):
    """Teacher at T, student on its soft labels (teacher loaded from its run folder by path)."""
    tr, te = digits_ds
    T = 10.0
    cfg = TrainConfig(epochs=4, batch_size=64, optimizer="adam", lr=0.02, schedule="onecycle", seed=1, weight_decay=0.0)
    teacher = _mlp(tr, 1, (64,))
    Trainer(teacher, tr, te, cfg, create_objective("distillation", temperature=T), run_dir=tmp_path / "teacher",
            progress=False).fit()
    obj = create_objective("distillation", teacher=str(tmp_path / "teacher"), temperature=T)
    assert obj.config()["teacher"]["path"] == str(tmp_path / "teacher")
    student = _mlp(tr, 2, (64,))
    report = Trainer(student, tr, te, cfg, obj, progress=False).fit()
    assert report["final"]["test_acc"] > 0.85
    standard = _mlp(tr, 3, (64,))  # the baseline: same network and budget, plain cross-entropy (T = 1)
    Trainer(standard, tr, te, cfg, create_objective("standard"), progress=False).fit()
    x = tr.images
    with torch.no_grad():
        zs, zt = student.eval()(x), teacher.eval()(x)
        log_ps, log_pt = F.log_softmax(zs / T, 1), F.log_softmax(zt / T, 1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(1).mean()
        agree = (zs.argmax(1) == zt.argmax(1)).float().mean()
        z_standard = standard.eval()(x)
    assert val(agree) > 0.95 and val(kl) < 0.05
    # At T = 1 the student's logits are several times a standard network's: its softmax saturates.
    assert zs.std(1).mean() > 3 * z_standard.std(1).mean()
    p_student, p_standard = F.softmax(zs, 1).max(1).values, F.softmax(z_standard, 1).max(1).values
    assert (1 - p_student).mean() < 0.5 * (1 - p_standard).mean()


# ============================================================================================ through the Trainer

class Crash(Objective):
    """Delegates to a real objective and raises after `at` loss calls (a simulated kill)."""

    name = "crash"

    def __init__(self, inner: Objective, at: int) -> None:
        self.inner, self.at, self.calls = inner, at, 0

    def loss(self, model, x, y):
        self.calls += 1
        if self.calls > self.at:
            raise KeyboardInterrupt
        return self.inner.loss(model, x, y)

    def config(self):
        return self.inner.config()


def _objective(name: str) -> Objective:
    if name == "distillation-student":
        # Any fixed network will do as a teacher for exactness: a seeded untrained MLP.
        teacher = create_model("mlp", 10, (1, 8, 8), hidden=(16,))
        with torch.no_grad():
            for i, p in enumerate(teacher.parameters()):
                p.copy_(torch.linspace(-1, 1, p.numel()).reshape(p.shape).roll(i))
        return create_objective("distillation", teacher=teacher, temperature=2.0)
    opts = {"gaussian-augmentation": {"sigma": 0.2},
            "distillation": {"temperature": 2.0},  # teacher=None: training the teacher at T
            "contractive": {"lam": 1e-2, "samples": 1},
            "gradient-regularization": {"lam": 1.0}}.get(name, {})
    return create_objective(name, **opts)


@pytest.mark.parametrize("name", MINE + ["distillation-student"])
def test_trains_on_digits_and_resumes_bit_identically(name, digits_ds, tmp_path):
    tr, te = digits_ds
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.05, schedule="onecycle", seed=3, checkpoint_every=7)
    ref = _mlp(tr, 0)
    report = Trainer(ref, tr, te, cfg, _objective(name), progress=False).fit()
    assert math.isfinite(report["final"]["train_loss"])
    if name != "distillation-student":  # (its teacher is arbitrary)
        assert report["final"]["test_acc"] > 0.6
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # 23 steps per epoch: dies in epoch 2, after checkpoint 28
        Trainer(_mlp(tr, 0), tr, te, cfg, Crash(_objective(name), at=31), run_dir=run, progress=False).fit()
    resumed = _mlp(tr, 0)
    Trainer(resumed, tr, te, cfg, _objective(name), run_dir=run, resume=True, progress=False).fit()
    a, b = ref.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_registered_and_validated():
    from bastion.defenses.training import list_objectives

    assert set(MINE) <= set(list_objectives())
    for name in MINE:
        json.dumps(create_objective(name).config())
    for name, kwargs, match in [
        ("gaussian-augmentation", {"sigma": 0.0}, "sigma"), ("gaussian-augmentation", {"ratio": -1.0}, "ratio"),
        ("gaussian-augmentation", {"augmentation": "yes"}, "augmentation"),
        ("label-smoothing", {"max_value": 1.5}, "max_value"),
        ("contractive", {"lam": -1.0}, "lam"), ("contractive", {"samples": 0}, "samples"),
        ("contractive", {"layers": "head"}, "layers"), ("gradient-regularization", {"p": 3}, "`p`"),
        ("gradient-regularization", {"lam": float("nan")}, "lam"), ("distillation", {"t_squared": 1}, "t_squared"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            create_objective(name, **kwargs)
