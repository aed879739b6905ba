"""``ppvi.plot_comparison``: what each guide believes, drawn over the reference posterior.

One panel per parameter component with the 1-D marginal density of every guide, and one panel with the 2-D
density contours of a pair of components: the lecture's figure, where the mean-field guide's contours are
axis-aligned and too narrow on a correlated posterior while the full-rank guide's follow the reference.

Matplotlib is imported when a figure is drawn, not with :mod:`ppvi`; the figure is a plain
:class:`matplotlib.figure.Figure` (no pyplot state, safe under the Agg backend): save it with ``savefig``, or let
Jupyter display it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ppvi.fit import Fit
from ppvi.summary import flatten_draws

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Most 1-D panels drawn when ``parameters`` is not given: past this, choose the components to show.
MAX_DEFAULT_PARAMETERS = 6
#: Probability mass inside each 2-D contour (highest-density regions), innermost last.
CONTOUR_MASSES = (0.9, 0.6, 0.3)
#: Panels per row.
PANELS_PER_ROW = 3
#: Grid points per axis for the densities.
GRID_POINTS_1D = 256
GRID_POINTS_2D = 64
#: Draws at which a 2-D density is evaluated to place the contour levels (a random subset past this).
LEVEL_DRAWS = 1000

Draws = Mapping[str, np.ndarray | torch.Tensor]


def plot_comparison(
    fits: Mapping[str, Fit | Draws],
    reference: Draws | None = None,
    parameters: Sequence[str] | None = None,
    pair: tuple[str, str] | bool | None = None,
    num_samples: int = 4000,
    seed: int = 0,
    axes: Axes | Sequence[Axes] | np.ndarray | None = None,
) -> Figure:
    """Draw each guide's 1-D marginals and 2-D density contours over the reference posterior.

    Parameters
    ----------
    fits : mapping of str to Fit
        The guides to draw, keyed by the label of the legend (``{"meanfield": fit_1, "fullrank": fit_2}``). A
        value may also be draws ``{site: array (num_draws, *site_shape)}`` (e.g. from another sampler).
    reference : mapping of str to array, optional
        Reference posterior draws ``{site: array (num_draws, *site_shape)}`` (NUTS, posteriordb, exact draws),
        drawn in black: a line in the 1-D panels, filled grey contours in the 2-D panel. At most
        ``num_samples`` of them, evenly spaced, enter each density.
    parameters : sequence of str, optional
        Components to draw, named as in :meth:`Fit.summary` and ArviZ (``"beta[0]"``, ``"sigma"``,
        ``"W[1, 2]"``). By default every component, when there are at most :data:`MAX_DEFAULT_PARAMETERS`.
    pair : tuple of two str, or bool, optional
        The two components of the 2-D panel; by default (``None`` or ``True``) the first two of ``parameters``
        when there are at least two; ``False`` draws no 2-D panel.
    num_samples : int
        Draws from every fit.
    seed : int
        Seed of those draws.
    axes : matplotlib Axes or sequence of them, optional
        Where to draw: one Axes per 1-D panel, in the order of ``parameters``, then one for the 2-D panel. By
        default a new figure, :data:`PANELS_PER_ROW` panels to a row.

    Returns
    -------
    matplotlib.figure.Figure
        The figure (the one holding ``axes`` when they are given). The legend, on the first panel, names the
        guides and the reference.

    Raises
    ------
    ValueError
        If ``fits`` is empty; if a parameter or a component of ``pair`` is not drawn by every fit (the message
        lists those that are); if there are more than :data:`MAX_DEFAULT_PARAMETERS` components and
        ``parameters`` is not given; if ``reference`` holds (mean, sd) pairs instead of draws, or components the
        fits lack; if ``axes`` are not as many as the panels; if draws are not finite.

    Notes
    -----
    Densities are Gaussian kernel density estimates (:class:`scipy.stats.gaussian_kde`, Scott's bandwidth). The
    2-D contours enclose :data:`CONTOUR_MASSES` of each distribution's draws (highest-density regions: the level
    for mass ``p`` is the ``1 - p`` quantile of the density at the draws), so a guide whose contours lie inside
    the reference's is too narrow. A component a guide holds constant (a MAP guide) is drawn as a vertical line
    in 1-D and a cross in 2-D.
    """
    if not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an integer of at least 2, got {num_samples!r}")
    if not fits:
        raise ValueError("fits is empty: give at least one, e.g. {'meanfield': fit}")
    columns = {label: _columns(value, num_samples, seed) for label, value in fits.items()}
    available = [name for name in next(iter(columns.values())) if all(name in c for c in columns.values())]
    reference_columns = _reference_columns(reference, available, num_samples)

    if parameters is None:
        if len(available) > MAX_DEFAULT_PARAMETERS:
            raise ValueError(
                f"the fits have {len(available)} components, too many panels to draw them all: choose up to "
                f"{MAX_DEFAULT_PARAMETERS} with parameters=[...]; available: {_listing(available)}"
            )
        parameters = available
    else:
        if isinstance(parameters, str):
            parameters = [parameters]
        parameters = list(parameters)
        _check_names(parameters, available, "parameter")
        if not parameters:
            raise ValueError(f"parameters is empty: name at least one of {_listing(available)}")
    if pair is None or pair is True:
        pair = (parameters[0], parameters[1]) if len(parameters) >= 2 else None
    elif pair is False:
        pair = None
    else:
        pair = tuple(pair)
        if len(pair) != 2:
            raise ValueError(f"pair must name two components, got {pair!r}")
        _check_names(list(pair), available, "component of pair")

    num_panels = len(parameters) + (pair is not None)
    figure, panels = _panels(axes, num_panels)
    colours = {label: f"C{i % 10}" for i, label in enumerate(columns)}
    for axis, name in zip(panels, parameters, strict=False):
        sources = [columns[label][name] for label in columns]
        reference_values = reference_columns.get(name)
        limits = _limits(sources + ([reference_values] if reference_values is not None else []))
        if reference_values is not None:
            _marginal(axis, reference_values, limits, colour="black", label="reference", linewidth=2.0, zorder=3)
        for label in columns:
            _marginal(axis, columns[label][name], limits, colour=colours[label], label=label, linewidth=1.5, zorder=4)
        axis.set_xlim(*limits)
        axis.set_xlabel(name)
        axis.set_yticks([])
        axis.set_ylim(bottom=0)
    if panels:
        panels[0].set_ylabel("density")
        panels[0].legend(fontsize="small", frameon=False)
    if pair is not None:
        axis = panels[len(parameters)]
        first, second = pair
        have_reference = first in reference_columns and second in reference_columns
        sources = {label: (columns[label][first], columns[label][second]) for label in columns}
        every = list(sources.values()) + ([(reference_columns[first], reference_columns[second])]
                                          if have_reference else [])
        x_limits, y_limits = _limits([s[0] for s in every]), _limits([s[1] for s in every])
        rng = np.random.default_rng(seed)
        if have_reference:
            _contours(axis, reference_columns[first], reference_columns[second], rng, colour="black", filled=True)
        for label, (x, y) in sources.items():
            _contours(axis, x, y, rng, colour=colours[label], filled=False)
        axis.set_xlim(*x_limits)
        axis.set_ylim(*y_limits)
        axis.set_xlabel(first)
        axis.set_ylabel(second)
        masses = ", ".join(f"{100 * mass:g} %" for mass in sorted(CONTOUR_MASSES))
        axis.set_title(f"{masses} regions", fontsize="small")
    return figure


# -- the data ----------------------------------------------------------------------------------------------------
def _columns(value: Fit | Draws, num_samples: int, seed: int) -> dict[str, np.ndarray]:
    draws = value.sample(num_samples, seed=seed) if isinstance(value, Fit) else value
    if not isinstance(draws, Mapping):
        raise ValueError(f"each fit must be a ppvi.Fit or draws {{site: array}}, got {type(value).__name__}")
    return flatten_draws(draws)


def _reference_columns(reference: Draws | None, available: list[str], num_samples: int) -> dict[str, np.ndarray]:
    if reference is None:
        return {}
    moments = [name for name, value in reference.items() if isinstance(value, tuple)]
    if moments:
        raise ValueError(
            f"reference[{moments[0]!r}] is a (mean, sd) pair: plot_comparison draws densities and needs reference "
            "draws {site: array (num_draws, *site_shape)}"
        )
    columns = flatten_draws(reference)
    unknown = [name for name in columns if name not in available]
    if unknown:
        raise ValueError(
            f"reference has components the fits' draws lack: {_listing(unknown)}; the fits draw {_listing(available)}"
        )
    for name, column in columns.items():
        if column.size > num_samples:  # evenly spaced, so every chain is represented
            columns[name] = column[np.linspace(0, column.size - 1, num_samples).round().astype(int)]
    return columns


def _listing(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(map(repr, names[:limit]))
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _check_names(names: Sequence[str], available: list[str], what: str) -> None:
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(f"unknown {what} {unknown[0]!r}: the fits draw {_listing(available)}")


def _finite(values: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(values)):
        raise ValueError("the draws are not all finite: no density to draw")
    return values


def _limits(sources: Sequence[np.ndarray]) -> tuple[float, float]:
    """A common range holding all but the outer 0.5 % of each source's draws, padded by a tenth."""
    low = min(float(np.quantile(_finite(values), 0.005)) for values in sources)
    high = max(float(np.quantile(values, 0.995)) for values in sources)
    pad = 0.1 * (high - low) if high > low else max(1.0, abs(low)) * 0.1
    return low - pad, high + pad


