"""MPA-Lya and iSICE in gcp_jax.linalg: values, every custom VJP, degenerate inputs, the head, the configs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gcp_jax import config, linalg, optim, sharding, steps
from gcp_jax.linalg import SpectralOptions
from gcp_jax.pooling import GCPHead
from tests.test_linalg import rel_err, spd_with_spectrum


def well_conditioned(d=6, batch=2):
    """Eigenvalues in [0.5, 1]·scale: λ/‖Σ‖_F ≥ 0.2, where the [5/5] Padé approximant is accurate."""
    return np.stack([spd_with_spectrum((1 + b) * np.linspace(0.5, 1.0, d), seed=b) for b in range(batch)])


def lyapunov_by_eigh(root, g, inverse=False):
    """The VJP of A ↦ A^{±1/2} at A = root^{±2}, by the eigendecomposition of the root (Daleckii–Krein).

    For the root, X solves R X + X R = G: X = U (Uᵀ G U / (r_i + r_j)) Uᵀ. For the inverse root
    R = A^{-1/2} the divided differences of λ^{-1/2} are, in r = λ^{-1/2}, −r_i² r_j² / (r_i + r_j).
    """
    r, u = np.linalg.eigh(0.5 * (root + np.swapaxes(root, -1, -2)))
    ri, rj = r[..., :, None], r[..., None, :]
    loewner = -(ri**2) * rj**2 / (ri + rj) if inverse else 1.0 / (ri + rj)
    ut = np.swapaxes(u, -1, -2)
    return u @ (loewner * (ut @ g @ u)) @ ut


# ------------------------------------------------------------------------------------------------
# MPA-Lya: forward


@pytest.mark.parametrize("approximant, tolerance", [("pade", 1e-5), ("taylor", 2e-3)])
def test_mpa_matches_sqrtm_where_the_approximant_is_accurate(x64, approximant, tolerance):
    a = jnp.asarray(well_conditioned())
    exact = linalg.sqrtm(a)
    assert rel_err(linalg.mpa_sqrtm(a, approximant=approximant), exact) < tolerance
    inverse = linalg.mpa_sqrtm(a, approximant=approximant, inverse=True)
    assert rel_err(inverse @ exact, np.broadcast_to(np.eye(6), a.shape)) < 5 * tolerance


@pytest.mark.parametrize(
    "low, low_error, high_error",
    [(0.1, 5e-4, 3e-3), (0.01, 0.01, 0.05), (0.0, 0.05, 0.1)],
)
def test_mpa_error_grows_with_the_condition_number_as_documented(x64, low, low_error, high_error):
    """Padé [5/5] at d = 6, eigenvalues linspace(low, 1): 1.4e-3, 2.7e-2 and 7.6e-2 (rank-deficient) measured."""
    a = jnp.asarray(spd_with_spectrum(np.linspace(low, 1.0, 6)))
    error = rel_err(linalg.mpa_sqrtm(a), linalg.sqrtm(a))
    assert low_error < error < high_error


PADE_P = [1, -11 / 4, 11 / 4, -77 / 64, 55 / 256, -11 / 1024]  # [5/5] Padé of √(1 − z), exact
PADE_Q = [1, -9 / 4, 7 / 4, -35 / 64, 15 / 256, -1 / 1024]


def numpy_mpa(a, inverse=False):
    """The published forward in float64 NumPy: Q(Z)⁻¹P(Z)·√‖A‖_F (P⁻¹Q/√‖A‖_F inverse), Z = I − A/‖A‖_F."""
    norm = np.linalg.norm(a)
    z = np.eye(len(a)) - a / norm
    p, q = (sum(c * np.linalg.matrix_power(z, k) for k, c in enumerate(cs)) for cs in (PADE_P, PADE_Q))
    return np.linalg.solve(p, q) / np.sqrt(norm) if inverse else np.linalg.solve(q, p) * np.sqrt(norm)


def test_mpa_keeps_the_dtype(x64):
    """Float64 in, float64 throughout: equal to a float64 NumPy forward to 1e-13 (a float32 identity gives 1e-7)."""
    a = spd_with_spectrum(np.linspace(0.01, 1.0, 6))
    for inverse in (False, True):
        out = linalg.mpa_sqrtm(jnp.asarray(a), inverse=inverse)
        assert out.dtype == jnp.float64
        assert rel_err(out, numpy_mpa(a, inverse)) < 1e-13
    assert linalg.mpa_sqrtm(jnp.asarray(a, jnp.float32)).dtype == jnp.float32
    assert linalg.isice(jnp.asarray(a)).dtype == jnp.float64
    assert linalg.isice(jnp.asarray(a, jnp.float32)).dtype == jnp.float32


def test_mpa_coefficients_are_the_published_pade_approximant():
    """The [5/5] Padé approximant of √(1 − z): exact rationals (e.g. p₁ = −11/4, q₅ = −1/1024)."""
    p, q = linalg.series_coefficients("sqrt", 10, (5, 5), digits=32)
    np.testing.assert_allclose(p, PADE_P, rtol=1e-12)
    np.testing.assert_allclose(q, PADE_Q, rtol=1e-12)
    taylor = linalg.series_coefficients("sqrt", 10, digits=32)
    assert taylor[:3] == pytest.approx([1, -0.5, -0.125], rel=1e-12) and len(taylor) == 11


# ------------------------------------------------------------------------------------------------
# MPA-Lya: the Lyapunov backward


@pytest.mark.parametrize("inverse", [False, True])
def test_mpa_vjp_solves_the_lyapunov_equation_of_its_root(x64, inverse):
    """Non-symmetric cotangent; against the eigh solution for the computed root, and for the exact root."""
    a = jnp.asarray(well_conditioned())
    g = np.random.default_rng(1).normal(size=a.shape)
    out, vjp = jax.vjp(lambda a: linalg.mpa_sqrtm(a, inverse=inverse), a)
    grad = np.asarray(vjp(jnp.asarray(g))[0])
    assert rel_err(grad, lyapunov_by_eigh(np.asarray(out), g, inverse)) < 1e-9
    exact_root = linalg.sqrtm(a)
    exact = np.linalg.inv(np.asarray(exact_root)) if inverse else np.asarray(exact_root)
    assert rel_err(grad, lyapunov_by_eigh(exact, g, inverse)) < 5e-5


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("approximant", ["pade", "taylor"])
def test_mpa_vjp_matches_finite_differences(x64, inverse, approximant):
    """The Lyapunov gradient is the exact root's: within the approximant's error of its own derivative."""
    a = jnp.asarray(well_conditioned(batch=1)[0])
    rng = np.random.default_rng(2)
    w, direction = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    loss = lambda a: jnp.sum(linalg.mpa_sqrtm(a, approximant=approximant, inverse=inverse) * w)
    h = 1e-5
    fd = (loss(a + h * direction) - loss(a - h * direction)) / (2 * h)
    analytic = jnp.sum(jax.grad(loss)(a) * direction)
    assert abs(float(analytic - fd)) < (1e-4 if approximant == "pade" else 3e-2) * abs(float(fd))


def test_mpa_vjp_converges_with_more_lyapunov_steps(x64):
    """λ/‖Σ‖_F down to 2e-3: 8 steps leave the small-eigenvalue directions unconverged; 16 converge."""
    a = jnp.asarray(spd_with_spectrum(np.linspace(0.01, 1.0, 6)))
    g = np.random.default_rng(3).normal(size=a.shape)
    errors = []
    for iters in (4, 8, 16):
        out, vjp = jax.vjp(lambda a, i=iters: linalg.mpa_sqrtm(a, lyapunov_iters=i), a)
        errors.append(rel_err(vjp(jnp.asarray(g))[0], lyapunov_by_eigh(np.asarray(out), g)))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-8


# ------------------------------------------------------------------------------------------------
# iSICE


def test_isice_inverse_root_vjp_is_right_for_non_symmetric_cotangents(x64):
    """The hand-written Newton–Schulz VJP against autodiff of the same recurrence and finite differences."""
    x = jnp.asarray(well_conditioned())
    g = jnp.asarray(np.random.default_rng(4).normal(size=x.shape))

    def plain(x, iters=linalg.ISICE_ROOT_ITERS):
        trace = jnp.trace(x, axis1=-2, axis2=-1)[..., None, None]
        eye = jnp.broadcast_to(jnp.eye(x.shape[-1]), x.shape)
        y, z = x / trace, eye
        for _ in range(iters):
            t = 0.5 * (3 * eye - z @ y)
            y, z = y @ t, t @ z
        return z / jnp.sqrt(trace)

    ours, vjp = jax.vjp(lambda x: linalg._ns_inverse_root(x, linalg.ISICE_ROOT_ITERS), x)
    reference, reference_vjp = jax.vjp(plain, x)
    np.testing.assert_allclose(ours, reference, rtol=1e-12)
    grad = vjp(g)[0]
    np.testing.assert_allclose(grad, reference_vjp(g)[0], rtol=1e-10, atol=1e-12)
    assert rel_err(grad, np.swapaxes(np.asarray(grad), -1, -2)) > 1e-3  # not symmetric: no transpose can hide
    direction = jnp.asarray(np.random.default_rng(5).normal(size=x.shape))
    h = 1e-6
    loss = lambda x: jnp.sum(linalg._ns_inverse_root(x, linalg.ISICE_ROOT_ITERS) * g)
    fd = (loss(x + h * direction) - loss(x - h * direction)) / (2 * h)
    assert float(jnp.sum(grad * direction)) == pytest.approx(float(fd), rel=1e-7)


def isice_inputs(seed=0):
    """A full-rank and a rank-deficient (M = 4 < d = 6) covariance of ReLU features."""
    rng = np.random.default_rng(seed)
    full = np.maximum(rng.normal(size=(24, 6)), 0)
    low = np.maximum(rng.normal(size=(4, 6)), 0)
    return np.stack([np.cov(f, rowvar=False, bias=True) for f in (full, low)])


@pytest.mark.parametrize("steps, lr, sparsity", [(5, 5.0, 0.01), (5, 1.0, 0.01), (3, 2.0, 0.1)])
def test_isice_matches_an_independent_pytorch_rewrite(x64, steps, lr, sparsity):
    """Forward and gradient (float64) against tests/isice_reference_torch.py, full rank and rank-deficient."""
    import torch

    from tests import isice_reference_torch

    sigma = isice_inputs()
    w = np.random.default_rng(6).normal(size=sigma.shape)
    loss = lambda s: jnp.sum(linalg.isice(s, steps=steps, lr=lr, sparsity=sparsity) * w)
    value, grad = jax.value_and_grad(loss)(jnp.asarray(sigma))

    s = torch.tensor(sigma, requires_grad=True)
    out = isice_reference_torch.isice(s, steps=steps, lr=lr, sparsity=sparsity)
    total = (out * torch.tensor(w)).sum()
    total.backward()
    np.testing.assert_allclose(linalg.isice(jnp.asarray(sigma), steps=steps, lr=lr, sparsity=sparsity), out.detach())
    assert float(value) == pytest.approx(total.item(), rel=1e-10)
    np.testing.assert_allclose(grad, s.grad.numpy(), rtol=1e-7, atol=1e-9 * float(np.abs(s.grad.numpy()).max()))
    assert float(jnp.abs(grad).max()) > 0


def test_isice_gradient_matches_finite_differences(x64):
    sigma = jnp.asarray(isice_inputs(seed=1)[:1])
    rng = np.random.default_rng(7)
    w, direction = rng.normal(size=sigma.shape), rng.normal(size=sigma.shape)
    direction = 0.5 * (direction + np.swapaxes(direction, -1, -2))
    loss = lambda s: jnp.sum(linalg.isice(s) * w)
    h = 1e-7
    fd = (loss(sigma + h * direction) - loss(sigma - h * direction)) / (2 * h)
    assert float(jnp.sum(jax.grad(loss)(sigma) * direction)) == pytest.approx(float(fd), rel=1e-5)


def test_isice_is_sparse_and_unit_trace_normalised(x64):
    """Larger sparsity zeroes more partial correlations; the output is P/√tr P."""
    sigma = jnp.asarray(isice_inputs())
    zeros = [int(jnp.sum(linalg.isice(sigma, sparsity=s) == 0)) for s in (0.0, 0.5)]
    assert zeros[0] < zeros[1]
    out = linalg.isice(sigma, lr=1.0)
    trace = jnp.trace(out, axis1=-2, axis2=-1)
    np.testing.assert_allclose(trace, jnp.sqrt(trace) ** 2)  # tr(P/√tr P) = √tr P > 0
    assert bool(jnp.all(trace > 0)) and rel_err(out, np.swapaxes(np.asarray(out), -1, -2)) == 0


# ------------------------------------------------------------------------------------------------
# Both: degenerate inputs, batches, transformations, options


DEGENERATE = {
    "zeros": np.zeros((6, 6)),
    "rank-deficient": spd_with_spectrum([0, 0, 0, 0.5, 1, 2]),
    "repeated": 2.0 * np.eye(6),
}
FUNCTIONS = {
    "mpa": linalg.mpa_sqrtm,
    "mpa taylor": lambda a: linalg.mpa_sqrtm(a, approximant="taylor"),
    "mpa inverse": lambda a: linalg.mpa_sqrtm(a, inverse=True),
    "isice": linalg.isice,
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", DEGENERATE)
@pytest.mark.parametrize("name", FUNCTIONS)
def test_degenerate_inputs_give_finite_values_and_gradients(x64, name, case, dtype):
    a = jnp.asarray(DEGENERATE[case], dtype)
    w = jnp.asarray(np.random.default_rng(8).normal(size=(6, 6)), dtype)
    value, grad = jax.value_and_grad(lambda a: jnp.sum(FUNCTIONS[name](a) * w))(a)
    assert bool(jnp.isfinite(value)) and bool(jnp.all(jnp.isfinite(grad)))


def test_mpa_of_a_multiple_of_the_identity_is_exact(x64):
    """Repeated eigenvalues: A = aI gives Z = (1 − 1/√d) I, where the approximant is accurate."""
    np.testing.assert_allclose(linalg.mpa_sqrtm(4.0 * jnp.eye(6)), 2.0 * np.eye(6), rtol=1e-6)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_every_sample_is_computed_on_its_own(x64, name):
    """Per-sample norms: a batch gives each sample's own value and gradient, under jit and vmap too."""
    a = jnp.asarray(np.concatenate([well_conditioned(batch=2), 1e3 * isice_inputs()]))
    w = jnp.asarray(np.random.default_rng(9).normal(size=a.shape))
    fn = FUNCTIONS[name]
    grad = lambda a, w: jax.grad(lambda a: jnp.sum(fn(a) * w))(a)
    batched, batched_grad = jax.jit(fn)(a), jax.jit(grad)(a, w)
    for i in range(len(a)):
        np.testing.assert_allclose(batched[i], fn(a[i]), rtol=1e-9, atol=1e-12 * float(jnp.abs(batched[i]).max()))
        np.testing.assert_allclose(batched_grad[i], grad(a[i], w[i]), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(jax.vmap(fn)(a), batched, rtol=1e-9)


def test_bad_options_are_one_clear_sentence():
    a = jnp.eye(3)
    with pytest.raises(ValueError, match=r"^mpa_sqrtm: approximant='pad' is not one of pade, taylor"):
        linalg.mpa_sqrtm(a, approximant="pad")
    with pytest.raises(ValueError, match=r"lyapunov_iters=0 must be an integer of at least 1"):
        linalg.mpa_sqrtm(a, lyapunov_iters=0)
    with pytest.raises(ValueError, match=r"^isice: steps=1 must be an integer of at least 2"):
        linalg.isice(a, steps=1)
    with pytest.raises(ValueError, match=r"2 problems:\n  - lr=-1.0 must be a number, positive"):
        linalg.isice(a, lr=-1.0, sparsity="x")
    with pytest.raises(ValueError, match=r"isice_sparsity=-0.1 must be a number, 0 or more"):
        SpectralOptions(norm="isice", isice_sparsity=-0.1)
    problems = config.value_problems(_config_with(gcp={"mpa_approximant": "chol", "isice_steps": 0}), num_devices=1)
    assert "config.gcp.mpa_approximant='chol' is not one of pade, taylor." in problems
    assert "config.gcp.isice_steps=0 must be an integer of at least 2." in problems


def test_normalize_applies_the_options(x64):
    a = jnp.asarray(well_conditioned())
    mpa = SpectralOptions(norm="mpa", mpa_approximant="taylor", mpa_lyapunov_iters=4, dtype="float64")
    np.testing.assert_array_equal(linalg.normalize(a, mpa), linalg.mpa_sqrtm(a, approximant="taylor"))
    isice = SpectralOptions(norm="isice", isice_steps=3, isice_lr=1.0, isice_sparsity=0.1, dtype="float64")
    np.testing.assert_array_equal(linalg.normalize(a, isice), linalg.isice(a, steps=3, lr=1.0, sparsity=0.1))


# ------------------------------------------------------------------------------------------------
# The head trains with them; the protocol variants


class TinyGCP(nn.Module):
    """conv → the GCP head (8-d reduction) → "classifier": the smallest model with the real head."""

    norm: str

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(6, (3, 3), strides=2, name="conv")(x))
        x = GCPHead(dim=8, spectral=SpectralOptions(norm=self.norm), name="head")(x, train=train)
        return nn.Dense(3, name="classifier")(x)


