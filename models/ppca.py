"""Probabilistic PCA (Tipping & Bishop, 1999) and its closed-form maximum likelihood, posterior and evidence.

.. math::

    z_n \\sim \\mathcal{N}(0, I_K), \\quad
    x_n \\mid z_n \\sim \\mathcal{N}(W z_n + b, \\sigma^2 I_D), \\quad n = 1, \\dots, N.

The loadings ``W`` (``D x K``), the offset ``b`` (``D``) and the noise scale ``sigma`` are *fixed inputs* of
:func:`model`, not latent variables: this is the lecture's "VI over z" setting, in which the posterior
``p(z | x, W, b, sigma)`` is exactly Gaussian (:func:`posterior`) and the evidence ``p(x | W, b, sigma)`` is
known in closed form (:func:`log_marginal_likelihood`), so a variational fit can be checked against the truth.

Latent site: ``z`` (real, shape ``N x K``, inside the plate ``data``). Observed site: ``x`` (shape ``N x D``).

Note the two parametrisations of the noise: :func:`model` and :func:`simulate` take the standard deviation
``noise_scale`` (= ``sigma``), as Pyro's ``Normal`` does, while the closed forms take the variance
``noise_variance`` (= ``sigma**2``), as the papers do.

References
----------
M. E. Tipping and C. M. Bishop (1999). Probabilistic principal component analysis. *Journal of the Royal
Statistical Society, Series B* 61(3), 611-622.

C. M. Bishop (2006). *Pattern Recognition and Machine Learning*, §12.2. Springer.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch

#: Defaults for :func:`model` (when nothing fixes the sizes) and :func:`simulate`.
DEFAULT_NUM_POINTS = 200
DEFAULT_DATA_DIM = 5
DEFAULT_LATENT_DIM = 2
DEFAULT_NOISE_SCALE = 0.5


def _reference(*values: object) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of the first tensor among ``values``; torch's defaults when there is none."""
    for value in values:
        if isinstance(value, torch.Tensor):
            return value.dtype, value.device
    return torch.get_default_dtype(), torch.device("cpu")


def model(
    x: torch.Tensor | None = None,
    W: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    noise_scale: float | torch.Tensor = DEFAULT_NOISE_SCALE,
    num_points: int = DEFAULT_NUM_POINTS,
    latent_dim: int | None = None,
) -> torch.Tensor:
    """Pyro model of probabilistic PCA with fixed ``W``, ``b`` and ``noise_scale``; the latent site is ``z``.

    With ``x=None`` it draws ``num_points`` observations from the model. The arguments are ordered so that
    ``ppvi.fit(model, x, W, b, noise_scale)`` works positionally.

    Parameters
    ----------
    x : torch.Tensor, optional
        Observations, shape ``(N, D)``.
    W : torch.Tensor, optional
        Loadings, shape ``(D, K)``. Defaults to ``torch.eye(D, K)`` (unit loadings on the first ``K`` axes),
        with ``D`` taken from ``x`` (or :data:`DEFAULT_DATA_DIM`) and ``K = latent_dim``.
    b : torch.Tensor, optional
        Offset (the data mean), shape ``(D,)``. Defaults to zeros.
    noise_scale : float or torch.Tensor
        Standard deviation ``sigma`` of the isotropic observation noise (not its variance).
    num_points : int
        Number of points ``N`` drawn when ``x`` is None; ignored otherwise.
    latent_dim : int, optional
        ``K`` when ``W`` is not given (default :data:`DEFAULT_LATENT_DIM`); when ``W`` is given it is read off
        ``W`` and ``latent_dim``, if passed, must agree with it.

    Returns
    -------
    torch.Tensor
        ``x``, shape ``(N, D)``: the observations passed in, or the ones drawn. Dtype and device are those of
        the first tensor among ``x``, ``W``, ``b``, ``noise_scale`` (else torch's default dtype, CPU).
    """
    dtype, device = _reference(x, W, b, noise_scale)
    if W is None:
        data_dim = x.shape[-1] if x is not None else (b.shape[-1] if b is not None else DEFAULT_DATA_DIM)
        latent_dim = DEFAULT_LATENT_DIM if latent_dim is None else latent_dim
        W = torch.eye(data_dim, latent_dim, dtype=dtype, device=device)
    elif W.dim() != 2:
        raise ValueError(f"W must have shape (data_dim, latent_dim), got {tuple(W.shape)}")
    elif latent_dim is not None and latent_dim != W.shape[1]:
        raise ValueError(f"latent_dim={latent_dim} disagrees with W of shape {tuple(W.shape)}")
    data_dim, latent_dim = W.shape
    if b is None:
        b = torch.zeros(data_dim, dtype=dtype, device=device)
    if b.shape != (data_dim,):
        raise ValueError(f"b must have shape ({data_dim},) to match W, got {tuple(b.shape)}")
    if x is not None and (x.dim() != 2 or x.shape[1] != data_dim):
        raise ValueError(f"x must have shape (num_points, {data_dim}) to match W, got {tuple(x.shape)}")

    prior = dist.Normal(torch.zeros(latent_dim, dtype=dtype, device=device), 1.0).to_event(1)
    with pyro.plate("data", num_points if x is None else x.shape[0]):
        z = pyro.sample("z", prior)
        return pyro.sample("x", dist.Normal(z @ W.T + b, noise_scale).to_event(1), obs=x)


