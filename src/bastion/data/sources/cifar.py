"""`cifar10` and `cifar100`: the standard "python version" pickle batches, read safely.

CIFAR-10: ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``;
CIFAR-100: ``cifar-100-python/{train, test, meta}`` (the 100 fine labels are used).

The batches are Python pickles, and unpickling can run arbitrary code. They are therefore read
with `SafeUnpickler`, which allows only the three numpy callables that rebuild an array and
refuses every other global, so a tampered file fails instead of running anything.

Folders are searched in order: the ``root`` argument, ``$BASTION_DATA/<name>``, then the download
cache (``$BASTION_CACHE/<name>`` or ``~/.cache/bastion/<name>``). In each, the batch folder may be
a subfolder (``<folder>/cifar-10-batches-py``) or the folder itself; an official ``.tar.gz``
found there is checked (md5) and extracted. With ``download=True`` the archive is fetched into
the cache, checked and extracted without path traversal.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..base import DATASETS, DataNotFoundError, Dataset
from ._download import (DownloadError, Place, cache_dir, download, extract_into, file_md5, not_found_message,
                        search_dirs)


def _reconstruct() -> Any:
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct as fn
    except ImportError:  # pragma: no cover (numpy 1.x)
        from numpy.core.multiarray import _reconstruct as fn  # type: ignore[no-redef]
    return fn


class SafeUnpickler(pickle.Unpickler):
    """An unpickler for data files: plain containers, numbers, strings, bytes and numpy arrays.

    `find_class` allows exactly the globals that a pickled numpy array needs
    (``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct``,
    ``numpy.ndarray``, ``numpy.dtype``) and maps them to the objects directly, without importing
    any module named in the file. Every other global raises `pickle.UnpicklingError`.
    """

    _ALLOWED: dict[tuple[str, str], Any] = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct(),
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct(),
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}: a data file may only "
                                         f"hold containers, numbers, strings and numpy arrays") from None


def safe_load_pickle(path: Path) -> Any:
    """Unpickle a data file with `SafeUnpickler` (latin1 for Python-2 strings, as CIFAR needs).

    Raises:
        DataNotFoundError: the file is unreadable, truncated, or holds a refused global.
    """
    try:
        with open(path, "rb") as f:
            return SafeUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise DataNotFoundError(f"{path}: unsafe or corrupt pickle: {e}") from e
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise DataNotFoundError(f"{path}: corrupt pickle ({type(e).__name__}: {e})") from e


def _as_str_keys(obj: Any, path: Path) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DataNotFoundError(f"{path}: expected a dict in the CIFAR file, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


@dataclass(frozen=True)
class CifarSource:
    """Names, files and constants of one CIFAR variant."""

    name: str
    title: str
    folder: str  # the folder inside the archive
    archive: str
    url: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int
    mean: tuple[float, float, float]  # of the train split, per channel in [0, 1]
    std: tuple[float, float, float]


CIFAR10 = CifarSource(
    name="cifar10", title="CIFAR-10", folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_files=("test_batch",),
    meta_file="batches.meta", label_key="labels", names_key="label_names", num_classes=10,
    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
)

CIFAR100 = CifarSource(
    name="cifar100", title="CIFAR-100", folder="cifar-100-python", archive="cifar-100-python.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", md5="eb9058c3a382ffc7106e4002c42a8d85",
    train_files=("train",), test_files=("test",), meta_file="meta",
    label_key="fine_labels", names_key="fine_label_names", num_classes=100,
    mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
)


def _batch_dir(src: CifarSource, folder: Path, needed: tuple[str, ...]) -> tuple[Path | None, str]:
    """The folder holding the needed batch files (``folder/<inner>`` or `folder` itself), extracting
    an official archive found in `folder` if need be; else None and what was wrong."""
    if not folder.is_dir():
        return None, "no such folder"
    for d in (folder / src.folder, folder):
        if all((d / f).is_file() for f in needed):
            return d, ""
    archive = folder / src.archive
    if archive.is_file():
        got = file_md5(archive)
        if got != src.md5:
            raise DataNotFoundError(f"{archive}: md5 {got} is not the official {src.md5}; delete it and get "
                                    f"the archive again from {src.url}")
        extract_into(archive, folder, src.folder)
        return folder / src.folder, ""
    missing = [f for f in needed if not (folder / src.folder / f).is_file()]
    return None, f"missing {src.folder}/{{{', '.join(missing)}}} (and no {src.archive})"


def _read_batch(src: CifarSource, path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = _as_str_keys(safe_load_pickle(path), path)
    if "data" not in d or src.label_key not in d:
        raise DataNotFoundError(f"{path}: not a {src.title} batch: keys {sorted(d)} lack 'data' or {src.label_key!r}")
    data, labels = d["data"], np.asarray(d[src.label_key])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataNotFoundError(f"{path}: 'data' must be a uint8 array N×3072, got "
                                f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise DataNotFoundError(f"{path}: {src.label_key!r} must be {data.shape[0]} integers, "
                                f"got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= src.num_classes):
        raise DataNotFoundError(f"{path}: labels must be in 0..{src.num_classes - 1}, "
                                f"got {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _read_classes(src: CifarSource, path: Path) -> list[str]:
    d = _as_str_keys(safe_load_pickle(path), path)
    names = d.get(src.names_key)
    if not isinstance(names, list) or len(names) != src.num_classes:
        raise DataNotFoundError(f"{path}: expected {src.num_classes} class names under {src.names_key!r}")
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


def load_cifar(src: CifarSource, split: str, root: Path | None, download_ok: bool) -> Dataset:
    """Find (or download and extract) the batches of `split`, read them safely, return a `Dataset`."""
    files = src.train_files if split == "train" else src.test_files
    needed = (*files, src.meta_file)
    looked: list[tuple[Place, str]] = []
    found: Path | None = None
    for place in search_dirs(src.name, root):
        if place.path is None:
            looked.append((place, place.note))
            continue
        found, problem = _batch_dir(src, place.path, needed)
        if found is not None:
            break
        looked.append((place, problem))

    if found is None:
        cache = cache_dir(src.name)
        how_to = (f"download {src.url} (md5 {src.md5}) and put it, or the extracted {src.folder}/ folder, "
                  f"into {cache} (or a folder passed as `root`, or $BASTION_DATA/{src.name})")
        note = "Nothing was downloaded (download=False)."
        if download_ok:
            try:
                download([src.url], cache / src.archive, src.md5)
                found = extract_into(cache / src.archive, cache, src.folder)
            except DownloadError as e:
                note = f"Downloading into {cache} failed: {e}"
        if found is None:
            raise DataNotFoundError(not_found_message(
                f"{src.title} ({split!r} split)", f"needs {src.folder}/{{{', '.join(needed)}}}",
                looked, how_to, note))

    parts = [_read_batch(src, found / f) for f in files]
    classes = _read_classes(src, found / src.meta_file)
    x = torch.from_numpy(np.concatenate([p[0] for p in parts]).astype(np.float32)).div_(255.0)
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return Dataset(src.name, split, x, y, classes, src.mean, src.std, str(found),
                   {"files": [str(found / f) for f in files]})


@DATASETS.register("cifar10", "CIFAR-10 32x32 colour, 10 classes, 50,000 / 10,000 (python batches; downloads)")
def load_cifar10(split: str, root: Path | None = None, download: bool = True) -> Dataset:
    """CIFAR-10 from the python batches: 3×32×32, 10 classes, 50,000 train / 10,000 test."""
    return load_cifar(CIFAR10, split, root, download)


@DATASETS.register("cifar100", "CIFAR-100 32x32 colour, 100 fine classes, 50,000 / 10,000 (python; downloads)")
def load_cifar100(split: str, root: Path | None = None, download: bool = True) -> Dataset:
    """CIFAR-100 from the python files: 3×32×32, the 100 fine labels, 50,000 train / 10,000 test."""
    return load_cifar(CIFAR100, split, root, download)
