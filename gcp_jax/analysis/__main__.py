"""`python -m gcp_jax.analysis {spectra,truncation,attribution} --workdir W` (see gcp_jax.analysis.cli)."""

import sys

from gcp_jax import cpu_tuning

if __name__ == "__main__":
    cpu_tuning.tune_process()  # before numpy and JAX start their threads
    from gcp_jax.analysis import cli

    sys.exit(cli.main())
