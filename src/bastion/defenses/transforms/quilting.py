"""Image quilting (Guo et al. 2018): rebuild each image from patches of clean training images.

Every patch of the input (a grid of `patch_size` squares, `overlap` pixels apart from the next)
is replaced by one of its K nearest neighbours (squared L2 over all channels) in a database of
patches cut from clean training images, chosen uniformly at random among the K — the paper's
randomization. The result contains, by construction, only clean-image content.

Simplification (documented, deliberate): Guo et al. follow Efros & Freeman 2001 and stitch
overlapping patches along a minimum-error boundary cut (graph cut). Here overlapping regions
are *averaged*; with ``overlap=0`` nothing is blended and every output patch is a database
patch verbatim (the tests check that). When the image side is not a whole number of steps,
the last patch of a row/column is aligned to the border and overlaps its neighbour (averaged).

Nearest neighbours are found vectorized (‖q‖² − 2q·dᵀ + ‖d‖² by matrix product, queries
chunked to bound memory), so quilting a batch is a few matrix products, on any device.

The database is a buffer: it moves with ``.to(device)`` and travels in the ``state_dict``
(safetensors-compatible); `load_state_dict` accepts a database of any size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..._checks import check_images
from .base import RandomizedTransform, check_int_range, register_transform, zero_grad_output

__all__ = ["Quilting"]

# Elements of one query-chunk × database distance matrix (bounds the search's memory).
_SEARCH_CHUNK_ELEMENTS = 2**24
# Above this many candidate patches `fit` samples positions with replacement (no big randperm).
_EXACT_SAMPLING_LIMIT = 10_000_000


def _starts(size: int, patch: int, step: int) -> list[int]:
    """Patch origins along one axis: 0, step, 2·step, ... with the last one flush with the border."""
    s = list(range(0, size - patch + 1, step))
    if s[-1] != size - patch:
        s.append(size - patch)
    return s


@register_transform("quilting")
class Quilting(RandomizedTransform):
    """Image quilting with a database of clean patches and a random choice among K neighbours.

    Guo, Rana, Cissé & van der Maaten 2018, "Countering Adversarial Images using Input
    Transformations", ICLR 2018, arXiv:1711.00117 (after Efros & Freeman 2001). Broken with
    BPDA (identity) + EOT by Athalye, Carlini & Wagner 2018 (arXiv:1802.00420).

    Declarations: not differentiable (a nearest-neighbour look-up: autograd gives zero);
    randomized when ``k > 1`` (the instance's ``randomized`` says so; the class flag is True);
    `bpda` = identity.

    Args:
        patch_size: side of the square patches (>= 1). Default 5.
        overlap: pixels shared by neighbouring patches, 0 <= overlap < patch_size; overlaps are
            averaged (see the module docstring). Default 2.
        k: choose uniformly among the k nearest database patches (k = 1: deterministic).
            Default 10.
        database: optional P×(C·patch_size²) tensor of flattened patches (else call `fit`).
        num_patches: the database size `fit` samples when not told otherwise (None: every patch).
            Default 100,000; the cost of a pass grows linearly with it (``bastion audit
            --transform quilting:num_patches=20000`` for a faster audit).
        seed / generator: see `RandomizedTransform`.

    Example:
        >>> q = Quilting(patch_size=4, overlap=0, k=5).fit(x_train)
        >>> x_q = q(x_test)
    """

    differentiable = False
    randomized = True

    def __init__(self, patch_size: int = 5, overlap: int = 2, k: int = 10, database: Tensor | None = None,
                 seed: int | None = None, generator: torch.Generator | None = None,
                 num_patches: int | None = 100_000) -> None:
        super().__init__(seed, generator)
        self.patch_size = check_int_range(patch_size, "patch_size", 1)
        self.num_patches = None if num_patches is None else check_int_range(num_patches, "num_patches", 1)
        self.overlap = check_int_range(overlap, "overlap", 0, patch_size - 1)
        self.k = check_int_range(k, "k", 1)
        self.randomized = self.k > 1  # instance-level declaration (k = 1 is deterministic)
        self.register_buffer("database", torch.empty(0, 0))
        if database is not None:
            self.set_database(database)

    # -- the database -----------------------------------------------------------------------
    def set_database(self, patches: Tensor) -> "Quilting":
        """Use `patches` (P×(C·patch_size²), values in [0, 1]) as the database."""
        if not isinstance(patches, Tensor) or patches.dim() != 2 or patches.shape[0] == 0:
            raise ValueError("`database` must be a non-empty P×(C·patch_size²) tensor of flattened patches")
        if patches.shape[1] % (self.patch_size**2):
            raise ValueError(f"`database` rows have {patches.shape[1]} values, not a multiple of "
                             f"patch_size² = {self.patch_size**2}")
        self.database = patches.detach().to(device=self.database.device, dtype=torch.float32).contiguous()
        return self

    @property
    def fitted(self) -> bool:
        return self.database.numel() > 0

    @torch.no_grad()
    def fit(self, images: Tensor, num_patches: int | None | str = "default", seed: int = 0) -> "Quilting":
        """Build the database from clean images: every patch position, or `num_patches` sampled.

        Args:
            images: N×C×H×W clean (training) images in [0, 1], H and W >= patch_size.
            num_patches: database size cap (None: all N·(H−p+1)·(W−p+1) patches; default: the
                constructor's `num_patches`).
            seed: seed of the subsampling.

        Returns:
            self (the database is replaced).
        """
        check_images(images, "images")
        if num_patches == "default":
            num_patches = self.num_patches
        if num_patches is not None:
            check_int_range(num_patches, "num_patches", 1)
        p = self.patch_size
        n, c, h, w = images.shape
        if n == 0 or h < p or w < p:
            raise ValueError(f"`images` must hold at least one image of side >= patch_size={p}, "
                             f"got {tuple(images.shape)}")
        rows, cols = h - p + 1, w - p + 1
        total = n * rows * cols
        g = torch.Generator().manual_seed(seed)
        if num_patches is None or num_patches >= total:
            flat = torch.arange(total)
        elif total <= _EXACT_SAMPLING_LIMIT:
            flat = torch.randperm(total, generator=g)[:num_patches]
        else:
            flat = torch.randint(0, total, (num_patches,), generator=g)
        flat = flat.to(images.device)
        i, rest = flat // (rows * cols), flat % (rows * cols)
        r, s = rest // cols, rest % cols
        ar = torch.arange(p, device=images.device)
        # gather patches (M×C×p×p) by advanced indexing: image i, rows r.., cols s..
        patches = images[i[:, None, None, None], torch.arange(c, device=images.device)[None, :, None, None],
                          (r[:, None] + ar)[:, None, :, None], (s[:, None] + ar)[:, None, None, :]]
        return self.set_database(patches.reshape(len(flat), c * p * p))

    @classmethod
    def from_dataset(cls, name: str, split: str = "train", num_patches: int | None = 100_000, sample_seed: int = 0,
                     **kwargs: Any) -> "Quilting":
        """A quilting transform whose database comes from a Bastion dataset (e.g. ``"mnist-5k"``).

        `sample_seed` seeds the database subsampling (`fit`); `kwargs` go to the constructor
        (``patch_size``, ``overlap``, ``k``, ``seed``, ...).
        """
        from ...data import load_dataset

        return cls(**kwargs).fit(load_dataset(name, split).images, num_patches=num_patches, seed=sample_seed)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        key = prefix + "database"
        if key in state_dict and state_dict[key].shape != self.database.shape:
            self.database = torch.empty_like(state_dict[key], device=self.database.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- the transform ----------------------------------------------------------------------
    def _nearest(self, queries: Tensor, db: Tensor, k: int) -> Tensor:
        """Indices (Q×k) of the k nearest database rows of every query row (squared L2)."""
        db_sq = (db * db).sum(dim=1)
        step = max(1, _SEARCH_CHUNK_ELEMENTS // db.shape[0])
        out = []
        for i in range(0, queries.shape[0], step):
            q = queries[i:i + step]
            # ‖d‖² − 2 q·d: the squared distance up to ‖q‖², a constant per row
            d = torch.addmm(db_sq.unsqueeze(0), q, db.T, alpha=-2.0)
            out.append(d.topk(k, dim=1, largest=False).indices)
        return torch.cat(out)

    def transform(self, x: Tensor) -> Tensor:
        if not self.fitted:
            raise RuntimeError("Quilting has no patch database: call .fit(images) or use Quilting.from_dataset(...)")
        p = self.patch_size
        n, c, h, w = x.shape
        if self.database.shape[1] != c * p * p:
            raise ValueError(f"`x` has {c} channel(s) but the database holds patches of "
                             f"{self.database.shape[1] // (p * p)} channel(s)")
        if h < p or w < p:
            raise ValueError(f"`x` images ({h}×{w}) are smaller than patch_size={p}")
        with torch.no_grad():
            dev = x.device
            step = p - self.overlap
            rs = torch.tensor(_starts(h, p, step), device=dev)
            cs = torch.tensor(_starts(w, p, step), device=dev)
            ar = torch.arange(p, device=dev)
            ri = (rs[:, None] + ar)[:, None, :, None]  # R×1×p×1
            ci = (cs[:, None] + ar)[None, :, None, :]  # 1×S×1×p
            patches = x.detach()[:, :, ri, ci]  # N×C×R×S×p×p
            nr, nc = len(rs), len(cs)
            queries = patches.permute(0, 2, 3, 1, 4, 5).reshape(n * nr * nc, c * p * p)
            db = self.database.to(device=dev, dtype=queries.dtype)
            k = min(self.k, db.shape[0])
            nearest = self._nearest(queries, db, k)
            pick = self.randint(0, k, queries.shape[0], device=dev) if k > 1 else torch.zeros(
                queries.shape[0], dtype=torch.long, device=dev)
            chosen = db[nearest.gather(1, pick[:, None]).squeeze(1)]  # (N·R·S)×(C·p·p)
            chosen = chosen.reshape(n, nr, nc, c, p, p).permute(0, 3, 1, 2, 4, 5)  # N×C×R×S×p×p
            # scatter-add every patch into place and average where patches overlap
            flat_idx = (ri * w + ci).expand(nr, nc, p, p).reshape(-1)
            acc = torch.zeros(n, c, h * w, device=dev, dtype=x.dtype)
            acc.index_add_(2, flat_idx, chosen.reshape(n, c, -1).to(x.dtype))
            cnt = torch.zeros(h * w, device=dev, dtype=x.dtype)
            cnt.index_add_(0, flat_idx, torch.ones_like(flat_idx, dtype=x.dtype))
            out = (acc / cnt).reshape(n, c, h, w)
        return zero_grad_output(out, x)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "patch_size": self.patch_size, "overlap": self.overlap, "k": self.k,
                "database_size": int(self.database.shape[0]), "seed": self.seed}
