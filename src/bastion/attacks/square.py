"""Square Attack: score-based black-box random search with square-shaped updates
(Andriushchenko, Croce, Flammarion & Hein 2020)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._checks import check_in_range
from .._rng import ExampleRNG
from ..threat import Norm, ThreatModel
from .base import Attack, check_int, is_adversarial, register_attack
from .losses import LossFn, check_loss_name, get_loss

__all__ = ["Square", "p_schedule", "pseudo_gaussian_square"]


def p_schedule(p_init: float, it: int, n_queries: int) -> float:
    """The paper's piecewise-constant schedule of p, the fraction of pixels a square covers.

    Defined for 10,000 iterations and rescaled to `n_queries`: p is halved at iterations
    10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 (of 10,000).
    """
    it = int(it / n_queries * 10000)
    for k, bound in enumerate((10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)):
        if it <= bound:
            return p_init / 2**k
    return p_init / 512


def _concentric(rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """rows×cols bump: concentric rectangles around the centre, weight Σ_{k≥d} 1/(k+1)², unit l2 norm.

    d is the Chebyshev distance of a pixel to the centre (rows//2, cols//2); summing the
    weights of every rectangle that contains the pixel is the paper's η (§4, L2 attack).
    """
    if rows == 0 or cols == 0:
        return torch.zeros(rows, cols, device=device, dtype=dtype)
    n_rect = max(rows // 2 + 1, cols // 2 + 1)
    r = torch.arange(rows, device=device).sub(rows // 2).abs()
    c = torch.arange(cols, device=device).sub(cols // 2).abs()
    d = torch.maximum(r.unsqueeze(1), c.unsqueeze(0))
    w = 1.0 / torch.arange(1, n_rect + 1, device=device, dtype=torch.float64) ** 2
    tail = w.flip(0).cumsum(0).flip(0)  # tail[d] = Σ_{k ≥ d} w_k
    out = tail[d].to(dtype)
    return out / out.norm()


def pseudo_gaussian_square(s: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """The s×s update of the L2 Square Attack: a positive bump over a negative one, unit l2 norm.

    The top ⌊s/2⌋ rows hold one concentric bump, the other rows its negative (the paper's
    "meta" perturbation with two sub-squares); transposing it gives the left/right variant.
    """
    out = torch.cat([_concentric(s // 2, s, device, dtype), -_concentric(s - s // 2, s, device, dtype)], dim=0)
    return out / out.norm()


def _window_mask(top: Tensor, left: Tensor, s: int, h: int, w: int) -> Tensor:
    """Bool (n, 1, h, w): the s×s window of each example at (top, left)."""
    rows = torch.arange(h, device=top.device)
    cols = torch.arange(w, device=top.device)
    in_r = (rows >= top.unsqueeze(1)) & (rows < (top + s).unsqueeze(1))
    in_c = (cols >= left.unsqueeze(1)) & (cols < (left + s).unsqueeze(1))
    return (in_r.unsqueeze(2) & in_c.unsqueeze(1)).unsqueeze(1)


class _Draws:
    """The uniforms of every iteration, hashed `chunk` iterations at a time for the whole batch.

    Row i, iteration it of `__call__` is a pure function of (seed, example i, it), as one draw
    per proposal would be, but one counter-hash call serves `chunk` iterations instead of a few
    calls per iteration (their fixed cost dominated small batches: Square makes thousands of
    cheap queries).
    """

    def __init__(self, rng: ExampleRNG, width: int, chunk: int = 128) -> None:
        self.rng, self.width, self.chunk = rng, width, chunk
        self._start, self._u = -1, torch.empty(0)

    def __call__(self, it: int, idx: Tensor) -> Tensor:
        """(len(idx), width) uniforms in (0, 1) for iteration `it` of the examples `idx`."""
        start = it - it % self.chunk
        if start != self._start:
            # float64 whatever the images' dtype: window positions come from an exact floor
            self._u = self.rng._uniform64((self.chunk, self.width), ("square", "draws", start // self.chunk))
            self._start = start
        return self._u[idx, it - start]


def _randint(u: Tensor, high: int) -> Tensor:
    """Integers uniform in [0, high) from uniforms u in (0, 1)."""
    return torch.floor(u * high).long().clamp_(max=high - 1)


def _signs(u: Tensor, dtype: torch.dtype) -> Tensor:
    """±1 in `dtype` from uniforms: +1 where u >= 0.5."""
    return torch.where(u < 0.5, -1.0, 1.0).to(dtype)


def _rows(n: int, device: torch.device) -> Tensor:
    return torch.arange(n, device=device).view(n, 1, 1, 1)


def _chans(c: int, device: torch.device) -> Tensor:
    return torch.arange(c, device=device).view(1, c, 1, 1)


def _read_window(t: Tensor, top: Tensor, left: Tensor, s: int) -> Tensor:
    """(n, C, s, s): each example's s×s window of `t` (n, C, H, W) at its own (top, left)."""
    n, c = t.shape[:2]
    ar = torch.arange(s, device=t.device)
    r = (top.unsqueeze(1) + ar).view(n, 1, s, 1)
    q = (left.unsqueeze(1) + ar).view(n, 1, 1, s)
    return t[_rows(n, t.device), _chans(c, t.device), r, q]


def _write_window(t: Tensor, top: Tensor, left: Tensor, win: Tensor) -> Tensor:
    """A copy of `t` (n, C, H, W) with each example's window at (top, left) replaced by `win` (n, C, s, s)."""
    n, c, h, w = t.shape
    s = win.shape[-1]
    r = (torch.arange(h, device=t.device) - top.unsqueeze(1)).clamp(0, s - 1).view(n, 1, h, 1)
    q = (torch.arange(w, device=t.device) - left.unsqueeze(1)).clamp(0, s - 1).view(n, 1, 1, w)
    spread = win[_rows(n, t.device), _chans(c, t.device), r, q]  # (n, C, H, W): window value per pixel
    return torch.where(_window_mask(top, left, s, h, w), spread, t)


def _l2(t: Tensor) -> Tensor:
    """Per-example l2 norm (n, 1, 1, 1)."""
    return t.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


@register_attack("square")
@dataclass(frozen=True)
class Square(Attack):
    r"""Square Attack: random search over square-shaped updates, using only the model's scores.

    Paper: Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient
    black-box adversarial attack via random search", ECCV 2020 (https://arxiv.org/abs/1912.00049).

    Distance: linf, l2.

    * linf: starts from vertical stripes (±eps per channel and column), then each iteration
      sets one s×s window (all channels) of δ to ±eps per channel — a ±2eps move of the
      window — and keeps the candidate if the loss improves. A window whose candidate would not
      change x_adv is redrawn (the paper's check), so no query is wasted on it.
    * l2: starts from a grid of ±pseudo-Gaussian bumps rescaled to norm eps, then each
      iteration moves the mass of a second window into a first one with a fresh centred
      ±bump (the paper's Algorithm 3), keeping ‖δ‖₂ = eps before clipping to the box.

    The side s of the square follows the paper's schedule of p (`p_schedule`): s ≈ √(p·H·W),
    at least 1 (l2: at least 3 and odd) and at most min(H, W) − 1. Window positions and signs
    are drawn per example from the per-example RNG (the reference code draws one position for
    the whole batch); positions range over all of [0, H − s] (the reference's randint excludes
    the last one, so its updates never touch the last row or column).

    Queries are counted per example: 1 for the clean input (an example already misclassified
    stops there, unchanged), 1 for the initialization, then 1 per iteration; never more than
    `n_queries`. An example leaves the batch once adversarial (early stop).

    Arguments:
        n_queries (int): query budget per example, clean check included. (Default: 5000)
        p_init (float): initial fraction of pixels a square covers, in (0, 1]. (Default: 0.8)
        loss (str): "cw" (margin, the paper's) or "ce" (maximized; an adversarial candidate
            is always taken). (Default: "cw")

    Shape:
        x: (N, C, H, W) in [0, 1]; y: (N,); returns `AttackResult` with x_adv (N, C, H, W) and
        queries (N,).

    Example:
        >>> result = Square(n_queries=1000)(model, x, y, "linf:8/255", seed=0)
        >>> robust_accuracy, median_queries = 1 - result.success_rate, result.queries.median()
    """

    n_queries: int = 5000
    p_init: float = 0.8
    loss: str = "cw"

    supports_norms = ("linf", "l2")
    gradient_free = True

    def __post_init__(self) -> None:
        check_int(self.n_queries, "n_queries", 1)
        check_in_range(self.p_init, "p_init", 0.0, 1.0)
        if self.p_init == 0:
            raise ValueError("`p_init` must be in (0, 1], got 0")
        check_loss_name(self.loss, allowed=("cw", "ce"))

    @property
    def randomized(self) -> bool:
        return True

    # ----------------------------------------------------------------------- helpers
    def _side(self, it: int, h: int, w: int, l2: bool) -> int:
        p = p_schedule(self.p_init, it, self.n_queries)
        s = int(round(math.sqrt(p * h * w)))  # p of the H·W pixel positions (all channels move)
        s = min(max(s, 3 if l2 else 1), max(min(h, w) - 1, 1))
        if l2 and s % 2 == 0 and s > 1:
            s -= 1  # odd, so the bump has a centre pixel
        return s

    def _init_linf(self, x: Tensor, eps: float, rng: ExampleRNG) -> Tensor:
        c, w = x.shape[1], x.shape[3]
        stripes = rng.rademacher((c, 1, w), tag=("square", "init"))
        return (x + eps * stripes).clamp(*ThreatModel.box)

    def _init_l2(self, x: Tensor, eps: float, rng: ExampleRNG) -> Tensor:
        n, c, h, w = x.shape
        s = max(h // 5, 1)
        start = max((h - 5 * s) // 2, 0)
        th, tw = h // s, w // s  # tiles of the grid (the last ones may be cut by the border)
        bump = pseudo_gaussian_square(s, x.device, x.dtype)
        flip = rng.uniform((th, tw), tag=("square", "init", "transpose")) < 0.5
        tiles = torch.where(flip.view(n, 1, th, tw, 1, 1), bump.t(), bump)
        tiles = tiles * rng.rademacher((c, th, tw, 1, 1), tag=("square", "init", "sign"))
        grid = tiles.permute(0, 1, 2, 4, 3, 5).reshape(n, c, th * s, tw * s)
        delta = torch.zeros_like(x)
        hh, ww = min(h - start, th * s), min(w - start, tw * s)
        delta[:, :, start:start + hh, start:start + ww] = grid[:, :, :hh, :ww]
        return (x + eps * delta / _l2(delta).clamp_min(1e-12)).clamp(*ThreatModel.box)

    def _propose_linf(self, x: Tensor, x_best: Tensor, eps: float, s: int, u: Tensor) -> Tensor:
        n, c, h, w = x.shape
        top, left = _randint(u[:, 0], h - s + 1), _randint(u[:, 1], w - s + 1)
        mask = _window_mask(top, left, s, h, w)
        cand = x_best
        todo = torch.ones(n, dtype=torch.bool, device=x.device)
        # A candidate equal to x_best in its window would waste a query: redraw its signs a few
        # times, then take the opposite of the last draw (x + eps·s and x − eps·s always differ
        # after clipping to [0, 1], so that one changes the window).
        for r in range(4):
            sign = _signs(u[:, 2 + r * c:2 + (r + 1) * c], x.dtype).view(n, c, 1, 1)
            new = torch.where(mask, (x + eps * sign).clamp(*ThreatModel.box), x_best)
            same = ((new - x_best).abs() * mask).flatten(1).amax(dim=1) < 1e-7
            cand = torch.where((todo & ~same).view(n, 1, 1, 1), new, cand)
            todo = todo & same
            if not bool(todo.any()):
                return cand
        flipped = torch.where(mask, (x - eps * sign).clamp(*ThreatModel.box), x_best)
        return torch.where(todo.view(n, 1, 1, 1), flipped, cand)

    def _propose_l2(self, x: Tensor, x_best: Tensor, eps: float, s: int, u: Tensor) -> Tensor:
        n, c, h, w = x.shape
        delta = x_best - x
        top, left = _randint(u[:, 0], h - s + 1), _randint(u[:, 1], w - s + 1)
        top2, left2 = _randint(u[:, 2], h - s + 1), _randint(u[:, 3], w - s + 1)
        m1 = _window_mask(top, left, s, h, w)
        m12 = m1 | _window_mask(top2, left2, s, h, w)
        norm_img = _l2(delta)
        # per channel: l2 mass in window 1 and in the union of both windows
        old = _read_window(delta, top, left, s)
        norm_w1 = old.flatten(2).norm(dim=2).view(n, c, 1, 1)
        norm_w12 = (delta * m12).flatten(2).norm(dim=2).view(n, c, 1, 1)
        bump = pseudo_gaussian_square(s, x.device, x.dtype)
        flip = u[:, 4] < 0.5
        new = torch.where(flip.view(n, 1, 1, 1), bump.t(), bump) * _signs(u[:, 5:5 + c], x.dtype).view(n, c, 1, 1)
        new = new + old / (norm_w1 + 1e-12)
        # the window takes back all the mass of both windows plus what the budget has left
        budget = ((eps**2 - norm_img**2).clamp_min(0) / c + norm_w12**2).sqrt()
        new = new / new.flatten(2).norm(dim=2).view(n, c, 1, 1).clamp_min(1e-12) * budget
        delta = _write_window(delta, top2, left2, torch.zeros_like(new))  # window 2 gives its mass away
        delta = _write_window(delta, top, left, new)
        return (x + eps * delta / _l2(delta).clamp_min(1e-12)).clamp(*ThreatModel.box)

    # ----------------------------------------------------------------------- the attack
    def _run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, targets: Tensor | None,
             rng: ExampleRNG) -> tuple[Tensor, Tensor]:
        loss_fn: LossFn = get_loss(self.loss, targets is not None)
        l2 = threat.norm is Norm.L2
        n, c, h, w = x.shape
        eps = threat.eps

        def query(xq: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
            with torch.no_grad():
                logits = model(xq)
            ts = None if targets is None else targets[idx]
            queries[idx] += 1
            return loss_fn(logits, y[idx], ts), is_adversarial(logits, y[idx], ts)

        queries = torch.zeros(n, dtype=torch.long, device=x.device)
        everyone = torch.arange(n, device=x.device)
        x_best = x.clone()
        _, done = query(x, everyone)
        idx = (~done).nonzero().squeeze(1)
        if self.n_queries < 2 or idx.numel() == 0:
            return x_best, queries
        init = self._init_l2 if l2 else self._init_linf
        x0 = threat.project(init(x[idx], eps, rng.subset(idx)), x[idx])
        loss_best = torch.full((n,), -math.inf, device=x.device, dtype=x.dtype)
        lb, sb = query(x0, idx)
        x_best[idx], loss_best[idx], done[idx] = x0, lb.to(x.dtype), sb

        propose = self._propose_l2 if l2 else self._propose_linf
        draws = _Draws(rng, 5 + c if l2 else 2 + 4 * c)
        for it in range(self.n_queries - 2):
            idx = (~done).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            s = self._side(it, h, w, l2)
            xs = x[idx]
            cand = threat.project(propose(xs, x_best[idx], eps, s, draws(it, idx)), xs)
            lc, sc = query(cand, idx)
            better = sc | (lc.to(x.dtype) > loss_best[idx])
            take = idx[better]
            x_best[take], loss_best[take] = cand[better], lc[better].to(x.dtype)
            done[idx[sc]] = True
        return x_best, queries
