"""Training-time defenses: the resumable `Trainer` and its pluggable objectives."""

from .objectives import OBJECTIVES, Objective, Standard, StopTraining, create_objective, list_objectives
from .schedules import SCHEDULES, make_schedule
from . import methods as _methods  # noqa: F401  (registers the adversarial-training defenses)
from . import methods_extra as _methods_extra  # noqa: F401  (registers the regularization defenses)
from .trainer import (DEFAULT_SCHEDULE, RunExistsError, TrainConfig, Trainer, TrainingDiverged, WeightAverage,
                      accuracy, epoch_permutation, paper_training_loop)

__all__ = ["DEFAULT_SCHEDULE", "OBJECTIVES", "Objective", "RunExistsError", "SCHEDULES", "Standard", "StopTraining",
           "TrainConfig", "Trainer", "TrainingDiverged", "WeightAverage", "accuracy", "create_objective", "epoch_permutation",
           "list_objectives", "make_schedule", "paper_training_loop"]
