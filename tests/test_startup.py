"""Start-up: ``import ppvi`` loads nothing heavy, ``ppvi --help`` does not import torch, and the lazy public names
still resolve as they did when ``import ppvi`` imported everything (issue 24).

Every check runs in a fresh interpreter, since this test process has long imported torch and the API. No timings
are asserted here (benchmarks/startup.py measures them); what is checked is which modules get imported.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import textwrap

import pytest

#: Modules ``import ppvi`` must not import: each costs from tenths of a second to seconds of CPU at start-up.
HEAVY_MODULES = ("arviz", "pandas", "matplotlib", "scipy", "sklearn", "xarray", "dask", "distributed",
                 "torch._dynamo", "torch._inductor")

#: The command lines whose help (or usage error) must print without importing torch, with their exit status.
HELP_COMMANDS = [
    (["--help"], 0),
    (["--version"], 0),
    (["fit", "--help"], 0),
    (["compare", "--help"], 0),
    (["diagnose", "--help"], 0),
    (["vsbc", "--help"], 0),
    (["sbc", "--help"], 0),
    (["datasets", "--help"], 0),
    (["datasets", "download", "--help"], 0),
    (["fit"], 2),  # a usage error (no MODEL) is argparse's too
]

#: Prints whether torch was imported, as the very last thing the interpreter does (after argparse's sys.exit).
REPORT_TORCH = "import atexit, sys; atexit.register(lambda: print('torch imported:', 'torch' in sys.modules))"


def python(code: str) -> subprocess.CompletedProcess:
    """Run ``python -c code`` in a fresh interpreter."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_ppvi_imports_nothing_heavy():
    result = python(f"import ppvi, sys; print(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(("arguments", "status"), HELP_COMMANDS, ids=[" ".join(a) for a, _ in HELP_COMMANDS])
def test_python_m_ppvi_help_does_not_import_torch(arguments, status):
    code = f"{REPORT_TORCH}; import runpy; sys.argv = ['ppvi', *{arguments!r}]; runpy.run_module('ppvi', "
    code += "run_name='__main__', alter_sys=True)"
    result = python(code)
    assert result.returncode == status, result.stderr
    assert result.stdout.splitlines()[-1] == "torch imported: False", result.stdout


@pytest.mark.parametrize(("arguments", "status"), HELP_COMMANDS[:3], ids=[" ".join(a) for a, _ in HELP_COMMANDS[:3]])
def test_console_script_help_does_not_import_torch(arguments, status):
    try:
        (entry_point,) = importlib.metadata.entry_points(group="console_scripts", name="ppvi")
    except (ValueError, importlib.metadata.PackageNotFoundError):
        pytest.skip("the ppvi console script is not installed: pip install -e .")
    # What the console script does: load ppvi.cli:main through its entry point and exit with its status.
    code = f"{REPORT_TORCH}; from importlib.metadata import EntryPoint; sys.argv = ['ppvi', *{arguments!r}]; "
    code += f"sys.exit(EntryPoint(name='ppvi', value={entry_point.value!r}, group='console_scripts').load()())"
    result = python(code)
    assert result.returncode == status, result.stderr
    assert result.stdout.splitlines()[-1] == "torch imported: False", result.stdout


def test_every_public_name_resolves():
    code = textwrap.dedent(
        """
        import inspect, json, sys, types
        import ppvi

        assert set(ppvi.__all__) <= set(dir(ppvi)), set(ppvi.__all__) - set(dir(ppvi))
        values = {name: getattr(ppvi, name) for name in ppvi.__all__}
        namespace = {}
        exec("from ppvi import *", namespace)
        assert all(namespace[name] is value for name, value in values.items())
        kinds = {name: type(value).__name__ for name, value in values.items()}
        # the functions named like their modules stay the functions, however the modules are imported
        import ppvi.fit as fit_import
        import ppvi.compare
        from ppvi.fit import fit
        assert fit_import is fit is ppvi.fit and inspect.isfunction(ppvi.fit), ppvi.fit
        assert inspect.isfunction(ppvi.compare) and ppvi.compare is sys.modules["ppvi.compare"].compare
        assert ppvi.Fit is sys.modules["ppvi.result"].Fit and ppvi.Diagnosis is ppvi.diagnostics.Diagnosis
        # submodules outside __all__ were attributes of ppvi once imported; they still are, on first use
        assert isinstance(ppvi.result, types.ModuleType) and ppvi.training is sys.modules["ppvi.training"]
        import ppvi.models
        assert isinstance(ppvi.models, types.ModuleType)
        for missing in ("no_such_name", "__wrapped__"):
            try:
                getattr(ppvi, missing)
            except AttributeError:
                pass
            else:
                raise AssertionError(f"ppvi.{missing} resolved")
        print(json.dumps(kinds))
        """
    )
    result = python(code)
    assert result.returncode == 0, result.stderr
    kinds = json.loads(result.stdout.splitlines()[-1])
    assert kinds["fit"] == kinds["compare"] == kinds["vsbc"] == "function"
    assert kinds["data"] == kinds["diagnostics"] == kinds["amortized"] == kinds["engine"] == "module"
    assert kinds["__version__"] == "str"


def test_fit_names_resolve_lazily_in_a_fresh_interpreter():
    """``import ppvi; ppvi.fit(...)`` works with nothing imported beforehand, and a fit pulls in no figures or ArviZ
    (it may compile, so torch._dynamo is allowed here)."""
    code = textwrap.dedent(
        """
        import sys
        import ppvi
        import pyro, pyro.distributions as dist, torch

        def model(y):
            mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
            with pyro.plate("data", y.shape[0]):
                pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

        fit = ppvi.fit(model, torch.zeros(5), steps=5, progress=False)
        assert isinstance(fit, ppvi.Fit)
        print(sorted(m for m in ("arviz", "matplotlib", "sklearn", "xarray") if m in sys.modules))
        """
    )
    result = python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"
