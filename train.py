"""Train (or evaluate) a GCP classifier.

  python train.py                                            # the demo: configs/demo.py, a few minutes on a CPU
  python train.py --config configs/aircraft.py --workdir runs/air
  python train.py --config configs/cub.py:resnet50 --workdir runs/cub_r50 --config.gcp.grad=pade
  python train.py --config configs/aircraft.py --workdir runs/air --config.eval_only=True

Any config field can be overridden with --config.<field>=<value> (fields: gcp_jax/config.py).
Multi-host (TPU pod, GPU cluster): run the same command on every host; give --coordinator_address,
--num_processes and --process_id (or the JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID environment variables), or --distributed to let JAX detect the cluster.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(_HERE, "configs", "demo.py"),
    "Config file with a get_config(); `file.py:arg` passes arg (e.g. configs/aircraft.py:resnet50).",
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


def parse_flags(argv):
    """absl flag parsing, with one-line errors for a missing config file or an unknown field."""
    try:
        rest = flags.FLAGS(argv)
        _CONFIG.value.keys()  # the config file is loaded lazily: its errors surface here
        return rest
    except flags.Error as e:
        message = str(e)
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a field the config lacks
        while isinstance(e, (AttributeError, KeyError)) and e.args and isinstance(e.args[0], BaseException):
            e = e.args[0]
        message = (
            f"unknown config field {str(e.args[0] if e.args else e).strip(chr(34))} in the --config.* "
            "overrides; every field is listed in gcp_jax/config.py."
        )
    except OSError as e:  # the config file could not be loaded
        reason = str(e).strip().splitlines()[-1].strip()
        message = f"cannot load the config file given by --config ({reason}); give --config path/to/config.py."
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # JAX and Orbax log much at INFO
    from gcp_jax import metrics, sharding, training  # after flag parsing: keeps --help fast

    sharding.initialize_distributed(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, force=_DISTRIBUTED.value
    )
    config = _CONFIG.value
    workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].config_filename)
    try:
        training.configure_jax(config)
        if config.eval_only:
            result = training.evaluate_checkpoint(config, workdir)
        else:
            result = training.train_and_evaluate(config, workdir)
    except (ValueError, FileNotFoundError, training.NonFiniteError) as e:
        if _TRACEBACK.value:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    metrics.log(summary(result))


def summary(result) -> str:
    """Where the results are, and the best and final accuracies of a training.RunResult."""
    from gcp_jax import metrics

    lines = []
    if result.final:
        label = "last eval" if result.preempted else f"final (step {result.step})"
        lines.append(f"{label}: {metrics.describe_eval(result.final)}")
    if result.best_step >= 0:
        lines.append(f"best: top1 {result.best_top1:.4f} at step {result.best_step}")
    lines += [
        f"metrics:     {os.path.join(result.workdir, 'metrics.jsonl')}",
        f"TensorBoard: tensorboard --logdir {os.path.join(result.workdir, 'tensorboard')}",
    ]
    if result.checkpoints:  # none when a weight file was evaluated as loaded
        lines.append(f"checkpoints: {result.checkpoints}  (config: {os.path.join(result.workdir, 'config.json')})")
    return "\n".join(lines)


if __name__ == "__main__":
    from gcp_jax import cpu_tuning

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the input pipeline's TensorFlow: errors only
    cpu_tuning.tune_process()  # before the config file imports numpy and JAX, which start threads
    app.run(main, flags_parser=parse_flags)
