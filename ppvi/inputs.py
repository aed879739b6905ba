"""Checking and placing what the user passes: data, device and dtype.

The one switch for CPU or GPU is ``device=``; :func:`computation` makes it and the dtype the defaults while ppvi
runs the model, so a model that creates tensors of its own (``torch.zeros(3)``, ``dist.Normal(0.0, 1.0)``) lands on
the same device and dtype as the data without being written for it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyro
import torch


def resolve_device(device: str | torch.device) -> torch.device:
    """``"cpu"``, ``"cuda"`` (or ``"cuda:N"``) or ``"auto"`` (CUDA when available, else CPU) as a torch device."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'auto'") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device={device!r} was asked for but CUDA is not available to this torch ({torch.__version__}, "
            "torch.cuda.is_available() is False): use device='cpu', or device='auto' to take a GPU only when present"
        )
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}: use 'cpu', 'cuda' or 'auto'")
    return resolved


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``"auto"`` is float64 on the CPU (accurate Hessians and ELBOs for badly scaled models at little cost for the
    small models it is meant for) and float32 on a GPU (where float64 is slow); else the named float dtype."""
    if dtype == "auto":
        return torch.float64 if device.type == "cpu" else torch.float32
    names = {"float32": torch.float32, "float64": torch.float64}
    resolved = names.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if resolved not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be 'auto', 'float32' or 'float64', got {dtype!r}")
    return resolved


#: Below this many elements in its largest data tensor a CPU fit runs on one thread: torch splits an op across
#: threads only above a grain of 32,768 elements, so for smaller data the extra threads add only their
#: synchronisation (measured: fake-Gaussian full-rank steps took 6.4 ms on one thread, 15.6 ms on two, on a
#: 2-core machine with other work running).
SINGLE_THREAD_BELOW = 65_536


def threads_for(args: tuple, kwargs: dict, device: torch.device) -> int | None:
    """The thread count a fit should use (``None``: leave torch's setting alone)."""
    if device.type != "cpu":
        return None
    arrays = [value for value in (*args, *kwargs.values()) if isinstance(value, (torch.Tensor, np.ndarray))]
    sizes = [value.numel() if isinstance(value, torch.Tensor) else value.size for value in arrays]
    largest = max(sizes, default=0)
    subsample_size = kwargs.get("subsample_size")
    if isinstance(subsample_size, int) and arrays:
        # A minibatch step computes on subsample_size of the N data points: that is the size torch's ops see.
        points = max((value.shape[0] for value in arrays if value.ndim > 0), default=1)
        largest = largest * min(1.0, subsample_size / max(points, 1))
    return 1 if largest < SINGLE_THREAD_BELOW else None


@contextlib.contextmanager
def computation(device: torch.device, dtype: torch.dtype, threads: int | None = None) -> Iterator[None]:
    """Make ``device`` and ``dtype`` torch's defaults inside the block, restoring the user's afterwards.

    Pyro's module-local parameters are switched on too: a guide's parameters then live in the guide alone, not
    in the global param store, so one fit never picks up (or overwrites) another's parameters of the same name.
    With ``threads``, torch's intra-op thread count is set for the block and restored afterwards.
    """
    previous = torch.get_default_dtype()
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
    # torch's device context is a mode that intercepts every torch call (40 % of a small model's step on the
    # CPU, measured): enter it only when the device differs from the one torch already defaults to.
    device_context = device if device != torch.get_default_device() else contextlib.nullcontext()
    try:
        with device_context, pyro.settings.context(module_local_params=True):
            yield
    finally:
        torch.set_default_dtype(previous)
        torch.set_num_threads(previous_threads)


def _argument_names(model: Callable, count: int) -> list[str]:
    try:
        parameters = list(inspect.signature(model).parameters.values())
    except (TypeError, ValueError):
        parameters = []
    names = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return [names[i] if i < len(names) else f"argument {i}" for i in range(count)]


def _convert(value: Any, name: str, device: torch.device, dtype: torch.dtype) -> Any:
    if isinstance(value, np.ndarray) or (isinstance(value, (list, tuple)) and value and _is_numeric(value)):
        array = np.asarray(value)
        if array.dtype.kind in "fc" or array.dtype == object:
            value = torch.tensor(array.astype(np.float64))
        elif array.dtype.kind in "iub":
            value = torch.tensor(array)  # a copy: the user's array must not change if the model writes to it
        else:
            return value
    if not isinstance(value, torch.Tensor):
        return value
    if value.is_floating_point():
        nonfinite = ~torch.isfinite(value)
        if nonfinite.any():
            count = int(nonfinite.sum())
            where = [tuple(i) if len(i) > 1 else int(i[0]) for i in nonfinite.nonzero()[:5].tolist()]
            raise ValueError(
                f"{name} holds {count} NaN or infinite value(s), first at index {where}: ppvi does not drop or "
                "impute missing data silently. Remove those entries (or model them as latent) and fit again."
            )
        value = value.to(device=device, dtype=dtype)
    else:
        value = value.to(device=device)
    return value


def _is_numeric(values: list | tuple) -> bool:
    try:
        return np.asarray(values).dtype.kind in "fciub"
    except ValueError:
        return False


def prepare_arguments(
    model: Callable, args: tuple, kwargs: dict, device: torch.device, dtype: torch.dtype
) -> tuple[tuple, dict]:
    """Convert numpy arrays and numeric lists to tensors on ``device``, floats in ``dtype``, and reject NaN/inf.

    The user's objects are never modified: arrays are copied; tensors already of the right dtype and device are
    passed on as they are (ppvi itself never writes to data).
    """
    names = _argument_names(model, len(args))
    pairs = zip(names, args, strict=True)
    new_args = tuple(_convert(value, f"data argument {name!r}", device, dtype) for name, value in pairs)
    new_kwargs = {key: _convert(value, f"keyword argument {key!r}", device, dtype) for key, value in kwargs.items()}
    return new_args, new_kwargs


def accepts_keyword(function: Callable, name: str) -> bool:
    """Whether ``function`` accepts the keyword argument ``name`` (explicitly or through ``**kwargs``)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in parameters)
