"""Tests of ppvi.convergence: split-R-hat against arviz's, the ELBO-gain test against direct numpy computations and
its calibration on white noise, and the stationarity rule on traces whose answer is known by construction."""

from __future__ import annotations

import arviz as az
import numpy as np
import pytest

from ppvi.convergence import (
    DEFAULT_RHAT_THRESHOLD,
    DEFAULT_TOLERANCE,
    DEFAULT_WINDOW,
    NUM_SPLITS,
    SIGNIFICANCE,
    StoppingRule,
    elbo_gain,
    is_stationary,
    split_rhat,
)

# Both compute the same float64 formula; differences are rounding.
EXACT = 1e-10


def arviz_split_rhat(trace: np.ndarray) -> float:
    """arviz's split R-hat of the trace as two chains: it halves each chain, so the trace becomes four pieces."""
    return float(az.rhat(np.asarray(trace).reshape(2, -1), method="split"))


def random_trace(rng: np.random.Generator, length: int) -> np.ndarray:
    """White noise of random scale and offset, plus (in most draws) a linear trend, a step or a slow oscillation."""
    steps = np.arange(length)
    trace = rng.uniform(-50, 50) + rng.uniform(0.01, 10) * rng.standard_normal(length)
    kind = rng.integers(4)
    if kind == 1:
        trace += rng.uniform(-1, 1) * steps
    elif kind == 2:
        trace += rng.uniform(-20, 20) * (steps >= rng.integers(1, length))
    elif kind == 3:
        trace += rng.uniform(0, 10) * np.sin(2 * np.pi * steps / rng.uniform(10, 3 * length))
    return trace


# --- split_rhat ---------------------------------------------------------------------------------------------------


def test_split_rhat_equals_arviz_split_rhat_on_many_random_traces():
    rng = np.random.default_rng(1)
    values = []
    for _ in range(200):
        # arviz drops the middle draw of an odd chain where ppvi drops the first ones, so lengths are multiples of 4.
        trace = random_trace(rng, 4 * int(rng.integers(2, 80)))
        expected = arviz_split_rhat(trace)
        assert split_rhat(trace, num_splits=4) == pytest.approx(expected, rel=EXACT)
        values.append(expected)
    # The inputs cover both stationary-looking (R-hat near 1) and clearly trending (R-hat far above 1.1) traces.
    assert min(values) < 1.05 and max(values) > 2.0


def test_split_rhat_equals_arviz_on_strong_trends():
    steps = np.arange(100, dtype=np.float64)
    rng = np.random.default_rng(2)
    for slope in (0.01, 0.1, 1.0, 10.0):
        trace = slope * steps + rng.standard_normal(100)
        assert split_rhat(trace) == pytest.approx(arviz_split_rhat(trace), rel=EXACT)


def test_split_rhat_drops_leftover_values_from_the_front():
    trace = np.random.default_rng(3).standard_normal(103)
    assert split_rhat(trace) == split_rhat(trace[3:])
    assert split_rhat(trace) == pytest.approx(arviz_split_rhat(trace[3:]), rel=EXACT)


def test_split_rhat_degenerate_traces():
    assert split_rhat(np.full(40, 2.5)) == 1.0
    # Constant within each of the four pieces but not across them: infinite between/within ratio.
    assert split_rhat(np.repeat([0.0, 1.0, 2.0, 3.0], 10)) == np.inf
    with pytest.raises(ValueError, match="need at least 8 values"):
        split_rhat(np.zeros(7))


# --- elbo_gain ----------------------------------------------------------------------------------------------------


def test_elbo_gain_equals_direct_numpy_computation():
    rng = np.random.default_rng(4)
    for window in (16, 50, 100):
        losses = rng.normal(10.0, 3.0, size=2 * window + 37)
        previous, last = losses[-2 * window : -window], losses[-window:]
        gain, standard_error = elbo_gain(losses, window)
        # The loss is the negative ELBO, so an ELBO gain is a drop of the loss.
        assert gain == pytest.approx(np.mean(previous) - np.mean(last), rel=EXACT)
        expected_se = np.sqrt(np.var(previous, ddof=1) / window + np.var(last, ddof=1) / window)
        assert standard_error == pytest.approx(expected_se, rel=EXACT)


