"""Generative purifiers: PixelCNN / PixelDefend, GAN / Defense-GAN, denoising autoencoder / MagNet.

Every model here is trained for a few seconds on scikit-learn's 8×8 digits; the quality checks
that need longer training are marked slow.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bastion.checkpoint import CheckpointError
from bastion.defenses.generative import (
    DenoisingAutoencoder,
    Generator,
    PixelCNN,
    causal_mask,
    defensegan_project,
    load_autoencoder,
    load_generative,
    load_generator,
    load_pixelcnn,
    pixeldefend,
    probability_divergence,
    save_generative,
    train_autoencoder,
    train_gan,
    train_pixelcnn,
)
from bastion.defenses.pipeline import Defended
from bastion.defenses.transforms import create_transform
from bastion.defenses.transforms.purifiers import DefenseGAN, MagNetReformer, PixelDefend

LEVELS = 17  # the digits take the values k/16 exactly



@pytest.fixture(scope="module")
def pcnn(digits) -> PixelCNN:
    return train_pixelcnn(digits["x_train"][:400], epochs=3, levels=LEVELS, hidden=24, blocks=2, batch_size=32,
                          lr=3e-3, seed=0, progress=False)


@pytest.fixture(scope="module")
def gen(digits) -> Generator:
    return train_gan(digits["x_train"], epochs=4, latent_dim=16, width=16, batch_size=32, lr=2e-3, seed=0,
                     progress=False)


@pytest.fixture(scope="module")
def ae(digits) -> DenoisingAutoencoder:
    # MagNet's detector-II structure: on 8×8 digits, average pooling (the reformer's [3, "average", 3])
    # leaves too little to reconstruct after a few seconds of training
    return train_autoencoder(digits["x_train"], epochs=8, structure=[3], batch_size=32, lr=1e-2, seed=0,
                             progress=False)


def _before(i: int, j: int, c: int, ii: torch.Tensor, jj: torch.Tensor, cc: torch.Tensor) -> torch.Tensor:
    """Sub-pixels strictly before (c, i, j) in PixelCNN order (raster, then channel)."""
    return (ii < i) | ((ii == i) & (jj < j)) | ((ii == i) & (jj == j) & (cc < c))


# ----------------------------------------------------------------------------- PixelCNN
@pytest.mark.parametrize("channels", [1, 3])
def test_pixelcnn_is_causal(channels):
    """d logits(c, i, j) / d x is zero at (c, i, j) and everything after it; non-zero before."""
    torch.manual_seed(0)
    m = PixelCNN(channels, levels=5, hidden=12, blocks=2, first_kernel=5)
    h = w = 7
    x = torch.rand(1, channels, h, w, requires_grad=True)
    out = m(x)
    cc, ii, jj = torch.meshgrid(torch.arange(channels), torch.arange(h), torch.arange(w), indexing="ij")
    for c, i, j in [(0, 0, 0), (0, 3, 3), (channels - 1, 3, 3), (channels - 1, 6, 6), (0, 6, 0)]:
        (g,) = torch.autograd.grad(out[0, :, c, i, j].sum(), x, retain_graph=True)
        before = _before(i, j, c, ii, jj, cc)
        assert (g[0][~before] == 0).all(), f"output ({c},{i},{j}) sees a later sub-pixel"
        if before.any():
            assert (g[0][before] != 0).any()
    # the first sub-pixel sees nothing: its distribution is the same for every image
    assert torch.equal(m(torch.zeros(1, channels, h, w))[0, :, 0, 0, 0], m(torch.ones(1, channels, h, w))[0, :, 0, 0, 0])


def test_mask_types_differ_only_at_the_centre():
    a, b = causal_mask(4, 4, 3, "A", 2), causal_mask(4, 4, 3, "B", 2)
    assert torch.equal(a[:, :, 0], b[:, :, 0]) and (a[:, :, 2] == 0).all()
    assert a[:, :, 1, 1].sum() < b[:, :, 1, 1].sum()
    assert a[:, :, 1, 2].sum() == 0  # right of the centre: never visible


def test_logits_at_equals_the_full_forward_on_its_crop():
    torch.manual_seed(1)
    m = PixelCNN(2, levels=4, hidden=8, blocks=3, first_kernel=3)
    x = torch.rand(3, 2, 11, 10)
    full = m(x)
    for i, j in [(0, 0), (5, 4), (10, 9), (10, 0), (3, 9)]:
        torch.testing.assert_close(m.logits_at(x, i, j), full[:, :, :, i, j], rtol=0, atol=1e-6)


def test_pixelcnn_likelihood_improves_with_training(digits, pcnn):
    untrained = train_pixelcnn(digits["x_train"][:400], epochs=0, levels=LEVELS, hidden=24, blocks=2, seed=0,
                               progress=False)
    x = digits["x_test"][:100]
    with torch.no_grad():
        before, after = untrained.nll(x).mean().item(), pcnn.nll(x).mean().item()
    assert after < before - 0.3, (before, after)
    hist = pcnn.training_info["train_bits_per_dim"]
    assert len(hist) == 3 and hist[-1] < hist[0]


def test_training_is_reproducible_and_leaves_the_global_rng_alone(digits):
    x = digits["x_train"][:64]
    torch.manual_seed(123)
    a = train_pixelcnn(x, epochs=1, levels=5, hidden=8, blocks=1, seed=7, progress=False)
    after_a = torch.rand(1)
    torch.manual_seed(123)
    b = train_pixelcnn(x, epochs=1, levels=5, hidden=8, blocks=1, seed=7, progress=False)
    assert torch.equal(after_a, torch.rand(1))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    c = train_pixelcnn(x, epochs=1, levels=5, hidden=8, blocks=1, seed=8, progress=False)
    assert not torch.equal(a.inp.weight, c.inp.weight)


# ----------------------------------------------------------------------------- PixelDefend
def test_pixeldefend_stays_within_eps_is_deterministic_and_batch_consistent(digits, pcnn):
    torch.manual_seed(0)
    x = (digits["x_test"][:24] + 0.1 * torch.randn(24, 1, 8, 8)).clamp(0, 1)  # off the level grid
    eps = 2 / 16
    t = PixelDefend(pcnn, eps_defend=eps)
    out = t(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert (out - x).abs().max() <= eps + 1e-7
    assert out.min() >= 0 and out.max() <= 1
    assert (out != x).float().mean() > 0.3  # it does purify
    assert torch.equal(out, t(x))  # greedy: deterministic
    assert torch.equal(out[5:9], t(x[5:9]))  # images are purified independently
    assert not t.randomized and not t.differentiable
    assert torch.equal(t.bpda(x), x)


def test_pixeldefend_raises_likelihood(digits, pcnn):
    torch.manual_seed(1)
    x = (digits["x_test"][:32] + 0.15 * torch.randn(32, 1, 8, 8)).clamp(0, 1)
    x = pcnn.dequantize(pcnn.quantize(x))  # compare likelihoods of on-grid images
    out = pixeldefend(pcnn, x, eps_defend=3 / 16)
    with torch.no_grad():
        assert pcnn.nll(out).mean() < pcnn.nll(x).mean() - 0.2


def test_pixeldefend_with_zero_budget_returns_on_grid_input(digits, pcnn):
    x = digits["x_test"][:8]
    assert torch.equal(pixeldefend(pcnn, x, 0.0), x)
    # a window holding no quantization level leaves the sub-pixel unchanged (levels 0, 1/4, 1/2, ...)
    coarse = PixelCNN(1, levels=5, hidden=4, blocks=0, first_kernel=3)
    x = torch.full((2, 1, 3, 3), 0.1)
    assert torch.equal(pixeldefend(coarse, x, 0.05), x)
    out = pixeldefend(coarse, x, 0.2)  # window [-0.1, 0.3]: levels 0 and 1/4
    assert ((out == 0) | (out == 0.25)).all()


def test_pixelcnn_samples_are_images_on_its_levels(pcnn):
    s = pcnn.sample(3, (4, 5), generator=torch.Generator().manual_seed(0))
    assert s.shape == (3, 1, 4, 5) and s.min() >= 0 and s.max() <= 1
    assert torch.equal(pcnn.dequantize(pcnn.quantize(s)), s)
    assert torch.equal(s, pcnn.sample(3, (4, 5), generator=torch.Generator().manual_seed(0)))


def test_pixeldefend_sampling_is_randomized_and_seeded(digits, pcnn):
    x = digits["x_test"][:8]
    t = PixelDefend(pcnn, eps_defend=3 / 16, sample=True, seed=3)
    assert t.randomized and not PixelDefend.randomized
    a, b = t(x), t(x)
    assert not torch.equal(a, b)
    assert torch.equal(a, PixelDefend(pcnn, eps_defend=3 / 16, sample=True, seed=3)(x))
    assert (a - x).abs().max() <= 3 / 16 + 1e-7


def test_pixeldefend_follows_dtype_and_checks_channels(digits, pcnn):
    x = digits["x_test"][:2].double()
    assert PixelDefend(pcnn, 1 / 16)(x).dtype == torch.float64
    with pytest.raises(ValueError, match="channel"):
        PixelDefend(pcnn, 1 / 16)(torch.rand(2, 3, 8, 8))


# ----------------------------------------------------------------------------- Defense-GAN
def test_defensegan_output_is_the_generator_at_the_returned_z(digits, gen):
    x = digits["x_test"][:10]
    t = DefenseGAN(gen, restarts=3, steps=20, seed=0)
    out, z, err = t.project(x)
    assert z.shape == (10, gen.latent_dim)
    with torch.no_grad():
        again = gen(z)
    torch.testing.assert_close(out, again, rtol=0, atol=1e-6)
    torch.testing.assert_close(err, (again - x).pow(2).flatten(1).mean(1), rtol=1e-4, atol=1e-6)
    assert out.min() > 0 and out.max() < 1  # the generator's range: a sigmoid


def test_defensegan_restarts_and_steps_are_configurable_and_batched(digits, gen):
    """R descent steps on all N·L latent codes at once: R + 1 generator calls on N·L codes."""
    calls: list[int] = []
    hook = gen.fc.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    try:
        defensegan_project(gen, digits["x_test"][:5], restarts=4, steps=7, rng=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert calls == [20] * 8 + [5]


def test_defensegan_descent_reduces_the_reconstruction_error(digits, gen):
    x = digits["x_test"][:20]
    errs = [defensegan_project(gen, x, restarts=2, steps=r, rng=torch.Generator().manual_seed(0))[2].mean().item()
            for r in (1, 40)]
    assert errs[1] < 0.8 * errs[0], errs
    adam = defensegan_project(gen, x, restarts=2, steps=40, optimizer="adam", rng=torch.Generator().manual_seed(0))
    assert adam[2].mean().item() < errs[0]


def test_defensegan_reconstructions_keep_the_class(digits, digits_model, gen):
    """Even a generator trained for seconds maps clean digits to images of the same digit, mostly."""
    x, y = digits["x_test"][:40], digits["y_test"][:40]
    out = DefenseGAN(gen, restarts=5, steps=50, seed=0)(x)
    with torch.no_grad():
        acc = (digits_model(out).argmax(1) == y).float().mean().item()
    assert acc > 0.3  # chance is 0.1; about 0.55 here, 0.95 on mnist-5k with the default training


def test_defensegan_is_randomized_and_seed_reproduces(digits, gen):
    x = digits["x_test"][:6]
    t = DefenseGAN(gen, restarts=2, steps=5, seed=11)
    a, b = t(x), t(x)
    assert not torch.equal(a, b)  # fresh random starts at every call
    assert torch.equal(a, DefenseGAN(gen, restarts=2, steps=5, seed=11)(x))
    assert torch.equal(a, t.manual_seed(11)(x))
    g = DefenseGAN(gen, restarts=2, steps=5)  # global RNG
    torch.manual_seed(5)
    c = g(x)
    torch.manual_seed(5)
    assert torch.equal(c, g(x))
    assert t.randomized and not t.differentiable
    with torch.inference_mode():  # the inner descent still differentiates G
        assert DefenseGAN(gen, restarts=2, steps=5, seed=11)(x).shape == x.shape
    # chunking does not change which z an image gets
    chunked = defensegan_project(gen, x, 2, 5, rng=torch.Generator().manual_seed(2), batch_size=4)[0]
    whole = defensegan_project(gen, x, 2, 5, rng=torch.Generator().manual_seed(2))[0]
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize("which", ["defense-gan", "pixeldefend"])
def test_adaptive_view_passes_gradients_where_the_naive_one_is_zero(digits, digits_model, gen, pcnn, which):
    """BPDA (identity) through the purifier gives a usable input gradient; straight through it is zero."""
    t = DefenseGAN(gen, restarts=1, steps=3, seed=0) if which == "defense-gan" else PixelDefend(pcnn, 1 / 16)
    d = Defended([t], digits_model)
    x = digits["x_test"][:4].clone().requires_grad_(True)
    y = digits["y_test"][:4]
    (g,) = torch.autograd.grad(nn.functional.cross_entropy(d.adaptive_view()(x), y), x)
    assert g.abs().sum() > 0
    (naive,) = torch.autograd.grad(nn.functional.cross_entropy(d(x), y), x)
    assert (naive == 0).all()
    assert not d.differentiable and d.randomized == (which == "defense-gan")
    assert d.declarations()[0]["name"] == which


def test_defensegan_declarations(digits, digits_model, gen):
    d = Defended([DefenseGAN(gen, restarts=1, steps=3, seed=0)], digits_model)
    assert not d.differentiable and d.randomized
    assert {"name": "defense-gan", "differentiable": False, "randomized": True}.items() <= d.declarations()[0].items()


# ----------------------------------------------------------------------------- MagNet
def test_autoencoder_error_is_lower_on_clean_digits(digits, ae):
    x = digits["x_test"]
    torch.manual_seed(0)
    with torch.no_grad():
        clean = ae.reconstruction_error(x)
        noisy = ae.reconstruction_error((x + 0.2 * torch.randn_like(x)).clamp(0, 1))
        # an "adversarial-looking" input: a ±0.15 sign pattern, as FGSM leaves
        signed = ae.reconstruction_error((x + 0.15 * torch.randn_like(x).sign()).clamp(0, 1))
        clean2 = ae.reconstruction_error(x, p=2)
    assert clean.shape == (len(x),)
    assert clean.mean() < 0.8 * noisy.mean() and clean.mean() < 0.8 * signed.mean()
    assert (clean < signed).float().mean() > 0.8  # per image, not only on average
    assert clean2.mean() < clean.mean()  # errors < 1: squares are smaller
    assert ae.training_info["train_mse"][-1] < ae.training_info["train_mse"][0]


def test_magnet_reformer_is_differentiable_through_the_autoencoder(digits, ae, digits_model):
    t = create_transform("magnet", model=ae)
    assert isinstance(t, MagNetReformer) and t.differentiable and not t.randomized
    x = digits["x_test"][:8].clone().requires_grad_(True)
    out = t(x)
    torch.testing.assert_close(out, ae(x))
    (g,) = torch.autograd.grad(out.sum(), x)
    assert g.abs().sum() > 0
    assert torch.equal(t.bpda(x), out)
    assert t(x.double()).dtype == torch.float64
    # the reformer alone should not destroy clean accuracy
    with torch.no_grad():
        acc = (digits_model(t(digits["x_test"])).argmax(1) == digits["y_test"]).float().mean()
    assert acc > 0.5
    div = probability_divergence(digits_model, ae, digits["x_test"][:16])
    assert div.shape == (16,) and (div >= 0).all()


def test_autoencoder_handles_odd_sizes():
    m = DenoisingAutoencoder(1, [3, "max", 3])
    assert m(torch.rand(2, 1, 7, 9)).shape == (2, 1, 7, 9)


# ----------------------------------------------------------------------------- checkpoints
def test_save_load_round_trips_exactly(tmp_path, digits, pcnn, gen, ae):
    x = digits["x_test"][:4]
    for model, loader, name in [(pcnn, load_pixelcnn, "pixelcnn"), (gen, load_generator, "generator"),
                                (ae, load_autoencoder, "autoencoder")]:
        stem = tmp_path / name
        save_generative(stem, model, {"note": name})
        meta = json.loads(stem.with_suffix(".json").read_text())
        assert meta["state"]["config"] == model.config()
        back = loader(stem)
        assert type(back) is type(model) and not back.training
        sd, sd2 = model.state_dict(), back.state_dict()
        assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
        assert back.training_info == {"note": name}
        assert load_generative(stem).config() == model.config()
    with torch.no_grad():
        assert torch.equal(load_pixelcnn(tmp_path / "pixelcnn")(x), pcnn(x))
        assert torch.equal(load_autoencoder(tmp_path / "autoencoder")(x), ae(x))
        z = torch.randn(3, gen.latent_dim)
        assert torch.equal(load_generator(tmp_path / "generator")(z), gen(z))
    with pytest.raises(CheckpointError, match="autoencoder"):
        load_pixelcnn(tmp_path / "autoencoder")


def test_transforms_load_from_checkpoint_paths(tmp_path, digits, pcnn, gen, ae):
    x = digits["x_test"][:3]
    train_autoencoder(digits["x_train"][:32], epochs=1, seed=0, progress=False, save_to=tmp_path / "ae")
    save_generative(tmp_path / "pcnn", pcnn)
    save_generative(tmp_path / "gen", gen)
    m = create_transform(f"magnet:model={tmp_path / 'ae'}")
    torch.testing.assert_close(m(x), load_autoencoder(tmp_path / "ae")(x))
    p = create_transform(f"pixeldefend:model={tmp_path / 'pcnn'},eps_defend=0.125")
    assert torch.equal(p(x), PixelDefend(pcnn, 0.125)(x))
    d = create_transform(f"defense-gan:model={tmp_path / 'gen'},restarts=2,steps=3,seed=1")
    assert torch.equal(d(x), DefenseGAN(gen, restarts=2, steps=3, seed=1)(x))
    assert p.config()["model"] == str(tmp_path / "pcnn") and d.config()["restarts"] == 2
    json.dumps([p.config(), d.config(), m.config()])


# ----------------------------------------------------------------------------- bad options
def test_bad_options_raise_naming_them(pcnn, gen, ae):
    with pytest.raises(ValueError, match="eps_defend"):
        PixelDefend(pcnn, eps_defend=-0.1)
    with pytest.raises(ValueError, match="eps_defend"):
        pixeldefend(pcnn, torch.rand(1, 1, 4, 4), eps_defend=1.5)
    with pytest.raises(ValueError, match="seed"):
        PixelDefend(pcnn, seed=0)  # greedy PixelDefend has no randomness to seed
    with pytest.raises(ValueError, match="restarts"):
        DefenseGAN(gen, restarts=0)
    with pytest.raises(ValueError, match="steps"):
        DefenseGAN(gen, steps=0)
    with pytest.raises(TypeError, match="restarts"):
        DefenseGAN(gen, restarts=2.5)
    with pytest.raises(ValueError, match="optimizer"):
        DefenseGAN(gen, optimizer="lbfgs")
    with pytest.raises(ValueError, match="lr"):
        DefenseGAN(gen, lr=-1.0)
    with pytest.raises(TypeError, match="model"):
        PixelDefend(ae)
    with pytest.raises(TypeError, match="model"):
        MagNetReformer(gen)
    with pytest.raises(CheckpointError, match="not found"):
        create_transform("magnet:model=/nonexistent/ae")
    with pytest.raises(ValueError, match="levels"):
        PixelCNN(1, levels=1)
    with pytest.raises(ValueError, match="image_shape"):
        Generator((1, 10, 10))
    with pytest.raises(ValueError, match="structure"):
        DenoisingAutoencoder(1, [3, "median"])
    with pytest.raises(ValueError, match="epochs"):
        train_gan(torch.rand(4, 1, 8, 8), epochs=-1, progress=False)
    with pytest.raises(ValueError, match="noise"):
        train_autoencoder(torch.rand(4, 1, 8, 8), noise=-0.1, progress=False)
    with pytest.raises(ValueError, match="shape"):
        DefenseGAN(gen, restarts=1, steps=1)(torch.rand(2, 1, 12, 12))


# ----------------------------------------------------------------------------- slow quality checks
@pytest.mark.slow
def test_purifiers_keep_clean_accuracy_when_trained_longer(digits, digits_model):
    xtr, xte, yte = digits["x_train"], digits["x_test"][:100], digits["y_test"][:100]

    def acc(x: torch.Tensor) -> float:
        with torch.no_grad():
            return (digits_model(x).argmax(1) == yte).float().mean().item()

    base = acc(xte)
    ae = train_autoencoder(xtr, epochs=60, batch_size=32, lr=1e-2, seed=0, progress=False)
    assert acc(MagNetReformer(ae)(xte)) > base - 0.1
    pcnn = train_pixelcnn(xtr, epochs=15, levels=LEVELS, hidden=48, blocks=3, batch_size=32, lr=3e-3, progress=False)
    assert acc(PixelDefend(pcnn, 2 / 16)(xte)) > base - 0.1
    gen = train_gan(xtr, epochs=30, progress=False)
    assert acc(DefenseGAN(gen, restarts=10, steps=200, seed=0)(xte)) > 0.8
