"""What the three generative models share: data coercion, seeding, progress, checkpoints.

A generative-model checkpoint is an ordinary Bastion checkpoint (``<stem>.safetensors`` +
``<stem>.json``, see `bastion.checkpoint`) whose JSON ``state`` holds::

    {"kind": "pixelcnn" | "gan-generator" | "autoencoder",
     "config": {...},      # the constructor arguments: enough to rebuild the module
     "training": {...}}    # how it was trained (dataset, epochs, seed, final losses)

so `load_generative(path)` rebuilds the module from the JSON and loads the weights strictly;
nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..._checks import check_images, check_positive
from ...checkpoint import CheckpointError, load_weights, read_checkpoint, save_checkpoint

#: kind -> class with ``from_config(dict)`` and ``config() -> dict``; filled by each model module
GENERATIVE_KINDS: dict[str, type[nn.Module]] = {}


def register_kind(kind: str):
    """Class decorator: the class is what `load_generative` rebuilds for checkpoints of `kind`."""

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        GENERATIVE_KINDS[kind] = cls
        cls.kind = kind  # type: ignore[attr-defined]
        return cls

    return deco


def as_images(data: Any, name: str = "data") -> Tensor:
    """Training images from a `Dataset`, a dataset name (its train split) or an N×C×H×W tensor."""
    if isinstance(data, str):
        from ...data import load_dataset

        data = load_dataset(data, "train")
    images = getattr(data, "images", data)
    check_images(images, name)
    if len(images) == 0:
        raise ValueError(f"`{name}` holds no images")
    return images.float()


def describe_data(data: Any) -> str:
    """A short JSON-ready description of training data (for the checkpoint's training record)."""
    if isinstance(data, str):
        return f"{data}:train"
    name = getattr(data, "name", None)
    if name is not None:
        return f"{name}:{getattr(data, 'split', '?')}"
    return f"tensor{tuple(data.shape)}"


def check_int(value: Any, name: str, minimum: int = 1) -> int:
    """An int >= minimum (bools refused), named in the error."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}")
    return value


def check_training_args(epochs: int, batch_size: int, lr: float) -> None:
    check_int(epochs, "epochs", 0)
    check_int(batch_size, "batch_size")
    check_positive(lr, "lr")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block under ``torch.manual_seed(seed)`` and restore the global CPU RNG afterwards.

    Used for weight initialization, so that training is reproducible without changing the
    caller's random stream.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """A fresh random permutation of range(n), cut into batches (the last one may be short)."""
    perm = torch.randperm(n, generator=generator)
    for i in range(0, n, batch_size):
        yield perm[i:i + batch_size]


def progress_bar(total: int, desc: str, enabled: bool):  # noqa: ANN201 (a tqdm bar)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def model_device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def model_dtype(module: nn.Module) -> torch.dtype:
    p = next(module.parameters(), None)
    return p.dtype if p is not None else torch.get_default_dtype()


def save_generative(path: str | Path, model: nn.Module, training: dict[str, Any] | None = None) -> Path:
    """Save a generative model as ``path.safetensors`` + ``path.json`` (architecture in the JSON)."""
    kind = getattr(model, "kind", None)
    if kind not in GENERATIVE_KINDS:
        raise TypeError(f"`model` must be one of Bastion's generative models ({', '.join(GENERATIVE_KINDS)}), "
                        f"got {type(model).__name__}")
    stem = Path(path)
    if stem.suffix in (".json", ".safetensors"):
        stem = stem.with_suffix("")
    state = {"kind": kind, "config": model.config(), "training": training or {}}  # type: ignore[operator]
    return save_checkpoint(stem, model, state=state, with_rng=False)


def load_generative(path: str | Path, kind: str | None = None,
                    map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a generative model saved by `save_generative` (or a ``train_*`` function), in eval mode.

    Args:
        path: the checkpoint stem (``.json``/``.safetensors`` suffixes are accepted).
        kind: the expected kind (``pixelcnn``, ``gan-generator``, ``autoencoder``); a checkpoint
            of another kind raises `CheckpointError` naming both.
        map_location: device to load onto.
    """
    tensors, meta = read_checkpoint(path)
    state = meta.get("state", {})
    saved = state.get("kind")
    if saved not in GENERATIVE_KINDS:
        raise CheckpointError(f"{path} is not a generative-model checkpoint (kind {saved!r}; expected one of "
                              f"{', '.join(sorted(GENERATIVE_KINDS))})")
    if kind is not None and saved != kind:
        raise CheckpointError(f"{path} holds a {saved!r} model, but a {kind!r} model is needed here")
    cls = GENERATIVE_KINDS[saved]
    model = cls.from_config(state["config"])  # type: ignore[attr-defined]
    load_weights(model, tensors, f"checkpoint {path}")
    model.training_info = state.get("training", {})  # type: ignore[assignment]
    return model.to(map_location).eval()


def resolve_model(model: Any, kind: str, argname: str = "model") -> tuple[nn.Module, str]:
    """A generative module of `kind` from a module or a checkpoint path; plus a JSON-ready description."""
    if isinstance(model, (str, Path)):
        return load_generative(model, kind), str(model)
    cls = GENERATIVE_KINDS.get(kind)
    if cls is None or not isinstance(model, cls):
        want = cls.__name__ if cls is not None else kind
        raise TypeError(f"`{argname}` must be a {want} or the path of its checkpoint, got {type(model).__name__}")
    return model, f"<{type(model).__name__} {model.config()}>"  # type: ignore[operator]


class Timer:
    """Wall-clock seconds since construction (for training logs)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return round(time.perf_counter() - self.t0, 3)
