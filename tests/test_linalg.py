"""gcp_jax.linalg: values, every gradient variant, degenerate inputs, per-sample independence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gcp_jax import linalg

EPS64 = np.finfo(np.float64).eps
K_GRADS = ("ordinary", "pade", "trunc")


def spd_with_spectrum(eigenvalues, seed=0):
    """Random orthogonal U, returns U diag(λ) Uᵀ (float64 numpy)."""
    d = len(eigenvalues)
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return (q * np.asarray(eigenvalues)) @ q.T


def separated_batch(d=6, batch=3):
    """Well-conditioned SPD matrices, eigenvalues 2·0.8^k: ratios ≤ 0.8 (Taylor's tail 0.8^101 ≈ 2e-10)."""
    return np.stack([spd_with_spectrum(2.0 * 0.8 ** np.arange(d) * (1 + 0.01 * b), seed=b) for b in range(batch)])


def loss_fn(fn, weights):
    return lambda a: jnp.sum(fn(a) * weights)


def eigh_autodiff_sqrtm(a):
    """Independent reference: square root through jnp.linalg.eigh and plain autodiff."""
    lam, u = jnp.linalg.eigh(0.5 * (a + jnp.swapaxes(a, -1, -2)))
    return (u * jnp.sqrt(lam)[..., None, :]) @ jnp.swapaxes(u, -1, -2)


def directional_fd(loss, a, direction, h=1e-5):
    return (loss(a + h * direction) - loss(a - h * direction)) / (2 * h)


def rel_err(x, y):
    return float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / np.max(np.abs(np.asarray(y))))


# ------------------------------------------------------------------------------------------------
# Forward values


def test_triu_vec_row_major_order():
    m = jnp.arange(9.0).reshape(3, 3)  # [[0,1,2],[3,4,5],[6,7,8]]
    np.testing.assert_array_equal(linalg.triu_vec(m), [0, 1, 2, 4, 5, 8])
    assert linalg.triu_vec(jnp.zeros((2, 5, 256, 256))).shape == (2, 5, 32896)


def test_covariance_matches_numpy(x64):
    x = np.random.default_rng(0).normal(size=(2, 30, 5))
    expected = np.stack([np.cov(s, rowvar=False, bias=True) for s in x])
    np.testing.assert_allclose(linalg.covariance(jnp.asarray(x)), expected, rtol=1e-12, atol=1e-14)


def test_sqrtm_squares_back_and_keeps_dtype(x64):
    a = separated_batch()
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-5)):
        root = linalg.sqrtm(jnp.asarray(a, dtype))
        assert root.dtype == dtype
        assert rel_err(root @ root, a) < tol
        assert rel_err(root, np.swapaxes(root, -1, -2)) == 0 or rel_err(root, np.swapaxes(root, -1, -2)) < tol


def test_float32_inputs_give_float32_gradients():
    a = jnp.asarray(separated_batch(), jnp.float32)
    for grad in linalg.SQRTM_GRADS:
        g = jax.grad(lambda m, grad=grad: jnp.sum(linalg.seb(m, grad=grad)))(a)
        assert g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g))), grad


def test_newton_schulz_agrees_with_sqrtm(x64):
    a = jnp.asarray(separated_batch())
    np.testing.assert_allclose(linalg.newton_schulz_sqrtm(a, iters=15), linalg.sqrtm(a), rtol=1e-10)
    # Few iterations damp small-eigenvalue directions; the error shrinks with more of them.
    errors = [rel_err(linalg.newton_schulz_sqrtm(a, iters=n), linalg.sqrtm(a)) for n in (3, 5, 8)]
    assert errors[0] > errors[1] > errors[2] and errors[1] < 1e-2


def literal_seb(a, variant):
    """SEB written as the reference code builds it, from U, Λ and exp(−Λ), in numpy."""
    lam, u = np.linalg.eigh(a)
    lam = np.maximum(lam, EPS64)
    q = (u * np.sqrt(lam)) @ u.T
    s = (u * np.exp(-lam)) @ u.T
    a_mat = q @ s.T
    n = a_mat / max(np.linalg.norm(a_mat), 1e-12)
    if variant == "code":
        return q * (a_mat / n) + q
    if variant == "a":
        return q + q * n
    return q + n


