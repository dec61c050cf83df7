"""Analyses on a tiny model trained a few steps: spectra, truncation, attribution maps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gcp_jax import analysis
from gcp_jax.analysis import plots
from gcp_jax.models import create_model

NUM_CLASSES = 3


@pytest.fixture(scope="module")
def trained():
    """resnet_tiny + SEB head (d = 8), 20 SGD steps on 16 random 32-px images of 3 classes."""
    model = create_model("resnet_tiny", num_classes=NUM_CLASSES, head="gcp", gcp={"dim": 8, "norm": "seb"})
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(16, 32, 32, 3)), jnp.float32)
    labels = jnp.asarray(np.arange(16) % NUM_CLASSES)
    variables = model.init(jax.random.key(0), images[:1])
    tx = optax.sgd(0.05, momentum=0.9)

    @jax.jit
    def step(params, batch_stats, opt_state):
        def loss(p):
            logits, updates = model.apply(
                {"params": p, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

        (value, updates), grads = jax.value_and_grad(loss, has_aux=True)(params)
        changes, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, changes), updates["batch_stats"], opt_state, value

    params, batch_stats, opt_state = variables["params"], variables["batch_stats"], tx.init(variables["params"])
    for _ in range(20):
        params, batch_stats, opt_state, value = step(params, batch_stats, opt_state)
    assert np.isfinite(float(value))
    return model, {"params": params, "batch_stats": batch_stats}, np.asarray(images), np.asarray(labels)


def test_spectra_shapes_and_summaries(trained):
    model, variables, images, labels = trained
    eigs = np.asarray(analysis.eigenvalues(model, variables, jnp.asarray(images)))
    assert eigs.shape == (16, 8) and np.all(np.diff(eigs, axis=1) >= 0)
    summary = analysis.summarize(eigs, k=2)
    assert np.all(summary["condition"] >= 1) and np.all((summary["small_share"] >= 0) & (summary["small_share"] <= 1))
    assert np.all((summary["effective_rank"] >= 1) & (summary["effective_rank"] <= 8 + 1e-6))
    per_class = analysis.per_class_log_spectrum(eigs, labels, NUM_CLASSES + 1)
    assert per_class.shape == (4, 8) and np.all(np.isnan(per_class[3])) and np.all(np.isfinite(per_class[:3]))


def test_truncating_nothing_reproduces_the_model(trained):
    model, variables, images, labels = trained
    x = jnp.asarray(images)
    np.testing.assert_allclose(analysis.truncated_logits(model, variables, x, 0), model.apply(variables, x), rtol=1e-6)
    batches = [
        {"image": images[:10], "label": labels[:10]},
        {"image": images[8:], "label": labels[8:], "mask": np.arange(8) >= 2},
    ]  # 2 padded duplicates
    curve = analysis.truncation_curve(model, variables, batches, [0, 2, 7], "smallest")
    accuracy = float(np.mean(np.argmax(np.asarray(model.apply(variables, x)), -1) == labels))
    assert curve[0] == (0, pytest.approx(accuracy))
    assert [n for n, _ in curve] == [0, 2, 7] and all(0 <= a <= 1 for _, a in curve)


def test_truncating_changes_the_spectrum_as_asked(trained):
    model, variables, images, _ = trained
    cov = analysis.covariances(model, variables, jnp.asarray(images[:2]))
    lam = np.linalg.eigvalsh(np.asarray(cov))
    for which, kept in (("smallest", slice(3, None)), ("largest", slice(0, 5))):
        truncated = np.linalg.eigvalsh(np.asarray(analysis.truncate_spectrum(cov, 3, which)))
        floor = np.finfo(np.float32).eps * lam[:, -1:]
        np.testing.assert_allclose(
            np.sort(truncated, axis=1)[:, 3:] if which == "smallest" else truncated[:, :5],
            np.maximum(lam[:, kept], floor),
            rtol=1e-3,
            atol=1e-6,
        )


def test_part_scores_add_up_to_the_logit(trained):
    model, variables, images, _ = trained
    x = jnp.asarray(images[:4])
    scores = np.asarray(analysis.part_scores(model, variables, x, 1, rank=3))
    bias = float(variables["params"]["classifier"]["bias"][1])
    np.testing.assert_allclose(
        scores.sum(axis=1) - bias, np.asarray(model.apply(variables, x))[:, 1], rtol=1e-4, atol=1e-5
    )


def test_attribution_maps_are_finite_deterministic_and_flat_on_constant_images(trained, tmp_path):
    model, variables, images, labels = trained
    maps = analysis.attribution_maps(model, variables, images[0], int(labels[0]), 3)
    again = analysis.attribution_maps(model, variables, images[0], int(labels[0]), 3)
    for name, value in maps.items():
        assert value.shape == (2, 32, 32) and np.all(np.isfinite(value)), name
        np.testing.assert_array_equal(value, again[name])
        assert np.max(np.abs(value)) > 0, name
    constant = np.full((32, 32, 3), 0.5, np.float32)
    flat = analysis.occlusion_maps(model, variables, constant, 0, 3)
    assert np.max(np.abs(flat)) < 1e-5  # blurring a constant image changes nothing
    path = plots.plot_attribution_grid([images[0]], [maps], str(tmp_path / "grid.png"), titles=["x"])
    assert (tmp_path / "grid.png").stat().st_size > 1000 and path.endswith("grid.png")


def test_gap_model_is_rejected_with_a_clear_message():
    model = create_model("resnet_tiny", num_classes=2, head="gap")
    x = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match="GCP head"):
        analysis.eigenvalues(model, model.init(jax.random.key(0), x), x)


def test_plots_hide_no_curve_and_say_in_words_what_they_show():
    curves = {"smallest": [(0, 0.99), (4, 0.99), (31, 0.99)], "largest": [(0, 0.99), (4, 0.1), (31, 0.1)]}
    fig = plots.truncation_figure(curves, baseline=0.99)
    fig.canvas.draw()
    ax = fig.axes[0]
    assert not ax.get_legend().get_window_extent().overlaps(ax.get_window_extent())  # below the axes
    assert "the smallest n set to ε" in [t.get_text() for t in ax.get_legend().get_texts()]

    rng = np.random.default_rng(0)
    images = [rng.normal(size=(8, 8, 3)).astype(np.float32) for _ in range(2)]
    maps = [{"occlusion": rng.normal(size=(2, 8, 8)), "gradcam": rng.uniform(size=(2, 8, 8))} for _ in images]
    fig = plots.attribution_figure(images, maps, titles=["class a", "class b"], rank=4, dim=32)
    titles = [a.get_title() for a in fig.axes]
    assert "occlusion\n(score drop, patch blurred)\nthe 4 largest eigenvalues" in titles
    assert "Grad-CAM\n(last backbone stage)\nthe other 28 eigenvalues" in titles
    bars = [a for a in fig.axes if a.get_label() == "<colorbar>"]
    assert len(bars) == 4  # one per map column
    assert [b.get_xlim()[0] for b in bars] == [-1, -1, 0, 0]  # signed occlusion, non-negative Grad-CAM
