"""Tests of ppvi.diagnostics.diagnosis: a verdict that tells a tail mismatch from a large one, and resampling.

The guides and targets are fixed distributions, so the truth is known: a normal guide for a Student-t target
(heavier tails, the same bulk), a normal guide three times too narrow, and a normal guide shifted by half an sd.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import pytest
import torch

from ppvi.diagnostics import psis
from ppvi.diagnostics.diagnosis import diagnose, resample

NUM_DRAWS = 4000


def weighted(target, guide, seed: int = 0):
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    draws = guide.sample((NUM_DRAWS,)).double()
    torch.random.set_rng_state(generator_state)
    return draws, target.log_prob(draws).double() - guide.log_prob(draws).double()


def test_a_tail_mismatch_reads_caution_and_says_the_summaries_can_be_used():
    # Student-t with 20 degrees of freedom against a normal of nearly its sd: the ratios grow like exp(x^2 / 2)
    # in the tails (infinite variance, k-hat far above 0.7), yet the bulk is the same.
    draws, log_weights = weighted(dist.StudentT(20.0, 0.0, 1.0), dist.Normal(0.0, 1.05))
    diagnosis, _ = diagnose(log_weights, {"x": draws})
    assert diagnosis.khat > 0.7
    assert diagnosis.verdict == "caution"
    assert diagnosis.effective_sample_size > 0.9 * NUM_DRAWS and diagnosis.mean_shift < 0.05
    assert "infinite variance" in diagnosis.explanation and "means and sds can be used" in diagnosis.explanation


def test_a_guide_three_times_too_narrow_reads_bad_and_names_what_to_try():
    draws, log_weights = weighted(dist.Normal(0.0, 1.0), dist.Normal(0.0, 0.3))
    diagnosis, _ = diagnose(log_weights, {"x": draws})
    assert diagnosis.verdict == "bad"
    assert diagnosis.effective_sample_size < 0.2 * NUM_DRAWS
    assert "richer guide" in diagnosis.explanation


def test_a_shifted_guide_with_good_khat_is_told_to_use_corrected_estimates():
    # Outside reference: the target's mean is 0 and the guide's 0.5; the PSIS-corrected mean recovers 0.
    draws, log_weights = weighted(dist.Normal(0.0, 1.0), dist.Normal(0.5, 1.0))
    diagnosis, smoothed = diagnose(log_weights, {"x": draws})
    assert diagnosis.verdict == "good"
    assert diagnosis.mean_shift == pytest.approx(0.5, abs=0.1)
    assert "corrected=True" in diagnosis.explanation
    assert abs(float((smoothed.exp() * draws).sum())) < 0.1


def test_khat_and_elbo_are_those_of_psis_and_the_mean_log_weight():
    draws, log_weights = weighted(dist.Normal(0.0, 1.0), dist.Normal(0.2, 0.8))
    diagnosis, smoothed = diagnose(log_weights, {"x": draws})
    expected_smoothed, expected_khat = psis(log_weights)
    assert diagnosis.khat == float(expected_khat)
    assert torch.equal(smoothed, expected_smoothed)
    assert diagnosis.elbo == pytest.approx(float(log_weights.mean()))
    # KL(N(0.2, 0.8) || N(0, 1)) in closed form: the ELBO of a normalised target is minus it.
    kl = math.log(1 / 0.8) + (0.8**2 + 0.2**2) / 2 - 0.5
    assert diagnosis.elbo == pytest.approx(-kl, abs=0.03)


def test_the_bootstrap_interval_brackets_khat_and_narrows_with_more_draws():
    target, guide = dist.Normal(0.0, 1.0), dist.Normal(0.0, 0.7)
    widths = []
    for size in (1000, 16000):
        torch.manual_seed(1)
        draws = guide.sample((size,)).double()
        diagnosis, _ = diagnose(target.log_prob(draws) - guide.log_prob(draws))
        low, high = diagnosis.khat_interval
        assert low <= diagnosis.khat <= high
        widths.append(high - low)
    assert widths[1] < widths[0]


def test_notes_reach_the_explanation():
    draws, log_weights = weighted(dist.Normal(0.0, 1.0), dist.Normal(0.0, 1.0))
    diagnosis, _ = diagnose(log_weights, {"x": draws}, notes=["The Laplace start failed (no mode)."])
    assert diagnosis.explanation.endswith("The Laplace start failed (no mode).")
    assert "Diagnosis: good" in str(diagnosis)


def test_resampling_follows_the_weights():
    log_weights = torch.log(torch.tensor([0.1, 0.0, 0.6, 0.3], dtype=torch.float64))
    indices = resample(log_weights, 20000, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(indices, minlength=4).double() / 20000
    assert frequencies[1] == 0
    assert torch.allclose(frequencies, log_weights.exp(), atol=0.015)


def test_guide_draws_are_usable_only_when_the_mismatch_is_small():
    cases = {
        "exact": (dist.Normal(0.0, 1.0), dist.Normal(0.0, 1.0), True),
        "tail": (dist.StudentT(20.0, 0.0, 1.0), dist.Normal(0.0, 1.05), True),
        "shifted": (dist.Normal(0.0, 1.0), dist.Normal(0.5, 1.0), False),  # good k-hat, but half an sd off
        "narrow": (dist.Normal(0.0, 1.0), dist.Normal(0.0, 0.3), False),
    }
    for name, (target, guide, usable) in cases.items():
        draws, log_weights = weighted(target, guide)
        assert diagnose(log_weights, {"x": draws})[0].guide_draws_usable is usable, name
