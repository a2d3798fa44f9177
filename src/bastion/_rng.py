"""Reproducible per-example randomness for randomized attacks (random start, SPSA, Square, EOT).

The contract every attack keeps is "attacking a batch then slicing equals attacking the slice".
With a global `torch.Generator` that fails for randomized attacks: the draws of example 7 depend
on how many examples came before it. `ExampleRNG` makes every draw a pure function of

    (seed, the example's own content, a tag naming the draw, the element index)

through a counter-based integer hash (in the spirit of Philox / splitmix, Salmon et al. 2011),
computed vectorized in int64 on the input's device. Nothing about the other examples in the
batch enters, so slicing, reordering or early-stopping the batch never changes an example's
random numbers.

All integer arithmetic stays below 2^63 (32-bit words times constants below 2^31), so nothing
relies on signed-overflow behaviour and CPU and CUDA give the same bits.

Identical images in one batch get identical draws (they are the same example as far as the
RNG can tell); use different tags or seeds where distinct draws are needed.

Example:
    >>> x = torch.rand(8, 1, 8, 8)
    >>> rng = ExampleRNG(0, x)
    >>> a = rng.uniform((1, 8, 8), tag="init")
    >>> b = ExampleRNG(0, x[2:5]).uniform((1, 8, 8), tag="init")
    >>> torch.equal(a[2:5], b)
    True
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch
from torch import Tensor

__all__ = ["ExampleRNG"]

_M32 = 0xFFFFFFFF
_M31 = 0x7FFFFFFF
_P31 = 2**31 - 1  # a Mersenne prime: the content hash is a random linear form mod P
_MUL = 0x45D9F3B  # < 2^27: 32-bit word times this stays below 2^59
_GOLDEN = 0x9E3779B9


def _mix32(h: Tensor) -> Tensor:
    """A bijective avalanche hash of 32-bit words held in int64 (three xor-shift-multiply rounds)."""
    h = ((h >> 16) ^ h) * _MUL & _M32
    h = ((h >> 16) ^ h) * _MUL & _M32
    h = ((h >> 16) ^ h) * _MUL & _M32
    return (h >> 16) ^ h


def _mix32_int(h: int) -> int:
    """`_mix32` on a Python int (for seeds and tags)."""
    h &= _M32
    for _ in range(3):
        h = ((h >> 16) ^ h) * _MUL & _M32
    return (h >> 16) ^ h


def _tag_code(tag: Any) -> int:
    """A stable 32-bit code for a tag (str, int, or nested tuples of them)."""
    if isinstance(tag, bool) or not isinstance(tag, (str, int, tuple)):
        raise TypeError(f"`tag` must be a str, an int or a tuple of them, got {type(tag).__name__}")
    # repr of str/int/tuple is stable across runs and platforms (unlike hash() of a str)
    return _mix32_int(zlib.crc32(repr(tag).encode()) ^ _GOLDEN)


def _content_keys(x: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """Two 32-bit keys per example from the seed and a hash of the example's pixels."""
    n = x.shape[0]
    flat = x.detach().reshape(n, -1)
    d = flat.shape[1]
    # Quantize to 2^-20 (finer than any 8- or 16-bit image), then a random linear form mod P,
    # with weights drawn from the element index itself: no state, the same on every device.
    q = torch.round(flat.double().clamp(-1e6, 1e6) * 2**20).long() & _M31
    j = torch.arange(d, device=x.device, dtype=torch.int64)
    seed_lo, seed_hi = seed & _M32, (seed >> 32) & _M32
    keys = []
    for salt in (0x243F6A88, 0x85A308D3):
        w = _mix32(j ^ salt) & _M31
        s = ((q * w) % _P31).sum(dim=1) % _P31  # each term < 2^31, so the sum fits for d < 2^32
        k = _mix32(s ^ _mix32_int(seed_lo ^ salt))
        k = _mix32(k ^ _mix32_int(seed_hi ^ _GOLDEN ^ salt))
        keys.append(k)
    return keys[0], keys[1]


