"""EfficientNet-B0…B7 (Tan & Le, 2019) as the TensorFlow reference and keras.applications define it.

Module and layer names follow keras.applications (`stem_conv`, `block2a/expand_conv`, …, `top_bn`),
so that `gcp_jax.pretrained` maps Keras weight files one to one. "SAME" padding is TensorFlow's
(extra row/column at the bottom/right), which equals Keras' `correct_pad` + "valid" for stride 2.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from gcp_jax import layers


class EfficientNetParams(NamedTuple):
    width: float  # channel multiplier
    depth: float  # block-count multiplier
    dropout: float  # before the classifier


EFFICIENTNET_PARAMS = {
    "efficientnet_b0": EfficientNetParams(1.0, 1.0, 0.2),
    "efficientnet_b1": EfficientNetParams(1.0, 1.1, 0.2),
    "efficientnet_b2": EfficientNetParams(1.1, 1.2, 0.3),
    "efficientnet_b3": EfficientNetParams(1.2, 1.4, 0.3),
    "efficientnet_b4": EfficientNetParams(1.4, 1.8, 0.4),
    "efficientnet_b5": EfficientNetParams(1.6, 2.2, 0.4),
    "efficientnet_b6": EfficientNetParams(1.8, 2.6, 0.5),
    "efficientnet_b7": EfficientNetParams(2.0, 3.1, 0.5),
}

# B0 stages: (kernel, repeats, filters in, filters out, expand ratio, stride); SE ratio 0.25 everywhere.
_B0_STAGES = (
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
)
SE_RATIO = 0.25
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3

# Keras' initialisers: VarianceScaling(2, fan_out, truncated normal) for every conv. Keras counts
# the fan-out of a depthwise kernel [k, k, C, 1] as k·k, which is Flax's fan-in of [k, k, 1, C].
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "truncated_normal")
_depthwise_init = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")


def _bn(train, dtype, name):
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype, name=name)


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channels scaled by `width`, rounded to a multiple of `divisor`, never 10 % below."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def round_repeats(repeats: int, depth: float) -> int:
    """Blocks per stage scaled by `depth`, rounded up."""
    return math.ceil(depth * repeats)


class BlockSpec(NamedTuple):
    """One MBConv block; `name` is Keras' (`block2b`)."""

    name: str
    kernel: int
    stride: int
    filters_in: int
    filters_out: int
    expand_ratio: int
    drop_rate: float


def block_specs(width: float, depth: float, drop_connect_rate: float) -> list[BlockSpec]:
    """All MBConv blocks in order; drop-connect grows linearly with the block index from 0."""
    stages = [
        (kernel, round_repeats(repeats, depth), round_filters(f_in, width), round_filters(f_out, width), expand, stride)
        for kernel, repeats, f_in, f_out, expand, stride in _B0_STAGES
    ]
    total = sum(s[1] for s in stages)
    specs = []
    for i, (kernel, repeats, f_in, f_out, expand, stride) in enumerate(stages):
        for j in range(repeats):
            specs.append(
                BlockSpec(
                    name=f"block{i + 1}{chr(ord('a') + j)}",
                    kernel=kernel,
                    stride=stride if j == 0 else 1,
                    filters_in=f_in if j == 0 else f_out,
                    filters_out=f_out,
                    expand_ratio=expand,
                    drop_rate=drop_connect_rate * len(specs) / total,
                )
            )
    return specs


class MBConv(nn.Module):
    """Inverted residual: expand 1×1 → depthwise k×k → squeeze-excitation → project 1×1 (+ skip)."""

    spec: BlockSpec
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, inputs, train: bool = False):
        s = self.spec
        bn = lambda name: _bn(train, self.dtype, name)
        conv = lambda features, name, **kw: layers.Conv(
            features, (1, 1), dtype=self.dtype, kernel_init=_conv_init, name=name, **kw
        )
        filters = s.filters_in * s.expand_ratio
        x = inputs
        if s.expand_ratio != 1:
            x = nn.swish(bn("expand_bn")(conv(filters, "expand_conv", use_bias=False)(x)))
        x = layers.Conv(
            filters,
            (s.kernel, s.kernel),
            strides=s.stride,
            padding="SAME",
            feature_group_count=filters,
            use_bias=False,
            dtype=self.dtype,
            kernel_init=_depthwise_init,
            name="dwconv",
        )(x)
        x = nn.swish(bn("bn")(x))
        # Squeeze-excitation, sized from the block's input channels (not the expanded ones).
        se = jnp.mean(x, axis=(1, 2), keepdims=True)
        se = nn.swish(conv(max(1, int(s.filters_in * SE_RATIO)), "se_reduce")(se))
        x = x * nn.sigmoid(conv(filters, "se_expand")(se))
        x = bn("project_bn")(conv(s.filters_out, "project_conv", use_bias=False)(x))
        if s.stride == 1 and s.filters_in == s.filters_out:
            x = nn.Dropout(s.drop_rate, broadcast_dims=(1, 2, 3), deterministic=not train, name="drop")(x)
            x = x + inputs
        return x


class EfficientNet(nn.Module):
    """EfficientNet feature extractor: images [B, H, W, 3] (ImageNet-normalised) → top map [B, H/32, W/32, C]."""

    width: float
    depth: float
    drop_connect_rate: float = 0.2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool = False):
        bn = lambda name: _bn(train, self.dtype, name)
        x = images.astype(self.dtype)
        x = layers.Conv(
            round_filters(32, self.width),
            (3, 3),
            strides=2,
            padding="SAME",
            use_bias=False,
            dtype=self.dtype,
            kernel_init=_conv_init,
            name="stem_conv",
        )(x)
        x = nn.swish(bn("stem_bn")(x))
        for spec in block_specs(self.width, self.depth, self.drop_connect_rate):
            x = MBConv(spec, dtype=self.dtype, name=spec.name)(x, train=train)
        x = layers.Conv(
            round_filters(1280, self.width),
            (1, 1),
            use_bias=False,
            dtype=self.dtype,
            kernel_init=_conv_init,
            name="top_conv",
        )(x)
        return nn.swish(bn("top_bn")(x))
