"""Calibration sharded on a Dask cluster: the ``M`` replications of :func:`ppvi.vsbc` / :func:`ppvi.sbc` cut into
contiguous shards, each one batched run on a worker.

Dask is optional (``pip install ppvi[distributed]``) and imported only here, only when a ``cluster`` is given.
Shards are cut at multiples of :data:`ppvi.batched.RANDOM_BLOCK_SIZE`, so no random stream is drawn by two shards,
and each shard is submitted with ``retries``: a worker that dies has its shard rerun elsewhere, with the same
result, since a shard's random numbers depend only on the seed and its replications' indices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ppvi.batched import RANDOM_BLOCK_SIZE

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["shard_bounds", "run_sharded", "DEFAULT_RETRIES"]

#: Times Dask reruns a shard whose worker died (or whose task raised) before the error reaches the caller.
DEFAULT_RETRIES = 2


def shard_bounds(num_replications: int, num_shards: int) -> list[tuple[int, int]]:
    """``(first, stop)`` of ``num_shards`` contiguous shards covering ``0..num_replications``, as equal as blocks
    of :data:`~ppvi.batched.RANDOM_BLOCK_SIZE` allow (fewer shards when there are fewer blocks)."""
    if not isinstance(num_shards, int) or isinstance(num_shards, bool) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive integer, got {num_shards!r}")
    blocks = -(-num_replications // RANDOM_BLOCK_SIZE)
    num_shards = min(num_shards, blocks)
    edges = [round(k * blocks / num_shards) * RANDOM_BLOCK_SIZE for k in range(num_shards + 1)]
    edges[-1] = num_replications
    return [(first, stop) for first, stop in zip(edges[:-1], edges[1:], strict=True) if stop > first]


def _client(cluster) -> Client:
    try:
        from distributed import Client
    except ImportError as error:
        raise ImportError(
            "cluster= needs Dask's distributed scheduler: pip install 'ppvi[distributed]' (or dask[distributed])"
        ) from error
    if not isinstance(cluster, Client):
        raise TypeError(
            f"cluster must be a dask.distributed.Client, got {type(cluster).__name__}; for a local cluster: "
            "from distributed import Client, LocalCluster; cluster=Client(LocalCluster(n_workers=2))"
        )
    return cluster


def run_sharded(
    cluster: Client,
    task: Callable[[int, dict, dict], dict],
    data: dict[str, torch.Tensor],
    theta0: dict[str, torch.Tensor],
    num_replications: int,
    num_shards: int | None = None,
    retries: int = DEFAULT_RETRIES,
) -> list[dict]:
    """Run ``task(first, data[first:stop], theta0[first:stop])`` for every shard on ``cluster``; the outcomes in
    shard order.

    Parameters
    ----------
    cluster : dask.distributed.Client
        The cluster.
    task : callable
        Picklable; fits the replications ``first .. stop`` (global indices) and returns a dict.
    data, theta0 : dict of str to torch.Tensor
        All replications' simulated data and true values, leading dimension ``num_replications``.
    num_shards : int, optional
        Default: one per worker.
    retries : int
        Passed to ``Client.submit``.
    """
    client = _client(cluster)
    import cloudpickle  # Dask's own serializer of functions

    # Dask pickles a task with the standard pickle when it can, which sends the model by reference; cloudpickle
    # honours cloudpickle.register_pickle_by_value, which is how a model from a script file (not importable on
    # the workers) travels by value.
    payload = cloudpickle.dumps(task)
    if num_shards is None:
        num_shards = max(1, len(client.scheduler_info()["workers"]))
    futures = []
    for first, stop in shard_bounds(num_replications, num_shards):
        shard_data = {name: value[first:stop].cpu() for name, value in data.items()}
        shard_theta0 = {name: value[first:stop].cpu() for name, value in theta0.items()}
        futures.append(
            client.submit(_run_payload, payload, first, shard_data, shard_theta0, retries=retries, pure=False,
                          key=f"ppvi-shard-{first}-{stop}-{id(task)}")
        )
    return client.gather(futures)


def _run_payload(payload: bytes, first: int, data: dict, theta0: dict) -> dict:
    """On a worker: unpickle the task and run it on one shard."""
    import pickle

    try:
        task = pickle.loads(payload)
    except (ModuleNotFoundError, AttributeError) as error:
        raise RuntimeError(
            f"a Dask worker cannot load the model: {error}. Install the model's module on every worker (pip install "
            "it, or put it on the workers' PYTHONPATH), or send it by value: "
            "cloudpickle.register_pickle_by_value(the_module) before calling ppvi.vsbc/ppvi.sbc"
        ) from error
    return task(first, data, theta0)
