"""The ``ppvi`` command: a thin shell over the Python API for fits, diagnoses, comparisons and calibration.

``ppvi fit``, ``ppvi compare``, ``ppvi diagnose``, ``ppvi vsbc``, ``ppvi sbc`` and ``ppvi datasets`` call
:func:`ppvi.fit`, :func:`ppvi.compare`, :meth:`ppvi.Fit.diagnose`, :func:`ppvi.vsbc`, :func:`ppvi.sbc` and
:mod:`ppvi.data`; everything they print or write is what those return. A model is named as
``package.module:function`` (importable from the current folder) or ``path/to/file.py:function``; its data come
from a CSV, JSON or NPZ file whose column, key or array names are the model's argument names.

Exit statuses (:data:`EXIT_OK` and the others): 0 success; 1 an error while running (the message says what and
how to fix it); 2 a usage error (the command line, the MODEL, the data file); 3 ``--check`` was given and the
answer is no (a fit that did not converge or whose PSIS verdict is "bad", an asymmetric VSBC or non-uniform SBC
component); 130 interrupted. Errors are one line on stderr; ``--debug`` prints the traceback before it.

The argument parser is built from the standard library alone, and ``import ppvi`` (which runs first, since this
module is ``ppvi.cli``) imports nothing heavy, so ``ppvi --help`` and usage errors print without importing torch;
the API (torch, Pyro, ArviZ, pandas, matplotlib) is imported inside the command handlers, when a command runs.
Keep it so: import nothing beyond the standard library at the top of this module (tests/test_startup.py checks).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import json
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ppvi._version import __version__

__all__ = [
    "EXIT_CHECK_FAILED",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "UsageError",
    "build_parser",
    "load_model",
    "main",
    "model_arguments",
    "read_data",
]

#: Success.
EXIT_OK = 0
#: An error while running: the model failed, a fit could not be made, a file could not be written.
EXIT_ERROR = 1
#: A usage error: the command line, the MODEL spec or the data file (argparse's own status for bad arguments).
EXIT_USAGE = 2
#: ``--check`` was given and the answer is no: the fit cannot be trusted, or calibration failed.
EXIT_CHECK_FAILED = 3
#: Interrupted (Ctrl-C): 128 + SIGINT, as shells report it.
EXIT_INTERRUPTED = 130

#: Data file formats, by suffix.
DATA_FORMATS = (".csv", ".json", ".npz")
#: Suffix of the record ``ppvi fit --save-fit FIT`` writes beside ``FIT``: the MODEL and data it was made with,
#: so that ``ppvi diagnose FIT`` needs nothing else.
RECORD_SUFFIX = ".json"
#: Marks such a record.
RECORD_FORMAT = "ppvi-cli-record"
#: Default number of guide draws behind summaries, diagnoses and the netCDF file (ppvi's own default).
DEFAULT_DRAWS = 4000
#: Components drawn by ``ppvi compare``'s figure when ``--parameters`` is not given.
DEFAULT_FIGURE_PARAMETERS = 6

EPILOG = """\
MODEL is package.module:function (importable from the current folder) or path/to/file.py:function.
FILE is a .csv (columns), .json (an object) or .npz (arrays) whose names are the model's argument names;
--set NAME=VALUE adds or overrides one (VALUE is JSON: 2, 0.5, [1, 2], "text").

