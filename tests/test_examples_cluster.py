"""examples/cluster.py runs both of its demonstrations end to end at tiny settings: VSBC sharded on a two-worker
local Dask cluster equals the same seed's run in one process, and the data-parallel VAE trains in two spawned
gloo processes to a finite ELBO that improves on its start."""

from __future__ import annotations

import numpy as np
import pytest

from examples import load_example

pytest.importorskip("distributed", reason="examples/cluster.py's Dask part needs pip install 'ppvi[distributed]'")


def test_dask_demonstration_gives_the_unsharded_replications(capsys):
    outcome = load_example("cluster").main(["dask", "--workers", "2", "--num-simulations", "70", "--steps", "60"])
    assert outcome["equal"]
    assert int(outcome["sharded"].shards["replications"].sum()) == 70
    printed = capsys.readouterr().out
    assert "worker" in printed and "same replications: True" in printed


def test_ddp_demonstration_trains_in_two_processes(capsys):
    fit = load_example("cluster").main(["ddp", "--processes", "2", "--steps", "60", "--batch-size", "32"])
    elbo = np.asarray(fit.elbo)
    assert elbo.shape == (60,) and np.isfinite(elbo).all()
    assert elbo[-10:].mean() > elbo[:10].mean()  # it learned something
    assert "2 processes" in capsys.readouterr().out
