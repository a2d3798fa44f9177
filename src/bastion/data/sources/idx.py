"""`mnist` and `fashion-mnist`: the standard IDX files (gzipped or not), read with numpy.

Each split needs two files in one folder, e.g. for train ``train-images-idx3-ubyte.gz`` and
``train-labels-idx1-ubyte.gz`` (test: ``t10k-...``); the uncompressed files are accepted too.
Folders are searched in this order: the ``root`` argument, ``$BASTION_DATA/<name>``, for
Fashion-MNIST Debian's ``/usr/share/datasets/fashion-mnist`` (package ``dataset-fashion-mnist``),
then the download cache (``$BASTION_CACHE/<name>`` or ``~/.cache/bastion/<name>``), where missing
files are downloaded from the official mirrors when ``download=True`` and their md5 matches the
published one.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..base import DATASETS, DataNotFoundError, Dataset
from ._download import DownloadError, Place, cache_dir, download, not_found_message, search_dirs

# IDX type codes (third byte of the magic number) -> numpy dtype; multi-byte types are big-endian.
_IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}

# split -> (images file, labels file), without the ".gz".
FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class IdxSource:
    """What differs between MNIST-format datasets: names, mirrors, checksums and constants."""

    name: str
    title: str
    classes: tuple[str, ...]
    mean: float  # of the train split's pixels in [0, 1]
    std: float
    mirrors: tuple[str, ...]  # base URLs, tried in order
    md5: dict[str, str]  # "<file>.gz" -> md5 of the published file
    system_dirs: tuple[str, ...] = ()
    install_hint: str = ""


MNIST = IdxSource(
    name="mnist", title="MNIST",
    classes=tuple(str(i) for i in range(10)), mean=0.1307, std=0.3081,
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",
             "https://storage.googleapis.com/cvdf-datasets/mnist/"),
    md5={"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
         "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
         "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
         "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
)

FASHION_MNIST = IdxSource(
    name="fashion-mnist", title="Fashion-MNIST",
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
             "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    mean=0.2860, std=0.3530,
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
             "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"),
    md5={"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
         "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
         "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
         "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
    system_dirs=("/usr/share/datasets/fashion-mnist",),
    install_hint="apt-get install dataset-fashion-mnist (Debian/Ubuntu; installs /usr/share/datasets/fashion-mnist)",
)


def _corrupt(path: Path, what: str) -> DataNotFoundError:
    return DataNotFoundError(f"{path}: corrupt IDX file: {what}. Delete it and get the file again.")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzipped or not, told apart by content) into a numpy array.

    Checks the magic number (two zero bytes, a known type code, the number of dimensions), that
    every dimension is positive and that the data is exactly as long as the dimensions say.

    Raises:
        DataNotFoundError: the file cannot be read, is truncated or is not an IDX file; the
            message names the file and what was wrong.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
        if gz:
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise _corrupt(path, f"the gzip stream is truncated or damaged ({e})") from e
    except OSError as e:
        raise DataNotFoundError(f"{path}: cannot read the file ({e})") from e
    if len(raw) < 4:
        raise _corrupt(path, f"only {len(raw)} bytes, shorter than the 4-byte magic number")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise _corrupt(path, f"bad magic number 0x{raw[:4].hex()} (expected 0x0000TTDD: type code TT in "
                             f"{{{', '.join(f'{t:02x}' for t in _IDX_TYPES)}}}, DD dimensions >= 1)")
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _corrupt(path, f"truncated header: {ndim} dimensions need {header} bytes, the file has {len(raw)}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if min(dims) < 1:
        raise _corrupt(path, f"a dimension is zero: {dims}")
    need = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    have = len(raw) - header
    if have != need:
        state = "truncated" if have < need else "too long"
        raise _corrupt(path, f"{state}: dimensions {dims} need {need} bytes of data, the file has {have}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _find(folder: Path, base: str) -> Path | None:
    """``folder/base.gz`` or ``folder/base``, whichever exists (gzip first)."""
    for p in (folder / f"{base}.gz", folder / base):
        if p.is_file():
            return p
    return None


def _look(place: Place, bases: tuple[str, ...]) -> tuple[list[Path] | None, str]:
    """The split's files in this place, or None and what was wrong there."""
    if place.path is None:
        return None, place.note
    if not place.path.is_dir():
        return None, "no such folder"
    found = [_find(place.path, b) for b in bases]
    missing = [b for b, p in zip(bases, found) if p is None]
    if missing:
        return None, "missing " + ", ".join(f"{b}[.gz]" for b in missing)
    return [p for p in found if p is not None], ""


