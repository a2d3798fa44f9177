"""Bastion: defend image classifiers against adversarial examples, and test those defenses honestly."""

from .data import Dataset, list_datasets, load_dataset
from .models import create_model, list_models
from .evaluation import AuditReport, audit, evaluate

__version__ = "0.1.0"

__all__ = ["AuditReport", "Dataset", "__version__", "audit", "create_model", "evaluate", "list_datasets", "list_models", "load_dataset"]
