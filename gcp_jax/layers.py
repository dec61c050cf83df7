"""Convolution and pooling pieces for the backbones and the GCP head, written so XLA:CPU runs them fast.

Only programs traced for the CPU take the special paths below; GPUs and TPUs keep XLA's native
convolutions and pooling (cuDNN, the TPU's convolution units), which are already fast there. The
platform is `cpu_tuning.target_platform()`: the one the program is compiled for (the steps of
gcp_jax.steps trace under their mesh's), else JAX's default backend. The choice is made when
tracing, not per lowering: a `lax.platform_dependent` carries both variants through tracing and
differentiation, a third of the time it takes to trace an EfficientNet train step, paid again at
every start of a run.

XLA's CPU backend differentiates a convolution's kernel by a convolution over batch-transposed
copies of the activations, runs depthwise convolutions at a fraction of memory speed, and
differentiates a max-pool through an index-packing select-and-gather; each costs far more than
the arithmetic it does. Here 1×1 convolutions are matrix products whose kernel gradient
contracts batch and space directly; depthwise convolutions are sums of k² strided views times
their weights (one fused loop forward and for dx, a scan over offsets for the kernel
gradient); the max-pool routes its gradient with strided compares. Values equal
`lax.conv_general_dilated` and `nn.max_pool` (gradient to the first maximum of each window, as
PyTorch routes it).
"""

from __future__ import annotations

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gcp_jax import cpu_tuning


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _channel_matmul(x, kernel, precision=None):
    """x [N, H, W, C] @ kernel [C, D] → [N, H, W, D]."""
    return lax.dot_general(x, kernel, (((3,), (0,)), ((), ())), precision=precision)


def _channel_matmul_fwd(x, kernel, precision):
    return _channel_matmul(x, kernel, precision), (x, kernel)


def _channel_matmul_bwd(precision, residuals, g):
    x, kernel = residuals
    dx = lax.dot_general(g, kernel, (((3,), (1,)), ((), ())), precision=precision)
    # As one [N·H·W, C]ᵀ [N·H·W, D] product: XLA:CPU then reads both operands in place.
    dkernel = lax.dot_general(
        x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]), (((0,), (0,)), ((), ())), precision=precision
    )
    return dx, dkernel


_channel_matmul.defvjp(_channel_matmul_fwd, _channel_matmul_bwd)


def _strided_view(xp, offset, out_hw, strides):
    """xp[:, i + s·h, j + s·w, :] for h, w < out_hw: the input that window offset (i, j) meets at each output."""
    (i, j), (ho, wo), (sh, sw) = offset, out_hw, strides
    return lax.slice(
        xp, (0, i, j, 0), (xp.shape[0], i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, xp.shape[3]), (1, sh, sw, 1)
    )


def _unview(values, offset, padded_hw, strides):
    """The transpose of `_strided_view`: values [N, ho, wo, C] placed back into a zero [N, *padded_hw, C]."""
    (i, j), (_, ho, wo, _), (sh, sw) = offset, values.shape, strides
    last_i, last_j = i + sh * (ho - 1), j + sw * (wo - 1)
    spread = ((0, 0, 0), (i, padded_hw[0] - last_i - 1, sh - 1), (j, padded_hw[1] - last_j - 1, sw - 1), (0, 0, 0))
    return lax.pad(values, jnp.zeros((), values.dtype), spread)


def _window_offsets(window):
    return itertools.product(range(window[0]), range(window[1]))


