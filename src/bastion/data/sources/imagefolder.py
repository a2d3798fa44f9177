"""`imagefolder`: images in one folder per class, read with Pillow.

Two layouts are understood:

* split folders: ``root/train/<class>/*.png`` and ``root/test/<class>/*.png`` — used when
  ``root/train`` or ``root/test`` exists (then the requested split's folder must exist);
* class folders only: ``root/<class>/*.png`` — the split is then made here, fixed and seeded:
  within each class, the files sorted by path are permuted with
  ``numpy.random.default_rng([0, crc32(class name)])`` and the first ``round(0.2·n)`` go to test,
  the rest to train (80/20 per class; a class's split does not change when classes are added).

Classes are the sub-folder names, sorted alphabetically (in the split layout, the union over
``train`` and ``test``, so both splits share label indices). Images are the files with extension
.png, .jpg, .jpeg, .bmp, .gif (first frame) or .webp, searched recursively inside each class
folder; hidden files and folders are skipped. Images are converted to RGB, or to L (one
channel) when every image of both splits is grayscale; alpha is dropped. All images must have
one size — nothing is resized silently.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch

from ..base import DATASETS, SPLITS, DataNotFoundError, Dataset, channel_stats
from ._split import SPLIT_SEED, TEST_FRACTION, n_test_of

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_GRAY_MODES = {"1", "L", "LA", "La"}
_COLOR_MODES = {"RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "P", "PA"}


def _images_in(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, sorted by path; hidden entries are skipped."""
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).parts
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not any(s.startswith(".") for s in rel):
            out.append(p)
    return sorted(out)


def _class_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _split_files(files: list[Path], class_name: str) -> tuple[list[Path], list[Path]]:
    """The fixed seeded 80/20 split of one class's files (see the module docstring)."""
    perm = np.random.default_rng([SPLIT_SEED, zlib.crc32(class_name.encode("utf-8"))]).permutation(len(files))
    k = n_test_of(len(files), TEST_FRACTION)
    test = sorted(files[i] for i in perm[:k])
    train = sorted(files[i] for i in perm[k:])
    return train, test


def _collect(root: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]], str]:
    """Classes, the (file, label) list of each split, and a description of the layout."""
    if not root.is_dir():
        raise DataNotFoundError(f"imagefolder: `root` {root} is not a folder")
    split_dirs = {s: root / s for s in SPLITS if (root / s).is_dir()}
    items: dict[str, list[tuple[Path, int]]] = {s: [] for s in SPLITS}
    if split_dirs:
        classes = sorted({c for d in split_dirs.values() for c in _class_dirs(d)})
        for s, d in split_dirs.items():
            for label, c in enumerate(classes):
                if (d / c).is_dir():
                    items[s] += [(p, label) for p in _images_in(d / c)]
        layout = f"split folders {', '.join(f'{s}/' for s in split_dirs)}"
    else:
        classes = _class_dirs(root)
        for label, c in enumerate(classes):
            train, test = _split_files(_images_in(root / c), c)
            items["train"] += [(p, label) for p in train]
            items["test"] += [(p, label) for p in test]
        layout = (f"class folders; fixed split {1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%} per class, "
                  f"seed {SPLIT_SEED}")
    if not classes:
        raise DataNotFoundError(f"imagefolder: no class folders in {root} (expected root/<class>/*.png or "
                                f"root/<split>/<class>/*.png)")
    return classes, items, layout


def _is_gray(img) -> bool:  # noqa: ANN001 (a PIL image)
    if img.mode in _GRAY_MODES:
        return True
    if img.mode in ("P", "PA"):
        pal = np.asarray(img.getpalette() or [], dtype=np.int64).reshape(-1, 3)
        return bool(len(pal)) and bool((pal == pal[:, :1]).all())
    return False


