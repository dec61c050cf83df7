"""train.py's command line: config mistakes in a few lines without a traceback, and a quiet start-up.

The config-error runs stop before any JAX work (a few seconds each); one tiny training run checks
what a user sees on stderr.
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISSPELLED = "config.optim.learnig_rate is not a known field (did you mean config.optim.learning_rate?)."


def run_train(*flags, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), *flags],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env={**os.environ, "JAX_PLATFORMS": "cpu"} if env is None else env,
    )


@pytest.mark.parametrize("config", [[], ["--config", "configs/demo.py"]], ids=["default config", "--config"])
def test_misspelled_field_is_one_line(config, tmp_path):
    result = run_train(*config, "--config.optim.learnig_rate=0.1", f"--workdir={tmp_path}")
    assert (result.returncode, result.stderr) == (2, f"error: {MISSPELLED}\n")


def test_every_override_problem_at_once(tmp_path):
    """Misspellings, a value its type cannot read and an impossible value: all listed, nothing else."""
    result = run_train(
        "--config.optim.learnig_rate=0.1",
        "--config.batchsize=3",
        "--config.batch_size",  # the value as a separate argument
        "abc",
        "--config.optim.momentum=1.5",
        f"--workdir={tmp_path}",
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: 4 problems in the config:",
        f"  - {MISSPELLED}",
        "  - config.batchsize is not a known field (did you mean config.batch_size?).",
        "  - config.batch_size='abc' is not an integer, e.g. --config.batch_size=32.",
        "  - config.optim.momentum must lie in [0, 1), got 1.5.",
    ]


def test_unreadable_value_is_one_line(tmp_path):
    result = run_train("--config.eval_only=maybe", f"--workdir={tmp_path}")
    assert (result.returncode, result.stderr) == (2, "error: config.eval_only='maybe' is not True or False.\n")


def test_impossible_value_is_one_line(tmp_path):
    result = run_train("--config", "configs/demo.py", "--config.gcp.norm=cholesky", f"--workdir={tmp_path}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: config.gcp.norm='cholesky' is not one of sqrt, seb")


# What TensorFlow, absl and TFDS print on their own at start-up, which a user cannot act on.
NOISE = re.compile(
    r"absl::InitializeLog|oneDNN custom operations|cpu_feature_guard|This TensorFlow binary is optimized"
    r"|is deprecated|Downloading and preparing|^[IWE]\d{4} ",
    re.M,
)


def test_start_up_is_quiet(tmp_path):
    """The demo's start-up up to a ready data set (TensorFlow, TFDS, generating the data): nothing on stderr
    but the one error this run ends with (a batch larger than the data set, before any compilation)."""
    # One device, and no TF_CPP_MIN_LOG_LEVEL from conftest: train.py must quieten TensorFlow itself.
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "XLA_FLAGS")}
    result = run_train(
        f"--workdir={tmp_path / 'run'}",
        f"--config.data.data_dir={tmp_path / 'tfds'}",
        "--config.data.synthetic.num_classes=2",
        "--config.data.synthetic.train_per_class=4",
        "--config.data.synthetic.test_per_class=2",
        "--config.data.synthetic.image_size=32",
        "--config.batch_size=16",
        env={**env, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 1 and not NOISE.findall(result.stderr), result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: config.batch_size=16 ")
