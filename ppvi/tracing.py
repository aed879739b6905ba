"""``ppvi.tracing``: the model traces the rest of ppvi shares.

One run of the model at a feasible point (:func:`structure_trace`) and what it tells (:func:`max_plate_nesting_of`,
:func:`is_reported`, :func:`check_observed_values`); a seeded block that leaves the global random state alone
(:func:`seeded`); a model's own ``pyro.param`` values in a store of the fit's (:class:`ModelParameters`); and the
adoption of a Pyro module made outside ppvi (:func:`adopt_pyro_module`). It imports none of the modules built on it, so
:mod:`ppvi.result`, :mod:`ppvi.fit`, :mod:`ppvi.saving`, :mod:`ppvi.serialization` and :mod:`ppvi.calibration` can
all import it without a cycle.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.nn import PyroModule

from ppvi.initialization import init_to_median_or_feasible
from ppvi.inputs import explain_data_failure, random_state_kept

__all__ = [
    "ModelParameters",
    "ModelStructure",
    "adopt_pyro_module",
    "check_observed_values",
    "inspect_model",
    "is_reported",
    "max_plate_nesting_of",
    "seeded",
    "structure_trace",
]


def structure_trace(model: Callable, args: tuple, kwargs: dict) -> poutine.Trace:
    """One run of the model with every latent site at a feasible point: no sampling from (possibly improper) priors."""
    with poutine.block(), torch.no_grad():
        return poutine.trace(InitMessenger(init_to_median_or_feasible)(model)).get_trace(*args, **kwargs)


def max_plate_nesting_of(trace: poutine.Trace) -> int:
    dims = [-frame.dim for site in trace.nodes.values() if site["type"] == "sample"
            for frame in site["cond_indep_stack"] if frame.vectorized]
    return max(dims, default=0)


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run a block with a fixed Pyro seed and restore the global random state afterwards (nothing, for ``None``)."""
    if seed is None:
        yield
        return
    with random_state_kept():
        pyro.set_rng_seed(seed)
        yield


def is_reported(site: dict) -> bool:
    if site["type"] != "sample":
        return False
    if site["infer"].get("_deterministic"):
        return True
    return not site["is_observed"] and site["infer"].get("enumerate") is None and not site["infer"].get(
        "is_auxiliary"
    ) and not pyro.poutine.util.site_is_subsample(site)


def check_observed_values(structure: poutine.Trace, model: Callable, args: tuple) -> None:
    """Refuse observed values Pyro's distributions cannot score, saying how to convert them."""
    for name, site in structure.nodes.items():
        if site["type"] != "sample" or not site["is_observed"] or site["infer"].get("_deterministic"):
            continue
        value = site["value"]
        if isinstance(value, (str, bytes, list, tuple, np.ndarray)):
            problem = TypeError(f"the observed site {name!r} was given a {type(value).__name__}, not a tensor")
            explained = explain_data_failure(model, args, problem)
            raise explained or ValueError(
                f"{problem}: Pyro's distributions score tensors of numbers; pass the data as numbers (a tensor, "
                "a numpy array of numbers, a list of numbers or a pandas Series)"
            )
        if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
            raise ValueError(
                f"the observed site {name!r} holds a bool tensor, which Pyro's distributions cannot score: convert "
                "the data to numbers first, e.g. y.double() (or y.float()) for 0/1 outcomes of a Bernoulli, "
                "y.long() for counts or categories (a bool tensor is fine as a mask, poutine.mask(mask=...))"
            )


class ModelParameters:
    """A model whose own ``pyro.param`` statements read and write a parameter store of its own (Pyro's
    ``ParamStoreDict.scope``): inside the guide (a module with module-local parameters, which Pyro's check refuses to
    share with a model) and outside it alike, so the fit trains the model's parameters with the guide's and two fits
    of one model never share them."""

    def __init__(self, model: Callable):
        self.model = model
        self.state: dict = {"params": {}, "constraints": {}}
        functools.update_wrapper(self, model, updated=())  # the model's name and signature

    def __call__(self, *args, **kwargs):
        with pyro.get_param_store().scope(state=self.state):
            return self.model(*args, **kwargs)

    def values(self) -> dict[str, torch.Tensor]:
        """The parameters' current (constrained) values."""
        with pyro.get_param_store().scope(state=self.state) as state:
            store = pyro.get_param_store()
            return {name: store[name].detach() for name in list(state["params"])}


def adopt_pyro_module(guide: Any) -> None:
    """Let a Pyro module made outside ppvi (``pyro.infer.autoguide.AutoNormal(model)``, built where module-local
    parameters were off) run inside :func:`ppvi.inputs.computation`, where they are on: give each of its modules
    the parameter state Pyro gives modules made in that mode."""
    if not isinstance(guide, PyroModule):
        return
    for module in guide.modules():
        context = getattr(module, "_pyro_context", None)
        if context is not None and not hasattr(context, "param_state"):
            context.param_state = {"params": {}, "constraints": {}}


class ModelStructure(NamedTuple):
    """What :func:`inspect_model` found out about a model and its data.

    Attributes
    ----------
    model : callable
        The model to fit: the user's, or wrapped in :class:`ModelParameters` when it has ``pyro.param`` sites.
    latent : list of str
        Names of the latent sample sites, in model order (subsample sites excluded).
    enumerated : bool
        Whether any latent site is marked for enumeration.
    max_plate_nesting : int
        Deepest vectorized plate nesting of the sample sites.
    """

    model: Callable
    latent: list[str]
    enumerated: bool
    max_plate_nesting: int


def inspect_model(model: Callable, args: tuple, kwargs: dict) -> ModelStructure:
    """Run the model once (:func:`structure_trace`) on its prepared data, inside :func:`ppvi.inputs.computation`,
    and check that it can be fitted.

    Raises
    ------
    ValueError
        The data do not fit the model (explained by :func:`ppvi.inputs.explain_data_failure` where it can), the
        model has no latent sample site, or an observed value Pyro cannot score (:func:`check_observed_values`).
    """
    # A model's own pyro.param values live in a store of the fit's (module-local parameters would otherwise
    # put them inside the guide, which Pyro refuses), and are trained with the guide's.
    with_parameters = ModelParameters(model)
    try:
        structure = structure_trace(with_parameters, args, kwargs)
    except Exception as error:
        explained = explain_data_failure(model, args, error)
        if explained is None:
            raise
        raise explained from error
    if any(site["type"] == "param" for site in structure.nodes.values()):
        model = with_parameters
    latent = [
        name for name, site in structure.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not poutine.util.site_is_subsample(site)
    ]
    if not latent:
        raise ValueError(
            "the model has no latent sample sites, so there is no posterior to approximate: every pyro.sample "
            "site is observed. Leave an unknown quantity unobserved (obs=None); for point estimates of every "
            "unknown, declare them with pyro.param and use Pyro's SVI (maximum likelihood) instead."
        )
    check_observed_values(structure, model, args)
    enumerated = any(structure.nodes[name]["infer"].get("enumerate") is not None for name in latent)
    max_plate_nesting = max_plate_nesting_of(structure)
    return ModelStructure(model, latent, enumerated, max_plate_nesting)
