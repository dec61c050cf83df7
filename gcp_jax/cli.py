"""train.py's command line: the --config file and its --config.<field> overrides, the config a run
uses (in a workdir that holds a run, its saved one), what the user is told at the end or on an error.

`parse` is pure (it returns a `Command` or raises `UsageError`), so the tests call it in-process;
absl parses the other flags (train.py). ml_collections' config flags are not used: they stop at the
first unknown field with a traceback, and a user should see every problem at once, one line each.
"""

from __future__ import annotations

import dataclasses
import errno
import importlib.util
import os
import re
import signal
from collections.abc import Sequence
from typing import Any

from absl import flags
from ml_collections import ConfigDict
from ml_collections.config_flags import tuple_parser

from gcp_jax import checkpoint, loop, metrics, run_config, stopping
from gcp_jax import config as config_lib

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py")
_OVERRIDE = re.compile(r"-{1,2}(no)?config\.")  # --config.<field>[=value] or --noconfig.<switch>
_CONFIG_FILE = re.compile(r"-{1,2}config(=|$)")
_PARSERS = {
    bool: flags.BooleanParser(),
    int: flags.IntegerParser(),
    float: flags.FloatParser(),
    str: flags.ArgumentParser(),
    tuple: tuple_parser.TupleParser(),
}


EXIT_ERROR = 1
EXIT_USAGE = 2
# train.py's exit statuses (docs/reliability.md shows this table; a test keeps them equal).
EXIT_STATUSES = {
    0: "the run completed (or `eval_only` evaluated)",
    EXIT_ERROR: "an error with a one-line message: config, data, weights, a damaged checkpoint for `eval_only`, too "
    "many non-finite steps, a full disk",
    EXIT_USAGE: "a command-line flag or config file that cannot be parsed",
    stopping.EXIT_HUNG: "the watchdog: no step finished within `step_timeout_s`",
    stopping.exit_code(signal.SIGINT): "stopped by SIGINT (Ctrl-C) before the last step; a checkpoint was saved "
    "unless it came before the first step finished or was a second signal",
    stopping.exit_code(signal.SIGTERM): "stopped by SIGTERM before the last step; a checkpoint was saved as for SIGINT",
}


class UsageError(ValueError):
    """A mistake on the command line; its message lists every problem, one sentence each."""


@dataclasses.dataclass(frozen=True)
class Command:
    """What the command line asks for, config-wise."""

    config: ConfigDict  # the --config file's config with the overrides applied
    config_file: str  # `path[:arg]` as given, or the demo's
    config_given: bool  # whether --config was given (without it, a workdir's saved config is resumed)
    overrides: dict[str, Any]  # {"optim.learning_rate": 0.1, ...} in the order given
    rest: list[str]  # the other arguments (argv[0] first), for absl


def parse(argv: Sequence[str]) -> Command:
    """The config file and overrides of `argv` (flag files already expanded); UsageError on any mistake.

    The unknown fields and unreadable values are all reported together, and with them the impossible
    values of the rest (the devices are not known yet: one is assumed); impossible values alone are
    left to `config.validate`, which runs before anything is computed.
    """
    argv = list(argv)
    files = [i for i, arg in enumerate(argv) if _CONFIG_FILE.match(arg)]
    config_file = DEMO_CONFIG
    if files:
        arg = argv[files[-1]]
        config_file = arg.partition("=")[2] if "=" in arg else (argv[files[-1] + 1 : files[-1] + 2] or [""])[0]
    config = load_config_file(config_file)
    rest, given = _split(argv, lambda field: _is_switch(config, field))
    unknown = config_lib.unknown_overrides(config, [field for field, _ in given])
    overrides, problems = {}, list(unknown.values())
    for field, text in given:
        if field in unknown:
            continue
        try:
            value = _PARSERS[config_lib.field_type(config, field)].parse(text)
        except (KeyError, ValueError):
            problems.append(config_lib.unreadable_override(config, field, text))
            continue
        group, _, name = field.rpartition(".")
        (config_lib.field_value(config, group))[name] = value
        overrides[field] = value
    if problems:
        problems += config_lib.value_problems(config, num_devices=1)
        raise UsageError(config_lib.describe(problems))
    return Command(config, config_file, bool(files), overrides, rest)


def load_config_file(config_file: str) -> ConfigDict:
    """`get_config(arg)` of the file `path:arg` (`get_config()` without `:arg`), locked: a misspelt field
    set later raises instead of adding a field."""
    path, _, arg = config_file.partition(":")
    try:
        spec = importlib.util.spec_from_file_location("gcp_jax_config_file", path)
        if spec is None:
            raise OSError(f"{path!r} is not a Python file")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except OSError as e:
        raise UsageError(
            f"cannot load the config file given by --config ({e}); give --config path/to/config.py."
        ) from e
    try:
        config = module.get_config(*([arg] if arg else []))
    except Exception as e:
        raise UsageError(f"--config={config_file}: get_config() raised {type(e).__name__}: {e}") from e
    config.lock()
    return config