exit statuses: 0 success, 1 error while running, 2 usage error (command line, MODEL, data file),
3 --check failed (fit not converged or PSIS verdict "bad"; VSBC/SBC component flagged), 130 interrupted.
"""


class UsageError(Exception):
    """A problem with the command line, the MODEL spec or the data file: reported in one line, exit status 2."""


class _CheckFailed(Exception):
    """Raised by a command when ``--check`` was given and the answer is no (exit status 3)."""


# -- MODEL and data --------------------------------------------------------------------------------------------
def load_model(spec: str) -> Callable:
    """Import the model named by ``spec``: ``package.module:function`` or ``path/to/file.py:function``.

    A module is imported with the current folder first on ``sys.path`` (as ``python -m`` does); a file is
    executed as a module with its own folder first on ``sys.path``, so that it can import its neighbours.
    ``function`` may be dotted (``module:Class.method``).

    Parameters
    ----------
    spec : str
        The MODEL argument.

    Returns
    -------
    callable
        The model.

    Raises
    ------
    UsageError
        The spec is malformed, or names a file, module or function that does not exist, or something that is not
        callable.
    """
    location, colon, attribute = spec.rpartition(":")
    if not colon or not location or not attribute:
        raise UsageError(
            f"MODEL {spec!r} names no function: write package.module:function (e.g. ppvi.models.fake_gaussian:model) "
            "or path/to/file.py:function"
        )
    is_file = location.endswith(".py") or "/" in location or os.sep in location
    if is_file:
        path = Path(location).expanduser()
        if not path.is_file():
            raise UsageError(f"MODEL file {location!r} does not exist (relative to {os.getcwd()}): check the path")
        module = _import_file(path)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(location)
        except ModuleNotFoundError as error:
            if error.name and (location == error.name or location.startswith(error.name + ".")):
                raise UsageError(
                    f"no module named {error.name!r} (MODEL {spec!r}): run from the folder that holds it, install "
                    "it, or name a file instead: path/to/file.py:function"
                ) from error
            raise
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            defined = sorted(
                name for name, value in vars(module).items()
                if callable(value) and not name.startswith("_")
                and getattr(value, "__module__", None) == module.__name__
            )
            listing = ", ".join(defined[:20]) or "none"
            raise UsageError(f"{location} has no {attribute!r} (MODEL {spec!r}); its functions: {listing}")
        target = getattr(target, part)
    if not callable(target):
        raise UsageError(
            f"MODEL {spec!r} is not callable (a {type(target).__name__}): name the Pyro model function"
        )
    return target


#: Module names of model files loaded by path (``ppvi fit my_model.py:model``).
_FILE_MODULE_PREFIX = "ppvi_cli_model_"


def _import_file(path: Path):
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = f"{_FILE_MODULE_PREFIX}{abs(hash(str(path.resolve())))}"
    specification = importlib.util.spec_from_file_location(name, path)
    if specification is None or specification.loader is None:
        raise UsageError(f"MODEL file {str(path)!r} cannot be imported as Python: name a .py file")
    module = importlib.util.module_from_spec(specification)
    sys.modules[name] = module  # dataclasses and pickling look their module up here
    specification.loader.exec_module(module)
    return module


def read_data(path: str | os.PathLike) -> dict[str, Any]:
    """Read a data file into ``{name: value}``: numpy arrays, and Python numbers for scalars.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.csv`` file (a header row of names, one column per argument, all of one length), a ``.json`` file (an
        object mapping names to numbers or, possibly nested, lists of numbers) or a ``.npz`` file (numpy arrays;
        0-d arrays become numbers).

    Returns
    -------
    dict of str to numpy.ndarray, int or float

    Raises
    ------
    UsageError
        The file is missing, of another format, unreadable, or holds something other than numbers.
    """
    import numpy as np

    file = Path(path).expanduser()
    suffix = file.suffix.lower()
    if suffix not in DATA_FORMATS:
        raise UsageError(f"data file {str(path)!r} is not .csv, .json or .npz: convert it to one of those")
    if not file.is_file():
        raise UsageError(f"data file {str(path)!r} does not exist (relative to {os.getcwd()}): check the path")
    try:
        if suffix == ".csv":
            import pandas as pd

            frame = pd.read_csv(file)
            data: dict[str, Any] = {}
            for column in frame.columns:
                values = frame[column]
                if values.dtype.kind not in "iufb":
                    raise UsageError(
                        f"column {column!r} of {str(path)!r} is not numeric (e.g. {values.iloc[0]!r}): ppvi passes "
                        "numbers to the model; encode it as numbers, or drop it"
                    )
                if values.isna().any():
                    raise UsageError(
                        f"column {column!r} of {str(path)!r} has {int(values.isna().sum())} empty cell(s): columns of "
                        "different lengths belong in a .json or .npz file; missing values must be removed or modelled"
                    )
                data[str(column)] = values.to_numpy()
            return data
        if suffix == ".json":
            with open(file, encoding="utf-8") as handle:
                content = json.load(handle)
            if not isinstance(content, dict):
                raise UsageError(
                    f"{str(path)!r} holds a JSON {type(content).__name__}; it must be an object mapping the model's "
                    'argument names to numbers or lists, e.g. {"y": [1.2, 0.3]}'
                )
            return {str(name): _json_value(value, name, path) for name, value in content.items()}
        with np.load(file, allow_pickle=False) as arrays:
            return {name: arrays[name].item() if arrays[name].ndim == 0 else arrays[name] for name in arrays.files}
    except UsageError:
        raise
    except (ValueError, OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read {str(path)!r} as {suffix[1:].upper()}: {_one_line(error)}") from error


def _json_value(value: Any, name: str, path: str | os.PathLike) -> Any:
    import numpy as np

    if isinstance(value, bool) or value is None or isinstance(value, (int, float, str)):
        return value
    if isinstance(value, list):
        try:
            array = np.asarray(value)
        except ValueError:
            array = np.asarray(value, dtype=object)
        if array.dtype == object or array.dtype.kind not in "iufb":
            raise UsageError(
                f"{name!r} in {str(path)!r} is not a list of numbers of one shape: ragged or mixed lists cannot be "
                "passed as one array; split it into several names"
            )
        return array
    raise UsageError(f"{name!r} in {str(path)!r} is a JSON {type(value).__name__}: give a number or a list of numbers")


def _parse_settings(settings: Sequence[str]) -> dict[str, Any]:
    import numpy as np

    parsed: dict[str, Any] = {}
    for setting in settings:
        name, equals, text = setting.partition("=")
        if not equals or not name.isidentifier():
            raise UsageError(f"--set {setting!r} is not NAME=VALUE (e.g. --set num_components=2)")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text  # a bare word is a string
        parsed[name] = np.asarray(value) if isinstance(value, list) else value
    return parsed


def model_arguments(
    model: Callable, values: dict[str, Any], source: str, optional: Sequence[str] = ()
) -> tuple[tuple, dict[str, Any]]:
    """Match named values to the model's signature: ``(args, kwargs)`` for ``model(*args, **kwargs)``.

    Positional parameters are filled in order up to the last one that is named (those skipped take their
    defaults); keyword-only parameters go to ``kwargs``.

    Parameters
    ----------
    model : callable
        The model.
    values : dict
        ``{argument name: value}`` from the data file and ``--set``.
    source : str
        Where the values come from, for messages.
    optional : sequence of str
        Names that may be missing even without a default (passed as ``None``: the observed sites of VSBC/SBC).

    Raises
    ------
    UsageError
        A name the model does not take, or a required argument that is missing.
    """
    values = dict(values)
    try:
        signature = inspect.signature(model)
    except (TypeError, ValueError):
        return tuple(values.values()), {}
    parameters = list(signature.parameters.values())
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keyword_only = [p for p in parameters if p.kind is p.KEYWORD_ONLY]
    takes_any_keyword = any(p.kind is p.VAR_KEYWORD for p in parameters)
    known = {p.name for p in positional + keyword_only}
    unknown = [name for name in values if name not in known]
    name = getattr(model, "__name__", "model")
    if unknown and not takes_any_keyword:
        raise UsageError(
            f"{source} names {', '.join(map(repr, unknown))}, which {name}{signature} does not take: rename them to "
            "the model's argument names"
        )
    named = [i for i, p in enumerate(positional) if p.name in values]
    last = named[-1] if named else -1
    args = []
    for index, parameter in enumerate(positional):
        if parameter.name in values:
            args.append(values.pop(parameter.name))
        elif parameter.default is not parameter.empty:
            if index < last:
                args.append(parameter.default)
        elif parameter.name in optional:
            if index < last:
                args.append(None)
        else:
            raise UsageError(
                f"{name}{signature} needs {parameter.name!r}, which {source} does not give: add a column or key "
                f"named {parameter.name!r}, or --set {parameter.name}=VALUE"
            )
    missing = [p.name for p in keyword_only if p.default is p.empty and p.name not in values]
    if missing:
        raise UsageError(f"{name}{signature} needs the keyword argument(s) {missing}: add them to {source} or --set")
    return tuple(args), values


def _model_and_data(arguments: argparse.Namespace, optional: Sequence[str] = ()) -> tuple[Callable, tuple, dict]:
    model = load_model(arguments.model)
    values = read_data(arguments.data) if arguments.data is not None else {}
    values.update(_parse_settings(arguments.set))
    source = f"{arguments.data!r}" if arguments.data is not None else "the command line (no --data)"
    if arguments.set:
        source += " and --set"
    args, kwargs = model_arguments(model, values, source, optional)
    return model, args, kwargs


def _read_reference(path: str) -> dict[str, Any]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"reference file {path!r} does not exist: give ArviZ netCDF (.nc) or .npz posterior draws")
    if file.suffix.lower() == ".npz":
        import numpy as np

        with np.load(file, allow_pickle=False) as arrays:
            return {name: arrays[name] for name in arrays.files}
    if file.suffix.lower() != ".nc":
        raise UsageError(f"reference {path!r} is not .nc (ArviZ netCDF) or .npz: write the draws in one of those")
    import arviz as az

    try:
        posterior = az.from_netcdf(file).posterior
    except (OSError, ValueError, AttributeError) as error:
        raise UsageError(f"cannot read posterior draws from {path!r}: {_one_line(error)}") from error
    return {
        name: variable.values.reshape(-1, *variable.values.shape[2:]) for name, variable in posterior.data_vars.items()
    }


# -- output ----------------------------------------------------------------------------------------------------
class _Console:
    """Results to stdout; status lines to stderr unless ``--quiet``."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def result(self, text: str = "") -> None:
        print(text, flush=True)

    def status(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)


