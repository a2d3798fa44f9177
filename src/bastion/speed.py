"""Speed options for attack loops and training, measured rather than assumed (see benchmarks/speed.py).

* `channels_last(model)` — NHWC memory format for the convolutions. On the 2-core CPU of our
  benchmarks a forward+backward pass of ``cnn-small`` over 1,000 Fashion-MNIST images took
  0.68 s instead of 1.01 s (oneDNN prefers NHWC); on GPUs it pays with mixed precision.
* `compile_model(model)` — `torch.compile`. Its first call compiles (minutes on a small CPU,
  with a C++ compiler present), so it pays only for long attack runs. It is lazy: call the
  compiled model once up front so that a model it cannot handle fails there, not mid-attack.
* `autocast(device, "bf16")` — bfloat16 autocast for training on CUDA (`TrainConfig.amp`).
* `find_batch_size(run, start)` — the largest batch size that fits: try, halve on
  out-of-memory, return the first that runs (batch-size auto-tuning with back-off).

None of these changes what an attack computes beyond floating-point rounding: channels-last and
compilation reorder arithmetic, bf16 rounds the forward pass of training only (attacks and
evaluation always run in the model's own precision).
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

from ._checks import check_choice

__all__ = ["AMP_MODES", "autocast", "channels_last", "compile_model", "find_batch_size", "is_oom"]

log = logging.getLogger(__name__)

AMP_MODES = ("none", "bf16")
T = TypeVar("T")


def channels_last(model: nn.Module) -> nn.Module:
    """Convert `model`'s 4-D parameters and buffers to the channels-last (NHWC) layout, in place.

    Like ``model.to(...)`` it changes the module itself (and returns it); the values are the
    same. Inputs need no conversion: convolutions with NHWC weights produce NHWC outputs, and
    autograd returns input gradients in the input's own layout.

    Example:
        >>> model = channels_last(load_model("runs/fmnist"))
        >>> result = PGD(steps=20)(model, x, y, "linf:0.1")
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    return model.to(memory_format=torch.channels_last)


def compile_model(model: nn.Module, **options: Any) -> nn.Module:
    """`torch.compile(model, **options)`, checked on the spot.

    Compilation is lazy in PyTorch: a model it cannot handle fails at the first call, deep
    inside an attack. Call the result once on a real batch to pay the compilation
    up front and see errors here.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    if not hasattr(torch, "compile"):
        raise RuntimeError("this PyTorch has no torch.compile (PyTorch >= 2.0 needed)")
    return torch.compile(model, **options)


@contextlib.contextmanager
def autocast(device: torch.device | str, amp: str = "none") -> Iterator[None]:
    """bfloat16 autocast on `device` when ``amp == "bf16"``; a no-op for ``"none"``.

    bf16 keeps float32's exponent range, so no loss scaling is needed (unlike float16).
    """
    check_choice(amp, "amp", AMP_MODES)
    if amp == "none":
        yield
        return
    dev = torch.device(device)
    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16):
        yield


def is_oom(err: BaseException) -> bool:
    """Whether `err` is an out-of-memory error (CUDA, MPS or a failed CPU allocation)."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    msg = str(err).lower()
    return isinstance(err, (RuntimeError, MemoryError)) and ("out of memory" in msg or "can't allocate" in msg
                                                           or isinstance(err, MemoryError))


def find_batch_size(run: Callable[[int], T], start: int, *, minimum: int = 1) -> tuple[int, T]:
    """Call ``run(batch_size)`` from `start`, halving on out-of-memory; return (batch size, result).

    Other errors propagate unchanged. The CUDA cache is emptied between tries so a failed large
    batch does not leave its memory reserved.

    Raises:
        RuntimeError: if even `minimum` runs out of memory (naming both numbers).
    """
    for name, v in (("start", start), ("minimum", minimum)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"`{name}` must be a positive int, got {v!r}")
    if minimum > start:
        raise ValueError(f"`minimum` ({minimum}) must be <= `start` ({start})")
    bs = start
    while True:
        try:
            return bs, run(bs)
        except (RuntimeError, MemoryError) as e:
            if not is_oom(e):
                raise
            if bs <= minimum:
                raise RuntimeError(f"out of memory even at batch size {bs} (started at {start})") from e
            log.info("batch size %d ran out of memory; trying %d", bs, max(minimum, bs // 2))
            bs = max(minimum, bs // 2)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
