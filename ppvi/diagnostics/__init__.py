"""Diagnostics of variational fits: Pareto smoothed importance sampling (:mod:`ppvi.diagnostics.psis`)."""

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
    "PSISWarning",
    "fit_generalized_pareto",
    "generalized_pareto_quantile",
    "khat_threshold",
    "khat_verdict",
    "psis",
    "psis_effective_sample_size",
    "tail_length",
]