class ExampleRNG:
    """Counter-based random numbers keyed per example: draws never depend on the rest of the batch.

    Args:
        seed: any Python int (taken modulo 2^64).
        x: the batch (N, ...) whose examples key the draws; only its content and device are used.

    Every draw method takes `shape` (the shape *per example*) and returns (N, *shape) on
    ``x.device``. Each call with ``tag=None`` uses a fresh tag from an internal counter; attack
    code whose number of calls could depend on the batch (early stopping, restarts on the
    unbroken examples) should pass explicit tags, e.g. ``tag=("init", restart)``.

    Example:
        >>> rng = ExampleRNG(seed=0, x=torch.rand(4, 3, 8, 8))
        >>> rng.normal((3, 8, 8), tag="noise").shape
        torch.Size([4, 3, 8, 8])
    """

    def __init__(self, seed: int, x: Tensor) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"`seed` must be an int, got {type(seed).__name__}")
        if not isinstance(x, Tensor) or x.dim() < 1:
            raise TypeError("`x` must be a tensor with a batch dimension")
        self.seed = seed % 2**64
        self.device = x.device
        self.dtype = x.dtype if torch.is_floating_point(x) else torch.get_default_dtype()
        self._k0, self._k1 = _content_keys(x, self.seed)
        self._counter = 0

    @classmethod
    def _from_keys(cls, seed: int, k0: Tensor, k1: Tensor, dtype: torch.dtype, counter: int) -> "ExampleRNG":
        new = cls.__new__(cls)
        new.seed, new.device, new.dtype = seed, k0.device, dtype
        new._k0, new._k1, new._counter = k0, k1, counter
        return new

    def __len__(self) -> int:
        return int(self._k0.shape[0])

    def __repr__(self) -> str:
        return f"ExampleRNG(seed={self.seed}, n={len(self)}, device={self.device})"

    def subset(self, index: Tensor | slice | list[int]) -> "ExampleRNG":
        """The RNG of a sub-batch (bool mask, indices or slice); its draws equal those rows here."""
        if isinstance(index, Tensor):
            index = index.to(self.device)
        return ExampleRNG._from_keys(self.seed, self._k0[index], self._k1[index], self.dtype, self._counter)

    # ----------------------------------------------------------------------- raw bits
    def _bits(self, shape: tuple[int, ...], tag: Any) -> Tensor:
        """(N, *shape) int64 words, uniform on [0, 2^32)."""
        if tag is None:
            tag = ("_auto", self._counter)
            self._counter += 1
        t = _tag_code(tag)
        shape = tuple(int(s) for s in shape)
        m = math.prod(shape)
        j = torch.arange(m, device=self.device, dtype=torch.int64)
        stream = _mix32(self._k0 ^ t).unsqueeze(1)  # per (example, tag)
        h = _mix32(stream ^ j)  # a bijection of j: distinct elements, distinct words
        h = _mix32(h ^ self._k1.unsqueeze(1))
        h = _mix32(h ^ ((self._k0.unsqueeze(1) + t) & _M32))
        return h.reshape(len(self), *shape)

    def _uniform64(self, shape: tuple[int, ...], tag: Any) -> Tensor:
        # the +0.5 keeps 0 and 1 out: log(u) is always finite
        return (self._bits(shape, tag).double() + 0.5) / 2**32

    # ----------------------------------------------------------------------- draws
    def uniform(self, shape: tuple[int, ...] | int, tag: Any = None) -> Tensor:
        """U(0, 1) draws (N, *shape) in the input's float dtype (never exactly 0)."""
        return self._uniform64(_shape(shape), tag).to(self.dtype)

    def normal(self, shape: tuple[int, ...] | int, tag: Any = None) -> Tensor:
        """N(0, 1) draws (N, *shape), by Box–Muller in float64."""
        shape = _shape(shape)
        u = self._uniform64((2, *shape), tag)
        z = torch.sqrt(-2.0 * torch.log(u[:, 0])) * torch.cos(2.0 * math.pi * u[:, 1])
        return z.to(self.dtype)

    def randint(self, high: int, shape: tuple[int, ...] | int, tag: Any = None) -> Tensor:
        """Integers uniform in [0, high), int64 (N, *shape); `high` up to 2^32."""
        if isinstance(high, bool) or not isinstance(high, int) or not (1 <= high <= 2**32):
            raise ValueError(f"`high` must be an int in [1, 2^32], got {high!r}")
        u = self._uniform64(_shape(shape), tag)
        return torch.floor(u * high).long().clamp_(max=high - 1)

    def rademacher(self, shape: tuple[int, ...] | int, tag: Any = None) -> Tensor:
        """±1 with equal probability (N, *shape), in the float dtype."""
        b = self._bits(_shape(shape), tag) & 1
        return (2 * b - 1).to(self.dtype)

    def sample_without_replacement(self, d: int, k: int, tag: Any = None) -> Tensor:
        """k distinct indices out of range(d) per example, int64 (N, k), uniformly at random."""
        if not (0 <= k <= d):
            raise ValueError(f"`k` must be in [0, d={d}], got {k!r}")
        return self._uniform64((d,), tag).topk(k, dim=1).indices


def _shape(shape: tuple[int, ...] | int) -> tuple[int, ...]:
    return (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)