def _weighted_views(xp, kernel, out_hw, strides):
    """Σ_(i,j) view_(i,j)(xp) · kernel[i, j, 0], accumulated in float32 at least (as a convolution's products are)."""
    acc = jnp.promote_types(xp.dtype, jnp.float32)
    return sum(
        _strided_view(xp, offset, out_hw, strides).astype(acc) * kernel[offset][0].astype(acc)
        for offset in _window_offsets(kernel.shape[:2])
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_by_views(x, kernel, strides, padding):
    """Depthwise NHWC convolution, kernel [kh, kw, 1, C], explicit padding, as weighted strided views."""
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    out_hw = tuple((xp.shape[d + 1] - kernel.shape[d]) // strides[d] + 1 for d in (0, 1))
    return _weighted_views(xp, kernel, out_hw, strides).astype(x.dtype)


def _depthwise_kernel_grad(xp, g, window, strides):
    """[kh·kw, C]: Σ_(n,h,w) view_(i,j)(xp) · g per offset, one offset at a time (a scan), so that
    at most one view is ever materialised (XLA would otherwise keep all k² of them)."""
    (n, ho, wo, c), (sh, sw) = g.shape, strides
    # Phase (a, b) holds xp[:, a::sh, b::sw]: offset (i, j) is then a unit-stride window of phase (i % sh, j % sw).
    hp, wp = -(-xp.shape[1] // sh) * sh, -(-xp.shape[2] // sw) * sw
    xp = jnp.pad(xp, ((0, 0), (0, hp - xp.shape[1]), (0, wp - xp.shape[2]), (0, 0)))
    phases = xp.reshape(n, hp // sh, sh, wp // sw, sw, c).transpose(2, 4, 0, 1, 3, 5)
    offsets = np.array(list(_window_offsets(window)))
    starts = np.stack([offsets[:, 0] % sh, offsets[:, 1] % sw, offsets[:, 0] // sh, offsets[:, 1] // sw], 1)

    def one_offset(_, start):
        a, b, i, j = start
        view = lax.dynamic_slice(phases, (a, b, 0, i, j, 0), (1, 1, n, ho, wo, c))[0, 0]
        return None, jnp.sum(view.astype(g.dtype) * g, (0, 1, 2))

    return lax.scan(one_offset, None, jnp.asarray(starts))[1]


def _depthwise_fwd(x, kernel, strides, padding):
    return _depthwise_by_views(x, kernel, strides, padding), (x, kernel)  # what a convolution keeps


def _depthwise_bwd(strides, padding, residuals, g):
    """dkernel: one reduction per offset. dx: the stride-1 views of g, dilated by the stride and
    padded, under the flipped kernel (the transposed convolution), which XLA fuses like the forward."""
    x, kernel = residuals
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    acc = jnp.promote_types(x.dtype, jnp.float32)
    g = g.astype(acc)
    dkernel = _depthwise_kernel_grad(xp, g, kernel.shape[:2], strides)
    # g dilated to (out - 1)·s + 1 rows; (k - 1 - lo) zeros before, so that row h meets g's rows (h + lo - i) / s.
    edges = [
        (k - 1 - lo, n - ((m - 1) * s + 1) + lo, s - 1)
        for k, (lo, _), n, m, s in zip(kernel.shape[:2], padding, x.shape[1:3], g.shape[1:3], strides)
    ]
    gp = lax.pad(g, jnp.zeros((), acc), ((0, 0, 0), *edges, (0, 0, 0)))
    dx = _weighted_views(gp, jnp.flip(kernel, (0, 1)), x.shape[1:3], (1, 1))
    return dx.astype(x.dtype), dkernel.reshape(kernel.shape).astype(kernel.dtype)


_depthwise_by_views.defvjp(_depthwise_fwd, _depthwise_bwd)


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    *,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
    **kwargs,
):
    """`lax.conv_general_dilated` for Flax's `nn.Conv(conv_general_dilated=...)`, with fast special cases.

    On CPU, for NHWC input without dilation: a 1×1 unpadded kernel becomes a strided slice and a
    channel matmul; a depthwise kernel (one input channel per group) becomes a weighted sum of
    strided views. Every other convolution, every convolution of a program for another platform
    than the CPU, and every one when GCP_JAX_CPU_FAST_PATHS=0 (gcp_jax.cpu_tuning), goes to
    `lax.conv_general_dilated` unchanged.
    """
    native = functools.partial(
        lax.conv_general_dilated,
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        precision=precision,
        **kwargs,
    )
    nhwc = dimension_numbers is not None and lax.conv_dimension_numbers(
        lhs.shape, rhs.shape, dimension_numbers
    ) == lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    unit = lambda d: d is None or all(v == 1 for v in d)
    plain = rhs.ndim != 4 or not nhwc or not unit(lhs_dilation) or not unit(rhs_dilation) or kwargs
    if plain or not cpu_tuning.fast_paths_enabled():
        return native(lhs, rhs)
    unpadded = isinstance(padding, str) or all(tuple(p) == (0, 0) for p in padding)  # a 1×1 window never pads
    if rhs.shape[:2] == (1, 1) and unpadded and feature_group_count == 1:
        sh, sw = window_strides
        return _channel_matmul(lhs[:, ::sh, ::sw], rhs[0, 0], precision)
    if rhs.shape[2] == 1 and feature_group_count == lhs.shape[3] == rhs.shape[3]:
        if isinstance(padding, str):
            padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
        pads = tuple(tuple(p) for p in padding)
        return _depthwise_by_views(lhs, rhs, tuple(window_strides), pads)
    return native(lhs, rhs)


# nn.Conv computing through conv_general_dilated above: same parameters, same results.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


def _reduce_max(x, window, strides, padding):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1), ((0, 0), *padding, (0, 0)))


def max_pool(x, window, strides, padding):
    """Max-pool NHWC `x` (padding: ((top, bottom), (left, right)), padded with -inf).

    Same values as `flax.linen.max_pool`. On CPU the gradient goes to the first maximum of each
    window in row-major order; other platforms keep XLA's select-and-scatter.
    """
    if cpu_tuning.fast_paths_enabled():
        return _max_pool_first_max(x, window, strides, padding)
    return _reduce_max(x, window, strides, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_first_max(x, window, strides, padding):
    return _reduce_max(x, window, strides, padding)


def _max_pool_fwd(x, window, strides, padding):
    y = _reduce_max(x, window, strides, padding)
    return y, (x, y)


def _max_pool_bwd(window, strides, padding, residuals, g):
    x, y = residuals
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=-jnp.inf)
    routed = jnp.zeros(y.shape, bool)
    dxp = jnp.zeros_like(xp)
    for offset in _window_offsets(window):
        first = (_strided_view(xp, offset, y.shape[1:3], strides) == y) & ~routed
        routed = routed | first
        dxp = dxp + _unview(jnp.where(first, g, 0).astype(x.dtype), offset, xp.shape[1:3], strides)
    (top, _), (left, _) = padding
    return (dxp[:, top : top + x.shape[1], left : left + x.shape[2]],)


_max_pool_first_max.defvjp(_max_pool_fwd, _max_pool_bwd)
