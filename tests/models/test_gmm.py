"""Gaussian mixtures: EM and CAVI against scikit-learn's GaussianMixture and BayesianGaussianMixture (same start,
same priors), the ELBO against a Monte Carlo estimate from SciPy's distributions, the Pyro model's enumerated
likelihood against scikit-learn's mixture density, and the ppvi fit against the lecture mixture's known means."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from scipy import stats
from scipy.special import gammaln, multigammaln
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import BayesianGaussianMixture, GaussianMixture
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

import ppvi
from ppvi.models import gmm

#: Relative tolerance of the issue for EM's final log-likelihood against scikit-learn; we get ~1e-13.
RELATIVE_TOLERANCE = 1e-3
#: Allowed decrease between iterations, relative to the objective: round-off only.
MONOTONE_TOLERANCE = 1e-9


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """scikit-learn's small matrix products on several BLAS threads, on a busy machine, ran 20x slower than on one."""
    with threadpool_limits(limits=1):
        yield


def data_sets() -> dict[str, tuple[np.ndarray, int]]:
    """The lecture mixture (K = 2) and scikit-learn's iris and wine (K = 3), as numpy arrays."""
    return {
        "lecture": (gmm.simulate_lecture_mixture(1000, seed=0)[0].numpy(), 2),
        "iris": (gmm.iris()[0].numpy(), 3),
        "wine": (gmm.wine()[0].numpy(), 3),
    }


DATA = data_sets()


def sklearn_bayesian_mixture(K: int, prior: gmm.NormalWishartPrior | None = None, **options) -> BayesianGaussianMixture:
    prior_options = {}
    if prior is not None:
        prior_options = dict(
            weight_concentration_prior=prior.weight_concentration, mean_prior=prior.mean,
            mean_precision_prior=prior.mean_precision, degrees_of_freedom_prior=prior.degrees_of_freedom,
            covariance_prior=prior.covariance,
        )
    settings = dict(reg_covar=0.0, tol=1e-10, max_iter=5000, random_state=0)
    return BayesianGaussianMixture(
        n_components=K, weight_concentration_prior_type="dirichlet_distribution",
        **{**settings, **prior_options, **options},
    )


def sklearn_lower_bound_offset(num_points: int, prior: gmm.NormalWishartPrior, K: int) -> float:
    """Our ELBO minus scikit-learn's ``lower_bound_`` after an update of the global factors.

    At ``q(pi, mu, Lambda)`` optimal for ``r``, the ELBO is ``-sum r ln r - ln C(alpha) - sum_k ln B(W_k, nu_k)
    - D/2 sum_k ln beta_k`` plus ``ln C(alpha_0) + K ln B(W_0, nu_0) + K D/2 ln beta_0 - N D/2 ln(2 pi)``
    (the conjugate marginal, Bishop 2006 eqs. 10.70-10.77 and B.23, B.79); scikit-learn keeps the first group,
    and its Wishart normaliser leaves out ``D (D - 1)/4 ln pi`` (sklearn.mixture._bayesian_mixture).
    """
    D = prior.mean.shape[0]
    log_dirichlet = gammaln(K * prior.weight_concentration) - K * gammaln(prior.weight_concentration)
    nu0 = prior.degrees_of_freedom
    log_det_w0 = -np.linalg.slogdet(prior.covariance)[1]
    log_wishart = -0.5 * nu0 * log_det_w0 - (0.5 * nu0 * D * math.log(2.0) + multigammaln(0.5 * nu0, D))
    return (
        log_dirichlet + K * log_wishart + 0.5 * K * D * math.log(prior.mean_precision)
        - 0.5 * num_points * D * math.log(2 * math.pi) + 0.25 * K * D * (D - 1) * math.log(math.pi)
    )


# --- data ---
def test_lecture_mixture_has_the_generating_parameters():
    x, labels = gmm.simulate_lecture_mixture(40_000, seed=1)
    x, labels = x.numpy(), labels.numpy()
    assert x.shape == (40_000, 2) and set(np.unique(labels)) == {0, 1}
    # Bernoulli(0.5) proportion of 40,000: sd 0.0025.
    assert abs(labels.mean() - 0.5) < 0.01
    for k in range(2):
        points = x[labels == k]
        # Sample means within ~4 standard errors (largest variance 8 over ~20,000 points: se 0.02).
        np.testing.assert_allclose(points.mean(0), gmm.LECTURE_MEANS[k], atol=0.08)
        np.testing.assert_allclose(np.cov(points.T), gmm.LECTURE_COVARIANCES[k], atol=0.25, rtol=0.05)
    again, _ = gmm.simulate_lecture_mixture(40_000, seed=1)
    other, _ = gmm.simulate_lecture_mixture(40_000, seed=2)
    assert torch.equal(again, torch.as_tensor(x)) and not torch.equal(other, again)


