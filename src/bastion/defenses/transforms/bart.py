"""BaRT, the Barrage of Random Transforms (Raff et al. 2019).

For every image, BaRT draws k *distinct* transformation groups, puts them in a random order,
draws one member of each group and that member's parameters at random, and applies the
sequence. The groups and members here:

======================  =====================================================  ==========
group                   members (random parameters)                            grayscale
======================  =====================================================  ==========
``color-precision``     ``uniform`` / ``per-channel``: round(x·L)/L, L ∈ [8, 200]      yes
``jpeg-noise``          ``jpeg``: the real codec, quality ∈ [55, 95]                   yes
``swirl``               ``swirl``: skimage's swirl (strength ∈ [0.01, 2], radius,      yes
                        centre random), reflect border
``noise``               ``gaussian`` / ``speckle`` (σ ∈ [0.01, 0.1]), ``poisson``      yes
                        (255 photons at full scale), ``salt`` / ``pepper`` /
                        ``salt-pepper`` (amount ∈ [0.01, 0.05])
``fft``                 ``fft``: zero each Fourier coefficient with probability        yes
                        f ∈ [0, 0.95] per channel (the DC term is kept)
``zoom``                ``zoom``: crop a random window (side fraction ∈ [0.7, 1]      yes
                        per axis), resize back (bilinear)
``color-space``         ``hsv`` / ``lab`` / ``yuv`` / ``xyz``: convert, shift one      no
                        random channel by ± up to 10% of its range, convert back
``contrast``            ``hist-eq`` (nbins ∈ [40, 256]), ``adaptive-hist-eq``          yes
                        (clip ∈ [0.01, 0.04]), ``contrast-stretch`` (percentiles
                        ∈ [1, 4]% and [96, 99]%)
``grayscale``           ``luma``, ``mean``, ``random-weights``, ``partial``            no
                        (mix with the original, α ∈ [0.25, 1])
``denoise``             ``gaussian`` (σ random), ``median`` / ``mean`` (3×3),          yes
                        ``tv-chambolle`` (weight ∈ [0.05, 0.25]), ``bilateral``,
                        ``nl-means``
======================  =====================================================  ==========

Grayscale (1-channel) images use the 8 groups marked "yes" (a colour space or a grayscale
conversion means nothing for them); RGB images use all 10.

Deviations from the paper, deliberate and small: the paper's ranges are for 224×224 ImageNet
images; spatial parameters (swirl radius, blur sigma) are scaled to the image size. Seam
carving (a zoom member), wavelet denoising (needs PyWavelets) and the paper's extra FFT
noise are not implemented. Members that have no vectorized form (histogram equalization,
bilateral and non-local-means denoising) call scikit-image image by image; everything else
runs batched in torch, grouping the images that drew the same member at the same step.

Declarations: randomized (attack with EOT: Athalye, Carlini & Wagner 2018 style; BaRT was
evaluated that way by its authors), not differentiable (codec, look-ups, scikit-image steps;
autograd gives zero); `bpda` = identity.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import RandomizedTransform, check_int_range, register_transform, zero_grad_output
from .jpeg import jpeg_roundtrip
from .smoothing import box_blur, gaussian_blur, median_filter, symmetric_pad
from .tvm import tv_reconstruct

__all__ = ["BaRT", "BART_GROUPS"]

Op = Callable[["BaRT", Tensor], Tensor]


def _col(v: Tensor) -> Tensor:
    """(n,) -> (n, 1, 1, 1)."""
    return v.reshape(-1, 1, 1, 1)


def _to_numpy(x: Tensor) -> np.ndarray:
    """n×C×H×W tensor -> n×H×W×C float64 array."""
    return x.detach().permute(0, 2, 3, 1).cpu().double().numpy()


def _from_numpy(a: np.ndarray, like: Tensor) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).to(device=like.device, dtype=like.dtype)


def _per_image_skimage(x: Tensor, fn: Callable[[np.ndarray, int], np.ndarray]) -> Tensor:
    """Apply ``fn(H×W×C image, i) -> H×W×C`` (or H×W for C = 1) to every image."""
    arr = _to_numpy(x)
    outs = []
    for i, img in enumerate(arr):
        out = fn(img[..., 0] if img.shape[-1] == 1 else img, i)
        outs.append(out[..., None] if out.ndim == 2 else out)
    return _from_numpy(np.stack(outs), x)


def _scale(x: Tensor) -> float:
    """Image side relative to the paper's 224 pixels, capped at 1."""
    return min(1.0, max(x.shape[-2:]) / 224)


