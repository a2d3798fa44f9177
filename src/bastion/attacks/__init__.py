"""Adversarial attacks: one attack per module, all behind `Attack` and the `ATTACKS` registry.

>>> from bastion.attacks import create_attack, list_attacks
>>> attack = create_attack("pgd", steps=20)
>>> result = attack(model, x, y, "linf:8/255", seed=0)

Every public module of this package is imported here, so an attack registers itself by living
in its own file with `@register_attack("name")`: adding one touches one file (plus its test),
and the contract tests, `list_attacks()` and the CLI pick it up.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import (ATTACKS, Attack, AttackResult, BestTracker, attack_mode, create_attack, is_adversarial,
                   list_attacks, logits_and_grad, register_attack)
from .losses import LOSSES, get_loss

# Import every attack module so its @register_attack runs (sorted: a stable registry order).
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_") and _info.name not in ("base", "losses"):
        importlib.import_module(f"{__name__}.{_info.name}")
del _info

from .apgd import APGD, APGDT  # noqa: E402
from .bim import BIM  # noqa: E402
from .fgm import FGM, FGSM  # noqa: E402
from .mifgsm import MIFGSM  # noqa: E402
from .pgd import PGD  # noqa: E402

__all__ = [
    "APGD", "APGDT", "ATTACKS", "BIM", "FGM", "FGSM", "LOSSES", "MIFGSM", "PGD", "Attack", "AttackResult",
    "BestTracker", "attack_mode", "create_attack", "get_loss", "is_adversarial", "list_attacks", "logits_and_grad", "register_attack",
]
