"""Save and load fitted detectors: safetensors for every tensor, JSON for the rest; nothing is pickled.

A saved detector is a checkpoint pair (`bastion.checkpoint`, written atomically, JSON last):

* ``<stem>.safetensors`` — the detector's ``state_dict()`` (``model.*``: defender networks,
  class centres, kernel-density references, the logistic regression's coefficients, the
  autoencoder, ...) and the content hashes of the data it was fit and calibrated on
  (``extra.fit_hashes``, ``extra.calibration_hashes``: uint8, 12 bytes per example);
* ``<stem>.json`` — ``state.kind = "detector"``, the registered name, the constructor options
  that rebuild an unfitted twin (`Detector.init_kwargs`), the fitted state that is not a tensor
  (`Detector.fitted_state`: threshold, false-positive rate, calibration record, fit record,
  per-detector extras such as KDE's bandwidth), and a digest of the classifier it was fit on.

scikit-learn parts are stored as their arrays (the kde-bu regression lives in torch buffers);
`load_detector` rebuilds the detector from its class and options, recreates the submodules
`fit` created (`Detector._rebuild`), and assigns the tensors, refusing missing, unexpected or
misshapen ones. The classifier is not part of the detector (a detector references the model it
watches): pass it to `load_detector`, which checks it is the one the detector was fit on.

>>> save_detector(det, "runs/mrr16/detector")
>>> det2 = load_detector("runs/mrr16/detector", model)
>>> torch.equal(det.scores(x), det2.scores(x))
True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from .base import DETECTORS, Detector, NotFittedError

__all__ = ["DETECTOR_KIND", "load_detector", "save_detector"]

DETECTOR_KIND = "detector"
_HASH_BYTES = 12  # `example_hashes` digests: BLAKE2b, 12 bytes


def _stem(path: str | Path) -> Path:
    """A checkpoint stem: a folder means ``folder/detector``; .json/.safetensors suffixes are dropped."""
    p = Path(path)
    if p.is_dir():
        return p / "detector"
    if p.suffix in (".json", ".safetensors"):
        return p.with_suffix("")
    return p


def _hashes_to_tensor(hashes: set[str]) -> Tensor:
    rows = [bytes.fromhex(h) for h in sorted(hashes)]
    if any(len(r) != _HASH_BYTES for r in rows):
        raise ValueError("the detector's example hashes are not 12-byte BLAKE2b digests")
    if not rows:
        return torch.zeros(0, _HASH_BYTES, dtype=torch.uint8)
    return torch.frombuffer(bytearray(b"".join(rows)), dtype=torch.uint8).reshape(-1, _HASH_BYTES).clone()


def _tensor_to_hashes(t: Tensor | None) -> set[str]:
    if t is None or t.numel() == 0:
        return set()
    return {bytes(row).hex() for row in t.to(torch.uint8).reshape(-1, _HASH_BYTES).tolist()}


def _model_digest(model: nn.Module) -> str:
    from ...evaluation.evaluate import model_digest

    return model_digest(model)


def save_detector(detector: Detector, path: str | Path) -> Path:
    """Save a fitted detector as ``<stem>.safetensors`` + ``<stem>.json``; returns the stem.

    Args:
        detector: a fitted `Detector` (calibrated or not: the threshold is saved when there is one).
        path: the checkpoint stem (``.json`` / ``.safetensors`` suffixes are accepted), or an
            existing folder (then ``folder/detector``).

    Raises:
        NotFittedError: the detector was never fit.
        TypeError: the detector holds parts that cannot be rebuilt from JSON (e.g. a feature
            squeezer given as a module instead of a transform spec).
    """
    if not isinstance(detector, Detector):
        raise TypeError(f"`detector` must be a bastion Detector, got {type(detector).__name__}")
    if not detector.fitted:
        raise NotFittedError(f"detector {detector.name!r} is not fitted: there is nothing to save")
    stem = _stem(path)
    init = detector.init_kwargs()  # may refuse (TypeError) before anything is written
    model = detector.model
    state: dict[str, Any] = {
        "kind": DETECTOR_KIND,
        "name": detector.name,
        "class": type(detector).__name__,
        "init": init,
        "fitted": detector.fitted_state(),
        "config": detector.config(),
        "classifier": {"digest": _model_digest(model), "class": type(model).__name__,
                       "spec": model.spec.to_dict() if getattr(model, "spec", None) is not None else None},
        "n_fit_hashes": len(detector.fit_hashes),
        "n_calibration_hashes": len(detector.calibration_hashes),
    }
    extra = {"fit_hashes": _hashes_to_tensor(detector.fit_hashes),
             "calibration_hashes": _hashes_to_tensor(detector.calibration_hashes)}
    return save_checkpoint(stem, detector, state=state, with_rng=False, extra_tensors=extra)


def _assign_tensors(detector: Detector, tensors: dict[str, Tensor], source: str) -> None:
    """Load ``model.*`` tensors into the detector: parameters by copy (same shape), buffers by replacement.

    Buffers may legitimately change shape (they start as empty placeholders before `fit`);
    parameters belong to the submodules `_rebuild` created and must match exactly.
    """
    saved = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    own = detector.state_dict()
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:5]}")
        raise CheckpointError(f"{source} does not fit a {detector.name!r} detector rebuilt from its options: "
                              + "; ".join(parts))
    params = dict(detector.named_parameters())
    for key, value in saved.items():
        owner_name, _, attr = key.rpartition(".")
        owner = detector.get_submodule(owner_name) if owner_name else detector
        if key in params:
            p = params[key]
            if p.shape != value.shape:
                raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(value.shape)}, the rebuilt "
                                      f"detector expects {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(value.to(p.dtype))
        else:
            owner._buffers[attr] = value.clone()


def load_detector(path: str | Path, model: nn.Module | str | Path, *, map_location: str | torch.device = "cpu",
                  check_model: bool = True) -> Detector:
    """Rebuild a detector saved by `save_detector`, attached to `model`, in eval mode.

    Args:
        path: the checkpoint stem (or a folder holding ``detector.json`` / ``detector.safetensors``).
        model: the classifier the detector watches: an `nn.Module`, or a path `load_model` reads
            (a run folder or a model stem).
        map_location: device for the detector's tensors (and for `model` when it is a path).
        check_model: refuse a `model` whose weights differ from those the detector was fit on
            (a digest of its state). Default True.

    Raises:
        CheckpointError: missing or corrupt files, not a detector checkpoint, tensors that do not
            fit the rebuilt detector, or (with `check_model`) another classifier.
    """
    stem = _stem(path)
    tensors, meta = read_checkpoint(stem)
    state = meta.get("state") or {}
    if state.get("kind") != DETECTOR_KIND:
        raise CheckpointError(f"{stem} is not a saved detector (kind {state.get('kind')!r}); save one with "
                              f"save_detector")
    if isinstance(model, (str, Path)):
        from ...checkpoint import load_model

        model = load_model(model, map_location=map_location)
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be the classifier (an nn.Module) or its path, got {type(model).__name__}")
    want = (state.get("classifier") or {}).get("digest")
    if check_model and want is not None and _model_digest(model) != want:
        raise CheckpointError(f"{stem}: `model` is not the classifier this detector was fit on (its weights differ); "
                              f"pass that model, or check_model=False to attach the detector to another one")
    name = state.get("name")
    cls = DETECTORS.get(name)
    try:
        det = cls(**state.get("init", {}))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{stem}: cannot rebuild detector {name!r} from its saved options: {e}") from e
    det.restore_fitted_state(state.get("fitted") or {}, model)
    _assign_tensors(det, tensors, f"detector checkpoint {stem}")
    det.fit_hashes = _tensor_to_hashes(tensors.get("extra.fit_hashes"))
    det.calibration_hashes = _tensor_to_hashes(tensors.get("extra.calibration_hashes"))
    det.to(map_location)
    det.eval()
    return det
