"""The main demo: fit the lecture's fake-Gaussian model with mean-field and full-rank ADVI, side by side.

Run: ``python examples/demo.py``.
"""

from __future__ import annotations

import pandas as pd

import ppvi
from ppvi.models import fake_gaussian


def main() -> pd.DataFrame:
    y = fake_gaussian.simulate()  # 100 draws from N(1, 2)
    fits = {guide: ppvi.fit(fake_gaussian.model, y, guide=guide) for guide in ("meanfield", "fullrank")}
    table = pd.concat({guide: fit.summary() for guide, fit in fits.items()}, axis=1)
    with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 120):
        print(table)
    for guide, fit in fits.items():
        print(f"{guide:>9}: {fit.steps} steps in {fit.seconds:.2f} s, converged={fit.converged}, "
              f"final ELBO {fit.elbo[-100:].mean():.2f}")
    return table


if __name__ == "__main__":
    main()
