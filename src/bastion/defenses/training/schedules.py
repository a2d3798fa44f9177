"""Learning-rate schedules as pure functions of the global step.

A schedule is ``lr(step)``; the trainer's only schedule state is the step counter, which makes
resuming exact and keeps checkpoints free of pickled scheduler objects.
"""

from __future__ import annotations

import math
from collections.abc import Callable

SCHEDULES = ("constant", "step", "cosine", "cyclic", "onecycle")


def make_schedule(name: str, base_lr: float, total_steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """Return ``lr(step)`` for ``step`` in ``[0, total_steps)``.

    * ``constant``: ``base_lr``.
    * ``step``: ``base_lr``, times 0.1 after 50% and again after 75% of training (Madry et al.).
    * ``cosine``: cosine annealing from ``base_lr`` to 0 (Loshchilov & Hutter 2017).
    * ``cyclic``: a triangle 0 -> ``base_lr`` (at 40%) -> 0, the schedule of Fast AT (Wong et al. 2020).
    * ``onecycle``: linear warm-up to ``base_lr`` over the first 30%, then cosine annealing to 0 (Smith 2018).

    ``warmup_steps`` adds a linear warm-up in front of ``constant``, ``step`` and ``cosine``.
    """
    if name not in SCHEDULES:
        raise ValueError(f"`schedule` must be one of {', '.join(SCHEDULES)}; got {name!r}")
    total = max(1, int(total_steps))
    warm = max(0, int(warmup_steps))

    def with_warmup(f: Callable[[int], float]) -> Callable[[int], float]:
        if warm == 0:
            return f
        return lambda s: base_lr * (s + 1) / warm if s < warm else f(s)

    if name == "constant":
        return with_warmup(lambda s: base_lr)
    if name == "step":
        return with_warmup(lambda s: base_lr * (0.1 ** ((s >= total // 2) + (s >= (3 * total) // 4))))
    if name == "cosine":
        span = max(1, total - warm)
        return with_warmup(lambda s: base_lr * 0.5 * (1 + math.cos(math.pi * min(s - warm, span) / span)))
    if name == "cyclic":
        peak = 0.4 * total
        return lambda s: base_lr * ((s + 1) / peak if s + 1 <= peak else max(0.0, (total - s - 1) / (total - peak)))
    # onecycle
    up = max(1, int(0.3 * total))
    return lambda s: (base_lr * (s + 1) / up if s < up
                      else base_lr * 0.5 * (1 + math.cos(math.pi * (s - up) / max(1, total - up))))