def _table(frame) -> str:
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 50, "display.max_rows", 200,
                           "display.float_format", "{:.4g}".format):
        return frame.to_string()


def _progress(arguments: argparse.Namespace) -> bool | None:
    if arguments.progress:
        return True
    return False if arguments.quiet else None  # None: ppvi's default, a bar when stderr is a terminal


def _fit_options(arguments: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {
        "steps": arguments.steps, "learning_rate": arguments.learning_rate, "seed": arguments.seed,
        "device": arguments.device, "dtype": arguments.dtype, "progress": _progress(arguments),
    }
    if arguments.max_steps is not None:
        options["max_steps"] = arguments.max_steps
    return options


def _check_guide(name: str, allowed: Sequence[str] | None = None) -> None:
    import ppvi

    known = list(allowed) if allowed is not None else ["auto", *ppvi.GUIDES]
    if name not in known:
        raise UsageError(f"unknown guide {name!r}: use one of {', '.join(known)}")


def _diagnosis_text(fit) -> tuple[str, Any]:
    if fit.guide_name == "map":
        return "Diagnosis: none (a MAP guide is a point mass: it has no density, so no importance weights)", None
    diagnosis = fit.diagnose()
    return str(diagnosis), diagnosis


def _save_figure(figure, path: str, console: _Console, what: str) -> None:
    import matplotlib.pyplot as plt

    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    console.status(f"wrote {path} ({what})")


def _write_record(fit_path: str, arguments: argparse.Namespace) -> None:
    location, _, attribute = arguments.model.rpartition(":")
    is_file = location.endswith(".py") or "/" in location or os.sep in location
    record = {
        "format": RECORD_FORMAT,
        "model": f"{Path(location).resolve()}:{attribute}" if is_file else arguments.model,
        "folder": os.getcwd(),
        "data": str(Path(arguments.data).resolve()) if arguments.data is not None else None,
        "set": list(arguments.set),
        "ppvi_version": __version__,
    }
    with open(fit_path + RECORD_SUFFIX, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)


# -- commands --------------------------------------------------------------------------------------------------
def _command_fit(arguments: argparse.Namespace, console: _Console) -> int:
    import ppvi

    _check_guide(arguments.guide)
    model, args, kwargs = _model_and_data(arguments)
    console.status(f"fitting {arguments.model} with guide={arguments.guide!r}")
    fit = ppvi.fit(model, *args, guide=arguments.guide, model_kwargs=kwargs or None, **_fit_options(arguments))
    console.result(repr(fit))
    if fit.message:
        console.result(f"message: {fit.message}")
    console.result()
    console.result(_table(fit.summary(num_samples=arguments.draws, seed=arguments.seed or 0)))
    console.result()
    text, diagnosis = _diagnosis_text(fit)
    console.result(text)
    if arguments.out:
        data = fit.to_arviz(num_samples=arguments.draws, seed=arguments.seed or 0)
        data.posterior.attrs.update(
            ppvi_version=__version__, ppvi_model=arguments.model, ppvi_guide=str(arguments.guide),
            ppvi_converged=str(fit.converged), ppvi_verdict=diagnosis.verdict if diagnosis else "none",
        )
        data.to_netcdf(arguments.out)
        console.status(f"wrote {arguments.out} (ArviZ InferenceData, {arguments.draws} draws)")
    if arguments.save_fit:
        fit.save(arguments.save_fit)
        _write_record(arguments.save_fit, arguments)
        console.status(f"wrote {arguments.save_fit} (ppvi fit; ppvi diagnose reads it) and {arguments.save_fit}"
                       f"{RECORD_SUFFIX} (its MODEL and data)")
    if getattr(fit, "interrupted", False):  # Ctrl-C: ppvi.fit returned the fit so far, reported above
        print("ppvi: interrupted: the results above are those of the fit so far", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    if arguments.check and (not fit.converged or (diagnosis is not None and diagnosis.verdict == "bad")):
        why = "did not converge" if not fit.converged else "has PSIS verdict 'bad'"
        raise _CheckFailed(f"--check: the fit {why}")
    return EXIT_OK


def _command_diagnose(arguments: argparse.Namespace, console: _Console) -> int:
    import ppvi

    fit_path = Path(arguments.fit).expanduser()
    if not fit_path.is_file():
        raise UsageError(f"no fit file {arguments.fit!r}: write one with ppvi fit MODEL --data FILE --save-fit FIT")
    record_path = Path(str(fit_path) + RECORD_SUFFIX)
    if arguments.model is None:
        if not record_path.is_file():
            raise UsageError(
                f"{arguments.fit!r} has no record of its MODEL and data ({record_path.name} beside it, written by "
                "ppvi fit --save-fit): give them, ppvi diagnose FIT --model MODEL --data FILE"
            )
        try:
            with open(record_path, encoding="utf-8") as handle:
                record = json.load(handle)
        except (OSError, ValueError) as error:
            raise UsageError(
                f"cannot read {str(record_path)!r}: {_one_line(error)}; give --model and --data"
            ) from error
        if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
            raise UsageError(f"{str(record_path)!r} is not a ppvi fit record: give --model and --data")
        if record.get("folder") and record["folder"] not in sys.path:
            sys.path.insert(0, record["folder"])  # where a module MODEL was imported from
        arguments.model = record["model"]
        arguments.data = arguments.data or record.get("data")
        arguments.set = list(record.get("set", [])) + list(arguments.set)
    model, args, kwargs = _model_and_data(arguments)
    fit = ppvi.load(fit_path, model, *args, model_kwargs=kwargs or None, device=arguments.device)
    console.result(repr(fit))
    if fit.guide_name == "map":
        console.result("Diagnosis: none (a MAP guide is a point mass: it has no density, so no importance weights)")
        return EXIT_OK
    diagnosis = fit.diagnose(num_samples=arguments.draws, seed=arguments.seed)
    low, high = diagnosis.khat_interval
    console.result(f"k-hat:    {diagnosis.khat:.3f} (90% interval [{low:.3f}, {high:.3f}], threshold "
                   f"{diagnosis.threshold:.2f})")
    console.result(f"ESS:      {diagnosis.effective_sample_size:.0f} of {diagnosis.num_samples} draws")
    console.result(f"verdict:  {diagnosis.verdict}")
    console.result(diagnosis.explanation)
    if arguments.check and (not fit.converged or diagnosis.verdict == "bad"):
        why = "did not converge" if not fit.converged else "has PSIS verdict 'bad'"
        raise _CheckFailed(f"--check: the fit {why}")
    return EXIT_OK


def _command_compare(arguments: argparse.Namespace, console: _Console) -> int:
    import ppvi

    for guide in arguments.guides:
        _check_guide(guide)
    reference = _read_reference(arguments.reference) if arguments.reference else None
    model, args, kwargs = _model_and_data(arguments)
    options = _fit_options(arguments)
    from tqdm.auto import tqdm

    fits = {}
    bar = tqdm(arguments.guides, desc="guides", unit="guide", disable=options["progress"] is False,
               file=sys.stderr) if len(arguments.guides) > 1 else arguments.guides
    for guide in bar:
        fits[guide] = ppvi.fit(model, *args, guide=guide, model_kwargs=kwargs or None, **options)
    table = ppvi.compare(model, *args, guides=fits, reference=reference, num_samples=arguments.draws,
                         seed=arguments.seed or 0)
    console.result(_table(table))
    if arguments.csv:
        table.to_csv(arguments.csv)
        console.status(f"wrote {arguments.csv} (the table)")
    if arguments.figure and not arguments.no_figure:
        draws = {label: fit for label, fit in fits.items() if fit.guide_name != "map"} or fits
        parameters = arguments.parameters
        if parameters is None:
            names = list(table.index.get_level_values("parameter"))
            parameters = list(dict.fromkeys(names))[:DEFAULT_FIGURE_PARAMETERS]
        reference_draws = {k: v for k, v in (reference or {}).items() if not isinstance(v, tuple)} or None
        figure = ppvi.plot_comparison(draws, reference=reference_draws, parameters=parameters,
                                      num_samples=min(arguments.draws, 4000), seed=arguments.seed or 0)
        _save_figure(figure, arguments.figure, console, "marginals and contours")
    return EXIT_OK


def _command_calibration(arguments: argparse.Namespace, console: _Console) -> int:
    import ppvi

    kind = arguments.command
    model, args, kwargs = _model_and_data(arguments, optional=arguments.observed)
    if kwargs:
        raise UsageError(
            f"ppvi {kind} passes data positionally, and {sorted(kwargs)} are keyword-only arguments of the model: "
            "give the model a positional parameter for them"
        )
    options = dict(observed=arguments.observed, guide=arguments.guide, num_simulations=arguments.num_simulations,
                   steps=arguments.steps, seed=arguments.seed, device=arguments.device,
                   num_shards=arguments.num_shards, engine=arguments.engine)
    with _dask_client(arguments, console) as client:
        if client is not None and model.__module__.startswith(_FILE_MODULE_PREFIX):
            import cloudpickle  # Dask's serializer

            # A model file is not importable on the workers: send its module by value, as Dask sends __main__.
            cloudpickle.register_pickle_by_value(sys.modules[model.__module__])
        where = "in one vectorized optimisation" if client is None else "in shards on the Dask cluster"
        console.status(f"{kind.upper()}: simulating {arguments.num_simulations} data sets from {arguments.model} "
                       f"and fitting them all {where} (no per-step progress)")
        if kind == "vsbc":
            result = ppvi.vsbc(model, *args, cluster=client, **options)
            table, good = result.to_dataframe(), "symmetric"
        else:
            result = ppvi.sbc(model, *args, num_draws=arguments.num_draws, cluster=client, **options)
            table, good = result.to_dataframe(), "uniform"
    console.result(f"{kind.upper()} of {result.guide} ADVI: {result.num_simulations} replications, "
                   f"{result.num_converged} converged, {result.seconds:.1f} s ({result.engine} engine)")
    if result.engine_reason:
        console.result(f"trained through Pyro: {result.engine_reason}")
    if client is not None:
        console.result(_table(result.shards.set_index("first")))
    console.result(_table(table))
    if arguments.csv:
        table.to_csv(arguments.csv)
        console.status(f"wrote {arguments.csv} (the table)")
    if arguments.figure and not arguments.no_figure:
        what = "histograms of p per component" if kind == "vsbc" else "ECDF differences with 95% bands"
        _save_figure(result.plot(), arguments.figure, console, what)
    flagged = [str(label) for label, verdict in table["verdict"].items() if verdict != good]
    if arguments.check and flagged:
        raise _CheckFailed(f"--check: {kind.upper()} flags {', '.join(flagged)}")
    return EXIT_OK


#: ``ppvi datasets``: what each data set is and how it is obtained ("bundled", "download" or "manual").
DATASETS: dict[str, tuple[str, str]] = {
    "digits": ("scikit-learn's 8x8 handwritten digits, 1,797 images", "bundled"),
    "mnist": ("MNIST, 70,000 28x28 digits (LeCun et al. 1998)", "download"),
    "binarized_mnist": ("statically binarized MNIST (Larochelle & Murray 2011)", "manual"),
    "20news": ("20 Newsgroups bag of words as prepared by NVDM/ProdLDA", "manual"),
    "ap": ("Blei's Associated Press corpus from lda-c", "manual"),
}


def _command_datasets(arguments: argparse.Namespace, console: _Console) -> int:
    from ppvi import data

    if arguments.action == "list":
        rows = []
        for name, (description, how) in DATASETS.items():
            if how == "bundled":
                status, where = "bundled", "(inside scikit-learn)"
            else:
                directory = data.data_directory(name)
                present = directory.is_dir() and any(directory.iterdir())
                status, where = ("present" if present else "absent"), str(directory)
            rows.append((name, how, status, where, description))
        widths = [max(len(row[i]) for row in [("name", "obtain", "status", "where", ""), *rows]) for i in range(4)]
        header = ("name", "obtain", "status", "where", "what")
        for row in [header, *rows]:
            cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
            console.result("  ".join([*cells, row[4]]))
        return EXIT_OK
    name = arguments.name
    if name not in DATASETS:
        raise UsageError(f"unknown data set {name!r}: use one of {', '.join(DATASETS)} (ppvi datasets list)")
    how = DATASETS[name][1]
    if how == "bundled":
        images = data.digits()
        console.result(f"{name}: bundled with scikit-learn, nothing to download "
                       f"({len(images.train_images)} training and {len(images.test_images)} test images)")
        return EXIT_OK
    if name == "mnist":
        extra = {"mirrors": tuple(arguments.mirror)} if arguments.mirror else {}
        console.status(f"mnist: looking in {data.data_directory('mnist')}, downloading what is missing")
        images = data.mnist(download=True, **extra)
        console.result(f"mnist: ready in {data.data_directory('mnist')} ({len(images.train_images)} training and "
                       f"{len(images.test_images)} test images, checksums verified)")
        return EXIT_OK
    loader = data.binarized_mnist if name == "binarized_mnist" else lambda: data.corpus(name)
    try:
        loader()
    except FileNotFoundError as error:
        raise RuntimeError(f"{name} cannot be downloaded by ppvi (its licence or format needs a manual step): "
                           f"{_one_line(error)}") from error
    console.result(f"{name}: already present in {data.data_directory(name)}")
    return EXIT_OK


# -- parser ----------------------------------------------------------------------------------------------------
def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("output")
    # SUPPRESS: given before or after the command, neither parser overwrites the other's value with a default.
    group.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="no progress bars or status lines on stderr (results, warnings and errors still print)")
    group.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="on an error, print the traceback before the one-line message")
    return common


