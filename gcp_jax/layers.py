"""Convolution and pooling pieces for the backbones and the GCP head, written so XLA:CPU runs them fast.

XLA's CPU backend differentiates a convolution's kernel by a convolution over batch-transposed
copies of the activations, and a max-pool through an index-packing select-and-gather; both cost
more than the arithmetic they do. Here 1×1 convolutions are matrix products whose kernel gradient
contracts batch and space directly, and the 3×3/2 max-pool routes its gradient with nine
strided compares. The results equal `lax.conv_general_dilated` and `nn.max_pool` (gradient to
the first maximum of each window, as PyTorch routes it) on every backend.
"""

from __future__ import annotations

import functools
import itertools

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


def conv_general_dilated(lhs, rhs, window_strides, padding, *, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """`lax.conv_general_dilated` for Flax's `nn.Conv(conv_general_dilated=...)`, 1×1 kernels as matrix products.

    A 1×1 kernel (no padding, dilation or groups) on NHWC input becomes a strided slice and a
    channel matmul; every other convolution goes to `lax.conv_general_dilated` unchanged.
    """
    nhwc = dimension_numbers is None or dimension_numbers == lax.conv_dimension_numbers(
        lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    unit = lambda d: d is None or all(v == 1 for v in d)
    unpadded = isinstance(padding, str) or all(tuple(p) == (0, 0) for p in padding)  # a 1×1 window never pads
    if (rhs.ndim == 4 and rhs.shape[:2] == (1, 1) and nhwc and unpadded and feature_group_count == 1
            and unit(lhs_dilation) and unit(rhs_dilation) and not kwargs):
        sh, sw = window_strides
        return _channel_matmul(lhs[:, ::sh, ::sw], rhs[0, 0], precision)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, precision=precision, **kwargs)


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
    (n, ho, wo, c), (sh, sw) = y.shape, strides
    routed = jnp.zeros(y.shape, bool)
    dxp = jnp.zeros_like(xp)
    for i, j in itertools.product(range(window[0]), range(window[1])):
        # Window offset (i, j) of every output position: a strided view of xp.
        last_i, last_j = i + sh * (ho - 1), j + sw * (wo - 1)
        tap = lax.slice(xp, (0, i, j, 0), (n, last_i + 1, last_j + 1, c), (1, sh, sw, 1))
        first = (tap == y) & ~routed
        routed = routed | first
        spread = ((0, 0, 0), (i, xp.shape[1] - last_i - 1, sh - 1), (j, xp.shape[2] - last_j - 1, sw - 1), (0, 0, 0))
        dxp = dxp + lax.pad(jnp.where(first, g, 0).astype(x.dtype), jnp.zeros((), x.dtype), spread)
    (top, _), (left, _) = padding
    return (dxp[:, top:top + x.shape[1], left:left + x.shape[2]],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
