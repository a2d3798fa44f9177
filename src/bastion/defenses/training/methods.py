"""Import every adversarial-training module so that its objectives register in `OBJECTIVES`.

``defenses/training/__init__.py`` imports this module (``from . import methods``); a new
objective module is added here with one line.
"""

from . import adversarial, mma, trades  # noqa: F401  (registration side effects)
from .adversarial import ALP, CLP, FGSMAT, AdversarialObjective, FastAT, FreeAT, PGDAT
from .mma import MMA
from .trades import MART, TRADES, mart_loss, trades_loss

__all__ = ["ALP", "CLP", "FGSMAT", "MART", "MMA", "PGDAT", "TRADES", "AdversarialObjective", "FastAT", "FreeAT",
           "mart_loss", "trades_loss"]
