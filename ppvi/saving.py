"""``ppvi.saving``: writing a fit to a file without pickle (the format :mod:`ppvi.serialization` describes and reads).

:func:`save_fit` writes what :meth:`ppvi.Fit.save` saves, atomically; :func:`latent_sites` and
:func:`data_fingerprint` record what the fit belongs to, which :func:`ppvi.serialization.load` checks. This module
knows fits only by their attributes and imports neither :mod:`ppvi.result` nor :mod:`ppvi.serialization`, so
``Fit.save`` can use it and ``load`` can build a ``Fit`` without an import cycle.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import numbers
import os
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import pyro
import torch
from pyro.poutine.util import site_is_subsample

from ppvi.inputs import computation, random_state_kept
from ppvi.tracing import structure_trace

__all__ = [
    "DROPPABLE_GUIDE_OPTIONS",
    "FORMAT",
    "PLAIN_DATA",
    "UNFINGERPRINTED_KEYWORDS",
    "VERSION",
    "data_fingerprint",
    "latent_sites",
    "plain_data_problem",
    "ppvi_version",
    "save_fit",
]

#: Written into every file; bumped when the layout changes.
FORMAT = "ppvi-fit"
#: Version 2 adds the record of what the fit belongs to (latent sites, data fingerprint, ppvi version).
VERSION = 2
#: Guide options that may hold a function and are then left out of the file (with the reason recorded), because
#: they only choose the guide's starting point, which the saved parameters replace on loading.
DROPPABLE_GUIDE_OPTIONS = {
    "init_loc_fn": "it only chose the starting point, which the saved parameters replace",
}
#: Model keyword arguments left out of the data fingerprint: they choose how the data are visited, not the data.
UNFINGERPRINTED_KEYWORDS = frozenset({"subsample_size"})
#: What a saved guide option may hold: ``torch.load(weights_only=True)`` reads these back without pickle.
PLAIN_DATA = "None, bool, int, float, str, and lists, tuples and dicts of them"


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
    with random_state_kept():
        trace = structure_trace(model, args, kwargs)
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
def plain_data_problem(value: Any, allow_tensors: bool = False) -> str | None:
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
            problem = plain_data_problem(item, allow_tensors)
            if problem is not None:
                return f"{problem} at index {index}"
        return None
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            if not (key is None or type(key) in (bool, int, float, str)):
                return f"a dict key of type {type(key).__name__} ({key!r})"
            problem = plain_data_problem(item, allow_tensors)
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
        problem = plain_data_problem(value)
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
        "engine": str(fit.engine),
        "dtype": str(fit.dtype).removeprefix("torch."),
        "latent_sites": sites,
        "data_fingerprint": data_fingerprint(fit.args, fit.kwargs),
        "ppvi_version": ppvi_version(),
        "model": _qualified_name(fit.model),
        "guide_class": _qualified_name(guide),
    }
    problem = plain_data_problem(state, allow_tensors=True)
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
