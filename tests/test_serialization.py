"""Saving and loading fits: parameters round-trip exactly, without pickle."""

from __future__ import annotations

import pickle

import pytest
import torch

import ppvi
from models import fake_gaussian


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return fake_gaussian.simulate().double()


@pytest.mark.parametrize("guide", ["meanfield", "fullrank", "lowrank", "flow", "laplace", "map"])
def test_round_trip_reproduces_the_posterior_exactly(guide, data, tmp_path):
    fit = ppvi.fit(fake_gaussian.model, data, guide=guide, steps=60)
    path = tmp_path / "fit.pt"
    fit.save(path)
    loaded = ppvi.load(path, fake_gaussian.model, data)
    assert loaded.guide_name == guide and loaded.steps == fit.steps and loaded.converged == fit.converged
    assert (loaded.elbo == fit.elbo).all()
    for name, value in fit.guide.state_dict().items():
        assert torch.equal(loaded.guide.state_dict()[name], value), name
    original, restored = fit.sample(50, seed=3), loaded.sample(50, seed=3)
    for name in original:
        assert torch.equal(original[name], restored[name]), name


def test_saved_file_loads_with_weights_only_and_holds_no_pickled_objects(data, tmp_path):
    path = tmp_path / "fit.pt"
    ppvi.fit(fake_gaussian.model, data, guide="fullrank", steps=20).save(path)
    state = torch.load(path, weights_only=True)  # refuses anything but tensors and plain containers
    assert state["format"] == "ppvi-fit" and state["guide_name"] == "fullrank"


def test_lowrank_options_survive(data, tmp_path):
    path = tmp_path / "fit.pt"
    ppvi.fit(fake_gaussian.model, data, guide="lowrank", guide_options={"rank": 1}, steps=20).save(path)
    assert ppvi.load(path, fake_gaussian.model, data).guide.rank == 1


def test_user_guide_needs_a_fresh_instance(data, tmp_path):
    fit = ppvi.fit(fake_gaussian.model, data, guide="meanfield", steps=20)
    fit.guide_name = None  # as if it had been a guide of the user's own
    path = tmp_path / "fit.pt"
    fit.save(path)
    with pytest.raises(ValueError, match="pass a fresh instance"):
        ppvi.load(path, fake_gaussian.model, data)


def test_missing_and_foreign_files_are_reported(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved fit"):
        ppvi.load(tmp_path / "absent.pt", fake_gaussian.model, data)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not a ppvi fit file"):
        ppvi.load(foreign, fake_gaussian.model, data)
    pickled = tmp_path / "pickled.pt"
    with open(pickled, "wb") as handle:
        pickle.dump(object(), handle)
    with pytest.raises(ValueError, match="not a ppvi fit file"):
        ppvi.load(pickled, fake_gaussian.model, data)