def simulate(
    num_points: int = DEFAULT_NUM_POINTS,
    data_dim: int = DEFAULT_DATA_DIM,
    latent_dim: int = DEFAULT_LATENT_DIM,
    noise_scale: float = DEFAULT_NOISE_SCALE,
    seed: int = 0,
    *,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw loadings, an offset and a data set from probabilistic PCA with a private generator.

    ``W`` and ``b`` have independent standard-normal entries; then ``z_n ~ N(0, I)`` and
    ``x_n = W z_n + b + noise_scale * eps_n`` with ``eps_n ~ N(0, I)``. The global random state is untouched.

    Parameters
    ----------
    num_points, data_dim, latent_dim : int
        ``N``, ``D`` and ``K``.
    noise_scale : float
        Standard deviation ``sigma`` of the observation noise.
    seed : int
        Seed of the private generator.
    dtype : torch.dtype, optional
        Dtype of the draws; torch's default dtype when None.

    Returns
    -------
    x : torch.Tensor
        Observations, shape ``(N, D)``.
    W : torch.Tensor
        Loadings, shape ``(D, K)``.
    b : torch.Tensor
        Offset, shape ``(D,)``.
    """
    dtype = torch.get_default_dtype() if dtype is None else dtype
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype)

    W = draw(data_dim, latent_dim)
    b = draw(data_dim)
    z = draw(num_points, latent_dim)
    x = z @ W.T + b + noise_scale * draw(num_points, data_dim)
    return x, W, b


def maximum_likelihood(x: torch.Tensor, latent_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closed-form maximum-likelihood estimates of probabilistic PCA (Tipping & Bishop 1999, eqs. 7-8).

    With ``S = (1/N) sum_n (x_n - b)(x_n - b)^T`` the sample covariance (divided by ``N``, the maximum-
    likelihood convention; scikit-learn's ``PCA`` divides by ``N - 1``) and ``S = U diag(lambda) U^T`` its
    eigendecomposition, eigenvalues in decreasing order:

    - ``b_ml`` is the sample mean;
    - ``sigma^2_ml = (1 / (D - K)) sum_{j > K} lambda_j``, the mean of the discarded eigenvalues
      (when ``N <= D`` this includes the zero eigenvalues of ``S``; scikit-learn's ``noise_variance_``
      averages only the first ``min(N, D) - K`` of them);
    - ``W_ml = U_K (Lambda_K - sigma^2_ml I)^{1/2}``, taking the arbitrary rotation ``R = I``
      (Bishop PRML §12.2.1, eq. 12.45). Only ``W_ml W_ml^T`` is identified; each column's sign is fixed so
      that its largest-magnitude entry is positive.

    Parameters
    ----------
    x : torch.Tensor
        Data, shape ``(N, D)``.
    latent_dim : int
        ``K``, with ``1 <= K < D``.

    Returns
    -------
    W_ml : torch.Tensor
        Loadings, shape ``(D, K)``.
    b_ml : torch.Tensor
        Offset, shape ``(D,)``.
    noise_variance_ml : torch.Tensor
        ``sigma^2_ml``, a scalar tensor.
    """
    if x.dim() != 2:
        raise ValueError(f"x must have shape (num_points, data_dim), got {tuple(x.shape)}")
    num_points, data_dim = x.shape
    if not 1 <= latent_dim < data_dim:
        raise ValueError(f"latent_dim must be in [1, data_dim - 1] = [1, {data_dim - 1}], got {latent_dim}")
    b_ml = x.mean(0)
    centred = x - b_ml
    covariance = centred.T @ centred / num_points
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    noise_variance_ml = eigenvalues[latent_dim:].mean()
    U = eigenvectors[:, :latent_dim]
    largest = U.gather(0, U.abs().argmax(0, keepdim=True))
    U = U * largest.sign()
    W_ml = U * (eigenvalues[:latent_dim] - noise_variance_ml).clamp(min=0.0).sqrt()
    return W_ml, b_ml, noise_variance_ml


def _posterior_precision_factor(W: torch.Tensor, noise_variance: float | torch.Tensor) -> torch.Tensor:
    """Cholesky factor of ``M = W^T W + sigma^2 I`` (Bishop PRML eq. 12.41)."""
    latent_dim = W.shape[1]
    M = W.T @ W + noise_variance * torch.eye(latent_dim, dtype=W.dtype, device=W.device)
    return torch.linalg.cholesky(M)


def posterior(
    x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, noise_variance: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact posterior ``p(z_n | x_n) = N(mean_n, covariance)`` of probabilistic PCA with fixed parameters.

    With ``M = W^T W + sigma^2 I`` (``K x K``), ``mean_n = M^{-1} W^T (x_n - b)`` and
    ``covariance = sigma^2 M^{-1}``, the same for every ``n`` (Tipping & Bishop 1999, §3.2;
    Bishop PRML §12.2.1, eq. 12.42). The ``z_n`` are independent a posteriori.

    Parameters
    ----------
    x : torch.Tensor
        Data, shape ``(N, D)``.
    W : torch.Tensor
        Loadings, shape ``(D, K)``.
    b : torch.Tensor
        Offset, shape ``(D,)``.
    noise_variance : float or torch.Tensor
        ``sigma^2`` (the variance, not the scale).

    Returns
    -------
    mean : torch.Tensor
        Posterior means, shape ``(N, K)``.
    covariance : torch.Tensor
        Posterior covariance shared by all points, shape ``(K, K)``.
    """
    factor = _posterior_precision_factor(W, noise_variance)
    mean = torch.cholesky_solve(W.T @ (x - b).T, factor).T
    identity = torch.eye(W.shape[1], dtype=W.dtype, device=W.device)
    covariance = noise_variance * torch.cholesky_solve(identity, factor)
    return mean, covariance


def log_marginal_likelihood(
    x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, noise_variance: float | torch.Tensor
) -> torch.Tensor:
    """Log evidence ``sum_n log N(x_n | b, W W^T + sigma^2 I)`` of probabilistic PCA.

    The latent ``z`` integrated out, ``x_n`` is Gaussian with mean ``b`` and covariance
    ``C = W W^T + sigma^2 I`` (Tipping & Bishop 1999, eqs. 3-4; Bishop PRML §12.2.1, eqs. 12.35-12.36 and
    12.43-12.44). It is computed through ``M = W^T W + sigma^2 I`` (matrix determinant lemma and Woodbury
    identity), in ``O(N D K + K^3)``, and is differentiable in all arguments.

    Parameters
    ----------
    x : torch.Tensor
        Data, shape ``(N, D)``.
    W : torch.Tensor
        Loadings, shape ``(D, K)``.
    b : torch.Tensor
        Offset, shape ``(D,)``.
    noise_variance : float or torch.Tensor
        ``sigma^2`` (the variance, not the scale).

    Returns
    -------
    torch.Tensor
        The summed log density, a scalar tensor.
    """
    num_points, data_dim = x.shape
    latent_dim = W.shape[1]
    noise_variance = torch.as_tensor(noise_variance, dtype=W.dtype, device=W.device)
    factor = _posterior_precision_factor(W, noise_variance)
    # log det C = log det M + (D - K) log sigma^2
    log_det = 2.0 * factor.diagonal().log().sum() + (data_dim - latent_dim) * noise_variance.log()
    # (x - b)^T C^{-1} (x - b) = (|x - b|^2 - |L^{-1} W^T (x - b)|^2) / sigma^2, with M = L L^T
    centred = x - b
    projected = torch.linalg.solve_triangular(factor, W.T @ centred.T, upper=False)
    mahalanobis = (centred.square().sum() - projected.square().sum()) / noise_variance
    return -0.5 * (mahalanobis + num_points * (log_det + data_dim * math.log(2.0 * math.pi)))
