"""The obfuscation signal, and the adaptive building blocks that see through it.

A quantizing input layer gives gradient attacks a zero gradient: FGSM and PGD look helpless,
gradient-free attacks are not, and PGD through BPDA breaks the same model. A randomized model
makes a single-draw PGD stop on lucky draws; EOT-PGD, measured with many draws, does better.
Numbers are printed (``pytest -s``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bastion.attacks import FGSM, PGD, logits_and_grad
from bastion.attacks.adaptive import BPDA, EOT, identity, learn_bpda, with_bpda
from bastion.attacks.losses import ce
from bastion.attacks.spsa import SPSA
from bastion.attacks.square import Square

N = 32
EPS = 0.15



class Quantize(nn.Module):
    """round(4x)/4: five grey levels. torch.round has a zero gradient: the gradient is masked."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 4) / 4


class GaussianNoise(nn.Module):
    """A randomized input layer: x + σ·N(0, 1), a fresh draw per example and per call."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.sigma * torch.randn_like(x)


@pytest.fixture(scope="module")
def batch(digits):
    return digits["x_test"][:N].clone(), digits["y_test"][:N].clone()


@pytest.fixture(scope="module")
def masked(digits_model) -> nn.Module:
    return nn.Sequential(Quantize(), digits_model).eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


# --------------------------------------------------------------------------- gradient masking
def test_quantizer_masks_the_gradient(masked, batch):
    x, y = batch
    _, _, grad = logits_and_grad(masked, x, y, ce)
    assert bool((grad == 0).all())


def test_obfuscation_signal(masked, batch):
    """Gradient attacks fail on the masked model, gradient-free ones and BPDA-PGD succeed."""
    x, y = batch
    threat = f"linf:{EPS}"
    clean = accuracy(masked, x, y)
    fgsm = FGSM()(masked, x, y, threat).robust_accuracy(y)
    pgd = PGD(steps=20)(masked, x, y, threat, seed=0).robust_accuracy(y)
    # δ larger than the quantization step: SPSA's finite differences must see the staircase
    spsa = SPSA(steps=50, nb_sample=32, delta=0.1, lr=0.02)(masked, x, y, threat, seed=0).robust_accuracy(y)
    square = Square(n_queries=300)(masked, x, y, threat, seed=0).robust_accuracy(y)
    bpda_res = PGD(steps=20)(with_bpda(Quantize(), masked[1]), x, y, threat, seed=0)
    bpda = accuracy(masked, bpda_res.x_adv, y)  # evaluated on the real masked model
    print(f"\nmasked model, linf {EPS}: clean {clean:.3f} | FGSM {fgsm:.3f} PGD {pgd:.3f} | "
          f"SPSA {spsa:.3f} Square {square:.3f} | BPDA-PGD {bpda:.3f}")
    assert fgsm >= clean - 0.05 and pgd >= clean - 0.1  # the false sense of security
    assert spsa <= clean - 0.5 and square <= clean - 0.5  # gradient-free attacks see through it
    assert bpda <= clean - 0.5  # and so does PGD with the straight-through gradient
    assert bpda_res.robust_accuracy(y) == bpda  # BPDA's forward is the real component


# --------------------------------------------------------------------------- BPDA
def test_bpda_forward_is_exact_and_backward_is_the_stand_in(batch):
    x = batch[0].clone().requires_grad_(True)
    stand_in = lambda t: torch.sin(3 * t)  # noqa: E731 - any differentiable g
    b = BPDA(Quantize(), backward=stand_in)
    out = b(x)
    assert torch.equal(out, Quantize()(x.detach()))
    w = torch.randn_like(out)
    (g_bpda,) = torch.autograd.grad((out * w).sum(), [x])
    (g_ref,) = torch.autograd.grad((stand_in(x) * w).sum(), [x])
    assert torch.allclose(g_bpda, g_ref, atol=1e-6)
    # identity stand-in: the upstream gradient passes unchanged
    (g_id,) = torch.autograd.grad((BPDA(Quantize(), identity)(x) * w).sum(), [x])
    assert torch.equal(g_id, w)


def test_bpda_with_a_module_stand_in_writes_no_parameter_grad(batch):
    x = batch[0].clone().requires_grad_(True)
    net = nn.Conv2d(1, 1, 3, padding=1)
    b = BPDA(Quantize(), backward=net)
    (g,) = torch.autograd.grad(b(x).sum(), [x])
    (g_ref,) = torch.autograd.grad(net(x).sum(), [x])
    assert torch.allclose(g, g_ref, atol=1e-6)
    assert all(p.grad is None for p in net.parameters())
    assert "stand_in" in dict(b.named_children())  # follows .to(device) and attack_mode
    with pytest.raises(ValueError, match="shape-preserving"):
        BPDA(lambda t: t.flatten(1))(x)


def test_learned_bpda_imitates_the_quantizer(digits, digits_model, batch):
    x, y = batch
    g = learn_bpda(Quantize(), digits["x_train"][:256], epochs=30, noise=0.0)
    xt = digits["x_test"]
    with torch.no_grad():
        mse = float(((g(xt) - Quantize()(xt)) ** 2).mean())
        mse_identity = float(((xt - Quantize()(xt)) ** 2).mean())
    res = PGD(steps=20)(with_bpda(Quantize(), digits_model, backward=g), x, y, f"linf:{EPS}", seed=0)
    masked = nn.Sequential(Quantize(), digits_model)
    print(f"\nlearned stand-in MSE {mse:.5f} (identity {mse_identity:.5f}); PGD through it: "
          f"{accuracy(masked, res.x_adv, y):.3f} (clean {accuracy(masked, x, y):.3f})")
    assert mse < 0.004  # below the quantization noise of a uniform input, (1/4)²/12 ≈ 0.0052
    assert mse <= mse_identity * 1.05
    assert accuracy(masked, res.x_adv, y) <= accuracy(masked, x, y) - 0.5
    assert not any(p.requires_grad for p in g.parameters()) and not g.training


# --------------------------------------------------------------------------- EOT
def multi_draw_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int = 20) -> float:
    """Accuracy of a randomized model averaged over independent draws (one draw is noise)."""
    with torch.no_grad():
        return float(torch.stack([(model(x).argmax(1) == y).float() for _ in range(draws)]).mean())


def test_eot_pgd_at_least_as_strong_as_pgd(digits_model, batch):
    x, y = batch
    noisy = nn.Sequential(GaussianNoise(0.2), digits_model).eval()
    threat = "linf:0.1"
    torch.manual_seed(0)
    clean = multi_draw_accuracy(noisy, x, y)
    plain = PGD(steps=20)(noisy, x, y, threat, seed=0)
    eot = PGD(steps=20)(EOT(noisy, n=10), x, y, threat, seed=0)
    torch.manual_seed(1)
    acc_plain, acc_eot = multi_draw_accuracy(noisy, plain.x_adv, y), multi_draw_accuracy(noisy, eot.x_adv, y)
    print(f"\nnoisy model (σ=0.2), linf 0.1, 20-draw accuracy: clean {clean:.3f}, PGD {acc_plain:.3f} "
          f"(its single-draw report {plain.robust_accuracy(y):.3f}), EOT-PGD {acc_eot:.3f} "
          f"(single-draw {eot.robust_accuracy(y):.3f})")
    assert acc_eot <= acc_plain + 0.02
    assert acc_eot <= clean - 0.2


def test_eot_of_a_deterministic_model_is_the_model(digits_model, batch):
    x, _ = batch
    with torch.no_grad():
        z = digits_model(x)
        assert torch.allclose(EOT(digits_model, n=4)(x), z, atol=1e-5)
        assert torch.allclose(EOT(digits_model, n=4, average="probs")(x), torch.log_softmax(z, 1), atol=1e-5)
        chunked = EOT(digits_model, n=5, max_batch_size=2 * N)(x)  # 2 draws per forward, 3 forwards
        assert torch.allclose(chunked, z, atol=1e-5)
        assert torch.allclose(EOT(digits_model, n=3, batched=False)(x), z, atol=1e-5)


def test_eot_averages_independent_draws():
    torch.manual_seed(0)
    noise = GaussianNoise(1.0)
    flat = nn.Sequential(noise, nn.Flatten())  # "logits" = the noisy input itself
    x = torch.zeros(4, 1, 1, 2)
    for batched in (True, False):
        out = EOT(flat, n=400, batched=batched)(x)
        assert out.shape == (4, 2)
        assert float(out.abs().max()) < 0.25  # mean of 400 N(0,1): std 0.05; one draw would be ~1
    with pytest.raises(ValueError, match="`average`"):
        EOT(flat, average="median")
    with pytest.raises(ValueError, match="`n`"):
        EOT(flat, n=0)
