"""VAE test log-likelihood on dynamically binarized MNIST within a stated training budget, next to the literature.

Model: ``models.vae.VAE``, MLP encoder and decoder with one hidden layer of ``--hidden-dim`` ReLU units (Kingma &
Welling 2014's architecture; Burda et al. used two tanh layers of 200 and 100 for ``K = 50``), ``--latent-dim``
Gaussian latents, Bernoulli decoder; trained by ``models.vae.train`` (``ppvi.fit`` with ``AmortizedELBO``, Adam
1e-3, batch ``--batch-size``) for as many steps as fit in ``--seconds`` of training (measured on a short
calibration fits first; the budget covers the main fit).

Binarization: training images are *dynamically* binarized (a fresh Bernoulli draw of every pixel, with its grey
level as probability, each time an image enters a minibatch; Burda et al. 2016, section 5.1); the test images
are binarized once, with numpy seed ``--seed + 1`` (``ppvi.data.binarize``), and scored by importance sampling with
``L = --samples`` draws from the encoder (``ppvi.amortized.log_likelihood``: the IWAE bound with k = L).

Literature (Burda, Grosse & Salakhutdinov 2016, "Importance weighted autoencoders", Table 1, dynamically
binarized MNIST, test NLL with 5000 samples, after 3280 passes over the data): VAE, one stochastic layer, k = 1:
86.76 nats.

Run: ``python benchmarks/vae_mnist.py --seconds 600 --device cuda`` (the stated GPU budget: at most 10 minutes),
or a small CPU check: ``python benchmarks/vae_mnist.py --seconds 60 --test-images 500 --samples 100``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ppvi.amortized import log_likelihood  # noqa: E402
from ppvi.data import binarize, mnist  # noqa: E402
from ppvi.models import vae as vae_module  # noqa: E402

#: Burda et al. (2016), Table 1: VAE with one stochastic layer, k = 1, dynamically binarized MNIST.
LITERATURE_NLL = 86.76
LITERATURE = "Burda, Grosse & Salakhutdinov 2016, Table 1 (VAE, 1 stochastic layer, k=1; 3280 passes)"
#: Steps of the two calibration fits whose difference in time is that of the extra steps (start-up cancels), run
#: after a warm-up fit of ``WARMUP_STEPS`` that pays the one-time costs (lazy initialisation, first allocations).
CALIBRATION_STEPS = (20, 120)
WARMUP_STEPS = 5
#: Fraction of the budget given to the main fit: the rest absorbs start-up and the calibration's error.
BUDGET_FRACTION = 0.9


def default_mnist() -> Path:
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist_idx"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mnist", type=Path, default=default_mnist(), help="MNIST IDX folder (or npz)")
    parser.add_argument("--seconds", type=float, default=600.0, help="training budget (wall seconds)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--latent-dim", type=int, default=50)
    parser.add_argument("--hidden-dim", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=1000, help="L of the importance-sampling estimate")
    parser.add_argument("--test-images", type=int, default=10_000, help="score only the first N test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    arguments = parser.parse_args(argv)
    if arguments.threads:
        torch.set_num_threads(arguments.threads)

    data = mnist(arguments.mnist)
    train_images = torch.tensor(data.train_images)
    test_images = torch.tensor(binarize(data.test_images[: arguments.test_images], seed=arguments.seed + 1))
    options = dict(latent_dim=arguments.latent_dim, hidden_dim=arguments.hidden_dim, dynamic_binarization=True,
                   batch_size=arguments.batch_size, learning_rate=1e-3, device=arguments.device, seed=arguments.seed)
    vae_module.train(train_images, steps=WARMUP_STEPS, **options)
    short, long = (vae_module.train(train_images, steps=steps, **options) for steps in CALIBRATION_STEPS)
    extra_steps = CALIBRATION_STEPS[1] - CALIBRATION_STEPS[0]
    # the floor (half the long fit's mean time per step, start-up included) guards against timing noise
    seconds_per_step = max((long.seconds - short.seconds) / extra_steps, 0.5 * long.seconds / CALIBRATION_STEPS[1])
    steps = max(1, int(BUDGET_FRACTION * arguments.seconds / seconds_per_step))
    fit = vae_module.train(train_images, steps=steps, **options)
    vae = fit.guide
    device = next(vae.parameters()).device
    started = time.perf_counter()
    estimate = log_likelihood(vae.model, vae, test_images.to(device), num_samples=arguments.samples,
                              chunk_size=min(100, arguments.samples), batch_size=500, seed=arguments.seed)
    evaluation_seconds = time.perf_counter() - started
    passes = steps * arguments.batch_size / train_images.shape[0]
    print(f"device {fit.device}; {steps} steps of batch {arguments.batch_size} ({passes:.1f} passes over the "
          f"60,000 training images) in {fit.seconds:.0f} s (budget {arguments.seconds:.0f} s); "
          f"evaluation {evaluation_seconds:.0f} s")
    print(f"{'':40} {'test NLL (nats)':>16} {'-ELBO':>8}  how")
    print(f"{'ppvi VAE 784-' + str(arguments.hidden_dim) + '-' + str(arguments.latent_dim):40} "
          f"{-estimate.log_likelihood:>16.2f} {-estimate.elbo:>8.2f}  IS, L={arguments.samples}, "
          f"{test_images.shape[0]} test images, test set binarized with seed {arguments.seed + 1}")
    print(f"{'literature':40} {LITERATURE_NLL:>16.2f} {'':>8}  {LITERATURE}")
    return {"nll": -estimate.log_likelihood, "negative_elbo": -estimate.elbo, "steps": steps, "passes": passes,
            "train_seconds": fit.seconds, "evaluation_seconds": evaluation_seconds}


if __name__ == "__main__":
    main()
