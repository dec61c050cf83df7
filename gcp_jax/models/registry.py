"""`create_model`: architecture name + head choice → a Flax classifier."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from gcp_jax.models.classifier import Classifier
from gcp_jax.models.efficientnet import EFFICIENTNET_PARAMS, EfficientNet
from gcp_jax.models.resnet import RESNET_PARAMS, ResNet
from gcp_jax.pooling import gcp_head_from_config

ARCHS = tuple(EFFICIENTNET_PARAMS) + tuple(RESNET_PARAMS)
HEADS = ("gap", "gcp")
BACKBONE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _backbone_dtype(dtype):
    if isinstance(dtype, str):
        if dtype not in BACKBONE_DTYPES:
            raise ValueError(f"Backbone dtype {dtype!r} is not one of {', '.join(BACKBONE_DTYPES)}.")
        return BACKBONE_DTYPES[dtype]
    return dtype


def create_model(
    arch: str,
    *,
    num_classes: int,
    head: str = "gcp",
    gcp: Mapping[str, Any] | None = None,
    dropout_rate: float | None = None,
    drop_connect_rate: float | None = None,
    dtype: Any = jnp.float32,
    last_stride: int = 2,
) -> Classifier:
    """Builds `arch` (see ARCHS) with a `gap` or `gcp` head and a `num_classes`-way classifier.

    `gcp`: the `config.gcp` fields for the GCP head (ignored by `gap`). `dropout_rate` (before the
    classifier) and `drop_connect_rate` (EfficientNet only) default to the architecture's values
    when None. `dtype` ("float32", "bfloat16" or a jnp dtype) is the backbone's compute dtype;
    parameters, the spectral head and the logits stay float32. `last_stride=1` (ResNets only;
    EfficientNets keep the reference strides) runs the last ResNet stage at stride 1: output
    stride 16, 28×28 maps at 448 px, the GCP protocol.
    """
    if arch not in ARCHS:
        raise ValueError(f"Unknown arch {arch!r}; choose one of {', '.join(ARCHS)}.")
    if head not in HEADS:
        raise ValueError(f"Unknown head {head!r}; choose one of {', '.join(HEADS)}.")
    if last_stride not in (1, 2):
        raise ValueError(f"last_stride must be 1 or 2, got {last_stride!r}.")
    dtype = _backbone_dtype(dtype)
    if arch in EFFICIENTNET_PARAMS:
        if last_stride != 2:
            raise ValueError(f"last_stride=1 applies to ResNets only; {arch} keeps the reference strides (use 2).")
        width, depth, _, default_dropout = EFFICIENTNET_PARAMS[arch]
        backbone = EfficientNet(
            width, depth, drop_connect_rate=0.2 if drop_connect_rate is None else drop_connect_rate, dtype=dtype
        )
    else:
        if drop_connect_rate:
            raise ValueError(f"drop_connect_rate applies to EfficientNets only; set it to None or 0 for {arch}.")
        bottleneck, stages, planes, stem = RESNET_PARAMS[arch]
        backbone = ResNet(stages, planes, bottleneck=bottleneck, stem=stem, last_stride=last_stride, dtype=dtype)
        default_dropout = 0.0
    return Classifier(
        backbone=backbone,
        num_classes=num_classes,
        head=gcp_head_from_config(gcp or {}) if head == "gcp" else None,
        dropout_rate=default_dropout if dropout_rate is None else dropout_rate,
    )
