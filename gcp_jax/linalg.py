"""Spectral layers of global covariance pooling, with hand-written gradients.

Pure functions on batched arrays (`[..., d, d]` symmetric PSD, or `[..., M, C]` features), safe
under `jit`, `vmap` and `grad`. The math is docs/method.md §2–§4:

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

import dataclasses
import functools
import numbers
import os
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gcp_jax import batched_eigh, checks

HIGHEST = jax.lax.Precision.HIGHEST
NORMS = ("sqrt", "seb", "isqrt", "none")
SQRTM_GRADS = ("exact", "ordinary", "pade", "taylor", "trunc", "newton")
SEB_VARIANTS = ("code", "a", "b")
SPECTRAL_DTYPES = ("float32", "float64")
_K_GRADS = ("ordinary", "pade", "taylor", "trunc")
_GRAD_FIELDS = ("grad", "eps", "topn", "taylor_degree", "trunc_threshold", "newton_iters")


@dataclasses.dataclass(frozen=True)
class SpectralOptions:
    """The matrix normalisation of covariances and how it is differentiated; `normalize` applies it.

    The single source of these defaults: `gcp_jax.config` documents each field (as config.gcp.*),
    `GCPHead` holds one, and the public functions below take the fields as keyword options.
    Validated once, when made; hashable, so it can be a static Flax field and a custom-VJP argument.
    """

    norm: str = "seb"
    grad: str = "exact"
    seb_variant: str = "code"
    eps: float | None = None
    topn: int = 0
    isqrt_iters: int = 5
    newton_iters: int = 10
    taylor_degree: int = 100
    trunc_threshold: float = 1e10
    dtype: str = "float32"

    def __post_init__(self):
        if not isinstance(self.dtype, str):  # a jnp/numpy dtype: keep its name, so the options stay hashable
            object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)
        checks.raise_if_any(spectral_problems(dataclasses.asdict(self)), "SpectralOptions")

    @classmethod
    def from_mapping(cls, fields: Mapping, where: str = "SpectralOptions") -> SpectralOptions:
        """Options from a mapping of field values (e.g. config.gcp without `dim`); every problem in one error."""
        checks.raise_if_any(spectral_problems(fields), where)
        return cls(**fields)


def spectral_problems(fields: Mapping, *, also_known: tuple[str, ...] = ()) -> list[str]:
    """Every problem with these SpectralOptions field values (absent fields take their defaults).

    A name that is no field is a problem too; `also_known` are names the caller handles itself,
    offered as corrections but not reported.
    """
    known = [f.name for f in dataclasses.fields(SpectralOptions)]
    problems = checks.unknown_fields(set(fields) - set(also_known), known + list(also_known))
    get = lambda name: fields.get(name, getattr(SpectralOptions, name))
    dtype = get("dtype")
    fields = {**fields, "dtype": dtype if isinstance(dtype, str) else getattr(jnp.dtype(dtype), "name", dtype)}
    for name, choices in (
        ("norm", NORMS),
        ("grad", SQRTM_GRADS),
        ("seb_variant", SEB_VARIANTS),
        ("dtype", SPECTRAL_DTYPES),
    ):
        if get(name) not in choices:
            problems.append(checks.not_one_of(name, get(name), choices))
    eps = get("eps")
    if eps is not None and not (isinstance(eps, numbers.Real) and eps > 0):
        problems.append(f"eps={eps!r} must be positive, or None for the default floor (ε·λ_max per sample).")
    for name, low in (("topn", 0), ("isqrt_iters", 1), ("newton_iters", 1), ("taylor_degree", 0)):
        problems += checks.integer_at_least(name, get(name), low)
    threshold = get("trunc_threshold")
    if not (isinstance(threshold, numbers.Real) and threshold > 0):
        problems.append(f"trunc_threshold={threshold!r} must be positive.")
    return problems


def _mm(a, b):
    return jnp.matmul(a, b, precision=HIGHEST)


def _t(a):
    return jnp.swapaxes(a, -1, -2)


def _sym(a):
    return 0.5 * (a + _t(a))


def _rebuild(u, values):
    """U diag(values) Uᵀ."""
    return _mm(u * values[..., None, :], _t(u))


def _as_array(a, name, what):
    """`a` as a floating-point JAX array (or tracer), or a one-sentence error naming `name`."""
    try:
        a = jnp.asarray(a)
    except TypeError:
        raise TypeError(f"{name} expects {what}, got a {type(a).__name__}.") from None
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise ValueError(f"{name} expects a floating-point array of {what}, got {a.dtype}.")
    return a


def _as_square(a, name):
    """`a` as a batch of non-empty square matrices [..., d, d]."""
    a = _as_array(a, name, "square matrices [..., d, d]")
    if a.ndim < 2 or a.shape[-1] != a.shape[-2] or a.shape[-1] == 0:
        raise ValueError(f"{name} expects non-empty square matrices [..., d, d], got shape {a.shape}.")
    return a


# ----------------------------------------------------------------------------------------------
# Covariance, vectorisation, Newton–Schulz


def covariance(x):
    """Centred covariance over the M positions: `[..., M, C]` → `[..., C, C]`, divided by M."""
    x = _as_array(x, "covariance", "features [..., M, C]")
    if x.ndim < 2 or 0 in x.shape[-2:]:
        raise ValueError(f"covariance expects non-empty features [..., M, C], got shape {x.shape}.")
    xc = x - jnp.mean(x, axis=-2, keepdims=True)
    return jnp.einsum("...mc,...md->...cd", xc, xc, precision=HIGHEST) / x.shape[-2]


def triu_vec(m):
    """Upper triangle, row-major, diagonal included: `[..., d, d]` → `[..., d(d+1)/2]`."""
    m = _as_square(m, "triu_vec")
    rows, cols = np.triu_indices(m.shape[-1])
    return m[..., rows, cols]


def newton_schulz_sqrtm(a, *, iters=SpectralOptions.isqrt_iters):
    """iSQRT-COV: coupled Newton–Schulz square root with trace normalisation (docs/method.md §2b).

    Differentiated by autodiff through the unrolled iteration. Few iterations damp the
    directions of small eigenvalues; that is part of the method.
    """
    a = _as_square(a, "newton_schulz_sqrtm")
    checks.raise_if_any(checks.integer_at_least("iters", iters, 1), "newton_schulz_sqrtm")
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


def clamp_eigenvalues(lam, eps=None):
    """λ̂ = max(λ, eps) for eigenvalues [..., d]; eps None is the per-sample `default_eps`."""
    floor = default_eps(lam) if eps is None else jnp.asarray(eps, lam.dtype)
    return jnp.maximum(lam, floor)


def _clamped_eigh(a, eps, topn):
    """Eigendecomposition of sym(a) with λ̂ = max(λ, eps); the `topn` smallest set to eps."""
    lam, u = batched_eigh.eigh(_sym(a))  # jnp.linalg.eigh, safe on several CPU devices
    lam_hat = clamp_eigenvalues(lam, eps)
    if topn:
        floor = default_eps(lam) if eps is None else jnp.asarray(eps, lam.dtype)
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
    options: SpectralOptions  # eps and topn


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _spectral_exact(a, spec):
    return _spectral_exact_fwd(a, spec)[0]


def _spectral_exact_fwd(a, spec):
    lam, u = _clamped_eigh(a, spec.options.eps, spec.options.topn)
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


def _k_matrix(options, lam):
    """K_ij ≈ 1/(λ̂i − λ̂j), K_ii = 0, by the approximation options.grad names (docs/method.md §3)."""
    li, lj = lam[..., :, None], lam[..., None, :]
    off_diagonal = ~jnp.eye(lam.shape[-1], dtype=bool)
    if options.grad in ("ordinary", "trunc"):
        k = jnp.where(off_diagonal, 1.0 / (li - lj), 0.0)
        if options.grad == "trunc":
            return jnp.clip(k, -options.trunc_threshold, options.trunc_threshold)
        return _replace_inf(k)
    # 1/(λi − λj) = c/(1 − x) with x = min/max ∈ (0, 1] and c = ±1/max.
    x = jnp.minimum(li, lj) / jnp.maximum(li, lj)
    c = jnp.where(li >= lj, 1.0 / li, -1.0 / lj)
    if options.grad == "taylor":
        return jnp.where(off_diagonal, c * _polyval_ascending(np.ones(options.taylor_degree + 1), x), 0.0)
    p, q = pade_coefficients()
    return _replace_inf(jnp.where(off_diagonal, c * _polyval_ascending(p, x) / _polyval_ascending(q, x), 0.0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _eigh_eigen_grad(a, options):
    return _clamped_eigh(a, options.eps, options.topn)


def _eigh_eigen_grad_fwd(a, options):
    lam, u = _clamped_eigh(a, options.eps, options.topn)
    return (lam, u), (lam, u)


def _eigh_eigen_grad_bwd(options, residuals, cotangents):
    lam, u = residuals
    g_lam, g_u = cotangents
    inner = _k_matrix(options, lam).swapaxes(-1, -2) * _mm(_t(u), g_u)
    inner = inner + g_lam[..., None] * jnp.eye(lam.shape[-1], dtype=lam.dtype)
    if options.grad != "trunc":
        inner = _replace_inf(inner)
    grad = _mm(u, _mm(inner, _t(u)))
    if options.grad != "trunc":
        grad = _replace_inf(grad)
    return (_sym(grad),)


_eigh_eigen_grad.defvjp(_eigh_eigen_grad_fwd, _eigh_eigen_grad_bwd)


# ----------------------------------------------------------------------------------------------
# SVD-Newton: eigen forward, Newton–Schulz backward


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _sqrtm_newton_grad(a, options):
    lam, u = _clamped_eigh(a, options.eps, options.topn)
    return _rebuild(u, jnp.sqrt(lam))


def _sqrtm_newton_grad_fwd(a, options):
    return _sqrtm_newton_grad(a, options), a


def _sqrtm_newton_grad_bwd(options, a, g):
    _, vjp = jax.vjp(functools.partial(newton_schulz_sqrtm, iters=options.newton_iters), _sym(a))
    return (_sym(vjp(g)[0]),)


_sqrtm_newton_grad.defvjp(_sqrtm_newton_grad_fwd, _sqrtm_newton_grad_bwd)


# ----------------------------------------------------------------------------------------------
# Dispatch and public functions


def _spectral(a, matrices, scalars, options):
    """U f(Λ̂) Uᵀ for each name in `matrices` and Σ h(λ̂) for each in `scalars`, with options.grad."""
    if options.grad == "exact":
        return _spectral_exact(a, _Exact(tuple(matrices), tuple(scalars), options))
    if options.grad in _K_GRADS:
        lam, u = _eigh_eigen_grad(a, options)
        mats = tuple(_rebuild(u, _FUNCTIONS[name].f(lam)) for name in matrices)
        return mats, tuple(jnp.sum(_FUNCTIONS[name].f(lam), axis=-1) for name in scalars)
    # newton: only the square root takes the Newton–Schulz gradient; other parts are exact.
    others = tuple(name for name in matrices if name != "sqrt")
    other_mats, sums = _spectral_exact(a, _Exact(others, tuple(scalars), options))
    by_name = dict(zip(others, other_mats))
    if "sqrt" in matrices:
        by_name["sqrt"] = _sqrtm_newton_grad(a, options)
    return tuple(by_name[name] for name in matrices), sums


def _safe_sqrt(x):
    """√x with gradient 0 (its limit in SEB) instead of ∞ where x = 0."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _unit_frobenius(a):
    """a / max(‖a‖_F, 1e-12) per matrix (PyTorch's F.normalize over the flattened matrix)."""
    norm = jnp.sqrt(jnp.sum(a * a, axis=(-2, -1), keepdims=True))
    return a / jnp.maximum(norm, 1e-12)


