"""Scale-out (issue 14): data-parallel VAE training over processes, and VSBC replications over a Dask cluster.

**(a) VAE images per second with 1 and 2 processes** (:func:`ppvi.data_parallel.launch`, PyTorch's
DistributedDataParallel): the MLP 784-400-20 Bernoulli VAE of ``benchmarks/vae_throughput.py`` on MNIST-sized
random binary images (60,000 x 28 x 28; throughput does not depend on the pixel values), float32, Adam, each
process drawing its own minibatch of ``--batch-size`` images per step (so ``R`` processes see ``R`` times the
images per step: weak scaling). CPU processes talk over ``gloo``, each with ``cpus // R`` torch threads by default
(the same total threads for every row); with two or more GPUs, ``nccl`` rows (one GPU per process) follow.
Images per second count all processes, from the first joint check (step 50) to the last step, so process
start-up, validation and DDP's set-up are excluded; the row ``ppvi.fit`` is the single-process path
(``strategy="single"``) with all the threads, its training loop timed (``TrainingResult.seconds``).

**(b) VSBC, eight schools non-centred, M = 10,000 replications** on a local Dask cluster
(``LocalCluster(n_workers=k, threads_per_worker=t, processes=True)``) of 1, 2 and 4 workers: ``ppvi.vsbc(...,
cluster=client)`` shards the replications over the workers. Speed-up against the one-worker cluster, and against
one process (no cluster) with the same total threads ``k * t``. Cluster start-up is not timed; the per-shard
table of the largest cluster is printed.

Usage::

    python benchmarks/scale_out.py                 # both parts, full size
    python benchmarks/scale_out.py --quick         # a quick look (fewer steps, M = 1000, 1 and 2 workers)
    python benchmarks/scale_out.py --part vae --steps 500 --batch-size 256
    python benchmarks/scale_out.py --part vsbc --workers 1 2 4 --threads-per-worker 1

Prints the machine and one table per part; writes nothing else.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time

import torch

import ppvi
from ppvi import data_parallel
from ppvi.models import eight_schools
from ppvi.models.vae import VAE

#: MNIST's training set size and image shape; the network of Kingma & Welling (2014) and pytorch/examples.
NUM_IMAGES, IMAGE_SHAPE = 60_000, (28, 28)
LATENT_DIM, HIDDEN_DIM = 20, 400
LEARNING_RATE = 1e-3
#: Fraction of black pixels in the random images (about MNIST's mean pixel).
PIXEL_PROBABILITY = 0.13


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = ", ".join(sorted({torch.cuda.get_device_name(i) for i in range(gpus)})) if gpus else "none"
    return (f"{cpu_name()}; {available_cpus()} CPUs available; {gpus} GPUs ({names}); {platform.system()} "
            f"{platform.release()}; Python {platform.python_version()}, torch {torch.__version__}")


# -- (a) VAE, data-parallel --------------------------------------------------------------------------------------
def vae_images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.bernoulli(torch.full((NUM_IMAGES, *IMAGE_SHAPE), PIXEL_PROBABILITY), generator=generator)


def ddp_rate(images: torch.Tensor, processes: int, backend: str, batch_size: int, steps: int,
             threads: int | None) -> tuple[float, float]:
    """(images per second of all processes together, wall seconds of the whole launch)."""
    torch.manual_seed(0)
    vae = VAE(IMAGE_SHAPE, LATENT_DIM, HIDDEN_DIM)
    fit = data_parallel.launch(processes, vae.model, vae, images, batch_size=batch_size, steps=steps,
                               learning_rate=LEARNING_RATE, backend=backend, threads_per_process=threads)
    return fit.images_per_second, fit.seconds


def single_rate(images: torch.Tensor, batch_size: int, steps: int, threads: int) -> float:
    """Images per second of ``ppvi.fit``'s training loop (``strategy="single"``) with ``threads`` threads."""
    from vae_throughput import training_loop_seconds  # the loop's time, as the VAE throughput benchmark takes it

    from ppvi.amortized import AmortizedELBO

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with training_loop_seconds() as loop_seconds:
            torch.manual_seed(0)
            vae = VAE(IMAGE_SHAPE, LATENT_DIM, HIDDEN_DIM)
            ppvi.fit(vae.model, images, guide=vae, subsample_size=batch_size, steps=steps, dtype="float32",
                     device="cpu", elbo=AmortizedELBO(), learning_rate=LEARNING_RATE, progress=False, seed=0)
    finally:
        torch.set_num_threads(previous)
    return steps * batch_size / loop_seconds[-1]


