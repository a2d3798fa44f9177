"""Where dataset files are looked for, how they are fetched, verified and unpacked.

Shared by the loaders that read standard files (MNIST, Fashion-MNIST, CIFAR):

* `search_dirs` lists the folders to look in, in order: the ``root`` argument,
  ``$BASTION_DATA/<name>``, system folders (e.g. Debian's ``/usr/share/datasets``), then the
  download cache (``$BASTION_CACHE/<name>``, default ``~/.cache/bastion/<name>``);
* `download` fetches one file with a timeout into a temporary file, checks its md5 and only
  then renames it into place, so a half-written or tampered file is never seen as valid;
* `safe_extract_tar` unpacks an archive while refusing links, devices and paths that leave the
  destination folder;
* `not_found_message` writes the error a user sees: what was wanted, every folder searched and
  what was wrong there, and how to get the files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from ..base import DataNotFoundError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0  # seconds per socket operation, not for the whole file
_CHUNK = 1 << 20


class DownloadError(OSError):
    """A download failed (network error, HTTP error or checksum mismatch)."""


@dataclass(frozen=True)
class Place:
    """One folder that is searched, and why it is on the list (shown in error messages)."""

    path: Path | None
    why: str
    note: str = ""  # shown instead of the path when `path` is None (e.g. "not set")

    def describe(self) -> str:
        return f"{self.why}: {self.note}" if self.path is None else f"{self.path} ({self.why})"


def cache_dir(name: str) -> Path:
    """The download cache of dataset `name`: ``$BASTION_CACHE/<name>`` or ``~/.cache/bastion/<name>``."""
    base = os.environ.get("BASTION_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "bastion") / name


def search_dirs(name: str, root: Path | None, system: Sequence[str | Path] = ()) -> list[Place]:
    """The folders to search for dataset `name`, in order (the cache comes last)."""
    places: list[Place] = []
    if root is not None:
        places.append(Place(Path(root).expanduser(), "root argument"))
    env = os.environ.get("BASTION_DATA")
    if env:
        places.append(Place(Path(env).expanduser() / name, "$BASTION_DATA"))
    else:
        places.append(Place(None, "$BASTION_DATA", "not set"))
    places.extend(Place(Path(p), "system folder") for p in system)
    places.append(Place(cache_dir(name), "download cache"))
    return places


def file_md5(path: Path) -> str:
    """Hex md5 of a file, read in chunks (md5 only identifies the published files, see `download`)."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _urlopen(url: str, timeout: float) -> BinaryIO:
    """Open `url` for reading (the one place that touches the network; tests replace it)."""
    req = urllib.request.Request(url, headers={"User-Agent": "bastion-robust (dataset download)"})
    return urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 (http/https only, checked below)


def download(urls: Sequence[str], dest: Path, md5: str, timeout: float = DEFAULT_TIMEOUT) -> Path:
    """Fetch a file from the first URL that works, verify its md5, and move it to `dest`.

    The bytes go to a temporary file in `dest`'s folder, which is renamed to `dest` only after
    the checksum matched; on any failure the temporary file is removed.

    Raises:
        DownloadError: every URL failed; the message has each URL and its error.
    """
    if not urls:
        raise ValueError("`urls` must name at least one URL")
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    for url in urls:
        if not url.startswith(("https://", "http://")):
            raise ValueError(f"`urls` must be http(s) URLs, got {url!r}")
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        tmp = Path(tmp_name)
        try:
            log.info("downloading %s -> %s", url, dest)
            h = hashlib.md5(usedforsecurity=False)
            with os.fdopen(fd, "wb") as out, _urlopen(url, timeout) as resp:
                total = int(getattr(resp, "headers", {}).get("Content-Length", 0) or 0)
                bar = _progress(total, dest.name)
                for chunk in iter(lambda: resp.read(_CHUNK), b""):
                    out.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
                bar.close()
            got = h.hexdigest()
            if got != md5:
                raise DownloadError(f"checksum mismatch: md5 {got}, expected {md5}")
            os.replace(tmp, dest)
            return dest
        except (OSError, urllib.error.URLError, ValueError) as e:  # URLError/HTTPError are OSErrors
            errors.append(f"{url}: {e}")
        finally:
            tmp.unlink(missing_ok=True)
    raise DownloadError("download failed:\n  " + "\n  ".join(errors))


def _progress(total: int, desc: str):  # noqa: ANN202 (a tqdm bar)
    from tqdm.auto import tqdm

    # disable=None: a bar only on a terminal, nothing in logs or captured output.
    return tqdm(total=total or None, unit="B", unit_scale=True, desc=desc, disable=None, leave=False)


def safe_extract_tar(archive: Path, dest: Path) -> None:
    """Extract a tar archive into `dest`, refusing anything that is not a plain file or folder
    and any member whose path is absolute or leaves `dest` (``..``).

    Raises:
        DataNotFoundError: the archive is unreadable or holds a refused member (nothing is
            extracted then: members are checked before the first one is written).
    """
    dest = dest.resolve()
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                p = PurePosixPath(m.name)
                if not (m.isfile() or m.isdir()):
                    raise DataNotFoundError(f"{archive}: refusing to extract {m.name!r}: not a plain file or folder")
                if p.is_absolute() or ".." in p.parts or not (dest / p).resolve().is_relative_to(dest):
                    raise DataNotFoundError(f"{archive}: refusing to extract {m.name!r}: path leaves {dest}")
            dest.mkdir(parents=True, exist_ok=True)
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12: a second line of defence
                tar.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover
                tar.extractall(dest, members=members)
    except (tarfile.TarError, EOFError, OSError) as e:
        if isinstance(e, DataNotFoundError):
            raise
        raise DataNotFoundError(f"{archive}: cannot extract the archive ({type(e).__name__}: {e})") from e


def extract_into(archive: Path, folder: Path, inner: str) -> Path:
    """Extract `archive` (which holds the folder `inner`) next to it, atomically: it is unpacked
    into a temporary folder and `inner` is moved to ``folder/inner`` only when complete."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=folder))
    try:
        safe_extract_tar(archive, tmp)
        if not (tmp / inner).is_dir():
            raise DataNotFoundError(f"{archive}: the archive holds no folder {inner!r}")
        target = folder / inner
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp / inner, target)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def not_found_message(title: str, wanted: str, looked: Sequence[tuple[Place, str]],
                      how_to: str, download_note: str) -> str:
    """The error text for missing data: what, where (each place and what was wrong), and how."""
    lines = [f"{title} not found: {wanted}.", "Looked in:"]
    lines += [f"  - {place.describe()}" + (f": {problem}" if place.path is not None else "")
              for place, problem in looked]
    lines.append(download_note)
    lines.append(f"To get it: {how_to}")
    return "\n".join(lines)
