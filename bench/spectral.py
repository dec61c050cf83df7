"""Spectral-layer benchmark: gcp_jax.linalg against plain autodiff and the reference recipe.

    python -m bench spectral --repeats 7                      # every table (2-core CPU: ~12 minutes)
    python -m bench spectral --batches 8 --dtypes float32 --repeats 3
    python -m bench spectral --tables family --repeats 7      # one table (the docs keep it in its own record)

Table "functions": forward and forward+backward time of each normalisation of a batch of d = 256
covariances (ReLU features, M = 2d positions: full rank), with its ratio to `eigh` + plain
autodiff of U diag(√λ) Uᵀ in the same run and dtype.
Table "family": the GCP family side by side (sqrt, seb, isqrt, MPA-Lya, iSICE), float32, on the
covariances of ReLU features [8, 196, 256] (rank-deficient: M < d) and [8, 784, 256] (full rank):
forward and forward+backward time, and the largest relative Frobenius error over the batch of the
forward against its exact float64 counterpart (the eigh square root; SEB's (1 + c)·√Σ; iSICE,
which is no square root, against itself in float64: its rounding error only).
Table "layer": the whole GCP+SEB layer (covariance → seb → triu_vec) from float32 features
[8, 196, 256], forward+backward, against the reference recipe in NumPy (bench.reference:
float64, SVD, ordinary-K eigen backward, batch-wide overflow fix) and against the floor, the
batched `eigh` alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bench import common, reference, tables
from bench.timing import machine_line, time_call
from gcp_jax import linalg

BASELINE = "eigh+autodiff (baseline)"
TABLES = ("functions", "family", "layer")
LAYER_FEATURES = (8, 196, 256)
FAMILY_FEATURES = ((8, 196, 256), (8, 784, 256))  # rank-deficient (M < d) and full rank


def spd_batch(batch: int, d: int, dtype, seed: int = 0) -> jax.Array:
    """Covariances of ReLU features with M = 2d positions: full rank, BN-like scale."""
    x = np.maximum(np.random.default_rng(seed).normal(size=(batch, 2 * d, d)), 0.0)
    return linalg.covariance(jnp.asarray(x, dtype))


def eigh_autodiff_sqrtm(a, implementation=None):
    """U diag(√λ) Uᵀ by `jax.lax.linalg.eigh` (with `implementation`, where given) and JAX's own eigh derivative."""
    kwargs = {} if implementation is None else {"implementation": implementation}
    u, lam = jax.lax.linalg.eigh(a, **kwargs)
    return (u * jnp.sqrt(jnp.maximum(lam, 0.0))[..., None, :]) @ jnp.swapaxes(u, -1, -2)


def candidates() -> dict:
    """name → function of a [B, d, d] batch, the baseline first."""
    fns = {BASELINE: eigh_autodiff_sqrtm}
    for grad in linalg.SQRTM_GRADS:
        fns[f"sqrtm grad={grad}"] = lambda a, g=grad: linalg.sqrtm(a, grad=g)
    fns["seb (code, exact)"] = linalg.seb
    fns["newton_schulz_sqrtm iters=5"] = linalg.newton_schulz_sqrtm
    for approximant in linalg.MPA_APPROXIMANTS:
        fns[f"mpa_sqrtm {approximant}"] = functools.partial(linalg.mpa_sqrtm, approximant=approximant)
    return fns


def exact_root(cov: np.ndarray) -> np.ndarray:
    """U diag(√max(λ, 0)) Uᵀ in float64 NumPy."""
    lam, u = np.linalg.eigh(cov.astype(np.float64))
    return (u * np.sqrt(np.maximum(lam, 0.0))[..., None, :]) @ np.swapaxes(u, -1, -2)


def exact_seb(cov: np.ndarray) -> np.ndarray:
    """(1 + c)·√Σ, c = (Σ λ e^{−2λ})^{1/2}, in float64 NumPy (the released SEB's closed form)."""
    lam = np.maximum(np.linalg.eigvalsh(cov.astype(np.float64)), 0.0)
    return (1.0 + np.sqrt(np.sum(lam * np.exp(-2 * lam), axis=-1)))[..., None, None] * exact_root(cov)


