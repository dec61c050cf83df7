"""gcp_jax.layers (1×1 convolution as matmul, max-pool) and gcp_jax.cpu_tuning (CPU process settings)."""

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

from gcp_jax import cpu_tuning, layers, sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _conv_pair(kernel, stride, padding, groups=1, channels=6, features=4):
    rng = np.random.default_rng(kernel * 10 + stride)
    x = jnp.asarray(rng.normal(size=(2, 9, 7, channels)))
    w = jnp.asarray(rng.normal(size=(kernel, kernel, channels // groups, features)))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    ours = lambda x, w: layers.conv_general_dilated(
        x, w, (stride, stride), padding, dimension_numbers=dn, feature_group_count=groups
    )
    ref = lambda x, w: lax.conv_general_dilated(
        x, w, (stride, stride), padding, dimension_numbers=dn, feature_group_count=groups
    )
    return x, w, ours, ref


DEPTHWISE = dict(groups=6, features=6)


@pytest.mark.parametrize(
    "kernel,stride,padding,kind",
    [
        (1, 1, ((0, 0), (0, 0)), {}),
        (1, 2, ((0, 0), (0, 0)), {}),
        (1, 2, "SAME", {}),
        (1, 3, "VALID", {}),
        (3, 1, ((1, 1), (1, 1)), {}),
        (3, 2, "SAME", dict(groups=2)),
        (3, 1, "SAME", DEPTHWISE),
        (3, 2, "SAME", DEPTHWISE),
        (5, 2, "SAME", DEPTHWISE),
        (5, 1, ((1, 3), (2, 0)), DEPTHWISE),
    ],
)
def test_conv_matches_lax_values_and_gradients(kernel, stride, padding, kind):
    x, w, ours, ref = _conv_pair(kernel, stride, padding, **kind)
    np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-12, atol=1e-12)
    cot = jnp.asarray(np.random.default_rng(1).normal(size=ref(x, w).shape))
    grads = [jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) * cot), (0, 1))(x, w) for f in (ours, ref)]
    for g_ours, g_ref in zip(*grads):
        np.testing.assert_allclose(g_ours, g_ref, rtol=1e-12, atol=1e-12)
    check_grads(ours, (x, w), order=1, modes=("rev",), eps=1e-6)


def test_other_layouts_go_to_lax():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 9, 7)))  # NCHW, lax's default layout
    w = jnp.asarray(np.random.default_rng(1).normal(size=(4, 6, 1, 1)))  # OIHW
    np.testing.assert_allclose(
        layers.conv_general_dilated(x, w, (1, 1), "SAME"), lax.conv_general_dilated(x, w, (1, 1), "SAME"), rtol=1e-12
    )


