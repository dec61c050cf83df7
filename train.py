"""Train (or evaluate) a GCP classifier.

  python train.py                                            # the demo: configs/demo.py in runs/demo, ~2 min on 2 cores
  python train.py --config configs/aircraft.py --workdir runs/air
  python train.py --config configs/cub.py:resnet50 --workdir runs/cub_r50 --config.gcp.grad=pade
  python train.py --config configs/aircraft.py --workdir runs/air --config.eval_only=True

Any config field can be overridden with --config.<field>=<value> (fields: gcp_jax/config.py);
unknown fields and values of the wrong type or impossible ones are reported together, one line
each, before anything runs. Give every run its own --workdir: a run resumes from what it finds there.
Exit status: 0 done; 1 an error (one line); 2 bad flags; 124 no step finished within
config.step_timeout_s; 130 / 143 stopped by SIGINT / SIGTERM before the last step (README: Reliability).
Multi-host (TPU pod, GPU cluster): run the same command on every host; give --coordinator_address,
--num_processes and --process_id (or the JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID environment variables), or --distributed to let JAX detect the cluster.
"""

import errno
import os
import re
import shlex
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


_DEMO_CONFIG = os.path.join(_HERE, "configs", "demo.py")
# The command line ml_collections reads the --config.<field> overrides from (parse_flags fills it).
_COMMAND_LINE: list[str] = []
_CONFIG_GIVEN = [True]  # whether the command line named a --config file (parse_flags sets it)
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,  # parse_flags adds --config=configs/demo.py when absent: a default here would be loaded at import
    "Config file with a get_config() (default configs/demo.py); `file.py:arg` passes arg "
    "(e.g. configs/aircraft.py:resnet50).",
    sys_argv=_COMMAND_LINE,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: checkpoints, metrics, config.json. Default: runs/<config name>."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"), "host:port of process 0, for multi-process runs."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", _env_int("JAX_NUM_PROCESSES"), "Number of processes of a multi-process run."
)
_PROCESS_ID = flags.DEFINE_integer("process_id", _env_int("JAX_PROCESS_ID"), "This process's index (0 first).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() and let JAX detect the cluster (Cloud TPU, SLURM, Open MPI, ...).",
)
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show the full traceback of configuration and data errors.")


def default_workdir(config_path: str) -> str:
    """runs/<config file stem>[_<arg>] for `--config path[:arg]`."""
    path, _, arg = config_path.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", f"{name}_{arg}" if arg else name)


_OVERRIDE = re.compile(r"-{1,2}(no)?config\.")  # how ml_collections tells a --config.<field> override
_CONFIG_FLAG = re.compile(r"-{1,2}config(=|$)")


def parse_flags(argv):
    """absl flag parsing; a config mistake exits with every problem listed, one sentence each, no traceback."""
    argv = argv[:1] + flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)
    _CONFIG_GIVEN[:] = [any(_CONFIG_FLAG.match(arg) for arg in argv)]
    if not _CONFIG_GIVEN[0]:
        argv.insert(1, f"--config={_DEMO_CONFIG}")
    try:
        rest, message = _parse(argv)
    except flags.Error as e:
        message = str(e)
        if ": Error whilst parsing config file" in message:  # get_config() raised; the last line says what
            head = message.split(": Error whilst parsing config file", 1)[0]
            message = f"{head}: get_config() raised {message.strip().splitlines()[-1]}"
        message = " ".join(message.split())
    except OSError as e:  # the config file could not be loaded
        reason = str(e).strip().splitlines()[-1].strip()
        message = f"cannot load the config file given by --config ({reason}); give --config path/to/config.py."
    if not message:
        return rest
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _parse(argv):
    """(the arguments absl leaves, a message listing every problem of the --config.<field> overrides, or "").

    The config file is loaded first without the overrides, so that every unknown field is found
    (ml_collections would stop at the first, with a traceback); then the known ones are parsed, and
    when anything was wrong, the resulting values are checked too.
    """
    from gcp_jax import config as config_lib  # not at the top: the CPU tuning comes before JAX

    _COMMAND_LINE[:] = [arg for arg in argv if not _OVERRIDE.match(arg)]
    flags.FLAGS(list(_COMMAND_LINE), known_only=True)
    base = _CONFIG.value
    base.keys()  # a config file that failed to load raises here
    unknown = config_lib.unknown_overrides(base, [_field(arg) for arg in argv if _OVERRIDE.match(arg)])

    def is_switch(field):
        return field not in unknown and config_lib.field_type(base, field) is bool

    others, overrides = _split_overrides(argv, is_switch)
    rest, unreadable = _parse_overrides(others, [(f, v) for f, v in overrides if f not in unknown])
    problems = list(unknown.values()) + [config_lib.unreadable_override(base, f, v) for f, v in unreadable]
    if problems:
        problems += config_lib.value_problems(_CONFIG.value, num_devices=1)  # the devices are not known yet
    return rest, config_lib.describe(problems) if problems else ""


