"""`python -m bench NAME [flags]` runs one benchmark (see bench.cli), in a process tuned before numpy and JAX start."""

import sys

from gcp_jax import cpu_tuning

if __name__ == "__main__":
    cpu_tuning.tune_process()  # before numpy and JAX start their threads
    from gcp_jax import compile_cache

    compile_cache.enable()  # as train.py: compiled programs reused across runs (JAX_COMPILATION_CACHE_DIR moves it)
    from bench import cli

    sys.exit(cli.main(sys.argv[1:]))