def isice_float64(cov: np.ndarray) -> np.ndarray:
    with jax.enable_x64(True):
        return np.asarray(linalg.isice(jnp.asarray(cov, jnp.float64)))


def family() -> dict:
    """name → (function of a [B, d, d] batch, its float64 reference in NumPy, what the reference is)."""
    return {
        "sqrt (sqrtm, exact grad)": (linalg.sqrtm, exact_root, "√Σ"),
        "seb (code, exact grad)": (linalg.seb, exact_seb, "(1+c)·√Σ"),
        "isqrt (Newton–Schulz, 5 iters)": (linalg.newton_schulz_sqrtm, exact_root, "√Σ"),
        "mpa (MPA-Lya, Padé [5/5])": (linalg.mpa_sqrtm, exact_root, "√Σ"),
        "mpa (MTP, Taylor 10 terms)": (functools.partial(linalg.mpa_sqrtm, approximant="taylor"), exact_root, "√Σ"),
        "isice (5 steps, lr 5, s 0.01)": (linalg.isice, isice_float64, "itself in float64"),
    }


def relative_error(z, reference) -> float:
    """Largest ‖Z − Z_ref‖_F / ‖Z_ref‖_F over the batch."""
    z, reference = np.asarray(z, np.float64), np.asarray(reference, np.float64)
    norms = np.linalg.norm(reference, axis=(-2, -1))
    return float(np.max(np.linalg.norm(z - reference, axis=(-2, -1)) / norms))


def family_rows(repeats: int) -> list[dict]:
    """Table "family": each member at each FAMILY_FEATURES shape, float32: times and forward error."""
    rows = []
    for shape in FAMILY_FEATURES:
        x = np.maximum(np.random.default_rng(4).normal(size=shape), 0.0)
        cov = linalg.covariance(jnp.asarray(x, jnp.float32))
        cov64 = np.asarray(linalg.covariance(jnp.asarray(x, jnp.float32)), np.float64)
        rank = "full" if shape[1] > shape[2] else "deficient"
        members = family()
        timed = time_functions({name: fn for name, (fn, _, _) in members.items()}, cov, repeats, rank=rank)
        for row, (fn, exact, what) in zip(timed, members.values()):
            row.update(features=",".join(map(str, shape)), reference=what)
            row["rel_error"] = relative_error(jax.jit(fn)(cov), exact(cov64))
        rows += timed
    return rows


def time_functions(fns: dict, a: jax.Array, repeats: int, **fields) -> list[dict]:
    """{function, fwd_s, fwdbwd_s, **fields} per function: jit(fn) and jit(grad of <fn(a), w>), fastest of `repeats`.

    The weights w are an argument, not a constant (XLA would fold it into the backward). A
    function this platform cannot lower (e.g. an `eigh` implementation it lacks) gets an "error".
    Each row is printed as it is measured: the table comes at the end.
    """
    weights = jnp.asarray(np.random.default_rng(1).normal(size=a.shape), a.dtype)
    rows = []
    for name, fn in fns.items():
        row = {**fields, "function": name}
        try:
            row["fwd_s"] = time_call(jax.jit(fn), a, repeats=repeats)
            backward = jax.jit(jax.grad(lambda a, w, fn=fn: jnp.sum(fn(a) * w)))
            row["fwdbwd_s"] = time_call(backward, a, weights, repeats=repeats)
        except NotImplementedError as e:
            row["error"] = f"not on {jax.default_backend()}: {e}"
        print(row, flush=True)
        rows.append(row)
    return rows


def add_ratios(rows: list[dict], baseline: str) -> list[dict]:
    """Each timed row gets fwd_ratio and fwdbwd_ratio: its times over the `baseline` row's."""
    base = next(r for r in rows if r["function"] == baseline)
    for r in rows:
        if "error" not in r:
            r["fwd_ratio"], r["fwdbwd_ratio"] = r["fwd_s"] / base["fwd_s"], r["fwdbwd_s"] / base["fwdbwd_s"]
    return rows


