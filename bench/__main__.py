"""`python -m bench NAME [flags]` runs one benchmark (see bench.cli), in a process tuned before numpy and JAX start."""

import sys

from gcp_jax import cpu_tuning

if __name__ == "__main__":
    cpu_tuning.tune_process()  # before numpy and JAX start their threads
    # Process-wide JAX set-up shared by every benchmark belongs here, before bench.cli imports JAX
    # (e.g. the persistent compilation cache, once gcp_jax has its helper).
    from bench import cli

    sys.exit(cli.main(sys.argv[1:]))