def _seb(a, options):
    """SEB of `options.seb_variant` (see `seb`)."""
    if options.seb_variant == "code":
        (root,), (c_squared,) = _spectral(a, ("sqrt",), ("x_exp2",), options)
        return (1.0 + _safe_sqrt(c_squared))[..., None, None] * root
    (root, branch), _ = _spectral(a, ("sqrt", "sqrt_exp"), (), options)
    if options.seb_variant == "a":
        return root + root * _unit_frobenius(branch)
    return root + _unit_frobenius(branch)


def normalize(cov, options: SpectralOptions):
    """N(Σ) of covariances [..., d, d] as `options` say (norm: sqrt, seb, isqrt or none), in cov's dtype.

    `options` were validated when made; only their fit to the matrices (topn ≤ d) is checked here.
    """
    if options.topn > cov.shape[-1]:
        raise ValueError(f"topn={options.topn} must lie in [0, d={cov.shape[-1]}].")
    if options.norm in ("sqrt", "seb") and _checking_inputs():
        _check_input(cov, "sqrtm" if options.norm == "sqrt" else "seb")
    if options.norm == "sqrt":
        (root,), _ = _spectral(cov, ("sqrt",), (), options)
        return root
    if options.norm == "seb":
        return _seb(cov, options)
    if options.norm == "isqrt":
        return newton_schulz_sqrtm(cov, iters=options.isqrt_iters)
    return cov


