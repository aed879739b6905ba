"""Saving and loading fits: parameters round-trip exactly, without pickle; the file records the model's latent sites
and a fingerprint of the data, which load checks; saving is atomic. Faults and bad inputs: tests/reliability/."""

from __future__ import annotations

import pickle

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import init_to_mean

import ppvi
from ppvi import serialization
from ppvi.models import fake_gaussian


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


# -- what the file records, and what load checks ------------------------------------------------------------------
def test_file_records_what_the_fit_belongs_to(data, tmp_path):
    path = tmp_path / "fit.pt"
    fit = ppvi.fit(fake_gaussian.model, data, guide="meanfield", steps=20)
    fit.save(path)
    state = torch.load(path, weights_only=True)
    assert state["version"] == serialization.VERSION == 2
    assert state["latent_sites"] == [
        {"name": "mu", "shape": [], "constraint": "Real()"},
        {"name": "sd", "shape": [], "constraint": "GreaterThanEq(lower_bound=0.0)"},
    ]
    assert state["data_fingerprint"] == serialization.data_fingerprint(fit.args, fit.kwargs)
    assert len(state["data_fingerprint"]) == 64 and state["dtype"] == "float64" and state["guide_name"] == "meanfield"
    assert state["ppvi_version"] == serialization.ppvi_version() != ""
    assert state["model"] == "ppvi.models.fake_gaussian.model" and state["guide_class"] == "ppvi.guides.MeanFieldGuide"


def test_fingerprint_ignores_device_placement_and_subsample_size_but_not_values_or_numbers():
    y = torch.arange(6.0, dtype=torch.float64)
    base = serialization.data_fingerprint((y,), {})
    assert serialization.data_fingerprint((y.clone(),), {"subsample_size": 2, "name": "ignored"}) == base
    assert serialization.data_fingerprint((y.float(),), {}) != base
    assert serialization.data_fingerprint((y.reshape(2, 3),), {}) != base
    assert serialization.data_fingerprint((y, 3), {}) != serialization.data_fingerprint((y, 4), {})
    assert serialization.data_fingerprint((y,), {"scale": 1.0}) != serialization.data_fingerprint((y,), {"scale": 2.0})
    assert serialization.data_fingerprint((y.numpy(),), {}) == base


def test_latent_sites_count_a_subsampled_plate_at_full_size():
    def model(x, subsample_size=None):
        with pyro.plate("data", x.shape[0], subsample_size=subsample_size):
            pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))

    x = torch.zeros(10)
    full = serialization.latent_sites(model, (x,), {})
    assert full == serialization.latent_sites(model, (x,), {"subsample_size": 4})
    assert full == [{"name": "z", "shape": [10, 2], "constraint": "IndependentConstraint(Real(), 1)"}]


def test_saving_leaves_the_random_stream_and_no_temporary_behind(data, tmp_path):
    fit = ppvi.fit(fake_gaussian.model, data, guide="meanfield", steps=20)
    pyro.set_rng_seed(5)
    fit.save(tmp_path / "fit.pt")
    after_save = torch.rand(3)
    pyro.set_rng_seed(5)
    assert torch.equal(torch.rand(3), after_save)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["fit.pt"]


