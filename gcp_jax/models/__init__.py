"""Backbones (EfficientNet-B0…B7, ResNet-50/101, a tiny ResNet) and the classifier built on them."""

from gcp_jax.models.classifier import Classifier
from gcp_jax.models.efficientnet import EFFICIENTNET_PARAMS, EfficientNet
from gcp_jax.models.registry import (
    ARCHS,
    BACKBONE_DTYPES,
    FAMILIES,
    HEADS,
    Family,
    create_model,
    family,
    model_problems,
)
from gcp_jax.models.resnet import RESNET_PARAMS, ResNet

__all__ = [
    "ARCHS",
    "BACKBONE_DTYPES",
    "EFFICIENTNET_PARAMS",
    "FAMILIES",
    "HEADS",
    "RESNET_PARAMS",
    "Classifier",
    "EfficientNet",
    "Family",
    "ResNet",
    "create_model",
    "family",
    "model_problems",
]
