"""The ``ppvi`` command, run through its console-script entry point in a subprocess, as a user runs it.

Every run pays for ``import ppvi`` (torch, Pyro, ArviZ: a few seconds), so each test makes few runs on tiny data
with short fits. The model is the lecture's fake Gaussian, written into the test's folder (as a user's own model
file, and as a module of a package in the current folder), with its posterior computed by quadrature on a grid.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

#: The console script installed beside this interpreter (``pip install -e .`` puts it there).
PPVI = shutil.which("ppvi", path=str(Path(sys.executable).parent))

MODEL_SOURCE = textwrap.dedent(
    '''
    """The fake Gaussian: mu ~ N(0, 1), sd ~ HalfNormal(1), y_i ~ N(mu, sd)."""
    import pyro
    import pyro.distributions as dist


    def model(y=None, num_points=100):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        sd = pyro.sample("sd", dist.HalfNormal(1.0))
        with pyro.plate("data", num_points if y is None else y.shape[0]):
            return pyro.sample("y", dist.Normal(mu, sd), obs=y)


    NOT_A_FUNCTION = 3
    '''
)

pytestmark = pytest.mark.skipif(PPVI is None, reason="the ppvi console script is not installed: pip install -e .")


def run(*arguments: str, cwd: Path, env: dict | None = None, expect: int | None = 0) -> subprocess.CompletedProcess:
    """``ppvi ARGUMENTS`` in ``cwd``; checks the exit status unless ``expect`` is None."""
    environment = {**os.environ, "MPLBACKEND": "Agg", **(env or {})}
    result = subprocess.run([PPVI, *arguments], cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)
    if expect is not None:
        report = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        assert result.returncode == expect, report
    return result


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a failed run prints last on stderr."""
    lines = result.stderr.strip().splitlines()
    assert lines, "no error message"
    assert lines[-1].startswith("ppvi: error: "), result.stderr
    return lines[-1]


def observations(num_points: int = 100, seed: int = 0) -> np.ndarray:
    return 1.0 + 2.0 * np.random.default_rng(seed).standard_normal(num_points)


