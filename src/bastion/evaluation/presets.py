"""Attack suites by name: immutable lists of ``(attack name, hyper-parameters)``.

A preset is data, never a configured object that the evaluator mutates (AutoAttack's
``set_version`` rewrites its sub-attacks' fields; here a suite is a tuple of frozen pairs, and
each attack is built fresh from its pair with `create_attack`).

* ``quick``    — PGD-20 on the cross-entropy loss: a first look, not a robustness claim.
* ``standard`` — AutoAttack's standard suite (Croce & Hein 2020, https://arxiv.org/abs/2003.01690)
  without FAB-T: APGD-CE (100 steps), APGD-T (targeted DLR, 100 steps, the 9 most likely
  wrong classes) and Square (5,000 queries, gradient-free).
* ``full``     — ``standard`` plus C&W (minimum-norm, l2 threats only), DeepFool (minimum-norm)
  and SPSA (gradient-free, Uesato et al. 2018): more diverse, slower.

An attack of a preset that does not support the threat's norm (or is not installed) is skipped
by `evaluate` with a note in the report, never silently.

Example:
    >>> PRESETS["quick"]
    (('pgd', mappingproxy({'steps': 20, 'loss': 'ce'})),)
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

__all__ = ["PRESETS", "AttackSpec", "preset"]

# One entry of a suite: the registry name and the keyword arguments of `create_attack`.
AttackSpec = tuple[str, Mapping[str, Any]]


def _suite(*entries: tuple[str, dict[str, Any]]) -> tuple[AttackSpec, ...]:
    # MappingProxyType: a read-only view, so nobody can change a preset in place
    return tuple((name, MappingProxyType(dict(kwargs))) for name, kwargs in entries)


_STANDARD = (
    ("apgd", {"loss": "ce", "steps": 100}),
    ("apgd-t", {"steps": 100, "n_target_classes": 9}),
    ("square", {"n_queries": 5000}),
)

PRESETS: Mapping[str, tuple[AttackSpec, ...]] = MappingProxyType({
    "quick": _suite(("pgd", {"steps": 20, "loss": "ce"})),
    "standard": _suite(*_STANDARD),
    "full": _suite(*_STANDARD, ("cw", {}), ("deepfool", {}), ("spsa", {})),
})


def preset(name: str) -> tuple[AttackSpec, ...]:
    """The suite called `name`; the error lists the valid presets."""
    if not isinstance(name, str) or name.lower() not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)} "
                         "(or pass a list of attacks, e.g. [('pgd', {'steps': 20})])")
    return PRESETS[name.lower()]
