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


#: Below this many elements in one operation (the largest data tensor times the draws evaluated together) a CPU
#: computation runs on one thread. torch splits an op across threads above a grain of 32,768 elements, and every
#: split op ends in a barrier that waits for the slowest thread: on a machine whose cores are busy with other
#: work, a thread the scheduler has set aside holds the barrier for its time slice (milliseconds), so a step of
#: many small ops slows tenfold or more instead of in proportion to the load. Measured on the 2-core machine with
#: other work running (load 5.5; ``ppvi.fit`` mean-field logistic regression, 8 draws, 8 predictors, Pyro path),
#: one thread against two: 10 against 58 ms a step at 2,000 points, 23 against 122 at 20,000, 148 against 312 at
#: 100,000 (800,000 elements an op). Four million elements (an op of milliseconds) is where a second thread's
#: gain on a quiet machine is worth what a preempted one can cost.
PARALLEL_MIN_ELEMENTS = 2**22


def threads_for(args: tuple, kwargs: dict, device: torch.device, batch: int = 1) -> int | None:
    """The thread count a computation on the model's data should use (``None``: leave torch's setting alone).

    Parameters
    ----------
    args, kwargs : tuple and dict
        The model's arguments; their largest array sets the size of its ops.
    device : torch.device
        Only CPU computations are pinned to one thread.
    batch : int
        Draws evaluated together (particles of a step, draws of a summary, replications times particles of a
        calibration), which multiply the size of every op on the data.
    """
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
    return 1 if max(largest, 1) * max(int(batch), 1) < PARALLEL_MIN_ELEMENTS else None



@contextlib.contextmanager
def random_state_kept() -> Iterator[None]:
    """Run a block and put the global random state (torch's, NumPy's, Python's, as Pyro keeps them) back as it was:
    for work that observes a fit (a structure trace drawing from the prior, an ELBO check, seeded draws) without
    changing what the user's own random calls see next."""
    state = pyro.util.get_rng_state()
    try:
        yield
    finally:
        pyro.util.set_rng_state(state)

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


#: How to pass data ppvi cannot use as it is: the end of the messages about strings and non-numeric values.
_PASS_NUMBERS = (
    "ppvi passes the data to the model as tensors, so pass numbers (a tensor, a numpy array, a list of numbers "
    "or a pandas Series / numeric DataFrame); a setting such as a name belongs in model_kwargs={...}"
)


def _from_pandas(value: Any, name: str) -> np.ndarray:
    """A pandas Series as a 1-d array, a DataFrame of numbers as a 2-d one (rows by columns), as PyMC takes them."""
    import pandas as pd

    if isinstance(value, pd.Series):
        if not (pd.api.types.is_numeric_dtype(value.dtype) or pd.api.types.is_bool_dtype(value.dtype)):
            raise ValueError(
                f"{name} is a pandas Series of dtype {value.dtype}, not numbers: for categories pass their codes "
                "(series.cat.codes, or pd.factorize(series)[0]); for numbers stored as text, pd.to_numeric(series)"
            )
        return _pandas_array(value)
    non_numeric = [
        column for column, column_dtype in value.dtypes.items()
        if not (pd.api.types.is_numeric_dtype(column_dtype) or pd.api.types.is_bool_dtype(column_dtype))
    ]
    if non_numeric:
        raise ValueError(
            f"{name} is a pandas DataFrame with non-numeric column(s) {non_numeric[:5]}: pass the numeric ones "
            "(df.select_dtypes('number'), a 2-d tensor of rows by columns), encode categories as codes "
            "(df[column].cat.codes), or pass one column as a Series (df['y'])"
        )
    return _pandas_array(value)


def _pandas_array(value: Any) -> np.ndarray:
    array = value.to_numpy()
    if array.dtype == object:  # nullable dtypes (Int64, boolean) with pd.NA: NaN, refused below with its index
        array = value.to_numpy(dtype=np.float64, na_value=np.nan)
    return array


def _leaves(values: Any, index: tuple[int, ...] = ()) -> Iterator[tuple[tuple[int, ...], Any]]:
    """Every non-list element of nested lists and tuples, with its index."""
    for position, item in enumerate(values):
        if isinstance(item, (list, tuple)):
            yield from _leaves(item, (*index, position))
        else:
            yield (*index, position), item


def _numbers_in(leaves: list[tuple[tuple[int, ...], Any]]) -> bool:
    return any(
        isinstance(item, (int, float, complex, np.number, torch.Tensor)) and not isinstance(item, bool)
        for _, item in leaves
    )


def _check_sequence(value: list | tuple, name: str) -> None:
    """Refuse lists of numbers with holes (None), naming the place: missing data is never imputed silently."""
    leaves = list(_leaves(value))
    if not _numbers_in(leaves):
        return
    for index, item in leaves:
        if item is None:
            where = list(index) if len(index) > 1 else index[0]
            raise ValueError(
                f"{name} holds None at index [{where}]: ppvi does not drop or impute missing data silently. "
                "Remove those entries (or model them as latent) and fit again."
            )