def _checking_inputs() -> bool:
    """Whether `sqrtm`, `seb` and `normalize` check their input (GCP_JAX_CHECK_INPUTS=1).

    Read when a function is traced: set it before the first call; what JAX has already traced and
    cached keeps the check, or its absence.
    """
    return os.environ.get("GCP_JAX_CHECK_INPUTS", "0") not in ("", "0")


def _check_input(a, name):
    """Makes the computation raise when a matrix of `a` is not finite, not symmetric or clearly indefinite.

    `sqrtm` and `seb` silently use ½(A + Aᵀ) and clamp negative eigenvalues, which can hide a
    wrong covariance. This opt-in check (one more `eigvalsh` and a device-to-host callback per
    call) names the first bad matrix instead; it works under jit, vmap and grad (under jit the
    sentence is the last line of the JaxRuntimeError). Tolerance √ε of the dtype, relative:
    ‖A − Aᵀ‖_F/‖A‖_F, and λ_min against max|λ|.
    """
    a = jax.lax.stop_gradient(a)
    tiny = jnp.finfo(a.dtype).tiny
    finite = jnp.all(jnp.isfinite(a), axis=(-2, -1))
    a = jnp.where(finite[..., None, None], a, 0)
    norm = jnp.sqrt(jnp.sum(a * a, axis=(-2, -1)))
    asymmetry = jnp.sqrt(jnp.sum((a - _t(a)) ** 2, axis=(-2, -1))) / jnp.maximum(norm, tiny)
    lam = batched_eigh.eigh(_sym(a))[0]
    negativity = -lam[..., 0] / jnp.maximum(jnp.max(jnp.abs(lam), axis=-1), tiny)
    tolerance = float(np.sqrt(jnp.finfo(a.dtype).eps))
    jax.debug.callback(functools.partial(_raise_bad_input, name, tolerance), finite, asymmetry, negativity)