@pytest.mark.parametrize("norm", ["mpa", "isice"])
def test_the_head_trains_a_few_steps(norm):
    mesh = sharding.make_mesh()
    model = TinyGCP(norm)
    cfg = config.get_config().optim
    cfg.update(learning_rate=0.05, decay_epochs=())
    tx = optim.make_optimizer(cfg, optim.learning_rate_schedule(cfg, 4, 4))
    state = steps.create_train_state(steps.init_variables(model, 16, 0, mesh), tx, mesh)
    step = steps.make_train_step(model, tx, mesh)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(8, 16, 16, 3)).astype(np.float32), "label": np.arange(8, dtype=np.int32) % 3}
    losses = []
    for _ in range(4):
        state, metrics = step(state, sharding.global_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_protocol_variants():
    from configs import aircraft, cars, cub

    for module in (aircraft, cub, cars):
        c = module.get_config("isice_resnet50")
        assert (c.model.arch, c.model.last_stride, c.gcp.norm, c.gcp.dim) == ("resnet50", 2, "isice", 256)
        assert (c.gcp.isice_steps, c.gcp.isice_lr, c.gcp.isice_sparsity) == (5, 1.0, 0.01)
        assert c.optim.name == "adamw" and c.optim.decay_epochs == (15, 30) and c.num_epochs == 100
        config.validate(c, num_devices=1)
        m = module.get_config("mpa_resnet50")
        reference = module.get_config("resnet50")
        assert (m.gcp.norm, m.model.arch, m.model.last_stride) == ("mpa", "resnet50", 1)
        m.gcp.norm = reference.gcp.norm
        assert m.to_dict() == reference.to_dict()
    assert aircraft.get_config("isice_resnet50").data.resize_size == 512


def test_optimizer_name_is_validated():
    """AdamW itself is checked step for step against PyTorch in tests/test_training.py."""
    problems = config.value_problems(_config_with(optim={"name": "adam", "nesterov": True}), num_devices=1)
    assert "config.optim.name='adam' is not one of sgd, adamw (did you mean 'adamw'?)." in problems
    bad = config.value_problems(_config_with(optim={"name": "adamw", "nesterov": True}), num_devices=1)
    assert bad == ["config.optim.nesterov applies to name='sgd' only; set it to False for 'adamw'."]


def _config_with(**groups):
    c = config.get_config()
    for group, fields in groups.items():
        c[group].update(fields)
    return c