def test_bfloat16_depthwise_keeps_its_dtype_and_values():
    x, w, ours, ref = _conv_pair(5, 1, "SAME", **DEPTHWISE)
    y = ours(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    exact = ref(x, w)
    np.testing.assert_allclose(y.astype(jnp.float64), exact, atol=0.02 * float(jnp.max(jnp.abs(exact))))


@pytest.mark.parametrize("kind", [{}, DEPTHWISE])
def test_special_cases_compile_without_xla_convolutions(kind):
    """1×1 kernels become matmuls, depthwise kernels (on CPU) strided views: no convolution left."""
    x, w, ours, _ = _conv_pair(1 if not kind else 3, 2, "SAME", **kind)
    hlo = jax.jit(jax.grad(lambda x, w: jnp.sum(ours(x, w) ** 2), (0, 1))).lower(x, w).compile().as_text()
    assert " convolution(" not in hlo  # the HLO op (the test name is in the metadata)


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_programs_for_accelerators_keep_native_convolution_and_pooling(platform):
    """The special paths are CPU-only: in a program traced for an accelerator (on this CPU host), a
    1×1 and a depthwise convolution and the max-pool's gradient stay XLA's own ops (the 1×1-as-matmul
    path followed by the pool's routing aborts XLA:GPU's Triton GEMM fusion)."""
    pointwise, depthwise = _conv_pair(1, 2, "SAME"), _conv_pair(3, 2, "SAME", **DEPTHWISE)

    def loss(x, w1, w3):
        y = pointwise[2](x, w1) + depthwise[2](x, w3)[..., :4]
        return jnp.sum(layers.max_pool(y, WINDOW, STRIDES, PADDING) ** 2)

    args = (pointwise[0], pointwise[1], depthwise[1])
    on_cpu = jax.jit(jax.grad(loss, (0, 1, 2))).trace(*args).lower().as_text()
    assert on_cpu.count("stablehlo.convolution") == 0 and "select_and_scatter" not in on_cpu
    with cpu_tuning.compile_platform(platform):
        hlo = jax.jit(jax.grad(loss, (0, 1, 2))).trace(*args).lower().as_text()
    assert cpu_tuning.target_platform() == "cpu"  # the context ends with the trace
    assert hlo.count("stablehlo.convolution") >= 4  # forward, dx and dkernel of both
    assert "stablehlo.select_and_scatter" in hlo and "dot_general" not in hlo


def test_a_mesh_programs_are_traced_for_its_devices_platform():
    """The mesh decides (the steps of gcp_jax.steps trace so), not an enclosing context or the host."""
    seen = []
    trace = sharding.traced_for(
        sharding.make_mesh(jax.devices()[:1]), lambda: seen.append(cpu_tuning.target_platform())
    )
    with cpu_tuning.compile_platform("tpu"):
        trace()
        seen.append(cpu_tuning.target_platform())
    assert seen == ["cpu", "tpu"]


def test_flax_conv_uses_it_with_the_same_parameters():
    x = jnp.ones((1, 8, 8, 3))
    conv = lambda **kw: nn.Conv(5, (1, 1), strides=2, use_bias=True, **kw)
    params = conv().init(jax.random.key(0), x)
    np.testing.assert_allclose(
        conv(conv_general_dilated=layers.conv_general_dilated).apply(params, x), conv().apply(params, x), rtol=1e-12
    )


WINDOW, STRIDES, PADDING = (3, 3), (2, 2), ((1, 1), (1, 1))


def test_max_pool_matches_flax_values_and_gradients():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 8, 3)))
    ours = lambda x: layers.max_pool(x, WINDOW, STRIDES, PADDING)
    ref = lambda x: nn.max_pool(x, WINDOW, strides=STRIDES, padding=PADDING)
    np.testing.assert_array_equal(ours(x), ref(x))
    cot = jnp.asarray(np.random.default_rng(1).normal(size=ref(x).shape))
    g_ours, g_ref = (jax.grad(lambda x, f=f: jnp.sum(f(x) * cot))(x) for f in (ours, ref))
    np.testing.assert_allclose(g_ours, g_ref, rtol=1e-12, atol=1e-12)
    check_grads(ours, (x,), order=1, modes=("rev",), eps=1e-6)


def test_max_pool_routes_ties_to_the_first_maximum():
    x = jnp.zeros((1, 4, 4, 1))  # every window is a tie (ReLU outputs are often all zero)
    cot = jnp.arange(1.0, 5.0).reshape(1, 2, 2, 1)
    dx = jax.grad(lambda x: jnp.sum(layers.max_pool(x, WINDOW, STRIDES, PADDING) * cot))(x)
    # Output (a, b) covers rows 2a-1..2a+1 and columns 2b-1..2b+1: its first in-image element is
    # (max(2a-1, 0), max(2b-1, 0)).
    expected = np.zeros((4, 4))
    expected[0, 0], expected[0, 1], expected[1, 0], expected[1, 1] = 1, 2, 3, 4
    np.testing.assert_array_equal(dx[0, :, :, 0], expected)
    assert float(jnp.sum(dx)) == float(jnp.sum(cot)) and bool(jnp.all(jnp.isfinite(dx)))


def test_accelerator_expected_follows_jax_platforms(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not cpu_tuning.accelerator_expected()
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert cpu_tuning.accelerator_expected()


FAULTS = textwrap.dedent(
    """
    import ctypes, resource, sys
    from gcp_jax import cpu_tuning
    if sys.argv[1] == "tuned":
        assert cpu_tuning.keep_freed_memory()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    def faults_of_a_256_mib_buffer():  # as XLA:CPU treats a step's temporaries: malloc, write, free
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buffer = libc.malloc(2**28)
        ctypes.memset(buffer, 1, 2**28)
        libc.free(buffer)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    faults_of_a_256_mib_buffer()
    print(faults_of_a_256_mib_buffer())
    """
)


def test_keep_freed_memory_stops_refaulting_large_buffers():
    def second_allocation_faults(mode):
        out = subprocess.run(
            [sys.executable, "-c", FAULTS, mode],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
        )
        return int(out.stdout.split()[-1])

    default = second_allocation_faults("default")  # glibc: mmap on allocation, unmap on free
    assert default > 0
    assert second_allocation_faults("tuned") < 0.05 * default  # the freed pages are reused