@pytest.mark.parametrize("loader, shape", [(gmm.iris, (150, 4)), (gmm.wine, (178, 13))])
def test_real_data_is_standardised(loader, shape):
    from sklearn import datasets

    x, labels = loader()
    raw = getattr(datasets, f"load_{loader.__name__}")()
    assert x.shape == shape and x.dtype == torch.float64 and labels.shape == shape[:1]
    np.testing.assert_allclose(x.numpy(), StandardScaler().fit_transform(raw.data), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(labels.numpy(), raw.target)


# --- responsibilities ---
def test_responsibilities_match_sklearn_predict_proba():
    x, K = DATA["iris"]
    mixture = GaussianMixture(K, random_state=0).fit(x)
    resp = gmm.responsibilities(torch.as_tensor(x), mixture.weights_, mixture.means_, mixture.covariances_)
    np.testing.assert_allclose(resp.numpy(), mixture.predict_proba(x), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(resp.sum(-1).numpy(), 1.0, rtol=1e-12)


def test_responsibilities_are_the_lecture_formula_and_batch():
    """``pi_k N(x_i | mu_k, Sigma_k) / sum_j ...`` by SciPy, for each element of a batch of parameter sets."""
    x = gmm.simulate_lecture_mixture(50, seed=3)[0]
    generator = np.random.default_rng(0)
    weights = generator.dirichlet(np.ones(2), size=3)
    means = generator.normal(size=(3, 2, 2))
    covariances = np.stack([gmm.LECTURE_COVARIANCES * scale for scale in (0.5, 1.0, 2.0)])
    resp = gmm.responsibilities(x, torch.as_tensor(weights), torch.as_tensor(means), torch.as_tensor(covariances))
    assert resp.shape == (3, 50, 2)
    for b in range(3):
        densities = [stats.multivariate_normal(means[b, k], covariances[b, k]).pdf(x.numpy()) for k in range(2)]
        joint = weights[b] * np.stack(densities, axis=1)
        np.testing.assert_allclose(resp[b].numpy(), joint / joint.sum(1, keepdims=True), rtol=1e-10)


def test_match_components_undoes_a_permutation():
    reference = np.array([[0.0, 3.0], [1.0, 0.0], [-4.0, 2.0]])
    shuffled = reference[[2, 0, 1]] + 0.01
    order = gmm.match_components(shuffled, reference)
    np.testing.assert_allclose(shuffled[order], reference + 0.01)


# --- EM against scikit-learn's GaussianMixture ---
@pytest.mark.parametrize("name", list(DATA))
def test_em_matches_sklearn_from_the_same_parameters(name):
    """Both started at the same weights, means and precisions (sklearn's ``*_init``), both run to convergence."""
    x, K = DATA[name]
    generator = np.random.default_rng(1)
    start = gmm.MixtureParameters(
        np.full(K, 1.0 / K), x[generator.choice(len(x), K, replace=False)], np.stack([np.cov(x.T)] * K)
    )
    ours = gmm.em(x, K, init=start, tolerance=1e-12, max_iterations=5000)
    theirs = GaussianMixture(
        K, weights_init=start.weights, means_init=start.means, precisions_init=np.linalg.inv(start.covariances),
        reg_covar=0.0, tol=1e-12, max_iter=5000,
    ).fit(x)
    assert ours.converged and theirs.converged_
    np.testing.assert_allclose(ours.log_likelihood[-1], theirs.score(x), rtol=RELATIVE_TOLERANCE)
    np.testing.assert_allclose(ours.log_likelihood[-1], theirs.score(x), rtol=1e-9)  # in fact to round-off
    np.testing.assert_allclose(ours.means, theirs.means_, atol=1e-5)
    np.testing.assert_allclose(ours.weights, theirs.weights_, atol=1e-5)
    np.testing.assert_allclose(ours.responsibilities, theirs.predict_proba(x), atol=1e-5)
    # The trace starts at the starting parameters' log-likelihood (sklearn's score there) and never decreases.
    first = GaussianMixture(K, reg_covar=0.0).fit(x)  # any fit; then overwrite its parameters with the start
    first.weights_, first.means_, first.covariances_ = start.weights, start.means, start.covariances
    first.precisions_cholesky_ = np.linalg.cholesky(np.linalg.inv(start.covariances))
    np.testing.assert_allclose(ours.log_likelihood[0], first.score(x), rtol=1e-12)
    assert np.diff(ours.log_likelihood).min() >= -MONOTONE_TOLERANCE * abs(ours.log_likelihood[-1])


def test_em_default_start_is_sklearns_kmeans_start():
    x, K = DATA["lecture"]
    ours = gmm.em(x, K, seed=5, tolerance=1e-12, max_iterations=5000)
    theirs = GaussianMixture(K, random_state=5, reg_covar=0.0, tol=1e-12, max_iter=5000).fit(x)
    np.testing.assert_allclose(ours.means, theirs.means_, atol=1e-6)
    np.testing.assert_allclose(ours.covariances, theirs.covariances_, atol=1e-6)


def test_em_regularisation_is_sklearns_reg_covar():
    x, K = DATA["wine"]
    ours = gmm.em(x, K, covariance_regularization=1e-2, tolerance=1e-12, max_iterations=5000)
    theirs = GaussianMixture(K, random_state=0, reg_covar=1e-2, tol=1e-12, max_iter=5000).fit(x)
    np.testing.assert_allclose(ours.log_likelihood[-1], theirs.score(x), rtol=1e-9)


# --- CAVI against scikit-learn's BayesianGaussianMixture ---
@pytest.mark.parametrize("name", list(DATA))
def test_cavi_matches_sklearn_bayesian_mixture(name):
    """Same default prior, same k-means start: the same variational posterior, and our ELBO is scikit-learn's
    lower bound plus the constants it leaves out (:func:`sklearn_lower_bound_offset`)."""
    x, K = DATA[name]
    ours = gmm.cavi(x, K, tolerance=1e-10, max_iterations=5000)
    theirs = sklearn_bayesian_mixture(K).fit(x)
    assert ours.converged and theirs.converged_
    assert adjusted_rand_score(ours.responsibilities.argmax(1), theirs.predict(x)) >= 0.95
    np.testing.assert_allclose(ours.means, theirs.means_, atol=1e-6)
    np.testing.assert_allclose(ours.weights, theirs.weights_, atol=1e-6)
    np.testing.assert_allclose(ours.covariances, theirs.covariances_, atol=1e-6)
    np.testing.assert_allclose(ours.degrees_of_freedom, theirs.degrees_of_freedom_, rtol=1e-8)
    np.testing.assert_allclose(ours.mean_precision, theirs.mean_precision_, rtol=1e-8)
    offset = sklearn_lower_bound_offset(len(x), gmm.default_prior(x, K), K)
    np.testing.assert_allclose(ours.elbo[-1], theirs.lower_bound_ + offset, rtol=1e-10)
    np.testing.assert_allclose(gmm.sklearn_lower_bound_offset(len(x), gmm.default_prior(x, K), K), offset, rtol=1e-12)
    assert np.diff(ours.elbo).min() >= -MONOTONE_TOLERANCE * abs(ours.elbo[-1])


def test_cavi_with_a_chosen_prior_matches_sklearn_iteration_by_iteration():
    """A non-default Normal-Wishart prior; scikit-learn advanced one iteration at a time (warm start) gives the
    bound after each of its iterations, which must be ours after the same iteration, less the constant."""
    x, K = DATA["iris"]
    D = x.shape[1]
    prior = gmm.NormalWishartPrior(2.0, np.full(D, 0.5), 0.3, D + 3.0, 0.5 * np.eye(D))
    ours = gmm.cavi(x, K, prior=prior, tolerance=1e-10, max_iterations=5000)
    offset = sklearn_lower_bound_offset(len(x), prior, K)
    theirs = sklearn_bayesian_mixture(K, prior, warm_start=True, max_iter=1)
    bounds = []
    for _ in range(6):
        with pytest.warns(ConvergenceWarning):  # one iteration per fit never "converges"
            theirs.fit(x)
        bounds.append(theirs.lower_bound_)
    np.testing.assert_allclose(ours.elbo[1:7], np.array(bounds) + offset, rtol=1e-10)
    assert np.diff(ours.elbo).min() >= -MONOTONE_TOLERANCE * abs(ours.elbo[-1])
    final = sklearn_bayesian_mixture(K, prior).fit(x)
    np.testing.assert_allclose(ours.means, final.means_, atol=1e-6)


def _monte_carlo_elbo(x, resp, result, prior, num_draws, seed):
    """``E_q[ln p(X, Z, pi, mu, Lambda) - ln q(Z, pi, mu, Lambda)]`` from draws of ``q(pi)`` and ``q(mu, Lambda)``
    (SciPy's Dirichlet, Wishart and normal densities), with ``Z`` summed exactly under ``q(z) = resp``."""
    generator = np.random.default_rng(seed)
    K = resp.shape[1]
    weights = stats.dirichlet(result.weight_concentration).rvs(num_draws, random_state=generator)
    values = stats.dirichlet(np.full(K, prior.weight_concentration)).logpdf(weights.T)
    values -= stats.dirichlet(result.weight_concentration).logpdf(weights.T)
    values += (resp[None] * np.log(weights)[:, None, :]).sum((1, 2)) - (resp * np.log(resp)).sum()
    prior_wishart = stats.wishart(df=prior.degrees_of_freedom, scale=np.linalg.inv(prior.covariance))
    for k in range(K):
        q_wishart = stats.wishart(df=result.degrees_of_freedom[k], scale=result.scale_matrices[k])
        precisions = q_wishart.rvs(num_draws, random_state=generator)
        stacked = np.moveaxis(precisions, 0, -1)  # SciPy's Wishart takes a batch of matrices as (D, D, S)
        values += prior_wishart.logpdf(stacked) - q_wishart.logpdf(stacked)
        for s, precision in enumerate(precisions):
            covariance = np.linalg.inv(precision)
            q_mean = stats.multivariate_normal(result.means[k], covariance / result.mean_precision[k])
            mean = q_mean.rvs(random_state=generator)
            values[s] += stats.multivariate_normal(prior.mean, covariance / prior.mean_precision).logpdf(mean)
            values[s] += resp[:, k] @ stats.multivariate_normal(mean, covariance).logpdf(x) - q_mean.logpdf(mean)
    return values


def test_cavi_elbo_is_the_expectation_it_defines():
    """Each trace entry is at ``q(theta)`` optimal for ``r``: then ``ln p(X, r, theta) - ln q(theta)`` is the same
    for every ``theta`` (q is proportional to it), so even a few draws give the ELBO to round-off; every constant
    (Dirichlet, Wishart and Gaussian normalisers) must be right for that."""
    x = gmm.simulate_lecture_mixture(40, seed=3)[0].numpy()
    prior = gmm.default_prior(x, 2)
    result = gmm.cavi(x, 2, max_iterations=2)
    values = _monte_carlo_elbo(x, result.responsibilities, result, prior, num_draws=20, seed=0)
    np.testing.assert_allclose(values, result.elbo[-1], rtol=1e-9)


def test_cavi_elbo_away_from_the_coordinate_optimum():
    """With ``q(z)`` not the one the global factors came from, the ELBO formula against a Monte Carlo average."""
    from ppvi.models.gmm import _cavi_elbo, _GlobalFactors

    x = gmm.simulate_lecture_mixture(40, seed=3)[0].numpy()
    prior = gmm.default_prior(x, 2)
    result = gmm.cavi(x, 2, max_iterations=2)
    resp = np.random.default_rng(4).dirichlet(np.ones(2), size=len(x))
    factors = _GlobalFactors(
        result.weight_concentration, result.mean_precision, result.means, result.scale_matrices,
        result.degrees_of_freedom,
    )
    values = _monte_carlo_elbo(x, resp, result, prior, num_draws=400, seed=1)
    standard_error = values.std() / math.sqrt(len(values))
    assert standard_error > 1e-3  # really random here
    assert abs(values.mean() - _cavi_elbo(x, resp, factors, prior)) < 4 * standard_error


# --- the Pyro model ---
def test_model_enumerated_likelihood_is_the_mixture_density(float64_default):
    """TraceEnum_ELBO with the continuous sites fixed sums ``z`` out: minus the loss is the log prior of the
    parameters plus scikit-learn's mixture log-likelihood (``score_samples``), also for a batch of particles."""
    x, K = DATA["iris"]
    mixture = GaussianMixture(K, random_state=0).fit(x)
    scales = np.sqrt(np.diagonal(mixture.covariances_, axis1=1, axis2=2))
    correlation = mixture.covariances_ / scales[:, :, None] / scales[:, None, :]
    values = {
        "weights": torch.as_tensor(mixture.weights_), "locs": torch.as_tensor(mixture.means_),
        "scales": torch.as_tensor(scales), "correlation_cholesky": torch.linalg.cholesky(torch.as_tensor(correlation)),
    }
    conditioned = poutine.condition(gmm.model, data=values)
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(conditioned, lambda *args: None, torch.as_tensor(x), K)
    D = x.shape[1]
    log_prior = (
        stats.dirichlet(np.ones(K)).logpdf(mixture.weights_)
        + stats.norm(0, gmm.MEAN_PRIOR_SCALE).logpdf(mixture.means_).sum()
        + stats.halfnorm(scale=gmm.SCALE_PRIOR_SCALE).logpdf(scales).sum()
        # The LKJ term from Pyro (no outside implementation); the likelihood is what this test checks.
        + float(pyro.distributions.LKJCholesky(D, 1.0).log_prob(values["correlation_cholesky"]).sum())
    )
    expected = mixture.score_samples(x).sum() + log_prior
    np.testing.assert_allclose(-loss, expected, rtol=1e-10)

    # A plate of 3 particles left of the model's plates (as ppvi evaluates them): the same parameters, the
    # components permuted (the same likelihood), and the means shifted (SciPy's mixture density).
    permutation, shift = [2, 0, 1], 0.3
    batched = {name: torch.stack([value, value[permutation], value]) for name, value in values.items()}
    batched["locs"][2] += shift
    batched["weights"] = batched["weights"].unsqueeze(-2)  # the particle dimension sits left of the data plate
    with pyro.plate("particles", 3, dim=-2):
        enumerated = poutine.enum(poutine.condition(gmm.model, data=batched), first_available_dim=-3)
        trace = poutine.trace(enumerated).get_trace(torch.as_tensor(x), K)
    trace.compute_log_prob()
    assert trace.nodes["z"]["value"].shape == (K, 1, 1)
    joint = trace.nodes["z"]["log_prob"] + trace.nodes["x"]["log_prob"]  # (K, particles, N)
    log_likelihoods = torch.logsumexp(joint, 0).sum(-1).numpy()
    shifted = sum(
        mixture.weights_[k] * stats.multivariate_normal(mixture.means_[k] + shift, mixture.covariances_[k]).pdf(x)
        for k in range(K)
    )
    expected = [mixture.score_samples(x).sum()] * 2 + [np.log(shifted).sum()]
    np.testing.assert_allclose(log_likelihoods, expected, rtol=1e-10)


def test_model_simulates_and_marks_z_for_enumeration():
    trace = poutine.trace(gmm.model).get_trace(None, 3, 50, 2)
    assert trace.nodes["x"]["value"].shape == (50, 2)
    assert trace.nodes["z"]["infer"]["enumerate"] == "parallel"
    assert trace.nodes["locs"]["value"].shape == (3, 2)
    assert trace.nodes["correlation_cholesky"]["value"].shape == (3, 2, 2)


def test_svi_recovers_the_lecture_means():
    """ppvi.fit with the assignments enumerated: posterior means of the component means within 0.2 of the
    generating ones (the issue's criterion) and close to scikit-learn's maximum likelihood; the responsibilities
    averaged over the guide close to sklearn's at its estimates."""
    x, labels = gmm.simulate_lecture_mixture(1000, seed=0)
    fit = ppvi.fit(gmm.model, x, 2, guide="meanfield", seed=0)
    assert fit.converged
    weights, means, covariances = gmm.fit_components(fit.sample(1000, seed=0))
    order = gmm.match_components(means.mean(0).numpy(), gmm.LECTURE_MEANS)
    np.testing.assert_allclose(means.mean(0).numpy()[order], gmm.LECTURE_MEANS, atol=0.2)
    mixture = GaussianMixture(2, random_state=0).fit(x.numpy())
    sklearn_order = gmm.match_components(mixture.means_, gmm.LECTURE_MEANS)
    # Posterior mean against MLE: they differ by O(1/N) plus Monte Carlo error (posterior sds here 0.05-0.1).
    np.testing.assert_allclose(means.mean(0).numpy()[order], mixture.means_[sklearn_order], atol=0.05)
    np.testing.assert_allclose(weights.mean(0).numpy()[order], mixture.weights_[sklearn_order], atol=0.03)
    resp = gmm.posterior_responsibilities(fit, num_samples=500)
    assert resp.shape == (1000, 2)
    assert np.abs(resp.numpy()[:, order] - mixture.predict_proba(x.numpy())[:, sklearn_order]).mean() < 0.02


# --- bad input ---
def test_bad_input_says_what_to_fix():
    x, K = DATA["lecture"]
    with pytest.raises(ValueError, match="num_components"):
        gmm.em(x, 0)
    with pytest.raises(ValueError, match=r"shape \(num_points, data_dim\)"):
        gmm.em(x[:, 0], 2)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        gmm.cavi(bad, 2)
    with pytest.raises(ValueError, match="rows summing to one"):
        gmm.em(x, 2, init=np.ones((len(x), 2)))
    with pytest.raises(ValueError, match="shapes"):
        gmm.em(x, 2, init=gmm.MixtureParameters(np.ones(3) / 3, np.zeros((3, 2)), np.stack([np.eye(2)] * 3)))
    with pytest.raises(ValueError, match="positive definite"):
        gmm.em(x, 2, init=gmm.MixtureParameters(np.ones(2) / 2, np.zeros((2, 2)), np.zeros((2, 2, 2))))
    with pytest.raises(ValueError, match="sum to one"):
        gmm.em(x, 2, init=gmm.MixtureParameters(np.ones(2), np.zeros((2, 2)), np.stack([np.eye(2)] * 2)))
    with pytest.raises(ValueError, match="positive definite"):
        gmm.cavi(x, 2, prior=gmm.NormalWishartPrior(1.0, np.zeros(2), 1.0, 3.0, -np.eye(2)))
    with pytest.raises(ValueError, match="degrees_of_freedom > D - 1"):
        gmm.cavi(x, 2, prior=gmm.NormalWishartPrior(1.0, np.zeros(2), 1.0, 0.5, np.eye(2)))
    with pytest.raises(ValueError, match="x must have shape"):
        gmm.model(torch.zeros(5))


@pytest.mark.slow
@pytest.mark.parametrize("guide", ["meanfield", "fullrank"])
def test_svi_recovers_the_lecture_mixture_from_more_data(guide):
    """4,000 fresh points (sampling sd of the broad component's mean about 0.06): means within 0.2 of the
    generating ones, covariances within 15 %, weights within 0.05, for both Gaussian guides."""
    x, _ = gmm.simulate_lecture_mixture(4000, seed=1)
    fit = ppvi.fit(gmm.model, x, 2, guide=guide, seed=1)
    assert fit.converged
    weights, means, covariances = gmm.fit_components(fit.sample(1000, seed=0))
    order = gmm.match_components(means.mean(0).numpy(), gmm.LECTURE_MEANS)
    np.testing.assert_allclose(means.mean(0).numpy()[order], gmm.LECTURE_MEANS, atol=0.2)
    np.testing.assert_allclose(weights.mean(0).numpy()[order], gmm.LECTURE_WEIGHTS, atol=0.05)
    np.testing.assert_allclose(covariances.mean(0).numpy()[order], gmm.LECTURE_COVARIANCES, rtol=0.15, atol=0.15)


@pytest.mark.slow
def test_diagnose_a_mixture_fit():
    # Importance weights of an enumerated model with latent sites inside a plate (z summed out).
    x, _ = gmm.simulate_lecture_mixture(300, seed=0)
    fit = ppvi.fit(gmm.model, x, 2, guide="fullrank", seed=0)
    diagnosis = fit.diagnose(num_samples=300)
    assert np.isfinite(diagnosis.khat) and diagnosis.khat < 0.7  # measured khat 0.52, ESS 219
    assert fit.expectation(lambda d: d["locs"], num_samples=300).corrected.shape == (2, 2)
