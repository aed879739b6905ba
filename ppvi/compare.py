"""``ppvi.compare``: guides side by side, and against a reference posterior when there is one.

The table answers the question after every fit, "can I trust it?", the way Yao, Vehtari, Simpson & Gelman
(2018, "Yes, but did it work?: Evaluating variational inference") do: the ELBO says which guide is closer to the
posterior in KL(q || p), PSIS k-hat says whether the closest one is close enough, and, with a reference (NUTS
draws, exact moments), the errors in reference standard deviations show what the diagnostics mean in practice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ppvi.diagnostics.diagnosis import diagnose
from ppvi.fit import check_fit_options, fit
from ppvi.guides import AUTO
from ppvi.options import OptionTypeError, validate
from ppvi.result import Fit
from ppvi.summary import component_names, flatten_draws

if TYPE_CHECKING:
    import pandas as pd

Reference = Mapping[str, np.ndarray | torch.Tensor | tuple]


def reference_moments(reference: Reference) -> dict[str, tuple[float, float]]:
    """``{component: (mean, sd)}`` from reference draws (``{site: (num_draws, *shape)}``) or exact moments
    (``{site: (mean, sd)}`` with arrays of the site's shape)."""
    moments: dict[str, tuple[float, float]] = {}
    draws = {name: value for name, value in reference.items() if not isinstance(value, tuple)}
    for label, column in flatten_draws(draws).items():
        moments[label] = (float(column.mean()), float(column.std(ddof=1)))
    for name, value in reference.items():
        if isinstance(value, tuple):
            if len(value) != 2:
                raise ValueError(f"reference[{name!r}] must be draws or a (mean, sd) pair, got a {len(value)}-tuple")
            mean, sd = (np.asarray(torch.as_tensor(v).detach().cpu(), dtype=np.float64) for v in value)
            for label, m, s in zip(component_names(name, mean.shape), mean.reshape(-1), sd.reshape(-1), strict=True):
                moments[label] = (float(m), float(s))
    return moments


def _guide_rows(label: str, result: Fit, num_samples: int, seed: int) -> list[dict[str, Any]]:
    diagnosis = weights = None
    if result.guide_name == "map":  # a point mass has no density, hence no importance weights
        draws = result.sample(num_samples, seed=seed)
    else:
        draws, log_weights = result.weighted_draws(num_samples, seed)
        diagnosis, smoothed = diagnose(log_weights, draws)
        weights = smoothed.exp().cpu().numpy()
    columns = flatten_draws(draws)
    rows = []
    for parameter, column in columns.items():
        row = {
            "guide": label,
            "parameter": parameter,
            "mean": column.mean(),
            "sd": column.std(ddof=1),
            "corrected_mean": float((weights * column).sum()) if weights is not None else np.nan,
            "elbo": result.final_elbo,
            "khat": diagnosis.khat if diagnosis else np.nan,
            "effective_sample_size": diagnosis.effective_sample_size if diagnosis else np.nan,
            "seconds": result.seconds,
            "steps": result.steps,
            "converged": result.converged,
        }
        rows.append(row)
    return rows


def _label(guide: str | Fit | Callable, index: int) -> str:
    if isinstance(guide, str):
        return guide
    if isinstance(guide, Fit):
        return guide.guide_name or f"guide {index}"
    return getattr(guide, "__name__", None) or f"{type(guide).__name__} {index}"


def compare(
    model: Callable,
    *args: Any,
    guides: str | Fit | Sequence[str | Fit] | Mapping[str, str | Fit] = ("meanfield", "fullrank"),
    reference: Reference | None = None,
    num_samples: int = 4000,
    seed: int = 0,
    **fit_options: Any,
) -> pd.DataFrame:
    """Fit (or take) several guides of one model and tabulate them side by side.

    Parameters
    ----------
    model : callable
        The Pyro model.
    *args
        Its data.
    guides : str, Fit, sequence or mapping
        Registry names to fit with ``ppvi.fit(model, *args, guide=name, **fit_options)`` (or guides of your own),
        or fits already made; a mapping gives the labels of the rows. A single name (``guides="fullrank"``) or
        fit is one guide.
    reference : mapping, optional
        The posterior to measure against: draws ``{site: array (num_draws, *site_shape)}`` (NUTS, posteriordb) or
        exact moments ``{site: (mean, sd)}``.
    num_samples : int
        Guide draws behind every mean, sd and PSIS diagnostic.
    seed : int
        Seed of those draws.
    **fit_options
        Passed to :func:`ppvi.fit` for the guides given by name.

    Returns
    -------
    pandas.DataFrame
        One row per (guide, parameter component), indexed by both, with columns ``mean``, ``sd``,
        ``corrected_mean`` (PSIS-corrected), ``elbo`` (:attr:`ppvi.Fit.final_elbo`, the mean of the last tenth of
        the trace), ``khat``, ``effective_sample_size``, ``seconds``, ``steps``, ``converged``; with a reference also
        ``reference_mean``, ``reference_sd``, ``mean_error`` and ``corrected_mean_error`` (absolute, in reference
        sds) and ``sd_ratio`` (``sd / reference_sd``).
    """
    import pandas as pd  # here, not at the top: pandas costs a third of a second at start-up

    if isinstance(guides, (str, Fit)) or (callable(guides) and not isinstance(guides, Mapping)):
        guides = (guides,)  # one guide, not a sequence of one-letter names
    if not isinstance(guides, (Mapping, Sequence)):
        raise OptionTypeError(
            f"guides must be a guide name, a fit, or a sequence or mapping of them, e.g. guides=('meanfield', "
            f"'fullrank'), got {guides!r}"
        )
    labelled = dict(guides) if isinstance(guides, Mapping) else {
        _label(guide, i): guide for i, guide in enumerate(guides)
    }
    if not labelled:
        raise ValueError("guides is empty: name at least one guide, e.g. guides=('meanfield', 'fullrank')")
    checked = validate({"num_samples": num_samples, "seed": seed}, optional=("seed",))
    num_samples, seed = checked["num_samples"], checked["seed"]
    to_fit = [guide for guide in labelled.values() if not isinstance(guide, Fit)]
    for guide in to_fit or [AUTO]:  # every name, and the options, checked before the first fit starts
        fit_options = check_fit_options(model, guide, fit_options, "ppvi.compare")
    rows = []
    for label, guide in labelled.items():
        result = guide if isinstance(guide, Fit) else fit(model, *args, guide=guide, **fit_options)
        rows.extend(_guide_rows(label, result, num_samples, seed))
    table = pd.DataFrame(rows).set_index(["guide", "parameter"])
    if reference is not None:
        moments = reference_moments(reference)
        parameters = table.index.get_level_values("parameter")
        missing = sorted(set(moments) - set(parameters))
        if missing:
            raise ValueError(f"reference has components the model's draws lack: {missing[:5]}")
        table["reference_mean"] = [moments[p][0] if p in moments else np.nan for p in parameters]
        table["reference_sd"] = [moments[p][1] if p in moments else np.nan for p in parameters]
        table["mean_error"] = (table["mean"] - table["reference_mean"]).abs() / table["reference_sd"]
        corrected_error = (table["corrected_mean"] - table["reference_mean"]).abs()
        table["corrected_mean_error"] = corrected_error / table["reference_sd"]
        table["sd_ratio"] = table["sd"] / table["reference_sd"]
    return table