def test_interrupted_save_keeps_the_previous_file(data, tmp_path, monkeypatch):
    path = tmp_path / "fit.pt"
    ppvi.fit(fake_gaussian.model, data, guide="meanfield", steps=20).save(path)
    before = path.read_bytes()
    fit = ppvi.fit(fake_gaussian.model, data, guide="fullrank", steps=20)

    def interrupted(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["fit.pt"]


def test_save_into_a_missing_folder_says_so(data, tmp_path):
    fit = ppvi.fit(fake_gaussian.model, data, guide="meanfield", steps=20)
    with pytest.raises(FileNotFoundError, match="does not exist; create it"):
        fit.save(tmp_path / "absent" / "fit.pt")


def test_init_loc_fn_is_left_out_with_the_reason_and_the_file_loads(data, tmp_path):
    path = tmp_path / "fit.pt"
    fit = ppvi.fit(fake_gaussian.model, data, guide="meanfield", guide_options={"init_loc_fn": init_to_mean}, steps=20)
    fit.save(path)
    state = torch.load(path, weights_only=True)
    assert state["guide_options"] == {} and "init_to_mean" in state["dropped_guide_options"]["init_loc_fn"]
    loaded = ppvi.load(path, fake_gaussian.model, data)
    assert "guide option 'init_loc_fn' was not saved" in loaded.message and loaded.guide_options == {}
    for name, value in fit.guide.state_dict().items():
        assert torch.equal(loaded.guide.state_dict()[name], value), name


def test_numpy_scalar_options_are_saved_as_python_numbers(data, tmp_path):
    path = tmp_path / "fit.pt"
    options = {"init_scale": np.float64(0.05)}
    ppvi.fit(fake_gaussian.model, data, guide="meanfield", guide_options=options, steps=20).save(path)
    loaded = ppvi.load(path, fake_gaussian.model, data)
    assert loaded.guide_options == {"init_scale": 0.05} and type(loaded.guide_options["init_scale"]) is float


def test_guide_argument_for_a_registry_fit_is_refused(data, tmp_path):
    path = tmp_path / "fit.pt"
    ppvi.fit(fake_gaussian.model, data, guide="meanfield", steps=20).save(path)
    with pytest.raises(ValueError, match="rebuilds by name.*Drop guide="):
        ppvi.load(path, fake_gaussian.model, data, guide=lambda y: None)


def test_unregistered_guide_name_says_to_register_it(data, tmp_path, monkeypatch):
    path = tmp_path / "fit.pt"
    monkeypatch.setitem(ppvi.GUIDES, "mine", ppvi.GUIDES["meanfield"])
    ppvi.fit(fake_gaussian.model, data, guide="mine", steps=20).save(path)
    monkeypatch.delitem(ppvi.GUIDES, "mine")
    with pytest.raises(ValueError, match=r"not in ppvi.GUIDES: register it"):
        ppvi.load(path, fake_gaussian.model, data)


def test_check_data_false_still_checks_the_model(data, tmp_path):
    path = tmp_path / "fit.pt"
    ppvi.fit(fake_gaussian.model, data, guide="meanfield", steps=20).save(path)
    shorter = data[:50]
    with pytest.raises(ValueError, match="differ from the data"):
        ppvi.load(path, fake_gaussian.model, shorter)
    assert ppvi.load(path, fake_gaussian.model, shorter, check_data=False).args[0].shape == (50,)


def _rewrite(path, **changes) -> None:
    state = torch.load(path, weights_only=True)
    for key, value in changes.items():
        if value is None:
            state.pop(key)
        else:
            state[key] = value
    torch.save(state, path)


def test_format_1_files_load_without_the_checks_and_say_so(data, tmp_path):
    path = tmp_path / "fit.pt"
    fit = ppvi.fit(fake_gaussian.model, data, guide="fullrank", steps=20)
    fit.save(path)
    removed = dict.fromkeys(serialization.RECORD_KEYS)
    _rewrite(path, version=1, **removed)  # the layout ppvi wrote before format 2
    loaded = ppvi.load(path, fake_gaussian.model, data)
    assert "format-1 file" in loaded.message and "save the fit again" in loaded.message
    original, restored = fit.sample(20, seed=1), loaded.sample(20, seed=1)
    assert all(torch.equal(original[name], restored[name]) for name in original)


def test_newer_and_damaged_files_are_named(data, tmp_path):
    path = tmp_path / "fit.pt"
    ppvi.fit(fake_gaussian.model, data, guide="meanfield", steps=20).save(path)
    good = path.read_bytes()
    _rewrite(path, version=serialization.VERSION + 1)
    with pytest.raises(serialization.FitFileError, match="newer ppvi.*upgrade ppvi"):
        ppvi.load(path, fake_gaussian.model, data)
    path.write_bytes(good)
    _rewrite(path, latent_sites=None)
    with pytest.raises(serialization.FitFileError, match=r"damaged ppvi fit file: missing or malformed \['lat"):
        ppvi.load(path, fake_gaussian.model, data)
    path.write_bytes(good)
    _rewrite(path, latent_sites=[{"name": "mu", "shape": "scalar"}])
    with pytest.raises(serialization.FitFileError, match=r"malformed \['latent_sites'\]"):
        ppvi.load(path, fake_gaussian.model, data)
    path.write_bytes(good)
    _rewrite(path, dtype="save")
    with pytest.raises(serialization.FitFileError, match="not a floating torch dtype"):
        ppvi.load(path, fake_gaussian.model, data)
