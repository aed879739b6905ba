"""Full-rank Gaussian solvers that need far fewer gradient evaluations than ADVI.

Each solver is a module of pure functions on tensors with NamedTuple states, in the style of blackjax's ``vi/``
modules: ``init(log_density, loc, scale_tril) -> State``, ``step(state, log_density, generator, **options) ->
(State, Info)``, and ``run(log_density, initial_loc, initial_scale_tril, ...) -> Result`` with ``loc``,
``scale_tril``, ``iterations``, ``gradient_evaluations`` and ``converged``.

* :mod:`ppvi.solvers.batch_and_match`: batch and match (Cai et al. 2024), closed-form proximal steps on a
  score-based divergence; the recommended solver (see ``benchmarks/README.md``).
* :mod:`ppvi.solvers.gaussian_score_matching`: GSM-VI (Modi et al. 2023), BaM's unregularised single-draw limit.
* :mod:`ppvi.solvers.pathfinder`: single-path Pathfinder (Zhang et al. 2022), normal approximations along an
  L-BFGS path.

A log density is a callable mapping points ``(B, D)`` (float64, unconstrained coordinates) to ``(B,)``
unnormalised log densities; :func:`log_density_of` builds one from a Pyro model. A typical call from ppvi's Laplace
start::

    from ppvi.solvers import batch_and_match, log_density_of, scale_tril_from_precision

    log_density = log_density_of(model, *data)
    result = batch_and_match.run(
        log_density, laplace.loc, scale_tril_from_precision(laplace.precision), generator=torch.Generator()
    )
"""

from ppvi.solvers import batch_and_match, gaussian_score_matching, pathfinder
from ppvi.solvers._gaussian import (
    GaussianApproximation,
    ModelLogDensity,
    MovementRule,
    jeffreys_divergence,
    log_density_of,
    safe_cholesky,
    scale_tril_from_covariance,
    scale_tril_from_precision,
    value_and_gradient,
)

__all__ = [
    "GaussianApproximation",
    "ModelLogDensity",
    "MovementRule",
    "batch_and_match",
    "gaussian_score_matching",
    "jeffreys_divergence",
    "log_density_of",
    "pathfinder",
    "safe_cholesky",
    "scale_tril_from_covariance",
    "scale_tril_from_precision",
    "value_and_gradient",
]
