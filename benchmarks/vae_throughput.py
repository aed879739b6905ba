"""VAE training throughput (images/s): a hand-written eager PyTorch loop, plain Pyro SVI and ``ppvi.fit``.

The network is the MLP 784-400-20 of Kingma & Welling (2014) and of the pytorch/examples VAE, with a Bernoulli
decoder, on MNIST-sized binary images (60,000 x 28 x 28; throughput does not depend on pixel values, so random
ones stand in for MNIST), float32, Adam with learning rate 1e-3, minibatches drawn by ``randperm`` on the
device, as Pyro's subsampling plate draws them. The three, at each batch size:

- **raw**: the canonical eager loop (encode, reparameterised draw, summed BCE-with-logits plus the closed-form
  Gaussian KL, ``zero_grad`` / ``backward`` / ``Adam.step``), with the very same encoder and decoder modules;
- **pyro**: Pyro's VAE tutorial: ``pyro.module`` in model and guide, ``SVI(..., Adam, Trace_ELBO()).step``;
- **ppvi**: ``ppvi.fit(vae.model, images, guide=vae, subsample_size=B, steps=S, elbo=AmortizedELBO())``: the whole
  call, start-up, the per-step loss buffer and the final iterate averaging included.

Each is timed for ``--steps`` steps after ``--warmup`` untimed ones (for ppvi, an untimed short fit first), the
three interleaved ``--repeats`` times; the median is reported.

Run: ``python benchmarks/vae_throughput.py [--device cpu|cuda] [--threads 2] [--steps 200] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO

import ppvi  # noqa: E402
from ppvi import training  # noqa: E402
from ppvi.amortized import AmortizedELBO  # noqa: E402
from ppvi.models.vae import VAE  # noqa: E402

#: MNIST's training set size and image shape.
NUM_IMAGES, IMAGE_SHAPE = 60_000, (28, 28)
LATENT_DIM, HIDDEN_DIM = 20, 400
LEARNING_RATE = 1e-3


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def raw_loop(images: torch.Tensor, batch_size: int, steps: int, warmup: int) -> float:
    """Seconds for ``steps`` steps of the hand-written loop."""
    vae = VAE(IMAGE_SHAPE, LATENT_DIM, HIDDEN_DIM).to(images.device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=LEARNING_RATE)

    def step() -> torch.Tensor:
        index = torch.randperm(images.shape[0], device=images.device)[:batch_size]
        batch = images[index]
        loc, scale = vae.encode(batch)
        latent = loc + scale * torch.randn_like(loc)
        logits = vae.decoder(latent)
        reconstruction = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch, reduction="sum")
        kl = 0.5 * (loc.square() + scale.square() - 1.0 - 2.0 * scale.log()).sum()
        loss = reconstruction + kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach()

    for _ in range(warmup):
        step()
    synchronize(images.device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(images.device)
    return time.perf_counter() - start


def pyro_svi(images: torch.Tensor, batch_size: int, steps: int, warmup: int) -> float:
    """Seconds for ``steps`` steps of Pyro's SVI, written as in Pyro's VAE tutorial."""
    pyro.clear_param_store()
    vae = VAE(IMAGE_SHAPE, LATENT_DIM, HIDDEN_DIM).to(images.device)

    def model(x, subsample_size):
        pyro.module("decoder", vae.decoder)
        vae.model(x, subsample_size)

    def guide(x, subsample_size):
        pyro.module("encoder", vae.encoder)
        vae.guide(x, subsample_size)

    svi = SVI(model, guide, pyro.optim.Adam({"lr": LEARNING_RATE}), Trace_ELBO())
    for _ in range(warmup):
        svi.step(images, batch_size)
    synchronize(images.device)
    start = time.perf_counter()
    for _ in range(steps):
        svi.step(images, batch_size)
    synchronize(images.device)
    return time.perf_counter() - start


@contextlib.contextmanager
def training_loop_seconds() -> Iterator[list[float]]:
    """Inside the block, every :func:`ppvi.training.run` appends its ``TrainingResult.seconds`` (the training loop
    alone: the data check, the structure trace and the first, validated evaluation excluded) to the list yielded."""
    seconds: list[float] = []
    original = training.run

    def timed_run(*args, **kwargs):
        result = original(*args, **kwargs)
        seconds.append(result.seconds)
        return result

    training.run = timed_run
    try:
        yield seconds
    finally:
        training.run = original


def ppvi_fit(images: torch.Tensor, batch_size: int, steps: int, warmup: int) -> tuple[float, float]:
    """Seconds of ``ppvi.fit``'s training loop and of the whole call, ``steps`` steps (after an untimed fit of
    ``warmup`` steps). The loop's time is ``TrainingResult.seconds`` of :func:`ppvi.training.run`: start-up (the
    data check, the structure trace, the first, validated evaluation) excluded; the final read-back included."""

    def fit(num_steps: int) -> None:
        vae = VAE(IMAGE_SHAPE, LATENT_DIM, HIDDEN_DIM)
        ppvi.fit(vae.model, images, guide=vae, subsample_size=batch_size, steps=num_steps, dtype="float32",
                 device=images.device, elbo=AmortizedELBO(), learning_rate=LEARNING_RATE, progress=False)

    with training_loop_seconds() as loop_seconds:
        fit(max(warmup, 2))
        synchronize(images.device)
        start = time.perf_counter()
        fit(steps)
        synchronize(images.device)
    return loop_seconds[-1], time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args(argv)
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    device = torch.device(arguments.device)
    generator = torch.Generator().manual_seed(0)
    images = torch.bernoulli(torch.full((NUM_IMAGES, *IMAGE_SHAPE), 0.13), generator=generator).to(device)
    runners = {"raw": raw_loop, "pyro": pyro_svi, "ppvi": ppvi_fit}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"VAE 784-{HIDDEN_DIM}-{LATENT_DIM} Bernoulli, float32, {name}, torch {torch.__version__}, "
          f"pyro {pyro.__version__}; {arguments.steps} timed steps, median of {arguments.repeats}")
    print("images/s; ppvi: its training loop (start-up excluded), and in brackets the whole fit call")
    print(f"{'batch':>6} {'raw':>9} {'pyro':>9} {'ppvi':>9} {'(call)':>9} {'pyro/raw':>9} {'ppvi/raw':>9}")
    for batch_size in arguments.batch_sizes:
        seconds: dict[str, list[float]] = {"raw": [], "pyro": [], "ppvi": [], "call": []}
        for _ in range(arguments.repeats):
            for key, runner in runners.items():
                pyro.set_rng_seed(0)
                outcome = runner(images, batch_size, arguments.steps, arguments.warmup)
                if key == "ppvi":
                    seconds["ppvi"].append(outcome[0])
                    seconds["call"].append(outcome[1])
                else:
                    seconds[key].append(outcome)
        rate = {key: arguments.steps * batch_size / statistics.median(values) for key, values in seconds.items()}
        print(f"{batch_size:>6} {rate['raw']:>9.0f} {rate['pyro']:>9.0f} {rate['ppvi']:>9.0f} {rate['call']:>9.0f} "
              f"{rate['pyro'] / rate['raw']:>9.2f} {rate['ppvi'] / rate['raw']:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
