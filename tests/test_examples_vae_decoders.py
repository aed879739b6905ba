"""examples/vae_decoders.py runs end to end at tiny settings, prints both decoders' held-out scores and writes its
two figures; both decoders' reconstructions carry information about the digit (their squared error is well below
that of predicting every test digit by the mean training image)."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.image  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from examples import load_example  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROWS = ("bernoulli", "gaussian", "mean training image")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small networks on a busy 2-core machine
    yield
    torch.set_num_threads(threads)


def _table(printed: str) -> dict[str, list[float]]:
    """The printed rows: name -> held-out ELBO, held-out log-likelihood, reconstruction MSE."""
    rows = {}
    for line in printed.splitlines():
        for name in ROWS:
            if line.strip().startswith(name):
                rows[name] = [float(field) for field in line.strip()[len(name):].split()]
    return rows


def test_example_writes_the_figures_and_both_decoders_reconstruct(tmp_path, capsys):
    example = load_example("vae_decoders")
    paths = example.main(tmp_path / "figures", steps=300, latent_dim=4, samples=20, hidden_dim=32, seed=0)
    assert set(paths) == {"reconstructions", "samples"}
    for path in paths.values():
        assert path.parent == tmp_path / "figures" and path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        # A real picture: a few hundred pixels each way and more than one colour.
        assert image.ndim == 3 and min(image.shape[:2]) > 300 and np.ptp(image[..., :3]) > 0.5
    rows = _table(capsys.readouterr().out)
    assert set(rows) == set(ROWS)
    for name in ("bernoulli", "gaussian"):
        elbo, log_likelihood, error = rows[name]
        assert math.isfinite(elbo) and elbo <= log_likelihood  # the IWAE bound is at least the ELBO, same draws
        # 300 steps already beat the mean image by a wide margin (about 0.045 against 0.074)
        assert error < 0.8 * rows["mean training image"][2]
    assert rows["bernoulli"][0] < 0  # a probability of binary pixels: at most 1