# -- 1. colour precision reduction ---------------------------------------------------------
def _precision_uniform(t: "BaRT", x: Tensor) -> Tensor:
    levels = _col(torch.floor(t.uniform(8, 201, x.shape[0], device=x.device, dtype=x.dtype)))
    return torch.round(x * levels) / levels


def _precision_per_channel(t: "BaRT", x: Tensor) -> Tensor:
    n, c = x.shape[:2]
    levels = torch.floor(t.uniform(8, 201, n, c, device=x.device, dtype=x.dtype))[..., None, None]
    return torch.round(x * levels) / levels


# -- 2. JPEG noise ---------------------------------------------------------------------------
def _jpeg(t: "BaRT", x: Tensor) -> Tensor:
    return jpeg_roundtrip(x, t.randint(55, 96, x.shape[0]).tolist())


# -- 3. swirl --------------------------------------------------------------------------------
def _swirl(t: "BaRT", x: Tensor) -> Tensor:
    n, _, h, w = x.shape
    if h < 2 or w < 2:
        return x
    dev, dt = x.device, x.dtype
    side = max(h, w)
    strength = _col(t.uniform(0.01, 2.0, n, device=dev, dtype=dt))
    radius = _col(t.uniform(10 / 224, 200 / 224, n, device=dev, dtype=dt)) * side
    cy = _col(t.uniform(0, h - 1, n, device=dev, dtype=dt))
    cx = _col(t.uniform(0, w - 1, n, device=dev, dtype=dt))
    yy = torch.arange(h, device=dev, dtype=dt).reshape(1, 1, h, 1)
    xx = torch.arange(w, device=dev, dtype=dt).reshape(1, 1, 1, w)
    rho = torch.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    # skimage.transform.swirl: radius' = radius / 5 · ln 2, θ = strength · exp(−ρ/radius') + atan2
    theta = strength * torch.exp(-rho / (radius / 5 * math.log(2))) + torch.atan2(yy - cy, xx - cx)
    xs = cx + rho * torch.cos(theta)
    ys = cy + rho * torch.sin(theta)
    grid = torch.stack([2 * xs / (w - 1) - 1, 2 * ys / (h - 1) - 1], dim=-1).squeeze(1)  # n×H×W×2
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)


# -- 4. noise injection --------------------------------------------------------------------
def _gaussian_noise(t: "BaRT", x: Tensor) -> Tensor:
    sigma = _col(t.uniform(0.01, 0.1, x.shape[0], device=x.device, dtype=x.dtype))
    return x + sigma * t.randn(*x.shape, device=x.device, dtype=x.dtype)


def _speckle(t: "BaRT", x: Tensor) -> Tensor:
    sigma = _col(t.uniform(0.01, 0.1, x.shape[0], device=x.device, dtype=x.dtype))
    return x + x * sigma * t.randn(*x.shape, device=x.device, dtype=x.dtype)


def _poisson(t: "BaRT", x: Tensor) -> Tensor:
    photons = 255.0
    rates = (x * photons).to(t._device(x.device))
    return torch.poisson(rates, generator=t.generator).to(x.device) / photons


