"""GSM-VI (:mod:`ppvi.solvers.gaussian_score_matching`) against outside references: the reference implementation's
update written out, Gaussian targets whose answer is known, and posteriordb's reference draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from solver_cases import (
    ADVI_GRADIENT_EVALUATIONS,
    MEAN_TOLERANCE,
    SD_TOLERANCE,
    badly_scaled_10d,
    correlated_5d,
    gaussian_errors,
    posterior_problem,
    reference_errors,
)

from ppvi.solvers import gaussian_score_matching

#: GSM reaches a Gaussian target's answer exactly too, but creeps the last digits: 1e-4 in a few hundred iterations.
GAUSSIAN_TOLERANCE = 1e-4


def reference_update(points, scores, mean, covariance):
    """``_gsm_update_single`` and ``gsm_update`` of github.com/modichirag/GSM-VI (``gsmvi/gsm_numpy.py``), written
    out: Modi et al.'s closed form with ``rho``, averaged over the batch."""
    dimension = mean.shape[0]
    mean_updates, covariance_updates = [], []
    for point, score in zip(points, scores, strict=True):
        covariance_score = covariance @ score
        quadratic = score @ covariance_score
        projection = (mean - point) @ score
        rho = 0.5 * np.sqrt(1 + 4 * (quadratic + projection**2)) - 0.5
        residual = covariance_score - mean + point
        denominator = 1 + rho + projection
        update = 1 / (1 + rho) * (np.eye(dimension) - np.outer(mean - point, score) / denominator) @ residual
        new_mean = mean + update
        mean_updates.append(update)
        covariance_updates.append(np.outer(mean - point, mean - point) - np.outer(new_mean - point, new_mean - point))
    return mean + np.mean(mean_updates, 0), covariance + np.mean(covariance_updates, 0)


def test_match_is_the_reference_implementations_update():
    rng = np.random.default_rng(0)
    dimension, count = 4, 6
    mean = rng.normal(size=dimension)
    factor = rng.normal(size=(dimension, dimension))
    covariance = factor @ factor.T + np.eye(dimension)
    scale_tril = np.linalg.cholesky(covariance)
    standard = rng.normal(size=(count, dimension))
    scores = 3 * rng.normal(size=(count, dimension))
    expected_mean, expected_covariance = reference_update(mean + standard @ scale_tril.T, scores, mean, covariance)

    whitened_loc, whitened_factor = gaussian_score_matching.match(
        torch.tensor(standard), torch.tensor(scores @ scale_tril)
    )
    new_factor = scale_tril @ whitened_factor.numpy()

    np.testing.assert_allclose(mean + scale_tril @ whitened_loc.numpy(), expected_mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(new_factor @ new_factor.T, expected_covariance, rtol=1e-10, atol=1e-12)


def test_single_draw_update_matches_the_score_exactly():
    """Modi et al.'s constraint: after a one-draw update, the Gaussian's score at the draw is the target's."""
    rng = np.random.default_rng(1)
    standard = torch.tensor(rng.normal(size=(1, 3)))
    scores = torch.tensor(rng.normal(size=(1, 3)))
    loc, scale_tril = gaussian_score_matching.match(standard, scores)
    covariance = scale_tril @ scale_tril.T
    gaussian_score = -torch.linalg.solve(covariance, standard[0] - loc)
    torch.testing.assert_close(gaussian_score, scores[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("target_factory", [correlated_5d, badly_scaled_10d])
def test_recovers_gaussian_targets_from_an_uncorrelated_start(target_factory):
    """From a Gaussian two sds off in every coordinate, twice as wide and without correlations (GSM's steps from a
    standard normal start on the 1e-3..1e3 scales take hundreds of iterations; BaM's tests start there)."""
    target = target_factory()
    sd = target.covariance.diagonal().sqrt()
    result = gaussian_score_matching.run(
        target.log_density, target.mean + 2 * sd, torch.diag(2 * sd), batch_size=8, max_iterations=400,
        generator=torch.Generator().manual_seed(0),
    )
    mean_error, covariance_error = gaussian_errors(target, result.loc, result.scale_tril)
    assert result.converged, result.message
    assert mean_error < GAUSSIAN_TOLERANCE
    assert covariance_error < GAUSSIAN_TOLERANCE


def test_matches_kidiq_reference_in_a_tenth_of_advis_gradients(posteriordb_root):
    problem = posterior_problem("kidiq-kidscore_momiq", posteriordb_root)
    result = gaussian_score_matching.run(
        problem.log_density, problem.laplace_loc, problem.laplace_scale_tril, generator=torch.Generator().manual_seed(0)
    )
    mean_error, sd_error = reference_errors(problem, result.loc, result.scale_tril)
    assert result.converged, result.message
    assert result.gradient_evaluations <= ADVI_GRADIENT_EVALUATIONS / 10
    assert mean_error < MEAN_TOLERANCE, mean_error
    assert sd_error < SD_TOLERANCE, sd_error


def test_stalls_short_of_sblrc_reference(posteriordb_root):
    """GSM's averaged updates settle where no single draw's score is matched: on sblrc (a skewed noise sd) it keeps
    a mean 0.14-0.18 reference sds off (measured over seeds; BaM: 0.03), with sds within the tolerance. This records
    the limitation that makes BaM the recommended solver; it must not get worse than 0.25."""
    problem = posterior_problem("sblrc-blr", posteriordb_root)
    result = gaussian_score_matching.run(
        problem.log_density, problem.laplace_loc, problem.laplace_scale_tril, generator=torch.Generator().manual_seed(0)
    )
    mean_error, sd_error = reference_errors(problem, result.loc, result.scale_tril)
    assert MEAN_TOLERANCE < mean_error < 0.25, mean_error
    assert sd_error < SD_TOLERANCE, sd_error
