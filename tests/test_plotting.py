"""ppvi.plotting.plot_comparison: panels, legend and contours of the lecture's figure, its errors, and the example."""

from __future__ import annotations

import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.contour import ContourSet  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import ppvi  # noqa: E402
from examples import load_example  # noqa: E402
from ppvi.plotting import MAX_DEFAULT_PARAMETERS, plot_comparison  # noqa: E402

CORRELATION = 0.9
NUM_DRAWS = 2000




@pytest.fixture(scope="module")
def example():
    return load_example("compare")


@pytest.fixture(scope="module")
def fits(example) -> dict[str, ppvi.Fit]:
    return {guide: ppvi.fit(example.correlated_gaussian, guide=guide, steps=100) for guide in example.GUIDES}


def synthetic(correlation: float, num_draws: int = NUM_DRAWS, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard bivariate normal draws of a site ``x`` (2,) with the given correlation."""
    covariance = np.array([[1.0, correlation], [correlation, 1.0]])
    return {"x": np.random.default_rng(seed).multivariate_normal(np.zeros(2), covariance, size=num_draws)}


def guide_contours(axis) -> list[ContourSet]:
    return [c for c in axis.collections if isinstance(c, ContourSet)]


def x_extent(contours: ContourSet) -> float:
    vertices = np.concatenate([path.vertices for path in contours.get_paths() if len(path.vertices)])
    return float(np.ptp(vertices[:, 0]))


def test_the_figure_has_a_panel_per_component_and_the_pair(fits, example):
    figure = plot_comparison(fits, example.exact_draws(NUM_DRAWS), num_samples=NUM_DRAWS)
    assert isinstance(figure, Figure)
    assert len(figure.axes) == 3  # x[0], x[1] and the pair
    first, second, pair = figure.axes
    assert (first.get_xlabel(), second.get_xlabel()) == ("x[0]", "x[1]")
    assert (pair.get_xlabel(), pair.get_ylabel()) == ("x[0]", "x[1]")
    legend = first.get_legend()
    assert [text.get_text() for text in legend.get_texts()] == ["reference", "meanfield", "fullrank"]
    assert len(legend.get_lines()) == 3
    for axis in (first, second):
        assert {line.get_label() for line in axis.get_lines()} == {"reference", "meanfield", "fullrank"}
    contours = guide_contours(pair)
    assert len(contours) == 4  # the reference's filled and line contours, then one set per guide
    assert contours[0].filled and not any(c.filled for c in contours[1:])


def test_mean_field_contours_are_narrower_than_the_correlated_reference():
    reference = synthetic(CORRELATION, seed=0)
    conditional_sd = np.sqrt(1 - CORRELATION**2)  # the mean-field optimum of a Gaussian posterior
    meanfield = {"x": np.random.default_rng(1).normal(0.0, conditional_sd, size=(NUM_DRAWS, 2))}
    figure = plot_comparison({"meanfield": meanfield, "fullrank": synthetic(CORRELATION, seed=2)}, reference)
    reference_lines, meanfield_lines, fullrank_lines = guide_contours(figure.axes[2])[1:]
    assert x_extent(meanfield_lines) < 0.6 * x_extent(reference_lines)
    assert x_extent(fullrank_lines) == pytest.approx(x_extent(reference_lines), rel=0.2)


def test_parameters_and_pair_choose_the_panels(fits):
    figure = plot_comparison(fits, parameters=["x[1]"], num_samples=500)
    assert len(figure.axes) == 1 and figure.axes[0].get_xlabel() == "x[1]"
    assert not guide_contours(figure.axes[0])
    figure = plot_comparison(fits, pair=False, num_samples=500)
    assert len(figure.axes) == 2
    figure = plot_comparison(fits, parameters=["x[0]"], pair=("x[1]", "x[0]"), num_samples=500)
    assert len(figure.axes) == 2
    assert figure.axes[1].get_xlabel() == "x[1]" and len(guide_contours(figure.axes[1])) == 2


def test_unknown_names_raise_with_the_available_ones(fits):
    with pytest.raises(ValueError, match=r"unknown parameter 'beta\[0\]'.*'x\[0\]', 'x\[1\]'"):
        plot_comparison(fits, parameters=["beta[0]"], num_samples=500)
    with pytest.raises(ValueError, match=r"unknown component of pair 'x\[2\]'"):
        plot_comparison(fits, pair=("x[0]", "x[2]"), num_samples=500)
    with pytest.raises(ValueError, match="reference has components the fits' draws lack"):
        plot_comparison(fits, {"y": np.zeros((10, 2))}, num_samples=500)


def test_other_misuse_is_refused():
    many = {"theta": np.random.default_rng(0).normal(size=(200, MAX_DEFAULT_PARAMETERS + 1))}
    with pytest.raises(ValueError, match="choose up to"):
        plot_comparison({"guide": many})
    with pytest.raises(ValueError, match="fits is empty"):
        plot_comparison({})
    with pytest.raises(ValueError, match=r"\(mean, sd\) pair"):
        plot_comparison({"guide": synthetic(0.5)}, {"x": (np.zeros(2), np.ones(2))})
    figure = Figure()
    with pytest.raises(ValueError, match="axes has 1 Axes for 3 panels"):
        plot_comparison({"guide": synthetic(0.5)}, axes=[figure.add_subplot()])


def test_given_axes_are_drawn_on():
    figure = Figure()
    axes = figure.subplots(1, 3)
    assert plot_comparison({"guide": synthetic(0.5)}, synthetic(0.5, seed=1), axes=axes) is figure
    assert all(axis.has_data() for axis in axes)


def test_a_point_mass_is_a_line_and_a_cross():
    point = {"x": np.tile([0.5, -0.5], (100, 1))}
    figure = plot_comparison({"map": point, "fullrank": synthetic(0.5)})
    first, _, pair = figure.axes
    assert [line.get_xdata()[0] for line in first.get_lines() if line.get_label() == "map"] == [0.5]
    assert [line.get_marker() for line in pair.get_lines()] == ["x"]


def test_importing_ppvi_does_not_import_matplotlib():
    code = "import sys, ppvi; assert 'matplotlib' not in sys.modules and 'scipy.stats' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_example_writes_the_figure(example, tmp_path, capsys):
    output = tmp_path / "compare.png"
    table = example.main(output, steps=30, num_samples=500)
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and output.stat().st_size > 10_000
    assert list(table.index.get_level_values("guide").unique()) == list(example.GUIDES)
    assert "sd_ratio" in capsys.readouterr().out
