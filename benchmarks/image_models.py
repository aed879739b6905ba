"""The "learning to draw MNIST" ladder measured: test negative log-likelihood and sampling cost of every model.

Models (``models.image_baselines.fit_ladder``), all fitted on the same binary training images and scored on the
same binary test images, in nats per image (lower is better): independent Bernoulli pixels; naive Bayes
(class-conditional Bernoulli pixels, digits only: the static binarized MNIST has no labels); a mixture of
Bernoullis (MAP-EM); the Bayes net (fully visible sigmoid belief network, ``models.bayes_net``); pPCA (its bound
on dequantized images); the VAE (importance sampling, ``L = --samples``); PixelCNN (``models.pixelcnn``) and
PixelRNN with Row LSTM layers (``models.pixelrnn``). The networks trained by epochs keep their best epoch on the
validation images (digits: the last 20 % of the training split; MNIST: Larochelle & Murray's 10,000 ``valid``).

Sampling cost: wall seconds for one call drawing 64 images from each model, on ``--threads`` CPU threads: one
decoder pass for the VAE against ``H * W`` sequential network passes for PixelCNN and PixelRNN.

Published figures (MNIST only) are printed beside ours; see ``models.image_baselines.PUBLISHED_BINARIZED_MNIST``
for sources (some stated as recalled). Our networks are far smaller and trained far shorter than the papers'.

Run: ``python benchmarks/image_models.py --dataset digits`` (about 2 minutes on one CPU thread),
``python benchmarks/image_models.py --dataset digits --quick`` (seconds; what CI runs), or
``python benchmarks/image_models.py --dataset mnist`` (735 s on one thread of a busy 2-core Xeon, 2.8 GHz).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from ppvi.models import image_baselines  # noqa: E402
from ppvi.models.image_baselines import LadderSettings  # noqa: E402

#: Digits at small settings: every rung runs in seconds (for CI), the numbers mean little.
DIGITS_QUICK = LadderSettings(fvsbn_epochs=3, autoregressive_epochs=1, pixelcnn_channels=8, pixelcnn_layers=1,
                              pixelrnn_channels=8, pixelrnn_hidden=8, pixelrnn_layers=1, vae_steps=100,
                              importance_samples=50)
#: Digits at the stated settings (LadderSettings' defaults).
DIGITS = LadderSettings()
#: MNIST within about 15 minutes of one CPU thread (735 s measured): small networks, PixelCNN and PixelRNN on the
#: first 20,000 training images for one epoch, the Bayes net for 8 epochs, the VAE for 3,000 steps of 128 images
#: (7.7 passes).
MNIST = LadderSettings(fvsbn_epochs=8, autoregressive_epochs=1, autoregressive_train_images=20_000,
                       pixelcnn_channels=16, pixelcnn_layers=3, pixelrnn_channels=16, pixelrnn_hidden=16,
                       pixelrnn_layers=1, vae_latent_dim=20, vae_hidden_dim=200, vae_steps=3000,
                       vae_learning_rate=1e-3, learning_rate=3e-3, importance_samples=1000)
#: MNIST at small settings (a minute or two): a check that the pipeline runs at full image size.
MNIST_QUICK = replace(MNIST, fvsbn_epochs=1, autoregressive_train_images=1000, pixelcnn_channels=8,
                      pixelcnn_layers=1, pixelrnn_channels=8, pixelrnn_hidden=8, vae_steps=200,
                      importance_samples=50)


def machine() -> str:
    """CPU model, core count, platform, torch version and threads: where the numbers came from."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{model}; {os.cpu_count()} logical cores; {platform.system()} {platform.release()}; Python "
            f"{platform.python_version()}; torch {torch.__version__}, {torch.get_num_threads()} thread(s)")


