"""SPSA: a gradient-free attack that estimates the gradient from finite differences along
random directions and follows it with Adam (Uesato et al. 2018)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._checks import check_positive
from .._rng import ExampleRNG
from ..threat import ThreatModel
from .base import Attack, BestTracker, check_bool, check_int, is_adversarial, register_attack
from .losses import LossFn, check_loss_name, get_loss

__all__ = ["SPSA", "batched_forward"]


def batched_forward(model: nn.Module, x: Tensor, max_batch_size: int) -> Tensor:
    """``model(x)`` without autograd, in chunks of at most `max_batch_size` rows (bounded memory)."""
    with torch.no_grad():
        if x.shape[0] <= max_batch_size:
            return model(x)
        return torch.cat([model(c) for c in x.split(max_batch_size)])


@register_attack("spsa")
@dataclass(frozen=True)
class SPSA(Attack):
    r"""SPSA: gradient-free attack with a simultaneous-perturbation gradient estimate and Adam.

    Paper: Uesato, O'Donoghue, van den Oord & Kohli, "Adversarial Risk and the Dangers of
    Evaluating Against Weak Attacks", ICML 2018 (https://arxiv.org/abs/1802.05666).

    Distance: linf (the paper's setting), l2.

    Each step draws ``nb_sample / 2`` Rademacher directions v ∈ {−1, +1}^D per example and
    queries the model at ``x_t ± delta·v`` (antithetic pairs, as in the paper's code), giving
    the estimate ĝ = mean_v [(L(x_t + δv) − L(x_t − δv)) / (2δ)] · v of ∇L. Adam (per example,
    β = (0.9, 0.999)) ascends ĝ, and the iterate is projected into ball(x, eps) ∩ [0, 1]. The
    start is uniform in the ball (``threat.random_init``), as in the reference implementation.
    The model only ever runs forward passes without autograd: SPSA sees through gradient
    masking (zero, random or exploding gradients), which makes it a standard sanity check.

    Queries are counted per example: 1 for the clean input, then 1 for each iterate it is
    evaluated at plus ``nb_sample`` per gradient estimate. An example leaves the batch at its
    first adversarial iterate (early stop): an input already misclassified costs 1 query and is
    returned unchanged. Without early stop the highest-loss iterate is returned. The queries of
    one step run as a single forward of (n·nb_sample) rows, chunked by `max_batch_size`.

    Arguments:
        steps (int): Adam steps. (Default: 100)
        nb_sample (int): queries per gradient estimate (even: nb_sample/2 antithetic pairs).
            (Default: 128)
        delta (float): finite-difference radius δ, in pixel units per coordinate. (Default: 0.01)
        lr (float): Adam learning rate, in pixel units. (Default: 0.01)
        loss (str): "cw" (the margin loss of the paper), "ce" or "dlr". (Default: "cw")
        random_start (bool): start uniformly in the ball instead of at x. (Default: True)
        early_stop (bool): stop attacking an example once it is adversarial. (Default: True)
        max_batch_size (int): most rows per forward pass. (Default: 8192)

    Shape:
        x: (N, C, H, W) in [0, 1]; y: (N,); returns `AttackResult` with x_adv (N, C, H, W) and
        queries (N,).

    Example:
        >>> result = SPSA(steps=100)(model, x, y, "linf:8/255", seed=0)
        >>> robust_accuracy, mean_queries = 1 - result.success_rate, result.queries.float().mean()
    """

    steps: int = 100
    nb_sample: int = 128
    delta: float = 0.01
    lr: float = 0.01
    loss: str = "cw"
    random_start: bool = True
    early_stop: bool = True
    max_batch_size: int = 8192

    supports_norms = ("linf", "l2")
    gradient_free = True

    def __post_init__(self) -> None:
        check_int(self.steps, "steps", 1)
        check_int(self.nb_sample, "nb_sample", 2)
        if self.nb_sample % 2:
            raise ValueError(f"`nb_sample` must be even (antithetic pairs ±delta·v), got {self.nb_sample}")
        check_positive(self.delta, "delta")
        check_positive(self.lr, "lr")
        check_loss_name(self.loss)
        check_bool(self.random_start, "random_start")
        check_bool(self.early_stop, "early_stop")
        check_int(self.max_batch_size, "max_batch_size", 1)

    @property
    def randomized(self) -> bool:
        return True  # the directions are random even without a random start

    def _losses(self, model: nn.Module, x: Tensor, y: Tensor, targets: Tensor | None,
                loss_fn: LossFn) -> tuple[Tensor, Tensor]:
        logits = batched_forward(model, x, self.max_batch_size)
        return loss_fn(logits, y, targets), is_adversarial(logits, y, targets)

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, targets: Tensor | None,
             rng: ExampleRNG) -> tuple[Tensor, Tensor]:
        loss_fn = get_loss(self.loss, targets is not None)
        n, shape = x.shape[0], tuple(x.shape[1:])
        half = self.nb_sample // 2
        tracker = BestTracker(x)
        queries = torch.ones(n, dtype=torch.long, device=x.device)  # the clean check below
        everyone = torch.arange(n, device=x.device)
        loss, succ = self._losses(model, x, y, targets, loss_fn)
        tracker.update(everyone, x, loss, succ)

        # the examples still being attacked (all of them without early stop)
        idx = tracker.active() if self.early_stop else everyone
        xs, ys = x[idx], y[idx]
        ts = None if targets is None else targets[idx]
        x_t = threat.random_init(xs, rng.subset(idx), tag=("spsa", "init")) if self.random_start else xs.clone()
        m, v = torch.zeros_like(xs), torch.zeros_like(xs)  # Adam moments, per example
        beta1, beta2, adam_eps = 0.9, 0.999, 1e-8
        for t in range(self.steps + 1):
            if idx.numel() == 0:
                break
            # evaluate the current iterate: early stop and the best-loss bookkeeping
            loss, succ = self._losses(model, x_t, ys, ts, loss_fn)
            queries[idx] += 1
            tracker.update(idx, x_t, loss, succ)
            if t == self.steps:
                break
            if self.early_stop and bool(succ.any()):
                keep = ~succ
                idx, xs, ys, x_t, m, v = idx[keep], xs[keep], ys[keep], x_t[keep], m[keep], v[keep]
                ts = None if ts is None else ts[keep]
                if idx.numel() == 0:
                    break
            k = idx.numel()
            # antithetic Rademacher directions, (k, half, C, H, W); per-example draws keyed by step
            d = rng.subset(idx).rademacher((half, *shape), tag=("spsa", "dir", t))
            # probes stay in the [0, 1] box: a black-box oracle need not accept invalid images
            # (at a coordinate on the box the difference becomes one-sided; its sign is right)
            probe = torch.cat([x_t.unsqueeze(1) + self.delta * d, x_t.unsqueeze(1) - self.delta * d], dim=1)
            probe = probe.clamp(*ThreatModel.box)
            rep = lambda z: None if z is None else z.repeat_interleave(2 * half)  # noqa: E731
            lp, _ = self._losses(model, probe.reshape(k * 2 * half, *shape), rep(ys), rep(ts), loss_fn)
            lp = lp.reshape(k, 2, half)
            diff = (lp[:, 0] - lp[:, 1]) / (2 * self.delta)  # (k, half)
            grad = (diff.reshape(k, half, *([1] * len(shape))).to(x.dtype) * d).mean(dim=1)
            queries[idx] += self.nb_sample
            # Adam ascent on the estimate; t + 1 is the same for every example still active
            m = beta1 * m + (1 - beta1) * grad
            v = beta2 * v + (1 - beta2) * grad * grad
            m_hat = m / (1 - beta1 ** (t + 1))
            v_hat = v / (1 - beta2 ** (t + 1))
            x_t = threat.project(x_t + self.lr * m_hat / (v_hat.sqrt() + adam_eps), xs)
        return tracker.x_best, queries
