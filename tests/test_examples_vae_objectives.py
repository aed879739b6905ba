"""examples/vae_objectives.py runs end to end at tiny settings, prints the table of the three objectives and writes
its two figures; free bits (Kingma et al. 2016) keep every latent dimension's KL near lambda, where the plain ELBO
lets some dimension fall far below it."""

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
ROWS = ("ELBO", "KL annealing", "free bits")
FREE_BITS = 0.25


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small networks on a busy 2-core machine
    yield
    torch.set_num_threads(threads)


def _table(printed: str) -> dict[str, list[float]]:
    """The printed rows: name -> active units, KL, min KL_k, held-out ELBO, held-out log-likelihood."""
    rows = {}
    for line in printed.splitlines():
        for name in ROWS:
            if line.strip().startswith(name + " "):
                rows[name] = [float(field) for field in line.strip()[len(name):].split()]
    return rows


def test_example_writes_the_figures_and_free_bits_keep_every_dimension(tmp_path, capsys):
    example = load_example("vae_objectives")
    paths = example.main(tmp_path / "figures", steps=200, latent_dim=6, warmup_steps=100, free_bits=FREE_BITS,
                         samples=20, hidden_dim=32, seed=0)
    assert set(paths) == {"kl_per_dimension", "elbo"}
    for path in paths.values():
        assert path.parent == tmp_path / "figures" and path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        # A real picture: a few hundred pixels each way and more than one colour.
        assert image.ndim == 3 and min(image.shape[:2]) > 300 and np.ptp(image[..., :3]) > 0.5
    rows = _table(capsys.readouterr().out)
    assert set(rows) == set(ROWS)
    for active, kl, smallest, elbo, log_likelihood in rows.values():
        assert 0 <= active <= 6 and 0 <= smallest <= kl
        assert math.isfinite(elbo) and elbo <= log_likelihood < 0
    # free bits: no dimension is pushed below lambda, so even the least used one keeps most of it (0.22 here),
    # while the plain ELBO's least used dimension is near collapse (0.05)
    assert rows["free bits"][2] > 0.6 * FREE_BITS
    assert rows["free bits"][2] > 2 * rows["ELBO"][2]