def settings_for(dataset: str, quick: bool, seed: int = 0) -> LadderSettings:
    """The settings above for ``dataset`` (``"digits"`` or ``"mnist"``)."""
    chosen = {("digits", False): DIGITS, ("digits", True): DIGITS_QUICK, ("mnist", False): MNIST,
              ("mnist", True): MNIST_QUICK}[dataset, quick]
    return replace(chosen, seed=seed)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=("digits", "mnist"), default="digits")
    parser.add_argument("--quick", action="store_true", help="small settings (CI)")
    parser.add_argument("--mnist", type=Path, default=None,
                        help="binarized_mnist.npz or its folder (default: ../shared/data/binarized_mnist beside the "
                             "repository, else ppvi.data's)")
    parser.add_argument("--test-images", type=int, default=None, help="score only the first N test images")
    parser.add_argument("--samples", type=int, default=None, help="L of the VAE's importance sampling")
    parser.add_argument("--models", default=None, help="comma-separated rung keys (default: all)")
    parser.add_argument("--gated", action="store_true", help="the Gated PixelCNN in the PixelCNN's place")
    parser.add_argument("--figure", type=Path, default=None, help="save the 64 samples of every model (PNG)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args(argv)
    torch.set_num_threads(arguments.threads)

    root = arguments.mnist
    if arguments.dataset == "mnist" and root is None:
        shared = Path(os.environ.get("PPVI_SHARED", Path(__file__).resolve().parents[2] / "shared"))
        root = shared / "data" / "binarized_mnist" if (shared / "data" / "binarized_mnist").is_dir() else None
    data = image_baselines.ladder_data(arguments.dataset, root, seed=arguments.seed)
    test = data.test_images[: arguments.test_images] if arguments.test_images else data.test_images
    settings = settings_for(arguments.dataset, arguments.quick, arguments.seed)
    if arguments.samples is not None:
        settings = replace(settings, importance_samples=arguments.samples)
    if arguments.gated:
        settings = replace(settings, gated=True)
    models = tuple(arguments.models.split(",")) if arguments.models else None

    started = time.perf_counter()
    rungs = image_baselines.fit_ladder(data.train_images, test, train_labels=data.train_labels,
                                       validation_images=data.validation_images, settings=settings, models=models,
                                       progress=True)
    seconds, draws = image_baselines.sampling_costs(rungs, num_samples=64, seed=arguments.seed)
    published = image_baselines.PUBLISHED_BINARIZED_MNIST if arguments.dataset == "mnist" else None
    table = image_baselines.ladder_table(rungs, published)
    table.insert(2, "seconds per 64 samples", seconds)

    height, width = data.train_images.shape[1:]
    sizes = f"{data.train_images.shape[0]} training, {data.validation_images.shape[0]} validation"
    print(f"\n{arguments.dataset}: {sizes}, "
          f"{test.shape[0]} test images of {height}x{width} binary pixels; {'quick' if arguments.quick else 'stated'} "
          f"settings; total {time.perf_counter() - started:.0f} s")
    print(f"machine: {machine()}")
    print("test NLL in nats per image (lower is better); pPCA and VAE rows are bounds (the VAE's: IS, a stochastic "
          "lower bound of log p)")
    columns = ["test NLL", "published NLL", "seconds per 64 samples", "fit seconds", "how"]
    print(table[columns].to_string(float_format=lambda value: f"{value:.2f}" if value >= 0.01 else f"{value:.1e}"))
    if published:
        print("\nsources (figures as recalled, not checked against the papers here):")
        for rung in rungs:
            if rung.key in published:
                print(f"  {rung.name}: {published[rung.key].source}")
    if data.train_labels is None:
        print("naive Bayes: not run (the static binarized MNIST has no labels)")
    if arguments.figure is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        arguments.figure.parent.mkdir(parents=True, exist_ok=True)
        figure = image_baselines.plot_ladder_samples(draws, seconds)
        figure.savefig(arguments.figure, dpi=120, bbox_inches="tight")
        plt.close(figure)
        print(f"figure: {arguments.figure}")
    return {"table": table, "seconds": seconds, "settings": settings, "machine": machine()}


if __name__ == "__main__":
    main()
