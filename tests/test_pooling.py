"""The GCP head: shapes, dtypes, normalisations, config errors, and a per-shard eigh under a mesh."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gcp_jax import linalg
from gcp_jax.linalg import NORMS, SpectralOptions
from gcp_jax.pooling import GCPHead, gcp_head_from_config


def features(batch=2, size=5, channels=12, dtype=jnp.float32, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, size, size, channels), dtype)


@pytest.mark.parametrize("norm", NORMS)
def test_head_output_shape_and_gradient(norm):
    head = gcp_head_from_config({"dim": 8, "norm": norm})
    x = features()
    variables = head.init(jax.random.key(1), x)
    out = head.apply(variables, x)
    assert out.shape == (2, 8 * 9 // 2) and out.dtype == jnp.float32

    def loss(params):
        vec, _ = head.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(vec**2)

    grads = jax.grad(loss)(variables["params"])
    assert all(bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_head_matches_the_functional_pipeline_without_reduction():
    x = features(channels=6)
    head = GCPHead(dim=0, spectral=SpectralOptions(norm="seb"))
    out = head.apply(head.init(jax.random.key(0), x), x)
    expected = linalg.triu_vec(linalg.seb(linalg.covariance(x.reshape(2, 25, 6))))
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_spectral_dtype_is_independent_of_backbone_dtype():
    x = features(dtype=jnp.bfloat16)
    with jax.enable_x64(True):
        head = gcp_head_from_config({"dim": 8, "dtype": "float64"})
        variables = head.init(jax.random.key(0), x)
        assert head.apply(variables, x).dtype == jnp.float64
    head32 = gcp_head_from_config({"dim": 8, "dtype": "float32"})
    assert head32.apply(head32.init(jax.random.key(0), x), x).dtype == jnp.float32


def test_float64_without_x64_is_a_clear_error():
    head = gcp_head_from_config({"dim": 4, "dtype": "float64"})
    with pytest.raises(ValueError, match="64-bit"):
        head.init(jax.random.key(0), features())


def test_config_passes_gradient_options_and_rejects_bad_values():
    head = gcp_head_from_config({"norm": "sqrt", "grad": "taylor", "taylor_degree": 20, "topn": 0, "dim": 0})
    assert head.spectral == SpectralOptions(norm="sqrt", grad="taylor", taylor_degree=20) and not head.dim
    for bad, match in (
        ({"norm": "svd"}, "gcp: norm='svd' is not one of"),
        ({"grad": "svd"}, "gcp: grad='svd' is not one of"),
        ({"dims": 4}, r"gcp: dims is not a known field \(did you mean dim\?\)"),
        ({"grad": "svd", "eps": 0.0}, "gcp: 2 problems"),
    ):
        with pytest.raises(ValueError, match=match):
            gcp_head_from_config(bad)


def test_reduction_bn_uses_the_pytorch_momentum_and_kaiming_fan_out():
    head = GCPHead(dim=64)
    variables = head.init(jax.random.key(0), features(channels=32))
    kernel = variables["params"]["reduce_conv"]["kernel"]
    assert abs(float(jnp.std(kernel)) - np.sqrt(2.0 / 64)) < 0.02  # fan_out = 64 for a 1×1 conv
    assert head.bn_momentum == 0.9 and head.bn_epsilon == 1e-5


def test_sharded_gradient_keeps_eigh_per_shard():
    """On an 8-device ('data',) mesh, eigh runs on each shard's covariances: no all-gather."""
    devices = jax.devices()
    assert len(devices) == 8, "tests/conftest.py sets 8 fake CPU devices"
    mesh = Mesh(np.array(devices), ("data",))
    head = GCPHead(dim=16)
    x = features(batch=16, size=7, channels=32)
    variables = head.init(jax.random.key(0), x)

    def loss(params, images):
        out, _ = head.apply({**variables, "params": params}, images, train=True, mutable=["batch_stats"])
        return jnp.sum(out**2)

    images = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    params = jax.device_put(variables["params"], NamedSharding(mesh, PartitionSpec()))
    hlo = jax.jit(jax.grad(loss)).lower(params, images).compile().as_text()
    assert "all-gather" not in hlo
    eigh_shapes = re.findall(r"custom-call\((?:[^)]*)\), custom_call_target=\"lapack_[sd]syevd", hlo)
    eigh_operands = re.findall(r"= \((f32\[\d+,16,16\])[^=]*custom_call_target=\"lapack_ssyevd", hlo)
    # 16 samples / 8 shards = 2 per device, one per call (gcp_jax.batched_eigh: several CPU devices)
    assert eigh_shapes and eigh_operands == ["f32[1,16,16]"] * len(eigh_operands)