@pytest.mark.parametrize("variant", linalg.SEB_VARIANTS)
def test_seb_closed_form_equals_literal_construction(x64, variant):
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(4, 50, 7)) * rng.uniform(0.2, 2.0, size=(4, 1, 1))
    a = np.asarray(linalg.covariance(jnp.asarray(feats)))
    expected = np.stack([literal_seb(m, variant) for m in a])
    np.testing.assert_allclose(linalg.seb(jnp.asarray(a), variant=variant), expected, rtol=1e-12, atol=1e-14)


def test_seb_code_scales_the_root_by_one_plus_c(x64):
    a = jnp.asarray(separated_batch())
    lam = np.linalg.eigvalsh(np.asarray(a))
    c = np.sqrt(np.sum(lam * np.exp(-2 * lam), axis=-1))
    np.testing.assert_allclose(linalg.seb(a), (1 + c)[:, None, None] * linalg.sqrtm(a), rtol=1e-13)


# ------------------------------------------------------------------------------------------------
# Gradients on well-conditioned input


ALL_FUNCTIONS = [("sqrtm", grad, lambda a, g=grad: linalg.sqrtm(a, grad=g)) for grad in linalg.SQRTM_GRADS]
ALL_FUNCTIONS += [("seb-" + v, "exact", lambda a, v=v: linalg.seb(a, variant=v)) for v in linalg.SEB_VARIANTS]
ALL_FUNCTIONS += [("seb-code", grad, lambda a, g=grad: linalg.seb(a, grad=g)) for grad in linalg.SQRTM_GRADS[1:]]
ALL_FUNCTIONS += [("newton_schulz", "autodiff", lambda a: linalg.newton_schulz_sqrtm(a, iters=5))]
ALL_FUNCTIONS += [("triu_vec", "autodiff", linalg.triu_vec)]


@pytest.mark.parametrize("name,grad,fn", ALL_FUNCTIONS, ids=[f"{n}-{g}" for n, g, _ in ALL_FUNCTIONS])
def test_gradient_matches_finite_differences(x64, name, grad, fn):
    a = jnp.asarray(separated_batch())
    rng = np.random.default_rng(2)
    weights = jnp.asarray(rng.normal(size=np.asarray(fn(a)).shape))
    loss = jax.jit(loss_fn(fn, weights))
    g = jax.grad(loss)(a)
    for seed in range(3):
        v = np.random.default_rng(10 + seed).normal(size=a.shape)
        direction = jnp.asarray(v + np.swapaxes(v, -1, -2))
        fd = directional_fd(loss, a, direction)
        assert abs(float(jnp.sum(g * direction)) - float(fd)) <= 1e-6 * abs(float(fd)), (name, grad)


def test_covariance_gradient_matches_finite_differences_and_formula(x64):
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 20, 4)))
    weights = jnp.asarray(np.random.default_rng(4).normal(size=(2, 4, 4)))
    loss = loss_fn(linalg.covariance, weights)
    g = jax.grad(loss)(x)
    direction = jnp.asarray(np.random.default_rng(5).normal(size=x.shape))
    fd = directional_fd(loss, x, direction)
    assert abs(float(jnp.sum(g * direction)) - float(fd)) <= 1e-8 * abs(float(fd))
    xc = x - x.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(g, xc @ (weights + jnp.swapaxes(weights, -1, -2)) / x.shape[1], rtol=1e-12)


def test_exact_gradient_equals_eigh_autodiff(x64):
    a = jnp.asarray(separated_batch(d=8, batch=4))
    weights = jnp.asarray(np.random.default_rng(6).normal(size=a.shape))
    ours = jax.grad(loss_fn(linalg.sqrtm, weights))(a)
    reference = jax.grad(loss_fn(eigh_autodiff_sqrtm, weights))(a)
    assert rel_err(ours, reference) < 1e-12


@pytest.mark.parametrize("grad", K_GRADS + ("newton",))
def test_paper_gradients_equal_exact_on_separated_spectra(x64, grad):
    a = jnp.asarray(separated_batch(d=8, batch=4))
    weights = jnp.asarray(np.random.default_rng(7).normal(size=a.shape))
    exact = jax.grad(loss_fn(linalg.sqrtm, weights))(a)
    variant = jax.grad(loss_fn(lambda m, grad=grad: linalg.sqrtm(m, grad=grad), weights))(a)
    assert rel_err(variant, exact) < (1e-9 if grad == "newton" else 1e-12)