def _read_split(src: IdxSource, images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise _corrupt(images_path, f"expected uint8 images N×28×28, got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise _corrupt(labels_path, f"expected uint8 labels of shape (N,), got {labels.dtype} {labels.shape}")
    if labels.shape[0] != images.shape[0]:
        raise _corrupt(labels_path, f"{labels.shape[0]} labels for {images.shape[0]} images in {images_path.name}")
    if labels.max() >= len(src.classes):
        raise _corrupt(labels_path, f"label {int(labels.max())} is not a class index 0..{len(src.classes) - 1}")
    return images, labels


def load_idx_dataset(src: IdxSource, split: str, root: Path | None, download_ok: bool) -> Dataset:
    """Find (or download) the split's two IDX files, read and check them, return a `Dataset`."""
    bases = FILES[split]
    looked: list[tuple[Place, str]] = []
    found: list[Path] | None = None
    for place in search_dirs(src.name, root, src.system_dirs):
        found, problem = _look(place, bases)
        if found is not None:
            break
        looked.append((place, problem))

    if found is None:
        cache = cache_dir(src.name)
        gz_names = [f"{b}.gz" for b in bases]
        urls = ", ".join(src.mirrors[0] + n for n in gz_names)
        how_to = (f"{src.install_hint}, or " if src.install_hint else "") + (
            f"download {urls} into {cache} (or into a folder passed as `root`, or $BASTION_DATA/{src.name})")
        if not download_ok:
            note = "Nothing was downloaded (download=False)."
        else:
            try:
                for n in gz_names:
                    if not (cache / n).is_file():
                        download([m + n for m in src.mirrors], cache / n, src.md5[n])
                found = [cache / n for n in gz_names]
                note = ""
            except DownloadError as e:
                note = f"Downloading into {cache} failed: {e}"
        if found is None:
            raise DataNotFoundError(not_found_message(
                f"{src.title} ({split!r} split)", f"needs {' and '.join(gz_names)} (or the uncompressed files) "
                f"in one folder", looked, how_to, note))

    images, labels = _read_split(src, found[0], found[1])
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return Dataset(src.name, split, x, y, list(src.classes), (src.mean,), (src.std,), str(found[0].parent),
                   {"files": [str(p) for p in found]})


@DATASETS.register("mnist", "MNIST 28x28 digits, 60,000 / 10,000 (standard IDX files; downloads)")
def load_mnist(split: str, root: Path | None = None, download: bool = True) -> Dataset:
    """MNIST from the standard IDX files: 1×28×28, classes "0".."9", 60,000 train / 10,000 test.

    Looked for in `root`, ``$BASTION_DATA/mnist``, then the cache ``~/.cache/bastion/mnist``
    (``$BASTION_CACHE/mnist``), where the files are downloaded (md5-checked) if `download`.
    """
    return load_idx_dataset(MNIST, split, root, download)


@DATASETS.register("fashion-mnist", "Fashion-MNIST 28x28 clothes, 60,000 / 10,000 (IDX files; Debian package)")
def load_fashion_mnist(split: str, root: Path | None = None, download: bool = True) -> Dataset:
    """Fashion-MNIST from the standard IDX files: 1×28×28, 10 clothing classes, 60,000 / 10,000.

    Looked for in `root`, ``$BASTION_DATA/fashion-mnist``, ``/usr/share/datasets/fashion-mnist``
    (``apt-get install dataset-fashion-mnist``), then the cache ``~/.cache/bastion/fashion-mnist``,
    where the files are downloaded (md5-checked) if `download`.
    """
    return load_idx_dataset(FASHION_MNIST, split, root, download)
