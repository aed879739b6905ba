"""Every bad input is a clear error (the problem and the fix), and every natural one is accepted: empty data, holes,
strings, bool tensors, pandas objects, models with pyro.param, Pyro autoguides, a single guide name for compare,
and the diagnostics subpackage as the README writes it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch

import ppvi

from .normal_model import normal_normal

STEPS = 60


def test_empty_data_says_it_is_empty_and_what_to_pass():
    with pytest.raises(ValueError, match=r"data argument 'y' is empty \(shape \(0,\)\).*Pass the data"):
        ppvi.fit(normal_normal, torch.tensor([]), steps=STEPS)
    with pytest.raises(ValueError, match="data argument 'y' is an empty list"):
        ppvi.fit(normal_normal, [], steps=STEPS)


def test_none_inside_a_list_names_its_index():
    with pytest.raises(ValueError, match=r"data argument 'y' holds None at index \[1\].*impute"):
        ppvi.fit(normal_normal, [1.0, None, 2.0], steps=STEPS)
    with pytest.raises(ValueError, match=r"holds None at index \[1\]"):
        ppvi.fit(normal_normal, np.array([1.0, None, 2.0], dtype=object), steps=STEPS)


def test_strings_as_data_say_to_pass_numbers():
    with pytest.raises(ValueError, match=r"data argument 'y' is a string \('abc'\).*pass numbers"):
        ppvi.fit(normal_normal, "abc", steps=STEPS)
    with pytest.raises(ValueError, match=r"holds the string '2' at index \[1\]"):
        ppvi.fit(normal_normal, [1.0, "2"], steps=STEPS)


def test_bool_observations_say_how_to_convert():
    def coin(flips):
        p = pyro.sample("p", dist.Beta(1.0, 1.0))
        with pyro.plate("tosses", flips.shape[0]):
            pyro.sample("flips", dist.Bernoulli(p), obs=flips)

    flips = torch.tensor([True, False, True, True])
    with pytest.raises(ValueError, match=r"observed site 'flips' holds a bool tensor.*\.double\(\)"):
        ppvi.fit(coin, flips, steps=STEPS)
    fit = ppvi.fit(coin, flips.double(), steps=STEPS)  # converted as the message says: it fits
    assert set(fit.sample(10, seed=0)) == {"p"}


def test_pandas_series_is_data(y):
    series = pd.Series(y.numpy(), index=range(100, 120), name="y")
    fit = ppvi.fit(normal_normal, series, steps=STEPS)
    assert torch.equal(fit.args[0], y)  # the values, in order; the index is only labels


def test_pandas_dataframe_of_numbers_is_a_matrix_and_other_columns_are_named():
    def regression(x, y):
        weights = pyro.sample("weights", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(x @ weights, 1.0), obs=y)

    generator = np.random.default_rng(0)
    frame = pd.DataFrame({"a": generator.normal(size=20), "b": generator.integers(0, 3, size=20)})
    target = pd.Series(frame["a"] - frame["b"])
    fit = ppvi.fit(regression, frame, target, steps=STEPS)
    assert fit.args[0].shape == (20, 2) and fit.args[0].dtype == torch.float64
    frame["label"] = ["x", "y"] * 10
    with pytest.raises(ValueError, match=r"non-numeric column\(s\) \['label'\].*select_dtypes"):
        ppvi.fit(regression, frame, target, steps=STEPS)
    with pytest.raises(ValueError, match=r"pandas Series of dtype .*, not numbers.*cat\.codes"):
        ppvi.fit(normal_normal, frame["label"], steps=STEPS)


def test_model_with_pyro_param_trains_it_with_the_guide(y):
    def located(y):
        location = pyro.param("location", torch.tensor(0.0))
        scale = pyro.sample("scale", dist.HalfNormal(5.0))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(location, scale), obs=y)

    fit = ppvi.fit(located, y, steps=300)
    assert set(fit.params) == {"location"}
    assert abs(float(fit.params["location"]) - float(y.mean())) < 0.3  # maximum likelihood: the sample mean
    assert "location" not in pyro.get_param_store()  # the fit's own, not the global store's
    assert set(fit.sample(10, seed=0)) == {"scale"}


def test_pyro_autoguide_instance_is_a_guide_of_your_own(y):
    guide = pyro.infer.autoguide.AutoNormal(normal_normal)
    fit = ppvi.fit(normal_normal, y, guide=guide, steps=500, learning_rate=0.05)
    assert fit.guide is guide and fit.guide_name is None
    precision = y.shape[0] + 0.01
    draws = fit.sample(4000, seed=0)["mu"]
    assert abs(float(draws.mean()) - float(y.sum()) / precision) < 0.1
    assert 0.7 < float(draws.std()) * precision**0.5 < 1.3


def test_compare_takes_a_single_guide_name(y):
    table = ppvi.compare(normal_normal, y, guides="fullrank", num_samples=200, steps=STEPS)
    assert list(table.index.get_level_values("guide").unique()) == ["fullrank"]


def test_diagnostics_subpackage_as_the_readme_writes_it():
    assert "diagnostics" in ppvi.__all__  # imported by ppvi itself, not by chance through another module
    smoothed, khat = ppvi.diagnostics.psis(torch.randn(1000, dtype=torch.float64))
    assert float(khat) < 0.7 and smoothed.shape == (1000,)


def test_swapped_model_and_data_say_which_comes_first(y):
    with pytest.raises(TypeError, match=r"takes the model first.*ppvi\.fit\(model, \*data"):
        ppvi.fit(y, normal_normal)


def test_guide_that_is_neither_a_name_nor_callable_is_refused(y):
    with pytest.raises(ValueError, match="guide must be a registry name"):
        ppvi.fit(normal_normal, y, guide=3)
