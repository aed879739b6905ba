"""examples/eight_schools.py runs end to end with tiny settings and writes its tables and figures."""

from __future__ import annotations

import matplotlib.image
import pytest

import ppvi
from examples import load_example


@pytest.mark.slow  # twelve fits and five batched VSBC/SBC runs: ~20 s idle, ~55 s on a busy 2-core machine
def test_eight_schools_example_writes_tables_and_figures(tmp_path):
    example = load_example("eight_schools")
    with pytest.warns(ppvi.FitWarning, match="Laplace start"):  # the centred funnel has no mode, and says so
        tables = example.main([
            "--output-directory", str(tmp_path), "--num-simulations", "8", "--steps", "30", "--seeds", "1",
            "--num-draws", "9", "--khat-steps", "300",
        ])
    khat = tables["khat"]
    assert len(khat) == 4 and set(khat["parameterisation"]) == {"centered", "noncentered"}
    # The funnel: mean-field on the centred model is worse than on the non-centred one (k-hat, outside reference:
    # Yao et al. 2018 report the same ordering).
    meanfield = khat[khat["guide"] == "meanfield"].set_index("parameterisation")["khat"]
    assert meanfield["centered"] > meanfield["noncentered"]
    for name in ["khat.csv", "sbc_noncentered_meanfield.png"] + [
        f"vsbc_{p}_{g}.{extension}" for p in ("centered", "noncentered") for g in ("meanfield", "fullrank")
        for extension in ("png", "csv")
    ]:
        assert (tmp_path / name).stat().st_size > 0, name
    image = matplotlib.image.imread(tmp_path / "vsbc_noncentered_meanfield.png")
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert set(tables["vsbc_noncentered_meanfield"].index) >= {"mu", "tau", "theta_trans[0]"}
