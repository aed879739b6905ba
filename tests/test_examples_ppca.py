"""examples/ppca.py runs end to end at tiny settings, writes its figure, and its guides match the closed forms:
full-rank ADVI recovers pPCA's exact posterior over z (means, sds, correlation, and an ELBO equal to log p(x)), and
mean-field ADVI has the exact means but the conditionals' sds, ``1 / sqrt(Lambda_kk)`` (Bishop 2006, §10.1.2)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.image  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from examples import load_example  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _table(printed: str) -> dict[str, list[float]]:
    """The rows of the printed comparison: name -> ELBO, optimum, max |mean error|, sd z1, sd z2, correlation."""
    rows = {}
    for line in printed.splitlines():
        fields = line.split()
        if len(fields) == 7 and fields[0] in ("exact", "meanfield", "fullrank"):
            rows[fields[0]] = [float(field) for field in fields[1:]]
    return rows


def test_example_writes_the_figure_and_matches_the_exact_posterior(tmp_path, capsys):
    example = load_example("ppca")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy 2-core machine
    try:
        paths = example.main(tmp_path / "figures", num_points=20, seed=1)
    finally:
        torch.set_num_threads(threads)
    assert set(paths) == {"posterior"}
    path = paths["posterior"]
    assert path.parent == tmp_path / "figures" and path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    # A real picture: a few hundred pixels each way and more than one colour.
    assert image.ndim == 3 and min(image.shape[:2]) > 300 and np.ptp(image[..., :3]) > 0.5
    printed = capsys.readouterr().out
    rows = _table(printed)
    assert set(rows) == {"exact", "meanfield", "fullrank"}
    exact, meanfield, fullrank = rows["exact"], rows["meanfield"], rows["fullrank"]
    assert exact[5] == pytest.approx(-0.81, abs=0.01)  # the lecture's correlated posterior
    # Full-rank holds the posterior exactly: means within Monte Carlo error of 4,000 draws (sd 0.54 / 63 = 0.009),
    # sds and correlation within a few per cent, ELBO equal to log p(x).
    assert fullrank[2] < 0.05
    assert fullrank[3] == pytest.approx(exact[3], rel=0.05) and fullrank[4] == pytest.approx(exact[4], rel=0.05)
    assert fullrank[5] == pytest.approx(exact[5], abs=0.03)
    assert fullrank[0] == pytest.approx(exact[0], abs=0.5)
    # Mean-field: the right means, the conditionals' sds (0.316 = 0.539 * sqrt(1 - 0.81^2)), no correlation,
    # and an ELBO below log p(x) by KL = -N/2 log(1 - rho^2), 10 nats for N = 20.
    assert meanfield[2] < 0.1  # a third of its sd: mean-field SGD is noisier
    optimum_sd = float(printed.split("1/sqrt(Lambda_kk)): ")[1].split(",")[0])
    assert meanfield[3] == pytest.approx(optimum_sd, rel=0.1) and meanfield[3] < 0.75 * exact[3]
    assert abs(meanfield[5]) < 0.1
    assert exact[0] - meanfield[1] == pytest.approx(-0.5 * 20 * np.log(1 - exact[5] ** 2), rel=0.05)
    assert meanfield[0] == pytest.approx(meanfield[1], abs=2.0) and meanfield[0] < fullrank[0] - 5
