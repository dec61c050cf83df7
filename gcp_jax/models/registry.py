"""The backbone families (one `Family` record each) and `create_model`: architecture name + head → a classifier."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp

from gcp_jax import checks
from gcp_jax.models.classifier import Classifier
from gcp_jax.models.efficientnet import EFFICIENTNET_PARAMS, EfficientNet
from gcp_jax.models.resnet import RESNET_PARAMS, ResNet
from gcp_jax.pooling import gcp_head_from_config


@dataclasses.dataclass(frozen=True)
class Family:
    """A backbone family: every fact the config, the model builder and the weight loader need about it.

    A new family is one more record in FAMILIES (and a reader in `gcp_jax.pretrained` when its weight
    files are in a new format).
    """

    name: str
    params: Mapping[str, Any]  # arch -> its size parameters (the family's *_PARAMS)
    build: Callable[..., Any]  # (params, *, last_stride, drop_connect_rate, dtype) -> the backbone module
    default_dropout: Callable[[Any], float]  # params -> the dropout before the classifier when unset
    last_strides: tuple[int, ...]  # the layer4 strides it can run
    protocol_last_stride: int  # the GCP protocols' stride (config.with_backbone)
    drop_connect: bool  # whether it has stochastic depth (model.drop_connect_rate)
    weight_format: str  # "keras" (HDF5) or "torch": the reader of gcp_jax.pretrained
    file_last_strides: Mapping[str, int] = dataclasses.field(default_factory=dict)  # a file's arch prefix -> stride


def _efficientnet(params, *, last_stride, drop_connect_rate, dtype):
    del last_stride  # EfficientNets keep the reference strides (model_problems refuses another)
    rate = DEFAULT_DROP_CONNECT if drop_connect_rate is None else drop_connect_rate
    return EfficientNet(params.width, params.depth, drop_connect_rate=rate, dtype=dtype)


def _resnet(params, *, last_stride, drop_connect_rate, dtype):
    del drop_connect_rate  # ResNets have no stochastic depth (model_problems refuses a rate)
    return ResNet(
        params.stage_sizes,
        params.planes,
        bottleneck=params.bottleneck,
        stem=params.stem,
        last_stride=last_stride,
        dtype=dtype,
    )


DEFAULT_DROP_CONNECT = 0.2  # EfficientNet stochastic depth (the reference's)
FAMILIES = (
    Family(
        "efficientnet",
        EFFICIENTNET_PARAMS,
        _efficientnet,
        default_dropout=lambda params: params.dropout,
        last_strides=(2,),
        protocol_last_stride=2,
        drop_connect=True,
        weight_format="keras",
    ),
    Family(
        "resnet",
        RESNET_PARAMS,
        _resnet,
        default_dropout=lambda params: 0.0,
        last_strides=(1, 2),
        protocol_last_stride=1,  # 28x28 maps at 448 px: a full-rank 256-d covariance (docs/method.md)
        drop_connect=False,
        weight_format="torch",
        # fast-MPN-COV's model zoo runs layer4 at stride 1; a main.py checkpoint of torchvision's at 2
        file_last_strides={"mpncovresnet": 1, "resnet": 2},
    ),
)
ARCHS = tuple(arch for fam in FAMILIES for arch in fam.params)
HEADS = ("gap", "gcp")
BACKBONE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}  # float64: with x64


def family(arch: str) -> Family:
    """The family of a known `arch` (KeyError for another)."""
    for fam in FAMILIES:
        if arch in fam.params:
            return fam
    raise KeyError(arch)


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
    elif arch in ARCHS and last_stride not in family(arch).last_strides:
        problems.append(f"last_stride=1 applies to ResNets only; {arch} keeps the reference strides (use 2).")
    problems += _rate_problems("dropout_rate", dropout_rate) + _rate_problems("drop_connect_rate", drop_connect_rate)
    if drop_connect_rate and arch in ARCHS and not family(arch).drop_connect:
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
    fam = family(arch)
    params = fam.params[arch]
    backbone = fam.build(params, last_stride=last_stride, drop_connect_rate=drop_connect_rate, dtype=dtype)
    return Classifier(
        backbone=backbone,
        num_classes=num_classes,
        head=gcp_head_from_config(gcp or {}) if head == "gcp" else None,
        dropout_rate=fam.default_dropout(params) if dropout_rate is None else dropout_rate,
    )