def _raise_bad_input(name, tolerance, finite, asymmetry, negativity):
    """`_check_input`'s callback, on the host: a ValueError naming the first bad matrix, if any."""
    finite, asymmetry, negativity = np.asarray(finite), np.asarray(asymmetry), np.asarray(negativity)
    for bad, what in (
        (~finite, "has NaN or infinite entries"),
        (asymmetry > tolerance, "is not symmetric (‖A − Aᵀ‖/‖A‖ = {a:.1e} > {t:.1e}; {name} would use ½(A + Aᵀ))"),
        (
            negativity > tolerance,
            "is indefinite (λ_min = −{n:.1e}·max|λ|; {name} would clamp its negative eigenvalues)",
        ),
    ):
        if bad.any():
            i = tuple(int(k) for k in np.argwhere(bad)[0])
            what = what.format(a=asymmetry[i], n=negativity[i], t=tolerance, name=name)
            where = f" at batch index {i}" if i else ""
            raise ValueError(f"{name}: the input matrix{where} {what}; fix the input, or unset GCP_JAX_CHECK_INPUTS.")


def _options(name, options, **fixed):
    """SpectralOptions from a public function's keyword options (gradient fields only) and its `fixed` fields."""
    checks.raise_if_any(checks.unknown_fields(options, _GRAD_FIELDS, noun="option"), name)
    return SpectralOptions.from_mapping({**options, **fixed}, name)


