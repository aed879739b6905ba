"""Save and load under bad inputs and faults: each is met by an error that names the problem, and nothing is lost.

One test per fault: the wrong model, the wrong site shapes or constraints, different data, a guide option that
cannot be saved, a corrupt, truncated, foreign or malicious file, and a disk that fills up during a save.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch

import ppvi
from ppvi import FitFileError
from ppvi.guides import GuideSpec, MeanFieldGuide

#: Data points of the Normal-Normal model: enough for a posterior the prior does not dominate, few for speed.
NUM_POINTS = 20
#: Training steps: the tests are about the file, not the fit.
STEPS = 100


def normal_model(y: torch.Tensor) -> None:
    """``mu ~ N(0, 10)``, ``sd ~ HalfNormal(5)``, ``y_i ~ N(mu, sd)``."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    sd = pyro.sample("sd", dist.HalfNormal(5.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, sd), obs=y)


def renamed_model(y: torch.Tensor) -> None:
    """The same model with other site names: the same latent dimension, so old ppvi loaded it silently."""
    a = pyro.sample("a", dist.Normal(0.0, 10.0))
    b = pyro.sample("b", dist.HalfNormal(5.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(a, b), obs=y)


def vector_model(y: torch.Tensor) -> None:
    """The same site names with ``mu`` of shape ``(2,)``: old ppvi gave torch's "size mismatch for loc"."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0).expand([2]).to_event(1))
    sd = pyro.sample("sd", dist.HalfNormal(5.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu.sum(), sd), obs=y)


def unconstrained_model(y: torch.Tensor) -> None:
    """The same names and shapes, but ``sd`` unconstrained: the saved unconstrained values would mean other things."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    sd = pyro.sample("sd", dist.Normal(3.0, 1.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, sd.abs() + 0.1), obs=y)


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    generator = torch.Generator().manual_seed(11)
    return 1.0 + 2.0 * torch.randn(NUM_POINTS, generator=generator, dtype=torch.float64)


@pytest.fixture(scope="module")
def saved(data, tmp_path_factory) -> str:
    """A good file, written once for the module (tests that change it copy it first)."""
    path = tmp_path_factory.mktemp("saved") / "fit.pt"
    ppvi.fit(normal_model, data, guide="meanfield", steps=STEPS).save(path)
    return str(path)


def _copy(source: str, folder) -> str:
    target = folder / "copy.pt"
    target.write_bytes(Path(source).read_bytes())
    return str(target)


def _leftovers(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith(".tmp"))


def test_wrong_model_with_the_same_dimension_is_refused(saved, data):
    with pytest.raises(ValueError, match="latent sites") as error:
        ppvi.load(saved, renamed_model, data)
    message = str(error.value)
    assert "['mu', 'sd']" in message and "['a', 'b']" in message
    assert "load it with the model the fit was made with" in message


def test_wrong_site_shapes_are_named_not_torchs_size_mismatch(saved, data):
    with pytest.raises(ValueError, match="other shapes") as error:
        ppvi.load(saved, vector_model, data)
    message = str(error.value)
    assert "'mu' is () in the file and (2,) here" in message
    assert "size mismatch" not in message


def test_wrong_site_constraints_are_named(saved, data):
    with pytest.raises(ValueError, match="other constraints") as error:
        ppvi.load(saved, unconstrained_model, data)
    assert "'sd' is GreaterThanEq(lower_bound=0.0) in the file and Real() here" in str(error.value)


def test_different_data_are_refused_unless_asked_for(saved, data):
    other = data + 1.0
    with pytest.raises(ValueError, match="differ from the data the fit was made with") as error:
        ppvi.load(saved, normal_model, other)
    assert "check_data=False" in str(error.value)
    loaded = ppvi.load(saved, normal_model, other, check_data=False)
    assert set(loaded.sample(5)) == {"mu", "sd"}


def test_guide_option_holding_a_lambda_is_refused_and_the_old_file_kept(saved, data, tmp_path, monkeypatch):
    path = _copy(saved, tmp_path)
    before = Path(path).read_bytes()

    def factory(model, transform=None, **options):
        return MeanFieldGuide(model, **options)

    monkeypatch.setitem(ppvi.GUIDES, "transformed", GuideSpec(factory, "mean-field with a transform option"))
    fit = ppvi.fit(normal_model, data, guide="transformed", guide_options={"transform": lambda x: x}, steps=20)
    with pytest.raises(ValueError, match=r"guide option 'transform' holds a function \(.*<lambda>\)") as error:
        fit.save(path)
    assert "cannot be saved without pickle" in str(error.value)
    assert Path(path).read_bytes() == before and _leftovers(tmp_path) == []
    assert ppvi.load(path, normal_model, data).guide_name == "meanfield"


def test_corrupt_file_is_named(saved, data, tmp_path):
    path = tmp_path / "corrupt.pt"
    size = os.path.getsize(saved)
    path.write_bytes(torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
                     .numpy().tobytes())
    with pytest.raises(FitFileError, match="not a ppvi fit file, or is corrupt") as error:
        ppvi.load(path, normal_model, data)
    assert str(path) in str(error.value) and "weights_only" not in str(error.value)


def test_truncated_file_is_named(saved, data, tmp_path):
    path = tmp_path / "truncated.pt"
    content = Path(saved).read_bytes()
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(FitFileError, match="not a ppvi fit file, or is truncated or corrupt") as error:
        ppvi.load(path, normal_model, data)
    assert str(path) in str(error.value)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(FitFileError, match="is empty"):
        ppvi.load(empty, normal_model, data)


def test_torch_file_that_is_not_a_fit_is_named(data, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(3, 3)}, path)
    with pytest.raises(FitFileError, match="not a ppvi fit file") as error:
        ppvi.load(path, normal_model, data)
    assert str(path) in str(error.value)


def test_disk_full_during_save_leaves_the_old_file_intact(saved, data, tmp_path, monkeypatch):
    path = _copy(saved, tmp_path)
    before = Path(path).read_bytes()
    fit = ppvi.fit(normal_model, data, guide="fullrank", steps=20)
    real_save = torch.save

    def half_then_full(obj, handle, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_full)
    with pytest.raises(OSError, match="No space left on device"):
        fit.save(path)
    monkeypatch.undo()
    assert Path(path).read_bytes() == before and _leftovers(tmp_path) == []
    assert ppvi.load(path, normal_model, data).guide_name == "meanfield"


class _Exploit:
    """Pickles to a call that writes a marker file: what a malicious file would do on loading."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle protocol 2", "pickle default protocol"])
def test_malicious_pickle_is_refused_and_never_run(writer, data, tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    payload = {"format": "ppvi-fit", "version": 2, "guide_options": {"x": _Exploit(str(marker))}}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle, protocol=2 if writer == "pickle protocol 2" else None)
    expected = "asks for exec" if writer != "pickle default protocol" else "ppvi refuses it"
    with pytest.raises(FitFileError, match="could run arbitrary code") as error:
        ppvi.load(path, normal_model, data)
    message = str(error.value)
    assert expected in message and str(path) in message and "weights_only" not in message
    assert not marker.exists()
