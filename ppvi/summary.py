"""Summaries of posterior draws per scalar component, named as ArviZ names them (``theta[0]``, ``W[1, 2]``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    import pandas as pd

#: The quantiles of a summary row: a central 90 % interval and the median.
QUANTILES = (0.05, 0.5, 0.95)


def component_names(name: str, shape: tuple[int, ...]) -> list[str]:
    """``["theta[0]", "theta[1]", ...]`` for a site of ``shape`` (row-major), ``[name]`` for a scalar."""
    if not shape:
        return [name]
    return [f"{name}[{', '.join(map(str, index))}]" for index in np.ndindex(*shape)]


def flatten_draws(draws: Mapping[str, torch.Tensor | np.ndarray]) -> dict[str, np.ndarray]:
    """``{component name: 1-D float64 array of draws}`` from ``{site: array of shape (num_draws, *site_shape)}``."""
    columns = {}
    for name, values in draws.items():
        values = values.detach().double().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
        flat = values.reshape(values.shape[0], -1).astype(np.float64)
        for index, label in enumerate(component_names(name, values.shape[1:])):
            columns[label] = flat[:, index]
    return columns


def summarize(draws: Mapping[str, torch.Tensor | np.ndarray]) -> pd.DataFrame:
    """Mean, sd (ddof=1) and the 5 %, 50 % and 95 % quantiles of every scalar component of ``draws``."""
    import pandas as pd  # here, not at the top: pandas costs a third of a second at start-up

    rows = {}
    for label, column in flatten_draws(draws).items():
        quantiles = np.quantile(column, QUANTILES)
        rows[label] = {"mean": column.mean(), "sd": column.std(ddof=1)}
        rows[label].update({f"{100 * q:g}%": value for q, value in zip(QUANTILES, quantiles, strict=True)})
    return pd.DataFrame.from_dict(rows, orient="index")