def _problem(value: Any, name: str) -> str | None:
    """Why a positional argument that ppvi passed on unconverted is probably not data the model can use."""
    if isinstance(value, (str, bytes)):
        return f"{name} is a string ({value!r}): {_PASS_NUMBERS}"
    if isinstance(value, np.ndarray) and value.dtype.kind in "USO":
        return f"{name} is an array of dtype {value.dtype}, not numbers: {_PASS_NUMBERS}"
    if isinstance(value, (list, tuple)):
        if not value:
            return f"{name} is an empty {type(value).__name__}: there is nothing to condition on; pass the data"
        leaves = list(_leaves(value))
        for index, item in leaves:
            if isinstance(item, (str, bytes)):
                where = list(index) if len(index) > 1 else index[0]
                return f"{name} holds the string {item!r} at index [{where}]: {_PASS_NUMBERS}"
        if _numbers_in(leaves) and not _is_numeric(value):
            return (
                f"{name} is a ragged list (its rows have different lengths), not an array: pass a rectangular list "
                "or tensor, padding short rows and masking the padding in the model (poutine.mask)"
            )
    return None


def explain_data_failure(model: Callable, args: tuple, error: Exception) -> ValueError | None:
    """When the model fails on its first run, a ``ValueError`` that names the data arguments ppvi could not turn
    into tensors (strings, empty or ragged lists) and says what to pass; ``None`` when none looks wrong."""
    names = _argument_names(model, len(args))
    problems = [problem for name, value in zip(names, args, strict=True)
                if (problem := _problem(value, f"data argument {name!r}")) is not None]
    if not problems:
        return None
    return ValueError(f"the model failed on its data ({type(error).__name__}: {error}): " + "; ".join(problems))


def _check_not_empty(value: torch.Tensor | np.ndarray, name: str) -> None:
    size = value.numel() if isinstance(value, torch.Tensor) else value.size
    if size == 0:
        raise ValueError(
            f"{name} is empty (shape {tuple(value.shape)}): there is nothing to condition on. Pass the data (at "
            "least one observation); to simulate from the model instead, pass None where it takes its observations"
        )


def _convert(value: Any, name: str, device: torch.device, dtype: torch.dtype) -> Any:
    if type(value).__module__.startswith("pandas") and type(value).__name__ in ("Series", "DataFrame"):
        value = _from_pandas(value, name)
    if isinstance(value, (list, tuple)):
        _check_sequence(value, name)
    if isinstance(value, np.ndarray) or (isinstance(value, (list, tuple)) and value and _is_numeric(value)):
        array = np.asarray(value)
        _check_not_empty(array, name)
        if array.dtype.kind in "fc" or array.dtype == object:
            value = torch.tensor(_as_float_array(array, name))
        elif array.dtype.kind in "iub":
            value = torch.tensor(array)  # a copy: the user's array must not change if the model writes to it
        else:
            return value
    if not isinstance(value, torch.Tensor):
        return value
    _check_not_empty(value, name)
    # The user's tensor is never part of ppvi's graphs: a tensor with requires_grad=True would otherwise have its
    # .grad filled in by every step of training.
    value = value.detach()
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


def _as_float_array(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype == object:  # None would become NaN, and a string a bare error: name them first
        for position, item in enumerate(array.reshape(-1)):
            if item is None or isinstance(item, (str, bytes)):
                where = [int(i) for i in np.unravel_index(position, array.shape)]
                where = where if len(where) > 1 else where[0]
                if item is None:
                    raise ValueError(
                        f"{name} holds None at index [{where}]: ppvi does not drop or impute missing data silently. "
                        "Remove those entries (or model them as latent) and fit again."
                    )
                raise ValueError(f"{name} holds the string {item!r} at index [{where}]: {_PASS_NUMBERS}")
    try:
        return array.astype(np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} cannot be read as numbers ({error}): {_PASS_NUMBERS}") from error


def _is_numeric(values: list | tuple) -> bool:
    try:
        return np.asarray(values).dtype.kind in "fciub"
    except ValueError:
        return False


def prepare_arguments(
    model: Callable, args: tuple, kwargs: dict, device: torch.device, dtype: torch.dtype
) -> tuple[tuple, dict]:
    """Convert numpy arrays, numeric lists and pandas Series / numeric DataFrames to tensors on ``device``, floats
    in ``dtype``; reject NaN/inf, None inside lists of numbers, and empty arrays. Other values (strings, lists
    that are not numbers) pass through unchanged: :func:`explain_data_failure` names them if the model fails.

    The user's objects are never modified: arrays are copied; tensors are detached (ppvi's gradients never reach
    the user's tensors, even with ``requires_grad=True``), and those already of the right dtype and device share
    their memory (ppvi itself never writes to data).
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
