"""Tests of ppvi.diagnostics.psis against outside references: arviz 0.x ``psislw`` (and its private
``_gpdfit``), scipy's generalized Pareto distribution, and the known tail index of normal importance
ratios."""

from __future__ import annotations

import math

import arviz as az
import numpy as np
import pytest
import torch
from arviz.stats.stats import _gpdfit as arviz_gpdfit
from scipy import stats
from torch.distributions import Normal

from ppvi.diagnostics import (
    PSISWarning,
    fit_generalized_pareto,
    generalized_pareto_quantile,
    khat_threshold,
    khat_verdict,
    psis,
    psis_effective_sample_size,
    tail_length,
)

# Agreement with arviz: both compute in float64 with the same formulas, so differences are rounding (~1e-14).
EXACT = 1e-10
# The same input in another batch shape or memory layout: khat and weights may differ in the last bit, because
# sums are reduced in a layout-dependent order.
REDUCTION_ORDER = 1e-14


def arviz_psis(log_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """arviz 0.x reference; it smooths over the last axis and loops over the others (it modifies nothing)."""
    with np.errstate(over="ignore"):
        # arviz weights the grid points of the fit by 1 / sum_i exp(l_i - l_j), which overflows to a weight of
        # exactly 0 (the correct limit) for points far below the best; ppvi uses the equivalent softmax.
        smoothed, khat = az.psislw(np.array(log_weights, dtype=np.float64))
    return np.asarray(smoothed), np.asarray(khat)


def ppvi_psis(log_weights: np.ndarray, dim: int = -1) -> tuple[np.ndarray, np.ndarray]:
    smoothed, khat = psis(torch.from_numpy(np.asarray(log_weights)), dim=dim)
    assert smoothed.dtype == torch.float64 and khat.dtype == torch.float64
    return smoothed.numpy(), khat.numpy()


def normal_ratios(rng: np.random.Generator, proposal_scale: float, shape: tuple[int, ...]) -> np.ndarray:
    """log N(theta; 0, 1) - log N(theta; 0, s) for theta ~ N(0, s^2).

    For s < 1 the weights exp(a theta^2), a = 1/(2 s^2) - 1/2, have tail index k = 2 a s^2 = 1 - s^2.
    For s > 1 they are bounded by s and fall off quadratically from their maximum at theta = 0, where theta
    has a flat density, so that P(w > w_max - u) ~ sqrt(u): a bounded generalized Pareto tail with k = -2.
    """
    theta = rng.normal(0.0, proposal_scale, size=shape)
    return stats.norm.logpdf(theta) - stats.norm.logpdf(theta, scale=proposal_scale)


# Families of log ratios, heavy to light tailed; each row of a batch gets its own draw.
FAMILIES = {
    # k = 1 - 0.3^2 = 0.91: much too narrow a proposal.
    "normal_narrow": lambda rng, shape: normal_ratios(rng, 0.3, shape),
    # k = 1 - 0.8^2 = 0.36.
    "normal_slightly_narrow": lambda rng, shape: normal_ratios(rng, 0.8, shape),
    # s > 1: bounded weights, k = -2.
    "normal_wide": lambda rng, shape: normal_ratios(rng, 1.5, shape),
    # log of a Pareto variable with tail index k is exponential with mean k: k = 1.2, infinite mean weights.
    "pareto_very_heavy": lambda rng, shape: rng.exponential(1.2, size=shape),
    "pareto_moderate": lambda rng, shape: rng.exponential(0.4, size=shape),
    # Weights uniform on [0, 1] near their maximum: k = -1.
    "uniform": lambda rng, shape: np.log(rng.uniform(size=shape)),
    # Student-t log ratios: heavy on both sides, unnormalised and shifted far from 0.
    "student_t_shifted": lambda rng, shape: 50.0 + rng.standard_t(3, size=shape),
}


# ------------------------------------------------------------------------------------------------------------
# Tail length


def test_tail_length_known_values():
    # ceil(min(S / 5, 3 sqrt(S))), as arviz 0.x psislw and R loo::n_pareto.
    assert [tail_length(s) for s in (20, 21, 100, 225, 1000, 4000)] == [4, 5, 20, 45, 95, 190]
    # relative efficiency 1/2: ceil(3 sqrt(2000)) = ceil(134.16).
    assert tail_length(1000, relative_efficiency=0.5) == 135
    with pytest.raises(ValueError):
        tail_length(0)
    with pytest.raises(ValueError):
        tail_length(100, relative_efficiency=0.0)


def test_tail_length_matches_arviz_for_every_sample_size_up_to_400():
    # Strictly increasing log ratios, so arviz smooths exactly the M largest and leaves the rest untouched
    # (before normalisation): count the draws it changes (the largest may be truncated back to itself). A
    # different rounding of the tail length (arviz-stats floors) would change one draw fewer.
    for num_samples in range(21, 401):  # both rules: S / 5 up to S = 225, 3 sqrt(S) beyond
        log_weights = np.log(np.arange(1.0, num_samples + 1.0)) ** 2
        smoothed, _ = arviz_psis(log_weights)
        shift = smoothed[0] - log_weights[0]
        changed = ~np.isclose(smoothed - shift, log_weights, rtol=0.0, atol=1e-12)
        assert tail_length(num_samples) - 1 <= changed.sum() <= tail_length(num_samples)
        assert not changed[: num_samples - tail_length(num_samples)].any()
        np.testing.assert_allclose(ppvi_psis(log_weights)[0], smoothed, rtol=0.0, atol=EXACT)


# ------------------------------------------------------------------------------------------------------------
# psis against arviz


@pytest.mark.parametrize("num_samples", [21, 100, 1000, 4000])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_psis_matches_arviz(family: str, num_samples: int):
    rng = np.random.default_rng([num_samples, len(family)])
    log_weights = FAMILIES[family](rng, (6, num_samples))
    expected_weights, expected_khat = arviz_psis(log_weights)
    smoothed, khat = ppvi_psis(log_weights)
    np.testing.assert_allclose(khat, expected_khat, rtol=0.0, atol=EXACT)
    np.testing.assert_allclose(smoothed, expected_weights, rtol=0.0, atol=EXACT)
    # arviz returns normalised log weights, so do we.
    np.testing.assert_allclose(np.logaddexp.reduce(smoothed, axis=-1), 0.0, atol=1e-12)


def test_psis_matches_arviz_on_three_dimensional_input():
    rng = np.random.default_rng(3)
    log_weights = np.concatenate(
        [FAMILIES["normal_narrow"](rng, (2, 1, 500)), FAMILIES["uniform"](rng, (2, 2, 500))], axis=1
    )
    expected_weights, expected_khat = arviz_psis(log_weights)
    assert expected_khat.shape == (2, 3)
    smoothed, khat = ppvi_psis(log_weights)
    np.testing.assert_allclose(khat, expected_khat, rtol=0.0, atol=EXACT)
    np.testing.assert_allclose(smoothed, expected_weights, rtol=0.0, atol=EXACT)


def test_psis_matches_arviz_with_relative_efficiency():
    # MCMC-like draws: relative efficiency 0.3 lengthens the tail to ceil(min(S / 5, 3 sqrt(S / 0.3))).
    rng = np.random.default_rng(17)
    log_weights = FAMILIES["normal_slightly_narrow"](rng, (4, 1000))
    with np.errstate(over="ignore"):  # see arviz_psis
        expected_weights, expected_khat = az.psislw(log_weights.copy(), reff=0.3)
    smoothed, khat = psis(torch.from_numpy(log_weights), relative_efficiency=0.3)
    assert tail_length(1000, relative_efficiency=0.3) == 174
    np.testing.assert_allclose(khat.numpy(), expected_khat, rtol=0.0, atol=EXACT)
    np.testing.assert_allclose(smoothed.numpy(), expected_weights, rtol=0.0, atol=EXACT)


def test_psis_matches_arviz_with_ties_at_the_cutoff():
    # Rounded log ratios tie, also at the cut-off, which arviz leaves out of the tail (tail = draws strictly
    # above the (M + 1)-th largest). Tied draws inside the tail receive the same set of smoothed values in an
    # order that depends on the sort, so the weights are compared as sorted sets; khat exactly.
    rng = np.random.default_rng(4)
    for decimals in (0, 1):
        log_weights = np.round(rng.standard_t(2, size=(6, 300)), decimals)
        expected_weights, expected_khat = arviz_psis(log_weights)
        smoothed, khat = ppvi_psis(log_weights)
        np.testing.assert_allclose(khat, expected_khat, rtol=0.0, atol=EXACT)
        np.testing.assert_allclose(np.sort(smoothed), np.sort(expected_weights), rtol=0.0, atol=EXACT)


def test_psis_matches_arviz_when_ties_leave_fewer_than_five_tail_draws():
    # 100 draws, tail length 20, but only 3 draws above the (tied) cut-off: no fit, khat = inf, and no warning
    # (detecting it would need a host synchronisation; filterwarnings = error would catch one).
    log_weights = np.concatenate([np.zeros(97), [1.0, 2.0, 3.0]])
    expected_weights, expected_khat = arviz_psis(log_weights)
    smoothed, khat = ppvi_psis(log_weights)
    assert np.isinf(expected_khat) and khat == np.inf
    np.testing.assert_allclose(smoothed, expected_weights, rtol=0.0, atol=EXACT)


def test_psis_matches_arviz_for_log_weights_spread_beyond_float64_range():
    # Tail draws more than log(tiny) ~ -708 below the maximum are left out of the tail (arviz's cutoffmin).
    rng = np.random.default_rng(5)
    spread_out = np.linspace(0.0, -3000.0, 100) + rng.normal(size=100)
    log_weights = np.stack([spread_out, 300 * rng.normal(size=100)])
    expected_weights, expected_khat = arviz_psis(log_weights)
    smoothed, khat = ppvi_psis(log_weights)
    np.testing.assert_allclose(khat, expected_khat, rtol=1e-12)
    np.testing.assert_allclose(smoothed, expected_weights, rtol=1e-12)


def test_psis_matches_arviz_with_zero_weights():
    # -inf log ratios (target density zero) stay -inf and do not disturb the fit.
    rng = np.random.default_rng(6)
    log_weights = rng.normal(size=(2, 200))
    log_weights[:, :50] = -np.inf
    expected_weights, expected_khat = arviz_psis(log_weights)
    smoothed, khat = ppvi_psis(log_weights)
    np.testing.assert_allclose(khat, expected_khat, rtol=0.0, atol=EXACT)
    assert np.all(smoothed[:, :50] == -np.inf)
    np.testing.assert_allclose(smoothed[:, 50:], expected_weights[:, 50:], rtol=0.0, atol=EXACT)


def test_too_few_draws_warns_and_returns_inf():
    rng = np.random.default_rng(7)
    log_weights = rng.normal(size=(3, 20))  # tail length ceil(20 / 5) = 4 < 5
    with pytest.warns(PSISWarning, match="at least 5 tail draws"):
        smoothed, khat = ppvi_psis(log_weights)
    expected_weights, expected_khat = arviz_psis(log_weights)  # arviz: inf too, silently
    assert np.all(khat == np.inf) and np.all(np.isinf(expected_khat))
    np.testing.assert_allclose(smoothed, expected_weights, rtol=0.0, atol=EXACT)


# ------------------------------------------------------------------------------------------------------------
# Constant weights: the one deliberate deviation from arviz


def test_constant_weights_give_minus_infinity_and_uniform_weights():
    log_weights = np.full((2, 1000), 3.7)
    smoothed, khat = ppvi_psis(log_weights)
    np.testing.assert_allclose(smoothed, -math.log(1000), rtol=0.0, atol=1e-12)
    assert np.all(khat == -np.inf)
    assert khat_verdict(khat[0], 1000) == "good"
    # arviz finds no draw strictly above the tied cut-off and reports inf ("bad"): a perfect proposal flagged.
    expected_weights, expected_khat = arviz_psis(log_weights)
    assert np.all(expected_khat == np.inf)
    np.testing.assert_allclose(smoothed, expected_weights, rtol=0.0, atol=1e-12)


def test_exact_guide_with_rounding_noise_is_good():
    # A conjugate normal model whose guide is the exact posterior: log p(y, mu) - log q(mu) = log p(y) up to a
    # few distinct rounding levels (~1e-13). Fitting a Pareto to that noise, or to the 1-4 draws above a tied
    # cut-off (khat = inf, as arviz does for some of these draws), would be meaningless: the tail is flat.
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(200, generator=generator, dtype=torch.float64) + 2.0
    posterior_variance = 1.0 / (1.0 / 100.0 + data.numel())
    posterior = Normal(posterior_variance * data.sum(), math.sqrt(posterior_variance))
    mu = posterior.sample((4000,))
    log_joint = Normal(mu.unsqueeze(-1), 1.0).log_prob(data).sum(-1) + Normal(0.0, 10.0).log_prob(mu)
    log_weights = log_joint - posterior.log_prob(mu)
    assert 1 < torch.unique(log_weights).numel() and float(log_weights.max() - log_weights.min()) < 1e-9
    smoothed, khat = psis(log_weights)
    assert khat == -torch.inf and khat_verdict(khat, 4000) == "good"
    torch.testing.assert_close(smoothed, torch.full_like(smoothed, -math.log(4000)), rtol=0.0, atol=1e-9)
    assert float(psis_effective_sample_size(smoothed)) == pytest.approx(4000, rel=1e-8)


# ------------------------------------------------------------------------------------------------------------
# Regimes: the known tail index of normal importance ratios


# 64 independent replicates of S = 4000 draws each, smoothed in one batched call: khat from a tail of 190
# draws has a sampling sd of about (1 + k) / sqrt(190) ~ 0.14, so single replicates are checked only where the
# true k is far from the threshold.
NUM_REPLICATES = 64


def _normal_importance_log_weights(proposal_scale: float, num_samples: int = 4000) -> torch.Tensor:
    generator = torch.Generator().manual_seed(11)
    standard = torch.randn(NUM_REPLICATES, num_samples, generator=generator, dtype=torch.float64)
    theta = proposal_scale * standard
    return Normal(0.0, 1.0).log_prob(theta) - Normal(0.0, proposal_scale).log_prob(theta)


def test_much_too_narrow_proposal_is_bad():
    # Target N(0, 1), proposal N(0, 0.3^2): k = 1 - 0.3^2 = 0.91, the weights have no variance (see
    # normal_ratios). With 4000 draws khat is biased low (P(w > t) carries a slowly varying (log t)^(-1/2)
    # factor), around 0.8, so we check the median replicate and that most replicates are flagged.
    _, khat = psis(_normal_importance_log_weights(0.3))
    assert 0.7 < float(khat.median()) < 1.0
    verdicts = [khat_verdict(value, 4000) for value in khat]
    assert verdicts.count("bad") > NUM_REPLICATES * 3 / 4


@pytest.mark.parametrize("proposal_scale", [1.0, 1.2, 2.0])
def test_exact_or_wider_proposal_is_good(proposal_scale: float):
    # Scale 1: the proposal is the target, all log ratios are exactly 0 (khat = -inf). Wider: bounded weights
    # with k = -2, many sampling sds below 0.5, so every replicate must pass.
    _, khat = psis(_normal_importance_log_weights(proposal_scale))
    assert torch.all(khat < 0.5)
    if proposal_scale == 1.0:
        assert torch.all(khat == -torch.inf)
    assert all(khat_verdict(value, 4000) == "good" for value in khat)


# ------------------------------------------------------------------------------------------------------------
# Batching, dim, dtype


def test_batched_input_equals_loop_over_rows():
    rng = np.random.default_rng(8)
    log_weights = torch.from_numpy(rng.standard_t(2, size=(2, 3, 400)))
    smoothed, khat = psis(log_weights)
    assert smoothed.shape == (2, 3, 400) and khat.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            row_smoothed, row_khat = psis(log_weights[i, j])
            assert row_khat.shape == ()
            torch.testing.assert_close(khat[i, j], row_khat, rtol=0.0, atol=REDUCTION_ORDER)
            torch.testing.assert_close(smoothed[i, j], row_smoothed, rtol=0.0, atol=REDUCTION_ORDER)


def test_dim_argument():
    rng = np.random.default_rng(9)
    log_weights = torch.from_numpy(rng.standard_t(2, size=(4, 300, 2)))
    smoothed, khat = psis(log_weights, dim=1)
    expected_smoothed, expected_khat = psis(log_weights.movedim(1, -1))
    torch.testing.assert_close(khat, expected_khat, rtol=0.0, atol=REDUCTION_ORDER)
    torch.testing.assert_close(smoothed, expected_smoothed.movedim(-1, 1), rtol=0.0, atol=REDUCTION_ORDER)
    smoothed_0, khat_0 = psis(log_weights[:, :, 0].T, dim=0)
    torch.testing.assert_close(khat_0, khat[:, 0], rtol=0.0, atol=REDUCTION_ORDER)
    torch.testing.assert_close(smoothed_0, smoothed[:, :, 0].T, rtol=0.0, atol=REDUCTION_ORDER)


def test_float32_input_is_computed_and_returned_in_float64():
    rng = np.random.default_rng(10)
    log_weights = torch.from_numpy(rng.standard_t(2, size=(3, 500))).float()
    smoothed, khat = psis(log_weights)
    assert smoothed.dtype == torch.float64 and khat.dtype == torch.float64
    expected_smoothed, expected_khat = psis(log_weights.double())
    torch.testing.assert_close(khat, expected_khat, rtol=0.0, atol=0.0)
    torch.testing.assert_close(smoothed, expected_smoothed, rtol=0.0, atol=0.0)


def test_nan_row_does_not_contaminate_other_rows():
    rng = np.random.default_rng(12)
    log_weights = rng.normal(size=(2, 200))
    log_weights[1, 5] = np.nan
    smoothed, khat = ppvi_psis(log_weights)
    assert np.all(np.isnan(smoothed[1]))
    expected_weights, expected_khat = arviz_psis(log_weights[:1])
    np.testing.assert_allclose(smoothed[:1], expected_weights, rtol=0.0, atol=EXACT)
    np.testing.assert_allclose(khat[:1], expected_khat, rtol=0.0, atol=EXACT)


# ------------------------------------------------------------------------------------------------------------
# Generalized Pareto fit and quantile


def test_fit_matches_arviz_gpdfit():
    # arviz's private Zhang-Stephens fit (with the prior on k), on sorted exceedances.
    rng = np.random.default_rng(13)
    for shape_parameter in (-0.4, 0.1, 0.7, 1.5):
        for size in (5, 17, 190):
            exceedances = np.sort(stats.genpareto.rvs(shape_parameter, size=size, random_state=rng))
            with np.errstate(over="ignore"):  # see arviz_psis
                expected_k, expected_sigma = arviz_gpdfit(exceedances)
            k, sigma = fit_generalized_pareto(torch.from_numpy(rng.permutation(exceedances)))
            assert float(k) == pytest.approx(expected_k, abs=EXACT)
            assert float(sigma) == pytest.approx(expected_sigma, rel=EXACT)


def test_fit_recovers_scipy_generalized_pareto_shapes():
    # 10 000 draws per shape, fitted in one batched call. The asymptotic standard deviations of the maximum
    # likelihood estimates (Smith 1985; Zhang & Stephens 2009 is as efficient for k > -0.5) are
    # sd(k) = (1 + k) / sqrt(n) and sd(sigma / sigma_true) = sqrt(2 (1 + k) / n); we allow 4 of them, plus the
    # bias of the prior on k, 10 |0.5 - k| / (n + 10) <= 0.001.
    shapes = [-0.2, 0.2, 0.5, 0.9]
    num_draws = 10_000
    true_scale = 2.5
    rng = np.random.default_rng(14)
    draws = np.stack(
        [stats.genpareto.rvs(k, scale=true_scale, size=num_draws, random_state=rng) for k in shapes]
    )
    k, sigma = fit_generalized_pareto(torch.from_numpy(draws.T), dim=0)
    assert k.shape == (4,) and sigma.shape == (4,)
    for true_k, fitted_k, fitted_sigma in zip(shapes, k.tolist(), sigma.tolist(), strict=True):
        prior_bias = 10 * abs(0.5 - true_k) / (num_draws + 10)
        assert abs(fitted_k - true_k) < 4 * (1 + true_k) / math.sqrt(num_draws) + prior_bias
        assert abs(fitted_sigma / true_scale - 1) < 4 * math.sqrt(2 * (1 + true_k) / num_draws)


def test_fit_needs_five_exceedances():
    with pytest.raises(ValueError, match="at least 5"):
        fit_generalized_pareto(torch.ones(4))


def test_quantile_matches_scipy():
    probability = np.array([0.0, 1e-9, 0.1, 0.5, 0.9, 0.999, 1.0])
    for shape_parameter in (-0.5, 0.0, 0.3, 1.2):
        expected = stats.genpareto.ppf(probability, shape_parameter, scale=1.7)
        quantile = generalized_pareto_quantile(torch.from_numpy(probability), shape_parameter, 1.7).numpy()
        np.testing.assert_allclose(quantile, expected, rtol=1e-12)
    # |k| below float64 epsilon is treated as k = 0 (as arviz's _gpinv): the exponential quantile. scipy keeps
    # the tiny negative shape, so the two differ only at p = 1 (inf here, the end point -sigma/k = 1.7e20 in
    # scipy).
    expected = stats.genpareto.ppf(probability[:-1], -1e-20, scale=1.7)
    quantile = generalized_pareto_quantile(torch.from_numpy(probability), -1e-20, 1.7).numpy()
    np.testing.assert_allclose(quantile[:-1], expected, rtol=1e-12)
    assert quantile[-1] == np.inf
    # Broadcasting of parameters, and nan for a non-positive scale (as arviz's _gpinv).
    quantile = generalized_pareto_quantile(torch.tensor([[0.5], [0.9]]), torch.tensor([0.1, 0.2, 0.3]), 1.0)
    assert quantile.shape == (2, 3) and quantile.dtype == torch.float64
    assert torch.isnan(generalized_pareto_quantile(0.5, 0.2, 0.0))
    assert torch.isnan(generalized_pareto_quantile(1.5, 0.2, 1.0))


# ------------------------------------------------------------------------------------------------------------
# Effective sample size, threshold, verdict


def test_effective_sample_size():
    rng = np.random.default_rng(15)
    log_weights = FAMILIES["normal_narrow"](rng, (3, 1000))
    smoothed, _ = arviz_psis(log_weights)
    weights = np.exp(smoothed) / np.exp(smoothed).sum(-1, keepdims=True)
    expected = 1.0 / np.sum(weights**2, axis=-1)
    ours = psis_effective_sample_size(torch.from_numpy(smoothed)).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-12)
    # Unnormalised input, dim, relative efficiency.
    shifted = torch.from_numpy(smoothed.T + 123.0)
    np.testing.assert_allclose(psis_effective_sample_size(shifted, dim=0).numpy(), expected, rtol=1e-12)
    halved = psis_effective_sample_size(torch.from_numpy(smoothed), relative_efficiency=0.5).numpy()
    np.testing.assert_allclose(halved, expected / 2, rtol=1e-12)
    # Extremes: equal weights give S, one dominant weight gives 1.
    assert float(psis_effective_sample_size(torch.zeros(50))) == pytest.approx(50.0)
    assert float(psis_effective_sample_size(torch.tensor([0.0, -800.0, -900.0]))) == pytest.approx(1.0)