def function_rows(batches: list[int], dtypes: list[str], repeats: int) -> list[dict]:
    """Table "functions": every candidate at d = 256 for each dtype and batch."""
    rows = []
    for dtype in dtypes:
        for batch in batches:
            measured = time_functions(candidates(), spd_batch(batch, 256, dtype), repeats, dtype=dtype, batch=batch)
            rows += add_ratios(measured, BASELINE)
    return rows


def layer_result(repeats: int) -> dict:
    """Table "layer": ours against the reference recipe and the eigh floor, and how far the gradients differ."""
    x = np.maximum(np.random.default_rng(2).normal(size=LAYER_FEATURES), 0.0).astype(np.float32)
    d = LAYER_FEATURES[-1]
    weights = np.random.default_rng(3).normal(size=(LAYER_FEATURES[0], d * (d + 1) // 2)).astype(np.float32)
    xj, wj = jnp.asarray(x), jnp.asarray(weights)

    def layer(feats, **kw):
        return linalg.triu_vec(linalg.seb(linalg.covariance(feats), **kw))

    # Weights are arguments, not closed-over constants, so XLA cannot fold the backward scatter.
    ours = jax.jit(jax.value_and_grad(lambda f, w: jnp.sum(layer(f) * w)))
    ordinary = jax.jit(jax.value_and_grad(lambda f, w: jnp.sum(layer(f, grad="ordinary") * w)))
    eigh_only = jax.jit(lambda f: jnp.linalg.eigh(linalg.covariance(f)))
    timed = [
        (
            "reference recipe (NumPy float64, SVD, ordinary K)",
            time_call(reference.seb_layer, x, weights, repeats=repeats),
        ),
        ("gcp_jax seb, float32, grad=exact", time_call(ours, xj, wj, repeats=repeats)),
        ("gcp_jax seb, float32, grad=ordinary", time_call(ordinary, xj, wj, repeats=repeats)),
        ("floor: covariance + eigh forward only, float32", time_call(eigh_only, xj, repeats=repeats)),
    ]
    if jax.config.jax_enable_x64:
        x64, w64 = xj.astype(jnp.float64), wj.astype(jnp.float64)
        timed.append(("gcp_jax seb, float64, grad=exact", time_call(ours, x64, w64, repeats=repeats)))
    # agreement: our gradient against the reference's, on this rank-deficient input (M < d)
    g_ref = reference.seb_layer(x, weights)[1]
    g_ours = np.asarray(ours(xj, wj)[1])
    reference_s = timed[0][1]
    return {
        "features": list(LAYER_FEATURES),
        "rows": [{"name": name, "s": s, "speedup": reference_s / s} for name, s in timed],
        "grad_rel_diff": float(np.max(np.abs(g_ours - g_ref)) / np.max(np.abs(g_ref))),
    }


def main(argv: list[str]) -> int:
    p = common.parser("spectral", __doc__, repeats=5)
    p.add_argument("--batches", type=common.listed(int), default=[8, 32], help="Covariances per call (8,32).")
    p.add_argument("--dtypes", type=common.listed(), default=["float32", "float64"], help="(float32,float64).")
    p.add_argument(
        "--tables", type=common.listed(), default=list(TABLES), help=f"Tables to measure ({','.join(TABLES)})."
    )
    args = p.parse_args(argv)
    unknown = sorted(set(args.tables) - set(TABLES))
    if unknown:
        p.error(f"--tables: {', '.join(unknown)} unknown; the tables are {', '.join(TABLES)}.")
    if "float64" in args.dtypes and "functions" in args.tables:
        jax.config.update("jax_enable_x64", True)
    rows = function_rows(args.batches, args.dtypes, args.repeats) if "functions" in args.tables else []
    extra = {"family": family_rows(args.repeats)} if "family" in args.tables else {}
    if "layer" in args.tables:
        extra["layer"] = layer_result(args.repeats)
    rec = common.record("spectral", argv, machine_line(), rows, **extra)
    tables.print_record(rec)
    common.write_record(args.out, rec)
    return 0
