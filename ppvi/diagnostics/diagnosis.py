"""A PSIS diagnosis of a variational fit that explains itself.

k-hat (Vehtari, Simpson, Gelman, Yao & Gabry 2024, JMLR 25(72)) estimates the shape of the far tail of the
importance ratios ``p(x, theta) / q(theta)``: how many of their moments exist. It does not measure how large the
mismatch between ``q`` and ``p`` is. A guide a hair narrower than the posterior in one tail has ratios of infinite
variance (k-hat above 0.7) while its means and sds agree with the posterior's to the second decimal; a guide that
misses half the posterior mass has a high k-hat too. Yao, Vehtari, Simpson & Gelman (2018, "Yes, but did it
work?", ICML) read k-hat beside what PSIS does to the estimates; :func:`diagnose` does the same and says which case
it sees:

* the size of the mismatch: the relative effective sample size, the sd of the log weights, and how far the
  PSIS-corrected means and sds of every scalar component move from the guide's own (in the guide's sds);
* k-hat's own Monte Carlo noise: a bootstrap interval (Efron 1979) of k-hat over resamples of the draws, a rough
  but cheap gauge (the draws' PSIS runs batched) of whether more draws could change the verdict. Vehtari et al.
  (2024, section 3) give the draws k-hat needs, ``S > 10^(1 / (1 - k))``: the interval says when ``S`` is short.

The verdicts are ``"good"`` and ``"ok"`` (Vehtari et al.'s bands), ``"caution"`` (k-hat above the threshold, but
the mismatch is small: the summaries can be used, tail probabilities with care) and ``"bad"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import torch

from ppvi.diagnostics.psis import KHAT_GOOD, khat_threshold, psis, psis_effective_sample_size
from ppvi.summary import flatten_draws

__all__ = ["Diagnosis", "diagnose", "resample"]

#: Bootstrap resamples behind the k-hat interval: the 5 % and 95 % quantiles of 200 resamples are within about
#: 0.02 of their limits for the spread k-hat has at 4,000 draws, and one batched PSIS of 200 x 4,000 takes ~0.1 s.
BOOTSTRAP_RESAMPLES = 200
#: Probability of the k-hat interval.
INTERVAL_PROBABILITY = 0.9
#: A mismatch is small when the relative ESS is at least this, and the PSIS-corrected means move by at most
#: SMALL_MEAN_SHIFT guide sds and the sds by at most SMALL_SD_CHANGE (relative). 0.05 sd is half the 0.1 sd
#: accuracy we ask of a fit. With half the draws' worth of information the corrected means' Monte Carlo error is
#: at most 1.4 times the raw ones' (0.023 sd at 4,000 draws), so a mismatch of 0.05 sd would show as a shift:
#: an undetected one is small. (Measured: the flow on centred eight schools, 0.04 sd from NUTS, has a relative
#: ESS of 0.51 and shifts of 0.02 sd; a guide three times too narrow has 0.03.)
SMALL_RELATIVE_ESS = 0.5
SMALL_MEAN_SHIFT = 0.05
SMALL_SD_CHANGE = 0.05


class Diagnosis(NamedTuple):
    """How far the guide can be trusted, by Pareto smoothed importance sampling (Yao, Vehtari, Simpson & Gelman
    2018, "Yes, but did it work?"; Vehtari et al. 2024, JMLR).

    Attributes
    ----------
    khat : float
        Estimated Pareto shape of the importance ratios ``p(x, theta) / q(theta)``: below 0.5 the guide is close
        to the posterior, up to 0.7 (and ``threshold``) PSIS-corrected estimates are reliable, above it the
        ratios' variance is infinite.
    effective_sample_size : float
        PSIS effective sample size of the draws.
    threshold : float
        ``min(1 - 1 / log10(S), 0.7)``, the sample-size dependent k-hat limit.
    verdict : str
        ``"good"``, ``"ok"``, ``"caution"`` (k-hat above ``threshold`` but a small mismatch) or ``"bad"``.
    num_samples : int
        Draws used.
    khat_interval : tuple of float
        90 % bootstrap interval of k-hat (its Monte Carlo noise); ``(nan, nan)`` when not computed.
    log_weight_sd : float
        Standard deviation of the log importance ratios (0 for a guide equal to the posterior).
    mean_shift : float
        Largest move of a scalar component's mean under PSIS correction, in the guide's sds (nan without draws).
    sd_change : float
        Largest relative change of a scalar component's sd under PSIS correction (nan without draws).
    elbo : float
        The ELBO estimated from the same draws: the mean log importance ratio.
    explanation : str
        The verdict in words: what it means and what to do.
    """

    khat: float
    effective_sample_size: float
    threshold: float
    verdict: str
    num_samples: int
    khat_interval: tuple[float, float] = (math.nan, math.nan)
    log_weight_sd: float = math.nan
    mean_shift: float = math.nan
    sd_change: float = math.nan
    elbo: float = math.nan
    explanation: str = ""

    @property
    def guide_draws_usable(self) -> bool:
        """Whether the guide's own draws (not only PSIS-corrected estimates) can stand for the posterior: a
        ``"good"`` or ``"ok"`` k-hat with a small mismatch, or ``"caution"`` (a small mismatch by definition)."""
        return self.verdict == "caution" or (self.verdict in ("good", "ok") and _is_small(self._asdict()))

    def __str__(self) -> str:
        low, high = self.khat_interval
        interval = f" [{low:.2f}, {high:.2f}]" if math.isfinite(low) and math.isfinite(high) else ""
        return (
            f"Diagnosis: {self.verdict} (k-hat {self.khat:.2f}{interval}, threshold {self.threshold:.2f}, "
            f"ESS {self.effective_sample_size:.0f} of {self.num_samples})\n{self.explanation}"
        )

    def _repr_html_(self) -> str:
        """Jupyter's view: verdict, k-hat with its interval, ESS, explanation (:func:`ppvi.html.diagnosis_html`)."""
        from ppvi.html import diagnosis_html

        return diagnosis_html(self)


