"""The model zoo: registry, `Normalize`, small architectures and adapters to other zoos."""

from . import adapters as _adapters  # noqa: F401  (registers torchvision:/timm:/pytorchcv:)
from . import zoo as _zoo  # noqa: F401  (registers the architectures)
from .base import ADAPTERS, MODELS, Classifier, ModelSpec, Normalize, create_model, list_models, model_from_spec

__all__ = ["ADAPTERS", "MODELS", "Classifier", "ModelSpec", "Normalize", "create_model", "list_models",
           "model_from_spec"]
