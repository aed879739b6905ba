"""examples/learning_to_draw.py and benchmarks/image_models.py run end to end on the digits at tiny settings: the
ladder's table (every rung, finite likelihoods, the published column) and the side-by-side samples figure."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.image  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from examples import load_example  # noqa: E402
from ppvi.models.image_baselines import LadderSettings  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Every rung on the digits (they have labels, so naive Bayes is in).
DIGITS_ROWS = ("independent Bernoulli pixels", "naive Bayes (class-conditional Bernoulli)", "mixture of 10 Bernoullis",
               "Bayes net (FVSBN)", "pPCA (K=10), dequantized", "VAE (K=10)", "PixelCNN", "PixelRNN (Row LSTM)")
#: Smaller still than the example's --quick: one epoch of the smallest networks, 40 VAE steps, L = 20.
TINY = LadderSettings(fvsbn_epochs=1, autoregressive_epochs=1, pixelcnn_channels=4, pixelcnn_layers=1,
                      pixelrnn_channels=4, pixelrnn_hidden=4, pixelrnn_layers=1, vae_steps=40, vae_hidden_dim=32,
                      importance_samples=20)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small networks on a busy 2-core machine
    yield
    torch.set_num_threads(threads)


def test_example_writes_the_samples_figure_and_the_table(tmp_path, capsys):
    example = load_example("learning_to_draw")
    paths = example.main(tmp_path / "out", settings=TINY, test_images=100)
    assert set(paths) == {"table", "samples"}
    assert paths["samples"].read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(paths["samples"])
    assert image.ndim == 3 and min(image.shape[:2]) > 300 and np.ptp(image[..., :3]) > 0.5
    table = pd.read_csv(paths["table"], index_col="model")
    assert tuple(table.index) == DIGITS_ROWS
    assert np.isfinite(table["test NLL"]).all() and (table["test NLL"] > 0).all()
    assert (table["seconds per 64 samples"] > 0).all()
    # the ladder's first rung is its worst exact model: everything fitted with more structure does better here
    assert table.loc["mixture of 10 Bernoullis", "test NLL"] < table.loc["independent Bernoulli pixels", "test NLL"]
    assert table.loc["naive Bayes (class-conditional Bernoulli)", "test NLL"] < table.loc[
        "independent Bernoulli pixels", "test NLL"]
    printed = capsys.readouterr().out
    assert "seconds per 64 samples" in printed and "PixelRNN (Row LSTM)" in printed


def test_benchmark_prints_the_digits_table_with_the_machine(capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "image_models.py"
    specification = importlib.util.spec_from_file_location("ppvi_benchmark_image_models", path)
    benchmark = importlib.util.module_from_spec(specification)
    specification.loader.exec_module(benchmark)
    result = benchmark.main(["--dataset", "digits", "--quick", "--test-images", "100",
                             "--models", "independent,naive_bayes,fvsbn,pixelcnn"])
    printed = capsys.readouterr().out
    assert "machine:" in printed and "logical cores" in printed and "thread" in printed
    table = result["table"]
    assert tuple(table.index) == ("independent Bernoulli pixels", "naive Bayes (class-conditional Bernoulli)",
                                  "Bayes net (FVSBN)", "PixelCNN")
    assert table["published NLL"].map(math.isnan).all()  # digits: no published figures
    # the lecture's trade-off: PixelCNN draws pixel by pixel, the independent model in one step
    assert result["seconds"]["PixelCNN"] > result["seconds"]["independent Bernoulli pixels"]


@pytest.mark.slow
def test_mnist_ladder_at_small_settings(shared, capsys):
    """The binarized MNIST pipeline at full image size (the benchmark's --quick settings, 200 test images)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "image_models.py"
    specification = importlib.util.spec_from_file_location("ppvi_benchmark_image_models", path)
    benchmark = importlib.util.module_from_spec(specification)
    specification.loader.exec_module(benchmark)
    result = benchmark.main(["--dataset", "mnist", "--quick", "--test-images", "200", "--mnist",
                             str(shared / "data" / "binarized_mnist")])
    table = result["table"]
    assert "naive Bayes (class-conditional Bernoulli)" not in table.index  # the static set has no labels
    assert table.loc["Bayes net (FVSBN)", "published NLL"] == 97.45
    assert np.isfinite(table["test NLL"]).all()
    assert "no labels" in capsys.readouterr().out
