"""Szegedy et al.'s box-constrained L-BFGS attack, with a batched projected L-BFGS solver."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_positive
from .._rng import ExampleRNG
from ..threat import ThreatModel
from .base import Attack, check_bool, check_int, register_attack

__all__ = ["LBFGS", "projected_lbfgs"]

# (rows of the batch) -> objective (R,) and gradient (R, D) at points z (R, D)
Objective = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]

_ARMIJO = 1e-4  # sufficient-decrease constant of the line search (Nocedal & Wright's c1)
_MAX_HALVINGS = 20  # backtracking steps before an example's line search gives up
_C_NONE = math.inf  # "no bound found yet" in the search over c


def projected_lbfgs(fg: Objective, z0: Tensor, lo: float, hi: float, *, max_iter: int, history: int = 10,
                    ftol: float = 1e-7, pgtol: float = 1e-5) -> Tensor:
    """Minimize N independent objectives over boxes [lo, hi]^D at once with projected L-BFGS.

    Each row of `z0` (N, D) is its own problem: its own curvature pairs (the last `history`),
    its own line search and its own stopping test, so solving a batch gives the same iterates
    as solving each row alone; `fg` is only called on the rows still running, and the model
    work per step is one batched forward and backward pass over them.

    The method is the projected quasi-Newton scheme for bound constraints (Bertsekas 1982;
    Kim, Sra & Dhillon 2010, "Tackling box-constrained optimization via a new projected
    quasi-Newton approach"): coordinates at a bound whose gradient points out of the box are
    held fixed, the L-BFGS two-loop recursion (initial scaling sᵀy/yᵀy) gives the direction on
    the others, and a backtracking search along the projected path z(t) = Π(z + t·d) accepts the
    first t ∈ {1, 1/2, ...} with f(z(t)) ≤ f(z) + 1e-4·∇f(z)ᵀ(z(t) − z). A row stops when its
    projected gradient ‖Π(z − ∇f) − z‖∞ ≤ pgtol, when an accepted step lowers f by less than
    ftol·max(|f|, 1) (the tests of scipy's L-BFGS-B), when its line search fails, or after
    `max_iter` steps.

    Returns the final points (N, D).
    """
    n, d = z0.shape
    dev, dtype = z0.device, z0.dtype
    everyone = torch.arange(n, device=dev)
    z = z0.clone()
    f, g = fg(z, everyone)
    S = torch.zeros(n, history, d, device=dev, dtype=dtype)
    Y = torch.zeros_like(S)
    rho = torch.zeros(n, history, device=dev, dtype=dtype)
    gamma = torch.ones(n, device=dev, dtype=dtype)
    running = torch.ones(n, dtype=torch.bool, device=dev)
    for it in range(max_iter):
        running &= (((z - g).clamp(lo, hi) - z).abs().amax(dim=1) > pgtol)
        r = running.nonzero().squeeze(1)
        if r.numel() == 0:
            break
        zr, gr = z[r], g[r]
        free = ~(((zr <= lo) & (gr > 0)) | ((zr >= hi) & (gr < 0)))
        gf = gr * free
        # two-loop recursion, newest pair first; empty slots have rho = 0 and do nothing
        q = gf.clone()
        order = [(it - 1 - j) % history for j in range(min(it, history))]
        alphas = []
        for k in order:
            a = rho[r, k] * (S[r, k] * q).sum(dim=1)
            q -= a.unsqueeze(1) * Y[r, k]
            alphas.append(a)
        q *= gamma[r].unsqueeze(1)
        for k, a in zip(reversed(order), reversed(alphas), strict=True):
            b = rho[r, k] * (Y[r, k] * q).sum(dim=1)
            q += (a - b).unsqueeze(1) * S[r, k]
        dirn = -q * free
        # keep a descent direction (the free-variable restriction can spoil it)
        not_descent = (dirn * gr).sum(dim=1) >= 0
        dirn[not_descent] = -gf[not_descent]
        if it == 0:  # no curvature yet: a first step of length at most 1 in the sup norm
            dirn = dirn / dirn.abs().amax(dim=1, keepdim=True).clamp_min(1.0)

        # backtracking along the projected path, per row; only rows still searching are evaluated
        t = torch.ones(r.numel(), device=dev, dtype=dtype)
        z_new, f_new, g_new = zr.clone(), f[r].clone(), gr.clone()
        searching = torch.ones(r.numel(), dtype=torch.bool, device=dev)
        for _ in range(_MAX_HALVINGS):
            s_idx = searching.nonzero().squeeze(1)
            if s_idx.numel() == 0:
                break
            trial = (zr[s_idx] + t[s_idx].unsqueeze(1) * dirn[s_idx]).clamp(lo, hi)
            ft, gt = fg(trial, r[s_idx])
            accept = ft <= f[r[s_idx]] + _ARMIJO * (gr[s_idx] * (trial - zr[s_idx])).sum(dim=1)
            acc = s_idx[accept]
            z_new[acc], f_new[acc], g_new[acc] = trial[accept], ft[accept], gt[accept]
            searching[acc] = False
            t[s_idx[~accept]] *= 0.5
        failed = searching
        ok = ~failed
        s_vec, y_vec = z_new - zr, g_new - gr
        sy = (s_vec * y_vec).sum(dim=1)
        # keep only pairs with positive curvature (else the inverse-Hessian model breaks)
        good = ok & (sy > 1e-10 * (y_vec * y_vec).sum(dim=1).clamp_min(1e-30))
        slot = it % history
        S[r, slot] = torch.where(good.unsqueeze(1), s_vec, torch.zeros_like(s_vec))
        Y[r, slot] = torch.where(good.unsqueeze(1), y_vec, torch.zeros_like(y_vec))
        rho[r, slot] = torch.where(good, 1.0 / sy.where(good, torch.ones_like(sy)), torch.zeros_like(sy))
        yy = (y_vec * y_vec).sum(dim=1)
        gamma[r] = torch.where(good, sy / yy.where(good, torch.ones_like(yy)), gamma[r])
        small = (f[r] - f_new) <= ftol * torch.maximum(f[r].abs(), f_new.abs()).clamp_min(1.0)
        z[r], f[r], g[r] = z_new, f_new, g_new
        running[r[failed | small]] = False
    return z


@register_attack("lbfgs")
@dataclass(frozen=True)
class LBFGS(Attack):
    r"""Box-constrained L-BFGS attack: the first adversarial examples of Szegedy et al.

    Paper: Szegedy, Zaremba, Sutskever, Bruna, Erhan, Goodfellow & Fergus, "Intriguing
    properties of neural networks", ICLR 2014 (https://arxiv.org/abs/1312.6199), Sec. 4.1.

    Distance: l2. Minimum-norm: ``threat=None`` searches unbounded; with a finite eps the base
    class returns the clean input for examples whose perturbation found is larger.

    For a target class l and a constant c > 0 it solves, per example,

        minimize  c · ‖r‖₂² + CE(f(x + r), l)   subject to  x + r ∈ [0, 1]^D

    with box-constrained L-BFGS, from r = 0, and searches c per example. The paper asks for
    "the minimum c > 0 for which the minimizer r satisfies f(x + r) = l"; with c weighting ‖r‖
    as it is written, a larger c gives a smaller r, so the smallest perturbation comes from the
    *largest* c whose minimizer still reaches l, and that is what is searched (as foolbox's
    L-BFGS attack does): c starts at ``initial_const`` and is multiplied by 10 while the
    minimizer reaches the target, divided by 10 while it does not, and bisected (geometric
    mean) once both are known. The point returned is the smallest successful minimizer over
    the ``binary_search_steps`` values of c (x itself if none succeeded).

    The solver is `projected_lbfgs`: projected L-BFGS with per-example history, line search and
    stopping tests, vectorized over the batch. scipy's ``fmin_l_bfgs_b`` on the flattened batch
    would *not* equal independent runs: its curvature pairs, line-search step and stopping test
    are shared by all examples, so an example's result would depend on the rest of the batch.

    Targets: ``targets=`` as given. Without targets, a target ≠ y is drawn per example from the
    per-example rng (uniform, reproducible under the seed; the paper's attack is targeted), and
    the result is judged untargeted by the base class. With ``untargeted=True`` and no targets,
    the target is each example's runner-up class at x, argmax_{j≠y} z_j(x) (the nearest class
    by the logits; foolbox's L-BFGS attack does the same), and a minimizer counts as soon as it
    is misclassified, into any class. (Minimizing −CE(y) instead pushes into flat, saturated
    corners of the box and fails on about half of the digits.)

    Arguments:
        binary_search_steps (int): values of c tried per example. (Default: 10)
        max_iterations (int): L-BFGS iterations per value of c. (Default: 100)
        initial_const (float): the first c. (Default: 1e-2)
        history (int): curvature pairs L-BFGS keeps (scipy's m). (Default: 10)
        untargeted (bool): without targets, aim at the runner-up class and accept any
            misclassification, instead of a random target. (Default: False)

    Shape:
        x: (N, C, H, W) in [0, 1]; y: (N,); returns `AttackResult` with x_adv (N, C, H, W).

    Example:
        >>> result = LBFGS()(model, x, y, targets=(y + 1) % 10)
        >>> result.norms["l2"][result.success].median()
    """

    binary_search_steps: int = 10
    max_iterations: int = 100
    initial_const: float = 1e-2
    history: int = 10
    untargeted: bool = False

    supports_norms = ("l2",)
    minimum_norm = True

    def __post_init__(self) -> None:
        check_int(self.binary_search_steps, "binary_search_steps", 1)
        check_int(self.max_iterations, "max_iterations", 1)
        check_positive(self.initial_const, "initial_const")
        check_int(self.history, "history", 1)
        check_bool(self.untargeted, "untargeted")

    @property
    def randomized(self) -> bool:
        # random targets are drawn when none are given (untargeted=False)
        return not self.untargeted

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, targets: Tensor | None,
             rng: ExampleRNG) -> Tensor:
        lo, hi = ThreatModel.box
        n, dtype = x.shape[0], x.dtype
        shape = x.shape[1:]
        with torch.no_grad():
            logits = model(x)
        k = logits.shape[1]
        given = targets is not None
        any_class = not given and self.untargeted
        if any_class:
            targets = logits.scatter(1, y.unsqueeze(1), -math.inf).argmax(dim=1)
        elif targets is None:
            targets = (y + 1 + rng.randint(k - 1, (), tag=("lbfgs", "target"))) % k

        def reached(z: Tensor, rows: Tensor) -> Tensor:
            pred = z.argmax(dim=1)
            return pred != y[rows] if any_class else pred == targets[rows]

        x_flat = x.flatten(1)
        best_x = x_flat.clone()
        best_l2 = torch.full((n,), math.inf, device=x.device, dtype=dtype)
        skip = reached(logits, torch.arange(n, device=x.device))
        if not given:  # judged untargeted: an example already misclassified is done at x
            skip |= logits.argmax(dim=1) != y
        todo = (~skip).nonzero().squeeze(1)
        c_ok = torch.zeros(n, device=x.device, dtype=dtype)  # largest c that reached the target
        c_bad = torch.full((n,), _C_NONE, device=x.device, dtype=dtype)  # smallest c that did not
        const = torch.full((n,), self.initial_const, device=x.device, dtype=dtype)
        if todo.numel() == 0:
            return x

        for _ in range(self.binary_search_steps):
            fg = _objective(model, x_flat[todo], targets[todo], const[todo], shape)
            z = projected_lbfgs(fg, x_flat[todo], lo, hi, max_iter=self.max_iterations, history=self.history)
            with torch.no_grad():
                ok = reached(model(z.view(-1, *shape)), todo)
            l2 = (z - x_flat[todo]).norm(dim=1)
            better = ok & (l2 < best_l2[todo])
            best_l2[todo[better]] = l2[better]
            best_x[todo[better]] = z[better]

            c = const[todo]
            c_ok[todo] = torch.where(ok, torch.maximum(c_ok[todo], c), c_ok[todo])
            c_bad[todo] = torch.where(ok, c_bad[todo], torch.minimum(c_bad[todo], c))
            lo_c, hi_c = c_ok[todo], c_bad[todo]
            both = (lo_c > 0) & torch.isfinite(hi_c)
            nxt = torch.where(ok, c * 10, c / 10)
            const[todo] = torch.where(both, (lo_c * hi_c.where(both, torch.ones_like(hi_c))).sqrt(), nxt)
        return best_x.view_as(x)


def _objective(model: nn.Module, x: Tensor, targets: Tensor, c: Tensor, shape: torch.Size) -> Objective:
    """rows -> (c·‖z − x‖² + CE(model(z), target), its gradient) for the flat images x (R, D)."""

    def fg(z: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            zg = z.detach().requires_grad_(True)
            ce = F.cross_entropy(model(zg.view(-1, *shape)), targets[rows], reduction="none")
            obj = c[rows] * (zg - x[rows]).square().sum(dim=1) + ce
            (grad,) = torch.autograd.grad(obj.sum(), [zg])
        return obj.detach(), grad.detach()

    return fg