def test_khat_threshold():
    assert khat_threshold(100) == pytest.approx(0.5)
    assert khat_threshold(1000) == pytest.approx(2 / 3)
    assert khat_threshold(4000) == 0.7  # 1 - 1/log10(4000) = 0.72, capped at 0.7
    assert khat_threshold(10) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        khat_threshold(1)


@pytest.mark.parametrize(
    ("khat", "num_samples", "verdict"),
    [
        (-math.inf, 4000, "good"),
        (-0.3, 4000, "good"),
        (0.5, 4000, "good"),
        (0.6, 4000, "ok"),
        (0.7, 4000, "ok"),
        (0.71, 4000, "bad"),
        (1.5, 4000, "bad"),
        (math.inf, 4000, "bad"),
        (math.nan, 4000, "bad"),
        (0.6, 1000, "ok"),  # threshold 2/3
        (0.68, 1000, "bad"),
        (0.45, 100, "good"),  # threshold 0.5: nothing is merely "ok" with 100 draws
        (0.55, 100, "bad"),
    ],
)
def test_khat_verdict(khat: float, num_samples: int, verdict: str):
    assert khat_verdict(khat, num_samples) == verdict
    assert khat_verdict(torch.tensor(khat, dtype=torch.float64), num_samples) == verdict


# ------------------------------------------------------------------------------------------------------------
# Slow: a wider sweep against arviz


@pytest.mark.slow
def test_psis_matches_arviz_sweep():
    rng = np.random.default_rng(16)
    for num_samples in (21, 37, 64, 225, 226, 500, 2000, 8000):
        for family in sorted(FAMILIES):
            log_weights = FAMILIES[family](rng, (40, num_samples))
            expected_weights, expected_khat = arviz_psis(log_weights)
            smoothed, khat = ppvi_psis(log_weights)
            np.testing.assert_allclose(khat, expected_khat, rtol=0.0, atol=EXACT)
            np.testing.assert_allclose(smoothed, expected_weights, rtol=0.0, atol=EXACT)
