"""examples/vae.py runs end to end with tiny settings, prints the likelihood table and writes five PNG figures."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.image  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from examples import load_example  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"




def test_example_prints_the_table_and_writes_the_figures(tmp_path, capsys):
    example = load_example("vae")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the mixture's EM and the evaluation, on a busy 2-core machine
    try:
        paths = example.main(tmp_path / "figures", steps=40, latent_dim=3, samples=20)
    finally:
        torch.set_num_threads(threads)
    assert set(paths) == {"samples", "reconstructions", "manifold", "latent_means", "elbo"}
    for path in paths.values():
        assert path.parent == tmp_path / "figures" and path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and min(image.shape[:2]) > 200 and np.ptp(image[..., :3]) > 0.5
    printed = capsys.readouterr().out
    for row in ("independent Bernoulli pixels", "mixture of 10 Bernoullis", "pPCA (K=10), dequantized", "VAE"):
        assert row in printed
    assert "importance sampling, L=20" in printed