def _salt_pepper(salt: float) -> Op:
    def op(t: "BaRT", x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        amount = _col(t.uniform(0.01, 0.05, n, device=x.device, dtype=x.dtype))
        hit = t.rand(n, 1, h, w, device=x.device, dtype=x.dtype) < amount  # per pixel, all channels
        is_salt = t.rand(n, 1, h, w, device=x.device, dtype=x.dtype) < salt
        return torch.where(hit, is_salt.to(x.dtype).expand_as(x), x)
    return op


# -- 5. FFT perturbation -------------------------------------------------------------------
def _fft(t: "BaRT", x: Tensor) -> Tensor:
    n, c, h, w = x.shape
    frac = t.uniform(0.0, 0.95, n, c, device=x.device, dtype=torch.float32)[..., None, None]
    keep = t.rand(n, c, h, w, device=x.device) >= frac
    keep[..., 0, 0] = True  # keep the DC term (the mean brightness)
    spec = torch.fft.fft2(x.float()) * keep
    return torch.fft.ifft2(spec).real.to(x.dtype)


# -- 6. zoom -----------------------------------------------------------------------------------
def _zoom(t: "BaRT", x: Tensor) -> Tensor:
    n = x.shape[0]
    dev = x.device
    fy = t.uniform(0.7, 1.0, n, device=dev)
    fx = t.uniform(0.7, 1.0, n, device=dev)
    oy = (1 - fy) * t.rand(n, device=dev)  # window origin, as a fraction of the side
    ox = (1 - fx) * t.rand(n, device=dev)
    # affine map from output [-1, 1] to the window [2·o − 1, 2·(o + f) − 1]
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = fx, 2 * ox + fx - 1
    theta[:, 1, 1], theta[:, 1, 2] = fy, 2 * oy + fy - 1
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# -- 7. colour spaces (RGB) ----------------------------------------------------------------
# per-channel value range (sizes the perturbation) and the hue-like channel that wraps around
_SPACES = {"hsv": ((1.0, 1.0, 1.0), 0), "lab": ((100.0, 255.0, 255.0), None),
           "yuv": ((1.0, 0.872, 1.23), None), "xyz": ((0.95, 1.0, 1.09), None)}


def _color_space(space: str) -> Op:
    def op(t: "BaRT", x: Tensor) -> Tensor:
        from skimage import color  # imported on first use: keeps `import bastion` light

        to, back = getattr(color, f"rgb2{space}"), getattr(color, f"{space}2rgb")
        ranges, wrap = _SPACES[space]
        n = x.shape[0]
        a = to(_to_numpy(x))  # n×H×W×3, vectorized over the batch
        ch = t.randint(0, 3, n).numpy()
        delta = t.uniform(-0.1, 0.1, n).double().numpy() * np.asarray(ranges)[ch]
        a[np.arange(n), :, :, ch] += delta[:, None, None]
        if wrap is not None:
            a[..., wrap] %= 1.0
        if space == "hsv":
            a[..., 1:] = np.clip(a[..., 1:], 0.0, 1.0)
        with warnings.catch_warnings():  # lab2rgb warns when it clips out-of-gamut values: expected here
            warnings.simplefilter("ignore", UserWarning)
            rgb = back(a)
        return _from_numpy(np.clip(rgb, 0.0, 1.0), x)
    return op


# -- 8. contrast ---------------------------------------------------------------------------
def _hist_eq(t: "BaRT", x: Tensor) -> Tensor:
    from skimage import exposure

    bins = t.randint(40, 257, x.shape[0]).tolist()
    # channels pooled into one histogram (a 2-D view, so skimage does not guess colour axes)
    return _per_image_skimage(x, lambda img, i: exposure.equalize_hist(
        img.reshape(img.shape[0], -1), nbins=bins[i]).reshape(img.shape))


def _adaptive_hist_eq(t: "BaRT", x: Tensor) -> Tensor:
    from skimage import exposure

    n, _, h, w = x.shape
    clip = t.uniform(0.01, 0.04, n).tolist()
    frac = t.uniform(1 / 8, 1 / 2, n).tolist()
    return _per_image_skimage(x, lambda img, i: exposure.equalize_adapthist(
        img, kernel_size=max(2, round(frac[i] * min(h, w))), clip_limit=clip[i]))


def _contrast_stretch(t: "BaRT", x: Tensor) -> Tensor:
    n = x.shape[0]
    flat = x.reshape(n, -1).float()
    lo_q = t.uniform(0.01, 0.04, n, device=x.device)
    hi_q = t.uniform(0.96, 0.99, n, device=x.device)
    srt = flat.sort(dim=1).values
    m = flat.shape[1] - 1
    lo = srt.gather(1, (lo_q * m).round().long()[:, None])
    hi = srt.gather(1, (hi_q * m).round().long()[:, None])
    out = (flat - lo) / (hi - lo).clamp_min(1e-6)
    return out.reshape(x.shape).to(x.dtype)


# -- 9. grayscale (RGB) --------------------------------------------------------------------
def _gray(weights: Callable[["BaRT", Tensor], Tensor], partial: bool = False) -> Op:
    def op(t: "BaRT", x: Tensor) -> Tensor:
        wts = weights(t, x)  # n×3
        g = (x * wts[:, :, None, None]).sum(dim=1, keepdim=True).expand_as(x)
        if not partial:
            return g
        alpha = _col(t.uniform(0.25, 1.0, x.shape[0], device=x.device, dtype=x.dtype))
        return alpha * g + (1 - alpha) * x
    return op


def _luma(t: "BaRT", x: Tensor) -> Tensor:
    return torch.tensor([0.2125, 0.7154, 0.0721], device=x.device, dtype=x.dtype).expand(x.shape[0], 3)


def _mean(t: "BaRT", x: Tensor) -> Tensor:
    return torch.full((x.shape[0], 3), 1 / 3, device=x.device, dtype=x.dtype)


def _random_weights(t: "BaRT", x: Tensor) -> Tensor:
    u = t.rand(x.shape[0], 3, device=x.device, dtype=x.dtype) + 1e-3
    return u / u.sum(dim=1, keepdim=True)


# -- 10. denoising ---------------------------------------------------------------------------
def _denoise_gaussian(t: "BaRT", x: Tensor) -> Tensor:
    hi = max(0.5, 3.0 * _scale(x))
    return gaussian_blur(x, t.uniform(0.1, hi, x.shape[0], device=x.device, dtype=x.dtype))


def _denoise_median(t: "BaRT", x: Tensor) -> Tensor:
    return median_filter(x, 3)


def _denoise_mean(t: "BaRT", x: Tensor) -> Tensor:
    return box_blur(x, 3)


def _denoise_tv(t: "BaRT", x: Tensor) -> Tensor:
    weight = _col(t.uniform(0.05, 0.25, x.shape[0], device=x.device, dtype=x.dtype))
    return tv_reconstruct(x, torch.ones_like(x[:, :1]), weight, iterations=50)


def _denoise_bilateral(t: "BaRT", x: Tensor) -> Tensor:
    """Bilateral filter (Tomasi & Manduchi 1998), vectorized: Gaussian in space × Gaussian in colour."""
    n = x.shape[0]
    dev, dt = x.device, x.dtype
    s_color = t.uniform(0.05, 0.25, n, device=dev, dtype=dt)
    s_space = t.uniform(0.5, max(1.0, 3.0 * _scale(x)), n, device=dev, dtype=dt)
    r = max(1, math.ceil(2 * float(s_space.max())))
    k = 2 * r + 1
    win = symmetric_pad(x, r).unfold(2, k, 1).unfold(3, k, 1)  # n×C×H×W×k×k
    off = torch.arange(k, device=dev, dtype=dt) - r
    d2 = off[:, None] ** 2 + off[None, :] ** 2  # k×k
    w_space = torch.exp(-d2 / (2 * s_space.reshape(n, 1, 1, 1, 1, 1) ** 2))
    diff2 = ((win - x[..., None, None]) ** 2).sum(dim=1, keepdim=True)  # colour distance over channels
    w = w_space * torch.exp(-diff2 / (2 * s_color.reshape(n, 1, 1, 1, 1, 1) ** 2))
    return (w * win).sum(dim=(-1, -2)) / w.sum(dim=(-1, -2))


def _denoise_nl_means(t: "BaRT", x: Tensor) -> Tensor:
    from skimage.restoration import denoise_nl_means

    hs = t.uniform(0.05, 0.15, x.shape[0]).tolist()
    side = min(x.shape[-2:])
    patch, dist = (3, 2) if side < 32 else (5, 6)
    ca = -1 if x.shape[1] == 3 else None
    return _per_image_skimage(x, lambda img, i: denoise_nl_means(img, h=hs[i], patch_size=patch,
                                                                 patch_distance=dist, channel_axis=ca))


#: group -> (members, applies to grayscale images)
BART_GROUPS: dict[str, tuple[dict[str, Op], bool]] = {
    "color-precision": ({"uniform": _precision_uniform, "per-channel": _precision_per_channel}, True),
    "jpeg-noise": ({"jpeg": _jpeg}, True),
    "swirl": ({"swirl": _swirl}, True),
    "noise": ({"gaussian": _gaussian_noise, "speckle": _speckle, "poisson": _poisson,
               "salt": _salt_pepper(1.0), "pepper": _salt_pepper(0.0), "salt-pepper": _salt_pepper(0.5)}, True),
    "fft": ({"fft": _fft}, True),
    "zoom": ({"zoom": _zoom}, True),
    "color-space": ({s: _color_space(s) for s in ("hsv", "lab", "yuv", "xyz")}, False),
    "contrast": ({"hist-eq": _hist_eq, "adaptive-hist-eq": _adaptive_hist_eq,
                  "contrast-stretch": _contrast_stretch}, True),
    "grayscale": ({"luma": _gray(_luma), "mean": _gray(_mean), "random-weights": _gray(_random_weights),
                   "partial": _gray(_luma, partial=True)}, False),
    "denoise": ({"gaussian": _denoise_gaussian, "median": _denoise_median, "mean": _denoise_mean,
                 "tv-chambolle": _denoise_tv, "bilateral": _denoise_bilateral, "nl-means": _denoise_nl_means}, True),
}


@register_transform("bart")
class BaRT(RandomizedTransform):
    """Barrage of Random Transforms: k distinct random transformation groups per image, in random order.

    Raff, Sylvester, Forsyth & McLean 2019, "Barrage of Random Transforms for Adversarially
    Robust Defense", CVPR 2019, arXiv:1903.09799. See the module docstring for the groups,
    their members and parameter ranges, and what applies to grayscale images.

    After each call, ``last_drawn[i]`` lists image i's ``(group, member)`` pairs in the order
    applied.

    Declarations: randomized, not differentiable (autograd gives zero); `bpda` = identity.

    Args:
        k: number of distinct groups per image (>= 1; at most the number of usable groups:
            8 for grayscale, 10 for RGB with the default `groups`). Default 5.
        groups: restrict the draw to these group names (default: all of `BART_GROUPS`).
        seed / generator: see `RandomizedTransform`.
    """

    differentiable = False
    randomized = True
    channels = (1, 3)

    def __init__(self, k: int = 5, groups: Sequence[str] | None = None,
                 seed: int | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__(seed, generator)
        names = list(BART_GROUPS) if groups is None else list(groups)
        unknown = [g for g in names if g not in BART_GROUPS]
        if unknown or not names or len(set(names)) != len(names):
            raise ValueError(f"`groups` must be distinct names from {', '.join(BART_GROUPS)}; got {groups!r}")
        self.groups = names
        self.k = check_int_range(k, "k", 1, len(names))
        self.last_drawn: list[list[tuple[str, str]]] = []

    def usable_groups(self, channels: int) -> list[str]:
        """The groups that apply to images with `channels` channels (colour groups need RGB)."""
        return [g for g in self.groups if channels == 3 or BART_GROUPS[g][1]]

    def transform(self, x: Tensor) -> Tensor:
        n, c = x.shape[:2]
        usable = self.usable_groups(c)
        if self.k > len(usable):
            raise ValueError(f"`k`={self.k} but only {len(usable)} BaRT groups apply to {c}-channel images: "
                             f"{', '.join(usable)}")
        # per image: k distinct groups in random order (a random permutation's prefix), one member each
        order = self.rand(n, len(usable)).argsort(dim=1)[:, :self.k].tolist()
        pick = self.rand(n, self.k).tolist()
        drawn = []
        for i in range(n):
            seq = []
            for step, gi in enumerate(order[i]):
                g = usable[gi]
                members = list(BART_GROUPS[g][0])
                seq.append((g, members[min(int(pick[i][step] * len(members)), len(members) - 1)]))
            drawn.append(seq)
        self.last_drawn = drawn
        with torch.no_grad():
            out = x.detach().clone()
            for step in range(self.k):
                # batch together the images that drew the same member at this step
                by_op: dict[tuple[str, str], list[int]] = defaultdict(list)
                for i in range(n):
                    by_op[drawn[i][step]].append(i)
                for (g, m), idx in by_op.items():
                    sel = torch.tensor(idx, device=x.device)
                    out[sel] = BART_GROUPS[g][0][m](self, out[sel]).clamp(0.0, 1.0).to(x.dtype)
        return zero_grad_output(out, x)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "k": self.k, "groups": list(self.groups), "seed": self.seed}