def _khat_interval(log_weights: torch.Tensor, generator: torch.Generator) -> tuple[float, float]:
    """Bootstrap interval of k-hat: PSIS on :data:`BOOTSTRAP_RESAMPLES` resamples of the draws, in one batch."""
    num_samples = log_weights.shape[-1]
    indices = torch.randint(
        num_samples, (BOOTSTRAP_RESAMPLES, num_samples), generator=generator, device=torch.device("cpu")
    ).to(log_weights.device)
    _, khats = psis(log_weights[indices])
    khats = khats.nan_to_num(nan=math.inf)
    tail = (1 - INTERVAL_PROBABILITY) / 2
    low, high = torch.quantile(khats.clamp(min=-10.0, max=10.0), torch.tensor([tail, 1 - tail]).to(khats))
    return float(low), float(high)


def _corrected_moments(draws: Mapping[str, torch.Tensor], weights: torch.Tensor) -> tuple[float, float]:
    """Largest move of a component's mean (in guide sds) and relative change of its sd under the weights."""
    columns = flatten_draws(draws)
    if not columns:
        return math.nan, math.nan
    values = torch.from_numpy(np.stack(list(columns.values()), axis=1))  # (S, C) float64
    weights = weights.double().cpu()[:, None]
    mean, sd = values.mean(0), values.std(0)
    corrected_mean = (weights * values).sum(0)
    corrected_sd = ((weights * (values - corrected_mean) ** 2).sum(0)).sqrt()
    varying = sd > 0
    if not varying.any():
        return 0.0, 0.0
    shift = ((corrected_mean - mean).abs()[varying] / sd[varying]).max()
    change = ((corrected_sd[varying] / sd[varying]) - 1).abs().max()
    return float(shift.nan_to_num(nan=math.inf)), float(change.nan_to_num(nan=math.inf))


def _is_small(values: dict) -> bool:
    """Whether the mismatch is small: nearly uniform weights that hardly move any mean or sd."""
    return (
        values["effective_sample_size"] >= SMALL_RELATIVE_ESS * values["num_samples"]
        and values["mean_shift"] <= SMALL_MEAN_SHIFT
        and values["sd_change"] <= SMALL_SD_CHANGE
    )


