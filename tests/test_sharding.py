"""ppvi.sharding: VSBC and SBC on a two-worker local Dask cluster give exactly the replications of the unsharded
run with the same seed, say which worker ran which shard, and survive a worker that dies."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import ppvi
from ppvi.batched import RANDOM_BLOCK_SIZE, ReplicationStreams
from ppvi.models import eight_schools
from ppvi.sharding import shard_bounds

distributed = pytest.importorskip(
    "distributed", reason="the sharded path needs Dask's distributed scheduler: pip install 'ppvi[distributed]'"
)

#: Replications: three random blocks, so three shards of 64, 64 and 22 (a partial last block).
NUM_SIMULATIONS = 2 * RANDOM_BLOCK_SIZE + 22


def normal_model(n, y=None):
    """mu ~ N(0, 2), y_i ~ N(mu, 1); pickled by value (``cloudpickle.register_pickle_by_value``) to the workers,
    as a model in a user's script would be."""
    mu = pyro.sample("mu", dist.Normal(torch.zeros(()), 2.0))
    with pyro.plate("data", n):
        return pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


@pytest.fixture(scope="module")
def client():
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # Processes, not threads: the shards travel pickled, as they do to a real cluster. No dashboard: it needs
    # bokeh and a free port, neither of which the test is about.
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=50
    )
    with distributed.Client(cluster) as connection:
        yield connection
    cluster.close()
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_shard_bounds_cover_the_replications_at_block_boundaries():
    assert shard_bounds(NUM_SIMULATIONS, 3) == [(0, 64), (64, 128), (128, NUM_SIMULATIONS)]
    assert shard_bounds(NUM_SIMULATIONS, 2) == [(0, 128), (128, NUM_SIMULATIONS)]
    assert shard_bounds(10, 4) == [(0, 10)]  # one block: one shard
    for total, shards in [(1000, 7), (5, 1), (64 * 9, 4)]:
        bounds = shard_bounds(total, shards)
        assert bounds[0][0] == 0 and bounds[-1][1] == total
        assert all(stop == following for (_, stop), (following, _) in zip(bounds, bounds[1:], strict=False))
        assert all(first % RANDOM_BLOCK_SIZE == 0 for first, _ in bounds)
    with pytest.raises(ValueError, match="num_shards must be a positive integer"):
        shard_bounds(100, 0)


def test_replication_streams_do_not_depend_on_the_batch():
    streams = ReplicationStreams(3, 0, "cpu", torch.float64)
    alone = ReplicationStreams(3, 0, "cpu", torch.float64)
    everything = streams.normal((2,), torch.arange(200), (3,))
    some = alone.normal((2,), torch.tensor([5, 70, 199]), (3,))
    torch.testing.assert_close(some, everything[:, [5, 70, 199]], rtol=0, atol=0)
    other_purpose = ReplicationStreams(3, 1, "cpu", torch.float64).normal((2,), torch.arange(200), (3,))
    assert not torch.equal(other_purpose, everything)



def test_chunked_replication_streams_do_not_depend_on_the_batch():
    """Several steps drawn per generator call, the batch shrinking from all 200 replications to three: a
    consecutive batch (a view of the drawn chunk) and a scattered one (a gather) each get the values the full
    batch got, in the streams' dtype and contiguous."""

    def streams():
        return ReplicationStreams(3, 0, "cpu", torch.float64, draws_per_call=3)

    everything, consecutive, scattered = streams(), streams(), streams()
    few = torch.tensor([5, 70, 199])
    for step in range(5):
        full = everything.normal((2,), torch.arange(200) if step < 2 else few, (3,))
        kept = scattered.normal((2,), few, (3,))
        assert kept.dtype == torch.float64 and kept.is_contiguous()
        torch.testing.assert_close(kept, full[:, [5, 70, 199]] if step < 2 else full, rtol=0, atol=0)
        if step < 2:
            middle = consecutive.normal((2,), torch.arange(64, 128), (3,))
            assert middle.is_contiguous()
            torch.testing.assert_close(middle, full[:, 64:128], rtol=0, atol=0)

