"""The fast paths of the transforms are exact: they must give what the reference gives.

The 3×3 median from sorted columns and the 5×5 selection network (`smoothing.median_network`)
against scipy.ndimage.median_filter(mode="reflect"), with ties (few distinct values), odd
shapes, and every chunk size down to one image.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.ndimage import median_filter as scipy_median

from bastion.defenses.transforms import smoothing
from bastion.defenses.transforms.smoothing import median_filter, median_network


def _scipy(x: torch.Tensor, size: int) -> np.ndarray:
    return scipy_median(x.numpy(), size=(1, 1, size, size), mode="reflect")


@pytest.mark.parametrize("size", [3, 5])
@pytest.mark.parametrize("levels", [3, 256])  # 3 levels: many ties in every window
def test_comparator_medians_equal_scipy(size, levels):
    g = torch.Generator().manual_seed(size * levels)
    x = torch.randint(0, levels, (6, 2, 9, 7), generator=g).float() / (levels - 1)
    assert np.array_equal(median_filter(x, size).numpy(), _scipy(x, size))


@pytest.mark.parametrize("size", [3, 5])
def test_chunking_does_not_change_the_median(size, monkeypatch):
    x = torch.rand(7, 1, 6, 5, generator=torch.Generator().manual_seed(1))
    ref = _scipy(x, size)
    for chunk in (1, 200, 2**15):  # one image per chunk, a few, everything at once
        monkeypatch.setattr(smoothing, "_CPU_CHUNK_ELEMENTS", chunk)
        assert np.array_equal(median_filter(x, size).numpy(), ref), chunk


def test_the_median_network_selects_the_median_of_every_0_1_input():
    # 0-1 principle: a comparator network selects the k-th value of every input iff it does so
    # for every 0/1 input (Knuth, TAOCP vol. 3, 5.3.4). 2^9 inputs cover the 3×3 network.
    ops, out = median_network(9)
    for bits in itertools.product((0, 1), repeat=9):
        w = dict(enumerate(bits))
        for op, a, b, need_min, need_max in ops:
            va, vb = w.get(a), w.get(b)
            if op == "swap":
                w[a], w[b] = vb, va
                continue
            if need_min:
                w[a] = min(va, vb)
            if need_max:
                w[b] = max(va, vb)
        assert w[out] == sorted(bits)[4], bits
    assert len([o for o in ops if o[0] == "cmp"]) <= 25


# ------------------------------------------------------------------------------ JPEG mosaic
def _pillow_one_by_one(x: torch.Tensor, qualities: list[int]) -> torch.Tensor:
    """The reference: every gray image through Pillow alone (what `jpeg_roundtrip` must equal)."""
    from bastion.defenses.transforms.jpeg import _codec_one

    u8 = (x * 255.0).round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()
    return torch.from_numpy(np.stack([_codec_one(a, q) for a, q in zip(u8, qualities)])).unsqueeze(1).float() / 255


@pytest.mark.parametrize("shape", [(28, 28), (13, 21), (8, 16), (5, 3)])  # partial blocks on either edge, none, tiny
def test_jpeg_mosaic_equals_one_codec_call_per_image(shape):
    from bastion.data import load_dataset
    from bastion.defenses.transforms.jpeg import jpeg_roundtrip

    g = torch.Generator().manual_seed(sum(shape))
    if shape == (28, 28):  # real images (smooth regions, sharp edges), plus noise images
        x = torch.cat([load_dataset("mnist-5k", "test").images[:20], torch.rand(5, 1, 28, 28, generator=g)])
    else:
        x = torch.rand(25, 1, *shape, generator=g)
    qualities = torch.randint(1, 101, (len(x),), generator=g).tolist()
    qualities[:10] = [75] * 10  # a group sharing one quality, and singletons
    assert torch.equal(jpeg_roundtrip(x, qualities), _pillow_one_by_one(x, qualities))
    assert torch.equal(jpeg_roundtrip(x, 30), _pillow_one_by_one(x, [30] * len(x)))


def test_jpeg_mosaic_split_when_too_large(monkeypatch):
    from bastion.defenses.transforms import jpeg as jpeg_mod

    x = torch.rand(11, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(jpeg_mod, "_MOSAIC_MAX_SIDE", 40)  # at most 2 padded 16×16 images a side: forces splits
    assert torch.equal(jpeg_mod.jpeg_roundtrip(x, 60), _pillow_one_by_one(x, [60] * 11))