def test_taylor_error_is_the_dropped_tail(x64):
    """K_taylor = K·(1 − x^{101}), so Uᵀ(∂taylor − ∂exact)U = −x^{101} ∘ L ∘ H off the diagonal."""
    lam = np.array([1.0, 0.99, 0.9, 0.5])  # ratios 0.99 (tail 36 %), 0.9 (2.4e-5), ...
    a = spd_with_spectrum(lam, seed=3)
    weights = np.random.default_rng(8).normal(size=(4, 4))
    exact = jax.grad(loss_fn(linalg.sqrtm, weights))(jnp.asarray(a))
    taylor = jax.grad(loss_fn(lambda m: linalg.sqrtm(m, grad="taylor"), weights))(jnp.asarray(a))
    w, u = np.linalg.eigh(a)
    h = u.T @ (0.5 * (weights + weights.T)) @ u
    loewner = 1.0 / (np.sqrt(w)[:, None] + np.sqrt(w)[None, :])
    x = np.minimum.outer(w, w) / np.maximum.outer(w, w)
    predicted = -(x**101) * loewner * h
    np.fill_diagonal(predicted, 0.0)
    np.testing.assert_allclose(u.T @ np.asarray(taylor - exact) @ u, predicted, atol=1e-13)
    assert np.max(np.abs(predicted)) > 1e-3  # the test input does exercise the tail


def test_pade_coefficients_match_the_published_check():
    p, q = linalg.pade_coefficients()
    np.testing.assert_allclose(p[:4], [1, 1.059054, 0.200740, -0.238192], atol=1e-6)
    np.testing.assert_allclose(q[:4], [1, 0.059054, -0.858315, -0.438931], atol=1e-6)
    assert abs(np.max(np.abs(p)) - 1.1535) < 1e-4


def test_seb_gradient_equals_autodiff_of_literal_form(x64):
    """Independent formula: autodiff through eigh of Q(1 + ‖QSᵀ‖_F) on separated spectra."""
    a = jnp.asarray(separated_batch(d=6, batch=2) * 0.3)  # λ around 0.3–0.6, where SEB's branch acts

    def literal(m):
        lam, u = jnp.linalg.eigh(m)
        q = (u * jnp.sqrt(lam)[..., None, :]) @ jnp.swapaxes(u, -1, -2)
        s = (u * jnp.exp(-lam)[..., None, :]) @ jnp.swapaxes(u, -1, -2)
        c = jnp.sqrt(jnp.sum((q @ s) ** 2, axis=(-2, -1)))
        return (1 + c)[..., None, None] * q

    weights = jnp.asarray(np.random.default_rng(9).normal(size=a.shape))
    ours = jax.grad(loss_fn(linalg.seb, weights))(a)
    assert rel_err(ours, jax.grad(loss_fn(literal, weights))(a)) < 1e-11


def test_transforms_jit_vmap(x64):
    a = jnp.asarray(separated_batch(batch=4))
    batched = linalg.seb(a)
    np.testing.assert_allclose(jax.vmap(linalg.seb)(a), batched, rtol=1e-13)
    np.testing.assert_allclose(jax.jit(linalg.seb)(a), batched, rtol=1e-13)
    stacked = jnp.stack([a, a])  # two leading batch axes
    np.testing.assert_allclose(linalg.sqrtm(stacked)[1], linalg.sqrtm(a), rtol=1e-13)


# ------------------------------------------------------------------------------------------------
# Degenerate inputs


GRADIENT_CASES = [("sqrtm", g) for g in linalg.SQRTM_GRADS] + [("seb", g) for g in linalg.SQRTM_GRADS]


def pooled_loss(kind, grad, weights, **opts):
    """Features → covariance → sqrtm/seb → weighted sum: the GCP layer as training sees it."""
    norm = linalg.sqrtm if kind == "sqrtm" else linalg.seb
    return lambda x: jnp.sum(norm(linalg.covariance(x), grad=grad, **opts) * weights)