# -- the drawing -------------------------------------------------------------------------------------------------
def _panels(axes: Any, num_panels: int) -> tuple[Figure, list[Axes]]:
    if axes is None:
        from matplotlib.figure import Figure

        columns = min(num_panels, PANELS_PER_ROW)
        rows = math.ceil(num_panels / columns)
        figure = Figure(figsize=(4.0 * columns, 3.4 * rows), layout="constrained")
        grid = figure.subplots(rows, columns, squeeze=False).ravel()
        for extra in grid[num_panels:]:
            figure.delaxes(extra)
        return figure, list(grid[:num_panels])
    panels = list(np.ravel(np.asarray(axes, dtype=object)))
    if len(panels) != num_panels:
        raise ValueError(
            f"axes has {len(panels)} Axes for {num_panels} panels (one per parameter, then one for the pair)"
        )
    figure = panels[0].figure
    while getattr(figure, "figure", figure) is not figure:  # a SubFigure's root figure
        figure = figure.figure
    return figure, panels


def _constant(values: np.ndarray) -> bool:
    return float(np.ptp(values)) <= 1e-12 * max(1.0, float(np.abs(values).max()))


def _marginal(axis: Axes, values: np.ndarray, limits: tuple[float, float], *, colour: str, label: str,
              linewidth: float, zorder: float) -> None:
    from scipy.stats import gaussian_kde

    if _constant(values):
        axis.axvline(values[0], color=colour, label=label, linewidth=linewidth, zorder=zorder)
        return
    grid = np.linspace(*limits, GRID_POINTS_1D)
    axis.plot(grid, gaussian_kde(values)(grid), color=colour, label=label, linewidth=linewidth, zorder=zorder)


