"""Checkpoints as safetensors (every tensor) + JSON (everything else). Nothing is unpickled.

A checkpoint is a pair ``<stem>.safetensors`` / ``<stem>.json``. Both are written to temporary
files and renamed into place, the JSON last: a checkpoint whose JSON exists is complete, so a
crash (even SIGKILL) in the middle of a write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .models.base import Classifier, ModelSpec, model_from_spec

FORMAT = "bastion-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not fit the model it is loaded into."""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically (readers see the old file or the new one), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(path, text.encode("utf-8"))
    return path


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    _atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- RNG states
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Python, NumPy and torch (CPU and CUDA) RNG states, split into tensors and JSON."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    tensors["rng.numpy.keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)],
            "python": [version, list(internal), gauss]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy.keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


# ----------------------------------------------------------------------------- optimizer
def _split_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, st in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


# ----------------------------------------------------------------------------- public API
def save_checkpoint(stem: str | Path, model: nn.Module, *, optimizer: torch.optim.Optimizer | None = None,
                    state: dict[str, Any] | None = None, spec: ModelSpec | None = None,
                    with_rng: bool = True, extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Save weights (+ optimizer, RNG states and a JSON `state`) as ``stem.safetensors`` + ``stem.json``."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    meta: dict[str, Any] = {"format": FORMAT, "state": state or {}}
    spec = spec or getattr(model, "spec", None)
    if spec is not None:
        meta["model"] = spec.to_dict()
    if optimizer is not None:
        t, m = _split_optimizer(optimizer)
        tensors.update(t)
        meta["optimizer"] = m
    if with_rng:
        t, m = rng_state()
        tensors.update(t)
        meta["rng"] = m
    for k, v in (extra_tensors or {}).items():
        tensors[f"extra.{k}"] = v
    _atomic_save_tensors(stem.with_suffix(".safetensors"), tensors)
    atomic_write_json(stem.with_suffix(".json"), meta)
    return stem


def read_checkpoint(stem: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The raw (tensors, meta) of a checkpoint; errors say which file is missing or corrupt."""
    stem = Path(stem)
    if stem.suffix in (".json", ".safetensors"):
        stem = stem.with_suffix("")
    jpath, tpath = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    for p in (jpath, tpath):
        if not p.is_file():
            raise CheckpointError(f"checkpoint file {p} not found (a checkpoint is {stem.name}.safetensors + {stem.name}.json)")
    try:
        meta = json.loads(jpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint metadata {jpath} is corrupt: {e}") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{jpath} is not a Bastion checkpoint (format {meta.get('format')!r}, expected {FORMAT!r})")
    try:
        tensors = load_file(str(tpath))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"checkpoint weights {tpath} are corrupt: {e}") from e
    return tensors, meta


def load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load ``model.*`` tensors strictly; a mismatch names the differing keys/shapes."""
    sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(sd) & set(own)) if sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatches {shapes[:5]}")
        raise CheckpointError(f"{source} does not fit this model (another architecture?): " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)


def load_checkpoint(stem: str | Path, model: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, *, restore_rng: bool = False,
                    map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint into `model` (rebuilt from its saved spec when None).

    Returns ``(model, meta)``; ``meta["state"]`` is what was saved as `state`.
    """
    tensors, meta = read_checkpoint(stem)
    if model is None:
        if "model" not in meta:
            raise CheckpointError(f"{stem} has no model spec: pass the model to load it into")
        model = model_from_spec(meta["model"])
    elif "model" in meta and isinstance(model, Classifier) and model.spec is not None:
        # Compare as JSON sees both (a tuple option comes back from JSON as a list).
        saved, own = meta["model"], json.loads(json.dumps(model.spec.to_dict(), default=str))
        diff = [k for k in ("name", "num_classes", "in_shape", "kwargs") if saved.get(k) != own.get(k)]
        if diff:
            detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs model {own.get(k)!r}" for k in diff)
            raise CheckpointError(f"checkpoint {stem} is of another architecture ({detail})")
    load_weights(model, tensors, f"checkpoint {stem}")
    model.to(map_location)
    if optimizer is not None:
        if "optimizer" not in meta:
            raise CheckpointError(f"checkpoint {stem} holds no optimizer state")
        optimizer.load_state_dict(_join_optimizer(tensors, meta["optimizer"]))
    if restore_rng:
        set_rng_state(tensors, meta["rng"])
    return model, meta


def save_model(path: str | Path, model: nn.Module, spec: ModelSpec | None = None) -> Path:
    """Weights + architecture, loadable with `load_model(path)` (no optimizer or RNG state)."""
    return save_checkpoint(Path(path).with_suffix(""), model, spec=spec, with_rng=False)


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by `save_model` or by the Trainer (``model`` / checkpoint stems, or a run folder)."""
    p = Path(path)
    if p.is_dir():
        p = p / "model"
        if not p.with_suffix(".json").exists():
            raise CheckpointError(f"run folder {path} has no final model ({p}.json); did training finish?")
    model, _ = load_checkpoint(p, map_location=map_location)
    return model.eval()
