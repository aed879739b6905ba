"""Beyond one process: VSBC sharded on a Dask cluster, and a VAE trained data-parallel with PyTorch DDP.

Two independent demonstrations, each on this one machine, each written so the same code runs on a cluster:

``python examples/cluster.py dask [--workers 2] [--num-simulations 1000]``
    Starts a local Dask cluster of ``--workers`` processes, runs VSBC of mean-field ADVI on eight schools with
    ``cluster=client`` (the replications cut into shards, one batched run per worker), prints the table, which
    worker ran which shard and how long it took, and checks the result against the same seed run in this process
    (they are equal: every replication draws from its own random stream). On a cluster, replace ``LocalCluster``
    by the scheduler you already run: ``Client("tcp://scheduler:8786")``, ``dask_jobqueue.SLURMCluster`` or the
    Dask Kubernetes operator's ``KubeCluster`` (see ``docs/user_guide/scale_out.rst``).

``python examples/cluster.py ddp [--processes 2] [--steps 300]``
    Trains a small VAE on scikit-learn's 8x8 digits with ``strategy="ddp"`` in ``--processes`` processes spawned
    from Python (:func:`ppvi.data_parallel.launch`, gloo on CPUs), prints the ELBO and images per second.

``torchrun --nproc-per-node=2 examples/cluster.py ddp``
    The same training with the processes started by ``torchrun`` (each runs this script; rank 0 prints). Across
    nodes: ``torchrun --nnodes=2 --node-rank=K --rdzv-endpoint=HOST:29500 --nproc-per-node=G examples/cluster.py
    ddp``.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

import ppvi
from ppvi.models import eight_schools, vae


def run_dask(workers: int = 2, num_simulations: int = 1000, steps: int | None = None, seed: int = 0) -> dict:
    """VSBC of eight schools on a local Dask cluster of ``workers`` processes, and the same run in this process.

    Returns
    -------
    dict
        ``sharded`` and ``local`` (the two :class:`ppvi.VSBCResult`), and ``equal`` (whether their p-values agree
        to float tolerance).
    """
    from distributed import Client, LocalCluster

    sigma, _ = eight_schools.data()
    options = dict(observed="y", num_simulations=num_simulations, steps=steps, seed=seed, device="cpu")
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        sharded = ppvi.vsbc(eight_schools.noncentered, sigma, cluster=client, **options)
    local = ppvi.vsbc(eight_schools.noncentered, sigma, **options)
    equal = all(
        np.allclose(sharded.p_values[name], local.p_values[name], rtol=1e-9, atol=1e-12) for name in local.p_values
    )
    print(sharded.to_dataframe().round(4).to_string())
    print()
    print(sharded.shards.to_string(index=False))
    print(f"\nsharded on {workers} workers: {sharded.seconds:.1f} s; in this process: {local.seconds:.1f} s; "
          f"same replications: {equal}")
    return {"sharded": sharded, "local": local, "equal": equal}


def run_ddp(processes: int = 2, steps: int = 300, batch_size: int = 64, seed: int = 0):
    """A VAE on the 8x8 digits, data-parallel over ``processes`` ranks (under ``torchrun`` when launched by it).

    Returns
    -------
    ppvi.data_parallel.DataParallelFit or None
        Rank 0's fit (``None`` on the other ranks of a ``torchrun`` job, which hold the same fit).
    """
    from sklearn.datasets import load_digits

    from ppvi.data_parallel import is_distributed_rank

    images = torch.as_tensor(load_digits().images / 16.0, dtype=torch.float32).round()  # 0/1 pixels
    under_torchrun = is_distributed_rank()
    started = time.perf_counter()
    fit = vae.train(images, latent_dim=2, hidden_dim=64, batch_size=batch_size, steps=steps, seed=seed,
                    strategy="ddp", world_size=None if under_torchrun else processes, device="cpu")
    seconds = time.perf_counter() - started
    ranks = int(os.environ["WORLD_SIZE"]) if under_torchrun else processes
    if int(os.environ.get("RANK", "0")) != 0:
        return None  # every rank holds the same fit; rank 0 reports
    rate = steps * batch_size * ranks / seconds
    print(f"VAE on {images.shape[0]} digits, {ranks} processes, {steps} steps of {batch_size} images each: "
          f"final ELBO {fit.elbo[-50:].mean():.1f}, {rate:.0f} images/s ({seconds:.1f} s, start-up included)")
    return fit


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    dask = commands.add_parser("dask", help="VSBC sharded on a local Dask cluster")
    dask.add_argument("--workers", type=int, default=2)
    dask.add_argument("--num-simulations", type=int, default=1000)
    dask.add_argument("--steps", type=int, default=None, help="fixed steps per replication (default: its own rule)")
    dask.add_argument("--seed", type=int, default=0)
    ddp = commands.add_parser("ddp", help="a VAE trained data-parallel (spawned, or under torchrun)")
    ddp.add_argument("--processes", type=int, default=2)
    ddp.add_argument("--steps", type=int, default=300)
    ddp.add_argument("--batch-size", type=int, default=64)
    ddp.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args(argv)
    if arguments.command == "dask":
        return run_dask(arguments.workers, arguments.num_simulations, arguments.steps, arguments.seed)
    return run_ddp(arguments.processes, arguments.steps, arguments.batch_size, arguments.seed)


if __name__ == "__main__":
    main()