def _same_replications(sharded, local, keys):
    np.testing.assert_array_equal(sharded.converged, local.converged)
    np.testing.assert_array_equal(sharded.steps, local.steps)
    np.testing.assert_array_equal(sharded.laplace_succeeded, local.laplace_succeeded)
    for name in local.theta0:
        np.testing.assert_array_equal(sharded.theta0[name], local.theta0[name])
    for key in keys:
        for name, value in getattr(local, key).items():
            # Float tolerance: a batched matmul may block differently for 64 rows than for 150.
            np.testing.assert_allclose(getattr(sharded, key)[name], value, rtol=1e-9, atol=1e-12)


def test_sharded_vsbc_equals_the_unsharded_run(client):
    sigma, _ = eight_schools.data()
    options = dict(observed="y", num_simulations=NUM_SIMULATIONS, seed=11, device="cpu")
    local = ppvi.vsbc(eight_schools.noncentered, sigma, **options)
    sharded = ppvi.vsbc(eight_schools.noncentered, sigma, **options, cluster=client, num_shards=3)
    _same_replications(sharded, local, ["p_values"])
    np.testing.assert_allclose(sharded.loc, local.loc, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(sharded.sd, local.sd, rtol=1e-9, atol=1e-12)
    shards = sharded.shards
    assert list(shards["first"]) == [0, 64, 128] and list(shards["replications"]) == [64, 64, 22]
    workers = set(client.scheduler_info()["workers"])
    assert set(shards["worker"]) <= workers and (shards["seconds"] > 0).all()
    assert list(local.shards["worker"]) == ["local"] and int(local.shards["replications"].sum()) == NUM_SIMULATIONS


def test_sharded_sbc_of_a_script_model_equals_the_unsharded_run(client):
    options = dict(observed="y", guide="fullrank", num_simulations=NUM_SIMULATIONS, num_draws=19, seed=4, device="cpu")
    local = ppvi.sbc(normal_model, 5, **options)
    sharded = ppvi.sbc(normal_model, 5, **options, cluster=client)  # one shard per worker: 128 + 22
    _same_replications(sharded, local, ["ranks"])
    assert list(sharded.shards["replications"]) == [128, 22]


class _DieOnceTask:
    """Wraps a shard task: the first attempt of the shard at ``first == 0`` kills its worker process (as an
    out-of-memory kill would); the marker file makes the rerun go through."""

    def __init__(self, task, marker: str):
        self.task, self.marker = task, marker

    def __call__(self, first, data, theta0):
        if first == 0 and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)
        return self.task(first, data, theta0)


@pytest.mark.slow
def test_a_shard_whose_worker_dies_is_rerun_with_the_same_result(client, tmp_path, monkeypatch):
    import ppvi.sharding

    marker = str(tmp_path / "died")
    original = ppvi.sharding.run_sharded

    def dying(cluster, task, *args, **kwargs):
        return original(cluster, _DieOnceTask(task, marker), *args, **kwargs)

    monkeypatch.setattr(ppvi.sharding, "run_sharded", dying)
    options = dict(observed="y", num_simulations=NUM_SIMULATIONS, steps=200, seed=2, device="cpu")
    sharded = ppvi.vsbc(normal_model, 5, **options, cluster=client)
    assert os.path.exists(marker)  # a worker did die
    local = ppvi.vsbc(normal_model, 5, **options)
    _same_replications(sharded, local, ["p_values"])


def test_a_cluster_that_is_not_a_dask_client_is_refused_by_name():
    with pytest.raises(TypeError, match="cluster must be a dask.distributed.Client"):
        ppvi.vsbc(normal_model, 5, observed="y", num_simulations=10, steps=10, cluster="tcp://scheduler:8786")
