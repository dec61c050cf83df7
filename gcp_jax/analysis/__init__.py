"""Analyses of trained GCP models: spectra, the truncation experiment, attribution maps.

CLI: `python -m gcp_jax.analysis {spectra,truncation,attribution} --workdir W`.
"""

from gcp_jax.analysis.attribution import (
    attribution_maps,
    gradcam_maps,
    gradient_input_maps,
    occlusion_maps,
    part_scores,
)
from gcp_jax.analysis.spectra import collect, per_class_log_spectrum
from gcp_jax.analysis.truncation import truncate_spectrum, truncated_logits, truncation_curve
from gcp_jax.spectrum import covariances, eigenvalues, mean_summary, summarize

__all__ = [
    "attribution_maps",
    "collect",
    "covariances",
    "eigenvalues",
    "gradcam_maps",
    "gradient_input_maps",
    "mean_summary",
    "occlusion_maps",
    "part_scores",
    "per_class_log_spectrum",
    "summarize",
    "truncate_spectrum",
    "truncated_logits",
    "truncation_curve",
]