def vae_part(arguments: argparse.Namespace) -> None:
    cpus = available_cpus()
    images = vae_images()
    print(f"\n(a) VAE 784-{HIDDEN_DIM}-{LATENT_DIM} Bernoulli, float32, {NUM_IMAGES} images, "
          f"batch {arguments.batch_size} per process, {arguments.steps} steps "
          f"(DDP rates from step {data_parallel.DEFAULT_CHECK_INTERVAL} on)")
    width = len("ppvi.fit, one process (strategy='single')")
    print(f"{'run':{width}} | device | processes | threads/process | images/s | speed-up vs 1 process", flush=True)

    def row(name: str, device: str, processes: int, threads: int | None, rate: float, speedup: float | None):
        print(f"{name:{width}} | {device:6} | {processes:9} | {threads if threads else '-':>15} | {rate:8.0f} | "
              f"{'' if speedup is None else f'{speedup:.2f}x'}", flush=True)

    threads = arguments.threads or cpus
    row("ppvi.fit, one process (strategy='single')", "cpu", 1, threads,
        single_rate(images, arguments.batch_size, arguments.steps, threads), None)
    base = None
    for processes in arguments.processes:
        threads = arguments.threads or max(1, cpus // processes)
        rate, _ = ddp_rate(images, processes, "gloo", arguments.batch_size, arguments.steps, threads)
        base = rate if base is None else base
        row(f"DDP gloo, {processes} process{'es' if processes > 1 else ''}", "cpu", processes, threads, rate,
            rate / base)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus >= 2:
        base = None
        for processes in [count for count in arguments.processes if count <= gpus]:
            rate, _ = ddp_rate(images, processes, "nccl", arguments.batch_size, arguments.steps, None)
            base = rate if base is None else base
            row(f"DDP nccl, {processes} GPU{'s' if processes > 1 else ''}", "cuda", processes, None, rate, rate / base)
    elif gpus == 1:
        print("one GPU: the nccl rows need two or more (one GPU per process); skipped")


# -- (b) VSBC on a Dask cluster ----------------------------------------------------------------------------------
def vsbc_seconds(num_simulations: int, client=None) -> tuple[float, object]:
    sigma, _ = eight_schools.data(torch.float64)
    start = time.perf_counter()
    result = ppvi.vsbc(eight_schools.noncentered, sigma, observed="y", num_simulations=num_simulations, seed=0,
                       device="cpu", cluster=client)
    return time.perf_counter() - start, result


def vsbc_part(arguments: argparse.Namespace) -> None:
    from dask.distributed import Client, LocalCluster

    M, per_worker = arguments.num_simulations, arguments.threads_per_worker
    print(f"\n(b) VSBC eight schools non-centred, mean-field, M = {M}; Dask LocalCluster, processes, "
          f"{per_worker} thread(s) per worker")
    one_worker, last_shards = None, None
    print("workers | seconds | speed-up vs 1 worker | one process, same threads: seconds | speed-up vs it", flush=True)
    for workers in arguments.workers:
        with LocalCluster(n_workers=workers, threads_per_worker=per_worker, processes=True, dashboard_address=":0",
                          silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
            seconds, result = vsbc_seconds(M, client)
        last_shards = result.shards
        one_worker = seconds if one_worker is None else one_worker
        previous = torch.get_num_threads()
        torch.set_num_threads(workers * per_worker)
        try:
            local_seconds, _ = vsbc_seconds(M)
        finally:
            torch.set_num_threads(previous)
        print(f"{workers:7} | {seconds:7.1f} | {one_worker / seconds:20.2f}x | {local_seconds:34.1f} | "
              f"{local_seconds / seconds:.2f}x", flush=True)
    if last_shards is not None:
        print(f"\nshards of the {arguments.workers[-1]}-worker run:")
        print(last_shards.to_string(index=False))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["vae", "vsbc", "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="fewer steps and replications, 1 and 2 workers")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="(a) process counts")
    parser.add_argument("--batch-size", type=int, default=128, help="(a) images per process per step")
    parser.add_argument("--steps", type=int, default=None, help="(a) steps (default 500; --quick 200)")
    parser.add_argument("--threads", type=int, default=None,
                        help="(a) torch threads per process (default: CPUs available // processes)")
    parser.add_argument("--num-simulations", type=int, default=None, help="(b) M (default 10,000; --quick 1000)")
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="(b) worker counts (default 1 2 4)")
    parser.add_argument("--threads-per-worker", type=int, default=1, help="(b) threads per Dask worker")
    arguments = parser.parse_args(argv)
    # full sizes: 500 steps is ten check intervals of the VAE rate; M = 10,000 is the VSBC size
    arguments.steps = arguments.steps or (200 if arguments.quick else 500)
    arguments.num_simulations = arguments.num_simulations or (1000 if arguments.quick else 10_000)
    arguments.workers = arguments.workers or ([1, 2] if arguments.quick else [1, 2, 4])
    print(f"machine: {machine()}")
    if arguments.part in ("vae", "both"):
        vae_part(arguments)
    if arguments.part in ("vsbc", "both"):
        vsbc_part(arguments)


if __name__ == "__main__":
    main()
