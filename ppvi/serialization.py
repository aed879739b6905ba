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

Writing lives in :mod:`ppvi.saving` (:func:`save_fit`, :func:`latent_sites`, :func:`data_fingerprint` and the format
constants, re-exported here), which :meth:`ppvi.Fit.save` calls; this module reads files and builds the
:class:`ppvi.result.Fit`. So ``ppvi.result`` imports ``ppvi.saving`` and ``ppvi.serialization`` imports both, and
there is no import cycle.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine

from ppvi.guides import GUIDES
from ppvi.inputs import computation, prepare_arguments, random_state_kept, resolve_device
from ppvi.result import Fit
from ppvi.saving import (
    DROPPABLE_GUIDE_OPTIONS,
    FORMAT,
    PLAIN_DATA,
    UNFINGERPRINTED_KEYWORDS,
    VERSION,
    data_fingerprint,
    latent_sites,
    ppvi_version,
    save_fit,
)
from ppvi.tracing import max_plate_nesting_of, structure_trace

__all__ = [
    "DROPPABLE_GUIDE_OPTIONS",
    "FORMAT",
    "PLAIN_DATA",
    "READABLE_VERSIONS",
    "RECORD_KEYS",
    "REQUIRED_KEYS",
    "UNFINGERPRINTED_KEYWORDS",
    "VERSION",
    "FitFileError",
    "data_fingerprint",
    "latent_sites",
    "load",
    "ppvi_version",
    "save_fit",
]

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


class FitFileError(ValueError):
    """A file :func:`load` cannot read as a ppvi fit: missing pieces, truncated or corrupt, not written by
    :meth:`ppvi.Fit.save`, or holding Python objects whose unpickling could run code."""


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
            structure = structure_trace(model, args, kwargs)
    message = "; ".join([str(state["message"]), *notes]) if notes else str(state["message"])
    elbo = state["elbo"].detach().to(device="cpu", dtype=torch.float64).numpy()
    return Fit(
        model, guide_object, args, kwargs, guide_name=name, guide_options=dict(state["guide_options"]),
        elbo=np.asarray(elbo, dtype=np.float64), steps=int(state["steps"]), seconds=float(state["seconds"]),
        device=resolved_device, dtype=dtype, converged=bool(state["converged"]), laplace=None,
        message=message, max_plate_nesting=max_plate_nesting_of(structure),
        engine=str(state.get("engine", "pyro")),  # files written before the engines existed trained through Pyro
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
