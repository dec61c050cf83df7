"""gcp_jax: global covariance pooling with differentiable eigendecomposition, in JAX/Flax."""

__version__ = "0.1.0"
