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
