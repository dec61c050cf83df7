"""ResNets in the torchvision layout (v1.5: stride in the 3×3 conv, BN eps 1e-5).

Module names follow torchvision's state-dict keys (`conv1`, `bn1`, `layer3_2/conv2`,
`layer1_0/downsample_conv`), so that `gcp_jax.pretrained` maps them one to one. Padding is
PyTorch's: symmetric, explicit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from gcp_jax import layers

BN_MOMENTUM = 0.9  # PyTorch momentum 0.1
BN_EPSILON = 1e-5


class ResNetParams(NamedTuple):
    bottleneck: bool  # bottleneck (1×1, 3×3, 1×1) or basic (3×3, 3×3) blocks
    stage_sizes: tuple[int, ...]  # blocks per stage
    planes: tuple[int, ...]  # width of each stage
    stem: str  # "imagenet" (7×7/2 conv + max-pool) or "tiny" (3×3/2 conv)


RESNET_PARAMS = {
    "resnet50": ResNetParams(True, (3, 4, 6, 3), (64, 128, 256, 512), "imagenet"),
    "resnet101": ResNetParams(True, (3, 4, 23, 3), (64, 128, 256, 512), "imagenet"),
    # Small basic-block ResNet for demos and tests: 3×3 stride-2 stem, no max-pool, output stride 16
    # (4×4 maps at 64 px; 8×8 with last_stride=1).
    "resnet_tiny": ResNetParams(False, (1, 1, 1, 1), (16, 32, 64, 128), "tiny"),
}

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # torchvision's kaiming fan_out


def _conv(features, kernel, stride, dtype, name):
    pad = kernel // 2
    return layers.Conv(
        features,
        (kernel, kernel),
        strides=stride,
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        kernel_init=_conv_init,
        name=name,
    )


def _bn(train, dtype, name):
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype, name=name)


class Block(nn.Module):
    """Bottleneck (1×1 → 3×3 stride → 1×1 ×4) or basic (3×3 stride → 3×3) residual block."""

    planes: int
    stride: int
    bottleneck: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, inputs, train: bool = False):
        if self.bottleneck:
            out_channels = 4 * self.planes
            x = nn.relu(_bn(train, self.dtype, "bn1")(_conv(self.planes, 1, 1, self.dtype, "conv1")(inputs)))
            x = nn.relu(_bn(train, self.dtype, "bn2")(_conv(self.planes, 3, self.stride, self.dtype, "conv2")(x)))
            x = _bn(train, self.dtype, "bn3")(_conv(out_channels, 1, 1, self.dtype, "conv3")(x))
        else:
            out_channels = self.planes
            x = nn.relu(_bn(train, self.dtype, "bn1")(_conv(self.planes, 3, self.stride, self.dtype, "conv1")(inputs)))
            x = _bn(train, self.dtype, "bn2")(_conv(self.planes, 3, 1, self.dtype, "conv2")(x))
        shortcut = inputs
        if self.stride != 1 or inputs.shape[-1] != out_channels:
            shortcut = _conv(out_channels, 1, self.stride, self.dtype, "downsample_conv")(inputs)
            shortcut = _bn(train, self.dtype, "downsample_bn")(shortcut)
        return nn.relu(x + shortcut)


class ResNet(nn.Module):
    """ResNet feature extractor: images [B, H, W, 3] → last stage map [B, H/32, W/32, C] (H/16 for the tiny stem).

    `last_stride=1` keeps the last stage at output stride 16 (28×28 maps at 448 px), the GCP
    protocol; the weights are the same.
    """

    stage_sizes: Sequence[int]
    planes: Sequence[int]
    bottleneck: bool = True
    stem: str = "imagenet"
    last_stride: int = 2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool = False):
        x = images.astype(self.dtype)
        if self.stem == "imagenet":
            x = nn.relu(_bn(train, self.dtype, "bn1")(_conv(64, 7, 2, self.dtype, "conv1")(x)))
            x = layers.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
        else:
            x = nn.relu(_bn(train, self.dtype, "bn1")(_conv(self.planes[0], 3, 2, self.dtype, "conv1")(x)))
        last = len(self.stage_sizes) - 1
        for i, (blocks, planes) in enumerate(zip(self.stage_sizes, self.planes)):
            for j in range(blocks):
                stride = 1 if i == 0 or j > 0 else (self.last_stride if i == last else 2)
                x = Block(planes, stride, self.bottleneck, dtype=self.dtype, name=f"layer{i + 1}_{j}")(x, train=train)
        return x