@pytest.mark.parametrize("kind,grad", GRADIENT_CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_degenerate_inputs_give_finite_values_and_gradients(x64, kind, grad, dtype):
    rng = np.random.default_rng(11)
    d = 16
    rank_deficient = np.maximum(rng.normal(size=(12, d)), 0)  # M = 12 < d: rank ≤ 11
    repeated = np.repeat(rng.normal(size=(24, d // 2)), 2, axis=1)  # each channel twice: zero eigenvalues
    zero = np.zeros((24, d))
    huge = 1e4 * rng.normal(size=(24, d))
    x = jnp.asarray(np.stack([rank_deficient[:12].repeat(2, axis=0), repeated, zero, huge]), dtype)
    weights = jnp.asarray(rng.normal(size=(4, d, d)), dtype)
    loss = pooled_loss(kind, grad, weights)
    value = (linalg.sqrtm if kind == "sqrtm" else linalg.seb)(linalg.covariance(x), grad=grad)
    g = jax.grad(loss)(x)
    assert bool(jnp.all(jnp.isfinite(value))) and bool(jnp.all(jnp.isfinite(g))), (kind, grad)
    np.testing.assert_array_equal(g[2], 0.0)  # all-zero features: ∂L/∂X = 0 exactly


@pytest.mark.parametrize("grad", linalg.SQRTM_GRADS)
def test_topn_forward_option_is_finite_at_full_rank(x64, grad):
    x = jnp.asarray(np.random.default_rng(12).normal(size=(2, 80, 12)))
    weights = jnp.asarray(np.random.default_rng(13).normal(size=(2, 12, 12)))
    loss = lambda feats: jnp.sum(linalg.sqrtm(linalg.covariance(feats), grad=grad, topn=4) * weights)
    lam = np.linalg.eigvalsh(np.asarray(linalg.sqrtm(linalg.covariance(x), topn=4)))
    np.testing.assert_allclose(lam[:, :4], np.sqrt(EPS64), rtol=1e-3)
    assert bool(jnp.all(jnp.isfinite(jax.grad(loss)(x))))


def test_scaled_identity_gradient_is_the_exact_limit(x64):
    a = 2.5 * jnp.eye(5)[None]
    weights = jnp.asarray(np.random.default_rng(14).normal(size=(1, 5, 5)))
    g = jax.grad(loss_fn(linalg.sqrtm, weights))(a)
    np.testing.assert_allclose(g, 0.5 * (weights + jnp.swapaxes(weights, -1, -2)) / (2 * np.sqrt(2.5)), rtol=1e-12)
    for grad in ("ordinary", "pade", "taylor", "trunc", "newton"):
        assert bool(
            jnp.all(jnp.isfinite(jax.grad(loss_fn(lambda m, grad=grad: linalg.sqrtm(m, grad=grad), weights))(a)))
        )


def test_zero_features_give_sqrt_eps_identity(x64):
    cov = linalg.covariance(jnp.zeros((1, 10, 4)))
    np.testing.assert_allclose(linalg.sqrtm(cov), np.sqrt(EPS64) * np.eye(4)[None], rtol=1e-12)
    np.testing.assert_allclose(linalg.newton_schulz_sqrtm(cov), 0.0)
    assert bool(jnp.all(jnp.isfinite(linalg.seb(cov))))


def test_large_scale_outputs_scale_and_seb_becomes_plain_root(x64):
    x = jnp.asarray(np.random.default_rng(15).normal(size=(2, 60, 6)))
    cov, big = linalg.covariance(x), linalg.covariance(1e4 * x)
    np.testing.assert_allclose(linalg.sqrtm(big), 1e4 * linalg.sqrtm(cov), rtol=1e-9)
    np.testing.assert_allclose(linalg.newton_schulz_sqrtm(big), 1e4 * linalg.newton_schulz_sqrtm(cov), rtol=1e-9)
    np.testing.assert_allclose(linalg.seb(big), linalg.sqrtm(big), rtol=1e-12)  # c underflows to 0


def test_rank_deficient_float32_gradient_is_close_to_float64(x64):
    """The relative eps keeps float32 gradients meaningful when M < d (docs/method.md §4)."""
    rng = np.random.default_rng(16)
    x = np.maximum(rng.normal(size=(2, 49, 64)), 0.0)
    weights = rng.normal(size=(2, 64, 64))
    grads = {}
    for dtype in (jnp.float32, jnp.float64):
        loss = pooled_loss("sqrtm", "exact", jnp.asarray(weights, dtype))
        grads[dtype] = np.asarray(jax.grad(loss)(jnp.asarray(x, dtype)), np.float64)
    assert rel_err(grads[jnp.float32], grads[jnp.float64]) < 1e-2


@pytest.mark.parametrize("grad", linalg.SQRTM_GRADS)
def test_each_sample_gradient_depends_on_that_sample_alone(x64, grad):
    """Permuting or splitting a batch changes no per-sample gradient (no batch-wide overflow fix)."""
    rng = np.random.default_rng(17)
    x = np.stack(
        [rng.normal(size=(10, 16)), np.zeros((10, 16)), rng.normal(size=(40, 16))[:10] * 3, rng.normal(size=(10, 16))]
    )
    weights = rng.normal(size=(4, 16, 16))
    loss = pooled_loss("seb", grad, jnp.asarray(weights))
    whole = np.asarray(jax.grad(loss)(jnp.asarray(x)))
    perm = np.array([2, 0, 3, 1])
    permuted = np.asarray(jax.grad(pooled_loss("seb", grad, jnp.asarray(weights[perm])))(jnp.asarray(x[perm])))
    np.testing.assert_allclose(permuted, whole[perm], rtol=1e-10, atol=1e-12)
    for i in range(4):
        single = jax.grad(pooled_loss("seb", grad, jnp.asarray(weights[i : i + 1])))(jnp.asarray(x[i : i + 1]))
        np.testing.assert_allclose(single[0], whole[i], rtol=1e-10, atol=1e-12)


def test_bad_arguments_raise_clear_errors():
    a = jnp.eye(3)
    for call, error, message in (
        (lambda: linalg.sqrtm(a, grad="svd"), ValueError, r"sqrtm: grad='svd' is not one of exact, ordinary"),
        (lambda: linalg.sqrtm(a, degree=3), ValueError, r"sqrtm: degree is not a known option"),
        (
            lambda: linalg.sqrtm(a, grad="pad", eps=0),
            ValueError,
            r"sqrtm: 2 problems:\n.*did you mean 'pade'.*\n.*eps=0",
        ),
        (lambda: linalg.seb(a, variant="c"), ValueError, r"seb: seb_variant='c' is not one of code, a, b"),
        (lambda: linalg.sqrtm(a, eps=-1.0), ValueError, r"eps=-1.0 must be positive"),
        (
            lambda: linalg.sqrtm(jnp.ones((3, 4))),
            ValueError,
            r"non-empty square matrices \[..., d, d\], got shape \(3, 4\)",
        ),
        (lambda: linalg.sqrtm(jnp.zeros((0, 0))), ValueError, r"got shape \(0, 0\)"),
        (lambda: linalg.sqrtm(np.eye(3, dtype=np.int32)), ValueError, r"floating-point array .* got int32"),
        (lambda: linalg.sqrtm("eye"), TypeError, r"sqrtm expects square matrices \[..., d, d\], got a str"),
        (lambda: linalg.sqrtm(a, topn=5), ValueError, r"topn=5 must lie in \[0, d=3\]"),
        (lambda: linalg.covariance(jnp.zeros((2, 0, 3))), ValueError, r"covariance expects non-empty features"),
        (lambda: linalg.newton_schulz_sqrtm(a, iters=0), ValueError, r"iters=0 must be an integer of at least 1"),
    ):
        with pytest.raises(error, match=message):
            call()


def test_lists_are_arrays_and_asymmetric_input_is_symmetrised():
    np.testing.assert_allclose(linalg.sqrtm([[4.0, 0.0], [0.0, 9.0]]), np.diag([2.0, 3.0]), rtol=1e-6)
    a = jnp.asarray(separated_batch(d=4, batch=1), jnp.float32)
    skew = jnp.asarray([[0.0, 1.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0] * 4, [0.0] * 4], jnp.float32)
    np.testing.assert_allclose(linalg.sqrtm(a + 0.1 * skew), linalg.sqrtm(a), rtol=1e-5, atol=1e-6)


def test_input_check_is_opt_in(monkeypatch):
    """Off by default: nothing is added to the computation; GCP_JAX_CHECK_INPUTS=1 adds one callback.

    The variable is read when a function is traced (fresh lambdas here: JAX caches traces).
    """
    a = jnp.eye(3)
    assert "debug_callback" not in str(jax.make_jaxpr(lambda m: linalg.sqrtm(m))(a))
    monkeypatch.setenv("GCP_JAX_CHECK_INPUTS", "1")
    assert "debug_callback" in str(jax.make_jaxpr(lambda m: linalg.sqrtm(m))(a))
    assert "debug_callback" not in str(jax.make_jaxpr(lambda m: linalg.newton_schulz_sqrtm(m))(a))


def test_input_check_names_the_bad_matrix(monkeypatch):
    monkeypatch.setenv("GCP_JAX_CHECK_INPUTS", "1")
    x = np.random.default_rng(30).normal(size=(3, 3, 5)).astype(np.float32)  # M = 3 < C = 5: rank-deficient
    good = np.asarray(linalg.covariance(x))
    jax.block_until_ready(jax.jit(lambda c: linalg.seb(c))(good))  # PSD up to float32 noise passes
    asymmetric, indefinite, nan = good.copy(), good.copy(), good.copy()
    asymmetric[1, 0, 1] += 0.5
    indefinite[2] = np.diag([1.0, 1.0, 1.0, 1.0, -0.01])
    nan[0, 2, 2] = np.nan
    skewed = r"sqrtm: the input matrix at batch index \(1,\) is not symmetric \(‖A − Aᵀ‖/‖A‖ = .* > 3\.5e-04;"
    with pytest.raises(ValueError, match=skewed):
        linalg.sqrtm(asymmetric)
    with pytest.raises(jax.errors.JaxRuntimeError, match=skewed):
        jax.block_until_ready(jax.jit(lambda c: linalg.sqrtm(c))(asymmetric))
    with pytest.raises(ValueError, match=skewed):
        jax.grad(lambda c: jnp.sum(linalg.sqrtm(c)))(asymmetric)
    with pytest.raises(ValueError, match=r"seb: the input matrix is not symmetric"):  # vmap: one matrix at a time
        jax.vmap(linalg.seb)(asymmetric)
    with pytest.raises(ValueError, match=r"index \(2,\) is indefinite \(λ_min = −1\.0e-02·max\|λ\|; seb would clamp"):
        linalg.seb(indefinite)
    with pytest.raises(ValueError, match=r"index \(0,\) has NaN or infinite entries; fix the input, or unset"):
        linalg.sqrtm(nan)


def test_sqrtm_split_sums_to_the_root_and_has_exact_gradients(x64):
    a = jnp.asarray(separated_batch(d=6, batch=2))
    large, small = linalg.sqrtm_split(a, 2)
    np.testing.assert_allclose(large + small, linalg.sqrtm(a), rtol=1e-12)
    lam = np.linalg.eigvalsh(np.asarray(a))
    np.testing.assert_allclose(np.linalg.eigvalsh(np.asarray(large))[:, -2:], np.sqrt(lam[:, -2:]), rtol=1e-10)
    w1, w2 = (jnp.asarray(np.random.default_rng(s).normal(size=a.shape)) for s in (20, 21))

    def parts_loss(m):
        q_large, q_small = linalg.sqrtm_split(m, 2)
        return jnp.sum(q_large * w1) + jnp.sum(q_small * w2)

    def reference_loss(m):  # autodiff through eigh of the same split
        lam_, u = jnp.linalg.eigh(m)
        mask = (jnp.arange(6) >= 4).astype(m.dtype)
        rebuild = lambda v: (u * v[..., None, :]) @ jnp.swapaxes(u, -1, -2)
        return jnp.sum(rebuild(jnp.sqrt(lam_) * mask) * w1) + jnp.sum(rebuild(jnp.sqrt(lam_) * (1 - mask)) * w2)

    assert rel_err(jax.grad(parts_loss)(a), jax.grad(reference_loss)(a)) < 1e-11
    rank_deficient = linalg.covariance(jnp.asarray(np.random.default_rng(22).normal(size=(1, 4, 6))))
    assert bool(jnp.all(jnp.isfinite(jax.grad(parts_loss)(rank_deficient))))
