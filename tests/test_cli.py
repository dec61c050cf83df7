"""train.py's command line: config mistakes in a few lines without a traceback, and a quiet start-up.

The config-error runs stop before any JAX work (a few seconds each); one tiny training run checks
what a user sees on stderr.
"""

import os
import re
import subprocess
import sys

import pytest

from gcp_jax import cli, run_config

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


def parse(*args):
    return cli.parse(["train.py", *args])


def problems(*args) -> str:
    with pytest.raises(cli.UsageError) as error:
        parse(*args)
    return str(error.value)


@pytest.mark.parametrize("config", [[], ["--config", "configs/demo.py"], ["--config=configs/demo.py"]])
def test_misspelled_field_is_one_sentence(config):
    assert problems(*config, "--config.optim.learnig_rate=0.1") == MISSPELLED


def test_every_override_problem_at_once():
    """Misspellings, a value its type cannot read and an impossible value: all listed, nothing else."""
    message = problems(
        "--config.optim.learnig_rate=0.1",
        "--config.batchsize=3",
        "--config.batch_size",  # the value as a separate argument
        "abc",
        "--config.optim.momentum=1.5",
    )
    assert message.splitlines() == [
        "4 problems in the config:",
        f"  - {MISSPELLED}",
        "  - config.batchsize is not a known field (did you mean config.batch_size?).",
        "  - config.batch_size='abc' is not an integer, e.g. --config.batch_size=32.",
        "  - config.optim.momentum must lie in [0, 1), got 1.5.",
    ]


def test_unreadable_value_is_one_sentence():
    assert problems("--config.eval_only=maybe") == "config.eval_only='maybe' is not True or False."


def test_overrides_of_every_type_and_form():
    """`=value`, a separate value, switches and their `--no` form, tuples; the rest is left for absl."""
    command = parse(
        "--config",
        "configs/cub.py:resnet50",
        "--config.optim.learning_rate",
        "0.5",
        "--config.eval_flip",
        "--noconfig.data.random_crop",
        "--config.optim.decay_epochs=(3, 7)",
        "--config.model.pretrained=w.pth",
        "--workdir=runs/x",
    )
    c = command.config
    assert (c.optim.learning_rate, c.eval_flip, c.data.random_crop) == (0.5, True, False)
    assert (c.optim.decay_epochs, c.model.pretrained, c.model.arch) == ((3, 7), "w.pth", "resnet50")
    assert command.overrides == {
        "optim.learning_rate": 0.5,
        "eval_flip": True,
        "data.random_crop": False,
        "optim.decay_epochs": (3, 7),
        "model.pretrained": "w.pth",
    }
    assert command.config_given and command.config_file == "configs/cub.py:resnet50"
    assert command.rest == ["train.py", "--config", "configs/cub.py:resnet50", "--workdir=runs/x"]
    assert cli.default_workdir(command.config_file) == os.path.join("runs", "cub_resnet50")


def test_the_demo_without_config():
    command = parse()
    assert not command.config_given and command.config_file == cli.DEMO_CONFIG and not command.overrides
    assert cli.default_workdir(command.config_file) == os.path.join("runs", "demo")


def test_config_file_mistakes_are_one_sentence(tmp_path):
    assert problems("--config=nowhere.py").startswith("cannot load the config file given by --config (")
    raising = tmp_path / "raising.py"
    raising.write_text("def get_config(arg=None):\n    raise ValueError(f'no protocol {arg!r}')\n")
    message = problems(f"--config={raising}:x")
    assert message == f"--config={raising}:x: get_config() raised ValueError: no protocol 'x'"


def test_the_config_file_is_locked():
    with pytest.raises(AttributeError):
        parse().config.optim.learnig_rate = 0.1


def test_bad_flags_exit_2_with_one_line(tmp_path):
    result = run_train("--config.optim.learnig_rate=0.1", f"--workdir={tmp_path}")
    assert (result.returncode, result.stderr) == (2, f"error: {MISSPELLED}\n")
    result = run_train(f"--workdir={tmp_path}", "--no_such_flag")
    assert result.returncode == 2 and result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1


def test_help_lists_the_flags_and_every_config_field():
    result = run_train("--help")
    assert result.returncode == 0 and "--workdir" in result.stdout and "(default: 'None')" not in result.stdout
    listed = {line.strip().split(" = ")[0] for line in result.stdout.splitlines() if " = " in line}
    assert listed == {line.split(" = ")[0] for line in cli.config_fields()}
    assert "optim.learning_rate" in listed and "eval_flip" in listed


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


def test_the_config_to_run_in_a_workdir_that_holds_a_run(tmp_path):
    """Without --config a run resumes with its saved config plus the overrides; eval_only takes only the eval
    overrides; with --config the command line's config is the one to run (the loop then checks the change)."""
    workdir = str(tmp_path)
    saved = parse("--config.optim.learning_rate=0.25").config
    run_config.save_config(saved, workdir)
    resumed = cli.config_to_run(parse("--config.num_epochs=9"), workdir)
    assert (resumed.optim.learning_rate, resumed.num_epochs) == (0.25, 9)
    evaluated = cli.config_to_run(parse("--config.eval_only=True", "--config.optim.momentum=0.5"), workdir)
    assert evaluated.eval_only and (evaluated.optim.learning_rate, evaluated.optim.momentum) == (0.25, 0.9)
    given = cli.config_to_run(parse("--config=configs/demo.py"), workdir)
    assert given.optim.learning_rate != 0.25
    assert cli.config_to_run(parse(), str(tmp_path / "new")).optim.learning_rate != 0.25
