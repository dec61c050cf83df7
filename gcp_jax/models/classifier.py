"""Backbone + pooling head + linear classifier, the model every config trains."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class Linear(nn.Module):
    """Dense layer initialised as PyTorch's nn.Linear: kernel and bias U(±1/√fan_in), float32."""

    features: int

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        bound = 1.0 / jnp.sqrt(fan_in)
        init = lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound)
        kernel = self.param("kernel", init, (fan_in, self.features))
        bias = self.param("bias", init, (self.features,))
        return jnp.dot(x.astype(jnp.float32), kernel, precision=jax.lax.Precision.HIGHEST) + bias


class Classifier(nn.Module):
    """images [B, H, W, 3] → logits [B, num_classes] (float32).

    Variables: `backbone/...`, `head/...` (the GCP head; absent for global average pooling) and
    `classifier/{kernel,bias}`. Dropout (rng "dropout") sits before the classifier.
    """

    backbone: nn.Module
    num_classes: int
    head: nn.Module | None = None  # None: global average pooling
    dropout_rate: float = 0.0

    def setup(self):
        self.dropout = nn.Dropout(self.dropout_rate)
        self.classifier = Linear(self.num_classes)

    def features(self, images, train: bool = False):
        """The backbone map [B, H', W', C] in the backbone dtype."""
        return self.backbone(images, train=train)

    def pooled(self, images, train: bool = False):
        """The head output: mean of the map [B, C] (gap) or triu(N(Σ)) [B, d(d+1)/2] (gcp)."""
        features = self.features(images, train=train)
        if self.head is None:
            return jnp.mean(features.astype(jnp.float32), axis=(1, 2))
        return self.head(features, train=train)

    def __call__(self, images, train: bool = False):
        x = self.dropout(self.pooled(images, train=train), deterministic=not train)
        return self.classifier(x)
