"""Saving and loading fits without pickle.

A fit is saved as a dict of tensors, numbers and strings written by :func:`torch.save` and read back with
``torch.load(..., weights_only=True)``, which refuses arbitrary objects: loading a file cannot run code. Saving
never writes what that loader cannot read back: guide options must be plain data (:data:`PLAIN_DATA`; numpy
scalars are saved as Python numbers); an ``init_loc_fn`` function is left out, with the reason recorded in the
file and in the loaded fit's ``message``, because it only chose the starting point that the saved parameters
replace; any other function or object is refused with an error naming the option. A file whose pickle holds other
objects is refused with a :class:`FitFileError` that names it, never by falling back to full pickle.

The model and data are not saved (they are code and the user's); :func:`load` takes them again and rebuilds the
guide's structure from them before restoring its parameters. So that a fit is never restored into a model or data
it does not belong to, the file records what it belongs to (format version 2):

- the model's latent sites, in order, with their shapes (the full size of a subsampled plate, so a fit made on
  minibatches loads without them) and their constraints (``str(support)``);
- the guide's registry name (or, for a guide of your own, its class) and the floating dtype;
- a SHA-256 fingerprint of the data (:func:`data_fingerprint`);
- the ppvi version that wrote it (for messages; the format version decides what can be read).

:func:`load` checks each against the model and data it is given and raises a :class:`ValueError` that says what
differs. Writing is atomic: the fit goes to a temporary file in the target's folder that replaces the target only
once complete, so a failed or interrupted save leaves the previous file as it was.

Files of format version 1 (before this record existed) still load, without the checks they cannot support: the
loaded fit's ``message`` says so. Save such a fit again to record its model and data.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import numbers
import os
import pickle
import re
import secrets
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from ppvi.inputs import random_state_kept

#: Written into every file; bumped when the layout changes.
FORMAT = "ppvi-fit"
#: Version 2 adds the record of what the fit belongs to (latent sites, data fingerprint, ppvi version).
VERSION = 2
#: Format versions :func:`load` reads; version 1 files are loaded without the model and data checks.
READABLE_VERSIONS = (1, 2)
#: Keys every file of any readable version holds, with the type each value must have.
REQUIRED_KEYS: dict[str, type | tuple[type, ...]] = {
    "version": int,
    "guide_name": str,
    "guide_options": dict,
    "guide_state": dict,
    "param_store": dict,
    "elbo": torch.Tensor,
    "steps": int,
    "seconds": (int, float),
    "converged": bool,
    "message": str,
    "dtype": str,
}
#: Keys version 2 adds to :data:`REQUIRED_KEYS`.
RECORD_KEYS: dict[str, type | tuple[type, ...]] = {
    "latent_sites": list,
    "data_fingerprint": str,
    "ppvi_version": str,
    "model": str,
    "guide_class": str,
    "dropped_guide_options": dict,
}
#: Guide options that may hold a function and are then left out of the file (with the reason recorded), because
#: they only choose the guide's starting point, which the saved parameters replace on loading.
DROPPABLE_GUIDE_OPTIONS = {
    "init_loc_fn": "it only chose the starting point, which the saved parameters replace",
}
#: Model keyword arguments left out of the data fingerprint: they choose how the data are visited, not the data.
UNFINGERPRINTED_KEYWORDS = frozenset({"subsample_size"})
#: What a saved guide option may hold: ``torch.load(weights_only=True)`` reads these back without pickle.
PLAIN_DATA = "None, bool, int, float, str, and lists, tuples and dicts of them"


class FitFileError(ValueError):
    """A file :func:`load` cannot read as a ppvi fit: missing pieces, truncated or corrupt, not written by
    :meth:`ppvi.Fit.save`, or holding Python objects whose unpickling could run code."""


def ppvi_version() -> str:
    """The installed ppvi's version, or ``"unknown"`` when ppvi runs from a source tree that is not installed."""
    try:
        return importlib.metadata.version("ppvi")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# -- what a fit belongs to ---------------------------------------------------------------------------------------