def quadrature_posterior(y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fake Gaussian's posterior on a grid: (mu grid, sd grid, normalised weights), by 2-D quadrature."""
    from scipy import stats

    mu = np.linspace(y.mean() - 2.0, y.mean() + 2.0, 401)
    sd = np.linspace(0.3 * y.std(), 2.5 * y.std(), 401)
    grid_mu, grid_sd = np.meshgrid(mu, sd, indexing="ij")
    log_density = (
        stats.norm.logpdf(grid_mu, 0.0, 1.0) + stats.halfnorm.logpdf(grid_sd, scale=1.0)
        + stats.norm.logpdf(y[:, None, None], grid_mu, grid_sd).sum(0)
    )
    weights = np.exp(log_density - log_density.max())
    return grid_mu, grid_sd, weights / weights.sum()


def posterior_moments(y: np.ndarray) -> dict[str, tuple[float, float]]:
    grid_mu, grid_sd, weights = quadrature_posterior(y)
    moments = {}
    for name, grid in (("mu", grid_mu), ("sd", grid_sd)):
        mean = float((weights * grid).sum())
        moments[name] = (mean, float(np.sqrt((weights * (grid - mean) ** 2).sum())))
    return moments


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the model (as a file and as a package module) and the data as CSV, JSON and NPZ."""
    folder = tmp_path_factory.mktemp("cli")
    (folder / "gauss_model.py").write_text(MODEL_SOURCE)
    (folder / "mymodels").mkdir()
    (folder / "mymodels" / "__init__.py").write_text("")
    (folder / "mymodels" / "gauss.py").write_text(MODEL_SOURCE)
    y = observations()
    pd.DataFrame({"y": y}).to_csv(folder / "data.csv", index=False)
    (folder / "data.json").write_text(json.dumps({"y": y[:20].tolist()}))
    np.savez(folder / "data.npz", y=y)
    return folder


@pytest.fixture(scope="module")
def fitted(workspace: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """``ppvi fit`` of the package-module model on the CSV, saving the netCDF and the ppvi fit."""
    result = run(
        "fit", "mymodels.gauss:model", "--data", "data.csv", "--guide", "fullrank", "--out", "posterior.nc",
        "--save-fit", "gauss.pt", "--max-steps", "3000", "--learning-rate", "0.1", "--seed", "1", "--device", "cpu",
        "--dtype", "float64", "--draws", "2000", "--progress", cwd=workspace,
    )
    return workspace, result


# -- help, version, entry points ---------------------------------------------------------------------------------
def test_help_lists_every_command_and_the_exit_statuses(tmp_path):
    result = run("--help", cwd=tmp_path)
    for command in ("fit", "compare", "diagnose", "vsbc", "sbc", "datasets"):
        assert command in result.stdout
    assert "exit statuses: 0 success" in result.stdout
    assert "--quiet" in result.stdout and "--debug" in result.stdout


def test_python_dash_m_ppvi_prints_the_installed_version(tmp_path):
    from importlib.metadata import version

    result = subprocess.run([sys.executable, "-m", "ppvi", "--version"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"ppvi {version('ppvi')}"


# -- ppvi fit --------------------------------------------------------------------------------------------------
def test_fit_on_a_csv_matches_the_quadrature_posterior(fitted):
    folder, result = fitted
    assert "Fit(guide='fullrank'" in result.stdout and "converged=True" in result.stdout
    assert "Diagnosis: " in result.stdout
    summary = [line.split() for line in result.stdout.splitlines() if line.split()[:1] in (["mu"], ["sd"])]
    assert [row[0] for row in summary] == ["mu", "sd"]
    import arviz as az

    posterior = az.from_netcdf(folder / "posterior.nc").posterior
    assert posterior.attrs["ppvi_guide"] == "fullrank" and posterior.attrs["ppvi_converged"] == "True"
    assert posterior.sizes["draw"] == 2000
    for name, (mean, sd) in posterior_moments(observations()).items():
        draws = posterior[name].values.reshape(-1)
        # 0.1 posterior sd: far beyond the Monte Carlo error of 2,000 draws (0.02 sd) and the fit's own bias here.
        assert abs(draws.mean() - mean) < 0.1 * sd, (name, draws.mean(), mean, sd)
        assert abs(draws.std() / sd - 1) < 0.1, (name, draws.std(), sd)
        summary_mean = float(next(row for row in summary if row[0] == name)[1])
        assert abs(summary_mean - mean) < 0.1 * sd
    assert (folder / "gauss.pt").is_file()
    record = json.loads((folder / "gauss.pt.json").read_text())
    assert record["model"] == "mymodels.gauss:model" and record["data"] == str(folder / "data.csv")
    assert "%|" in result.stderr  # --progress: tqdm's bar, though stderr is a pipe


def test_fit_of_a_model_file_on_json_with_check_exits_3_when_not_converged(workspace):
    # A fixed number of steps tests no stationarity, so the fit is not converged: --check says no.
    result = run("fit", "gauss_model.py:model", "--data", "data.json", "--steps", "20", "--out", "", "--check",
                 "--draws", "500", cwd=workspace, expect=3)
    assert "Fit(guide='meanfield', steps=20, converged=False" in result.stdout
    assert error_line(result) == "ppvi: error: --check: the fit did not converge"
    assert not (workspace / "fit.nc").exists()  # --out '' writes no netCDF


def test_a_bad_model_spec_exits_2_with_one_line(workspace):
    result = run("fit", "no_such_module:model", "--data", "data.csv", cwd=workspace, expect=2)
    assert error_line(result).startswith("ppvi: error: no module named 'no_such_module' (MODEL 'no_such_module:model')")
    assert "Traceback" not in result.stderr and "(--debug shows the traceback)" in result.stderr
    assert result.stdout == ""


def test_debug_shows_the_traceback_and_names_unknown_data(workspace):
    (workspace / "extra.csv").write_text("y,z\n1.0,2.0\n0.5,1.0\n")
    result = run("fit", "gauss_model.py:model", "--data", "extra.csv", "--debug", cwd=workspace, expect=2)
    assert "Traceback (most recent call last)" in result.stderr
    assert "UsageError" in result.stderr
    assert "'extra.csv' names 'z', which model(y=None, num_points=100) does not take" in error_line(result)


# The error paths below fail before any work, so they run in this process through ppvi.cli.main (the same code
# the console script calls), which saves an interpreter start (and ``import torch``) per case.
@pytest.fixture
def in_process(workspace, monkeypatch, capsys):
    """``ppvi ARGUMENTS`` through ``ppvi.cli.main`` in this process: (status, stdout, stderr)."""
    from ppvi.cli import main

    monkeypatch.chdir(workspace)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("MPLBACKEND", "Agg")

    def call(*arguments: str) -> tuple[int, str, str]:
        status = main(list(arguments))
        output = capsys.readouterr()
        return status, output.out, output.err

    return call


@pytest.mark.parametrize(
    ("model", "data", "message"),
    [
        ("gauss_model.py", "data.csv", "names no function: write package.module:function"),
        ("gauss_model.py:modle", "data.csv", "has no 'modle' (MODEL 'gauss_model.py:modle'); its functions: model"),
        ("gauss_model.py:NOT_A_FUNCTION", "data.csv", "is not callable (a int): name the Pyro model function"),
        ("elsewhere/gauss_model.py:model", "data.csv", "MODEL file 'elsewhere/gauss_model.py' does not exist"),
        ("gauss_model.py:model", "missing.csv", "data file 'missing.csv' does not exist"),
        ("gauss_model.py:model", "data.txt", "is not .csv, .json or .npz: convert it to one of those"),
        ("gauss_model.py:model", "ragged.csv", "column 'y' of 'ragged.csv' has 1 empty cell(s): columns of different"),
        ("gauss_model.py:model", "words.csv", "column 'y' of 'words.csv' is not numeric"),
        ("gauss_model.py:model", "ragged.json", "'y' in 'ragged.json' is not a list of numbers of one shape"),
        ("gauss_model.py:model", "list.json", "holds a JSON list; it must be an object"),
        ("gauss_model.py:model", "empty.json", "needs 'y', which 'empty.json' does not give: add a column or key"),
    ],
)
def test_a_bad_model_or_data_file_is_a_usage_error_in_one_line(in_process, workspace, model, data, message):
    (workspace / "data.txt").write_text("1 2 3\n")
    (workspace / "ragged.csv").write_text("y,z\n1.0,2.0\n,1.0\n")
    (workspace / "words.csv").write_text("y\none\ntwo\n")
    (workspace / "ragged.json").write_text('{"y": [[1, 2], [3]]}')
    (workspace / "list.json").write_text("[1, 2]")
    (workspace / "empty.json").write_text("{}")
    # empty.json: y has a default (None) in this model, so make the point with a model that needs it
    if data == "empty.json":
        (workspace / "needs_y.py").write_text("def model(y):\n    return y\n")
        model = "needs_y.py:model"
    status, out, err = in_process("fit", model, "--data", data)
    assert status == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ppvi: error: ") and message in lines[0], err


def test_usage_errors_of_options(in_process, workspace):
    status, _, err = in_process("fit", "gauss_model.py:model", "--data", "data.npz", "--guide", "fullrnak")
    assert status == 2 and "unknown guide 'fullrnak': use one of auto, map, laplace, meanfield, fullrank" in err
    status, _, err = in_process("fit", "gauss_model.py:model", "--set", "num_points")
    assert status == 2 and "--set 'num_points' is not NAME=VALUE (e.g. --set num_components=2)" in err
    status, _, err = in_process("compare", "gauss_model.py:model", "--data", "data.npz", "--reference", "none.nc")
    assert status == 2 and "reference file 'none.nc' does not exist" in err
    status, _, err = in_process("datasets", "download", "cifar")
    assert status == 2 and "unknown data set 'cifar': use one of digits, mnist" in err
    status, _, err = in_process("diagnose", "none.pt")
    assert status == 2 and "no fit file 'none.pt': write one with ppvi fit MODEL --data FILE --save-fit FIT" in err
    (workspace / "unrecorded.pt").write_bytes(b"")  # the record is looked for before the file is read
    status, _, err = in_process("diagnose", "unrecorded.pt")
    assert status == 2 and "give them, ppvi diagnose FIT --model MODEL --data FILE" in err


def test_model_arguments_fill_positions_in_order():
    from ppvi.cli import UsageError, model_arguments

    def model(sigma, y=None, scale=1.0, *, prior=2.0):
        return sigma, y, scale, prior

    assert model_arguments(model, {"sigma": 1}, "f") == ((1,), {})
    assert model_arguments(model, {"sigma": 1, "scale": 3.0}, "f") == ((1, None, 3.0), {})
    assert model_arguments(model, {"sigma": 1, "prior": 5.0}, "f") == ((1,), {"prior": 5.0})
    assert model_arguments(model, {"y": 4}, "f", optional=("sigma",)) == ((None, 4), {})
    with pytest.raises(UsageError, match="needs 'sigma', which f does not give"):
        model_arguments(model, {"y": 4}, "f")


# -- ppvi diagnose ---------------------------------------------------------------------------------------------
def test_diagnose_reads_the_fit_and_its_record(fitted):
    folder, _ = fitted
    result = run("diagnose", "gauss.pt", "--draws", "1000", "--seed", "2", "--device", "cpu", "--check", cwd=folder)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Fit(guide='fullrank'")
    assert lines[1].startswith("k-hat:") and "threshold" in lines[1]
    assert lines[2].startswith("ESS:") and lines[2].endswith("of 1000 draws")
    verdict = lines[3].removeprefix("verdict:").strip()
    assert verdict in ("good", "ok", "caution")  # a full-rank Gaussian on a near-Gaussian posterior
    assert len(lines[4]) > 40  # the explanation


def test_diagnose_without_a_record_takes_model_and_data(fitted, tmp_path):
    folder, _ = fitted
    shutil.copy(folder / "gauss.pt", tmp_path / "copy.pt")
    shutil.copy(folder / "gauss_model.py", tmp_path / "gauss_model.py")
    # The data as JSON on the command line: floats round-trip exactly, so the fit file's fingerprint matches.
    values = json.dumps(observations().tolist())
    result = run("diagnose", "copy.pt", "--model", "gauss_model.py:model", "--set", f"y={values}", "--draws", "500",
                 cwd=tmp_path)
    assert "verdict:" in result.stdout


# -- ppvi compare ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compare_against_exact_reference_draws(workspace, tmp_path):
    import arviz as az

    grid_mu, grid_sd, weights = quadrature_posterior(observations())
    rng = np.random.default_rng(0)
    index = rng.choice(weights.size, size=4000, p=weights.reshape(-1))
    reference = {"mu": grid_mu.reshape(-1)[index][None], "sd": grid_sd.reshape(-1)[index][None]}
    az.from_dict(posterior=reference).to_netcdf(tmp_path / "reference.nc")
    result = run(
        "compare", str(workspace / "gauss_model.py") + ":model", "--data", str(workspace / "data.npz"),
        "--guides", "meanfield", "fullrank", "--reference", "reference.nc", "--csv", "table.csv",
        "--figure", "contours.png", "--parameters", "mu", "sd", "--draws", "2000", "--quiet", cwd=tmp_path,
    )
    table = pd.read_csv(tmp_path / "table.csv", index_col=[0, 1])
    assert set(table.index.get_level_values("guide")) == {"meanfield", "fullrank"}
    assert (table["mean_error"] < 0.15).all(), table  # grid spacing and Monte Carlo error: ~0.05 sd
    assert "reference_mean" in result.stdout
    assert (tmp_path / "contours.png").stat().st_size > 10_000
    assert result.stderr == ""  # --quiet: no bars, no status lines


# -- ppvi vsbc and ppvi sbc ------------------------------------------------------------------------------------
def test_vsbc_at_small_m_prints_the_table_and_draws_the_figure(workspace, tmp_path):
    result = run(
        "vsbc", str(workspace / "gauss_model.py") + ":model", "--observed", "y", "-M", "20", "--steps", "200",
        "--set", "num_points=20", "--guide", "meanfield", "--seed", "3", "--device", "cpu", "--csv", "vsbc.csv",
        "--figure", "vsbc.png", cwd=tmp_path,
    )
    assert result.stdout.startswith("VSBC of meanfield ADVI: 20 replications")
    table = pd.read_csv(tmp_path / "vsbc.csv", index_col=0)
    assert list(table.index) == ["mu", "sd"]
    assert table["mean_p"].between(0.0, 1.0).all() and set(table.columns) >= {"ks_pvalue", "verdict"}
    assert (tmp_path / "vsbc.png").stat().st_size > 5_000
    assert "wrote vsbc.png" in result.stderr


def test_vsbc_on_a_local_dask_cluster_equals_the_run_in_one_process(workspace, tmp_path):
    common = ("vsbc", str(workspace / "gauss_model.py") + ":model", "--observed", "y", "-M", "70", "--steps",
              "100", "--set", "num_points=20", "--seed", "5", "--device", "cpu", "--no-figure", "--quiet")
    alone = run(*common, "--csv", "alone.csv", cwd=tmp_path)
    sharded = run(*common, "--workers", "2", "--csv", "sharded.csv", cwd=tmp_path)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "sharded.csv"), pd.read_csv(tmp_path / "alone.csv"))
    assert "replications" in sharded.stdout and "worker" in sharded.stdout  # the shards' table: 64 + 6
    assert "replications" not in alone.stdout.splitlines()[1]


def test_num_shards_without_a_cluster_is_a_usage_error(workspace, tmp_path):
    result = run("vsbc", str(workspace / "gauss_model.py") + ":model", "--observed", "y", "--num-shards", "2",
                 cwd=tmp_path, expect=2)
    assert "--num-shards needs a Dask cluster: add --workers N or --scheduler ADDRESS" in error_line(result)


@pytest.mark.slow
def test_sbc_with_check_exits_0_or_3_by_its_verdicts(workspace, tmp_path):
    result = run(
        "sbc", "gauss_model.py:model", "--data", "data.json", "--observed", "y", "-M", "20", "-L", "19",
        "--guide", "fullrank", "--steps", "300", "--no-figure", "--check", "--quiet", cwd=workspace, expect=None,
    )
    assert result.stdout.startswith("SBC of fullrank ADVI: 20 replications")
    verdicts = [line.split()[-1] for line in result.stdout.splitlines()[2:]]
    flagged = any(v != "uniform" for v in verdicts)
    assert result.returncode == (3 if flagged else 0), result.stderr
    assert not (workspace / "sbc.png").exists()  # --no-figure


# -- ppvi datasets ---------------------------------------------------------------------------------------------
def test_datasets_list_and_download(tmp_path):
    env = {"PPVI_DATA": str(tmp_path / "data")}
    listing = run("datasets", "list", cwd=tmp_path, env=env).stdout
    for name in ("digits", "mnist", "binarized_mnist", "20news", "ap"):
        assert name in listing
    assert "bundled" in listing and str(tmp_path / "data" / "mnist") in listing
    digits = run("datasets", "download", "digits", cwd=tmp_path, env=env)
    assert "bundled with scikit-learn, nothing to download" in digits.stdout


def test_datasets_download_failures_are_one_line(tmp_path):
    env = {"PPVI_DATA": str(tmp_path / "data")}
    mirror = (tmp_path / "no_mirror").as_uri() + "/"
    result = run("datasets", "download", "mnist", "--mirror", mirror, cwd=tmp_path, env=env, expect=1)
    assert "could not download train-images-idx3-ubyte.gz from any MNIST mirror" in error_line(result)
    assert len(result.stderr.strip().splitlines()) == 2  # the status line, then the error
    manual = run("datasets", "download", "20news", cwd=tmp_path, env=env, expect=1)
    assert "20news cannot be downloaded by ppvi" in error_line(manual) and "Source:" in error_line(manual)
