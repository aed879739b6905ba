"""Tests of ppvi.training: the loop against a hand-written torch.optim.Adam loop and torch's own learning-rate
schedulers, convergence on a noisy quadratic against the Polyak-Juditsky rate, the two stages, and the handling of
non-finite losses."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch

import ppvi.training as training
from ppvi.convergence import StoppingRule, is_stationary
from ppvi.training import FINAL_LEARNING_RATE_FRACTION, STAGES, Stepper, init, run, run_batch, schedule_factor, update

pytestmark = pytest.mark.usefixtures("float64_default")


class NoisyQuadratic:
    """``0.5 * ||x - (target + eps)||^2`` with fresh ``eps ~ N(0, sigma^2 I)`` at each call: the gradient is the
    exact one, ``x - target``, plus noise of sd ``sigma`` per coordinate. Records the iterate seen at every call."""

    def __init__(self, x: torch.Tensor, target: torch.Tensor, sigma: float, seed: int):
        self.x, self.target, self.sigma = x, target, sigma
        self.generator = torch.Generator().manual_seed(seed)
        self.seen: list[torch.Tensor] = []

    def __call__(self) -> torch.Tensor:
        self.seen.append(self.x.detach().clone())
        eps = self.sigma * torch.randn(self.x.shape, generator=self.generator)
        return 0.5 * ((self.x - self.target - eps) ** 2).sum()


# --- run: convergence and averaging -------------------------------------------------------------------------------


def test_run_converges_to_the_target_of_a_noisy_quadratic():
    dimension, sigma = 20, 1.0
    target = torch.linspace(-3.0, 3.0, dimension)
    x = torch.zeros(dimension, requires_grad=True)
    loss = NoisyQuadratic(x, target, sigma, seed=0)
    rule = StoppingRule(max_steps=5000)
    result = run(loss, [x], learning_rate=0.1, rule=rule, progress=False)

    assert result.converged and result.nonfinite_step is None
    assert result.steps < rule.max_steps
    assert len(loss.seen) == result.steps and result.losses.shape == (result.steps,)
    assert np.isfinite(result.losses).all()
    stationary_at = int(re.search(r"stationary at step (\d+)", result.message).group(1))
    assert result.steps == stationary_at + rule.window  # averaged over one more window, then stopped
    # Polyak & Juditsky (1992): averaging W iterates at stationarity leaves an error of sd sigma / sqrt(W) per
    # coordinate (the mean gradient noise over the window divided by the curvature, 1 here). Allow 1.5 times that
    # in root mean square over the 20 coordinates for the start/end terms of the average, and 4 times at most.
    error = (x.detach() - target).numpy()
    polyak_sd = sigma / math.sqrt(rule.window)
    assert np.sqrt(np.mean(error**2)) < 1.5 * polyak_sd
    assert np.abs(error).max() < 4 * polyak_sd
    # It really travelled: the start was up to 3 away.
    assert float((loss.seen[0] - target).abs().max()) == pytest.approx(3.0)


def test_polyak_average_beats_the_last_iterate():
    # 400 independent coordinates (Adam is elementwise, the noise independent) give 400 replicates in one run. The
    # start is the optimum, so all error is stationary noise. A fixed number of steps averages over the last window.
    dimension, sigma, steps, window, learning_rate = 400, 1.0, 400, 200, 0.1
    target = torch.linspace(-1.0, 1.0, dimension)
    x = target.clone().requires_grad_(True)
    loss = NoisyQuadratic(x, target, sigma, seed=1)
    result = run(loss, [x], learning_rate=learning_rate, steps=steps, rule=StoppingRule(window=window), progress=False)
    assert result.steps == steps and not result.converged

    iterates = torch.stack(loss.seen).numpy() - target.numpy()
    averaged_mse = np.mean((x.detach().numpy() - target.numpy()) ** 2)
    last_iterate_mse = np.mean(iterates[-1] ** 2)
    spread = np.mean(iterates[-window:].var(axis=0, ddof=1))  # the same run's unaveraged spread
    # Unaveraged, Adam's iterates fluctuate with a variance of about learning_rate * sigma / 2 = 0.05 here.
    assert last_iterate_mse == pytest.approx(spread, rel=0.4)
    # The average is several times closer (relative sampling error of these MSEs: sqrt(2 / 400) = 7 %) ...
    assert averaged_mse < last_iterate_mse / 4
    assert averaged_mse < spread / 4
    # ... and at the Polyak-Juditsky rate sigma^2 / W.
    assert averaged_mse == pytest.approx(sigma**2 / window, rel=0.5)


@pytest.mark.parametrize(
    ("schedule", "steps", "window"),
    [("constant", 120, 40), ("constant", 50, 40), ("exponential", 120, 40), ("cosine", 90, 30)],
)
def test_fixed_steps_match_a_plain_torch_adam_loop(schedule, steps, window):
    # Reference: torch.optim.Adam with torch's own ExponentialLR / CosineAnnealingLR, the parameters ending as the
    # mean of the last min(window, steps // 2) iterates. The same noise sequence drives both.
    learning_rate, dimension = 0.05, 4
    generator = torch.Generator().manual_seed(2)
    noise = torch.randn(steps, dimension, generator=generator)
    target = torch.tensor([1.0, -2.0, 0.5, 3.0])

    def make_loss(x):
        calls = [0]

        def loss():
            eps = noise[calls[0]]
            calls[0] += 1
            return 0.5 * ((x - target - eps) ** 2).sum()

        return loss, calls

    x = torch.zeros(dimension, requires_grad=True)
    loss, calls = make_loss(x)
    result = run(loss, [x], learning_rate=learning_rate, steps=steps, rule=StoppingRule(window=window),
                 schedule=schedule, check_interval=7, progress=False)
    assert calls[0] == steps and result.steps == steps and not result.converged
    assert result.message == f"ran the requested {steps} steps"

    reference = torch.zeros(dimension, requires_grad=True)
    reference_loss, _ = make_loss(reference)
    optimizer = torch.optim.Adam([reference], lr=learning_rate)
    fraction = FINAL_LEARNING_RATE_FRACTION
    scheduler = {
        "constant": None,
        "exponential": torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=fraction ** (1 / steps)),
        "cosine": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=fraction * learning_rate),
    }[schedule]
    iterates, expected_losses = [], []
    for _ in range(steps):
        optimizer.zero_grad()
        value = reference_loss()
        value.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        iterates.append(reference.detach().clone())
        expected_losses.append(float(value.detach()))
    averaged = min(window, steps // 2)
    expected = torch.stack(iterates[-averaged:]).mean(dim=0)
    torch.testing.assert_close(x.detach(), expected, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(result.losses, expected_losses, rtol=1e-9)


def test_fixed_steps_ignore_the_stopping_rule():
    # White noise with zero gradient is stationary from the start; a fixed run still takes every step.
    x = torch.zeros(2, requires_grad=True)
    generator = torch.Generator().manual_seed(3)
    result = run(lambda: (0.0 * x).sum() + torch.randn((), generator=generator), [x], learning_rate=0.1, steps=777,
                 rule=StoppingRule(window=16), check_interval=10, progress=False)
    assert result.steps == 777 and result.losses.shape == (777,)
    assert not result.converged and result.nonfinite_step is None


# --- run: stages ----------------------------------------------------------------------------------------------------


def test_learning_rate_drops_by_the_second_stage_at_the_first_stationary_point(monkeypatch):
    assert STAGES[0] == 1.0 and len(STAGES) == 2
    states = []

    def recording_init(*args, **kwargs):
        states.append(init(*args, **kwargs))
        return states[-1]

    monkeypatch.setattr(training, "init", recording_init)
    x = torch.zeros(3, requires_grad=True)
    quadratic = NoisyQuadratic(x, torch.tensor([2.0, -1.0, 0.5]), 1.0, seed=4)
    learning_rates = []

    def loss():
        learning_rates.append(states[0].optimizer.param_groups[0]["lr"])
        return quadratic()

    learning_rate, interval = 0.1, 10
    rule = StoppingRule(window=50, max_steps=5000)
    result = run(loss, [x], learning_rate=learning_rate, rule=rule, check_interval=interval, progress=False)
    assert result.converged
    learning_rates = np.array(learning_rates)
    first = int(np.argmax(learning_rates != learning_rate))  # first step taken at the second stage's rate
    assert first > 0
    np.testing.assert_allclose(learning_rates[:first], learning_rate, rtol=1e-15)
    np.testing.assert_allclose(learning_rates[first:], learning_rate * STAGES[1], rtol=1e-15)

    # The switch happened at the first check (every 10 steps, from one window on) whose last two windows of losses
    # were stationary, and the run stopped one window after the first stationary check of the second stage.
    def stationary(step):
        return is_stationary(result.losses[max(0, step - 2 * rule.window) : step], rule)

    assert first % interval == 0 and first >= rule.window
    assert stationary(first)
    assert not any(stationary(step) for step in range(rule.window, first, interval))
    second = result.steps - rule.window
    assert second - first >= rule.window and (second - first) % interval == 0
    assert stationary(second)
    assert not any(stationary(step) for step in range(first + rule.window, second, interval))


def test_averaging_cut_short_by_max_steps_is_reported_truthfully():
    # Zero gradient and white-noise losses: the run is stationary at the first checks of both stages. With max_steps
    # five steps past the second stationary point, only five iterates can be averaged.
    def noise_run(max_steps):
        x = torch.zeros(2, requires_grad=True)
        generator = torch.Generator().manual_seed(0)
        return run(lambda: (0.0 * x).sum() + torch.randn((), generator=generator), [x], learning_rate=0.1,
                   rule=StoppingRule(window=20, max_steps=max_steps), check_interval=10, progress=False)

    free = noise_run(1000)
    assert free.converged
    stationary_at = free.steps - 20
    capped = noise_run(stationary_at + 5)
    assert capped.steps == stationary_at + 5
    claimed = re.search(r"averaged the iterates over (\d+) more", capped.message)
    assert claimed is None or int(claimed.group(1)) == 5, capped.message


# --- run: non-finite losses ---------------------------------------------------------------------------------------


def nan_at(x: torch.Tensor, bad_step: int):
    """A deterministic quadratic whose loss is NaN from call ``bad_step`` (0-based) on; records the iterates."""
    seen = []

    def loss():
        seen.append(x.detach().clone())
        value = 0.5 * ((x - 3.0) ** 2).sum()
        return value * math.nan if len(seen) - 1 >= bad_step else value

    return loss, seen


@pytest.mark.parametrize("steps", [None, 60])
def test_nan_loss_stops_and_restores_the_last_checkpoint(steps):
    # With steps=60 and window 16 the iterate average has started (at step 44) when the NaN appears at step 53.
    x = torch.zeros(3, requires_grad=True)
    loss, seen = nan_at(x, bad_step=53)
    result = run(loss, [x], learning_rate=0.1, steps=steps, rule=StoppingRule(window=16, max_steps=1000),
                 check_interval=10, progress=False)
    assert result.nonfinite_step == 53
    assert not result.converged
    assert "not finite at step 53" in result.message
    # The last check with all-finite losses was at step 50: its parameters come back, not the NaN ones nor the
    # partial average.
    assert result.steps == 50 and result.losses.shape == (50,) and np.isfinite(result.losses).all()
    assert torch.isfinite(x).all()
    torch.testing.assert_close(x.detach(), seen[50], rtol=0, atol=0)
    assert not torch.equal(seen[50], seen[0])


def test_nan_at_the_first_step_restores_the_initial_parameters():
    x = torch.tensor([0.5, -0.5], requires_grad=True)
    loss, _ = nan_at(x, bad_step=0)
    result = run(loss, [x], learning_rate=0.1, rule=StoppingRule(window=16), check_interval=10, progress=False)
    assert result.nonfinite_step == 0 and result.steps == 0 and result.losses.shape == (0,)
    torch.testing.assert_close(x.detach(), torch.tensor([0.5, -0.5]), rtol=0, atol=0)


def test_a_diverging_loss_stops_and_restores_the_best_interval():
    # The loss tracks |x|^2 + noise until step 200, then the run "leaves its optimum": the loss jumps by 1e6, the
    # fall of an ELBO by orders of magnitude that a flow's runaway scale gives.
    x = torch.tensor([2.0, -2.0], requires_grad=True)
    seen: dict[int, torch.Tensor] = {}
    step = [0]

    def loss() -> torch.Tensor:
        seen[step[0]] = x.detach().clone()
        value = (x**2).sum() + 0.01 * torch.randn(())
        if step[0] >= 200:
            value = value + 1e6
        step[0] += 1
        return value

    result = run(loss, [x], learning_rate=0.05, rule=StoppingRule(window=100, max_steps=2000), check_interval=50,
                 progress=False)
    assert result.diverged_step == 250 and not result.converged
    assert "diverged at step 250" in result.message
    # The parameters of a check before the jump come back (the one with the lowest median loss), not the last.
    restored = [k for k in (50, 100, 150, 200) if torch.equal(x.detach(), seen[k])]
    assert restored and float((x.detach() ** 2).sum()) < 0.1


def quadratic_then(x: torch.Tensor, from_step: int, broken: Callable[[torch.Tensor], torch.Tensor]):
    """``|x|^2 + noise`` until ``from_step``, then ``broken(that)``; records the iterate seen at every call."""
    seen: dict[int, torch.Tensor] = {}
    step = [0]

    def loss() -> torch.Tensor:
        seen[step[0]] = x.detach().clone()
        value = (x**2).sum() + 0.01 * torch.randn(())
        if step[0] >= from_step:
            value = broken(value)
        step[0] += 1
        return value

    return loss, seen


def test_an_impossibly_high_elbo_is_a_breakdown_not_progress():
    # From step 130 on, some estimates are -1e12 (an ELBO of +1e12): a log q that lost its precision, as an
    # ill-conditioned full-rank factor gives. The median stays sane, so the divergence check alone would never see
    # it and the stopping rule would read the broken trace as progress.
    x = torch.tensor([2.0, -2.0], requires_grad=True)
    loss, seen = quadratic_then(x, 130, lambda value: value - 1e12 * (torch.rand(()) < 0.2))
    result = run(loss, [x], learning_rate=0.05, rule=StoppingRule(window=100, max_steps=2000), check_interval=50,
                 progress=False)
    assert not result.converged and result.diverged_step == 150
    assert 130 <= result.breakdown_step < 150
    assert f"diverged upward at step {result.breakdown_step}" in result.message
    assert "broke down numerically" in result.message and "smaller learning_rate (now 0.05)" in result.message
    # The trace stops before the broken interval, and the best check before it comes back.
    assert result.steps == 100 and result.losses.shape == (100,) and result.losses.min() > -1.0
    assert any(torch.equal(x.detach(), seen[k]) for k in (50, 100))


def test_a_breakdown_in_the_first_interval_restores_the_start():
    x = torch.tensor([2.0, -2.0], requires_grad=True)
    loss, _ = quadratic_then(x, 30, lambda value: value - 1e12)
    result = run(loss, [x], learning_rate=0.05, steps=200, check_interval=50, progress=False)
    assert result.breakdown_step == 30 and result.steps == 0 and not result.converged
    torch.testing.assert_close(x.detach(), torch.tensor([2.0, -2.0]), rtol=0, atol=0)


def test_an_interval_with_an_implausible_estimate_is_never_the_one_restored():
    # Step 45's estimate is 1e5 nats above the rest (an ELBO above log p(x), but below the thousandfold breakdown
    # bound of a start near 0): the parameters at the end of that interval are not sound. The breakdown at step 60
    # then restores the start, not step 50, and the trace ends at the start.
    x = torch.tensor([2.0, -2.0], requires_grad=True)
    step = [0]

    def loss() -> torch.Tensor:
        value = (x**2).sum() + 0.01 * torch.randn(())
        if step[0] == 45:
            value = value - 1e5
        if step[0] >= 60:
            value = value - 1e12
        step[0] += 1
        return value

    result = run(loss, [x], learning_rate=0.05, steps=200, check_interval=50, progress=False)
    assert result.breakdown_step == 60 and result.steps == 0
    assert "restored to the start (step 0)" in result.message
    torch.testing.assert_close(x.detach(), torch.tensor([2.0, -2.0]), rtol=0, atol=0)


def test_implausible_rise_flags_a_lone_outlier_but_not_a_trend_or_noise():
    generator = np.random.default_rng(0)
    noise = generator.normal(size=(50, 1))
    trend = np.linspace(1e4, 500.0, 50)[:, None] + noise  # a steep but steady fall of the loss: real progress
    outlier = noise.copy()
    outlier[40] -= 1e3
    heavy = generator.chisquare(8, size=(50, 1))  # the upper tail of an averaged log w, mirrored as a loss below
    flags = training.implausible_rise(np.concatenate([noise, trend, outlier, -heavy], axis=1))
    assert flags.tolist() == [False, False, True, False]


def test_a_sudden_large_gain_from_a_start_near_zero_is_not_a_breakdown():
    # A plateau near 0 that the run leaves for a cliff 2e5 nats lower around step 100: an ELBO that jumps from 0 to
    # log p(x) = 2e5 within an interval, a fifth of the million nats that BREAKDOWN_MINIMUM_NATS leaves to a start of
    # small magnitude.
    x = torch.zeros(1, requires_grad=True)

    def loss() -> torch.Tensor:
        return -2e5 * torch.sigmoid(10.0 * (x.sum() - 1.0)) + torch.randn(())

    result = run(loss, [x], learning_rate=0.01, rule=StoppingRule(window=100, max_steps=5000), check_interval=50,
                 progress=False)
    assert abs(np.median(result.losses[:50])) < training.BREAKDOWN_MINIMUM_NATS  # the allowance is the floor
    assert result.breakdown_step is None and result.diverged_step is None and result.converged
    assert result.losses[-100:].mean() == pytest.approx(-2e5, abs=10.0)


def test_gradient_clipping_bounds_the_step():
    # Plain SGD-like check through Adam's first step: with clipping the gradient's norm is at most the bound, so
    # Adam's first step (of size learning_rate per coordinate whatever the gradient's scale) is unchanged, and the
    # gradient seen by the optimiser is the clipped one.
    x = torch.tensor([3.0, 4.0], requires_grad=True)
    state = init([x], learning_rate=0.1)
    state, _ = update(state, lambda: 1000.0 * (x**2).sum() / 2, 0.1, max_gradient_norm=1.0)
    assert torch.linalg.vector_norm(x.grad) == pytest.approx(1.0)


# --- schedules ----------------------------------------------------------------------------------------------------


def learning_rates(schedule, steps, horizon, learning_rate=0.4):
    factor = schedule_factor(schedule, horizon)
    return np.array([learning_rate * factor(step) for step in range(steps + 1)])


@pytest.mark.parametrize("schedule", ["exponential", "cosine"])
def test_decaying_schedules_match_torch_and_reach_the_final_fraction_at_the_horizon(schedule):
    horizon, learning_rate = 50, 0.4
    rates = learning_rates(schedule, horizon + 20, horizon, learning_rate)
    assert rates[0] == learning_rate
    assert rates[horizon] == pytest.approx(FINAL_LEARNING_RATE_FRACTION * learning_rate, rel=1e-12)
    # It stays there beyond the horizon.
    np.testing.assert_allclose(rates[horizon:], FINAL_LEARNING_RATE_FRACTION * learning_rate, rtol=1e-12)
    assert np.all(np.diff(rates[: horizon + 1]) < 0)
    # Reference: torch's schedulers with the same end points.
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=learning_rate)
    if schedule == "exponential":
        gamma = FINAL_LEARNING_RATE_FRACTION ** (1 / horizon)
        reference = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
    else:
        reference = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=horizon, eta_min=FINAL_LEARNING_RATE_FRACTION * learning_rate
        )
    expected = [optimizer.param_groups[0]["lr"]]
    for _ in range(horizon):
        optimizer.step()
        reference.step()
        expected.append(optimizer.param_groups[0]["lr"])
    np.testing.assert_allclose(rates[: horizon + 1], expected, rtol=1e-12)


def test_constant_and_callable_schedules():
    np.testing.assert_array_equal(learning_rates("constant", 30, 10), 0.4)
    np.testing.assert_allclose(learning_rates(lambda step: 1.0 / (1 + step), 30, 10), 0.4 / (1 + np.arange(31)))


def test_the_loop_averages_the_iterates_arithmetically():
    # A fixed run of 30 steps with window 24 averages the last min(24, 30 // 2) = 15 iterates: their plain mean.
    x = torch.tensor([1.0, -1.0], requires_grad=True)
    generator = torch.Generator().manual_seed(5)
    snapshots = []

    def loss():
        return ((x - torch.randn(2, generator=generator)) ** 2).sum()

    original = training.update

    def recording(state, *args, **kwargs):
        new_state, value = original(state, *args, **kwargs)
        snapshots.append(x.detach().clone())
        assert not value.requires_grad
        return new_state, value

    training.update, saved = recording, training.update
    try:
        result = run(loss, [x], learning_rate=0.1, steps=30, rule=StoppingRule(window=24), progress=False)
    finally:
        training.update = saved
    assert result.steps == 30 and len(snapshots) == 30
    torch.testing.assert_close(x.detach(), torch.stack(snapshots[15:]).mean(dim=0), rtol=1e-12, atol=1e-12)


# --- run_batch: replications trained together are trained as if alone -----------------------------------------------


class QuadraticBatch:
    """Replication ``m`` minimises ``0.5 ||x_m - (target_m + eps)||^2`` by plain gradient steps, ``eps`` drawn from
    its own generator; a replication listed in ``nan_from`` returns NaN from that step on. The state is
    ``(x (A, D), global indices (A,), step)``."""

    def __init__(self, targets: torch.Tensor, sigma: float, nan_from: dict[int, int] | None = None):
        self.targets, self.sigma, self.nan_from = targets, sigma, nan_from or {}
        self.generators = [torch.Generator().manual_seed(100 + m) for m in range(len(targets))]

    def start(self, rows: list[int]):
        return torch.zeros(len(rows), self.targets.shape[1]), torch.tensor(rows), 0

    def update(self, state, rates):
        x, index, step = state
        noise = torch.stack([self.sigma * torch.randn(x.shape[1], generator=self.generators[m]) for m in index])
        residual = x - self.targets[index] - noise
        losses = 0.5 * (residual**2).sum(1)
        for i, m in enumerate(index.tolist()):
            if m in self.nan_from and step >= self.nan_from[m]:
                losses[i] = math.nan
        x = x - torch.as_tensor(rates, dtype=x.dtype)[:, None] * residual
        return (x, index, step + 1), losses

    def stepper(self) -> Stepper:
        return Stepper(self.update, lambda state: (state[0],), lambda state, rows: (state[0][rows], state[1][rows],
                                                                                    state[2]))


@pytest.mark.parametrize("steps", [None, 300])
def test_a_batch_trains_each_replication_as_if_alone(steps):
    # Five replications with targets at different distances stop at different steps (the batch shrinks); one has a
    # NaN loss from step 50 on. Each must end exactly where a run of it alone ends: steps, verdict, restored or
    # averaged iterate, losses.
    targets = torch.tensor([[0.5, 0.0], [4.0, -3.0], [20.0, 10.0], [1.0, 1.0], [-8.0, 2.0]])
    rule = StoppingRule(window=40, max_steps=3000)
    options = dict(learning_rate=0.05, steps=steps, rule=rule, check_interval=20, progress=False)
    problem = QuadraticBatch(targets, 1.0, nan_from={3: 50})
    together = run_batch(problem.stepper(), problem.start(list(range(5))), 5, **options)
    if steps is None:
        assert len(np.unique(together.steps)) >= 3  # the batch did shrink
        assert together.converged.sum() == 4
    assert together.nonfinite_step[3] == 50 and not together.converged[3] and together.steps[3] == 40
    for m in range(5):
        alone_problem = QuadraticBatch(targets, 1.0, nan_from={3: 50})
        alone_problem.generators[m] = torch.Generator().manual_seed(100 + m)
        alone = run_batch(alone_problem.stepper(), alone_problem.start([m]), 1, **options)
        assert together.steps[m] == alone.steps[0] and together.converged[m] == alone.converged[0]
        assert together.averaged_steps[m] == alone.averaged_steps[0]
        torch.testing.assert_close(together.iterates[0][m], alone.iterates[0][0], rtol=0, atol=0)
        np.testing.assert_array_equal(together.losses[: together.steps[m], m], alone.losses[: alone.steps[0], 0])
    # The converged ones reach their targets to about the Polyak-Juditsky error.
    for m in (0, 1, 2, 4):
        assert float((together.iterates[0][m] - targets[m]).abs().max()) < 0.6


# --- invalid options ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("learning_rate", [0.0, -0.1, math.nan])
def test_init_rejects_a_non_positive_learning_rate(learning_rate):
    with pytest.raises(ValueError, match="learning_rate must be positive"):
        init([torch.zeros(1, requires_grad=True)], learning_rate)


def test_init_rejects_no_parameters_and_run_unknown_schedules():
    with pytest.raises(ValueError, match="nothing to optimise"):
        init([], 0.1)
    x = torch.zeros(1, requires_grad=True)
    with pytest.raises(ValueError, match="unknown schedule 'linear'.*'constant', 'exponential', 'cosine'"):
        run(lambda: (x**2).sum(), [x], learning_rate=0.1, schedule="linear")


@pytest.mark.parametrize("steps", [0, -5, 2.5, "100"])
def test_run_rejects_invalid_steps(steps):
    x = torch.zeros(1, requires_grad=True)
    with pytest.raises(ValueError, match="steps must be a positive integer or None"):
        run(lambda: (x**2).sum(), [x], learning_rate=0.1, steps=steps, progress=False)


def test_run_rejects_invalid_schedule_and_learning_rate():
    x = torch.zeros(1, requires_grad=True)
    with pytest.raises(ValueError, match="unknown schedule"):
        run(lambda: (x**2).sum(), [x], learning_rate=0.1, steps=10, schedule="step", progress=False)
    with pytest.raises(ValueError, match="learning_rate must be positive"):
        run(lambda: (x**2).sum(), [x], learning_rate=-1.0, steps=10, progress=False)


def test_a_loss_without_gradient_says_what_that_means():
    parameter = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="does not depend on the parameters being trained"):
        training.run(lambda: torch.tensor(1.0), [parameter], learning_rate=0.1, steps=5)


def test_ctrl_c_at_a_fixed_number_of_steps_keeps_the_steps_taken():
    parameter = torch.zeros(1, requires_grad=True)
    calls = {"count": 0}

    def loss():
        calls["count"] += 1
        if calls["count"] == 8:
            raise KeyboardInterrupt
        return ((parameter - 1.0) ** 2).sum()

    try:
        result = training.run(loss, [parameter], learning_rate=0.1, steps=100)
    except KeyboardInterrupt:  # pragma: no cover - the failure this test is for must not end the session
        pytest.fail("KeyboardInterrupt escaped training.run")
    assert result.interrupted_step == 7 and result.steps == 7 and result.losses.shape == (7,)
    assert not result.converged and "at step 7" in result.message


def test_a_warm_up_that_raises_the_loss_by_design_is_not_divergence():
    """A KL warm-up (Bowman et al. 2016) makes the loss grow with the step: before ``stationary_from`` the losses
    measure another objective, and comparing them with later ones would call the warm-up a divergence."""
    parameter = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    counter = {"step": 0}

    def warming_loss() -> torch.Tensor:
        counter["step"] += 1
        weight = min(1.0, counter["step"] / 300)
        return (parameter - 1.0).pow(2).sum() + 1000.0 * weight

    warned = training.run(warming_loss, [parameter], learning_rate=0.05, steps=600)
    assert warned.diverged_step is not None  # the check, left alone, mistakes the warm-up for a divergence
    counter["step"] = 0
    with torch.no_grad():
        parameter.zero_()
    run = training.run(warming_loss, [parameter], learning_rate=0.05, steps=600, stationary_from=300)
    assert run.diverged_step is None and run.steps == 600
    assert abs(float(parameter.detach()) - 1.0) < 0.05


# --- run: step functions (ppvi.engine.TracedStep) ------------------------------------------------------------------
def _gradient_step(x: torch.Tensor, target: torch.Tensor, as_float: bool) -> Callable[[float], torch.Tensor | float]:
    """A step function as a traced step is one: it updates ``x`` in place and returns the loss before the step."""

    def step(learning_rate: float) -> torch.Tensor | float:
        with torch.no_grad():
            loss = ((x - target) ** 2).sum()
            x.sub_(learning_rate * 2 * (x - target))
        return float(loss) if as_float else loss

    return step


@pytest.mark.parametrize("steps", [150, None])
def test_losses_returned_as_floats_train_as_losses_returned_as_tensors(steps):
    """One fit's C kernel returns its losses as Python floats: the loop reads, checks and averages them as tensors."""
    outcomes = []
    for as_float in (False, True):
        x = torch.zeros(3, requires_grad=True)
        step = _gradient_step(x, torch.tensor([1.0, -1.0, 0.5]), as_float)
        result = run(lambda: None, [x], learning_rate=0.05, steps=steps, rule=StoppingRule(window=40, max_steps=2000),
                     step_function=step, progress=False)
        outcomes.append((result, x.detach().clone()))
    (tensors, x_tensors), (floats, x_floats) = outcomes
    np.testing.assert_array_equal(floats.losses, tensors.losses)
    assert (floats.steps, floats.converged, floats.message) == (tensors.steps, tensors.converged, tensors.message)
    torch.testing.assert_close(x_floats, x_tensors, rtol=0, atol=0)


def test_a_step_functions_plan_learns_the_steps_and_its_note_ends_the_message():
    class Planned:
        def __init__(self):
            self.asked: list[int | None] = []

        def plan(self, steps: int | None) -> str:
            self.asked.append(steps)
            return "steps run as a test double"

        def __call__(self, learning_rate: float) -> float:
            return 1.0

    x = torch.zeros(1, requires_grad=True)
    planned = Planned()
    result = run(lambda: None, [x], learning_rate=0.1, steps=30, step_function=planned, progress=False)
    assert result.message == "ran the requested 30 steps; steps run as a test double"
    run(lambda: None, [x], learning_rate=0.1, rule=StoppingRule(window=24, max_steps=60), step_function=planned,
        progress=False)
    assert planned.asked == [30, None]  # a stopping rule: the number of steps is not known in advance