def _scan(files: list[Path]) -> tuple[tuple[int, int], bool]:
    """Check that every file is a readable 8-bit image of one size; return (size, all grayscale)."""
    from PIL import Image, UnidentifiedImageError

    size: tuple[int, int] | None = None
    first: Path | None = None
    gray = True
    for p in files:
        try:
            with Image.open(p) as img:
                if img.mode not in _GRAY_MODES | _COLOR_MODES:
                    raise DataNotFoundError(f"{p}: unsupported image mode {img.mode!r} (16-bit or float images); "
                                            f"convert it to 8-bit RGB or grayscale")
                if size is None:
                    size, first = img.size, p
                elif img.size != size:
                    raise DataNotFoundError(
                        f"{p}: image size {img.size[0]}x{img.size[1]} differs from {size[0]}x{size[1]} of {first}; "
                        f"all images must have one size (resize them beforehand: Bastion does not resize silently)")
                gray = gray and _is_gray(img)
        except (UnidentifiedImageError, OSError) as e:
            if isinstance(e, DataNotFoundError):
                raise
            raise DataNotFoundError(f"{p}: cannot read the image ({e})") from e
    assert size is not None
    return size, gray


def _decode(files: list[Path], size: tuple[int, int], gray: bool) -> torch.Tensor:
    """The images as float32 N×C×H×W in [0, 1]."""
    from PIL import Image

    w, h = size
    c = 1 if gray else 3
    out = np.empty((len(files), h, w, c), dtype=np.uint8)
    for i, p in enumerate(files):
        try:
            with Image.open(p) as img:
                arr = np.asarray(img.convert("L" if gray else "RGB"))
        except OSError as e:
            raise DataNotFoundError(f"{p}: cannot decode the image ({e})") from e
        out[i] = arr.reshape(h, w, c)
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def _stream_stats(files: list[Path], size: tuple[int, int], gray: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of images decoded in chunks (so the train split need not be held)."""
    c = 1 if gray else 3
    s, ss, n = np.zeros(c), np.zeros(c), 0
    for i in range(0, len(files), 256):
        x = _decode(files[i:i + 256], size, gray).double()
        s += x.sum(dim=(0, 2, 3)).numpy()
        ss += (x * x).sum(dim=(0, 2, 3)).numpy()
        n += x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / n
    var = np.maximum((ss - n * mean * mean) / max(n - 1, 1), 1e-12)
    return tuple(float(m) for m in mean), tuple(float(max(np.sqrt(v), 1e-6)) for v in var)


@DATASETS.register("imagefolder", "your own images, one folder per class (root=...); PNG/JPEG/BMP/GIF/WebP")
def load_imagefolder(split: str, root: Path | None = None, download: bool = True) -> Dataset:
    """Images in class folders under `root` (required); see the module docstring for the layouts,
    the fixed 80/20 split, and the colour mode. `download` is ignored.

    Raises:
        ValueError: `root` is None.
        DataNotFoundError: `root` or the split's folder is missing, no images are found, an image
            is unreadable, or the images do not all have one size (the message names the file).
    """
    if root is None:
        raise ValueError("`root` is required for dataset 'imagefolder': the folder holding <class>/ or "
                         "<split>/<class>/ sub-folders of images, e.g. load_dataset('imagefolder', root='~/pets')")
    root = Path(root).expanduser()
    classes, items, layout = _collect(root)
    if not items[split]:
        where = root / split if (root / split).is_dir() else root
        if (root / "train").is_dir() or (root / "test").is_dir():
            if not (root / split).is_dir():
                raise DataNotFoundError(f"imagefolder: {root} has split folders but no {split}/ folder")
        raise DataNotFoundError(f"imagefolder: no {split!r} images ({', '.join(IMAGE_EXTENSIONS)}) in the class "
                                f"folders of {where} (classes: {', '.join(classes)})")
    all_files = [p for s in SPLITS for p, _ in items[s]]
    size, gray = _scan(all_files)
    files = [p for p, _ in items[split]]
    x = _decode(files, size, gray)
    y = torch.tensor([label for _, label in items[split]], dtype=torch.int64)
    train_files = [p for p, _ in items["train"]]
    if split == "train":
        mean, std = channel_stats(x)
    elif train_files:
        mean, std = _stream_stats(train_files, size, gray)
    else:  # a test-only folder: there are no train statistics to give
        mean, std = channel_stats(x)
    return Dataset("imagefolder", split, x, y, classes, mean, std, str(root),
                   {"layout": layout, "files": [str(p.relative_to(root)) for p in files],
                    "stats_from": "train" if split == "train" or train_files else "test (no train images)"})