def _parse_overrides(others, overrides):
    """absl parsing of `others` and the (field, value) overrides: (the arguments it leaves, the
    overrides whose value the field's type cannot read, which are left out)."""
    unreadable = []
    while True:
        _COMMAND_LINE[:] = [*others, *(f"--config.{field}={value}" for field, value in overrides)]
        try:
            return flags.FLAGS(list(_COMMAND_LINE)), unreadable
        except flags.IllegalFlagValueError as e:
            bad = [(field, value) for field, value in overrides if str(e).startswith(f"flag --config.{field}=")]
            if not bad:
                raise
            unreadable.append(bad[-1])
            overrides = [(field, value) for field, value in overrides if field != bad[-1][0]]
            for name in [name for name in flags.FLAGS if name.startswith("config.")]:
                delattr(flags.FLAGS, name)  # ml_collections defines them again on the next parse


def _field(arg: str) -> str:
    """The dotted field of an override: `--config.optim.learning_rate=0.1` → `optim.learning_rate`."""
    return arg.partition("=")[0].split(".", 1)[1]


def _split_overrides(argv, is_switch):
    """(the other arguments, [(field, value)] of the --config.<field> overrides in order, values as strings).

    `--config.f v` gives ("f", "v"), except for a field where `is_switch(f)` (a bool): `--config.f`
    gives ("f", "True") and `--noconfig.f` ("f", "False").
    """
    others, overrides, args = [], [], iter(argv)
    for arg in args:
        if not _OVERRIDE.match(arg):
            others.append(arg)
            continue
        field, (name, equals, value) = _field(arg), arg.partition("=")
        if not equals:
            value = str(not name.lstrip("-").startswith("no")) if is_switch(field) else next(args, "")
        overrides.append((field, value))
    return others, overrides


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # JAX and Orbax log much at INFO
    from gcp_jax import metrics, sharding, stopping, training  # after flag parsing: keeps --help fast

    sharding.initialize_distributed(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, force=_DISTRIBUTED.value
    )
    workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].config_filename)
    try:
        config = run_config(workdir)
        training.configure_jax(config)
        if config.eval_only:
            result = training.evaluate_checkpoint(config, workdir)
        else:
            result = training.train_and_evaluate(config, workdir)
    except Exception as e:
        message = user_error(e, workdir)
        if message is None or _TRACEBACK.value:
            raise
        stopping.exit_now(f"error: {message}", 1)  # no teardown: nothing more is printed
    metrics.log(summary(result))
    if result.stopped_by is not None:
        sys.exit(stopping.exit_code(result.stopped_by))


def user_error(error: Exception, workdir: str) -> str | None:
    """The message of an error the user can fix (a mistake, a full disk), or None for a bug."""
    from gcp_jax import training

    if disk_full(error):
        return (
            f"no space left on the disk holding {os.path.abspath(workdir)}; free some space, then run the same "
            "command: the run resumes from its last complete checkpoint."
        )
    if isinstance(error, (ValueError, FileNotFoundError, training.NonFiniteError)):
        return str(error)
    return None


def disk_full(error: BaseException | None) -> bool:
    """Whether `error` or one of its causes is a full disk (Orbax and TensorStore wrap ENOSPC in other errors)."""
    from gcp_jax import checkpoint

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if getattr(error, "errno", None) == errno.ENOSPC or checkpoint.DISK_FULL in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def run_config(workdir: str):
    """The config to run: the --config file and overrides, except where workdir holds a run.

    There, eval_only evaluates with the run's saved config (only eval overrides such as
    --config.data.eval_split apply), and training without --config resumes with the saved config
    plus the overrides given (a changed model, data or optimiser is then refused by the loop).
    In a workdir without a run, eval_only evaluates the --config model (e.g. a weight file as loaded).
    """
    from ml_collections.config_flags import get_override_values

    from gcp_jax import training

    config, overrides = _CONFIG.value, get_override_values(flags.FLAGS["config"])
    if not training.saved_config_path(workdir):  # a new run, or eval_only of a weight file
        return config
    if config.eval_only:
        return training.run_config(workdir, overrides, eval_only=True)
    if not _CONFIG_GIVEN[0]:
        return training.run_config(workdir, overrides)
    return config


def summary(result) -> str:
    """Where the results are, and the best and final accuracies of a training.RunResult."""
    from gcp_jax import metrics, training

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
        f"metrics:     {os.path.join(result.workdir, 'metrics.jsonl')}",
        f"TensorBoard: {shlex.join(['tensorboard', '--logdir', os.path.join(result.workdir, 'tensorboard')])}",
    ]
    if result.checkpoints:  # none when a weight file was evaluated as loaded
        lines.append(f"checkpoints: {result.checkpoints}  (config: {training.saved_config_path(result.workdir)})")
    return "\n".join(lines)


def cli() -> None:
    """`python train.py`: SIGINT/SIGTERM handled from the first moment (gcp_jax.stopping), then absl's app."""
    from gcp_jax import cpu_tuning, stopping

    stopping.install()  # first: SIGINT/SIGTERM during the imports and compilation below exit cleanly
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the input pipeline's TensorFlow: errors only
    cpu_tuning.tune_process()  # before the config file imports numpy and JAX, which start threads
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    cli()
