"""Bayesian Gaussian mixtures: a Pyro model with enumerated assignments for :func:`ppvi.fit`, maximum-likelihood
EM, and coordinate-ascent mean-field VI (CAVI) for the conjugate model.

The mixture, in the lecture's notation, for points ``x_i`` in ``R^D`` and ``K`` components:

.. math::

    z_i \\sim \\mathrm{Categorical}(\\pi), \\qquad
    x_i \\mid z_i = k \\sim \\mathcal{N}(\\mu_k, \\Sigma_k), \\qquad
    r_{ik} = p(z_i = k \\mid x_i) = \\frac{\\pi_k \\mathcal{N}(x_i \\mid \\mu_k, \\Sigma_k)}
                                          {\\sum_j \\pi_j \\mathcal{N}(x_i \\mid \\mu_j, \\Sigma_j)}.

Three ways to fit it live here, each a pure function of the data:

- :func:`model` is the Bayesian mixture for ``ppvi.fit(model, x, num_components, guide=...)``. Its priors are
  *not* conjugate (chosen for a Gaussian guide in the unconstrained space, not for closed forms)::

      pi ~ Dirichlet(1, ..., 1)                      (WEIGHT_CONCENTRATION)
      mu_k ~ N(0, 10^2 I_D)                          (MEAN_PRIOR_SCALE)
      Sigma_k = diag(s_k) Omega_k diag(s_k),  s_kd ~ HalfNormal(5)   (SCALE_PRIOR_SCALE)
      L_k = cholesky(Omega_k) ~ LKJCholesky(D, 1)    (LKJ_CONCENTRATION: uniform over correlation matrices)

  The assignments ``z`` are marked ``infer={"enumerate": "parallel"}``: ``ppvi.fit`` sums them out with
  ``TraceEnum_ELBO`` (no sampling of ``z``), so the guide is over the continuous sites ``weights``, ``locs``,
  ``scales`` and ``correlation_cholesky`` only. The model broadcasts over a batch of particles (``Vindex``,
  plates counted from the right), so ppvi evaluates eight particles per step in one pass.
- :func:`em` is maximum likelihood by expectation-maximisation (Dempster, Laird & Rubin 1977; Bishop 2006,
  PRML §9.2.2); its per-point log-likelihood trace is non-decreasing.
- :func:`cavi` is mean-field VI ``q(z) q(pi) prod_k q(mu_k, Lambda_k)`` for the *conjugate* model of Bishop
  (2006, PRML §10.2) -- Dirichlet(alpha_0) weights and a Normal-Wishart prior on each component's mean and
  precision ``Lambda_k = Sigma_k^{-1}``::

      pi ~ Dirichlet(alpha_0, ..., alpha_0),
      Lambda_k ~ Wishart(W_0, nu_0),   mu_k | Lambda_k ~ N(m_0, (beta_0 Lambda_k)^{-1}),

  by coordinate ascent (Blei, Kucukelbir & McAuliffe 2017, §2.4 and §3); its ELBO trace is non-decreasing. This
  is scikit-learn's ``BayesianGaussianMixture(weight_concentration_prior_type="dirichlet_distribution")`` with
  ``weight_concentration_prior = alpha_0``, ``mean_prior = m_0``, ``mean_precision_prior = beta_0``,
  ``degrees_of_freedom_prior = nu_0`` and ``covariance_prior = W_0^{-1}`` (see :func:`default_prior`).

Label switching: the likelihood and all three priors are symmetric in the component labels, so the posterior
has ``K!`` equivalent modes. A Gaussian guide (started by ppvi at the Laplace mode) and CAVI each settle in one
of them; EM likewise returns one labelling. No ordering constraint is imposed (ordering a multivariate mean
distorts the posterior near the ties); compare components after matching them with :func:`match_components`.

Data: :func:`simulate_lecture_mixture` draws from the lecture's 2-D mixture
``0.5 N([0, 3], [[1, .1], [.1, 1]]) + 0.5 N([1, 0], [[8, 3], [3, 2]])``; :func:`iris` and :func:`wine` load
scikit-learn's bundled data sets, standardised.

References
----------
A. P. Dempster, N. M. Laird and D. B. Rubin (1977). Maximum likelihood from incomplete data via the EM algorithm.
*Journal of the Royal Statistical Society, Series B* 39(1), 1-38.

C. M. Bishop (2006). *Pattern Recognition and Machine Learning*, §9.2 and §10.2. Springer.

D. M. Blei, A. Kucukelbir and J. D. McAuliffe (2017). Variational inference: a review for statisticians.
*Journal of the American Statistical Association* 112(518), 859-877.

D. Lewandowski, D. Kurowicka and H. Joe (2009). Generating random correlation matrices based on vines and
extended onion method. *Journal of Multivariate Analysis* 100(9), 1989-2001 (the LKJ prior).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.ops.indexing import Vindex
from scipy.optimize import linear_sum_assignment
from scipy.special import digamma, gammaln, multigammaln

#: The lecture's mixture: equal weights, and the two components' means and covariances.
LECTURE_WEIGHTS = np.array([0.5, 0.5])
LECTURE_MEANS = np.array([[0.0, 3.0], [1.0, 0.0]])
LECTURE_COVARIANCES = np.array([[[1.0, 0.1], [0.1, 1.0]], [[8.0, 3.0], [3.0, 2.0]]])
#: Points drawn by :func:`simulate_lecture_mixture` and by :func:`model` without data.
DEFAULT_NUM_POINTS = 1000

#: Prior of :func:`model`. A flat Dirichlet on the weights.
WEIGHT_CONCENTRATION = 1.0
#: Prior sd of every mean coordinate: wide against standardised data and against the lecture mixture (|mu| <= 3).
MEAN_PRIOR_SCALE = 10.0
#: HalfNormal scale of every component standard deviation: sds up to ~10 are plausible (the lecture's largest
#: is sqrt(8) = 2.8; standardised data have sd 1 overall).
SCALE_PRIOR_SCALE = 5.0
#: LKJ concentration 1: uniform over correlation matrices.
LKJ_CONCENTRATION = 1.0

#: scikit-learn adds ``10 * eps`` to every component's total responsibility so an empty component gives no 0/0;
#: we do the same, which also keeps our iterates identical to scikit-learn's.
_EMPTY_COMPONENT_GUARD = 10 * np.finfo(np.float64).eps


# -- data ---------------------------------------------------------------------------------------------------------
def simulate_lecture_mixture(
    num_points: int = DEFAULT_NUM_POINTS, seed: int = 0, *, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw from the lecture's mixture ``0.5 N([0,3], [[1,.1],[.1,1]]) + 0.5 N([1,0], [[8,3],[3,2]])``.

    Uses a private numpy generator; the global random states are untouched.

    Parameters
    ----------
    num_points : int
        Number of points ``N``.
    seed : int
        Seed of the private generator.
    dtype : torch.dtype
        Dtype of the returned points.

    Returns
    -------
    x : torch.Tensor
        Points, shape ``(N, 2)``.
    labels : torch.Tensor
        The component each point came from (0 or 1), shape ``(N,)``, int64.
    """
    if not isinstance(num_points, int) or num_points < 1:
        raise ValueError(f"num_points must be a positive integer, got {num_points!r}")
    generator = np.random.default_rng(seed)
    labels = generator.choice(len(LECTURE_WEIGHTS), size=num_points, p=LECTURE_WEIGHTS)
    noise = generator.standard_normal((num_points, LECTURE_MEANS.shape[1]))
    factors = np.linalg.cholesky(LECTURE_COVARIANCES)
    x = LECTURE_MEANS[labels] + np.einsum("nij,nj->ni", factors[labels], noise)
    return torch.as_tensor(x, dtype=dtype), torch.as_tensor(labels)


