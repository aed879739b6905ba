"""Saving and loading fits without pickle.

A fit is saved as a dict of tensors, numbers and strings written by :func:`torch.save` and read back with
``torch.load(..., weights_only=True)``, which refuses arbitrary objects: loading a file cannot run code.
The model and data are not saved (they are code and the user's); :func:`load` takes them again and rebuilds the
guide's structure from them before restoring its parameters.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine

#: Written into every file; bumped when the layout changes.
FORMAT = "ppvi-fit"
VERSION = 1


def save_fit(fit, path: str | os.PathLike) -> None:
    """Write ``fit``'s guide parameters, model parameters from Pyro's param store and training record to ``path``."""
    guide = fit.guide
    if not isinstance(guide, torch.nn.Module) and not pyro.get_param_store().keys():
        raise ValueError("this guide is a plain function: its parameters live in Pyro's param store, which is empty")
    state: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "guide_name": fit.guide_name or "",
        "guide_options": {key: value for key, value in fit.guide_options.items()},
        "guide_state": guide.state_dict() if isinstance(guide, torch.nn.Module) else {},
        "param_store": {name: pyro.get_param_store()._params[name].detach() for name in pyro.get_param_store().keys()},
        "elbo": torch.as_tensor(fit.elbo),
        "steps": fit.steps,
        "seconds": fit.seconds,
        "converged": fit.converged,
        "message": fit.message,
        "dtype": str(fit.dtype).removeprefix("torch."),
    }
    torch.save(state, path)


def load(
    path: str | os.PathLike,
    model: Callable,
    *args: Any,
    guide: Callable | None = None,
    model_kwargs: dict | None = None,
    device: str | torch.device = "auto",
):
    """Load a fit saved by :meth:`ppvi.Fit.save`.

    Parameters
    ----------
    path : str or os.PathLike
        The file.
    model : callable
        The same model the fit was made with.
    *args
        The same data (they define the guide's structure: its latent sites and their shapes).
    guide : callable, optional
        For a fit made with a guide of your own, a fresh instance of it; registry guides are rebuilt by name.
    model_kwargs : dict, optional
        Keyword arguments of the model.
    device : str or torch.device
        Where to place the loaded fit.

    Returns
    -------
    ppvi.Fit
    """
    from ppvi.fit import Fit, _max_plate_nesting, _structure_trace
    from ppvi.guides import resolve_guide
    from ppvi.inputs import computation, prepare_arguments, resolve_device

    if not os.path.exists(path):
        raise FileNotFoundError(f"no saved fit at {os.fspath(path)!r}")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # noqa: BLE001 - torch raises several types for a file that is not a saved fit
        raise ValueError(f"{os.fspath(path)!r} is not a ppvi fit file (or is corrupt): {error}") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a ppvi fit file")
    if state["version"] > VERSION:
        raise ValueError(f"{os.fspath(path)!r} was written by a newer ppvi (format {state['version']})")
    resolved_device = resolve_device(device)
    dtype = getattr(torch, state["dtype"])
    name = state["guide_name"] or None
    if name is None and guide is None:
        raise ValueError("this fit used a guide of your own: pass a fresh instance as load(..., guide=...)")
    with computation(resolved_device, dtype):
        args, kwargs = prepare_arguments(model, args, dict(model_kwargs or {}), resolved_device, dtype)
        guide_object = resolve_guide(name).factory(model, **state["guide_options"]) if name else guide
        if isinstance(guide_object, torch.nn.Module):
            guide_object.to(device=resolved_device)
        with poutine.block(), torch.no_grad():
            guide_object(*args, **kwargs)
        store = pyro.get_param_store()
        for param_name, value in state["param_store"].items():
            if param_name in store:
                with torch.no_grad():
                    store._params[param_name].copy_(value)
            else:
                store._params[param_name] = value.to(resolved_device).requires_grad_(True)
        if isinstance(guide_object, torch.nn.Module):
            guide_object.load_state_dict(state["guide_state"])
            guide_object.to(device=resolved_device)
        structure = _structure_trace(model, args, kwargs)
    return Fit(
        model, guide_object, args, kwargs, guide_name=name, guide_options=dict(state["guide_options"]),
        elbo=np.asarray(state["elbo"], dtype=np.float64), steps=int(state["steps"]), seconds=float(state["seconds"]),
        device=resolved_device, dtype=dtype, converged=bool(state["converged"]), laplace=None,
        message=str(state["message"]), max_plate_nesting=_max_plate_nesting(structure),
    )
