"""`create_model`: architecture name + head choice → a Flax classifier."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from gcp_jax import checks
from gcp_jax.models.classifier import Classifier
from gcp_jax.models.efficientnet import EFFICIENTNET_PARAMS, EfficientNet
from gcp_jax.models.resnet import RESNET_PARAMS, ResNet
from gcp_jax.pooling import gcp_head_from_config

ARCHS = tuple(EFFICIENTNET_PARAMS) + tuple(RESNET_PARAMS)
HEADS = ("gap", "gcp")
BACKBONE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}  # float64: with x64
DEFAULT_DROP_CONNECT = 0.2  # EfficientNet stochastic depth (the reference's)


def _dtype_name(dtype) -> str:
    return dtype if isinstance(dtype, str) else jnp.dtype(dtype).name


def _rate_problems(name: str, value) -> list[str]:
    ok = value is None or (isinstance(value, numbers.Real) and 0 <= value < 1)
    return [] if ok else [f"{name}={value!r} must lie in [0, 1), or be None for the architecture's value."]


def model_problems(
    arch: str, *, head: str, dtype: Any, last_stride: int, dropout_rate: float | None, drop_connect_rate: float | None
) -> list[str]:
    """Every problem with these `create_model` arguments, one sentence each (named as config.model's fields)."""
    problems = []
    if arch not in ARCHS:
        problems.append(checks.not_one_of("arch", arch, ARCHS))
    if head not in HEADS:
        problems.append(checks.not_one_of("head", head, HEADS))
    if _dtype_name(dtype) not in BACKBONE_DTYPES:
        problems.append(checks.not_one_of("dtype", _dtype_name(dtype), BACKBONE_DTYPES))
    if last_stride not in (1, 2):
        problems.append(f"last_stride={last_stride!r} must be 1 or 2.")
    elif last_stride == 1 and arch in EFFICIENTNET_PARAMS:
        problems.append(f"last_stride=1 applies to ResNets only; {arch} keeps the reference strides (use 2).")
    problems += _rate_problems("dropout_rate", dropout_rate) + _rate_problems("drop_connect_rate", drop_connect_rate)
    if drop_connect_rate and arch in RESNET_PARAMS:
        problems.append(f"drop_connect_rate applies to EfficientNets only; set it to None or 0 for {arch}.")
    return problems


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
    checks.raise_if_any(
        model_problems(
            arch,
            head=head,
            dtype=dtype,
            last_stride=last_stride,
            dropout_rate=dropout_rate,
            drop_connect_rate=drop_connect_rate,
        ),
        "create_model",
    )
    dtype = BACKBONE_DTYPES[_dtype_name(dtype)]
    if arch in EFFICIENTNET_PARAMS:
        params = EFFICIENTNET_PARAMS[arch]
        rate = DEFAULT_DROP_CONNECT if drop_connect_rate is None else drop_connect_rate
        backbone = EfficientNet(params.width, params.depth, drop_connect_rate=rate, dtype=dtype)
        default_dropout = params.dropout
    else:
        params = RESNET_PARAMS[arch]
        backbone = ResNet(
            params.stage_sizes,
            params.planes,
            bottleneck=params.bottleneck,
            stem=params.stem,
            last_stride=last_stride,
            dtype=dtype,
        )
        default_dropout = 0.0
    return Classifier(
        backbone=backbone,
        num_classes=num_classes,
        head=gcp_head_from_config(gcp or {}) if head == "gcp" else None,
        dropout_rate=default_dropout if dropout_rate is None else dropout_rate,
    )
