"""Diagnostics of variational fits: Pareto smoothed importance sampling (:mod:`ppvi.diagnostics.psis`) and the
diagnosis built on it (:mod:`ppvi.diagnostics.diagnosis`)."""

from ppvi.diagnostics.diagnosis import Diagnosis, diagnose, resample
from ppvi.diagnostics.psis import (
    PSISWarning,
    fit_generalized_pareto,
    generalized_pareto_quantile,
    khat_threshold,
    khat_verdict,
    psis,
    psis_effective_sample_size,
    tail_length,
)

__all__ = [
    "Diagnosis",
    "PSISWarning",
    "diagnose",
    "fit_generalized_pareto",
    "generalized_pareto_quantile",
    "khat_threshold",
    "khat_verdict",
    "psis",
    "psis_effective_sample_size",
    "resample",
    "tail_length",
]
