"""Train (or evaluate) a GCP classifier.

  python train.py                                            # the demo: configs/demo.py in runs/demo, ~2 min on 2 cores
  python train.py --config configs/aircraft.py --workdir runs/air
  python train.py --config configs/cub.py:resnet50 --workdir runs/cub_r50 --config.gcp.grad=pade
  python train.py --config configs/aircraft.py --workdir runs/air --config.eval_only=True

Any config field can be overridden with --config.<field>=<value> (the fields are listed below and
documented in gcp_jax/config.py); every mistake is reported at once, one line each, before
anything runs. Give every run its own --workdir: a run resumes from what it finds there.
Exit status: 0 done; 1 an error (one line); 2 bad flags; 124 no step finished within
config.step_timeout_s; 130 / 143 stopped by SIGINT / SIGTERM before the last step (docs/reliability.md).
Multi-host (TPU pod, GPU cluster): run the same command on every host with --coordinator_address,
--num_processes and --process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID),
or with --distributed to let JAX detect the cluster.
"""

import os
import sys

from absl import app, flags, logging

from gcp_jax import cpu_tuning, stopping  # neither imports JAX: the CPU tuning must come first


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


flags.DEFINE_string("config", "configs/demo.py", "Config file with a get_config(); `file.py:arg` passes arg.")
WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (checkpoints, metrics, config.json); without it, runs/<config file name>."
)
COORDINATOR = flags.DEFINE_string(
    "coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"), "host:port of process 0 (multi-process)."
)
NUM_PROCESSES = flags.DEFINE_integer("num_processes", _env_int("JAX_NUM_PROCESSES"), "Processes of the run.")
PROCESS_ID = flags.DEFINE_integer("process_id", _env_int("JAX_PROCESS_ID"), "This process's index (0 first).")
DISTRIBUTED = flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() detects the cluster.")
TRACEBACK = flags.DEFINE_bool("traceback", False, "Show the full traceback of configuration and data errors.")
HELP = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull")


def parse_flags(argv):
    """The `cli.Command` of argv; --help lists the flags and config fields; a mistake exits 2 with one line each."""
    from gcp_jax import cli  # here, not at the top: it imports JAX

    argv = argv[:1] + flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)
    if any(arg in HELP for arg in argv):
        print(__doc__, flags.FLAGS.main_module_help(), cli.FIELDS_HEADING, *cli.config_fields(), sep="\n  ")
        sys.exit(0)
    try:
        command = cli.parse(argv)
        unexpected = flags.FLAGS(command.rest)[1:]
    except (cli.UsageError, flags.Error) as e:
        print(f"error: {' '.join(str(e).split()) if isinstance(e, flags.Error) else e}", file=sys.stderr)
        sys.exit(cli.EXIT_USAGE)
    if unexpected:
        print(f"error: unexpected arguments: {' '.join(unexpected)}", file=sys.stderr)
        sys.exit(cli.EXIT_USAGE)
    return command


def main(command):
    from gcp_jax import assembly, cli, loop, metrics, sharding

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # JAX and Orbax log much at INFO
    sharding.initialize_distributed(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value, force=DISTRIBUTED.value)
    workdir = WORKDIR.value or cli.default_workdir(command.config_file)
    try:
        config = cli.config_to_run(command, workdir)
        assembly.configure_jax(config)
        run = loop.evaluate_checkpoint if config.eval_only else loop.train_and_evaluate
        result = run(config, workdir)
    except Exception as e:
        message = cli.user_error(e, workdir)
        if message is None or TRACEBACK.value:
            raise
        stopping.exit_now(f"error: {message}", cli.EXIT_ERROR)  # no teardown: nothing more is printed
    metrics.log(cli.summary(result))
    if result.stopped_by is not None:
        sys.exit(stopping.exit_code(result.stopped_by))


def start() -> None:
    """SIGINT/SIGTERM handled from the first moment (gcp_jax.stopping), the CPU tuned, then absl's app."""
    stopping.install()  # first: SIGINT/SIGTERM during the imports and compilation below exit cleanly
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the input pipeline's TensorFlow: errors only
    cpu_tuning.tune_process()  # before the config file imports numpy and JAX, which start threads
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    start()
