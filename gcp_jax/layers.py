"""Convolution and pooling pieces for the backbones and the GCP head, written so XLA:CPU runs them fast.

XLA's CPU backend differentiates a convolution's kernel by a convolution over batch-transposed
copies of the activations, runs depthwise convolutions at a fraction of memory speed, and
differentiates a max-pool through an index-packing select-and-gather; each costs far more than
the arithmetic it does. Here 1×1 convolutions are matrix products whose kernel gradient
contracts batch and space directly; depthwise convolutions are, on CPU, sums of k² strided
views times their weights (one fused loop each way; other platforms keep their native
kernels); the max-pool routes its gradient with strided compares. Values equal
`lax.conv_general_dilated` and `nn.max_pool` (gradient to the first maximum of each window, as
PyTorch routes it).
"""

from __future__ import annotations

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


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
    dkernel = lax.dot_general(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]), (((0,), (0,)), ((), ())),
                              precision=precision)
    return dx, dkernel


_channel_matmul.defvjp(_channel_matmul_fwd, _channel_matmul_bwd)


def _strided_view(xp, offset, out_hw, strides):
    """xp[:, i + s·h, j + s·w, :] for h, w < out_hw: the input that window offset (i, j) meets at each output."""
    (i, j), (ho, wo), (sh, sw) = offset, out_hw, strides
    return lax.slice(xp, (0, i, j, 0), (xp.shape[0], i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, xp.shape[3]),
                     (1, sh, sw, 1))


def _depthwise_by_views(x, kernel, strides, padding):
    """Depthwise NHWC convolution (kernel [kh, kw, 1, C]) as Σ_(i,j) view_(i,j)(x) · kernel[i, j]."""
    kh, kw = kernel.shape[:2]
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(x.shape[1:3], (kh, kw), strides, padding)
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    out_hw = ((xp.shape[1] - kh) // strides[0] + 1, (xp.shape[2] - kw) // strides[1] + 1)
    return sum(_strided_view(xp, (i, j), out_hw, strides) * kernel[i, j, 0]
               for i, j in itertools.product(range(kh), range(kw)))


def conv_general_dilated(lhs, rhs, window_strides, padding, *, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """`lax.conv_general_dilated` for Flax's `nn.Conv(conv_general_dilated=...)`, with fast special cases.

    On NHWC input without dilation: a 1×1 unpadded kernel becomes a strided slice and a channel
    matmul; a depthwise kernel (one input channel per group) becomes, on CPU, a weighted sum of
    strided views. Every other convolution goes to `lax.conv_general_dilated` unchanged.
    """
    native = functools.partial(lax.conv_general_dilated, window_strides=window_strides, padding=padding,
                               lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                               dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                               precision=precision, **kwargs)
    nhwc = dimension_numbers is None or dimension_numbers == lax.conv_dimension_numbers(
        lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    unit = lambda d: d is None or all(v == 1 for v in d)
    if rhs.ndim != 4 or not nhwc or not unit(lhs_dilation) or not unit(rhs_dilation) or kwargs:
        return native(lhs, rhs)
    unpadded = isinstance(padding, str) or all(tuple(p) == (0, 0) for p in padding)  # a 1×1 window never pads
    if rhs.shape[:2] == (1, 1) and unpadded and feature_group_count == 1:
        sh, sw = window_strides
        return _channel_matmul(lhs[:, ::sh, ::sw], rhs[0, 0], precision)
    if rhs.shape[2] == 1 and feature_group_count == lhs.shape[3] == rhs.shape[3]:
        by_views = functools.partial(_depthwise_by_views, strides=tuple(window_strides), padding=padding)
        return lax.platform_dependent(lhs, rhs, cpu=by_views, default=native)
    return native(lhs, rhs)


# nn.Conv computing through conv_general_dilated above: same parameters, same results.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x, window, strides, padding):
    """Max-pool NHWC `x` (padding: ((top, bottom), (left, right)), padded with -inf).

    Same values as `flax.linen.max_pool`; the gradient goes to the first maximum of each window
    in row-major order.
    """
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1), ((0, 0), *padding, (0, 0)))


def _max_pool_fwd(x, window, strides, padding):
    y = max_pool(x, window, strides, padding)
    return y, (x, y)


def _max_pool_bwd(window, strides, padding, residuals, g):
    x, y = residuals
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=-jnp.inf)
    (sh, sw), out_hw = strides, y.shape[1:3]
    routed = jnp.zeros(y.shape, bool)
    dxp = jnp.zeros_like(xp)
    for i, j in itertools.product(range(window[0]), range(window[1])):
        first = (_strided_view(xp, (i, j), out_hw, strides) == y) & ~routed
        routed = routed | first
        last_i, last_j = i + sh * (out_hw[0] - 1), j + sw * (out_hw[1] - 1)
        spread = ((0, 0, 0), (i, xp.shape[1] - last_i - 1, sh - 1), (j, xp.shape[2] - last_j - 1, sw - 1), (0, 0, 0))
        dxp = dxp + lax.pad(jnp.where(first, g, 0).astype(x.dtype), jnp.zeros((), x.dtype), spread)
    (top, _), (left, _) = padding
    return (dxp[:, top:top + x.shape[1], left:left + x.shape[2]],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