def sqrtm(a, **options):
    """Matrix square root of symmetric PSD `a` ([..., d, d]) by `eigh`, λ clamped at `eps`.

    Options (SpectralOptions fields): grad "exact" (Daleckii–Krein, default), or the papers'
    variants "ordinary", "pade", "taylor" (`taylor_degree`, 100), "trunc" (`trunc_threshold`,
    1e10), "newton" (`newton_iters`, 10); `topn`: the n smallest eigenvalues set to eps
    (SVD-TopN); `eps`: None for the default floor (see `default_eps`), a number is an absolute
    floor. Non-symmetric input is symmetrised, negative eigenvalues are clamped; GCP_JAX_CHECK_INPUTS=1
    makes such input (and NaN) an error instead, for debugging.
    """
    return normalize(_as_square(a, "sqrtm"), _options("sqrtm", options, norm="sqrt"))


def seb(a, *, variant=SpectralOptions.seb_variant, **options):
    """Scaling Eigen Branch output for symmetric PSD `a` ([..., d, d]), docs/method.md §2c.

    variant "code" (default, the released code): Z = (1 + c)·Σ^{1/2}, c = ‖Q Sᵀ‖_F with
    Q = Σ^{1/2}, S = e^{−Σ}; the spectrum is unchanged, SEB acts through the gradient.
    "a": Z = Q + Q ∘ (QSᵀ/‖QSᵀ‖_F). "b": Z = Q + QSᵀ/‖QSᵀ‖_F.
    Options as in `sqrtm` (they choose the square root's gradient).
    """
    return normalize(_as_square(a, "seb"), _options("seb", options, norm="seb", seb_variant=variant))


def seb_scale(a, *, eps=None):
    """1 + c, the factor of the released SEB (c = ‖Q Sᵀ‖_F = (Σ λ̂ e^{−2λ̂})^{1/2}), exact gradient."""
    a = _as_square(a, "seb_scale")
    _, (c_squared,) = _spectral(a, (), ("x_exp2",), _options("seb_scale", {"eps": eps}))
    return 1.0 + _safe_sqrt(c_squared)


def eigenvalues(a):
    """Ascending eigenvalues of sym(a), without clamping (for analysis; no custom gradient)."""
    return batched_eigh.eigh(_sym(_as_square(a, "eigenvalues")))[0]


# ----------------------------------------------------------------------------------------------
# The square root split by eigenvalue rank (analysis, docs/method.md §5)


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
    a = _as_square(a, "sqrtm_split")
    if not 0 <= rank <= a.shape[-1]:
        raise ValueError(f"sqrtm_split: rank={rank} must lie in [0, d={a.shape[-1]}].")
    return _sqrtm_split(a, int(rank), eps)
