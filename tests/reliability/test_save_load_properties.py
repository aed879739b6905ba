"""Property-based checks of save and load: a round trip changes nothing, and what the file records is a faithful
fingerprint of the model's structure and of the data."""

from __future__ import annotations

import io
import math
import os
import tempfile
import warnings

import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ppvi
from ppvi.saving import plain_data_problem
from ppvi.serialization import data_fingerprint

#: Few examples and no example database (nothing written into the repository): each example fits a model.
PROPERTY_SETTINGS = settings(max_examples=10, deadline=None, database=None)
#: Training steps per example: enough to move the parameters off their start, few for speed.
STEPS = 20

site_shapes = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)


def normal_model_of_shape(shape: tuple[int, ...]):
    """``theta ~ N(0, 3)`` of ``shape``, ``sd ~ HalfNormal(2)``, and every row of ``y`` ``~ N(theta, sd)``."""

    def model(y: torch.Tensor) -> None:
        theta = pyro.sample("theta", dist.Normal(0.0, 3.0).expand(shape).to_event(len(shape)))
        sd = pyro.sample("sd", dist.HalfNormal(2.0))
        scale = sd.reshape(sd.shape + (1,) * len(shape))  # broadcasts over theta's event dims, batched or not
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(theta, scale).to_event(len(shape)), obs=y)

    return model


def _data(shape: tuple[int, ...], num_points: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (0.5 + torch.randn(num_points, *shape, generator=generator, dtype=torch.float64)).to(dtype)


def _fit(model, y: torch.Tensor, guide: str, dtype: str) -> ppvi.Fit:
    with warnings.catch_warnings():  # a FitWarning about a short fit says nothing about the file
        warnings.simplefilter("ignore", ppvi.FitWarning)
        return ppvi.fit(model, y, guide=guide, steps=STEPS, dtype=dtype, device="cpu")


@PROPERTY_SETTINGS
@given(
    shape=site_shapes,
    num_points=st.integers(2, 12),
    seed=st.integers(0, 2**16),
    guide=st.sampled_from(["meanfield", "fullrank", "map"]),
    dtype=st.sampled_from(["float32", "float64"]),
)
def test_round_trip_changes_nothing(shape, num_points, seed, guide, dtype):
    model = normal_model_of_shape(shape)
    y = _data(shape, num_points, seed, getattr(torch, dtype))
    fit = _fit(model, y, guide, dtype)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "fit.pt")
        fit.save(path)
        loaded = ppvi.load(path, model, y, device="cpu")
        assert os.listdir(folder) == ["fit.pt"]
    assert loaded.dtype == fit.dtype and loaded.site_shapes() == fit.site_shapes()
    assert (loaded.guide_name, loaded.steps, loaded.converged, loaded.message) == (
        fit.guide_name, fit.steps, fit.converged, fit.message
    )
    for name, value in fit.guide.state_dict().items():
        assert torch.equal(loaded.guide.state_dict()[name], value), name
    pd.testing.assert_frame_equal(loaded.summary(200, seed=seed), fit.summary(200, seed=seed))


@PROPERTY_SETTINGS
@given(saved_shape=site_shapes, loaded_shape=site_shapes, seed=st.integers(0, 2**16))
def test_load_accepts_exactly_the_shapes_it_was_saved_for(saved_shape, loaded_shape, seed):
    y = _data(saved_shape, 6, seed, torch.float64)
    fit = _fit(normal_model_of_shape(saved_shape), y, "meanfield", "float64")
    other = normal_model_of_shape(loaded_shape)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "fit.pt")
        fit.save(path)
        if saved_shape == loaded_shape:
            assert ppvi.load(path, other, y).site_shapes()["theta"] == saved_shape
            return
        other_y = _data(loaded_shape, 6, seed, torch.float64)
        with pytest.raises(ValueError, match="'theta' is .* in the file and .* here"):
            ppvi.load(path, other, other_y, check_data=False)


tensors = st.builds(
    lambda shape, seed, dtype: (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 10).to(dtype),
    st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple),
    st.integers(0, 2**16),
    st.sampled_from([torch.float32, torch.float64, torch.int64]),
)


@PROPERTY_SETTINGS
@given(values=st.lists(tensors, min_size=1, max_size=3), which=st.integers(0, 2), scale=st.integers(0, 2**20))
def test_fingerprint_is_stable_and_sees_any_change(values, which, scale):
    args = tuple(values)
    assert data_fingerprint(args, {}) == data_fingerprint(tuple(v.clone() for v in args), {})
    index = which % len(args)
    changed = list(args)
    changed[index] = args[index].clone().reshape(-1)
    if changed[index].numel():
        changed[index][scale % changed[index].numel()] += 1
        assert data_fingerprint(tuple(changed), {}) != data_fingerprint(args, {})
    if any(value.dim() != 1 for value in args):  # the same values in another shape are other data
        assert data_fingerprint(tuple(value.reshape(-1) for value in args), {}) != data_fingerprint(args, {})
    retyped = list(args)
    retyped[index] = args[index].to(torch.float16)
    assert data_fingerprint(tuple(retyped), {}) != data_fingerprint(args, {})
    assert data_fingerprint(args, {"scale": scale}) != data_fingerprint(args, {"scale": scale + 1})
    assert data_fingerprint(args, {"subsample_size": 3}) == data_fingerprint(args, {})


plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3)
    | st.lists(children, max_size=3).map(tuple)
    | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=10,
)


@PROPERTY_SETTINGS
@given(value=plain)
def test_plain_options_are_saved_and_read_back_without_pickle(value):
    assert plain_data_problem(value) is None
    buffer = io.BytesIO()
    torch.save({"option": value}, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["option"] == value


@PROPERTY_SETTINGS
@given(value=plain, depth=st.integers(0, 3))
def test_a_function_anywhere_in_an_option_is_found(value, depth):
    nested = math.sqrt
    for level in range(depth):
        nested = [value, nested] if level % 2 else {"key": nested}
    assert "a function (sqrt)" in plain_data_problem(nested)