def _contours(axis: Axes, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, *, colour: str,
              filled: bool) -> None:
    """Highest-density contours of the draws ``(x, y)``, from a Gaussian KDE on a grid aligned with them."""
    from scipy.stats import gaussian_kde

    points = np.stack([x, y])
    if _constant(x) and _constant(y):
        axis.plot(x[0], y[0], marker="x", markersize=9, markeredgewidth=2, color=colour, linestyle="none", zorder=5)
        return
    centre = points.mean(axis=1)
    try:
        factor = np.linalg.cholesky(np.cov(points))
        kde = gaussian_kde(points)
    except np.linalg.LinAlgError:  # draws on a line (a component held constant, or perfectly correlated)
        shown = points[:, rng.permutation(points.shape[1])[:500]]
        axis.plot(*shown, marker=".", markersize=2, color=colour, linestyle="none", alpha=0.5, zorder=4)
        return
    # The grid is square in the draws' whitened coordinates and sheared in the plot's: a narrow, strongly
    # correlated cloud gets as many grid cells across as a round one, so its contours are as smooth.
    white = np.linalg.solve(factor, points - centre[:, None])
    u, v = np.meshgrid(np.linspace(*_limits([white[0]]), GRID_POINTS_2D), np.linspace(*_limits([white[1]]),
                                                                                      GRID_POINTS_2D))
    grid_x, grid_y = (centre[:, None, None] + np.einsum("ij,jkl->ikl", factor, np.stack([u, v])))
    density = kde(np.stack([grid_x.ravel(), grid_y.ravel()])).reshape(grid_x.shape)
    if points.shape[1] > LEVEL_DRAWS:
        points = points[:, rng.choice(points.shape[1], LEVEL_DRAWS, replace=False)]
    levels = np.unique(np.quantile(kde(points), [1 - mass for mass in CONTOUR_MASSES]))
    levels = levels[levels < density.max()]  # a level the grid never reaches has no contour (matplotlib warns)
    if not levels.size:
        return
    if filled:
        top = float(density.max()) * (1 + 1e-9)
        axis.contourf(grid_x, grid_y, density, levels=[*levels, top], cmap="Greys", alpha=0.6, zorder=1)
        axis.contour(grid_x, grid_y, density, levels=levels, colors=colour, linewidths=0.8, zorder=2)
    else:
        widths = np.linspace(1.0, 2.0, levels.size)
        axis.contour(grid_x, grid_y, density, levels=levels, colors=colour, linewidths=widths, zorder=4)