def _is_switch(config: ConfigDict, field: str) -> bool:
    """Whether `--config.<field>` alone means True (a known bool field)."""
    return not config_lib.unknown_overrides(config, [field]) and config_lib.field_type(config, field) is bool


def _split(argv: list[str], is_switch) -> tuple[list[str], list[tuple[str, str]]]:
    """(the other arguments, [(field, value)] of the --config.<field> overrides in order, values as text).

    `--config.f v` gives ("f", "v"), except for a field where `is_switch(f)`: `--config.f` gives
    ("f", "True") and `--noconfig.f` ("f", "False").
    """
    others, overrides, args = [], [], iter(argv)
    for arg in args:
        if not _OVERRIDE.match(arg):
            others.append(arg)
            continue
        name, equals, value = arg.partition("=")
        field = name.split(".", 1)[1]
        if not equals:
            value = str(not name.lstrip("-").startswith("no")) if is_switch(field) else next(args, "")
        overrides.append((field, value))
    return others, overrides


def default_workdir(config_file: str) -> str:
    """runs/<config file stem>[_<arg>] for `--config path[:arg]`."""
    path, _, arg = config_file.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", f"{name}_{arg}" if arg else name)


def config_to_run(command: Command, workdir: str) -> ConfigDict:
    """The config to run: the command line's, except where workdir holds a run.

    There, eval_only evaluates with the run's saved config (only eval overrides such as
    --config.data.eval_split apply), and training without --config resumes with the saved config
    plus the overrides given (a changed model, data or optimiser is then refused by the loop).
    In a workdir without a run, eval_only evaluates the --config model (e.g. a weight file as loaded).
    """
    config = command.config
    if not run_config.saved_config_path(workdir):  # a new run, or eval_only of a weight file
        return config
    if config.eval_only:
        return run_config.load_config_with(workdir, command.overrides, eval_only=True)
    if not command.config_given:
        return run_config.load_config_with(workdir, command.overrides)
    return config


def user_error(error: Exception, workdir: str) -> str | None:
    """The message of an error the user can fix (a mistake, a full disk), or None for a bug."""
    if disk_full(error):
        return (
            f"no space left on the disk holding {os.path.abspath(workdir)}; free some space, then run the same "
            "command: the run resumes from its last complete checkpoint."
        )
    if isinstance(error, (ValueError, FileNotFoundError, loop.NonFiniteError)):
        return str(error)
    return None


def disk_full(error: BaseException | None) -> bool:
    """Whether `error` or one of its causes is a full disk (Orbax and TensorStore wrap ENOSPC in other errors)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if getattr(error, "errno", None) == errno.ENOSPC or checkpoint.DISK_FULL in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def summary(result) -> str:
    """Where the results are, and the best and final accuracies of an assembly.RunResult."""
    lines = []
    if result.stopped_by is not None:
        lines.append(
            f"stopped by {result.stopped_by.name} at step {result.step} with a checkpoint; run the same command "
            "to resume."
        )
    if result.final:
        label = "last eval" if result.preempted else f"final (step {result.step})"
        lines.append(f"{label}: {metrics.describe_eval(result.final)}")
    if result.best_step >= 0:
        lines.append(f"best: top1 {result.best_top1:.4f} at step {result.best_step}")
    lines += [
        f"metrics:     {os.path.join(result.workdir, metrics.METRICS_FILE)}",
        f"TensorBoard: tensorboard --logdir {os.path.join(result.workdir, metrics.TENSORBOARD_DIR)}",
    ]
    if result.checkpoints:  # none when a weight file was evaluated as loaded
        lines.append(f"checkpoints: {result.checkpoints}  (config: {run_config.saved_config_path(result.workdir)})")
    return "\n".join(lines)


FIELDS_HEADING = "\nconfig fields (--config.<field>=<value>; the defaults of gcp_jax/config.py):"


def config_fields(config: ConfigDict | None = None, prefix: str = "") -> list[str]:
    """`field = value` for every field of `config` (default: gcp_jax.config's), dotted, in order."""
    config = config_lib.get_config() if config is None else config
    lines = []
    for key, value in config.items():
        if isinstance(value, ConfigDict):
            lines += config_fields(value, f"{prefix}{key}.")
        else:
            lines.append(f"{prefix}{key} = {value!r}")
    return lines
