"""examples/gmm.py runs end to end with tiny settings and writes its two figures as PNG images."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.image  # noqa: E402
import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from examples import load_example  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"




def test_example_writes_the_figures(tmp_path, capsys):
    example = load_example("gmm")
    with threadpool_limits(limits=1):  # scikit-learn's k-means on a busy 2-core machine
        paths = example.main(tmp_path / "figures", num_points=150, steps=10, seed=1)
    assert set(paths) == {"components", "traces"}
    for path in paths.values():
        assert path.parent == tmp_path / "figures" and path.stat().st_size > 10_000
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        # A real picture: a few hundred pixels each way and more than one colour.
        assert image.ndim == 3 and min(image.shape[:2]) > 300 and np.ptp(image[..., :3]) > 0.5
    printed = capsys.readouterr().out
    assert "EM log-likelihood per point" in printed and "SVI ELBO per point" in printed