def data_fingerprint(args: tuple, kwargs: dict) -> str:
    """SHA-256 over the model's data, as :func:`ppvi.fit` and :func:`load` pass them to the model.

    Positional arguments count in order: tensors by dtype, shape and bytes (on the CPU, so the device does not
    matter), numbers, strings and ``None`` by value, lists, tuples and dicts element by element, other objects by
    their type only. Keyword arguments count by name when they are tensors or numbers, except those in
    :data:`UNFINGERPRINTED_KEYWORDS`.

    Parameters
    ----------
    args : tuple
        Positional arguments of the model (after :func:`ppvi.inputs.prepare_arguments`).
    kwargs : dict
        Keyword arguments of the model.

    Returns
    -------
    str
        The hexadecimal digest.
    """
    digest = hashlib.sha256()
    for position, value in enumerate(args):
        _update(digest, f"argument {position}", value)
    for key in sorted(kwargs):
        value = kwargs[key]
        if key in UNFINGERPRINTED_KEYWORDS or not isinstance(value, (torch.Tensor, np.ndarray, numbers.Number)):
            continue
        _update(digest, f"keyword {key}", value)
    return digest.hexdigest()


def _update(digest, label: str, value: Any) -> None:
    if isinstance(value, np.ndarray) and value.dtype.kind in "biufc":
        value = torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, torch.Tensor):
        tensor = value.detach().to("cpu")
        if tensor.is_sparse:
            tensor = tensor.to_dense()
        tensor = tensor.resolve_conj().resolve_neg().contiguous().reshape(-1)
        digest.update(f"{label}|tensor|{tensor.dtype}|{tuple(value.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, np.generic):
        _update(digest, label, value.item())
    elif value is None or isinstance(value, (numbers.Number, str)):
        digest.update(f"{label}|{type(value).__name__}|{value!r}|".encode())
    elif isinstance(value, (list, tuple)):
        digest.update(f"{label}|{type(value).__name__}|{len(value)}|".encode())
        for index, item in enumerate(value):
            _update(digest, f"{label}[{index}]", item)
    elif isinstance(value, dict):
        digest.update(f"{label}|dict|{len(value)}|".encode())
        for key in sorted(value, key=repr):
            _update(digest, f"{label}[{key!r}]", value[key])
    else:
        digest.update(f"{label}|{type(value).__module__}.{type(value).__qualname__}|".encode())


def latent_sites(model: Callable, args: tuple, kwargs: dict) -> list[dict[str, Any]]:
    """The model's latent sample sites, in order, as ``{"name", "shape", "constraint"}`` records.

    ``shape`` is the shape of one value with every subsampled plate at its full size; ``constraint`` is
    ``str(support)`` without the device and dtype of tensor bounds. Call it inside
    :func:`ppvi.inputs.computation`, with prepared arguments. The global random state is left as it was.
    """
    from ppvi.fit import _structure_trace

    with random_state_kept():
        trace = _structure_trace(model, args, kwargs)
    return [
        {"name": name, "shape": _full_shape(site), "constraint": _describe_constraint(site["fn"].support)}
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    ]


def _full_shape(site: dict) -> list[int]:
    shape = list(site["value"].shape)
    event_dims = len(getattr(site["fn"], "event_shape", ()))
    for frame in site["cond_indep_stack"]:
        full_size = getattr(frame, "full_size", None)
        if not frame.vectorized or frame.dim is None or full_size is None:
            continue
        index = len(shape) - event_dims + frame.dim
        if 0 <= index < len(shape) and shape[index] == frame.size:
            shape[index] = int(full_size)
    return [int(size) for size in shape]


def _describe_constraint(support: Any) -> str:
    return re.sub(r", (device|dtype)=[^,)]*", "", str(support))


def _qualified_name(value: Any) -> str:
    target = value if callable(value) and not isinstance(value, torch.nn.Module) else type(value)
    module = getattr(target, "__module__", None) or type(target).__module__
    name = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{module}.{name}"


# -- saving ------------------------------------------------------------------------------------------------------
def _plain_data_problem(value: Any, allow_tensors: bool = False) -> str | None:
    """Why ``value`` cannot be read back by ``torch.load(weights_only=True)``, or ``None`` when it can.

    Types are checked exactly: a subclass (an ``IntEnum``, a ``namedtuple``, a ``defaultdict``) pickles as a
    reference to its class, which that loader refuses.
    """
    if value is None or type(value) in (bool, int, float, str):
        return None
    if allow_tensors and type(value) in (torch.Tensor, torch.nn.Parameter):
        return None
    if type(value) in (list, tuple):
        for index, item in enumerate(value):
            problem = _plain_data_problem(item, allow_tensors)
            if problem is not None:
                return f"{problem} at index {index}"
        return None
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            if not (key is None or type(key) in (bool, int, float, str)):
                return f"a dict key of type {type(key).__name__} ({key!r})"
            problem = _plain_data_problem(item, allow_tensors)
            if problem is not None:
                return f"{problem} under key {key!r}"
        return None
    if callable(value) and not isinstance(value, torch.nn.Module):
        name = getattr(value, "__qualname__", None) or getattr(getattr(value, "func", None), "__qualname__", None)
        return f"a function ({name or repr(value)})"
    return f"a {type(value).__module__}.{type(value).__qualname__} object"


def _python_scalars(value: Any) -> Any:
    """``value`` with numpy scalars (``np.float64(0.1)``, ``np.int64(3)``) as the Python numbers they stand for."""
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return value.item()
    if type(value) in (list, tuple):
        return type(value)(_python_scalars(item) for item in value)
    if type(value) is dict:
        return {key: _python_scalars(item) for key, item in value.items()}
    return value


def _saved_guide_options(options: dict) -> tuple[dict, dict[str, str]]:
    """The guide options that go into the file and, for those left out, why; refuse any other non-plain option."""
    kept: dict[str, Any] = {}
    dropped: dict[str, str] = {}
    for name, value in options.items():
        value = _python_scalars(value)
        problem = _plain_data_problem(value)
        if problem is None:
            kept[name] = value
        elif name in DROPPABLE_GUIDE_OPTIONS and callable(value):
            dropped[name] = f"it held {problem}, which cannot be saved without pickle; {DROPPABLE_GUIDE_OPTIONS[name]}"
        else:
            raise ValueError(
                f"guide option {name!r} holds {problem}, which cannot be saved without pickle: a ppvi file holds only "
                f"plain data ({PLAIN_DATA}) so that loading it cannot run code. Give the option as plain data (a "
                "number or a name) when you fit, or keep this fit in memory and save its draws (fit.sample()) instead."
            )
    return kept, dropped


def save_fit(fit, path: str | os.PathLike) -> None:
    """Write ``fit``'s guide parameters, model parameters from Pyro's param store, training record and what the
    fit belongs to (latent sites, data fingerprint, guide, dtype, ppvi version) to ``path``.

    The file is written to a temporary file in the same folder and moved onto ``path`` once complete, so a save
    that fails or is interrupted leaves a previous file at ``path`` untouched (and no temporary behind).

    Parameters
    ----------
    fit : ppvi.Fit
        The fit to save.
    path : str or os.PathLike
        Where to write it.

    Raises
    ------
    ValueError
        A guide option holds something other than plain data (a function other than ``init_loc_fn``, an object),
        or the guide is a plain function whose parameters are not in Pyro's param store.
    """
    from ppvi.inputs import computation

    guide = fit.guide
    if not isinstance(guide, torch.nn.Module) and not pyro.get_param_store().keys():
        raise ValueError("this guide is a plain function: its parameters live in Pyro's param store, which is empty")
    guide_options, dropped = _saved_guide_options(dict(fit.guide_options))
    with computation(fit.device, fit.dtype):
        sites = latent_sites(fit.model, fit.args, fit.kwargs)
    state: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "guide_name": fit.guide_name or "",
        "guide_options": guide_options,
        "dropped_guide_options": dropped,
        "guide_state": guide.state_dict() if isinstance(guide, torch.nn.Module) else {},
        "param_store": {name: pyro.get_param_store()._params[name].detach() for name in pyro.get_param_store().keys()},
        "elbo": torch.as_tensor(np.asarray(fit.elbo, dtype=np.float64)),
        "steps": int(fit.steps),
        "seconds": float(fit.seconds),
        "converged": bool(fit.converged),
        "message": str(fit.message),
        "dtype": str(fit.dtype).removeprefix("torch."),
        "latent_sites": sites,
        "data_fingerprint": data_fingerprint(fit.args, fit.kwargs),
        "ppvi_version": ppvi_version(),
        "model": _qualified_name(fit.model),
        "guide_class": _qualified_name(guide),
    }
    problem = _plain_data_problem(state, allow_tensors=True)
    if problem is not None:  # the guide's state_dict or the param store holds something torch cannot load safely
        raise ValueError(
            f"this fit holds {problem}, which cannot be saved without pickle: a ppvi file holds only tensors and "
            f"plain data ({PLAIN_DATA}). Keep the guide's state in tensors and plain values."
        )
    _write_atomically(state, path)