def _standardised(bunch) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.asarray(bunch.data, dtype=np.float64)
    # Zero mean and unit variance per feature (population sd, ddof = 0, as sklearn's StandardScaler).
    data = (data - data.mean(0)) / data.std(0)
    return torch.as_tensor(data), torch.as_tensor(bunch.target, dtype=torch.int64)


def iris() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled iris data (Fisher 1936): 150 flowers, 4 features, 3 species.

    Returns
    -------
    x : torch.Tensor
        Features standardised to zero mean and unit variance (ddof 0) per column, shape ``(150, 4)``, float64.
    labels : torch.Tensor
        Species, shape ``(150,)``, int64.
    """
    from sklearn.datasets import load_iris

    return _standardised(load_iris())


def wine() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled wine recognition data: 178 wines, 13 chemical features, 3 cultivars.

    Returns
    -------
    x : torch.Tensor
        Features standardised to zero mean and unit variance (ddof 0) per column, shape ``(178, 13)``, float64.
    labels : torch.Tensor
        Cultivar, shape ``(178,)``, int64.
    """
    from sklearn.datasets import load_wine

    return _standardised(load_wine())


# -- the Pyro model -----------------------------------------------------------------------------------------------
@pyro.infer.config_enumerate
def model(
    x: torch.Tensor | None = None,
    num_components: int = 2,
    num_points: int = DEFAULT_NUM_POINTS,
    data_dim: int = 2,
) -> torch.Tensor:
    """Bayesian Gaussian mixture with enumerated assignments (priors in the module docstring).

    Latent sites: ``weights`` (``K``), and in the plate ``components``: ``locs`` (``K x D``), ``scales``
    (``K x D``, positive) and, when ``D > 1``, ``correlation_cholesky`` (``K x D x D``). The assignment ``z``
    (plate ``data``) is enumerated, observed site ``x``. With ``x=None`` it draws ``num_points`` points of
    dimension ``data_dim`` from the prior predictive. ``ppvi.fit(model, x, num_components)`` works positionally.

    Parameters
    ----------
    x : torch.Tensor, optional
        Observations, shape ``(N, D)``.
    num_components : int
        ``K``.
    num_points, data_dim : int
        ``N`` and ``D`` when ``x`` is None; ignored otherwise.

    Returns
    -------
    torch.Tensor
        ``x``: the observations passed in, or the ones drawn.
    """
    if not isinstance(num_components, int) or num_components < 1:
        raise ValueError(f"num_components must be a positive integer, got {num_components!r}")
    if x is not None and x.dim() != 2:
        raise ValueError(f"x must have shape (num_points, data_dim), got {tuple(x.shape)}")
    dtype = x.dtype if x is not None else torch.get_default_dtype()
    device = x.device if x is not None else torch.get_default_device()
    num_points, data_dim = (num_points, data_dim) if x is None else tuple(x.shape)
    options = dict(dtype=dtype, device=device)

    weights = pyro.sample("weights", dist.Dirichlet(torch.full((num_components,), WEIGHT_CONCENTRATION, **options)))
    with pyro.plate("components", num_components, dim=-1):
        locs = pyro.sample("locs", dist.Normal(torch.zeros(data_dim, **options), MEAN_PRIOR_SCALE).to_event(1))
        scale_prior = dist.HalfNormal(torch.full((data_dim,), SCALE_PRIOR_SCALE, **options))
        scales = pyro.sample("scales", scale_prior.to_event(1))
        if data_dim > 1:
            concentration = torch.tensor(LKJ_CONCENTRATION, **options)
            correlation = pyro.sample("correlation_cholesky", dist.LKJCholesky(data_dim, concentration))
        else:
            correlation = torch.ones(1, 1, **options)
    scale_tril = scales.unsqueeze(-1) * correlation  # diag(s_k) L_k, shape (..., K, D, D)
    with pyro.plate("data", num_points, dim=-1):
        z = pyro.sample("z", dist.Categorical(weights))
        # The component dimension sits in the plate at dim -1, as does the data: insert a singleton data dimension
        # left of it, so that batch dimensions of the latent sites (particles, draws) line up with z's.
        locs_z = Vindex(locs.unsqueeze(-3))[..., z, :]
        scale_tril_z = Vindex(scale_tril.unsqueeze(-4))[..., z, :, :]
        return pyro.sample("x", dist.MultivariateNormal(locs_z, scale_tril=scale_tril_z), obs=x)


