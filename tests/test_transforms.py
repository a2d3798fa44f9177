"""Contracts of the classical input transformations and the output-hardening modules.

Exactness against the reference implementations (Pillow's JPEG, scipy's median and Gaussian
filters, skimage's TV denoiser), the declared properties (randomized → two calls differ and a
seed replays them; non-differentiable → autograd gives zero while BPDA gives a gradient), and
the input/option validation. Everything runs on tiny images.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from bastion.defenses.output import LabelOnly, RoundedProbs, TopK, create_output, list_outputs
from bastion.defenses.pipeline import Defended
from bastion.defenses.transforms import create_transform, list_transforms, straight_through
from bastion.defenses.transforms import jpeg as jpeg_mod
from bastion.defenses.transforms.bart import BART_GROUPS, BaRT
from bastion.defenses.transforms.jpeg import JPEG, DifferentiableJPEG, jpeg_quant_tables, jpeg_roundtrip
from bastion.defenses.transforms.noise import GaussianNoise
from bastion.defenses.transforms.quilting import Quilting
from bastion.defenses.transforms.resize_pad import RandomResizePad
from bastion.defenses.transforms.shield import SHIELD
from bastion.defenses.transforms.smoothing import GaussianBlur, MedianFilter, median_filter
from bastion.defenses.transforms.squeeze import BitDepth
from bastion.defenses.transforms.thermometer import Thermometer, adapt_model
from bastion.defenses.transforms.tvm import TotalVarMin, total_variation, tv_reconstruct

MINE = ["bart", "bit-depth", "gaussian-blur", "gaussian-noise", "jpeg", "jpeg-approx", "median", "quilting",
        "random-resize-pad", "shield", "thermometer", "tvm"]


def _u8_images(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Smooth-ish images whose values are exact multiples of 1/255 (uint8-representable)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, c, max(1, h // 4), max(1, w // 4), generator=g)
    x = torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    x = (x + 0.1 * torch.rand(n, c, h, w, generator=g)).clamp(0, 1)
    return torch.round(x * 255) / 255


def _quilting(seed: int | None = None, k: int = 3) -> Quilting:
    db = _u8_images(20, 1, 8, 8, seed=5)
    return Quilting(patch_size=4, overlap=0, k=k, seed=seed).fit(db, num_patches=200)


# Small, fast configurations of every component, built with a seed where randomized.
def _build(name: str, seed: int | None = None):
    small = {
        "bart": lambda: BaRT(k=3, seed=seed),
        "bit-depth": lambda: BitDepth(3),
        "gaussian-blur": lambda: GaussianBlur(1.0),
        "gaussian-noise": lambda: GaussianNoise(0.1, seed=seed),
        "jpeg": lambda: JPEG(75),
        "jpeg-approx": lambda: DifferentiableJPEG(75),
        "median": lambda: MedianFilter(3),
        "quilting": lambda: _quilting(seed),
        "random-resize-pad": lambda: RandomResizePad(1.25, seed=seed),
        "shield": lambda: SHIELD(seed=seed, block=4),
        "thermometer": lambda: Thermometer(4),
        "tvm": lambda: TotalVarMin(iterations=30, seed=seed),
    }
    return small[name]()


@pytest.fixture
def img() -> torch.Tensor:
    return _u8_images(4, 1, 8, 8, seed=1)


def test_every_component_is_registered_with_its_declarations():
    names = set(list_transforms())
    assert set(MINE) <= names
    expected = {  # name: (differentiable, randomized)
        "bart": (False, True), "bit-depth": (False, False), "gaussian-blur": (True, False),
        "gaussian-noise": (True, True), "jpeg": (False, False), "jpeg-approx": (True, False),
        "median": (False, False), "quilting": (False, True), "random-resize-pad": (True, True),
        "shield": (False, True), "thermometer": (False, False), "tvm": (False, True),
    }
    for name, (diff, rnd) in expected.items():
        t = _build(name)
        assert (t.differentiable, t.randomized) == (diff, rnd), name
        assert t.config()["name"] == name
        json.dumps(t.config())  # reports need JSON-ready configs


def test_create_transform_parses_options():
    t = create_transform("jpeg:quality=30,bpda=approx")
    assert isinstance(t, JPEG) and t.quality == 30 and t.bpda_mode == "approx"
    assert create_transform("bit-depth:bits=2").bits == 2
    assert create_transform("median:size=5").size == 5
    assert create_transform("shield:qualities=30/90,block=16").qualities == (30, 90)


# ------------------------------------------------------------------------------ JPEG
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("quality", [10, 75, 95])
def test_jpeg_equals_a_pillow_round_trip(channels, quality):
    x = _u8_images(3, channels, 12, 20, seed=quality)  # not a multiple of 8 on purpose
    out = JPEG(quality)(x)
    for i in range(3):
        arr = (x[i] * 255).round().to(torch.uint8)
        arr = arr[0].numpy() if channels == 1 else arr.permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        ref = np.array(Image.open(io.BytesIO(buf.getvalue())))
        ref = torch.from_numpy(ref).float() / 255
        ref = ref.unsqueeze(0) if channels == 1 else ref.permute(2, 0, 1)
        assert torch.equal(out[i], ref)
    assert not torch.equal(out, x)  # the codec did change something


def test_jpeg_keeps_dtype_and_supports_per_image_quality():
    x = _u8_images(2, 3, 8, 8).double()
    out = JPEG(50)(x)
    assert out.dtype == torch.float64 and out.shape == x.shape
    both = jpeg_roundtrip(x, [10, 95])
    assert torch.equal(both[0], jpeg_roundtrip(x[:1], 10)[0]) and torch.equal(both[1], jpeg_roundtrip(x[1:], 95)[0])
    with pytest.raises(ValueError, match="quality"):
        jpeg_roundtrip(x, [10])


def test_jpeg_thread_pool_gives_the_serial_result(monkeypatch):
    x = _u8_images(6, 3, 8, 8, seed=3)
    serial = jpeg_roundtrip(x, 40)
    monkeypatch.setattr(jpeg_mod, "_MIN_BATCH_FOR_THREADS", 1)
    monkeypatch.setattr(jpeg_mod, "_MIN_CPUS_FOR_THREADS", 1)
    assert torch.equal(jpeg_roundtrip(x, 40), serial)


@pytest.mark.parametrize("bad", [0, 101, -5])
def test_jpeg_quality_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="quality"):
        JPEG(bad)
    with pytest.raises(ValueError, match="quality"):
        DifferentiableJPEG(bad)
    with pytest.raises(ValueError, match="qualities"):
        SHIELD(qualities=(20, bad))


def test_jpeg_quality_type_and_bpda_option_are_checked():
    with pytest.raises(TypeError, match="quality"):
        JPEG(50.5)
    with pytest.raises(ValueError, match="bpda"):
        JPEG(50, bpda="magic")


def test_quant_tables_follow_libjpeg_scaling():
    luma50, chroma50 = jpeg_quant_tables(50)
    assert luma50[0, 0] == 16 and luma50[7, 7] == 99 and chroma50[0, 0] == 17  # the Annex K tables
    luma100, _ = jpeg_quant_tables(100)
    assert torch.all(luma100 == 1)
    luma10, _ = jpeg_quant_tables(10)
    assert luma10[0, 0] == 80 and luma10.max() == 255  # scale 500%, clamped to baseline


@pytest.mark.parametrize("channels", [1, 3])
def test_differentiable_jpeg_is_much_closer_to_the_codec_than_identity(channels):
    x = _u8_images(8, channels, 16, 16, seed=7)
    real = jpeg_roundtrip(x, 50)
    approx = DifferentiableJPEG(50)(x)
    err_approx = (approx - real).abs().mean()
    err_identity = (x - real).abs().mean()
    assert err_approx < 0.4 * err_identity
    assert err_approx < 0.02


def test_differentiable_jpeg_gives_useful_gradients():
    x = _u8_images(2, 3, 16, 16, seed=8).requires_grad_(True)
    for rounding in ("cubic", "ste"):
        (g,) = torch.autograd.grad(DifferentiableJPEG(75, rounding=rounding)(x).sum(), x)
        assert g.shape == x.shape and torch.isfinite(g).all() and g.abs().sum() > 0.1 * x.numel()
    x1 = x.detach()[:, :1].requires_grad_(True)
    (g1,) = torch.autograd.grad(straight_through(JPEG(75, bpda="approx"), x1).sum(), x1)
    assert g1.abs().sum() > 0 and not torch.equal(g1, torch.ones_like(g1))  # not the identity's gradient


# ------------------------------------------------------------------------------ bit depth
@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
def test_bit_depth_yields_at_most_2_to_the_bits_levels(bits):
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(bits))
    out = BitDepth(bits)(x)
    levels = torch.unique(out)
    assert len(levels) <= 2**bits
    m = 2**bits - 1
    assert torch.allclose(levels * m, torch.round(levels * m), atol=1e-5)  # on the grid k/(2^b − 1)
    assert (out - x).abs().max() <= 0.5 / m + 1e-6


@pytest.mark.parametrize("bad", [0, 9, -1])
def test_bit_depth_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="bits"):
        BitDepth(bad)
    with pytest.raises(TypeError, match="bits"):
        BitDepth(2.0)


# ------------------------------------------------------------------------------ smoothing
@pytest.mark.parametrize("size", [1, 3, 5, 9])
def test_median_equals_scipy_reflect(size):
    from scipy.ndimage import median_filter as scipy_median

    x = torch.rand(3, 2, 8, 7, generator=torch.Generator().manual_seed(size))
    out = MedianFilter(size)(x)
    for i in range(3):
        for c in range(2):
            ref = scipy_median(x[i, c].numpy(), size=size, mode="reflect")
            assert np.array_equal(out[i, c].numpy(), ref), (i, c)


def test_median_chunking_gives_the_same_result(monkeypatch):
    from bastion.defenses.transforms import smoothing

    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    full = median_filter(x, 3)
    monkeypatch.setattr(smoothing, "_MEDIAN_CHUNK_ELEMENTS", 1)
    assert torch.equal(median_filter(x, 3), full)


@pytest.mark.parametrize("bad", [0, 2, 4, -3])
def test_median_size_must_be_odd_and_positive(bad):
    with pytest.raises(ValueError, match="size"):
        MedianFilter(bad)


def test_gaussian_blur_equals_scipy_and_is_differentiable():
    from scipy.ndimage import gaussian_filter

    x = torch.rand(2, 1, 10, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = GaussianBlur(1.0)(x)
    for i in range(2):
        ref = gaussian_filter(x[i, 0].numpy(), sigma=1.0, mode="reflect", truncate=3.0)
        assert np.allclose(out[i, 0].numpy(), ref, atol=1e-10)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(GaussianBlur(1.0)(xg)[0, 0, 5, 5], xg)
    assert g[0, 0, 5, 5] > 0 and g[0, 0, 5, 7] > 0 and g[1].abs().sum() == 0
    with pytest.raises(ValueError, match="sigma"):
        GaussianBlur(0.0)
    with pytest.raises(ValueError, match="size"):
        GaussianBlur(1.0, size=4)


# ------------------------------------------------------------------------------ TVM
def test_tvm_lowers_total_variation_and_stays_close(digits):
    # digits upsampled to 24×24: at 8×8 a dropped pixel is a sizeable part of a stroke
    x = torch.nn.functional.interpolate(digits["x_test"][:16], size=24, mode="bilinear", align_corners=False)
    x = x.clamp(0, 1)
    noisy = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    out = TotalVarMin(keep_prob=0.5, weight=0.03, iterations=100, seed=0)(noisy)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert (total_variation(out) < 0.8 * total_variation(noisy)).all()
    assert ((out - x) ** 2).mean() < 0.01  # half the pixels dropped, yet close to the clean image
    assert ((out - noisy) ** 2).mean() < 0.02


def test_tv_solver_matches_skimage_chambolle_without_dropout():
    from skimage.restoration import denoise_tv_chambolle

    g = torch.Generator().manual_seed(0)
    x = (0.3 * torch.rand(2, 1, 12, 12, generator=g, dtype=torch.float64)
         + 0.5 * (torch.arange(12) > 5).double()).clamp(0, 1)
    out = tv_reconstruct(x, torch.ones_like(x), weight=0.1, iterations=200)
    for i in range(2):
        ref = denoise_tv_chambolle(x[i, 0].numpy(), weight=0.1, eps=1e-8, max_num_iter=5000)
        assert np.abs(out[i, 0].numpy() - ref).max() < 5e-3


def test_tvm_options_are_validated():
    with pytest.raises(ValueError, match="keep_prob"):
        TotalVarMin(keep_prob=0.0)
    with pytest.raises(ValueError, match="keep_prob"):
        TotalVarMin(keep_prob=1.5)
    with pytest.raises(ValueError, match="weight"):
        TotalVarMin(weight=-1)
    with pytest.raises(ValueError, match="iterations"):
        TotalVarMin(iterations=0)


# ------------------------------------------------------------------------------ quilting
def test_quilting_output_patches_come_from_the_database(img):
    q = _quilting(seed=0)
    out = q(img)
    patches = out.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(-1, 16)
    db = q.database
    match = (patches[:, None, :] == db[None, :, :]).all(dim=2).any(dim=1)
    assert match.all()
    assert not torch.equal(out, img)


def test_quilting_with_k1_and_the_image_in_the_database_is_the_identity(img):
    q = Quilting(patch_size=4, overlap=2, k=1).fit(img)
    assert q.randomized is False
    assert torch.equal(q(img), img)  # every patch's nearest neighbour is itself; overlaps average equal values


def test_quilting_database_survives_state_dict_and_checks_inputs(img):
    q = _quilting(seed=0)
    q2 = Quilting(patch_size=4, overlap=0, k=3)
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2.database, q.database)
    with pytest.raises(RuntimeError, match="fit"):
        Quilting(patch_size=4)(img)
    with pytest.raises(ValueError, match="channel"):
        q(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="overlap"):
        Quilting(patch_size=4, overlap=4)
    with pytest.raises(ValueError, match="patch_size"):
        Quilting(patch_size=0)


def test_quilting_from_a_named_dataset():
    q = Quilting.from_dataset("digits", num_patches=300, sample_seed=1, patch_size=4, overlap=0, k=2, seed=3)
    assert q.database.shape == (300, 16) and q.seed == 3
    again = Quilting.from_dataset("digits", num_patches=300, sample_seed=1, patch_size=4, overlap=0, k=2)
    assert torch.equal(again.database, q.database)  # the subsampling is seeded


# ------------------------------------------------------------------------------ BaRT
@pytest.mark.parametrize("channels", [1, 3])
def test_bart_draws_k_distinct_groups_per_image(channels):
    x = _u8_images(6, channels, 16, 16)
    b = BaRT(k=4, seed=0)
    out = b(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert len(b.last_drawn) == 6
    for seq in b.last_drawn:
        groups = [g for g, _ in seq]
        assert len(groups) == 4 and len(set(groups)) == 4
        for g, m in seq:
            assert m in BART_GROUPS[g][0]
            if channels == 1:
                assert g not in ("color-space", "grayscale")
    assert len({tuple(s) for s in b.last_drawn}) > 1  # images draw independently


def test_bart_k_larger_than_the_usable_groups_is_refused():
    with pytest.raises(ValueError, match="k"):
        BaRT(k=11)
    with pytest.raises(ValueError, match="k"):
        BaRT(k=9)(torch.rand(1, 1, 8, 8))  # only 8 groups apply to grayscale
    assert BaRT(k=10, seed=0)(torch.rand(1, 3, 8, 8)).shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match="groups"):
        BaRT(groups=["swirl", "teleport"])


@pytest.mark.parametrize("group,member", [(g, m) for g, (ms, _) in BART_GROUPS.items() for m in ms])
def test_every_bart_member_keeps_shape_and_range(group, member):
    channels = 1 if BART_GROUPS[group][1] else 3
    x = _u8_images(3, channels, 16, 16, seed=2)
    b = BaRT(k=1, groups=[group], seed=0)
    out = BART_GROUPS[group][0][member](b, x).clamp(0, 1)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.equal(out, x) or member in ("pepper", "salt")  # (salt/pepper may miss 3 tiny images)


# ------------------------------------------------------------------------------ SHIELD
def test_shield_takes_every_block_from_one_quality():
    x = _u8_images(3, 3, 16, 16, seed=4)
    s = SHIELD(qualities=(10, 90), block=8, seed=0)
    out = s(x)
    versions = [jpeg_roundtrip(x, q) for q in (10, 90)]
    choice = s.last_choice
    assert choice.shape == (3, 2, 2)
    for i in range(3):
        for bi in range(2):
            for bj in range(2):
                blk = (slice(None), slice(bi * 8, bi * 8 + 8), slice(bj * 8, bj * 8 + 8))
                assert torch.equal(out[i][blk], versions[int(choice[i, bi, bj])][i][blk])
    assert choice.unique().numel() == 2  # both qualities used somewhere
    with pytest.raises(ValueError, match="block"):
        SHIELD(block=0)


# ------------------------------------------------------------------------------ thermometer
def test_thermometer_shape_levels_and_soft_stand_in():
    levels = 5
    x = torch.tensor([0.0, 0.1, 0.2, 0.39, 0.4, 0.99, 1.0]).reshape(1, 1, 1, 7).expand(1, 2, 1, 7).contiguous()
    t = Thermometer(levels)
    code = t(x)
    assert code.shape == (1, 2 * levels, 1, 7)
    assert set(code.unique().tolist()) <= {0.0, 1.0}
    ones = code[:, :levels].sum(dim=1).flatten()  # channel 0's levels
    expected = torch.clamp(torch.floor(x[0, 0, 0] * levels), max=levels - 1) + 1
    assert torch.equal(ones, expected)
    assert torch.all(code[:, :levels].diff(dim=1) <= 0)  # a thermometer: ones then zeros
    # the soft stand-in agrees with the code at the bucket edges l/L
    edges = (torch.arange(levels + 1) / levels).reshape(1, 1, 1, -1)
    assert torch.allclose(t.bpda(edges), t(edges), atol=1e-5)
    with pytest.raises(ValueError, match="levels"):
        Thermometer(1)


def test_adapt_model_takes_the_code_and_starts_close(digits_model, digits):
    levels = 8
    x = digits["x_test"][:32]
    adapted = adapt_model(digits_model, levels)
    assert digits_model.features[0].in_channels == 1  # the original is untouched
    out = adapted(Thermometer(levels)(x))
    centre = (torch.clamp(torch.floor(x * levels), max=levels - 1) + 0.5) / levels
    ref = digits_model(centre)
    assert ((out - ref).abs().max(dim=1).values < 0.1 * ref.abs().max(dim=1).values).all()  # up to the border
    agree = (out.argmax(1) == digits_model(x).argmax(1)).float().mean()
    assert agree > 0.8


# ------------------------------------------------------------------------------ resize & pad
def test_random_resize_pad_preserves_shape_or_returns_the_canvas():
    x = torch.rand(4, 3, 20, 20, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.1  # no zero pixel
    out = RandomResizePad(1.5, seed=0)(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    canvas = RandomResizePad(1.5, output="canvas", seed=0)(x)
    assert canvas.shape == (4, 3, 30, 30)
    sides = []
    for im in canvas:  # the resized image is the non-zero box: its side is the drawn size in [20, 30]
        rows = im.abs().sum(dim=(0, 2)).nonzero().flatten()
        cols = im.abs().sum(dim=(0, 1)).nonzero().flatten()
        side_r, side_c = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert 20 <= side_r <= 30 and side_r == side_c
        sides.append(side_r)
    assert min(sides) < 30  # a zero border was added somewhere
    with pytest.raises(ValueError, match="ratio"):
        RandomResizePad(0.5)
    with pytest.raises(ValueError, match="output"):
        RandomResizePad(output="square")


def test_random_resize_pad_is_identity_at_ratio_one():
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(RandomResizePad(1.0, seed=0)(x), x, atol=1e-6)


# ------------------------------------------------------------------------------ generic contracts
RANDOMIZED = ["bart", "gaussian-noise", "quilting", "random-resize-pad", "shield", "tvm"]
NON_DIFFERENTIABLE = ["bart", "bit-depth", "jpeg", "median", "quilting", "shield", "thermometer", "tvm"]


@pytest.mark.parametrize("name", RANDOMIZED)
def test_randomized_components_differ_between_calls_and_replay_under_a_seed(name, img):
    t = _build(name, seed=0)
    a, b = t(img), t(img)
    assert not torch.equal(a, b)
    t2 = _build(name, seed=0)
    assert torch.equal(t2(img), a) and torch.equal(t2(img), b)
    torch.manual_seed(123)  # without a seed: the global RNG
    c = _build(name)(img)
    torch.manual_seed(123)
    assert torch.equal(_build(name)(img), c)


@pytest.mark.parametrize("name", NON_DIFFERENTIABLE)
def test_non_differentiable_components_give_zero_gradient_but_bpda_works(name, img):
    t = _build(name, seed=0)
    assert t.differentiable is False
    x = img.clone().requires_grad_(True)
    out = t(x)
    (g,) = torch.autograd.grad(out.sum(), x, allow_unused=True)
    assert g is None or torch.count_nonzero(g) == 0
    x2 = img.clone().requires_grad_(True)
    st = straight_through(t, x2)
    (g2,) = torch.autograd.grad((st * torch.linspace(0.5, 1.5, st.numel()).reshape(st.shape)).sum(), x2)
    assert g2.shape == img.shape and torch.count_nonzero(g2) > 0


@pytest.mark.parametrize("name", MINE)
def test_components_refuse_values_outside_the_unit_box(name, img):
    t = _build(name, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        t(img * 2.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        t(img - 0.5)


@pytest.mark.parametrize("name", ["jpeg", "jpeg-approx", "shield", "bart"])
def test_components_refuse_channel_counts_they_cannot_handle(name):
    with pytest.raises(ValueError, match="channel"):
        _build(name, seed=0)(torch.rand(1, 2, 8, 8))


@pytest.mark.parametrize("name", MINE)
def test_components_do_not_mutate_their_input_and_keep_the_box(name, img):
    t = _build(name, seed=0)
    before = img.clone()
    out = t(img)
    assert torch.equal(img, before)
    assert out.min() >= 0 and out.max() <= 1 and out.dtype == img.dtype
    expected_c = img.shape[1] * 4 if name == "thermometer" else img.shape[1]
    assert out.shape == (img.shape[0], expected_c, *img.shape[2:])


def test_seed_and_generator_are_exclusive():
    with pytest.raises(ValueError, match="seed"):
        GaussianNoise(0.1, seed=0, generator=torch.Generator())
    with pytest.raises(ValueError, match="sigma"):
        GaussianNoise(0.0)


# ------------------------------------------------------------------------------ output hardening
def test_label_only_reveals_the_decision_and_hides_the_gradient():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out = LabelOnly(scale=7.0)(logits)
    assert torch.equal(out.argmax(1), logits.argmax(1))
    assert torch.equal(out.detach(), 7.0 * torch.nn.functional.one_hot(logits.argmax(1), 4).float())
    (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(out, torch.zeros(6, dtype=torch.long)), logits)
    assert torch.count_nonzero(g) == 0
    assert LabelOnly.differentiable is False


def test_rounded_probs_and_top_k():
    logits = torch.tensor([[2.0, 1.0, 0.1, -3.0], [0.0, 0.2, 0.1, 5.0]], requires_grad=True)
    r = torch.exp(RoundedProbs(decimals=1)(logits).detach())
    revealed = r[r > 1e-9]
    assert torch.allclose(revealed * 10, torch.round(revealed * 10), atol=1e-5)  # one decimal place
    assert torch.allclose(revealed, torch.round(torch.softmax(logits.detach(), 1), decimals=1)[r > 1e-9])
    t = TopK(k=2, decimals=None)(logits).detach()
    hidden = t <= math.log(1e-12) + 1e-6
    assert hidden.sum(1).tolist() == [2, 2]
    assert torch.equal(t.argmax(1), logits.argmax(1))
    shown = torch.exp(t).topk(2, dim=1).values
    assert torch.allclose(shown, torch.softmax(logits.detach(), 1).topk(2, dim=1).values)
    for module in (RoundedProbs(2), TopK(2)):
        (g,) = torch.autograd.grad(module(logits).sum(), logits)
        assert torch.count_nonzero(g) == 0


def test_output_hardening_options_and_registry():
    assert set(list_outputs()) >= {"label-only", "rounded-probs", "top-k"}
    assert isinstance(create_output("top-k:k=3"), TopK) and create_output("top-k:k=3").k == 3
    with pytest.raises(ValueError, match="scale"):
        LabelOnly(scale=0)
    with pytest.raises(ValueError, match="decimals"):
        RoundedProbs(decimals=-1)
    with pytest.raises(ValueError, match="k"):
        TopK(k=0)
    with pytest.raises(ValueError, match="N×K"):
        LabelOnly()(torch.randn(2, 3, 4))


def test_output_hardening_in_a_pipeline_keeps_the_accuracy(digits_model, digits):
    x = digits["x_test"][:64]
    plain = Defended([], digits_model)
    for output in (LabelOnly(), RoundedProbs(2), TopK(1)):
        hardened = Defended([], digits_model, output=output)
        assert hardened.differentiable is False
        assert torch.equal(hardened(x).argmax(1), plain(x).argmax(1))
