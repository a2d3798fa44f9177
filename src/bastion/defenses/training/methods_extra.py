"""Registers the non-adversarial training defenses (regularizers, defensive distillation).

Importing this module runs their ``@OBJECTIVES.register`` decorators; the package's
``__init__`` imports it so that ``create_objective`` and ``bastion list`` see them.
"""

from . import distillation, regularizers  # noqa: F401  (imported for registration)
from .distillation import Distillation
from .regularizers import Contractive, GaussianAugmentation, GradientRegularization, LabelSmoothing

__all__ = ["Contractive", "Distillation", "GaussianAugmentation", "GradientRegularization", "LabelSmoothing"]