def fit_components(draws: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights, means and covariances of the mixture from draws of :func:`model`'s latent sites.

    Parameters
    ----------
    draws : dict of str to torch.Tensor
        ``fit.sample(S)``: ``weights`` ``(S, K)``, ``locs`` ``(S, K, D)``, ``scales`` ``(S, K, D)`` and
        ``correlation_cholesky`` ``(S, K, D, D)`` (absent when ``D = 1``).

    Returns
    -------
    weights, means, covariances : torch.Tensor
        Shapes ``(S, K)``, ``(S, K, D)``, ``(S, K, D, D)``; ``Sigma_k = diag(s_k) L_k L_k^T diag(s_k)``.
    """
    scales = draws["scales"]
    correlation = draws.get("correlation_cholesky")
    if correlation is None:
        correlation = torch.ones(*scales.shape, 1, dtype=scales.dtype, device=scales.device)
    scale_tril = scales.unsqueeze(-1) * correlation
    return draws["weights"], draws["locs"], scale_tril @ scale_tril.transpose(-1, -2)


# -- responsibilities ---------------------------------------------------------------------------------------------
def responsibilities(
    x: torch.Tensor, weights: torch.Tensor, means: torch.Tensor, covariances: torch.Tensor
) -> torch.Tensor:
    """Posterior responsibilities ``r_ik = pi_k N(x_i | mu_k, Sigma_k) / sum_j pi_j N(x_i | mu_j, Sigma_j)``.

    Computed in log space (log-sum-exp) and in float64, batched over any leading dimensions of the parameters.

    Parameters
    ----------
    x : torch.Tensor
        Points, shape ``(N, D)``.
    weights : torch.Tensor
        ``pi``, shape ``(..., K)``.
    means : torch.Tensor
        ``mu``, shape ``(..., K, D)``.
    covariances : torch.Tensor
        ``Sigma``, shape ``(..., K, D, D)``.

    Returns
    -------
    torch.Tensor
        ``r``, shape ``(..., N, K)``; every row sums to one.
    """
    x, weights, means, covariances = (torch.as_tensor(t, dtype=torch.float64) for t in (x, weights, means, covariances))
    if x.dim() != 2 or means.shape[-1] != x.shape[-1] or covariances.shape[-2:] != (x.shape[-1],) * 2:
        raise ValueError(
            f"shapes do not fit: x {tuple(x.shape)} must be (N, D), means (..., K, D) and covariances (..., K, D, D); "
            f"got means {tuple(means.shape)}, covariances {tuple(covariances.shape)}"
        )
    components = dist.MultivariateNormal(means.unsqueeze(-3), covariance_matrix=covariances.unsqueeze(-4))
    log_joint = weights.log().unsqueeze(-2) + components.log_prob(x.unsqueeze(-2))  # (..., N, K)
    return torch.softmax(log_joint, dim=-1)


def posterior_responsibilities(fit, num_samples: int = 1000, seed: int | None = 0) -> torch.Tensor:
    """``q(z_i = k)`` of a ``ppvi.fit`` of :func:`model`: the responsibilities averaged over guide draws.

    ``E_q(theta)[r_ik(theta)]``, with ``r_ik(theta)`` of :func:`responsibilities` at each of ``num_samples``
    draws ``theta = (pi, mu, Sigma)`` from the fitted guide: the posterior probability of each assignment under
    the variational approximation of the continuous sites (not the responsibilities at the posterior mean).

    Parameters
    ----------
    fit : ppvi.Fit
        A fit of :func:`model`; its first argument is the data ``x``.
    num_samples : int
        Guide draws to average over.
    seed : int, optional
        Seed of the draws.

    Returns
    -------
    torch.Tensor
        Shape ``(N, K)``, rows summing to one.
    """
    x = fit.args[0]
    weights, means, covariances = fit_components(fit.sample(num_samples, seed=seed))
    return responsibilities(x, weights, means, covariances).mean(0)


def match_components(estimated_means: np.ndarray, reference_means: np.ndarray) -> np.ndarray:
    """The relabelling of estimated components that best matches reference ones (label switching).

    Minimises the summed squared distance between matched means (Hungarian algorithm, Kuhn 1955).

    Parameters
    ----------
    estimated_means, reference_means : numpy.ndarray
        Shapes ``(K, D)``.

    Returns
    -------
    numpy.ndarray
        ``order`` with ``estimated_means[order][k]`` matched to ``reference_means[k]``.
    """
    estimated_means, reference_means = np.asarray(estimated_means), np.asarray(reference_means)
    if estimated_means.shape != reference_means.shape:
        raise ValueError(f"means must have the same shape (K, D): {estimated_means.shape} and {reference_means.shape}")
    cost = ((reference_means[:, None, :] - estimated_means[None, :, :]) ** 2).sum(-1)
    rows, columns = linear_sum_assignment(cost)
    return columns[np.argsort(rows)]


# -- shared numpy helpers -----------------------------------------------------------------------------------------
def _log_normalise(log_joint: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise ``log sum exp`` and the normalised probabilities (scipy's ``logsumexp`` took 10x longer here)."""
    shift = log_joint.max(axis=1, keepdims=True)
    probabilities = np.exp(log_joint - shift)
    total = probabilities.sum(axis=1, keepdims=True)
    return (np.log(total) + shift)[:, 0], probabilities / total


def _as_data(data) -> np.ndarray:
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().double().numpy()
    data = np.asarray(data, dtype=np.float64)
    if data.ndim != 2:
        raise ValueError(f"data must have shape (num_points, data_dim), got {data.shape}")
    if not np.isfinite(data).all():
        raise ValueError("data holds NaN or infinite values: remove or impute them first")
    return data


def _check_components(num_components, num_points: int) -> None:
    if not isinstance(num_components, (int, np.integer)) or not 1 <= num_components <= num_points:
        raise ValueError(f"num_components must be an integer in [1, num_points = {num_points}], got {num_components!r}")


def _check_positive_definite(matrices: np.ndarray, name: str) -> None:
    if not np.allclose(matrices, np.swapaxes(matrices, -1, -2)) or (np.linalg.eigvalsh(matrices) <= 0).any():
        raise ValueError(f"{name} must be symmetric positive definite; a singular one (e.g. from a component on "
                         "one point) can be fixed with covariance_regularization > 0 or a different start")


def _log_gaussian(data: np.ndarray, means: np.ndarray, precision_cholesky: np.ndarray) -> np.ndarray:
    """``log N(x_n | mu_k, Lambda_k^{-1})`` with ``Lambda_k = U_k U_k^T`` (``U_k``: ``precision_cholesky[k]``);
    shape ``(N, K)``."""
    data_dim = data.shape[1]
    # matmul, not einsum: numpy's einsum of this shape took 50x longer.
    projected = np.matmul(data[None], precision_cholesky) - np.matmul(means[:, None, :], precision_cholesky)
    log_det = np.log(np.diagonal(precision_cholesky, axis1=1, axis2=2)).sum(-1)
    return -0.5 * (data_dim * math.log(2 * math.pi) + (projected**2).sum(-1).T) + log_det


def _precision_cholesky(covariances: np.ndarray) -> np.ndarray:
    """``U_k`` with ``U_k U_k^T = Sigma_k^{-1}`` (upper triangular ``L_k^{-T}``), as scikit-learn stores it."""
    factors = np.linalg.cholesky(covariances)
    identity = np.broadcast_to(np.eye(covariances.shape[-1]), covariances.shape)
    return np.swapaxes(np.linalg.solve(factors, identity), -1, -2)


def _weighted_statistics(
    data: np.ndarray, resp: np.ndarray, regularization: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``N_k``, ``xbar_k`` and ``S_k`` of Bishop (2006) eqs. 10.51-10.53 (``+ regularization I`` on ``S_k``)."""
    counts = resp.sum(0) + _EMPTY_COMPONENT_GUARD
    means = resp.T @ data / counts[:, None]
    centred = data[None, :, :] - means[:, None, :]  # (K, N, D)
    scatter = np.matmul(np.swapaxes(resp.T[:, :, None] * centred, 1, 2), centred) / counts[:, None, None]
    return counts, means, scatter + regularization * np.eye(data.shape[1])


def kmeans_responsibilities(data, num_components: int, seed: int = 0) -> np.ndarray:
    """One-hot responsibilities of a k-means clustering: scikit-learn's ``init_params="kmeans"`` start.

    ``KMeans(n_clusters=K, n_init=1, random_state=numpy.random.RandomState(seed))``, exactly as
    ``GaussianMixture`` and ``BayesianGaussianMixture`` with ``random_state=seed`` draw it, so :func:`em` and
    :func:`cavi` started here start where scikit-learn does.

    Returns
    -------
    numpy.ndarray
        Shape ``(N, K)``.
    """
    from sklearn.cluster import KMeans

    data = _as_data(data)
    _check_components(num_components, data.shape[0])
    labels = KMeans(n_clusters=num_components, n_init=1, random_state=np.random.RandomState(seed)).fit(data).labels_
    resp = np.zeros((data.shape[0], num_components))
    resp[np.arange(data.shape[0]), labels] = 1.0
    return resp


def _initial_responsibilities(data: np.ndarray, num_components: int, init, seed: int) -> np.ndarray:
    if init is None:
        return kmeans_responsibilities(data, num_components, seed)
    resp = np.asarray(init, dtype=np.float64)
    if resp.shape != (data.shape[0], num_components) or (resp < 0).any() or not np.allclose(resp.sum(1), 1.0):
        raise ValueError(
            f"init must be responsibilities of shape (num_points, num_components) = {(data.shape[0], num_components)}"
            f" with non-negative rows summing to one (got shape {resp.shape}); or pass MixtureParameters"
        )
    return resp


# -- EM -----------------------------------------------------------------------------------------------------------
class MixtureParameters(NamedTuple):
    """Parameters of a Gaussian mixture (numpy): ``weights`` ``(K,)``, ``means`` ``(K, D)``, ``covariances``
    ``(K, D, D)``."""

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray


class EMResult(NamedTuple):
    """Result of :func:`em`.

    Attributes
    ----------
    weights, means, covariances : numpy.ndarray
        The final maximum-likelihood estimates, shapes ``(K,)``, ``(K, D)``, ``(K, D, D)``.
    responsibilities : numpy.ndarray
        ``r_ik`` at the final parameters, shape ``(N, K)``.
    log_likelihood : numpy.ndarray
        Average log-likelihood per point (scikit-learn's ``score``) at the initial parameters and after every
        M-step; non-decreasing. The last entry is that of the returned parameters.
    iterations : int
        M-steps taken.
    converged : bool
        Whether the last gain was below ``tolerance``.
    """

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    responsibilities: np.ndarray
    log_likelihood: np.ndarray
    iterations: int
    converged: bool


def _em_e_step(data: np.ndarray, parameters: MixtureParameters) -> tuple[float, np.ndarray]:
    """Average log-likelihood and responsibilities (Bishop 2006, eq. 9.23) at ``parameters``."""
    log_joint = np.log(parameters.weights) + _log_gaussian(
        data, parameters.means, _precision_cholesky(parameters.covariances)
    )
    log_norm, resp = _log_normalise(log_joint)
    return float(log_norm.mean()), resp


def _em_m_step(data: np.ndarray, resp: np.ndarray, regularization: float) -> MixtureParameters:
    """Maximum-likelihood weights, means and covariances given responsibilities (Bishop 2006, eqs. 9.24-9.26)."""
    counts, means, covariances = _weighted_statistics(data, resp, regularization)
    return MixtureParameters(counts / counts.sum(), means, covariances)


def em(
    data,
    num_components: int,
    init: MixtureParameters | np.ndarray | None = None,
    max_iterations: int = 1000,
    tolerance: float = 1e-10,
    covariance_regularization: float = 0.0,
    seed: int = 0,
) -> EMResult:
    """Maximum-likelihood Gaussian mixture by expectation-maximisation (Dempster, Laird & Rubin 1977; Bishop
    2006, PRML §9.2.2), with full covariances.

    Each iteration computes the responsibilities ``r_ik`` at the current parameters (E-step) and the weights,
    means and covariances that maximise the expected complete-data log-likelihood given them (M-step); the
    log-likelihood never decreases.

    Parameters
    ----------
    data : array_like
        Points, shape ``(N, D)``.
    num_components : int
        ``K``.
    init : MixtureParameters or numpy.ndarray, optional
        Starting parameters, or starting responsibilities ``(N, K)`` (an M-step turns them into parameters). By
        default :func:`kmeans_responsibilities` with ``seed``: scikit-learn's default start.
    max_iterations : int
        Cap on M-steps.
    tolerance : float
        Stop when the average log-likelihood per point gains less than this (scikit-learn's ``tol``).
    covariance_regularization : float
        Added to the diagonal of every covariance in the M-step (scikit-learn's ``reg_covar``; its default is
        ``1e-6``, ours 0, exact EM): keeps a component that collapses on a few points positive definite.
    seed : int
        Seed of the default k-means start.

    Returns
    -------
    EMResult
    """
    data = _as_data(data)
    _check_components(num_components, data.shape[0])
    if isinstance(init, MixtureParameters):
        parameters = MixtureParameters(*(np.asarray(value, dtype=np.float64) for value in init))
        expected = [(num_components,), (num_components, data.shape[1]), (num_components, data.shape[1], data.shape[1])]
        if [value.shape for value in parameters] != expected:
            raise ValueError(f"init parameters must have shapes {expected}, got {[v.shape for v in parameters]}")
        if (parameters.weights <= 0).any() or not np.isclose(parameters.weights.sum(), 1.0):
            raise ValueError(f"init weights must be positive and sum to one, got {parameters.weights}")
        _check_positive_definite(parameters.covariances, "init covariances")
    else:
        resp = _initial_responsibilities(data, num_components, init, seed)
        parameters = _em_m_step(data, resp, covariance_regularization)
    trace: list[float] = []
    converged = False
    iterations = 0
    log_likelihood, resp = _em_e_step(data, parameters)
    trace.append(log_likelihood)
    while iterations < max_iterations and not converged:
        parameters = _em_m_step(data, resp, covariance_regularization)
        iterations += 1
        log_likelihood, resp = _em_e_step(data, parameters)
        converged = log_likelihood - trace[-1] < tolerance
        trace.append(log_likelihood)
    return EMResult(*parameters, resp, np.asarray(trace), iterations, converged)


# -- CAVI ---------------------------------------------------------------------------------------------------------
class NormalWishartPrior(NamedTuple):
    """Conjugate prior of :func:`cavi` (Bishop 2006, eqs. 10.39-10.40), in scikit-learn's terms.

    Attributes
    ----------
    weight_concentration : float
        ``alpha_0`` of the symmetric Dirichlet (``weight_concentration_prior``).
    mean : numpy.ndarray
        ``m_0``, shape ``(D,)`` (``mean_prior``).
    mean_precision : float
        ``beta_0`` (``mean_precision_prior``).
    degrees_of_freedom : float
        ``nu_0 > D - 1`` (``degrees_of_freedom_prior``).
    covariance : numpy.ndarray
        ``W_0^{-1}``, shape ``(D, D)`` (``covariance_prior``); ``E[Lambda_k] = nu_0 W_0``.
    """

    weight_concentration: float
    mean: np.ndarray
    mean_precision: float
    degrees_of_freedom: float
    covariance: np.ndarray


def default_prior(data, num_components: int) -> NormalWishartPrior:
    """scikit-learn's default prior of ``BayesianGaussianMixture``: ``alpha_0 = 1 / K``, ``m_0`` the data mean,
    ``beta_0 = 1``, ``nu_0 = D`` and ``W_0^{-1}`` the sample covariance of the data (``numpy.cov``, ddof 1)."""
    data = _as_data(data)
    return NormalWishartPrior(
        1.0 / num_components, data.mean(0), 1.0, float(data.shape[1]), np.atleast_2d(np.cov(data.T))
    )


class CAVIResult(NamedTuple):
    """Result of :func:`cavi`: the factors ``q(pi) = Dir(alpha)`` and
    ``q(mu_k, Lambda_k) = N(mu_k | m_k, (beta_k Lambda_k)^{-1}) W(Lambda_k | W_k, nu_k)`` (Bishop 2006, eqs.
    10.57-10.63), and ``q(z_i = k) = r_ik``.

    Attributes
    ----------
    weight_concentration : numpy.ndarray
        ``alpha``, shape ``(K,)``.
    means : numpy.ndarray
        ``m``, shape ``(K, D)``: the posterior means of the component means.
    mean_precision : numpy.ndarray
        ``beta``, shape ``(K,)``.
    degrees_of_freedom : numpy.ndarray
        ``nu``, shape ``(K,)``.
    scale_matrices : numpy.ndarray
        ``W_k``, shape ``(K, D, D)``; ``E[Lambda_k] = nu_k W_k``.
    responsibilities : numpy.ndarray
        ``r``, shape ``(N, K)``, from which the final factors were computed.
    elbo : numpy.ndarray
        The evidence lower bound (total, in nats, all constants included) after the start and after every
        update of the global factors; non-decreasing.
    iterations : int
        Updates of ``q(z)`` taken.
    converged : bool
        Whether the last gain was below ``tolerance``.
    """

    weight_concentration: np.ndarray
    means: np.ndarray
    mean_precision: np.ndarray
    degrees_of_freedom: np.ndarray
    scale_matrices: np.ndarray
    responsibilities: np.ndarray
    elbo: np.ndarray
    iterations: int
    converged: bool

    @property
    def covariances(self) -> np.ndarray:
        """``(nu_k W_k)^{-1}``, the inverse of ``E[Lambda_k]``: scikit-learn's ``covariances_``."""
        return np.linalg.inv(self.degrees_of_freedom[:, None, None] * self.scale_matrices)

    @property
    def weights(self) -> np.ndarray:
        """``E[pi] = alpha / sum(alpha)``: scikit-learn's ``weights_``."""
        return self.weight_concentration / self.weight_concentration.sum()


class _GlobalFactors(NamedTuple):
    alpha: np.ndarray
    beta: np.ndarray
    m: np.ndarray
    scale: np.ndarray  # W_k
    nu: np.ndarray


def _cavi_global_update(
    data: np.ndarray, resp: np.ndarray, prior: NormalWishartPrior, regularization: float
) -> _GlobalFactors:
    """Optimal ``q(pi)`` and ``q(mu_k, Lambda_k)`` given ``q(z) = r`` (Bishop 2006, eqs. 10.58, 10.60-10.63)."""
    counts, xbar, scatter = _weighted_statistics(data, resp, regularization)
    alpha = prior.weight_concentration + counts
    beta = prior.mean_precision + counts
    m = (prior.mean_precision * prior.mean + counts[:, None] * xbar) / beta[:, None]
    offset = xbar - prior.mean
    scale_inverse = (
        prior.covariance
        + counts[:, None, None] * scatter
        + (prior.mean_precision * counts / beta)[:, None, None] * offset[:, :, None] * offset[:, None, :]
    )
    return _GlobalFactors(alpha, beta, m, np.linalg.inv(scale_inverse), prior.degrees_of_freedom + counts)


def _expectations(data: np.ndarray, factors: _GlobalFactors) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``E[ln pi_k]``, ``E[ln |Lambda_k|]`` (Bishop 2006, eqs. 10.65-10.66) and ``E[ln N(x_n | mu_k, Lambda_k^{-1})]``
    (eq. 10.64 inside 10.46), shape ``(N, K)``."""
    data_dim = data.shape[1]
    log_weights = digamma(factors.alpha) - digamma(factors.alpha.sum())
    _, log_det_scale = np.linalg.slogdet(factors.scale)
    log_det_precision = (
        digamma(0.5 * (factors.nu[:, None] - np.arange(data_dim)[None, :])).sum(1)
        + data_dim * math.log(2.0)
        + log_det_scale
    )
    # (x_n - m_k)^T W_k (x_n - m_k) = |C_k^T (x_n - m_k)|^2 with W_k = C_k C_k^T, one matrix product per component.
    factor = np.linalg.cholesky(factors.scale)
    projected = np.matmul(data[None], factor) - np.matmul(factors.m[:, None, :], factor)  # (K, N, D)
    quadratic = data_dim / factors.beta + factors.nu * (projected**2).sum(-1).T
    expected_log_density = 0.5 * (log_det_precision - quadratic - data_dim * math.log(2 * math.pi))
    return log_weights, log_det_precision, expected_log_density


def _cavi_local_update(expectations: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """Optimal ``q(z)`` given the global factors' :func:`_expectations`: ``r_nk`` proportional to ``rho_nk``
    (Bishop 2006, eqs. 10.46-10.49)."""
    log_weights, _, expected_log_density = expectations
    return _log_normalise(log_weights + expected_log_density)[1]


def _log_dirichlet_normaliser(alpha: np.ndarray) -> float:
    """``ln C(alpha)`` (Bishop 2006, eq. B.23)."""
    return float(gammaln(alpha.sum()) - gammaln(alpha).sum())


def _log_wishart_normaliser(log_det_scale: np.ndarray, nu: np.ndarray, data_dim: int) -> np.ndarray:
    """``ln B(W, nu)`` (Bishop 2006, eq. B.79) from ``ln |W|``."""
    return -0.5 * nu * log_det_scale - (
        0.5 * nu * data_dim * math.log(2.0) + np.array([multigammaln(0.5 * v, data_dim) for v in np.atleast_1d(nu)])
    )


def _cavi_elbo(
    data: np.ndarray, resp: np.ndarray, factors: _GlobalFactors, prior: NormalWishartPrior,
    expectations: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> float:
    """The ELBO ``E_q[ln p(X, Z, pi, mu, Lambda)] - E_q[ln q]`` for any ``q`` of the mean-field family (Bishop
    2006, eqs. 10.70-10.77, with the likelihood term written per point so it holds for any ``r``).
    ``expectations``: :func:`_expectations` of ``factors`` when already computed."""
    num_components = resp.shape[1]
    data_dim = data.shape[1]
    expectations = _expectations(data, factors) if expectations is None else expectations
    log_weights, log_det_precision, expected_log_density = expectations
    _, log_det_scale = np.linalg.slogdet(factors.scale)
    _, log_det_prior_covariance = np.linalg.slogdet(prior.covariance)
    beta0, nu0 = prior.mean_precision, prior.degrees_of_freedom

    likelihood = float((resp * expected_log_density).sum())  # E[ln p(X | Z, mu, Lambda)], 10.71
    assignments = float((resp * log_weights).sum())  # E[ln p(Z | pi)], 10.72
    weights_prior = _log_dirichlet_normaliser(np.full(num_components, prior.weight_concentration)) + (
        prior.weight_concentration - 1.0
    ) * log_weights.sum()  # 10.73
    offset = factors.m - prior.mean
    mean_precision_prior = float(
        0.5 * (
            data_dim * math.log(beta0 / (2 * math.pi))
            + log_det_precision
            - data_dim * beta0 / factors.beta
            - beta0 * factors.nu * np.einsum("kd,kde,ke->k", offset, factors.scale, offset)
        ).sum()
        + num_components * _log_wishart_normaliser(np.array([-log_det_prior_covariance]), np.array([nu0]), data_dim)[0]
        + 0.5 * (nu0 - data_dim - 1) * log_det_precision.sum()
        - 0.5 * (factors.nu * np.einsum("de,ked->k", prior.covariance, factors.scale)).sum()
    )  # 10.74
    entropy_assignments = -float((resp * np.log(np.where(resp > 0, resp, 1.0))).sum())  # -10.75
    log_q_weights = float(((factors.alpha - 1.0) * log_weights).sum() + _log_dirichlet_normaliser(factors.alpha))
    wishart_entropy = (
        -_log_wishart_normaliser(log_det_scale, factors.nu, data_dim)
        - 0.5 * (factors.nu - data_dim - 1) * log_det_precision
        + 0.5 * factors.nu * data_dim
    )  # Bishop eq. B.82
    log_q_means_precisions = float(
        (0.5 * log_det_precision + 0.5 * data_dim * np.log(factors.beta / (2 * math.pi)) - 0.5 * data_dim
         - wishart_entropy).sum()
    )  # 10.77
    return (
        likelihood + assignments + weights_prior + mean_precision_prior
        + entropy_assignments - log_q_weights - log_q_means_precisions
    )


def sklearn_lower_bound_offset(num_points: int, prior: NormalWishartPrior, num_components: int) -> float:
    """The constant ``ELBO - lower_bound_`` between :func:`cavi`'s ELBO and scikit-learn's
    ``BayesianGaussianMixture.lower_bound_`` (``weight_concentration_prior_type="dirichlet_distribution"``).

    After an update of ``q(pi, mu, Lambda)`` given ``r`` (where both evaluate their bounds), the ELBO is the
    conjugate marginal with soft counts, ``-sum r ln r - ln C(alpha) - sum_k [ln B(W_k, nu_k) + D/2 ln beta_k]``
    plus ``ln C(alpha_0) + K ln B(W_0, nu_0) + K D/2 ln beta_0 - N D/2 ln(2 pi)`` (Bishop 2006, eqs. 10.70-10.77,
    B.23, B.79). scikit-learn keeps the first group and leaves ``D (D - 1)/4 ln pi`` out of each Wishart
    normaliser; this function returns the rest, so ``lower_bound_ + offset`` is the ELBO in nats.
    """
    data_dim = np.asarray(prior.mean).shape[0]
    alpha0, nu0 = float(prior.weight_concentration), float(prior.degrees_of_freedom)
    log_det_scale = -np.linalg.slogdet(np.atleast_2d(prior.covariance))[1]  # ln |W_0| = -ln |W_0^{-1}|
    log_wishart = _log_wishart_normaliser(np.array([log_det_scale]), np.array([nu0]), data_dim)[0]
    return float(
        _log_dirichlet_normaliser(np.full(num_components, alpha0)) + num_components * log_wishart
        + 0.5 * num_components * data_dim * math.log(prior.mean_precision)
        - 0.5 * num_points * data_dim * math.log(2 * math.pi)
        + 0.25 * num_components * data_dim * (data_dim - 1) * math.log(math.pi)
    )


def cavi(
    data,
    num_components: int,
    prior: NormalWishartPrior | None = None,
    init: np.ndarray | None = None,
    max_iterations: int = 1000,
    tolerance: float = 1e-8,
    covariance_regularization: float = 0.0,
    seed: int = 0,
) -> CAVIResult:
    """Coordinate-ascent mean-field VI for the conjugate Bayesian Gaussian mixture (Bishop 2006, PRML §10.2;
    Blei, Kucukelbir & McAuliffe 2017, §3).

    The family is ``q(z) q(pi) prod_k q(mu_k, Lambda_k)``; each factor is set in turn to its optimum given the
    others (``q(pi, mu, Lambda)`` given ``r``, then ``r`` given them), so the ELBO never decreases.

    Parameters
    ----------
    data : array_like
        Points, shape ``(N, D)``.
    num_components : int
        ``K``.
    prior : NormalWishartPrior, optional
        The conjugate prior; by default scikit-learn's (:func:`default_prior`).
    init : numpy.ndarray, optional
        Starting responsibilities ``(N, K)``; by default :func:`kmeans_responsibilities` with ``seed``
        (scikit-learn's default start).
    max_iterations : int
        Cap on updates of ``q(z)``.
    tolerance : float
        Stop when the ELBO (total, nats) gains less than this (scikit-learn's ``tol`` is on the same scale).
    covariance_regularization : float
        Added to the diagonal of every weighted scatter ``S_k`` (scikit-learn's ``reg_covar``, default ``1e-6``
        there, 0 here): with it the global update is no longer the exact optimum and the ELBO may dip by that
        order.
    seed : int
        Seed of the default k-means start.

    Returns
    -------
    CAVIResult
    """
    data = _as_data(data)
    num_points, data_dim = data.shape
    _check_components(num_components, num_points)
    prior = default_prior(data, num_components) if prior is None else prior
    prior = NormalWishartPrior(
        float(prior.weight_concentration), np.asarray(prior.mean, dtype=np.float64), float(prior.mean_precision),
        float(prior.degrees_of_freedom), np.atleast_2d(np.asarray(prior.covariance, dtype=np.float64)),
    )
    if prior.mean.shape != (data_dim,) or prior.covariance.shape != (data_dim, data_dim):
        raise ValueError(f"prior mean must have shape ({data_dim},) and covariance ({data_dim}, {data_dim}), got "
                         f"{prior.mean.shape} and {prior.covariance.shape}")
    _check_positive_definite(prior.covariance, "the prior covariance (W_0^{-1})")
    if not (prior.weight_concentration > 0 and prior.mean_precision > 0 and prior.degrees_of_freedom > data_dim - 1):
        raise ValueError("the prior needs weight_concentration > 0, mean_precision > 0 and degrees_of_freedom > D - 1"
                         f" = {data_dim - 1}; got {prior.weight_concentration}, {prior.mean_precision}, "
                         f"{prior.degrees_of_freedom}")
    resp = _initial_responsibilities(data, num_components, init, seed)
    factors = _cavi_global_update(data, resp, prior, covariance_regularization)
    expectations = _expectations(data, factors)  # serve both the ELBO and the next update of q(z)
    trace = [_cavi_elbo(data, resp, factors, prior, expectations)]
    converged = False
    iterations = 0
    while iterations < max_iterations and not converged:
        resp = _cavi_local_update(expectations)
        factors = _cavi_global_update(data, resp, prior, covariance_regularization)
        expectations = _expectations(data, factors)
        iterations += 1
        trace.append(_cavi_elbo(data, resp, factors, prior, expectations))
        converged = trace[-1] - trace[-2] < tolerance
    return CAVIResult(
        factors.alpha, factors.m, factors.beta, factors.nu, factors.scale, resp, np.asarray(trace), iterations,
        converged,
    )