def _model_options(parser: argparse.ArgumentParser, data_required: bool = False) -> None:
    parser.add_argument("model", metavar="MODEL", help="package.module:function or path/to/file.py:function")
    parser.add_argument("--data", metavar="FILE", required=data_required,
                        help="CSV, JSON or NPZ whose names are the model's argument names")
    parser.add_argument("--set", metavar="NAME=VALUE", action="append", default=[],
                        help="one more model argument (VALUE is JSON: 2, 0.5, [1, 2]); repeatable")


def _training_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--steps", type=int, help="train exactly this many steps (default: until the stopping rule)")
    group.add_argument("--max-steps", type=int, help="cap on steps when stopping on the rule (ppvi.fit's default)")
    group.add_argument("--learning-rate", type=float, help="Adam's learning rate (default: ppvi.fit's)")
    group.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    group.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto: a GPU when there is one)")
    group.add_argument("--dtype", default="auto", help="auto, float32 or float64 (default auto)")
    group.add_argument("--progress", action="store_true",
                       help="show the progress bar even when stderr is not a terminal")


@contextlib.contextmanager
def _dask_client(arguments: argparse.Namespace, console: _Console):
    """A Dask client for ``--scheduler ADDRESS`` or ``--workers N`` (a local cluster of N processes, closed
    afterwards), else ``None``."""
    if arguments.scheduler is None and arguments.workers is None:
        if arguments.num_shards is not None:
            raise UsageError("--num-shards needs a Dask cluster: add --workers N or --scheduler ADDRESS")
        yield None
        return
    if arguments.scheduler is not None and arguments.workers is not None:
        raise UsageError("give --scheduler ADDRESS (a running cluster) or --workers N (a local one), not both")
    if arguments.workers is not None and arguments.workers < 1:
        raise UsageError(f"--workers must be a positive integer, got {arguments.workers}")
    try:
        from distributed import Client, LocalCluster
    except ImportError as error:
        raise UsageError(
            "--scheduler and --workers need Dask's distributed scheduler: pip install 'ppvi[distributed]'"
        ) from error
    if arguments.scheduler is not None:
        console.status(f"connecting to the Dask scheduler at {arguments.scheduler}")
        with Client(arguments.scheduler, timeout="30s") as client:
            yield client
        return
    console.status(f"starting a local Dask cluster of {arguments.workers} worker processes")
    with LocalCluster(n_workers=arguments.workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        yield client


def _calibration_options(parser: argparse.ArgumentParser, kind: str) -> None:
    _model_options(parser)
    parser.add_argument("--observed", nargs="+", required=True, metavar="SITE",
                        help="names of the observed sample sites, simulated afresh in every replication")
    parser.add_argument("-M", "--num-simulations", type=int, default=1000, help="replications (default 1000)")
    parser.add_argument("--guide", default="meanfield", choices=("meanfield", "fullrank"),
                        help="Gaussian guide family (default meanfield)")
    parser.add_argument("--steps", type=int, help="train every replication this many steps (default: its own rule)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    parser.add_argument("--engine", default="auto", choices=("auto", "pyro", "traced", "compiled"),
                        help="training path: compiled (TorchInductor; from 500 replications under auto), traced, "
                             "or pyro (default auto)")
    cluster = parser.add_argument_group("cluster (pip install 'ppvi[distributed]')")
    cluster.add_argument("--scheduler", metavar="ADDRESS",
                         help="fit the replications in shards on the Dask cluster whose scheduler is at ADDRESS "
                              "(e.g. tcp://10.0.0.5:8786)")
    cluster.add_argument("--workers", type=int, metavar="N",
                         help="fit the replications in shards on a local Dask cluster of N worker processes")
    cluster.add_argument("--num-shards", type=int, metavar="K",
                         help="shards of replications (default: one per worker); the result is the same")
    if kind == "sbc":
        parser.add_argument("-L", "--num-draws", type=int, default=99,
                            help="guide draws per replication; ranks take L + 1 values (default 99)")
    parser.add_argument("--figure", default=f"{kind}.png", metavar="PATH",
                        help=f"where to draw it (default {kind}.png)")
    parser.add_argument("--no-figure", action="store_true", help="draw no figure")
    parser.add_argument("--csv", metavar="PATH", help="also write the table as CSV")
    flag = "asymmetric" if kind == "vsbc" else "non-uniform"
    parser.add_argument("--check", action="store_true",
                        help=f"exit with status 3 when a component is flagged ({flag})")


def build_parser() -> argparse.ArgumentParser:
    """The ``ppvi`` argument parser (one subcommand per task)."""
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="ppvi", parents=[common], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Variational inference you can trust, on Pyro: fit, diagnose, compare, calibrate.",
    )
    parser.add_argument("--version", action="version", version=f"ppvi {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[common], help=help_text, description=help_text, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)

    fit = command("fit", "fit a guide; print the summary and the PSIS diagnosis; write ArviZ netCDF")
    _model_options(fit)
    fit.add_argument("--guide", default="meanfield",
                     help="auto, map, laplace, meanfield, fullrank, lowrank, flow (default meanfield)")
    _training_options(fit)
    fit.add_argument("--draws", type=int, default=DEFAULT_DRAWS, help=f"guide draws behind the summary, diagnosis "
                     f"and netCDF (default {DEFAULT_DRAWS})")
    fit.add_argument("--out", default="fit.nc", metavar="PATH",
                     help="ArviZ netCDF of the draws (default fit.nc; '' for none)")
    fit.add_argument("--save-fit", metavar="FIT", help="also save the ppvi fit (for ppvi diagnose) and its record")
    fit.add_argument("--check", action="store_true",
                     help="exit with status 3 when the fit did not converge or its PSIS verdict is 'bad'")

    compare = command("compare", "fit several guides; print the comparison table; draw marginals and contours")
    _model_options(compare)
    compare.add_argument("--guides", nargs="+", default=["meanfield", "fullrank"], metavar="GUIDE",
                         help="guides to fit (default meanfield fullrank)")
    compare.add_argument("--reference", metavar="DRAWS",
                         help="reference posterior draws (ArviZ netCDF .nc, or .npz of arrays per site)")
    _training_options(compare)
    compare.add_argument("--draws", type=int, default=DEFAULT_DRAWS, help=f"guide draws per guide (default "
                         f"{DEFAULT_DRAWS})")
    compare.add_argument("--parameters", nargs="+", metavar="NAME",
                         help=f"components to draw (default the first {DEFAULT_FIGURE_PARAMETERS})")
    compare.add_argument("--figure", default="compare.png", metavar="PATH", help="where to draw (default compare.png)")
    compare.add_argument("--no-figure", action="store_true", help="draw no figure")
    compare.add_argument("--csv", metavar="PATH", help="also write the table as CSV")

    diagnose = command("diagnose", "PSIS diagnosis of a saved fit: k-hat, ESS, verdict and its explanation")
    diagnose.add_argument("fit", metavar="FIT", help="a fit saved by ppvi fit --save-fit FIT")
    diagnose.add_argument("--model", metavar="MODEL", help="the fit's model (default: from FIT's record)")
    diagnose.add_argument("--data", metavar="FILE", help="the fit's data (default: from FIT's record)")
    diagnose.add_argument("--set", metavar="NAME=VALUE", action="append", default=[], help="as for ppvi fit")
    diagnose.add_argument("--draws", type=int, default=DEFAULT_DRAWS, help=f"guide draws (default {DEFAULT_DRAWS})")
    diagnose.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    diagnose.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    diagnose.add_argument("--check", action="store_true",
                          help="exit with status 3 when the fit did not converge or its PSIS verdict is 'bad'")

    _calibration_options(command("vsbc", "VSBC (Yao et al. 2018): is P_q(theta < theta0) symmetric? table and "
                                 "histograms"), "vsbc")
    _calibration_options(command("sbc", "SBC (Talts et al. 2018): are the ranks uniform? table and ECDF plots"),
                         "sbc")

    datasets = command("datasets", "list the data sets, or download one")
    actions = datasets.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", parents=[common], help="name, how to obtain it, whether it is here, where")
    download = actions.add_parser("download", parents=[common], help="fetch a data set (checksums verified)")
    download.add_argument("name", metavar="NAME", help=", ".join(DATASETS))
    download.add_argument("--mirror", action="append", metavar="URL", help="URL prefix to download from (repeatable; "
                          "default the official mirrors)")
    return parser


_COMMANDS = {
    "fit": _command_fit, "compare": _command_compare, "diagnose": _command_diagnose,
    "vsbc": _command_calibration, "sbc": _command_calibration, "datasets": _command_datasets,
}


def _one_line(error: BaseException | str) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"ppvi: warning: {category.__name__}: {_one_line(message)}", file=sys.stderr, flush=True)


