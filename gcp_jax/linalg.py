"""Spectral layers of global covariance pooling, with hand-written gradients.

Pure functions on batched arrays (`[..., d, d]` symmetric PSD, or `[..., M, C]` features), safe
under `jit`, `vmap` and `grad`. The math is METHOD.md §2–§4:

* `sqrtm` / `seb` eigendecompose once and differentiate either by the exact Daleckii–Krein
  (Loewner) formula (the default: finite on ties, no 1/(λi − λj)) or by one of the papers'
  eigen-level gradients (`ordinary`, `pade`, `taylor`, `trunc`) or the Newton–Schulz VJP
  (`newton`), for ablations.
* Small eigenvalues are clamped to `eps`; the clamp is straight-through in every backward pass.
  Default eps: float64 uses machine epsilon (as the reference code); lower precisions use
  ε·λ_max per sample (the noise floor of `eigh`), so that rank-deficient covariances keep
  meaningful gradients.
* Everything is per sample: no statistic is taken across the batch.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gcp_jax import batched_eigh

HIGHEST = jax.lax.Precision.HIGHEST
SQRTM_GRADS = ("exact", "ordinary", "pade", "taylor", "trunc", "newton")
SEB_VARIANTS = ("code", "a", "b")
_K_GRADS = ("ordinary", "pade", "taylor", "trunc")


def _mm(a, b):
    return jnp.matmul(a, b, precision=HIGHEST)


def _t(a):
    return jnp.swapaxes(a, -1, -2)


def _sym(a):
    return 0.5 * (a + _t(a))


def _rebuild(u, values):
    """U diag(values) Uᵀ."""
    return _mm(u * values[..., None, :], _t(u))


def _check_square(a, name):
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"{name} expects square matrices [..., d, d], got shape {a.shape}.")
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise ValueError(f"{name} expects a floating-point array, got {a.dtype}.")


# ----------------------------------------------------------------------------------------------
# Covariance, vectorisation, Newton–Schulz


def covariance(x):
    """Centred covariance over the M positions: `[..., M, C]` → `[..., C, C]`, divided by M."""
    if x.ndim < 2:
        raise ValueError(f"covariance expects features [..., M, C], got shape {x.shape}.")
    xc = x - jnp.mean(x, axis=-2, keepdims=True)
    return jnp.einsum("...mc,...md->...cd", xc, xc, precision=HIGHEST) / x.shape[-2]


def triu_vec(m):
    """Upper triangle, row-major, diagonal included: `[..., d, d]` → `[..., d(d+1)/2]`."""
    _check_square(m, "triu_vec")
    rows, cols = np.triu_indices(m.shape[-1])
    return m[..., rows, cols]


def newton_schulz_sqrtm(a, *, iters=5):
    """iSQRT-COV: coupled Newton–Schulz square root with trace normalisation (METHOD §2b).

    Differentiated by autodiff through the unrolled iteration. Few iterations damp the
    directions of small eigenvalues; that is part of the method.
    """
    _check_square(a, "newton_schulz_sqrtm")
    if iters < 1:
        raise ValueError(f"newton_schulz_sqrtm needs iters >= 1, got {iters}.")
    trace = jnp.trace(a, axis1=-2, axis2=-1)[..., None, None]
    # Guard 0 traces with `where`, not `maximum`: the unused branch's NaN derivative is dropped.
    # The floor keeps trace² normal in float32, so that the backward pass never sees 0/0.
    floor = max(1e-20, float(np.sqrt(jnp.finfo(a.dtype).tiny)))
    trace = jnp.where(trace > floor, trace, floor)
    y = a / trace
    eye = jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=a.dtype), a.shape)
    z = eye
    for step in range(iters):
        t = 0.5 * (3.0 * eye - _mm(z, y))
        y, z = _mm(y, t), (_mm(t, z) if step < iters - 1 else z)
    return y * jnp.sqrt(trace)


# ----------------------------------------------------------------------------------------------
# Clamped eigendecomposition


def default_eps(eigenvalues):
    """Clamp floor per sample: ε₆₄ in float64; max(ε·λ_max, 1e-20) in lower precision."""
    dtype = eigenvalues.dtype
    if dtype == jnp.float64:
        return jnp.full(eigenvalues.shape[:-1] + (1,), np.finfo(np.float64).eps, dtype)
    floor = jnp.finfo(dtype).eps * jnp.max(eigenvalues, axis=-1, keepdims=True)
    return jax.lax.stop_gradient(jnp.maximum(floor, 1e-20))


def _clamped_eigh(a, eps, topn):
    """Eigendecomposition of sym(a) with λ̂ = max(λ, eps); the `topn` smallest set to eps."""
    lam, u = batched_eigh.eigh(_sym(a))  # jnp.linalg.eigh, safe on several CPU devices
    floor = default_eps(lam) if eps is None else jnp.asarray(eps, lam.dtype)
    lam_hat = jnp.maximum(lam, floor)
    if topn:
        lam_hat = jnp.where(jnp.arange(lam.shape[-1]) < topn, floor, lam_hat)
    return lam_hat, u


# ----------------------------------------------------------------------------------------------
# Scalar spectral functions and their divided differences (Loewner matrices)


class _Fn(NamedTuple):
    f: callable
    df: callable
    divided_difference: callable | None = None  # closed form of (f(x)−f(y))/(x−y), if any


_FUNCTIONS = {
    "sqrt": _Fn(jnp.sqrt, lambda x: 0.5 / jnp.sqrt(x), lambda x, y: 1.0 / (jnp.sqrt(x) + jnp.sqrt(y))),
    # √λ·e^{−λ}: the spectrum of Q·Sᵀ in SEB's variants a and b.
    "sqrt_exp": _Fn(lambda x: jnp.sqrt(x) * jnp.exp(-x), lambda x: jnp.exp(-x) * (0.5 / jnp.sqrt(x) - jnp.sqrt(x))),
    # λ·e^{−2λ}: its trace is c² = ‖Q·Sᵀ‖²_F in SEB.
    "x_exp2": _Fn(lambda x: x * jnp.exp(-2 * x), lambda x: (1 - 2 * x) * jnp.exp(-2 * x)),
}


def _loewner(fn, lam):
    """L_ij = (f(λi) − f(λj))/(λi − λj), f′ on the diagonal and at near-ties (midpoint)."""
    li, lj = lam[..., :, None], lam[..., None, :]
    if fn.divided_difference is not None:
        return fn.divided_difference(li, lj)
    gap = li - lj
    near_tie = jnp.abs(gap) <= jnp.sqrt(jnp.finfo(lam.dtype).eps) * jnp.maximum(jnp.abs(li), jnp.abs(lj))
    safe_gap = jnp.where(near_tie, 1.0, gap)
    return jnp.where(near_tie, fn.df(0.5 * (li + lj)), (fn.f(li) - fn.f(lj)) / safe_gap)


# ----------------------------------------------------------------------------------------------
# Exact gradient: matrices U f(Λ̂) Uᵀ and scalars Σ h(λ̂) from one eigendecomposition


class _Exact(NamedTuple):
    matrices: tuple  # names in _FUNCTIONS, each giving U f(Λ̂) Uᵀ
    scalars: tuple  # names in _FUNCTIONS, each giving Σ_i h(λ̂_i)
    eps: float | None
    topn: int


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _spectral_exact(a, spec):
    return _spectral_exact_fwd(a, spec)[0]


def _spectral_exact_fwd(a, spec):
    lam, u = _clamped_eigh(a, spec.eps, spec.topn)
    mats = tuple(_rebuild(u, _FUNCTIONS[name].f(lam)) for name in spec.matrices)
    scalars = tuple(jnp.sum(_FUNCTIONS[name].f(lam), axis=-1) for name in spec.scalars)
    return (mats, scalars), (lam, u)


def _spectral_exact_bwd(spec, residuals, cotangents):
    """∂L/∂Σ = U (Σ_k L_k ∘ Uᵀ sym(G_k) U + diag(Σ_j g_j h_j′(λ̂))) Uᵀ."""
    lam, u = residuals
    g_mats, g_scalars = cotangents
    diagonal = jnp.zeros_like(lam)
    for name, g in zip(spec.scalars, g_scalars):
        diagonal = diagonal + g[..., None] * _FUNCTIONS[name].df(lam)
    loewners = [_loewner(_FUNCTIONS[name], lam) for name in spec.matrices]
    return (_loewner_vjp(u, loewners, g_mats, diagonal),)


def _loewner_vjp(u, loewners, cotangents, diagonal):
    """U (Σ_k L_k ∘ Uᵀ sym(G_k) U + diag(diagonal)) Uᵀ: the VJP of matrices U f_k(Λ) Uᵀ."""
    inner = diagonal[..., None] * jnp.eye(u.shape[-1], dtype=u.dtype)
    for loewner, g in zip(loewners, cotangents):
        inner = inner + loewner * _mm(_t(u), _mm(_sym(g), u))
    return _mm(u, _mm(inner, _t(u)))


_spectral_exact.defvjp(_spectral_exact_fwd, _spectral_exact_bwd)


# ----------------------------------------------------------------------------------------------
# The papers' eigen-level gradients: ∂L/∂Σ = U (Kᵀ ∘ (Uᵀ G_U) + diag(g_λ)) Uᵀ


class _Eigen(NamedTuple):
    grad: str  # one of _K_GRADS
    eps: float | None
    topn: int
    taylor_degree: int
    trunc_threshold: float


@functools.cache
def pade_coefficients():
    """[50/50] Padé approximant of the degree-100 Taylor series of 1/(1−x), as SVD-Padé builds it.

    mpmath at 20 digits, numerical Taylor coefficients (exact ones make the system singular:
    1/(1−x) is itself rational). Returns (p, q) in ascending powers, float64.
    """
    import mpmath

    with mpmath.workdps(20):
        series = mpmath.taylor(lambda x: 1 / (1 - x), 0, 100)
        p, q = mpmath.pade(series, 50, 50)
    return np.array([float(c) for c in p]), np.array([float(c) for c in q])


def _polyval_ascending(coefficients, x):
    out = jnp.zeros_like(x)
    for c in coefficients[::-1]:
        out = out * x + float(c)  # weakly typed: keeps the dtype of x
    return out


def _replace_inf(x):
    """Per sample: +∞ → largest finite entry, −∞ → smallest (the reference's overflow fix)."""
    finite = jnp.isfinite(x)
    largest = jnp.max(jnp.where(finite, x, -jnp.inf), axis=(-2, -1), keepdims=True)
    smallest = jnp.min(jnp.where(finite, x, jnp.inf), axis=(-2, -1), keepdims=True)
    return jnp.where(x == jnp.inf, largest, jnp.where(x == -jnp.inf, smallest, x))


def _k_matrix(spec, lam):
    """K_ij ≈ 1/(λ̂i − λ̂j), K_ii = 0, by the chosen approximation (METHOD §3)."""
    li, lj = lam[..., :, None], lam[..., None, :]
    off_diagonal = ~jnp.eye(lam.shape[-1], dtype=bool)
    if spec.grad in ("ordinary", "trunc"):
        k = jnp.where(off_diagonal, 1.0 / (li - lj), 0.0)
        if spec.grad == "trunc":
            return jnp.clip(k, -spec.trunc_threshold, spec.trunc_threshold)
        return _replace_inf(k)
    # 1/(λi − λj) = c/(1 − x) with x = min/max ∈ (0, 1] and c = ±1/max.
    x = jnp.minimum(li, lj) / jnp.maximum(li, lj)
    c = jnp.where(li >= lj, 1.0 / li, -1.0 / lj)
    if spec.grad == "taylor":
        return jnp.where(off_diagonal, c * _polyval_ascending(np.ones(spec.taylor_degree + 1), x), 0.0)
    p, q = pade_coefficients()
    return _replace_inf(jnp.where(off_diagonal, c * _polyval_ascending(p, x) / _polyval_ascending(q, x), 0.0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _eigh_eigen_grad(a, spec):
    return _clamped_eigh(a, spec.eps, spec.topn)


def _eigh_eigen_grad_fwd(a, spec):
    lam, u = _clamped_eigh(a, spec.eps, spec.topn)
    return (lam, u), (lam, u)


def _eigh_eigen_grad_bwd(spec, residuals, cotangents):
    lam, u = residuals
    g_lam, g_u = cotangents
    inner = _k_matrix(spec, lam).swapaxes(-1, -2) * _mm(_t(u), g_u)
    inner = inner + g_lam[..., None] * jnp.eye(lam.shape[-1], dtype=lam.dtype)
    if spec.grad != "trunc":
        inner = _replace_inf(inner)
    grad = _mm(u, _mm(inner, _t(u)))
    if spec.grad != "trunc":
        grad = _replace_inf(grad)
    return (_sym(grad),)


_eigh_eigen_grad.defvjp(_eigh_eigen_grad_fwd, _eigh_eigen_grad_bwd)


# ----------------------------------------------------------------------------------------------
# SVD-Newton: eigen forward, Newton–Schulz backward


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _sqrtm_newton_grad(a, eps, topn, iters):
    lam, u = _clamped_eigh(a, eps, topn)
    return _rebuild(u, jnp.sqrt(lam))


def _sqrtm_newton_grad_fwd(a, eps, topn, iters):
    return _sqrtm_newton_grad(a, eps, topn, iters), a


def _sqrtm_newton_grad_bwd(eps, topn, iters, a, g):
    _, vjp = jax.vjp(functools.partial(newton_schulz_sqrtm, iters=iters), _sym(a))
    return (_sym(vjp(g)[0]),)


_sqrtm_newton_grad.defvjp(_sqrtm_newton_grad_fwd, _sqrtm_newton_grad_bwd)


# ----------------------------------------------------------------------------------------------
# Dispatch and public functions


def _spectral(a, matrices, scalars, grad, eps, topn, opts):
    """U f(Λ̂) Uᵀ for each name in `matrices` and Σ h(λ̂) for each in `scalars`, with `grad`."""
    if grad == "exact":
        return _spectral_exact(a, _Exact(tuple(matrices), tuple(scalars), eps, topn))
    if grad in _K_GRADS:
        spec = _Eigen(grad, eps, topn, int(opts.get("taylor_degree", 100)), float(opts.get("trunc_threshold", 1e10)))
        lam, u = _eigh_eigen_grad(a, spec)
        mats = tuple(_rebuild(u, _FUNCTIONS[name].f(lam)) for name in matrices)
        return mats, tuple(jnp.sum(_FUNCTIONS[name].f(lam), axis=-1) for name in scalars)
    # newton: only the square root takes the Newton–Schulz gradient; other parts are exact.
    iters = int(opts.get("newton_iters", 10))
    others = tuple(name for name in matrices if name != "sqrt")
    other_mats, sums = _spectral_exact(a, _Exact(others, tuple(scalars), eps, topn))
    by_name = dict(zip(others, other_mats))
    if "sqrt" in matrices:
        by_name["sqrt"] = _sqrtm_newton_grad(a, eps, topn, iters)
    return tuple(by_name[name] for name in matrices), sums


_OPTS = ("taylor_degree", "trunc_threshold", "newton_iters", "topn")


def _validate(a, name, grad, opts):
    _check_square(a, name)
    if grad not in SQRTM_GRADS:
        raise ValueError(f"{name}: unknown grad {grad!r}; choose one of {', '.join(SQRTM_GRADS)}.")
    unknown = set(opts) - set(_OPTS)
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {sorted(unknown)}; known: {', '.join(_OPTS)}.")
    topn = int(opts.get("topn", 0))
    if not 0 <= topn <= a.shape[-1]:
        raise ValueError(f"{name}: topn={topn} must lie in [0, d={a.shape[-1]}].")
    return topn


def sqrtm(a, *, grad="exact", eps=None, **opts):
    """Matrix square root of symmetric PSD `a` ([..., d, d]) by `eigh`, λ clamped at `eps`.

    grad: "exact" (Daleckii–Krein, default), or the papers' variants "ordinary", "pade",
    "taylor" (opt `taylor_degree`, 100), "trunc" (opt `trunc_threshold`, 1e10), "newton"
    (opt `newton_iters`, 10). Opt `topn`: the n smallest eigenvalues set to eps (SVD-TopN).
    eps: None for the default floor (see `default_eps`); a number is an absolute floor.
    """
    topn = _validate(a, "sqrtm", grad, opts)
    (root,), _ = _spectral(a, ("sqrt",), (), grad, eps, topn, opts)
    return root


def _safe_sqrt(x):
    """√x with gradient 0 (its limit in SEB) instead of ∞ where x = 0."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _unit_frobenius(a):
    """a / max(‖a‖_F, 1e-12) per matrix (PyTorch's F.normalize over the flattened matrix)."""
    norm = jnp.sqrt(jnp.sum(a * a, axis=(-2, -1), keepdims=True))
    return a / jnp.maximum(norm, 1e-12)


def seb(a, *, grad="exact", variant="code", eps=None, **opts):
    """Scaling Eigen Branch output for symmetric PSD `a` ([..., d, d]), METHOD §2c.

    variant "code" (default, the released code): Z = (1 + c)·Σ^{1/2}, c = ‖Q Sᵀ‖_F with
    Q = Σ^{1/2}, S = e^{−Σ}; the spectrum is unchanged, SEB acts through the gradient.
    "a": Z = Q + Q ∘ (QSᵀ/‖QSᵀ‖_F). "b": Z = Q + QSᵀ/‖QSᵀ‖_F.
    grad and opts as in `sqrtm` (they choose the square root's gradient).
    """
    topn = _validate(a, "seb", grad, opts)
    if variant not in SEB_VARIANTS:
        raise ValueError(f"seb: unknown variant {variant!r}; choose one of {', '.join(SEB_VARIANTS)}.")
    if variant == "code":
        (root,), (c_squared,) = _spectral(a, ("sqrt",), ("x_exp2",), grad, eps, topn, opts)
        return (1.0 + _safe_sqrt(c_squared))[..., None, None] * root
    (root, branch), _ = _spectral(a, ("sqrt", "sqrt_exp"), (), grad, eps, topn, opts)
    if variant == "a":
        return root + root * _unit_frobenius(branch)
    return root + _unit_frobenius(branch)


def seb_scale(a, *, eps=None):
    """1 + c, the factor of the released SEB (c = ‖Q Sᵀ‖_F = (Σ λ̂ e^{−2λ̂})^{1/2}), exact gradient."""
    _check_square(a, "seb_scale")
    _, (c_squared,) = _spectral(a, (), ("x_exp2",), "exact", eps, 0, {})
    return 1.0 + _safe_sqrt(c_squared)


def eigenvalues(a):
    """Ascending eigenvalues of sym(a), without clamping (for analysis; no custom gradient)."""
    _check_square(a, "eigenvalues")
    return batched_eigh.eigh(_sym(a))[0]


# ----------------------------------------------------------------------------------------------
# The square root split by eigenvalue rank (analysis, METHOD §5)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _sqrtm_split(a, rank, eps):
    return _sqrtm_split_fwd(a, rank, eps)[0]


def _large_mask(lam, rank):
    return (jnp.arange(lam.shape[-1]) >= lam.shape[-1] - rank).astype(lam.dtype)


def _sqrtm_split_fwd(a, rank, eps):
    lam, u = _clamped_eigh(a, eps, 0)
    large = _large_mask(lam, rank)
    root = jnp.sqrt(lam)
    return (_rebuild(u, root * large), _rebuild(u, root * (1 - large))), (lam, u)


def _sqrtm_split_bwd(rank, eps, residuals, cotangents):
    """Loewner matrices of f = 1_large·√λ and 1_small·√λ: 1/(√λi + √λj) within a part,
    ±√λ/(λi − λj) across the split (the gap guarded at the noise floor)."""
    lam, u = residuals
    large = _large_mask(lam, rank)
    li, lj = lam[..., :, None], lam[..., None, :]
    within = 1.0 / (jnp.sqrt(li) + jnp.sqrt(lj))
    floor = jnp.finfo(lam.dtype).eps * jnp.max(lam, axis=-1)[..., None, None]
    gap = jnp.where(li >= lj, jnp.maximum(li - lj, floor), jnp.minimum(li - lj, -floor))
    mi, mj = large[..., :, None], large[..., None, :]
    across = mi * (1 - mj) + mj * (1 - mi)
    loewner_large = mi * mj * within + across * jnp.where(mi > 0, jnp.sqrt(li), -jnp.sqrt(lj)) / gap
    loewner_small = (1 - mi) * (1 - mj) * within + across * jnp.where(mi > 0, -jnp.sqrt(lj), jnp.sqrt(li)) / gap
    return (_loewner_vjp(u, (loewner_large, loewner_small), cotangents, jnp.zeros_like(lam)),)


_sqrtm_split.defvjp(_sqrtm_split_fwd, _sqrtm_split_bwd)


def sqrtm_split(a, rank, *, eps=None):
    """(Q_large, Q_small): Σ^{1/2} rebuilt from the `rank` largest eigenvalues and from the rest.

    Q_large + Q_small = sqrtm(a). Exact (Loewner) gradient for both parts; used by the
    attribution maps to ask which part of the spectrum explains a class score.
    """
    _check_square(a, "sqrtm_split")
    if not 0 <= rank <= a.shape[-1]:
        raise ValueError(f"sqrtm_split: rank={rank} must lie in [0, d={a.shape[-1]}].")
    return _sqrtm_split(a, int(rank), eps)
