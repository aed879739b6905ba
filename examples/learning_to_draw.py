"""Learning to draw digits: the lecture's ladder of generative models, each fitted to the same binary images, with
64 samples from every model side by side and the likelihood table.

The ladder (``models.image_baselines.fit_ladder``): independent Bernoulli pixels ("784 coin flips"), naive Bayes
(a label, then independent pixels given it), a mixture of Bernoullis, a Bayes net over the pixels (the fully
visible sigmoid belief network: each pixel a logistic regression on the pixels before it), pPCA (a Gaussian),
the VAE, and the explicit-density autoregressive networks PixelCNN and PixelRNN (Row LSTM). The table gives the
test negative log-likelihood (nats per image; pPCA's and the VAE's are bounds) and the seconds each model takes
to draw 64 images: one decoder pass for the VAE, ``H * W`` sequential network passes for PixelCNN and PixelRNN.

Writes ``samples.png`` (the side-by-side figure) and ``table.csv``.

Run: ``python examples/learning_to_draw.py [--output learning_to_draw] [--dataset digits|mnist] [--quick]``
(digits: about 2-3 minutes on one CPU thread; MNIST: see benchmarks/image_models.py for its settings and time).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ppvi.models import image_baselines  # noqa: E402
from ppvi.models.image_baselines import LadderSettings  # noqa: E402

#: Digits at small settings (seconds): for a quick look, and for the test.
QUICK = LadderSettings(fvsbn_epochs=3, autoregressive_epochs=1, pixelcnn_channels=8, pixelcnn_layers=1,
                       pixelrnn_channels=8, pixelrnn_hidden=8, pixelrnn_layers=1, vae_steps=100,
                       importance_samples=50)


def main(output: str | Path = "learning_to_draw", dataset: str = "digits", settings: LadderSettings | None = None,
         test_images: int | None = None, mnist_root: str | Path | None = None, seed: int = 0) -> dict[str, Path]:
    """Fit the ladder, print the table, write the figure and the table; returns their paths by name.

    Parameters
    ----------
    output : path
        Folder for ``samples.png`` and ``table.csv``.
    dataset : {"digits", "mnist"}
        scikit-learn's 8x8 digits (binarized once) or Larochelle & Murray's binarized MNIST.
    settings : LadderSettings, optional
        Sizes, epochs, steps (default: ``LadderSettings()``, sized for digits).
    test_images : int, optional
        Score only the first ``test_images`` test images.
    mnist_root : path, optional
        ``binarized_mnist.npz`` or its folder.
    seed : int
        Seed of the data split, every fit and every draw.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    settings = replace(settings or LadderSettings(), seed=seed)
    data = image_baselines.ladder_data(dataset, mnist_root, seed=seed)
    test = data.test_images[:test_images] if test_images else data.test_images
    rungs = image_baselines.fit_ladder(data.train_images, test, train_labels=data.train_labels,
                                       validation_images=data.validation_images, settings=settings)
    seconds, draws = image_baselines.sampling_costs(rungs, num_samples=64, seed=seed)
    published = image_baselines.PUBLISHED_BINARIZED_MNIST if dataset == "mnist" else None
    table = image_baselines.ladder_table(rungs, published)
    table.insert(2, "seconds per 64 samples", seconds)
    print(f"Test NLL on {test.shape[0]} binary {dataset} images (nats per image, lower is better), and the seconds "
          f"each model takes to draw 64 images ({torch.get_num_threads()} CPU thread(s)):")
    print(table[["test NLL", "published NLL", "seconds per 64 samples", "how"]]
          .to_string(float_format=lambda value: f"{value:.2f}" if value >= 0.01 else f"{value:.1e}"))
    paths = {"table": output / "table.csv", "samples": output / "samples.png"}
    table.to_csv(paths["table"])
    figure = image_baselines.plot_ladder_samples(draws, seconds)
    figure.savefig(paths["samples"], dpi=120, bbox_inches="tight")
    plt.close(figure)
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="learning_to_draw")
    parser.add_argument("--dataset", choices=("digits", "mnist"), default="digits")
    parser.add_argument("--quick", action="store_true", help="small settings (seconds)")
    parser.add_argument("--mnist", default=None, help="binarized_mnist.npz or its folder")
    parser.add_argument("--test-images", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    torch.set_num_threads(1)  # small networks: one thread is as fast, and leaves the machine to others
    for name, path in main(arguments.output, arguments.dataset, QUICK if arguments.quick else None,
                           arguments.test_images, arguments.mnist, arguments.seed).items():
        print(f"{name}: {path}")