def _fail(status: int, message: str, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    hint = "" if debug or status == EXIT_CHECK_FAILED else " (--debug shows the traceback)"
    print(f"ppvi: error: {message}{hint}", file=sys.stderr, flush=True)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ppvi`` command line.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments after ``ppvi`` (default ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status: :data:`EXIT_OK`, :data:`EXIT_ERROR`, :data:`EXIT_USAGE`, :data:`EXIT_CHECK_FAILED` or
        :data:`EXIT_INTERRUPTED`. (``--help``, ``--version`` and argparse's own usage errors exit directly, with 0
        and 2.)
    """
    os.environ.setdefault("MPLBACKEND", "Agg")  # figures are written to files, never shown
    arguments = build_parser().parse_args(argv)
    arguments.quiet = getattr(arguments, "quiet", False)
    arguments.debug = getattr(arguments, "debug", False)
    console = _Console(arguments.quiet)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing a major refactor", category=FutureWarning)
        try:
            return _COMMANDS[arguments.command](arguments, console)
        except UsageError as error:
            return _fail(EXIT_USAGE, _one_line(error), arguments.debug)
        except _CheckFailed as error:
            return _fail(EXIT_CHECK_FAILED, _one_line(error), arguments.debug)
        except KeyboardInterrupt:
            return _fail(EXIT_INTERRUPTED, "interrupted", arguments.debug)
        except Exception as error:  # noqa: BLE001 - every error becomes one line; --debug shows the traceback
            common = (ValueError, TypeError, RuntimeError, OSError)
            prefix = "" if isinstance(error, common) else f"{type(error).__name__}: "
            return _fail(EXIT_ERROR, prefix + _one_line(error), arguments.debug)
