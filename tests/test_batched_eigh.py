"""gcp_jax.batched_eigh: jnp.linalg.eigh's values, one matrix per device and call on several CPU devices."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gcp_jax import batched_eigh, linalg, sharding

EIGH_CALL = re.compile(r'custom_call_target="\w*(?:syevd|eigh)\w*"')


def spd(shape, seed=0):
    x = np.random.default_rng(seed).normal(size=(*shape[:-2], 2 * shape[-1], shape[-1]))
    return np.einsum("...mc,...md->...cd", x, x).astype(np.float32)


def on_devices(a, mesh):
    return jax.device_put(a, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))


def eigh_shapes(compiled_text):
    """Eigenvector shapes of the eigh custom calls in compiled HLO, e.g. ['f32[1,8,8]']."""
    lines = [line for line in compiled_text.splitlines() if EIGH_CALL.search(line)]
    return [re.search(r"= \((\w+\[[\d,]*\])", line).group(1) for line in lines]


@pytest.mark.parametrize(
    ("shape", "devices"),
    [((32, 8, 8), 8), ((16, 2, 5, 5), 8), ((16, 6, 6), 4), ((16, 8, 8), 1), ((3, 8, 8), 1), ((8, 8), 1)],
)
def test_same_values_as_jnp_eigh(shape, devices):
    """Bitwise: LAPACK factorises each matrix alone whichever way the batch is split."""
    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    a = spd(shape)
    if len(shape) > 2 and shape[0] % devices == 0:
        a = on_devices(a, sharding.make_mesh(jax.devices()[:devices]))
    lam, u = jax.jit(batched_eigh.eigh)(a)
    lam_ref, u_ref = jax.jit(lambda a: jnp.linalg.eigh(a, symmetrize_input=False))(a)
    np.testing.assert_array_equal(lam, lam_ref)
    np.testing.assert_array_equal(u, u_ref)
    sym_lam, sym_u = jax.jit(lambda a: batched_eigh.eigh(a, symmetrize_input=True))(a)
    np.testing.assert_array_equal(sym_lam, jnp.linalg.eigh(a)[0])
    np.testing.assert_array_equal(sym_u, jnp.linalg.eigh(a)[1])


def test_one_matrix_per_device_and_call_without_collectives():
    """A batch sharded over 8 CPU devices: every eigh call factorises one matrix per device, the
    calls of a device run one after the other, and the batch is never gathered."""
    mesh = sharding.make_mesh()
    a = on_devices(spd((32, 8, 8)), mesh)
    hlo = jax.jit(batched_eigh.eigh).lower(a).compile().as_text()
    assert eigh_shapes(hlo) == ["f32[1,8,8]"]  # in a while loop over the 4 matrices per device
    assert "while" in hlo
    for collective in ("all-gather", "all-to-all", "all-reduce", "collective-permute"):
        assert collective not in hlo


def test_one_cpu_device_keeps_the_batched_call(monkeypatch):
    """With one CPU device per process (the usual CPU run) nothing changes: one batched call."""
    monkeypatch.setattr(batched_eigh, "cpu_devices_sharing_pool", lambda: (1, 1))
    a = jnp.asarray(spd((16, 8, 8)))
    ours = jax.jit(lambda a: batched_eigh.eigh(a)).lower(a).as_text()  # same module name
    plain = jax.jit(lambda a: tuple(jnp.linalg.eigh(a, symmetrize_input=False))).lower(a).as_text()
    assert ours == plain
    assert eigh_shapes(jax.jit(batched_eigh.eigh).lower(a).compile().as_text()) == ["f32[16,8,8]"]


@pytest.mark.parametrize(
    ("platform", "target"), [("cuda", "cusolver_syevd_ffi"), ("rocm", "hipsolver_syevd_ffi"), ("tpu", "Eigh")]
)
def test_other_platforms_keep_one_batched_call(platform, target):
    """The per-device dispatch is CPU-only: lowered for an accelerator (in this 8-device process),
    the eigh is the platform's own batched call on the whole batch, as jnp.linalg.eigh's."""
    a = jnp.asarray(spd((16, 8, 8)))
    text = jax.jit(batched_eigh.eigh).trace(a).lower(lowering_platforms=(platform,)).as_text()
    calls = [line for line in text.splitlines() if "stablehlo.custom_call" in line]
    assert len(calls) == 1 and f"@{target}(" in calls[0] and "tensor<16x8x8xf32>" in calls[0], calls
    assert "lapack" not in text and "stablehlo.while" not in text


@pytest.mark.parametrize("grad", ["exact", "ordinary"])
def test_sqrtm_and_its_gradient_match_the_batched_call(grad, monkeypatch):
    """linalg.sqrtm on 8 devices, forward and backward, against the plain batched eigh (the
    dispatch before this module) on the same sharded input."""
    mesh = sharding.make_mesh()
    a = on_devices(spd((16, 8, 8), seed=1), mesh)
    weights = on_devices(np.random.default_rng(2).normal(size=(16, 8, 8)).astype(np.float32), mesh)
    loss = lambda a, w: jnp.sum(linalg.sqrtm(a, grad=grad) * w)

    def eigh_loss(a, w):  # JAX's own eigh derivative, through the per-device loop
        lam, u = batched_eigh.eigh(a)
        return jnp.sum(lam * w[..., 0]) + jnp.sum(jnp.abs(u[..., -1]) * w[..., 1])

    def run():
        return jax.jit(jax.value_and_grad(loss))(a, weights), jax.jit(jax.grad(eigh_loss))(a, weights)

    (value, gradient), eigh_gradient = run()
    monkeypatch.setattr(batched_eigh, "devices_per_batch", lambda shape: None)
    (value_ref, gradient_ref), eigh_gradient_ref = run()
    np.testing.assert_array_equal(value, value_ref)
    np.testing.assert_allclose(gradient, gradient_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(eigh_gradient, eigh_gradient_ref, rtol=1e-6, atol=1e-6)


def test_devices_per_batch():
    assert batched_eigh.cpu_devices_sharing_pool() == (8, 8)
    assert batched_eigh.devices_per_batch((16, 8, 8)) == 8
    assert batched_eigh.devices_per_batch((8, 3, 4, 4)) == 8
    assert batched_eigh.devices_per_batch((12, 8, 8)) is None  # not a multiple of the devices
    assert batched_eigh.devices_per_batch((8, 8)) is None  # no batch