def test_elbo_gain_standard_error_is_calibrated_on_white_noise():
    # Under pure white noise the gain has mean 0 and standard deviation sqrt(2 sigma^2 / window); the standard error
    # estimates that, so gain / SE is close to standard normal (a t with 198 degrees of freedom).
    rng = np.random.default_rng(5)
    window, repetitions = 100, 4000
    traces = rng.normal(-7.0, 3.0, size=(repetitions, 2 * window))
    gains, standard_errors = np.array([elbo_gain(trace, window) for trace in traces]).T
    z = gains / standard_errors
    # The sd of a sample sd of 4000 standard normals is 1 / sqrt(8000) = 0.011: these bounds are > 4 of them.
    assert np.std(z) == pytest.approx(1.0, abs=0.05)
    assert abs(np.mean(z)) < 0.07
    # And the spread of the gain matches its analytic sd.
    assert np.std(gains) == pytest.approx(np.sqrt(2 * 3.0**2 / window), rel=0.05)


def test_elbo_gain_sign_follows_a_decreasing_loss():
    losses = -0.01 * np.arange(200.0)  # the loss falls by 1 per window of 100: the ELBO gains 1
    gain, standard_error = elbo_gain(losses, 100)
    assert gain == pytest.approx(1.0, rel=1e-12)
    assert standard_error > 0


def test_elbo_gain_needs_two_windows():
    with pytest.raises(ValueError, match="need at least 200 losses"):
        elbo_gain(np.zeros(199), 100)


# --- is_stationary ------------------------------------------------------------------------------------------------


def test_white_noise_is_stationary():
    rule = StoppingRule()
    losses = np.random.default_rng(6).normal(100.0, 3.0, size=2 * rule.window)
    assert is_stationary(losses, rule)


def test_white_noise_is_stationary_in_most_draws():
    # False alarms come from R-hat >= 1.1 (rare with 25 draws a piece) or a gain above 2 SE (one-sided 2.3 %).
    rule = StoppingRule()
    rng = np.random.default_rng(7)
    rate = np.mean([is_stationary(rng.normal(0.0, 1.0, 2 * rule.window), rule) for _ in range(500)])
    assert rate > 0.9


def test_shorter_than_two_windows_is_not_stationary():
    rule = StoppingRule(window=20)
    assert not is_stationary(np.zeros(39), rule)
    assert is_stationary(np.zeros(40), rule)  # a constant trace: R-hat 1, gain 0


def test_clear_linear_trend_is_not_stationary():
    rule = StoppingRule()
    rng = np.random.default_rng(8)
    losses = 100.0 - 0.5 * np.arange(2 * rule.window) + rng.standard_normal(2 * rule.window)
    assert split_rhat(losses[-rule.window :]) > rule.rhat_threshold  # caught by R-hat already
    assert not is_stationary(losses, rule)


def slow_climb(rng: np.random.Generator, window: int = 100, gain: float = 1.5, noise: float = 3.0) -> np.ndarray:
    """A loss falling by ``gain`` per window under per-step noise of sd ``noise`` (eight schools under ADVI)."""
    return -gain / window * np.arange(2 * window) + noise * rng.standard_normal(2 * window)


def test_slow_climb_buried_in_noise_is_caught_by_the_gain_test_not_by_rhat():
    rule = StoppingRule(window=100)
    losses = slow_climb(np.random.default_rng(9))
    # R-hat alone would call this stationary ...
    assert split_rhat(losses[-rule.window :]) < rule.rhat_threshold
    # ... but the ELBO gain is significant (well above 2 SE and the tolerance) ...
    gain, standard_error = elbo_gain(losses, rule.window)
    assert gain > SIGNIFICANCE * standard_error and gain > rule.tolerance
    # ... so the trace is not stationary.
    assert not is_stationary(losses, rule)


def test_slow_climb_is_usually_rejected_although_rhat_usually_accepts():
    # Expected gain / SE = 1.5 / sqrt(2 * 9 / 100) = 3.5, so the gain test rejects with probability
    # P(Z > 2 - 3.5) = 93 %; R-hat of the last window stays near 1 (the trend moves a piece mean by 0.375, against
    # a piece-mean sd of 0.6).
    rule = StoppingRule(window=100)
    rng = np.random.default_rng(10)
    traces = [slow_climb(rng) for _ in range(300)]
    rhat_accepts = np.mean([split_rhat(t[-rule.window :]) < rule.rhat_threshold for t in traces])
    rejected = np.mean([not is_stationary(t, rule) for t in traces])
    assert rhat_accepts > 0.85
    assert rejected > 0.85


