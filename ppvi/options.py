"""One check of the options that ``ppvi.fit``, ``ppvi.compare``, ``ppvi.vsbc`` and ``ppvi.sbc`` (and the
:class:`ppvi.Fit` methods) share, so that a bad value is refused at the boundary with the same words everywhere,
before any work is done, instead of failing deep inside (a ``ZeroDivisionError`` for ``num_particles=0``) or,
worse, running (a zero learning rate gives fits that never move, and confident calibration verdicts from them).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch

from ppvi.inputs import resolve_device

#: Seeds are passed to ``pyro.set_rng_seed``, which seeds NumPy's global generator too: it takes 0 <= seed < 2**32.
MAX_SEED = 2**32 - 1
#: The dtype names ``dtype=`` takes.
DTYPE_NAMES = ("auto", "float32", "float64")


class OptionTypeError(ValueError, TypeError):
    """An option of the wrong kind (``num_particles=True``, ``seed="1"``): a ``TypeError``, and a ``ValueError``
    like every other refused option, so ``except ValueError`` catches all of them."""


def _kind(value: Any) -> str:
    return type(value).__name__


def _positive_integer(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise OptionTypeError(
            f"{name} must be an integer of at least {minimum}, got {value!r} (a {_kind(value)}): pass a whole "
            f"number, e.g. {name}={max(minimum, 8)}"
        )
    if value < minimum:
        raise ValueError(f"{name} must be an integer of at least {minimum}, got {value!r}")
    return int(value)


def _at_least_two(name: str, value: Any) -> int:
    return _positive_integer(name, value, minimum=2)


def _learning_rate(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptionTypeError(
            f"{name} must be a positive finite number, got {value!r} (a {_kind(value)}): e.g. {name}=0.01"
        )
    if not (math.isfinite(float(value)) and value > 0):
        raise ValueError(
            f"{name} must be a positive finite number, got {value!r}: a step size of zero or less (or NaN/inf) never "
            f"trains, and would report the untrained guide as the answer; use e.g. {name}=0.01, or leave it out for "
            "ppvi's default"
        )
    return float(value)


def _seed(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise OptionTypeError(f"{name} must be an integer or None, got {value!r} (a {_kind(value)}): e.g. {name}=0")
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"{name} must lie in 0..{MAX_SEED} (NumPy's seed range), got {value!r}")
    return int(value)


def _device(name: str, value: Any) -> str | torch.device:
    if not isinstance(value, (str, torch.device)):
        raise OptionTypeError(f"{name} must be 'auto', 'cpu', 'cuda' (or 'cuda:N') or a torch.device, got {value!r}")
    resolve_device(value)  # unknown names and CUDA without CUDA raise here, naming the fix
    return value


def _dtype(name: str, value: Any) -> str | torch.dtype:
    if value in DTYPE_NAMES or value in (torch.float32, torch.float64):
        return value
    raise ValueError(
        f"{name} must be one of {DTYPE_NAMES} or torch.float32 / torch.float64, got {value!r}: ppvi computes in "
        "floating point (float16 loses the ELBO's precision)"
    )


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise OptionTypeError(f"{name} must be True, False or None, got {value!r} (a {_kind(value)})")
    return value


def _mapping(name: str, value: Any) -> dict:
    if not isinstance(value, Mapping):
        raise OptionTypeError(f"{name} must be a dict (or None), got {value!r} (a {_kind(value)}): e.g. {name}={{}}")
    return dict(value)


#: The rule of every shared option: ``rule(name, value)`` returns the value normalised (numpy integers become
#: ``int``) or raises :class:`OptionTypeError` for a value of the wrong kind and ``ValueError`` for one out of range.
RULES: dict[str, Callable[[str, Any], Any]] = {
    "learning_rate": _learning_rate,
    "num_particles": _positive_integer,
    "steps": _positive_integer,
    "max_steps": _positive_integer,
    "seed": _seed,
    "num_samples": _positive_integer,
    "num_simulations": _at_least_two,
    "num_draws": _positive_integer,
    "subsample_size": _positive_integer,
    "device": _device,
    "dtype": _dtype,
    "progress": _flag,
    "guide_options": _mapping,
    "model_kwargs": _mapping,
}


def validate(options: Mapping[str, Any], optional: Collection[str] = ()) -> dict[str, Any]:
    """Check the shared options by :data:`RULES` and return them normalised.

    Parameters
    ----------
    options : mapping
        Option names and values; names without a rule are passed through unchecked.
    optional : collection of str
        Names whose value may be ``None`` (meaning "ppvi's default").

    Returns
    -------
    dict
        ``options`` with every checked value normalised (``numpy.int64(8)`` becomes ``8``).

    Raises
    ------
    OptionTypeError
        A value of the wrong kind (``num_particles=True``, ``seed="1"``): both a ``TypeError`` and a ``ValueError``.
    ValueError
        A value out of range (``learning_rate=0``, ``num_particles=0``, ``device="tpu"``).
    """
    checked = {}
    for name, value in options.items():
        rule = RULES.get(name)
        if rule is None or (value is None and name in optional):
            checked[name] = value
            continue
        if value is None:
            raise OptionTypeError(f"{name} must not be None here: give a value (see the function's docstring)")
        checked[name] = rule(name, value)
    return checked


def check_model(model: Any, function: str) -> None:
    """Refuse a ``model`` that is not callable, the usual sign of swapped arguments (``ppvi.fit(y, model)``)."""
    if not callable(model):
        raise OptionTypeError(
            f"{function} takes the model first: model must be a callable Pyro model, got {type(model).__name__} "
            f"{_short(model)}. Call {function}(model, *data, ...)"
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