def _write_atomically(state: dict, path: str | os.PathLike) -> None:
    target = os.path.realpath(os.fspath(path))  # through a symbolic link, replace the file it points to
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot save to {os.fspath(path)!r}: the folder {folder!r} does not exist; create it")
    temporary = os.path.join(folder, f".{os.path.basename(target)}.{secrets.token_hex(8)}.tmp")
    try:
        with open(temporary, "xb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:  # an interrupt too: never leave the temporary behind
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    with contextlib.suppress(OSError, AttributeError):  # make the rename itself durable where the OS allows it
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


# -- loading -----------------------------------------------------------------------------------------------------
def _read(path: str | os.PathLike) -> dict:
    """The file's dict, by ``torch.load(weights_only=True)``, or a :class:`FitFileError` that names the file."""
    name = os.fspath(path)
    if not os.path.exists(name):
        raise FileNotFoundError(f"no saved fit at {name!r}")
    if os.path.isdir(name):
        raise FitFileError(f"{name!r} is a folder, not a ppvi fit file: pass the path of the file Fit.save wrote")
    if os.path.getsize(name) == 0:
        raise FitFileError(f"{name!r} is empty, so not a ppvi fit file: the save that wrote it did not complete")
    try:
        with warnings.catch_warnings():  # torch's advice on files it refuses is not ours to pass on
            warnings.simplefilter("ignore")
            state = torch.load(name, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        if refused:
            raise FitFileError(
                f"{name!r} is not a ppvi fit file: it holds Python objects other than tensors and plain data (it asks "
                f"for {refused.group(1)}), and unpickling them could run arbitrary code, so ppvi refuses to load it. "
                "Files written by Fit.save never hold such objects: load only fits saved by ppvi, or fit again."
            ) from None
        raise FitFileError(
            f"{name!r} is not a ppvi fit file, or is corrupt: its contents cannot be read without full unpickling, "
            "which could run arbitrary code, so ppvi refuses it. "
            "Load only files written by Fit.save, and save the fit again if this one was damaged."
        ) from None
    except Exception as error:  # noqa: BLE001 - torch raises many types (RuntimeError, EOFError, KeyError, ...)
        raise FitFileError(
            f"{name!r} is not a ppvi fit file, or is truncated or corrupt: torch could not read it "
            f"({_first_sentence(error)}). Save the fit again, or check the path."
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise FitFileError(f"{name!r} is not a ppvi fit file: it is a torch file without ppvi's format marker")
    version = state.get("version")
    if isinstance(version, int) and version > max(READABLE_VERSIONS):
        raise FitFileError(
            f"{name!r} was written by a newer ppvi (format {version}, ppvi {state.get('ppvi_version', 'unknown')}); "
            f"this ppvi ({ppvi_version()}) reads formats up to {max(READABLE_VERSIONS)}: upgrade ppvi to load it"
        )
    expected = dict(REQUIRED_KEYS, **(RECORD_KEYS if version == VERSION else {}))
    damaged = [key for key, kind in expected.items() if not isinstance(state.get(key), kind)]
    if "latent_sites" in expected and "latent_sites" not in damaged and not all(
        _is_site_record(site) for site in state["latent_sites"]
    ):
        damaged.append("latent_sites")
    if version not in READABLE_VERSIONS or damaged:
        what = f"missing or malformed {damaged}" if damaged else f"unknown format version {version!r}"
        raise FitFileError(f"{name!r} is a damaged ppvi fit file: {what}. Save the fit again.")
    dtype = getattr(torch, state["dtype"], None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise FitFileError(f"{name!r} is a damaged ppvi fit file: {state['dtype']!r} is not a floating torch dtype")
    return state


def _is_site_record(site: Any) -> bool:
    return (
        isinstance(site, dict)
        and isinstance(site.get("name"), str)
        and isinstance(site.get("constraint"), str)
        and isinstance(site.get("shape"), list)
        and all(type(size) is int for size in site["shape"])
    )


def _first_sentence(error: BaseException) -> str:
    text = str(error).strip().split("\n")[0].split(". ")[0].strip() or "no details"
    text = text if "weights_only" not in text else "unreadable pickle"
    return f"{type(error).__name__}: {text}"


def _format_sites(sites: list[dict]) -> str:
    names = [site["name"] for site in sites]
    shapes = {site["name"]: tuple(site["shape"]) for site in sites}
    return f"{names} with shapes {shapes}"


def _site_problems(saved: list[dict], current: list[dict], model_name: str) -> list[str]:
    """What differs between the latent sites the file was saved for and the model's."""
    if [site["name"] for site in saved] != [site["name"] for site in current]:
        return [
            f"the file was saved for latent sites {_format_sites(saved)} (model {model_name!r}), this model has "
            f"{_format_sites(current)}: load it with the model the fit was made with"
        ]
    problems = []
    by_name = {site["name"]: site for site in current}
    shapes = [
        f"{site['name']!r} is {tuple(site['shape'])} in the file and {tuple(by_name[site['name']]['shape'])} here"
        for site in saved
        if list(site["shape"]) != list(by_name[site["name"]]["shape"])
    ]
    if shapes:
        problems.append(
            "the latent sites have other shapes: " + ", ".join(shapes) + " (shapes follow the data's size and the "
            "model's arguments): load it with the data, arguments and model_kwargs the fit was made with"
        )
    constraints = [
        f"{site['name']!r} is {site['constraint']} in the file and {by_name[site['name']]['constraint']} here"
        for site in saved
        if site["constraint"] != by_name[site["name"]]["constraint"]
    ]
    if constraints:
        problems.append(
            "the latent sites have other constraints: " + ", ".join(constraints) + ": the model or its arguments "
            "are not those the fit was made with; load it with those"
        )
    return problems


def load(
    path: str | os.PathLike,
    model: Callable,
    *args: Any,
    guide: Callable | None = None,
    model_kwargs: dict | None = None,
    device: str | torch.device = "auto",
    check_data: bool = True,
):
    """Load a fit saved by :meth:`ppvi.Fit.save`, after checking that it belongs to ``model`` and its data.

    Parameters
    ----------
    path : str or os.PathLike
        The file.
    model : callable
        The same model the fit was made with: its latent sites (names, shapes, constraints) must be those the
        file records.
    *args
        The same data (they define the guide's structure: its latent sites and their shapes). Their SHA-256
        fingerprint (:func:`data_fingerprint`) must match the file's unless ``check_data=False``.
    guide : callable, optional
        For a fit made with a guide of your own, a fresh instance of it; registry guides are rebuilt by name (and
        passing one for them is an error).
    model_kwargs : dict, optional
        Keyword arguments of the model (``subsample_size`` may differ from the fit's: it is not part of the data).
    device : str or torch.device
        Where to place the loaded fit.
    check_data : bool
        ``False`` loads the fit with data other than those it was made with (new data of the same shape, to
        predict, say): the latent sites are still checked, the data fingerprint is not. The posterior is still
        the one fitted to the original data.

    Returns
    -------
    ppvi.Fit

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    FitFileError
        (a ``ValueError``) The file is not a readable ppvi fit: truncated, corrupt, another kind of file, or a
        pickle holding objects whose loading could run code (refused, never loaded with full pickle).
    ValueError
        The file does not belong to this model or these data (the message says what differs), or the guide
        argument does not fit the file.

    Notes
    -----
    Files of format version 1 record neither latent sites nor a data fingerprint: they load without those checks,
    and the loaded fit's ``message`` says so. Save the fit again to record them.
    """
    from ppvi.fit import Fit, _max_plate_nesting, _structure_trace
    from ppvi.guides import GUIDES
    from ppvi.inputs import computation, prepare_arguments, resolve_device

    state = _read(path)
    file = os.fspath(path)
    resolved_device = resolve_device(device)
    dtype = getattr(torch, state["dtype"])
    name = state["guide_name"] or None
    recorded = state["version"] >= 2
    saved_class = state.get("guide_class", "a guide of your own")
    if name is None and guide is None:
        raise ValueError(
            f"{file!r} holds a fit made with a guide of your own ({saved_class}): pass a fresh instance as "
            "load(..., guide=...)"
        )
    if name is not None and guide is not None:
        raise ValueError(
            f"{file!r} holds a fit with the registry guide {name!r}, which load rebuilds by name: the guide you "
            "passed would be ignored. Drop guide=..., or load a file saved from a fit with your own guide."
        )
    if name is not None and name not in GUIDES:
        raise ValueError(
            f"{file!r} holds a fit with the guide {name!r}, which is not in ppvi.GUIDES: register it "
            f"(ppvi.GUIDES[{name!r}] = ppvi.GuideSpec(...)) as it was when the fit was made, then load"
        )
    notes = []
    with computation(resolved_device, dtype):
        args, kwargs = prepare_arguments(model, args, dict(model_kwargs or {}), resolved_device, dtype)
        if recorded:
            problems = _site_problems(state["latent_sites"], latent_sites(model, args, kwargs), state["model"])
            data_differ = data_fingerprint(args, kwargs) != state["data_fingerprint"]
            if problems:
                if data_differ and check_data:
                    problems.append("the data differ from those the fit was made with, too")
                raise ValueError(f"cannot load {file!r} into this model: " + "; ".join(problems))
            if data_differ and check_data:
                raise ValueError(
                    f"cannot load {file!r} with these data: they differ from the data the fit was made with (their "
                    "SHA-256 fingerprint over dtype, shape and values does not match; the model's latent sites do). "
                    "If you mean to use the fit with other data of the same shape anyway, load(..., check_data=False)."
                )
        else:
            notes.append(
                "loaded from a format-1 file, which records neither the model's latent sites nor a fingerprint of "
                "the data, so neither was checked: save the fit again to record them"
            )
        notes.extend(f"guide option {option!r} was not saved: {why}" for option, why in
                     state.get("dropped_guide_options", {}).items())
        guide_object = GUIDES[name].factory(model, **state["guide_options"]) if name else guide
        if isinstance(guide_object, torch.nn.Module):
            guide_object.to(device=resolved_device)
        with random_state_kept(), poutine.block(), torch.no_grad():
            guide_object(*args, **kwargs)
        try:
            _restore(guide_object, state, resolved_device)
        except RuntimeError as error:
            raise ValueError(
                f"the parameters in {file!r} do not fit the guide rebuilt from this model and data (saved with "
                f"{saved_class}): {_first_sentence(error)}. Load it with the model, data, guide and guide options "
                "the fit was made with."
            ) from None
        with random_state_kept():
            structure = _structure_trace(model, args, kwargs)
    message = "; ".join([str(state["message"]), *notes]) if notes else str(state["message"])
    elbo = state["elbo"].detach().to(device="cpu", dtype=torch.float64).numpy()
    return Fit(
        model, guide_object, args, kwargs, guide_name=name, guide_options=dict(state["guide_options"]),
        elbo=np.asarray(elbo, dtype=np.float64), steps=int(state["steps"]), seconds=float(state["seconds"]),
        device=resolved_device, dtype=dtype, converged=bool(state["converged"]), laplace=None,
        message=message, max_plate_nesting=_max_plate_nesting(structure),
    )


def _restore(guide: Callable, state: dict, device: torch.device) -> None:
    """Copy the saved Pyro params and guide state into the rebuilt guide."""
    store = pyro.get_param_store()
    for param_name, value in state["param_store"].items():
        if param_name in store:
            with torch.no_grad():
                store._params[param_name].copy_(value)
        else:
            store._params[param_name] = value.to(device).requires_grad_(True)
    if isinstance(guide, torch.nn.Module):
        guide.load_state_dict(state["guide_state"])
        guide.to(device=device)