def _explain(verdict: str, values: dict, notes: list[str]) -> str:
    khat, threshold = values["khat"], values["threshold"]
    size = (
        f"ESS {values['effective_sample_size']:.0f} of {values['num_samples']}, "
        f"log-weight sd {values['log_weight_sd']:.2g}"
    )
    if math.isfinite(values["mean_shift"]):
        size += (
            f", PSIS-corrected means within {values['mean_shift']:.2g} sd of the guide's and sds within "
            f"{100 * values['sd_change']:.2g} %"
        )
    corrected = (
        "PSIS-corrected estimates are reliable and differ from the guide's: use fit.summary(corrected=True), "
        f"fit.sample(corrected=True) or fit.expectation ({size})."
    )
    if verdict == "good":
        band = f"k-hat {khat:.2f} <= {KHAT_GOOD}: "
        sentence = band + (
            f"the guide is close to the posterior; its draws can be used as they are ({size})."
            if _is_small(values)
            else "the importance weights are well behaved, but the guide is not the posterior: " + corrected
        )
    elif verdict == "ok":
        sentence = f"k-hat {khat:.2f} is between {KHAT_GOOD} and {threshold:.2f}: the guide differs from the " + (
            f"posterior only in its tails ({size})." if _is_small(values) else "posterior, but " + corrected
        )
    elif verdict == "caution":
        sentence = (
            f"k-hat {khat:.2f} > {threshold:.2f}: the importance ratios have an infinite variance, so the guide is "
            f"narrower than the posterior somewhere in a tail, but the mismatch is small ({size}): means and sds can "
            "be used, tail probabilities and extreme quantiles with care."
        )
    else:
        sentence = (
            f"k-hat {khat:.2f} > {threshold:.2f} and the mismatch is not small ({size}): neither the guide nor "
            "PSIS-corrected estimates can be trusted. Try a richer guide (guide='fullrank', 'flow' or 'auto'), a "
            "reparameterisation (non-centred hierarchies), or MCMC."
        )
    low, high = values["khat_interval"]
    if math.isfinite(low) and math.isfinite(high) and low <= threshold < high:
        notes = [
            *notes,
            f"k-hat's {100 * INTERVAL_PROBABILITY:.0f} % bootstrap interval [{low:.2f}, {high:.2f}] straddles the "
            f"threshold: diagnose with more draws (num_samples={4 * values['num_samples']}) to settle the verdict.",
        ]
    return " ".join([sentence, *notes])


def diagnose(
    log_weights: torch.Tensor,
    draws: Mapping[str, torch.Tensor] | None = None,
    *,
    notes: list[str] | tuple[str, ...] = (),
    seed: int = 0,
) -> tuple[Diagnosis, torch.Tensor]:
    """PSIS diagnosis of one vector of log importance ratios, with the size of the mismatch and an explanation.

    Parameters
    ----------
    log_weights : torch.Tensor
        ``log p(x, theta_s) - log q(theta_s)``, shape ``(S,)`` (not negated, as :func:`ppvi.diagnostics.psis`).
    draws : mapping, optional
        The draws behind the weights, ``{site: (S, *shape)}``: with them the diagnosis measures how far PSIS
        moves every component's mean and sd.
    notes : sequence of str
        Sentences appended to the explanation (a failed Laplace start, say).
    seed : int
        Seed of the bootstrap of k-hat.

    Returns
    -------
    (Diagnosis, torch.Tensor)
        The diagnosis and the smoothed, normalised log weights (for corrected estimates).
    """
    log_weights = torch.as_tensor(log_weights).double()
    num_samples = log_weights.shape[-1]
    smoothed, khat = psis(log_weights)
    khat = float(khat)
    threshold = khat_threshold(num_samples)
    finite = torch.isfinite(log_weights)
    generator = torch.Generator().manual_seed(seed)
    values = dict(
        khat=khat,
        effective_sample_size=float(psis_effective_sample_size(smoothed)),
        threshold=threshold,
        num_samples=num_samples,
        khat_interval=_khat_interval(log_weights, generator) if bool(finite.all()) else (math.nan, math.nan),
        log_weight_sd=float(log_weights.std()) if bool(finite.all()) else math.inf,
        elbo=float(log_weights.mean()),
    )
    shift, change = _corrected_moments(draws, smoothed.exp()) if draws is not None else (math.nan, math.nan)
    values.update(mean_shift=shift, sd_change=change)
    if not khat <= threshold:  # nan falls through here too
        verdict = "caution" if _is_small(values) else "bad"
    else:
        verdict = "good" if khat <= KHAT_GOOD else "ok"
    explanation = _explain(verdict, values, list(notes))
    return Diagnosis(verdict=verdict, explanation=explanation, **values), smoothed


def resample(
    smoothed_log_weights: torch.Tensor, num_draws: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Indices of ``num_draws`` draws resampled with replacement in proportion to the PSIS weights
    (sampling-importance resampling, Rubin 1988; as Stan's Pathfinder does with its PSIS weights, Zhang et al.
    2022, JMLR 23(306)).

    Parameters
    ----------
    smoothed_log_weights : torch.Tensor
        Shape ``(S,)``, e.g. the second output of :func:`diagnose`.
    num_draws : int
        Indices to return.
    generator : torch.Generator, optional
        Random stream (CPU).

    Returns
    -------
    torch.Tensor
        ``(num_draws,)`` long indices into the ``S`` draws.
    """
    probabilities = (smoothed_log_weights.double() - smoothed_log_weights.double().logsumexp(-1)).exp().cpu()
    return torch.multinomial(probabilities, num_draws, replacement=True, generator=generator)
