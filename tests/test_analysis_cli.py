"""`python -m gcp_jax.analysis` on a workdir that the trainer wrote."""

import json

import pytest

from configs import demo
from gcp_jax import loop, metrics
from gcp_jax.analysis.cli import default_truncation_ns, main


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Two steps of resnet_tiny + 8-d SEB on 3 generated classes at 32 px."""
    c = demo.get_config()
    c.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
    c.data.synthetic.update(num_classes=3, train_per_class=4, test_per_class=3, image_size=32)
    c.data.resize_size = c.data.image_size = 32
    c.gcp.dim = 8
    c.batch_size = c.eval_batch_size = 8  # 8 fake devices
    c.num_epochs, c.num_train_steps, c.log_every_steps, c.spectrum_every_steps = 1, 2, 1, 1
    path = str(tmp_path_factory.mktemp("run"))
    loop.train_and_evaluate(c, path)
    return path


def test_cli_writes_spectra_truncation_and_attribution(workdir, tmp_path):
    out = str(tmp_path)
    main(["spectra", "--workdir", workdir, "--out", out, "--k", "2"])
    main(["truncation", "--workdir", workdir, "--out", out, "--ns", "0", "3"])
    main(["attribution", "--workdir", workdir, "--out", out, "--num_images", "2", "--rank", "2"])
    for name in ("spectra.png", "truncation.png", "attribution.png"):
        assert (tmp_path / name).stat().st_size > 5000, name
    report = json.loads((tmp_path / "spectra.json").read_text())
    assert report["images"] == 9 and report["mean"]["condition"] >= 1  # every test image once
    curve = json.loads((tmp_path / "truncation.json").read_text())
    assert set(curve) == {"smallest", "largest"} and set(curve["smallest"]) == {"0", "3"}
    assert curve["smallest"]["0"] == curve["largest"]["0"]


def test_training_logs_spectrum_summaries(workdir):
    records = [r for r in metrics.read_metrics(workdir) if r["split"] == "spectrum"]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["condition"] >= 1 and 1 <= r["effective_rank"] <= 8 + 1e-6 for r in records)


def test_cli_names_a_missing_workdir(tmp_path):
    with pytest.raises(SystemExit, match=r"config\.json not found"):
        main(["spectra", "--workdir", str(tmp_path / "nowhere")])


def test_default_truncation_grid():
    assert default_truncation_ns(256) == [0, 1, 2, 4, 8, 16, 32, 64, 128, 255]
    assert default_truncation_ns(8) == [0, 1, 2, 4, 7]
