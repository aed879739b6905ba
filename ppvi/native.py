"""The traced training step written out as one C function: the default step, with no cold start.

:func:`ppvi.engine.trace_step` turns a step (model, guide, gradient, Adam) into one graph of 200-450 ATen operations
on small tensors. Replayed op by op, each operation pays PyTorch's dispatch (3-6 us on the 2-core development
machine), so a step costs about a millisecond, 100x NumPyro's jitted step, for arithmetic worth a few
microseconds. TorchInductor removes the dispatch, but its first compilation takes 20-40 s (TorchInductor's own
lowering and scheduling, its test builds of the CPU's vector instruction sets, then C++ builds against PyTorch's
headers). This module does the part of that work a small step needs, in a fraction of a second:

- each operation becomes a loop nest over its static shape, the strides of its operands folded into the index
  arithmetic, so views (``view``, ``expand``, ``permute``, ``select``, ``slice``, ``diagonal``...) cost no code;
- intermediate results live in one preallocated arena, each buffer reusing the space of buffers no longer read;
- the function is compiled by the system's C compiler with ``<math.h>`` alone (no PyTorch headers), cached on disk
  by the hash of its source (the data are arguments, not part of it), and called through :mod:`ctypes` with one
  preallocated argument array.

Each operation is written as PyTorch's CPU kernel computes it: the same formulas, special cases and branches, the
C library's ``exp``, ``log``, ``lgamma``... as ATen's scalar paths call them, ATen's own ``digamma``. A step then
agrees with the replayed graph to rounding (sums accumulate in another order; the C library and ATen's vectorised
kernels may differ in the last bit of a transcendental function), and every kernel is checked against the replayed
graph on the step's own inputs before it is used (:func:`build`).

What is not translated (an operation outside :data:`SUPPORTED`, a dtype without a C type, a tensor off the CPU, no
C compiler, a step whose arithmetic outweighs the dispatch it saves, see :data:`MAX_WORK`) raises
:class:`Unsupported` with the reason, and the caller replays the graph instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import operator
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "MAX_WORK", "SUPPORTED", "NativeKernel", "Unsupported", "build", "compiler", "eliminate_common_subexpressions",
    "fold_constants", "generate", "simplify",
]

aten = torch.ops.aten

#: C types of the dtypes a kernel handles (a ``bool`` tensor holds one byte, 0 or 1, per element).
C_TYPES: dict[torch.dtype, str] = {
    torch.float64: "double", torch.float32: "float", torch.int64: "int64_t", torch.int32: "int32_t",
    torch.int16: "int16_t", torch.int8: "int8_t", torch.uint8: "uint8_t", torch.bool: "uint8_t",
}
_FLOATING = (torch.float64, torch.float32)

#: The most arithmetic a step may do to be written out: elements written by all its operations, plus the
#: multiply-adds of its matrix products and solves. The generated loops are scalar, where ATen's kernels are
#: vectorised and its products call BLAS; a million element operations take 1-2 ms in the generated code, about what
#: ATen's dispatch costs for a graph of 300 operations, so beyond this the replayed graph is as fast or faster.
MAX_WORK = 1_000_000
#: Running sums a floating sum over a long dimension keeps (see ``_reduction``): four hide an addition's latency.
PARTIAL_SUMS = 4
#: Alignment (bytes) of each intermediate buffer in the arena: a cache line.
ARENA_ALIGNMENT = 64
#: Flags for the C compiler. ``-ffp-contract=off``: no fused multiply-adds the source does not ask for (they round
#: differently from ATen's separate multiply and add); ``-fno-math-errno``: ``sqrt`` as one instruction (``errno`` is
#: never read). Nothing that changes a result: no ``-ffast-math``, no ``-march=native`` (a cached kernel may be
#: loaded on another machine sharing the cache folder).
C_FLAGS = ("-O2", "-std=c99", "-fPIC", "-shared", "-fno-math-errno", "-ffp-contract=off")
#: Seconds a compilation may take before the kernel is given up (a few hundred loops compile in well under one).
COMPILE_TIMEOUT_SECONDS = 120
#: Largest disagreement between a kernel and the replayed graph accepted when a kernel is checked, per tensor,
#: relative to the tensor's largest magnitude: rounding in another order is about 1e-16 per operation in float64
#: (1e-7 in float32), compounded over a few hundred operations; a wrong translation is off by order one.
VERIFY_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-3}


class Unsupported(Exception):
    """The graph cannot be written out as C here; the message says why (the caller replays it instead)."""


# -- views and buffers ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _View:
    """A strided view of one buffer: what a tensor is to the generated code (offset and strides in elements)."""

    buffer: int
    dtype: torch.dtype
    sizes: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    @property
    def ndim(self) -> int:
        return len(self.sizes)

    def reshaped(self, sizes: Sequence[int], strides: Sequence[int], offset: int | None = None) -> _View:
        return _View(self.buffer, self.dtype, tuple(sizes), tuple(strides), self.offset if offset is None else offset)


@dataclass
class _Buffer:
    """Memory the kernel reads or writes: an argument (an input of the step, a constant) or part of the arena."""

    dtype: torch.dtype
    numel: int
    argument: int | None = None  # position in the argument array, for inputs and constants
    first: int = 0  # first and last operation touching it: an arena buffer's lifetime
    last: int = 0
    offset: int = 0  # byte offset in the arena
    writable: bool = False  # whether the graph may write into it (arena buffers and the step's own inputs)


def _contiguous_strides(sizes: Sequence[int]) -> tuple[int, ...]:
    strides, running = [], 1
    for size in reversed(sizes):
        strides.append(running)
        running *= max(size, 1)
    return tuple(reversed(strides))


def _dim(dim: int, ndim: int) -> int:
    """``dim`` wrapped into ``range(ndim)`` (a 0-dimensional tensor takes 0 and -1), as ATen wraps it."""
    bound = max(ndim, 1)
    if not -bound <= dim < bound:
        raise Unsupported(f"dimension {dim} out of range for {ndim} dimensions")
    return dim % bound


def _view_strides(sizes: Sequence[int], strides: Sequence[int], shape: Sequence[int]) -> tuple[int, ...] | None:
    """The strides of ``view(shape)`` of a tensor of ``sizes`` and ``strides`` (ATen's ``computeStride``), or None
    when the memory is not laid out for that view."""
    if math.prod(sizes) == 0 or not sizes:
        return _contiguous_strides(shape)
    new_strides = [0] * len(shape)
    view_d = len(shape) - 1
    chunk_base_stride = strides[-1]
    tensor_numel, view_numel = 1, 1
    for tensor_d in range(len(sizes) - 1, -1, -1):
        tensor_numel *= sizes[tensor_d]
        if tensor_d == 0 or (sizes[tensor_d - 1] != 1 and strides[tensor_d - 1] != tensor_numel * chunk_base_stride):
            while view_d >= 0 and (view_numel < tensor_numel or shape[view_d] == 1):
                new_strides[view_d] = view_numel * chunk_base_stride
                view_numel *= shape[view_d]
                view_d -= 1
            if view_numel != tensor_numel:
                return None
            if tensor_d > 0:
                chunk_base_stride = strides[tensor_d - 1]
                tensor_numel, view_numel = 1, 1
    return tuple(new_strides) if view_d == -1 else None


def _broadcast(view: _View, sizes: Sequence[int]) -> _View:
    """``view`` expanded to ``sizes``: stride 0 along broadcast dimensions and new leading ones."""
    lead = len(sizes) - view.ndim
    if lead < 0:
        raise Unsupported(f"cannot broadcast {view.sizes} to {tuple(sizes)}")
    strides = [0] * lead
    for size, own_size, stride in zip(sizes[lead:], view.sizes, view.strides, strict=True):
        if own_size == size:
            strides.append(stride if size != 1 else 0)
        elif own_size == 1:
            strides.append(0)
        else:
            raise Unsupported(f"cannot broadcast {view.sizes} to {tuple(sizes)}")
    return view.reshaped(sizes, strides)


def _coalesce(sizes: Sequence[int], strides: list[Sequence[int]]) -> tuple[list[int], list[list[int]]]:
    """Merge adjacent dimensions along which every operand is laid out contiguously, and drop dimensions of size one,
    as ATen's TensorIterator does: fewer, longer loops over the same elements in the same order."""
    new_sizes: list[int] = []
    new_strides: list[list[int]] = [[] for _ in strides]
    for d, size in enumerate(sizes):
        if size == 1:
            continue
        if new_sizes and all(s[-1] == own[d] * size for s, own in zip(new_strides, strides, strict=True)):
            new_sizes[-1] *= size
            for s, own in zip(new_strides, strides, strict=True):
                s[-1] = own[d]
        else:
            new_sizes.append(size)
            for s, own in zip(new_strides, strides, strict=True):
                s.append(own[d])
    return new_sizes, new_strides


# -- C literals, casts and functions --------------------------------------------------------------------------------
Scalar = float | int | bool


def _literal(value: Scalar, dtype: torch.dtype) -> str:
    """A Python number as a C constant of ``dtype``'s type, rounded as ATen rounds a scalar argument to it."""
    if dtype in _FLOATING:
        value = float(value)
        if math.isnan(value):
            text = "NAN"
        elif math.isinf(value):
            text = "INFINITY" if value > 0 else "(-INFINITY)"
        else:
            text = repr(value)
            text = f"({text})" if value < 0 else text
        return f"((float){text})" if dtype == torch.float32 else text
    if dtype == torch.bool:
        return "1" if value else "0"
    if isinstance(value, float) and not value.is_integer():
        raise Unsupported(f"a fractional number ({value}) in an integer operation")
    return f"INT64_C({int(value)})" if dtype == torch.int64 else f"(({C_TYPES[dtype]}){int(value)})"


def _cast(expression: str, source: torch.dtype, target: torch.dtype) -> str:
    if source == target:
        return expression
    if target == torch.bool:
        return f"(({expression}) != 0)"
    return f"(({C_TYPES[target]})({expression}))"


def _call(name: str, dtype: torch.dtype, *arguments: str) -> str:
    """A call of the C library's ``name`` for ``dtype`` (``expf`` for float32)."""
    return f"{name}{'f' if dtype == torch.float32 else ''}({', '.join(arguments)})"


#: C helpers the generated code may call, each included only where used. ``ppvi_digamma`` is ATen's
#: ``calc_digamma`` (aten/src/ATen/native/Math.h): reflection below 0, recurrence up to 10, asymptotic series.
_HELPERS = {
    "ppvi_digamma": r"""
static double ppvi_digamma(double x) {
  static const double A[] = {8.33333333333333333333E-2, -2.10927960927960927961E-2, 7.57575757575757575758E-3,
                             -4.16666666666666666667E-3, 3.96825396825396825397E-3, -8.33333333333333333333E-3,
                             8.33333333333333333333E-2};
  const double PSI_10 = 2.25175258906672110764;
  if (x == 0) return copysign(INFINITY, -x);
  if (x < 0) {
    if (x == trunc(x)) return NAN;
    double q, r = modf(x, &q);
    return ppvi_digamma(1 - x) - 3.14159265358979323846 / tan(3.14159265358979323846 * r);
  }
  double result = 0;
  while (x < 10) { result -= 1 / x; x += 1; }
  if (x == 10) return result + PSI_10;
  double y = 0;
  if (x < 1.0e17) {
    double z = 1.0 / (x * x), p = 0;
    for (int i = 0; i <= 6; i++) p = p * z + A[i];
    y = z * p;
  }
  return result + log(x) - (0.5 / x) - y;
}
""",
}


# -- the generator --------------------------------------------------------------------------------------------------
class _Arguments:
    """An operation's arguments by schema name, positional and keyword alike, defaults filled in."""

    def __init__(self, target: torch._ops.OpOverload, args: tuple, kwargs: dict):
        self.values: dict[str, Any] = {}
        for position, argument in enumerate(target._schema.arguments):
            if position < len(args) and not argument.kwarg_only:
                self.values[argument.name] = args[position]
            elif argument.name in kwargs:
                self.values[argument.name] = kwargs[argument.name]
            elif argument.has_default_value():
                self.values[argument.name] = argument.default_value
            else:
                self.values[argument.name] = None

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def get(self, name: str, default: Any = None) -> Any:
        """The argument, or ``default`` where it is absent or None."""
        value = self.values.get(name)
        return default if value is None else value

    def view(self, name: str) -> _View:
        value = self.values.get(name)
        if not isinstance(value, _View):
            raise Unsupported(f"argument {name!r} is not a tensor")
        return value


class _Generator:
    """Writes the C statements of a traced step's operations, one :meth:`loops` nest each."""

    def __init__(self, arguments: Sequence[torch.Tensor], writable: int):
        self.buffers: list[_Buffer] = []
        self.lines: list[str] = []
        self.helpers: set[str] = set()
        self.errors: list[str] = []  # messages of the kernel's checks, by return code (from 1)
        self.position = 0  # index of the operation being written
        self.work = 0
        self.mutated: set[torch.fx.Node] = set()
        self.argument_views: list[_View] = []
        for index, tensor in enumerate(arguments):
            if tensor.dtype not in C_TYPES:
                raise Unsupported(f"a tensor of dtype {tensor.dtype}, which has no C type here")
            self.buffers.append(_Buffer(tensor.dtype, tensor.numel(), argument=index, writable=index < writable))
            self.argument_views.append(_View(index, tensor.dtype, tuple(tensor.shape), tuple(tensor.stride())))

    def fresh(self, sizes: Sequence[int], dtype: torch.dtype) -> _View:
        """A new contiguous arena buffer."""
        if dtype not in C_TYPES:
            raise Unsupported(f"an intermediate of dtype {dtype}, which has no C type here")
        sizes = tuple(int(size) for size in sizes)
        self.buffers.append(
            _Buffer(dtype, max(math.prod(sizes), 1), first=self.position, last=self.position, writable=True)
        )
        return _View(len(self.buffers) - 1, dtype, sizes, _contiguous_strides(sizes))

    def touch(self, view: _View) -> None:
        """Record that the current operation reads or writes ``view`` (its buffer lives at least until now)."""
        buffer = self.buffers[view.buffer]
        buffer.last = max(buffer.last, self.position)

    def writable(self, view: _View, what: str) -> _View:
        if not self.buffers[view.buffer].writable:
            raise Unsupported(f"{what} writes into a tensor the step only reads")
        return view

    def at(self, view: _View, index: Sequence[str]) -> str:
        """C lvalue of the element of ``view`` at the index expressions ``index`` (one per dimension)."""
        self.touch(view)
        terms = [str(view.offset)] if view.offset else []
        for expression, size, stride in zip(index, view.sizes, view.strides, strict=True):
            if size == 1 or stride == 0:
                continue
            expression = expression if expression.isidentifier() else f"({expression})"
            terms.append(expression if stride == 1 else f"{expression} * {stride}")
        return f"b{view.buffer}[{' + '.join(terms) if terms else '0'}]"

    def emit(self, text: str) -> None:
        self.lines.append("  " + text)

    def loops(
        self, sizes: Sequence[int], body: Callable[[list[str]], str], names: Sequence[str] | None = None,
        independent: bool = False,
    ) -> None:
        """A loop nest over ``sizes`` (variables ``names``, default ``i0, i1, ...``) around ``body(variables)``.

        ``independent``: no iteration of the innermost loop reads what another writes, which the C compiler cannot
        prove of pointers into one arena; ``#pragma GCC ivdep`` tells it, and it vectorises the loop (the same
        IEEE operations on several elements at once: the same results). 56 -> 41 us a step for kidiq mean-field.
        """
        names = list(names) if names is not None else [f"i{d}" for d in range(len(sizes))]
        heads = [f"for (int64_t {v} = 0; {v} < {size}; {v}++) " for v, size in zip(names, sizes, strict=True)]
        if independent and heads:
            self.emit("".join(heads[:-1]) + "{")
            self.lines.append("#pragma GCC ivdep")
            self.emit(f"{heads[-1]}{{ {body(names)} }} }}")
        else:
            self.emit(f"{''.join(heads)}{{ {body(names)} }}")

    def map(
        self, out: _View, operands: Sequence[_View | Scalar | None], formula: Callable[[list[str | None]], str],
        types: Sequence[torch.dtype], result: torch.dtype,
    ) -> _View:
        """``out[i] = formula(operands[i])``: tensors broadcast to ``out`` and read as ``types`` (one per operand;
        numbers become constants of that type, None stays None), the formula's value of type ``result`` cast to
        ``out``'s dtype. Dimensions are coalesced, as ATen's TensorIterator coalesces them."""
        views = [_broadcast(o, out.sizes) for o in operands if isinstance(o, _View)]
        sizes, strides = _coalesce(out.sizes, [out.strides, *(v.strides for v in views)])
        flat_out = out.reshaped(sizes, strides[0])
        flat = iter([v.reshaped(sizes, s) for v, s in zip(views, strides[1:], strict=True)])
        values: list[str | None] = []
        names = [f"i{d}" for d in range(len(sizes))]
        for operand, dtype in zip(operands, types, strict=True):
            if isinstance(operand, _View):
                view = next(flat)
                values.append(_cast(self.at(view, names), view.dtype, dtype))
            else:
                values.append(None if operand is None else _literal(operand, dtype))
        statement = f"{self.at(flat_out, names)} = {_cast(formula(values), result, out.dtype)};"
        self.work += out.numel
        # Each element is written once, from the same position of its operands (an in-place operation reads what it
        # overwrites at that position only; ATen refuses overlapping inputs and outputs): independent iterations.
        self.loops(sizes, lambda _: statement, names, independent=all(stride != 0 for stride in strides[0]))
        return out

    def copy(self, destination: _View, source: _View | Scalar) -> _View:
        dtype = source.dtype if isinstance(source, _View) else destination.dtype
        return self.map(destination, [source], lambda v: v[0], [dtype], dtype)

    def materialise(self, view: _View) -> _View:
        """A contiguous copy of ``view``."""
        return self.copy(self.fresh(view.sizes, view.dtype), view)

    def check(self, message: str) -> int:
        """A return code for a failed check whose error says ``message`` (``{info}`` for the code's detail)."""
        self.errors.append(message)
        return len(self.errors)


# -- operations -----------------------------------------------------------------------------------------------------
Handler = Callable[[_Generator, torch.fx.Node, _Arguments], Any]
_HANDLERS: dict[str, Handler] = {}


def _handles(*packets: str) -> Callable[[Handler], Handler]:
    """Register a handler for the ATen operations of the overload packets ``packets``."""

    def register(function: Handler) -> Handler:
        for packet in packets:
            _HANDLERS[packet] = function
        return function

    return register


def _meta(node: torch.fx.Node) -> torch.Tensor:
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        raise Unsupported(f"{node.target} has no recorded output")
    return value


def _out(generator: _Generator, node: torch.fx.Node) -> _View:
    """A fresh buffer for ``node``'s output (shape and dtype as the tracer recorded them)."""
    value = _meta(node)
    return generator.fresh(tuple(value.shape), value.dtype)


def _promoted(*operands: _View | Scalar | None) -> torch.dtype:
    """ATen's type promotion of the operands (0-dimensional tensors and Python numbers count less)."""
    examples = [torch.empty(o.sizes, dtype=o.dtype, device="meta") if isinstance(o, _View) else o
                for o in operands if o is not None]
    if len(examples) == 1:
        only = examples[0]
        return only.dtype if isinstance(only, torch.Tensor) else torch.result_type(torch.empty(()), only)
    if len(examples) != 2:
        raise Unsupported("type promotion of more than two operands")
    return torch.result_type(*examples)


def _scaled(value: str, alpha: Scalar, dtype: torch.dtype) -> str:
    return value if alpha == 1 else f"{_literal(alpha, dtype)} * {value}"


def _power(v: list[str], dtype: torch.dtype, exponent: Any) -> str:
    """ATen's ``pow``, with the special cases of its scalar-exponent kernel (products for small integer powers,
    ``sqrt`` for square roots, reciprocals for negative ones)."""
    if isinstance(exponent, (int, float)) and not isinstance(exponent, bool):
        one = _literal(1, dtype)
        special = {1: v[0], 2: f"({v[0]} * {v[0]})", 3: f"({v[0]} * {v[0]} * {v[0]})"}
        if dtype in _FLOATING:
            special.update({
                0.5: _call("sqrt", dtype, v[0]), -0.5: f"({one} / {_call('sqrt', dtype, v[0])})",
                -1: f"({one} / {v[0]})", -2: f"({one} / ({v[0]} * {v[0]}))",
            })
        if exponent in special:
            return special[exponent]
    if dtype not in _FLOATING:
        raise Unsupported("an integer power")
    return _call("pow", dtype, v[0], v[1])


def _clamp(x: str, low: str | None, high: str | None, dtype: torch.dtype) -> str:
    """ATen's ``clamp``: ``min(max(x, low), high)``, NaN propagating (of ``x`` or of a bound)."""
    value = x
    if low is not None:
        value = f"({value} < {low} ? {low} : {value})"
        if dtype in _FLOATING:
            value = f"({low} != {low} ? {low} : {value})"
    if high is not None:
        value = f"({value} > {high} ? {high} : {value})"
        if dtype in _FLOATING:
            value = f"({high} != {high} ? {high} : {value})"
    return f"({x} != {x} ? {x} : {value})" if dtype in _FLOATING else value


def _extremum(a: str, b: str, dtype: torch.dtype, symbol: str) -> str:
    if dtype in _FLOATING:  # NaN propagates, as in ATen
        return f"({a} != {a} ? {a} : ({b} != {b} ? {b} : ({a} {symbol} {b} ? {a} : {b})))"
    return f"({a} {symbol} {b} ? {a} : {b})"


def _remainder(a: str, b: str, dtype: torch.dtype) -> str:
    """ATen's ``remainder``: the result takes the divisor's sign."""
    mod = _call("fmod", dtype, a, b) if dtype in _FLOATING else f"({a} % {b})"
    return f"({mod} != 0 && (({b} < 0) != ({mod} < 0)) ? {mod} + {b} : {mod})"


def _divide(a: str, b: str, dtype: torch.dtype, mode: str | None) -> str:
    if mode is None:
        return f"({a} / {b})"
    if dtype not in _FLOATING or mode not in ("trunc", "floor"):
        raise Unsupported(f"a division with rounding_mode={mode!r} in {dtype}")
    return _call(mode, dtype, f"{a} / {b}")


def _softplus(x: str, dtype: torch.dtype, beta: Scalar, threshold: Scalar) -> str:
    b, t = _literal(beta, dtype), _literal(threshold, dtype)
    return f"(({x} * {b}) > {t} ? {x} : {_call('log1p', dtype, _call('exp', dtype, f'{x} * {b}'))} / {b})"


def _softplus_backward(grad: str, x: str, dtype: torch.dtype, beta: Scalar, threshold: Scalar) -> str:
    b, t = _literal(beta, dtype), _literal(threshold, dtype)
    z = _call("exp", dtype, f"{x} * {b}")
    return f"(({x} * {b}) > {t} ? {grad} : {grad} * {z} / ({z} + {_literal(1, dtype)}))"


#: Elementwise operations by overload packet: the names of their tensor-or-number operands, and their value as a C
#: expression of the operands' values (``v``), the compute dtype (``d``) and the other arguments (``a``). Each is
#: ATen's CPU formula (aten/src/ATen/native/cpu/*Kernel.cpp).
_ELEMENTWISE: dict[str, tuple[tuple[str, ...], Callable[[list, torch.dtype, _Arguments], str]]] = {
    "neg": (("self",), lambda v, d, a: f"(-{v[0]})"),
    "exp": (("self",), lambda v, d, a: _call("exp", d, v[0])),
    "exp2": (("self",), lambda v, d, a: _call("exp2", d, v[0])),
    "expm1": (("self",), lambda v, d, a: _call("expm1", d, v[0])),
    "log": (("self",), lambda v, d, a: _call("log", d, v[0])),
    "log2": (("self",), lambda v, d, a: _call("log2", d, v[0])),
    "log10": (("self",), lambda v, d, a: _call("log10", d, v[0])),
    "log1p": (("self",), lambda v, d, a: _call("log1p", d, v[0])),
    "sqrt": (("self",), lambda v, d, a: _call("sqrt", d, v[0])),
    "rsqrt": (("self",), lambda v, d, a: f"({_literal(1, d)} / {_call('sqrt', d, v[0])})"),
    "reciprocal": (("self",), lambda v, d, a: f"({_literal(1, d)} / {v[0]})"),
    "abs": (("self",), lambda v, d, a: (
        _call("fabs", d, v[0]) if d in _FLOATING else f"({v[0]} < 0 ? -{v[0]} : {v[0]})")),
    "sin": (("self",), lambda v, d, a: _call("sin", d, v[0])),
    "cos": (("self",), lambda v, d, a: _call("cos", d, v[0])),
    "tan": (("self",), lambda v, d, a: _call("tan", d, v[0])),
    "asin": (("self",), lambda v, d, a: _call("asin", d, v[0])),
    "acos": (("self",), lambda v, d, a: _call("acos", d, v[0])),
    "atan": (("self",), lambda v, d, a: _call("atan", d, v[0])),
    "sinh": (("self",), lambda v, d, a: _call("sinh", d, v[0])),
    "cosh": (("self",), lambda v, d, a: _call("cosh", d, v[0])),
    "tanh": (("self",), lambda v, d, a: _call("tanh", d, v[0])),
    "asinh": (("self",), lambda v, d, a: _call("asinh", d, v[0])),
    "acosh": (("self",), lambda v, d, a: _call("acosh", d, v[0])),
    "atanh": (("self",), lambda v, d, a: _call("atanh", d, v[0])),
    "erf": (("self",), lambda v, d, a: _call("erf", d, v[0])),
    "erfc": (("self",), lambda v, d, a: _call("erfc", d, v[0])),
    "lgamma": (("self",), lambda v, d, a: _call("lgamma", d, v[0])),
    "digamma": (("self",), lambda v, d, a: f"(({C_TYPES[d]})ppvi_digamma((double)({v[0]})))"),
    "floor": (("self",), lambda v, d, a: _call("floor", d, v[0]) if d in _FLOATING else v[0]),
    "ceil": (("self",), lambda v, d, a: _call("ceil", d, v[0]) if d in _FLOATING else v[0]),
    "trunc": (("self",), lambda v, d, a: _call("trunc", d, v[0]) if d in _FLOATING else v[0]),
    "round": (("self",), lambda v, d, a: _call("nearbyint", d, v[0]) if d in _FLOATING else v[0]),
    "sign": (("self",), lambda v, d, a: f"(({C_TYPES[d]})(({v[0]} > 0) - ({v[0]} < 0)))"),
    "sgn": (("self",), lambda v, d, a: f"(({C_TYPES[d]})(({v[0]} > 0) - ({v[0]} < 0)))"),  # real tensors: sign
    "sigmoid": (("self",), lambda v, d, a: f"({_literal(1, d)} / ({_literal(1, d)} + {_call('exp', d, f'-{v[0]}')}))"),
    "relu": (("self",), lambda v, d, a: _clamp(v[0], _literal(0, d), None, d)),
    "add": (("self", "other"), lambda v, d, a: f"({v[0]} + {_scaled(v[1], a.get('alpha', 1), d)})"),
    "sub": (("self", "other"), lambda v, d, a: f"({v[0]} - {_scaled(v[1], a.get('alpha', 1), d)})"),
    "rsub": (("self", "other"), lambda v, d, a: f"({v[1]} - {_scaled(v[0], a.get('alpha', 1), d)})"),
    "mul": (("self", "other"), lambda v, d, a: f"({v[0]} * {v[1]})"),
    "div": (("self", "other"), lambda v, d, a: _divide(v[0], v[1], d, a.get("rounding_mode"))),
    "true_divide": (("self", "other"), lambda v, d, a: f"({v[0]} / {v[1]})"),
    "remainder": (("self", "other"), lambda v, d, a: _remainder(v[0], v[1], d)),
    "fmod": (("self", "other"), lambda v, d, a: _call("fmod", d, v[0], v[1]) if d in _FLOATING
             else f"({v[0]} % {v[1]})"),
    "maximum": (("self", "other"), lambda v, d, a: _extremum(v[0], v[1], d, ">")),
    "minimum": (("self", "other"), lambda v, d, a: _extremum(v[0], v[1], d, "<")),
    "atan2": (("self", "other"), lambda v, d, a: _call("atan2", d, v[0], v[1])),
    "xlogy": (("self", "other"), lambda v, d, a: (
        f"({v[1]} != {v[1]} ? NAN : ({v[0]} == 0 ? {_literal(0, d)} : {v[0]} * {_call('log', d, v[1])}))")),
    "special_xlog1py": (("self", "other"), lambda v, d, a: (
        f"({v[1]} != {v[1]} ? NAN : ({v[0]} == 0 ? {_literal(0, d)} : {v[0]} * {_call('log1p', d, v[1])}))")),
    "pow": (("self", "exponent"), lambda v, d, a: _power(v, d, a["exponent"])),
    "lerp": (("self", "end", "weight"), lambda v, d, a: (
        f"({_call('fabs', d, v[2])} < {_literal(0.5, d)} ? {v[0]} + {v[2]} * ({v[1]} - {v[0]})"
        f" : {v[1]} - ({v[1]} - {v[0]}) * ({_literal(1, d)} - {v[2]}))")),
    "softplus": (("self",), lambda v, d, a: _softplus(v[0], d, a.get("beta", 1), a.get("threshold", 20))),
    "softplus_backward": (("grad_output", "self"), lambda v, d, a: _softplus_backward(
        v[0], v[1], d, a["beta"], a["threshold"])),
    "sigmoid_backward": (("grad_output", "output"), lambda v, d, a: f"({v[0]} * ({_literal(1, d)} - {v[1]}) * {v[1]})"),
    "tanh_backward": (("grad_output", "output"), lambda v, d, a: f"({v[0]} * ({_literal(1, d)} - {v[1]} * {v[1]}))"),
    "threshold_backward": (("grad_output", "self", "threshold"), lambda v, d, a: (
        f"({v[1]} <= {v[2]} ? {_literal(0, d)} : {v[0]})")),
    "nan_to_num": (("self",), lambda v, d, a: (
        f"({v[0]} != {v[0]} ? {_literal(a.get('nan', 0.0), d)} : ({v[0]} == INFINITY ? "
        f"{_literal(a.get('posinf', torch.finfo(d).max), d)} : ({v[0]} == -INFINITY ? "
        f"{_literal(a.get('neginf', torch.finfo(d).min), d)} : {v[0]})))") if d in _FLOATING else v[0]),
    "clamp": (("self", "min", "max"), lambda v, d, a: _clamp(v[0], v[1], v[2], d)),
    "clamp_min": (("self", "min"), lambda v, d, a: _clamp(v[0], v[1], None, d)),
    "clamp_max": (("self", "max"), lambda v, d, a: _clamp(v[0], None, v[1], d)),
}
def _log_sigmoid(x: str, dtype: torch.dtype) -> str:
    """ATen's ``log_sigmoid``: ``min(x, 0) - log1p(exp(-|x|))``."""
    zero = _literal(0, dtype)
    return (f"(({x} < {zero} ? {x} : {zero}) - "
            f"{_call('log1p', dtype, _call('exp', dtype, '-' + _call('fabs', dtype, x)))})")


_ELEMENTWISE["log_sigmoid_backward"] = (("grad_output", "self", "buffer"), lambda v, d, a: (
    f"((({v[1]} < 0) ? {_literal(1, d)} : {_literal(0, d)}) - (({v[1]} < 0) ? {_literal(1, d)} : {_literal(-1, d)})"
    f" * ({v[2]} / ({_literal(1, d)} + {v[2]}))) * {v[0]}"))

_COMPARISONS = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_LOGICAL = {"logical_and": "&&", "logical_or": "||", "logical_xor": "!="}
_BITWISE = {"bitwise_and": "&", "bitwise_or": "|", "bitwise_xor": "^"}


def _elementwise(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    """Every elementwise operation (:data:`_ELEMENTWISE`, comparisons, logical operations, ``where``,
    ``masked_fill``), functional or in place (``add_``: computed in the promoted dtype, written into ``self``)."""
    packet = node.target.overloadpacket.__name__
    in_place = packet.endswith("_")
    name = packet[:-1] if in_place else packet
    out_dtype = arguments.view("self").dtype if in_place else _meta(node).dtype
    formula: Callable[[list], str]
    if name in _COMPARISONS:
        operands = [arguments["self"], arguments["other"]]
        dtype, symbol = _promoted(*operands), _COMPARISONS[name]
        types, result_type = [dtype, dtype], torch.bool
        formula = lambda v: f"({v[0]} {symbol} {v[1]})"  # noqa: E731
    elif name in _LOGICAL:
        operands, symbol = [arguments["self"], arguments["other"]], _LOGICAL[name]
        types, result_type = [torch.bool, torch.bool], torch.bool
        formula = lambda v: f"({v[0]} {symbol} {v[1]})"  # noqa: E731
    elif name in _BITWISE:
        operands, symbol = [arguments["self"], arguments["other"]], _BITWISE[name]
        dtype = _promoted(*operands) if not in_place else out_dtype
        if dtype in _FLOATING:
            raise Unsupported(f"{node.target} of floating-point tensors")
        types, result_type = [dtype, dtype], dtype
        formula = lambda v: f"({v[0]} {symbol} {v[1]})"  # noqa: E731
    elif name == "logical_not" or (name == "bitwise_not" and arguments.view("self").dtype == torch.bool):
        operands, types, result_type = [arguments["self"]], [torch.bool], torch.bool
        formula = lambda v: f"(!{v[0]})"  # noqa: E731
    elif name == "isnan":
        operands, result_type = [arguments.view("self")], torch.bool
        types = [operands[0].dtype]
        formula = lambda v: f"({v[0]} != {v[0]})"  # noqa: E731
    elif name == "where":
        operands = [arguments["condition"], arguments["self"], arguments["other"]]
        types, result_type = [torch.bool, out_dtype, out_dtype], out_dtype
        formula = lambda v: f"({v[0]} ? {v[1]} : {v[2]})"  # noqa: E731
    elif name == "masked_fill":
        operands = [arguments["self"], arguments["mask"], arguments["value"]]
        types, result_type = [out_dtype, torch.bool, out_dtype], out_dtype
        formula = lambda v: f"({v[1]} ? {v[2]} : {v[0]})"  # noqa: E731
    elif name in _ELEMENTWISE:
        names, expression = _ELEMENTWISE[name]
        operands = [arguments.values.get(operand) for operand in names]
        dtype = _promoted(*operands) if in_place else out_dtype
        if in_place and dtype in _FLOATING and out_dtype not in _FLOATING:
            raise Unsupported(f"{node.target} would write floating-point values into an integer tensor")
        if name == "digamma":
            generator.helpers.add("ppvi_digamma")
        types, result_type = [dtype] * len(operands), dtype
        formula = lambda v: expression(v, dtype, arguments)  # noqa: E731
    else:
        raise Unsupported(f"the operation {node.target}, which is not among those written out as C")
    if in_place:
        out = result = generator.writable(arguments.view("self"), str(node.target))
    else:
        out, result, operands = _functional_out(generator, node, operands)
    generator.map(out, operands, formula, types, result_type)
    return result


def _functional_out(
    generator: _Generator, node: torch.fx.Node, operands: list[Any]
) -> tuple[_View, _View, list[Any]]:
    """The buffer an elementwise operation computes into, the view of it that is its result, and its operands as
    read into that buffer.

    Where every tensor operand is broadcast along a dimension (stride 0 there), the result is the same all along
    it: it is computed once, into a buffer of size one there, and returned expanded, as a view. Pyro's plates
    broadcast a site's parameters over its data this way, and a ``log(scale)`` over 8 particles x 434 points then
    costs 8 logarithms, not 3,472. Not for a result something writes into later, which must own its elements.
    """
    value = _meta(node)
    sizes = tuple(value.shape)
    views = [_broadcast(o, sizes) for o in operands if isinstance(o, _View)]
    out = generator.fresh(sizes, value.dtype) if node in generator.mutated or not views else None
    if out is not None:
        return out, out, operands
    reduced = tuple(1 if all(v.strides[d] == 0 for v in views) else size for d, size in enumerate(sizes))
    out = generator.fresh(reduced, value.dtype)
    if reduced == sizes:
        return out, out, operands
    read = [_broadcast(o, sizes).reshaped(reduced, _broadcast(o, sizes).strides) if isinstance(o, _View) else o
            for o in operands]
    return out, _broadcast(out, sizes), read


for _packet in [*_ELEMENTWISE, *_COMPARISONS, *_LOGICAL, *_BITWISE, "logical_not", "bitwise_not", "isnan", "where",
                "masked_fill"]:
    _HANDLERS[_packet] = _elementwise
    if _packet not in ("where", "isnan") and not _packet.endswith("_backward"):
        _HANDLERS[_packet + "_"] = _elementwise


# views: no code, a new _View of the same buffer
@_handles("detach", "alias", "lift_fresh", "resolve_conj", "resolve_neg")
def _identity(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    return arguments.view("self")


@_handles("lift_fresh_copy")
def _lift_fresh_copy(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    """A copy of a constant: the constant itself unless something writes into the copy."""
    source = arguments.view("self")
    return generator.materialise(source) if node in generator.mutated else source


@_handles("view", "_unsafe_view", "reshape", "_reshape_alias", "view_copy")
def _reshape(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    view = arguments.view("self")
    shape = tuple(_meta(node).shape)
    strides = _view_strides(view.sizes, view.strides, shape)
    if strides is None or node.target.overloadpacket.__name__ == "view_copy":
        view, strides = generator.materialise(view), _contiguous_strides(shape)
    return view.reshaped(shape, strides)


@_handles("expand")
def _expand(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    return _broadcast(arguments.view("self"), tuple(_meta(node).shape))


@_handles("unsqueeze")
def _unsqueeze(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    view = arguments.view("self")
    dim = _dim(arguments["dim"], view.ndim + 1)
    stride = view.strides[dim] * view.sizes[dim] if dim < view.ndim else 1
    return view.reshaped(view.sizes[:dim] + (1,) + view.sizes[dim:],
                         view.strides[:dim] + (stride,) + view.strides[dim:])


@_handles("squeeze")
def _squeeze(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    view = arguments.view("self")
    dims = arguments.values.get("dim")
    dims = range(view.ndim) if dims is None else [dims] if isinstance(dims, int) else dims
    drop = {_dim(d, view.ndim) for d in dims} if view.ndim else set()
    keep = [d for d in range(view.ndim) if d not in drop or view.sizes[d] != 1]
    return view.reshaped([view.sizes[d] for d in keep], [view.strides[d] for d in keep])


@_handles("permute", "t", "transpose", "numpy_T")
def _permute(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    view = arguments.view("self")
    packet = node.target.overloadpacket.__name__
    if packet == "permute":
        order = [_dim(d, view.ndim) for d in arguments["dims"]]
    elif packet == "transpose":
        order = list(range(view.ndim))
        if view.ndim:
            first, second = _dim(arguments["dim0"], view.ndim), _dim(arguments["dim1"], view.ndim)
            order[first], order[second] = order[second], order[first]
    else:  # t and numpy_T reverse the dimensions
        order = list(reversed(range(view.ndim)))
    return view.reshaped([view.sizes[d] for d in order], [view.strides[d] for d in order])


def _select_view(view: _View, dim: int, index: int) -> _View:
    dim = _dim(dim, view.ndim)
    index = index + view.sizes[dim] if index < 0 else index
    if not 0 <= index < view.sizes[dim]:
        raise Unsupported("an index out of range")
    return view.reshaped(view.sizes[:dim] + view.sizes[dim + 1 :], view.strides[:dim] + view.strides[dim + 1 :],
                         view.offset + index * view.strides[dim])


def _slice_view(view: _View, dim: int, start: int | None, end: int | None, step: int) -> _View:
    """ATen's ``slice``: negative bounds wrapped, both clamped to the size."""
    dim = _dim(dim, view.ndim)
    size = view.sizes[dim]
    if step <= 0:
        raise Unsupported("a slice with a non-positive step")
    start, end = 0 if start is None else start, size if end is None else end
    start, end = start + size if start < 0 else start, end + size if end < 0 else end
    start = min(max(start, 0), size)
    end = min(max(end, start), size)
    return view.reshaped(view.sizes[:dim] + ((end - start + step - 1) // step,) + view.sizes[dim + 1 :],
                         view.strides[:dim] + (view.strides[dim] * step,) + view.strides[dim + 1 :],
                         view.offset + start * view.strides[dim])


def _diagonal_view(view: _View, offset: int, dim1: int, dim2: int) -> _View:
    """ATen's ``diagonal``: the other dimensions in order, then the diagonal."""
    dim1, dim2 = _dim(dim1, view.ndim), _dim(dim2, view.ndim)
    if dim1 == dim2:
        raise Unsupported("a diagonal along one dimension")
    start = view.offset
    if offset >= 0:
        length = max(min(view.sizes[dim1], view.sizes[dim2] - offset), 0)
        start += offset * view.strides[dim2] if length else 0
    else:
        length = max(min(view.sizes[dim1] + offset, view.sizes[dim2]), 0)
        start -= offset * view.strides[dim1] if length else 0
    keep = [d for d in range(view.ndim) if d not in (dim1, dim2)]
    return view.reshaped([view.sizes[d] for d in keep] + [length],
                         [view.strides[d] for d in keep] + [view.strides[dim1] + view.strides[dim2]], start)


@_handles("select")
def _select(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    return _select_view(arguments.view("self"), arguments["dim"], arguments["index"])


@_handles("slice")
def _slice(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    return _slice_view(arguments.view("self"), arguments.get("dim", 0), arguments.values.get("start"),
                       arguments.values.get("end"), arguments.get("step", 1))


@_handles("diagonal")
def _diagonal(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    return _diagonal_view(arguments.view("self"), arguments.get("offset", 0), arguments.get("dim1", 0),
                          arguments.get("dim2", 1))


@_handles("split", "split_with_sizes", "unbind", "chunk")
def _split(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> tuple[_View, ...]:
    view = arguments.view("self")
    dim = _dim(arguments.get("dim", 0), view.ndim)
    if node.target.overloadpacket.__name__ == "unbind":
        return tuple(_select_view(view, dim, i) for i in range(view.sizes[dim]))
    pieces, start = [], 0
    for value in node.meta.get("val") or ():
        pieces.append(_slice_view(view, dim, start, start + value.shape[dim], 1))
        start += value.shape[dim]
    return tuple(pieces)


# copies, fills and constructions
@_handles("clone", "_to_copy", "contiguous")
def _clone(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    return generator.copy(_out(generator, node), arguments.view("self"))


@_handles("copy")
def _copy(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    return generator.copy(_out(generator, node), arguments["src"])


@_handles("copy_")
def _copy_in_place(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    return generator.copy(generator.writable(arguments.view("self"), "copy_"), arguments["src"])


def _filled(generator: _Generator, node: torch.fx.Node, value: Scalar | _View) -> _View:
    out = _out(generator, node)
    return generator.copy(out, value)


@_handles("zeros", "zeros_like", "new_zeros", "empty", "empty_like", "new_empty", "empty_strided", "zero")
def _zeros(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    return _filled(generator, node, 0)  # an empty tensor may hold anything: zeros


@_handles("ones", "ones_like", "new_ones")
def _ones(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    return _filled(generator, node, 1)


@_handles("full", "full_like", "new_full", "scalar_tensor", "fill")
def _full(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    for name in ("fill_value", "s", "value"):
        if arguments.values.get(name) is not None:
            return _filled(generator, node, arguments[name])
    raise Unsupported(f"{node.target} without a value")


@_handles("zero_", "fill_")
def _fill_in_place(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    destination = generator.writable(arguments.view("self"), str(node.target))
    return generator.copy(destination, arguments.get("value", 0))


@_handles("eye")
def _eye(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    out = _out(generator, node)
    one, zero = _literal(1, out.dtype), _literal(0, out.dtype)
    generator.work += out.numel
    generator.loops(out.sizes, lambda i: f"{generator.at(out, i)} = {i[0]} == {i[1]} ? {one} : {zero};")
    return out


@_handles("arange")
def _arange(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    """``start + step * i``, computed in double for floating types (ATen's accumulate type) and cast."""
    out = _out(generator, node)
    start, step = arguments.get("start", 0), arguments.get("step", 1)
    wide = torch.float64 if out.dtype in _FLOATING else torch.int64
    generator.work += out.numel
    generator.loops(out.sizes, lambda i: (
        f"{generator.at(out, i)} = ({C_TYPES[out.dtype]})({_literal(start, wide)} + {_literal(step, wide)} * "
        f"({C_TYPES[wide]}){i[0]});"
    ))
    return out


@_handles("tril", "triu")
def _triangle(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    view, out = arguments.view("self"), _out(generator, node)
    keep = "<=" if node.target.overloadpacket.__name__ == "tril" else ">="
    diagonal = int(arguments.get("diagonal", 0))
    generator.work += out.numel
    generator.loops(out.sizes, lambda i: (
        f"{generator.at(out, i)} = ({i[-1]} - {i[-2]} {keep} {diagonal}) ? "
        f"{_cast(generator.at(view, i), view.dtype, out.dtype)} : {_literal(0, out.dtype)};"
    ))
    return out


@_handles("diag_embed")
def _diag_embed(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    out = _filled(generator, node, 0)
    diagonal = _diagonal_view(out, arguments.get("offset", 0), arguments.get("dim1", -2), arguments.get("dim2", -1))
    generator.copy(diagonal, arguments.view("self"))
    return out


@_handles("select_backward", "slice_backward", "diagonal_backward")
def _view_backward(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    """The gradient of a view: zeros, the incoming gradient copied into the same view of them."""
    out = _filled(generator, node, 0)
    packet = node.target.overloadpacket.__name__
    if packet == "select_backward":
        part = _select_view(out, arguments["dim"], arguments["index"])
    elif packet == "slice_backward":
        part = _slice_view(out, arguments["dim"], arguments["start"], arguments["end"], arguments["step"])
    else:
        part = _diagonal_view(out, arguments["offset"], arguments["dim1"], arguments["dim2"])
    generator.copy(part, arguments.view("grad_output"))
    return out


@_handles("cat")
def _cat(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    out = _out(generator, node)
    dim, start = _dim(arguments.get("dim", 0), out.ndim), 0
    for tensor in arguments["tensors"]:
        if tensor.ndim == 1 and tensor.sizes[0] == 0:  # ATen skips empty one-dimensional tensors
            continue
        generator.copy(_slice_view(out, dim, start, start + tensor.sizes[dim], 1), tensor)
        start += tensor.sizes[dim]
    return out


@_handles("stack")
def _stack(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    out = _out(generator, node)
    dim = _dim(arguments.get("dim", 0), out.ndim)
    for position, tensor in enumerate(arguments["tensors"]):
        generator.copy(_select_view(out, dim, position), tensor)
    return out


@_handles("flip")
def _flip(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    view = arguments.view("self")
    offset, strides = view.offset, list(view.strides)
    for dim in {_dim(d, view.ndim) for d in arguments["dims"]}:
        offset += (view.sizes[dim] - 1) * strides[dim] if view.sizes[dim] else 0
        strides[dim] = -strides[dim]
    return generator.materialise(view.reshaped(view.sizes, strides, offset))


def _index_value(generator: _Generator, index: _View, variables: Sequence[str], size: int) -> str:
    """The C value of an index tensor's element, a negative index counted from the end (ATen's indexing)."""
    value = f"((int64_t){generator.at(index, variables)})"
    return f"({value} < 0 ? {value} + {size} : {value})"


@_handles("index_select", "gather")
def _index_select(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    """``index_select`` (one index per position along ``dim``) and ``gather`` (one per output element)."""
    view, index = arguments.view("self"), arguments.view("index")
    out = _out(generator, node)
    dim = _dim(arguments["dim"], view.ndim)
    gather = node.target.overloadpacket.__name__ == "gather"
    if not gather and index.ndim == 0:
        index = index.reshaped((1,), (0,))
    generator.work += out.numel

    def body(i: list[str]) -> str:
        source = list(i)
        if view.ndim:
            source[dim] = _index_value(generator, index, i if gather else [i[dim]], view.sizes[dim])
        return f"{generator.at(out, i)} = {_cast(generator.at(view, source), view.dtype, out.dtype)};"

    generator.loops(out.sizes, body)
    return out


def _single_index(arguments: _Arguments) -> tuple[int, _View]:
    """The position and tensor of the one index tensor of an advanced indexing (``x[:, idx]``)."""
    present = [(position, index) for position, index in enumerate(arguments["indices"]) if index is not None]
    if len(present) != 1 or not isinstance(present[0][1], _View):
        raise Unsupported("advanced indexing with several index tensors")
    if present[0][1].dtype in (torch.bool, torch.uint8, *_FLOATING):
        raise Unsupported("indexing with a boolean mask")
    return present[0]


@_handles("index")
def _index(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    view = arguments.view("self")
    position, index = _single_index(arguments)
    out = _out(generator, node)
    generator.work += out.numel

    def body(i: list[str]) -> str:
        chosen = _index_value(generator, index, i[position : position + index.ndim], view.sizes[position])
        source = [*i[:position], chosen, *i[position + index.ndim :]]
        return f"{generator.at(out, i)} = {_cast(generator.at(view, source), view.dtype, out.dtype)};"

    generator.loops(out.sizes, body)
    return out


@_handles("index_put", "index_put_", "_index_put_impl_", "_unsafe_index_put")
def _index_put(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    """``x[..., idx, ...] = values`` (or ``+=`` with ``accumulate``), functional or in place; serial, as ATen's
    CPU kernel accumulates repeated indices."""
    view = arguments.view("self")
    position, index = _single_index(arguments)
    if node.target.overloadpacket.__name__.endswith("_"):
        out = generator.writable(view, str(node.target))
    else:
        out = generator.materialise(view)
    shape = (*view.sizes[:position], *index.sizes, *view.sizes[position + 1 :])
    values = _broadcast(arguments.view("values"), shape)
    symbol = "+=" if arguments.get("accumulate", False) else "="
    generator.work += math.prod(shape)

    def body(i: list[str]) -> str:
        chosen = _index_value(generator, index, i[position : position + index.ndim], view.sizes[position])
        target = [*i[:position], chosen, *i[position + index.ndim :]]
        return f"{generator.at(out, target)} {symbol} {_cast(generator.at(values, i), values.dtype, out.dtype)};"

    generator.loops(shape, body)
    return out


@_handles("index_add")
def _index_add(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    view, index, source = (arguments.view(name) for name in ("self", "index", "source"))
    out = generator.materialise(view)
    dim = _dim(arguments["dim"], view.ndim)
    alpha = arguments.get("alpha", 1)
    generator.work += source.numel

    def body(i: list[str]) -> str:
        target = list(i)
        target[dim] = _index_value(generator, index, [i[dim]], view.sizes[dim])
        value = _cast(generator.at(source, i), source.dtype, out.dtype)
        return f"{generator.at(out, target)} += {_scaled(value, alpha, out.dtype)};"

    generator.loops(source.sizes, body)
    return out


@_handles("log_sigmoid_forward")
def _log_sigmoid_forward(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> tuple[_View, _View]:
    """ATen's CPU ``log_sigmoid_forward``: the output, and the buffer ``exp(-|x|)`` its backward reads."""
    x = arguments.view("self")
    output_value, buffer_value = node.meta["val"]
    output = generator.fresh(tuple(output_value.shape), output_value.dtype)
    buffer = generator.fresh(tuple(buffer_value.shape), buffer_value.dtype)
    d = output.dtype
    generator.map(output, [x], lambda v: _log_sigmoid(v[0], d), [d], d)
    if buffer.numel:
        generator.map(buffer, [x], lambda v: _call("exp", d, "-" + _call("fabs", d, v[0])), [d], d)
    return output, buffer


@_handles("binary_cross_entropy_with_logits")
def _binary_cross_entropy_with_logits(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    """ATen's ``(1 - target) * input - log_sigmoid(input)`` (times ``log_weight`` from ``pos_weight``, times
    ``weight``), then the reduction (0 none, 1 mean, 2 sum)."""
    x, target = arguments.view("self"), arguments.view("target")
    weight, positive = arguments.values.get("weight"), arguments.values.get("pos_weight")
    reduction = arguments.get("reduction", 1)
    value = _meta(node)
    sizes = tuple(torch.broadcast_shapes(x.sizes, target.sizes))
    losses = generator.fresh(sizes, value.dtype) if reduction else _out(generator, node)
    d = value.dtype
    operands = [x, target, weight, positive]

    def formula(v: list) -> str:
        log_sigmoid = _log_sigmoid(v[0], d)
        if v[3] is not None:
            log_sigmoid = f"{log_sigmoid} * (({v[3]} - {_literal(1, d)}) * {v[1]} + {_literal(1, d)})"
        loss = f"(({_literal(1, d)} - {v[1]}) * {v[0]} - {log_sigmoid})"
        return f"{loss} * {v[2]}" if v[2] is not None else loss

    generator.map(losses, operands, formula, [d] * 4, d)
    if not reduction:
        return losses
    out = _out(generator, node)
    count = _literal(max(losses.numel, 1), d)
    finish = f"({C_TYPES[d]})acc / {count}" if reduction == 1 else f"({C_TYPES[d]})acc"
    statement = lambda index, inner: (  # noqa: E731
        f"double acc = 0; {inner}{{ acc += {generator.at(losses, index)}; }} {generator.at(out, [])} = {finish};"
    )
    _reduction_loops(generator, losses, list(range(losses.ndim)), statement)
    return out


@_handles("scatter_add", "scatter", "scatter_add_", "scatter_")
def _scatter(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    """``out = self`` (in place: ``self`` itself), then ``out[..., index[i], ...] (+)= src[i]`` (or ``value``) over
    the index's elements, serially."""
    if arguments.values.get("reduce") is not None:
        raise Unsupported(f"{node.target} with a reduction")
    packet = node.target.overloadpacket.__name__
    view, index = arguments.view("self"), arguments.view("index")
    out = generator.writable(view, packet) if packet.endswith("_") else generator.materialise(view)
    dim = _dim(arguments["dim"], view.ndim)
    source = arguments.values.get("src")
    symbol = "+=" if packet.startswith("scatter_add") else "="
    generator.work += index.numel

    def body(i: list[str]) -> str:
        target = list(i)
        target[dim] = _index_value(generator, index, i, view.sizes[dim])
        if isinstance(source, _View):
            value = _cast(generator.at(source.reshaped(index.sizes, source.strides[: index.ndim]), i), source.dtype,
                          out.dtype)
        else:
            value = _literal(arguments["value"], out.dtype)
        return f"{generator.at(out, target)} {symbol} {value};"

    generator.loops(index.sizes, body)
    return out


# reductions and scans: an outer loop nest over the kept dimensions, inner loops over the others
def _reduced(view: _View, dims: Any) -> list[int]:
    """The dimensions a reduction folds: ``dims``, or all of them where it is None or empty (ATen's rule)."""
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(view.ndim))
    return sorted({_dim(d, view.ndim) for d in ([dims] if isinstance(dims, int) else dims)})


def _reduction_loops(
    generator: _Generator, view: _View, dims: Sequence[int], statement: Callable[[list[str], str], str],
) -> None:
    """Loops over the dimensions of ``view`` not in ``dims`` (variables ``i<d>``) around
    ``statement(index of view with r<d> for the reduced dimensions, inner loop heads)``."""
    kept = [d for d in range(view.ndim) if d not in dims]
    index = [f"r{d}" if d in dims else f"i{d}" for d in range(view.ndim)]
    inner = "".join(f"for (int64_t r{d} = 0; r{d} < {view.sizes[d]}; r{d}++) " for d in dims)
    generator.work += view.numel
    generator.loops([view.sizes[d] for d in kept], lambda _: statement(index, inner), [f"i{d}" for d in kept])


def _kept(out: _View, view: _View, dims: Sequence[int]) -> tuple[_View, list[str]]:
    """``out`` (with or without the reduced dimensions as ones) seen as the kept dimensions, and their variables."""
    kept = [d for d in range(view.ndim) if d not in dims]
    sizes = [view.sizes[d] for d in kept]
    return out.reshaped(sizes, _contiguous_strides(sizes)), [f"i{d}" for d in kept]


@_handles("sum", "mean", "prod", "amax", "amin", "max", "min", "linalg_vector_norm", "any", "all")
def _reduction(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    """A reduction accumulated in double (float types) or int64: ATen's accumulate types on the CPU."""
    packet = node.target.overloadpacket.__name__
    if packet in ("max", "min") and node.target._overloadname != "default":
        raise Unsupported(f"{node.target} (it returns indices)")
    view = arguments.view("self")
    dims = _reduced(view, arguments.values.get("dim"))
    out = _out(generator, node)
    flat, variables = _kept(out, view, dims)
    wide = torch.float64 if out.dtype in _FLOATING else torch.int64
    count = math.prod(view.sizes[d] for d in dims)
    larger = packet in ("amax", "max")
    if packet in ("sum", "mean"):
        start, step = "0", lambda acc, x: f"acc += {x};"
    elif packet == "prod":
        start, step = "1", lambda acc, x: f"acc *= {x};"
    elif packet in ("amax", "max", "amin", "min"):
        symbol = ">" if larger else "<"
        start = ("-INFINITY" if larger else "INFINITY") if wide == torch.float64 else ("INT64_MIN" if larger
                                                                                      else "INT64_MAX")
        step = lambda acc, x: f"if ({x} != {x} || {x} {symbol} acc) acc = {x};"  # noqa: E731 (NaN propagates)
    elif packet in ("any", "all"):
        wide = torch.int64
        start = "0" if packet == "any" else "1"
        step = (lambda acc, x: f"acc = acc || ({x} != 0);") if packet == "any" else \
            (lambda acc, x: f"acc = acc && ({x} != 0);")
    else:  # linalg_vector_norm: the Euclidean norm
        if arguments.get("ord", 2) != 2 or out.dtype not in _FLOATING:
            raise Unsupported("a vector norm other than the Euclidean")
        start, step = "0", lambda acc, x: f"acc += {x} * {x};"
    ctype = C_TYPES[out.dtype]
    finish = {"mean": f"({ctype})acc / {_literal(count, out.dtype)}", "linalg_vector_norm": "sqrt(acc)"}.get(
        packet, f"({ctype})acc"
    )

    def statement(index: list[str], inner: str) -> str:
        x = _cast(generator.at(view, index), view.dtype, wide)
        return (f"{C_TYPES[wide]} acc = {start}; {inner}{{ {C_TYPES[wide]} x = {x}; {step('acc', 'x')} }} "
                f"{generator.at(flat, variables)} = {finish};")

    def partial_sums(index: list[str], inner: str) -> str:
        """A floating sum over a long last dimension in :data:`PARTIAL_SUMS` running sums (interleaved), added at
        the end: one chain of dependent additions costs an addition's latency per element, several chains
        overlap (3.6 -> 1.9 cycles an element in kidiq's step); the order of the additions changes, as ATen's
        does."""
        last = dims[-1]
        outer = "".join(f"for (int64_t r{d} = 0; r{d} < {view.sizes[d]}; r{d}++) " for d in dims[:-1])
        names = [f"a{k}" for k in range(PARTIAL_SUMS)]
        terms = []
        for k in range(PARTIAL_SUMS):
            element = _cast(generator.at(view, [f"r{last} + {k}" if d == last else v for d, v in enumerate(index)]),
                            view.dtype, wide)
            terms.append(f"a{k} += {element};" if packet != "linalg_vector_norm" else
                         f"{{ double x = {element}; a{k} += x * x; }}")
        tail = _cast(generator.at(view, index), view.dtype, wide)
        tail_term = f"a0 += {tail};" if packet != "linalg_vector_norm" else f"{{ double x = {tail}; a0 += x * x; }}"
        total = " + ".join(f"({names[k]} + {names[k + 1]})" for k in range(0, PARTIAL_SUMS, 2))
        return (
            f"double acc = 0; {outer}{{ double {' = 0, '.join(names)} = 0; int64_t r{last} = 0; "
            f"for (; r{last} + {PARTIAL_SUMS} <= {view.sizes[last]}; r{last} += {PARTIAL_SUMS}) "
            f"{{ {' '.join(terms)} }} "
            f"for (; r{last} < {view.sizes[last]}; r{last}++) {tail_term} acc += {total}; }} "
            f"{generator.at(flat, variables)} = {finish};"
        )

    summing = packet in ("sum", "mean", "linalg_vector_norm") and wide == torch.float64
    if summing and dims and view.sizes[dims[-1]] >= 2 * PARTIAL_SUMS:
        _reduction_loops(generator, view, dims, lambda index, inner: partial_sums(index, inner))
    else:
        _reduction_loops(generator, view, dims, statement)
    return out


@_handles("max.dim", "min.dim")
def _extremum_with_index(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> tuple[_View, _View]:
    """``max``/``min`` along a dimension: the values and the index of the first extremum (of the first NaN, which
    wins), as ATen's CPU kernel returns them."""
    view = arguments.view("self")
    dim = _dim(arguments["dim"], view.ndim)
    values_value, indices_value = node.meta["val"]
    values = generator.fresh(tuple(values_value.shape), values_value.dtype)
    indices = generator.fresh(tuple(indices_value.shape), indices_value.dtype)
    flat_values, variables = _kept(values, view, [dim])
    flat_indices, _ = _kept(indices, view, [dim])
    larger = node.target.overloadpacket.__name__ == "max"
    symbol, ctype = (">" if larger else "<"), C_TYPES[view.dtype]
    x = generator.at(view, [f"r{d}" if d == dim else f"i{d}" for d in range(view.ndim)])
    statement = (
        f"{ctype} best = 0; int64_t at = -1; for (int64_t r{dim} = 0; r{dim} < {view.sizes[dim]}; r{dim}++) {{ "
        f"{ctype} x = {x}; if (at < 0 || (best == best && (x != x || x {symbol} best))) "
        f"{{ best = x; at = r{dim}; }} }} "
        f"{generator.at(flat_values, variables)} = best; {generator.at(flat_indices, variables)} = at;"
    )
    others = [d for d in range(view.ndim) if d != dim]
    generator.work += view.numel
    generator.loops([view.sizes[d] for d in others], lambda _: statement, [f"i{d}" for d in others])
    return values, indices


@_handles("logsumexp")
def _logsumexp(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    """ATen's ``logsumexp``: ``m`` the maximum (an infinite one counted as 0), ``log(sum(exp(x - m))) + m``."""
    view = arguments.view("self")
    dims = _reduced(view, arguments.values.get("dim"))
    out = _out(generator, node)
    if out.dtype not in _FLOATING:
        raise Unsupported("an integer logsumexp")
    flat, variables = _kept(out, view, dims)
    ctype, d = C_TYPES[out.dtype], out.dtype

    def statement(index: list[str], inner: str) -> str:
        x = _cast(generator.at(view, index), view.dtype, d)
        return (
            f"{ctype} m = -INFINITY; {inner}{{ {ctype} x = {x}; if (x != x || x > m) m = x; }} "
            f"if ({_call('fabs', d, 'm')} == INFINITY) m = 0; {ctype} s = 0; "
            f"{inner}{{ s += {_call('exp', d, f'{x} - m')}; }} {generator.at(flat, variables)} = "
            f"{_call('log', d, 's')} + m;"
        )

    _reduction_loops(generator, view, dims, statement)
    generator.work += view.numel
    return out


def _along(view: _View, dim: int) -> tuple[list[int], Callable[[str], list[str]]]:
    """For an operation along ``dim``: the other dimensions, and the index of ``view`` with ``dim``'s variable."""
    others = [d for d in range(view.ndim) if d != dim]
    return others, lambda variable: [variable if d == dim else f"i{d}" for d in range(view.ndim)]


def _along_loops(generator: _Generator, view: _View, others: list[int], statement: str) -> None:
    generator.loops([view.sizes[d] for d in others], lambda _: statement, [f"i{d}" for d in others])


@_handles("cumsum", "cumprod")
def _cumulative(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    """Running sums (products) along a dimension, accumulated in double (int64) as ATen's CPU kernel does."""
    view, out = arguments.view("self"), _out(generator, node)
    if view.ndim == 0:
        return generator.copy(out, view)
    dim = _dim(arguments["dim"], view.ndim)
    others, index = _along(view, dim)
    wide = torch.float64 if out.dtype in _FLOATING else torch.int64
    x = _cast(generator.at(view, index("k")), view.dtype, wide)
    start, symbol = ("0", "+=") if node.target.overloadpacket.__name__ == "cumsum" else ("1", "*=")
    generator.work += view.numel
    _along_loops(generator, view, others, (
        f"{C_TYPES[wide]} acc = {start}; for (int64_t k = 0; k < {view.sizes[dim]}; k++) {{ acc {symbol} {x}; "
        f"{generator.at(out, index('k'))} = ({C_TYPES[out.dtype]})acc; }}"
    ))
    return out


@_handles("_log_softmax", "_softmax")
def _softmax(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    """ATen's (log-)softmax along a dimension: ``x - m - log(sum(exp(x - m)))`` or ``exp(x - m) / sum``."""
    view, out = arguments.view("self"), _out(generator, node)
    log = node.target.overloadpacket.__name__ == "_log_softmax"
    if out.dtype not in _FLOATING or view.dtype != out.dtype:
        raise Unsupported("a softmax that changes dtype")
    if view.ndim == 0:
        return generator.copy(out, 0 if log else 1)
    dim = _dim(arguments["dim"], view.ndim)
    others, index = _along(view, dim)
    ctype, d, size = C_TYPES[out.dtype], out.dtype, view.sizes[dim]
    x, y = generator.at(view, index("k")), generator.at(out, index("k"))
    tail = (f"{ctype} l = {_call('log', d, 's')}; for (int64_t k = 0; k < {size}; k++) {y} = {x} - m - l;" if log
            else f"for (int64_t k = 0; k < {size}; k++) {y} = {_call('exp', d, f'{x} - m')} / s;")
    generator.work += 3 * view.numel
    _along_loops(generator, view, others, (
        f"{ctype} m = -INFINITY; for (int64_t k = 0; k < {size}; k++) "
        f"{{ {ctype} v = {x}; if (v != v || v > m) m = v; }} "
        f"{ctype} s = 0; for (int64_t k = 0; k < {size}; k++) s += {_call('exp', d, f'{x} - m')}; {tail}"
    ))
    return out


@_handles("_log_softmax_backward_data", "_softmax_backward_data")
def _softmax_backward(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    """ATen's backward formulas: ``g - exp(y) * sum(g)`` (log-softmax), ``y * (g - sum(g * y))`` (softmax)."""
    gradient, output, out = arguments.view("grad_output"), arguments.view("output"), _out(generator, node)
    if gradient.sizes != output.sizes or out.dtype not in _FLOATING:
        raise Unsupported("a softmax backward of mismatched shapes")
    if output.ndim == 0:
        return generator.copy(out, 0)
    dim = _dim(arguments["dim"], output.ndim)
    others, index = _along(output, dim)
    ctype, d, size = C_TYPES[out.dtype], out.dtype, output.sizes[dim]
    g = _cast(generator.at(gradient, index("k")), gradient.dtype, d)
    y = _cast(generator.at(output, index("k")), output.dtype, d)
    result = generator.at(out, index("k"))
    if node.target.overloadpacket.__name__ == "_log_softmax_backward_data":
        statement = (f"{ctype} s = 0; for (int64_t k = 0; k < {size}; k++) s += {g}; "
                     f"for (int64_t k = 0; k < {size}; k++) {result} = {g} - {_call('exp', d, y)} * s;")
    else:
        statement = (f"{ctype} s = 0; for (int64_t k = 0; k < {size}; k++) s += {g} * {y}; "
                     f"for (int64_t k = 0; k < {size}; k++) {result} = {y} * ({g} - s);")
    generator.work += 2 * output.numel
    _along_loops(generator, output, others, statement)
    return out


# linear algebra of small matrices, written out
def _batched(generator: _Generator, batch: Sequence[int], statement: Callable[[list[str]], str]) -> None:
    generator.loops(batch, statement)


def _matrix_product(
    generator: _Generator, out: _View, left: _View, right: _View, bias: _View | None = None, beta: Scalar = 1,
    alpha: Scalar = 1,
) -> _View:
    """``out[..., m, n] = alpha * sum_k left[..., m, k] right[..., k, n] + beta * bias[..., m, n]``, accumulated in
    double; the operands already broadcast over ``out``'s batch dimensions."""
    batch = out.sizes[:-2]
    rows, inner, columns = left.sizes[-2], left.sizes[-1], right.sizes[-1]
    generator.work += out.numel * max(inner, 1)

    def statement(b: list[str]) -> str:
        value = "acc" if alpha == 1 else f"{_literal(alpha, torch.float64)} * acc"
        if bias is not None and beta != 0:
            term = _cast(generator.at(bias, [*b, "m", "n"]), bias.dtype, torch.float64)
            value += f" + {term}" if beta == 1 else f" + {_literal(beta, torch.float64)} * {term}"
        a = _cast(generator.at(left, [*b, "m", "k"]), left.dtype, torch.float64)
        c = _cast(generator.at(right, [*b, "k", "n"]), right.dtype, torch.float64)
        return (f"for (int64_t m = 0; m < {rows}; m++) for (int64_t n = 0; n < {columns}; n++) {{ double acc = 0; "
                f"for (int64_t k = 0; k < {inner}; k++) acc += {a} * {c}; "
                f"{generator.at(out, [*b, 'm', 'n'])} = ({C_TYPES[out.dtype]})({value}); }}")

    _batched(generator, batch, statement)
    return out


def _column(view: _View) -> _View:
    return view.reshaped((*view.sizes, 1), (*view.strides, 0))


@_handles("mm", "bmm", "mv", "dot", "addmm", "addmv", "baddbmm")
def _product(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    packet = node.target.overloadpacket.__name__
    out = _out(generator, node)
    beta, alpha = arguments.get("beta", 1), arguments.get("alpha", 1)
    if packet in ("mm", "bmm"):
        return _matrix_product(generator, out, arguments.view("self"), arguments.view("mat2"))
    if packet in ("addmm", "baddbmm"):
        left, right = (arguments.view("mat1"), arguments.view("mat2")) if packet == "addmm" else \
            (arguments.view("batch1"), arguments.view("batch2"))
        return _matrix_product(generator, out, left, right, _broadcast(arguments.view("self"), out.sizes), beta, alpha)
    if packet in ("mv", "addmv"):
        matrix = arguments.view("self" if packet == "mv" else "mat")
        bias = None if packet == "mv" else _column(_broadcast(arguments.view("self"), out.sizes))
        _matrix_product(generator, _column(out).reshaped((*out.sizes, 1), (*out.strides, 1)), matrix,
                        _column(arguments.view("vec")), bias, beta, alpha)
        return out
    left, right = arguments.view("self"), arguments.view("tensor")  # dot
    _matrix_product(generator, out.reshaped((1, 1), (1, 1)), left.reshaped((1, *left.sizes), (0, *left.strides)),
                    _column(right))
    return out


@_handles("linalg_solve_triangular")
def _solve_triangular(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> _View:
    """Forward (lower) or back (upper) substitution, column by column, for each matrix of the batch."""
    if not arguments.get("left", True):
        raise Unsupported("a triangular solve from the right")
    out = _out(generator, node)
    size, columns = out.sizes[-2], out.sizes[-1]
    matrix = _broadcast(arguments.view("self"), (*out.sizes[:-2], size, size))
    right = _broadcast(arguments.view("B"), out.sizes)
    upper, unit = bool(arguments["upper"]), bool(arguments.get("unitriangular", False))
    ctype, d = C_TYPES[out.dtype], out.dtype
    generator.work += out.numel * size

    def statement(b: list[str]) -> str:
        a = lambda r, c: _cast(generator.at(matrix, [*b, r, c]), matrix.dtype, d)  # noqa: E731
        x = lambda r, c: generator.at(out, [*b, r, c])  # noqa: E731
        row = f"{size - 1} - s" if upper else "s"
        others = f"for (int64_t l = r + 1; l < {size}; l++)" if upper else "for (int64_t l = 0; l < r; l++)"
        divide = "" if unit else f" / {a('r', 'r')}"
        return (f"for (int64_t n = 0; n < {columns}; n++) for (int64_t s = 0; s < {size}; s++) {{ "
                f"int64_t r = {row}; {ctype} v = {_cast(generator.at(right, [*b, 'r', 'n']), right.dtype, d)}; "
                f"{others} v -= {a('r', 'l')} * {x('l', 'n')}; {x('r', 'n')} = v{divide}; }}")

    _batched(generator, out.sizes[:-2], statement)
    return out


@_handles("linalg_cholesky_ex")
def _cholesky(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> tuple[_View, _View]:
    """Cholesky-Banachiewicz, row by row. ``info`` is the order of the first leading minor found not positive
    definite (LAPACK's), and the factor is then NaN."""
    factor_value, info_value = node.meta["val"]
    matrix = arguments.view("self")
    factor = generator.fresh(tuple(factor_value.shape), factor_value.dtype)
    info = generator.fresh(tuple(info_value.shape), info_value.dtype)
    size = matrix.sizes[-1]
    upper = bool(arguments.get("upper", False))
    ctype, d = C_TYPES[factor.dtype], factor.dtype
    generator.work += factor.numel * size

    def statement(b: list[str]) -> str:
        f = lambda r, c: generator.at(factor, [*b, c, r] if upper else [*b, r, c])  # noqa: E731 (upper: L^T)
        a = _cast(generator.at(matrix, [*b, "r", "c"]), matrix.dtype, d)
        everywhere = f"for (int64_t r = 0; r < {size}; r++) for (int64_t c = 0; c < {size}; c++)"
        return (
            f"int32_t bad = 0; {everywhere} {f('r', 'c')} = 0; "
            f"for (int64_t r = 0; r < {size} && !bad; r++) for (int64_t c = 0; c <= r; c++) {{ {ctype} v = {a}; "
            f"for (int64_t k = 0; k < c; k++) v -= {f('r', 'k')} * {f('c', 'k')}; "
            f"if (r == c) {{ if (!(v > 0)) {{ bad = (int32_t)(r + 1); break; }} "
            f"{f('r', 'c')} = {_call('sqrt', d, 'v')}; }} "
            f"else {f('r', 'c')} = v / {f('c', 'c')}; }} "
            f"if (bad) {everywhere} {f('r', 'c')} = NAN; {generator.at(info, b)} = ({C_TYPES[info.dtype]})bad;"
        )

    _batched(generator, matrix.sizes[:-2], statement)
    return factor, info


@_handles("_linalg_check_errors")
def _check_errors(generator: _Generator, node: torch.fx.Node, arguments: _Arguments) -> None:
    """ATen's check of a factorisation's ``info``: the kernel returns a code, and the step raises the error."""
    info = arguments.view("info")
    code = generator.check(
        f"{arguments['api_name']}: The factorization could not be completed because the input is not "
        "positive-definite (the leading minor of order {info} is not positive-definite)."
    )
    generator.loops(info.sizes, lambda i: (
        f"if ({generator.at(info, i)} != 0) {{ *status = ((int64_t){code} << 32) | "
        f"(int64_t)(uint32_t){generator.at(info, i)}; return NAN; }}"
    ))


#: The ATen operations (overload packets) written out as C.
SUPPORTED = frozenset(_HANDLERS)


# -- constant folding -----------------------------------------------------------------------------------------------
def _aliases(graph: torch.fx.Graph) -> tuple[dict[torch.fx.Node, torch.fx.Node], set[torch.fx.Node]]:
    """Each view's (and in-place result's) base node, and the base nodes some operation writes into."""
    base: dict[torch.fx.Node, torch.fx.Node] = {}
    written = set()
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        schema = node.target._schema
        first = node.args[0] if node.args else None
        if schema.returns and schema.returns[0].alias_info is not None and isinstance(first, torch.fx.Node):
            base[node] = base.get(first, first)
        for argument, value in zip(schema.arguments, node.args, strict=False):
            if argument.alias_info is not None and argument.alias_info.is_write and isinstance(value, torch.fx.Node):
                written.add(base.get(value, value))
    return base, written


def mutated_nodes(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """The nodes whose tensors some operation of ``graph`` writes into, directly or through a view."""
    base, written = _aliases(graph)
    return written | {node for node, root in base.items() if root in written}


def fold_constants(graph: torch.fx.GraphModule) -> int:
    """Evaluate once the operations of ``graph`` that depend on its constants alone and make them constants, then
    drop the operations whose results nothing uses. Returns how many operations went.

    What a step would otherwise recompute at every call from its data (Pyro's constant tensors, ``eye``, ``arange``,
    products of the data) then costs nothing per step, replayed or written out. Tensors something writes into later
    are left as they are.
    """
    before = sum(node.op == "call_function" for node in graph.graph.nodes)
    mutated = mutated_nodes(graph.graph)
    constant: dict[torch.fx.Node, Any] = {}
    for node in graph.graph.nodes:
        if node.op == "get_attr":
            constant[node] = getattr(graph, node.target)
            continue
        if node.op != "call_function" or node in mutated or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if node.target._schema.is_mutable or torch.Tag.nondeterministic_seeded in node.target.tags:
            continue
        flat, _ = torch.utils._pytree.tree_flatten([node.args, node.kwargs])
        if not all(not isinstance(value, torch.fx.Node) or value in constant for value in flat):
            continue
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: constant[n])
        with torch.no_grad():
            constant[node] = node.target(*args, **kwargs)
    folded = 0
    for node in list(graph.graph.nodes):
        if node.op != "call_function" or not isinstance(constant.get(node), torch.Tensor):
            continue
        if all(user in constant for user in node.users):
            continue  # only other constants read it: it goes with them
        name = f"_folded_constant_{folded}"
        graph.register_buffer(name, constant[node].detach(), persistent=False)
        with graph.graph.inserting_before(node):
            attribute = graph.graph.get_attr(name)
        attribute.meta = dict(node.meta)
        node.replace_all_uses_with(attribute)
        folded += 1
    graph.graph.eliminate_dead_code()
    graph.graph.lint()
    graph.recompile()
    return before - sum(node.op == "call_function" for node in graph.graph.nodes)


def _frozen(value: Any, version: Callable[[torch.fx.Node], tuple]) -> Any:
    """A hashable form of an operation's argument: nodes as themselves and the version of the tensor they view."""
    if isinstance(value, torch.fx.Node):
        return version(value)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *(_frozen(v, version) for v in value))
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v, version)) for k, v in value.items()))
    if isinstance(value, float) and math.isnan(value):
        return ("nan",)
    return (type(value).__name__, value)


def eliminate_common_subexpressions(graph: torch.fx.GraphModule) -> int:
    """Make operations that repeat an earlier one (same operation, same arguments, the tensors they read not
    written in between) use its result, and drop them. Returns how many went.

    A Pyro step computes some terms twice: a site's log density in the model's trace and again in the guide's,
    the same softplus of a parameter for the sample and for its log density.
    """
    base, _ = _aliases(graph.graph)
    versions: dict[torch.fx.Node, int] = {}

    def version(node: torch.fx.Node) -> tuple:
        root = base.get(node, node)
        return (node, versions.get(root, 0))

    seen: dict[tuple, torch.fx.Node] = {}
    removed = 0
    for node in list(graph.graph.nodes):
        if node.op != "call_function":
            continue
        target = node.target
        pure = isinstance(target, torch._ops.OpOverload) and not target._schema.is_mutable and \
            torch.Tag.nondeterministic_seeded not in target.tags
        if pure:
            try:
                key = (target, _frozen(node.args, version), _frozen(node.kwargs, version))
                hash(key)
            except TypeError:
                key = None
            if key is not None:
                if key in seen:
                    node.replace_all_uses_with(seen[key])
                    graph.graph.erase_node(node)
                    removed += 1
                    continue
                seen[key] = node
        elif isinstance(target, torch._ops.OpOverload):  # a write: later reads of what it writes see a new version
            for argument, value in zip(target._schema.arguments, node.args, strict=False):
                if argument.alias_info is not None and argument.alias_info.is_write and isinstance(value,
                                                                                                    torch.fx.Node):
                    root = base.get(value, value)
                    versions[root] = versions.get(root, 0) + 1
    if removed:
        graph.graph.lint()
        graph.recompile()
    return removed


def simplify(graph: torch.fx.GraphModule) -> int:
    """:func:`fold_constants` and :func:`eliminate_common_subexpressions` on ``graph``, in place, and dead-code
    elimination; returns how many operations went."""
    return eliminate_common_subexpressions(graph) + fold_constants(graph)


# -- generation, compilation, checking ------------------------------------------------------------------------------
@dataclass
class Generated:
    """The C source of a step and what its argument array holds after the step's inputs.

    Attributes
    ----------
    source : str
        The C source, defining ``double ppvi_step(void *const *args)``, which returns the loss.
    constants : list of torch.Tensor
        The constants it reads, in its argument array after the inputs; then come the arena and the status (one
        int64, which a failed check sets before the function returns NaN).
    errors : list of str
        The errors of its checks, by status code (in its upper 32 bits; the lower hold a detail).
    arena_bytes : int
        Size of the arena of intermediates.
    operations : int
        Operations written out (views cost none).
    work : int
        Elements written plus multiply-adds: the estimate :data:`MAX_WORK` bounds.
    loss_dtype : torch.dtype
        The loss's dtype.
    """

    source: str
    constants: list[torch.Tensor]
    errors: list[str]
    arena_bytes: int
    operations: int
    work: int
    loss_dtype: torch.dtype


def _plan_arena(buffers: list[_Buffer]) -> int:
    """Byte offsets in one arena for the intermediate buffers: each takes the best-fitting free block left by
    buffers whose last use came before its first, else new space. Returns the arena's size."""
    free: list[tuple[int, int]] = []  # (offset, bytes)
    live: list[tuple[int, int, int]] = []  # (last use, offset, bytes)
    size = 0
    for buffer in sorted((b for b in buffers if b.argument is None), key=lambda b: b.first):
        free += [(offset, length) for last, offset, length in live if last < buffer.first]
        live = [entry for entry in live if entry[0] >= buffer.first]
        need = -(-buffer.numel * torch.empty((), dtype=buffer.dtype).element_size() // ARENA_ALIGNMENT)
        need *= ARENA_ALIGNMENT
        fitting = [block for block in free if block[1] >= need]
        if fitting:
            block = min(fitting, key=lambda b: b[1])
            free.remove(block)
            if block[1] > need:
                free.append((block[0] + need, block[1] - need))
            buffer.offset = block[0]
        else:
            buffer.offset, size = size, size + need
        live.append((buffer.last, buffer.offset, need))
    return max(size, ARENA_ALIGNMENT)


def generate(graph: torch.fx.GraphModule, inputs: Sequence[torch.Tensor]) -> Generated:
    """The C source of ``graph``, a traced step whose placeholders are ``inputs`` (in order), which may write into
    its inputs and returns one number, its loss.

    Raises
    ------
    Unsupported
        Where an operation, dtype or device is not handled.
    """
    placeholders = [node for node in graph.graph.nodes if node.op == "placeholder"]
    if len(placeholders) != len(inputs):
        raise Unsupported("the graph's inputs do not match the step's")
    constant_nodes = [node for node in graph.graph.nodes if node.op == "get_attr"]
    constants = []
    for node in constant_nodes:
        value = getattr(graph, node.target)
        if not isinstance(value, torch.Tensor):
            raise Unsupported(f"a constant that is not a tensor ({node.target})")
        constants.append(value.detach())
    arguments = [*inputs, *constants]
    for tensor in arguments:
        if tensor.device.type != "cpu" or tensor.layout != torch.strided:
            raise Unsupported(f"a tensor on {tensor.device} ({tensor.layout}): kernels are written for the CPU")
    generator = _Generator(arguments, writable=len(inputs))
    generator.mutated = mutated_nodes(graph.graph)
    environment: dict[torch.fx.Node, Any] = dict(zip([*placeholders, *constant_nodes], generator.argument_views,
                                                     strict=True))
    operations, result = 0, None
    for position, node in enumerate(graph.graph.nodes):
        generator.position = position
        if node.op in ("placeholder", "get_attr"):
            continue
        if node.op == "output":
            outputs = node.args[0]
            if not isinstance(outputs, (tuple, list)) or len(outputs) != 1:
                raise Unsupported("a step that returns more than its loss")
            result = environment[outputs[0]]
            if not isinstance(result, _View) or result.numel != 1:
                raise Unsupported("a loss that is not one number")
            generator.touch(result)
            break
        if node.op != "call_function":
            raise Unsupported(f"a graph node of kind {node.op}")
        if node.target is operator.getitem:
            environment[node] = environment[node.args[0]][node.args[1]]
            continue
        if not isinstance(node.target, torch._ops.OpOverload):
            raise Unsupported(f"a call of {node.target}")
        packet = node.target.overloadpacket.__name__
        handler = _HANDLERS.get(f"{packet}.{node.target._overloadname}") or _HANDLERS.get(packet)
        if handler is None:
            raise Unsupported(f"the operation {node.target}, which is not among those written out as C")
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: environment[n])
        lines = len(generator.lines)
        environment[node] = handler(generator, node, _Arguments(node.target, tuple(args), dict(kwargs)))
        if len(generator.lines) > lines:
            generator.lines.insert(lines, f"  /* {node.name}: {node.target} */")
            operations += 1
    if result is None:
        raise Unsupported("a graph without an output")
    arena_bytes = _plan_arena(generator.buffers)
    declarations = []
    for index, buffer in enumerate(generator.buffers):
        ctype = C_TYPES[buffer.dtype]
        where = f"args[{buffer.argument}]" if buffer.argument is not None else f"(arena + {buffer.offset})"
        declarations.append(f"  {ctype} *b{index} = ({ctype} *){where};")
    source = "\n".join([
        "/* A ppvi training step, written out from its traced graph by ppvi.native. */",
        "#include <math.h>", "#include <stdint.h>",
        *(_HELPERS[name] for name in sorted(generator.helpers)),
        "double ppvi_step(void *const *args) {",
        f"  char *arena = (char *)args[{len(arguments)}];",
        f"  int64_t *status = (int64_t *)args[{len(arguments) + 1}];",
        *declarations,
        *generator.lines,
        f"  return (double)b{result.buffer}[{result.offset}];",
        "}",
        "",
    ])
    return Generated(source, constants, generator.errors, arena_bytes, operations, generator.work, result.dtype)


def compiler() -> str | None:
    """The C compiler kernels are built with: ``$CC``, else ``cc``, ``gcc`` or ``clang`` on the path; None if
    there is none."""
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        found = shutil.which(candidate) if candidate else None
        if found:
            return found
    return None


def _cache_folder() -> Path:
    """Where compiled kernels are kept: ``$PPVI_CACHE_DIR/native``, else ``$XDG_CACHE_HOME/ppvi/native`` (default
    ``~/.cache``), else a folder in the temporary directory."""
    root = os.environ.get("PPVI_CACHE_DIR")
    candidates = [Path(root) / "native"] if root else []
    candidates.append(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ppvi" / "native")
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    candidates.append(Path(tempfile.gettempdir()) / f"ppvi-native-{user}")
    for folder in candidates:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            return folder
    raise Unsupported("no writable folder for compiled kernels")


def _compile(source: str) -> tuple[ctypes.CDLL, bool]:
    """The loaded library of ``source``, from the cache or freshly compiled, and whether it came from the cache."""
    cc = compiler()
    if cc is None:
        raise Unsupported("no C compiler (cc, gcc or clang) on the path")
    key = hashlib.sha256("\0".join([cc, *C_FLAGS, source]).encode()).hexdigest()[:32]
    folder = _cache_folder()
    library = folder / f"step-{key}.so"
    cached = library.is_file()
    if not cached:
        with tempfile.TemporaryDirectory(dir=folder) as work:
            source_path, built = Path(work) / "step.c", Path(work) / "step.so"
            source_path.write_text(source)
            try:
                completed = subprocess.run(
                    [cc, *C_FLAGS, "-o", str(built), str(source_path), "-lm"], capture_output=True, text=True,
                    timeout=COMPILE_TIMEOUT_SECONDS, check=False,
                )
            except (OSError, subprocess.TimeoutExpired) as error:
                raise Unsupported(f"the C compiler failed ({type(error).__name__})") from error
            if completed.returncode != 0:
                first = (completed.stderr.strip().splitlines() or ["no message"])[0]
                raise Unsupported(f"the C compiler rejected the kernel ({first})")
            os.replace(built, library)  # atomic: a concurrent build of the same source writes the same file
    try:
        return ctypes.CDLL(str(library)), cached
    except OSError as error:
        raise Unsupported(f"the compiled kernel did not load ({error})") from error


class NativeKernel:
    """A compiled step bound to its tensors: each call takes one step and returns its loss.

    Attributes
    ----------
    generated : Generated
        The source and what it reads.
    build_seconds : float
        Time to generate, compile (or load from the cache) and check the kernel.
    cached : bool
        Whether the library came from the on-disk cache.
    """

    def __init__(self, library: ctypes.CDLL, generated: Generated, inputs: Sequence[torch.Tensor]):
        self._library = library
        self.generated = generated
        self._function = library.ppvi_step
        self._function.argtypes = [ctypes.c_void_p]
        self._function.restype = ctypes.c_double
        self.arena = torch.empty(generated.arena_bytes, dtype=torch.uint8)
        self._status = torch.zeros(1, dtype=torch.int64)
        # Every tensor the kernel touches, kept alive here: their addresses are baked into the argument array.
        self._tensors = [*inputs, *generated.constants, self.arena, self._status]
        self._pointers = (ctypes.c_void_p * len(self._tensors))(*(t.data_ptr() for t in self._tensors))
        self._address = ctypes.cast(self._pointers, ctypes.c_void_p).value
        self.build_seconds = 0.0
        self.cached = False

    def __call__(self) -> float:
        """One step; returns its loss (before the update). Raises :class:`torch.linalg.LinAlgError` where a
        factorisation failed, as ATen raises it."""
        loss = self._function(self._address)
        if loss != loss and self._status[0]:  # NaN: a check may have failed
            status = int(self._status[0])
            self._status[0] = 0
            raise torch.linalg.LinAlgError(self.generated.errors[(status >> 32) - 1].format(info=status & 0xFFFFFFFF))
        return loss


def build(graph: torch.fx.GraphModule, inputs: Sequence[torch.Tensor], example: Sequence[torch.Tensor]) -> NativeKernel:
    """Write ``graph`` out as C, compile it, check it and bind it to ``inputs`` (the tensors every step passes).

    Parameters
    ----------
    graph : torch.fx.GraphModule
        A traced step: reads and writes its inputs, returns its loss.
    inputs : sequence of torch.Tensor
        The step's inputs, whose storage the kernel reads and writes at every call.
    example : sequence of torch.Tensor
        Values of the inputs to check the kernel on (copies are used; neither ``inputs`` nor the global random
        stream is touched): one step both ways must agree to :data:`VERIFY_TOLERANCE`.

    Raises
    ------
    Unsupported
        Where the graph is not written out (see the module docstring) or the kernel disagrees with the graph.
    """
    started = time.perf_counter()
    generated = generate(graph, inputs)
    if generated.work > MAX_WORK:
        raise Unsupported(f"its arithmetic (about {generated.work:,} element operations a step) outweighs the "
                          "dispatch a kernel saves")
    library, cached = _compile(generated.source)
    _verify(library, generated, graph, example)
    kernel = NativeKernel(library, generated, inputs)
    kernel.build_seconds, kernel.cached = time.perf_counter() - started, cached
    return kernel


def _verify(library: ctypes.CDLL, generated: Generated, graph: torch.fx.GraphModule,
            example: Sequence[torch.Tensor]) -> None:
    """Take one step both ways from copies of ``example`` and compare the losses and every input written."""
    replayed = [tensor.detach().clone() for tensor in example]
    written = [tensor.detach().clone() for tensor in example]
    with torch.no_grad():
        try:
            expected = graph(*replayed)[0]
        except Exception as error:  # the graph itself fails on these values: nothing to compare with
            raise Unsupported(f"the kernel could not be checked ({type(error).__name__}: {error})") from error
    trial = NativeKernel(library, generated, written)
    try:
        loss = torch.tensor(trial(), dtype=torch.float64)
    except torch.linalg.LinAlgError as error:
        raise Unsupported(f"the kernel failed a check the graph passed ({error})") from error
    # The loss and the gradients behind Adam's moments are sums of terms of order one (nats, nats per posterior sd in
    # the whitened coordinates) that cancel where the guide is exact: an exact start's loss is 1e-16 and its gradient
    # as small. Their rounding is relative to those terms, so magnitudes below one are compared as one.
    pairs = [(loss, expected.reshape(()).double(), expected.dtype, 1.0)]
    pairs += [(actual, wanted, wanted.dtype, 1.0) for actual, wanted in zip(written, replayed, strict=True)]
    for actual, wanted, dtype, floor in pairs:
        problem = _disagreement(actual, wanted, dtype, floor)
        if problem:
            raise Unsupported(f"the kernel disagrees with the replayed graph ({problem})")


def _disagreement(actual: torch.Tensor, wanted: torch.Tensor, dtype: torch.dtype, floor: float = 0.0) -> str | None:
    """How ``actual`` differs from ``wanted`` beyond the rounding of ``dtype`` relative to their magnitude (at least
    ``floor``), or None."""
    if not wanted.is_floating_point():
        return None if torch.equal(actual, wanted) else "integer values differ"
    nan = torch.isnan(wanted)
    if not torch.equal(torch.isnan(actual), nan):
        return "NaN in one, not the other"
    finite = torch.isfinite(wanted)
    if not torch.equal(actual[~finite & ~nan], wanted[~finite & ~nan]):
        return "infinities differ"
    if not finite.any():
        return None
    scale = max(wanted[finite].abs().max().item(), floor)
    error = (actual[finite] - wanted[finite]).abs().max().item()
    tolerance = VERIFY_TOLERANCE.get(dtype, VERIFY_TOLERANCE[torch.float32])
    if error > tolerance * scale or (scale == 0 and error > 0):
        return f"largest error {error:.3g} against values up to {scale:.3g}"
    return None
