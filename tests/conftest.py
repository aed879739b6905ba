"""Test fixtures shared by the whole suite.

Every test starts from an empty Pyro parameter store and a fixed seed, so tests are independent of their order.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch

#: The posteriordb posteriors bundled with the tests (see tests/data/posteriordb/README.md): each folder holds
#: posteriordb's data.json, info.json and reference_summary.json, and its reference draws as reference_draws.npz.
BUNDLED_POSTERIORDB = Path(__file__).resolve().parent / "data" / "posteriordb"


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture
def float64_default():
    """Make float64 torch's default dtype for one test (unit tests of numerics), restoring it afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def shared_directory() -> Path | None:
    """Locate the shared data folder: ``$PPVI_SHARED``, else ``../shared`` beside the repository root."""
    candidate = os.environ.get("PPVI_SHARED")
    path = Path(candidate) if candidate else Path(__file__).resolve().parents[1].parent / "shared"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def shared() -> Path:
    """The shared data folder (the large data sets: MNIST, the corpora); tests that need it skip, saying why, only
    when it is absent. The posteriordb posteriors are bundled: use :func:`posteriordb_root`."""
    path = shared_directory()
    if path is None:
        pytest.skip(
            "shared data folder (large data sets: MNIST, corpora) not found: set PPVI_SHARED or place it at "
            "../shared beside the repo"
        )
    return path


def materialize_posteriordb(bundle: Path, target: Path) -> Path:
    """Lay out the bundled posteriors as posteriordb does, for :func:`models.posteriordb.load_posterior`.

    Each posterior folder of ``bundle`` is copied to ``target`` with its ``reference_draws.npz`` (``names``, and
    ``draws`` of shape ``(chains, parameters, draws)``) written back as posteriordb's ``reference_draws.json``:
    a list of chains, each ``{parameter: [draws]}``. ``json`` writes floats by their shortest round-trip
    representation, so the draws read back are bit for bit those of the original file.

    Parameters
    ----------
    bundle : pathlib.Path
        Folder of posterior folders, e.g. :data:`BUNDLED_POSTERIORDB`.
    target : pathlib.Path
        Empty folder to fill.

    Returns
    -------
    pathlib.Path
        ``target``, now a root for ``load_posterior``.
    """
    for source in sorted(path for path in bundle.iterdir() if path.is_dir()):
        folder = target / source.name
        folder.mkdir(parents=True)
        for path in source.glob("*.json"):
            shutil.copyfile(path, folder / path.name)
        with np.load(source / "reference_draws.npz", allow_pickle=False) as archive:
            names, draws = [str(name) for name in archive["names"]], archive["draws"]
        chains = [{name: chain[index].tolist() for index, name in enumerate(names)} for chain in draws]
        (folder / "reference_draws.json").write_text(json.dumps(chains))
    return target


@pytest.fixture(scope="session")
def posteriordb_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A posteriordb root holding the five bundled posteriors (tests/data/posteriordb), for ``load_posterior``.

    Needs no shared data folder: the tests of the five posteriors never skip.
    """
    return materialize_posteriordb(BUNDLED_POSTERIORDB, tmp_path_factory.mktemp("posteriordb"))