def test_significant_gain_below_the_tolerance_is_stationary():
    # An alternating +-0.1 pattern has mean 0 over every even window, so the gain is exactly the trend's 0.04 per
    # window: significant (SE about 0.014, 2 SE about 0.028) but under the default tolerance of 0.05 nats.
    window = 100
    losses = 0.1 * (-1.0) ** np.arange(2 * window) - 0.04 / window * np.arange(2 * window)
    gain, standard_error = elbo_gain(losses, window)
    assert gain == pytest.approx(0.04, rel=1e-9)
    assert SIGNIFICANCE * standard_error < gain < DEFAULT_TOLERANCE
    assert split_rhat(losses[-window:]) < DEFAULT_RHAT_THRESHOLD
    assert is_stationary(losses, StoppingRule(window=window))
    # With a tolerance below the gain the same trace is still improving.
    assert not is_stationary(losses, StoppingRule(window=window, tolerance=0.01))
    assert not is_stationary(losses, StoppingRule(window=window, tolerance=0.0))


def test_noiseless_creep_within_the_tolerance_is_stationary():
    # An exact guide family under the path-derivative gradient: the noise is gone and the loss still creeps down
    # by a micro-nat per step. R-hat is far above any threshold (the drift is all there is), yet the whole window
    # lies within 0.05 nats: nothing is left to gain or to average away.
    window = 100
    losses = 3.0 - 1e-6 * np.arange(2 * window)
    assert split_rhat(losses[-window:]) > 4  # sqrt(1 + 25^2 * var(piece means) / var(within)): about 4.6
    assert is_stationary(losses, StoppingRule(window=window))
    # The same creep at 1e-3 nats a step spans 0.1 nats in a window: still moving.
    assert not is_stationary(3.0 - 1e-3 * np.arange(2 * window), StoppingRule(window=window))
    # And a zero tolerance keeps R-hat's verdict.
    assert not is_stationary(losses, StoppingRule(window=window, tolerance=0.0))


def test_rhat_threshold_is_used():
    # An oscillation with R-hat between 1.1 and 2: stationary for a lax threshold only.
    window = 100
    steps = np.arange(2 * window)
    losses = np.sin(2 * np.pi * steps / window) + 0.5 * np.random.default_rng(11).standard_normal(2 * window)
    rhat = split_rhat(losses[-window:])
    assert 1.1 < rhat < 2.0
    assert not is_stationary(losses, StoppingRule(window=window))
    assert is_stationary(losses, StoppingRule(window=window, rhat_threshold=2.0))


# --- StoppingRule -------------------------------------------------------------------------------------------------


def test_stopping_rule_defaults():
    rule = StoppingRule()
    assert (rule.window, rule.rhat_threshold, rule.tolerance) == (DEFAULT_WINDOW, DEFAULT_RHAT_THRESHOLD, 0.05)
    assert rule.max_steps >= 2 * rule.window


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"window": 4 * NUM_SPLITS - 1}, "window must be at least 16 steps, got 15"),
        ({"rhat_threshold": 1.0}, "rhat_threshold must exceed 1, got 1.0"),
        ({"rhat_threshold": 0.5}, "rhat_threshold must exceed 1"),
        ({"tolerance": -0.1}, "tolerance must be non-negative, got -0.1"),
        ({"tolerance": float("nan")}, "tolerance must be non-negative, got nan"),
        ({"max_steps": 0}, "max_steps must be positive, got 0"),
    ],
)
def test_stopping_rule_rejects_invalid_options(options, message):
    with pytest.raises(ValueError, match=message):
        StoppingRule(**options)


def test_stopping_rule_accepts_the_smallest_window_and_is_frozen():
    rule = StoppingRule(window=4 * NUM_SPLITS, tolerance=0.0, max_steps=1)
    assert rule.window == 16
    with pytest.raises(AttributeError):
        rule.window = 100
