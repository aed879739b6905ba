"""One training step as one pure function: traced once from the Pyro model, replayed or compiled at every step.

Pyro builds a trace of the model and the guide at every step: messengers, sites, distributions and the ELBO's
bookkeeping, in Python, around a few dozen tensor operations. On a small model that overhead *is* the step (a
few milliseconds against NumPyro's jitted ~0.01 ms). NumPyro avoids it by tracing the model once into a pure
function of the flat unconstrained vector (``numpyro.infer.util.potential_energy``) and compiling the whole update
with XLA. This module does the same with PyTorch's tracer:

1. :func:`trace_step` runs the loss once under :func:`torch.fx.experimental.proxy_tensor.make_fx`, with the guide's
   parameters swapped for tracing tensors (:func:`torch.func.functional_call`), differentiates it
   (:func:`torch.autograd.grad`) and applies Adam (Kingma & Ba 2015) with optional gradient clipping, all inside the
   trace. What comes out is one graph of ATen operations: forward, backward and update, with no Pyro left in it.
   Each site's constraining transform is still built from the distribution the model constructs *in that run*
   (:mod:`ppvi.constrain`), so a support that depends on another parameter stays per draw, as in the Pyro path.
2. The random draws of the guide (``normal_`` on an empty tensor, as ``torch.distributions`` draws standard
   normals) become inputs of the graph, drawn in eager PyTorch before each step in the order the loss draws them.
   The traced step therefore consumes exactly the random numbers the Pyro step would: with the same seed both
   paths take the same steps, to floating-point tolerance (tested).
3. The graph writes the new parameters and Adam's moments over the old ones (``copy_`` into its inputs) and returns
   only the loss, so a step passes the same preallocated tensors every time and copies nothing back. Its constants
   are folded and its repeated terms computed once (:func:`ppvi.native.simplify`). Then, ``"traced"`` (the
   default): it runs as one C function written out from the graph (:mod:`ppvi.native`: built in a fraction of a
   second with the system's C compiler and cached on disk; 10-60 microseconds a step on the benchmarks' small
   models), or, where it cannot be written out, replays it op by op (each ATen kernel called directly, about a
   millisecond a step). ``"compiled"``: TorchInductor compiles it, with the products and triangular solves of small
   matrices written out so that they fuse with the rest, the C++ wrapper and memory planning; from its second call
   the compiled kernel's own entry point is called, past TorchInductor's Python wrappers (:func:`_kernel_entry`).
   A compiled step costs 15-45 microseconds, but its first compilation 20-40 s: ``ppvi.fit``'s ``"auto"`` compiles
   only where a fixed number of steps pays that back (:meth:`TracedStep.plan`).

A loss that cannot be traced this way (control flow on tensor values, random operations other than the guide's
normal draws, such as subsampling indices, parameters outside the guide) raises :class:`NotTraceableError`, and
``ppvi.fit`` trains through the Pyro path instead and says so in ``Fit.engine``.

:class:`AdamState` and :func:`adam_update` are the one functional Adam of ppvi: the traced step and the batched
calibration engine (:mod:`ppvi.calibration`, learning rates and epsilons per replication) both apply it.
"""

from __future__ import annotations

import copy
import functools
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import pyro
import torch
from torch import nn

from ppvi import native

__all__ = [
    "ENGINES",
    "AdamState",
    "Engine",
    "NotTraceableError",
    "TracedStep",
    "adam_arithmetic",
    "adam_init",
    "adam_update",
    "bias_corrections",
    "small_matrix_product",
    "small_triangular_solve",
    "symbolic_triangular_solve",
    "keep_replications",
    "multivariate_normal_log_density",
    "trace_step",
    "tracing_failure",
]

Engine = Literal["auto", "pyro", "traced", "compiled"]
#: The training paths ``ppvi.fit`` knows: ``"pyro"`` (Pyro's tracing at every step), ``"traced"`` (one traced
#: graph, run as a C kernel or replayed), ``"compiled"`` (that graph compiled by TorchInductor) and ``"auto"``
#: (traced when the loss traces, else Pyro; compiled where the steps pay the compilation back).
ENGINES = ("auto", "pyro", "traced", "compiled")

#: Adam's published moment decay rates (Kingma & Ba 2015), torch.optim.Adam's defaults.
ADAM_BETAS = (0.9, 0.999)
#: What torch.nn.utils.clip_grad_norm_ adds to the norm before dividing by it, kept so both paths clip alike.
CLIP_NORM_EPSILON = 1e-6
#: Seconds TorchInductor takes to compile a one-fit step with an empty cache, as :meth:`TracedStep.plan` counts
#: it. Measured on the 2-core development machine (``benchmarks/step_cost.py --cold``): 16-30 s for the first
#: step compiled in a process (half of it test builds of the CPU's vector instruction sets, then TorchInductor's
#: lowering and C++ builds against PyTorch's headers), 6-10 s for the next ones; 20-38 s in issue 12's runs. A
#: warm on-disk cache cuts it to 1-3 s, but whether it is warm is only known by compiling: the plan counts a cold
#: compilation, which a first fit on a fresh machine pays.
INDUCTOR_COMPILE_SECONDS = 25.0
#: Seconds a compiled step's call takes, as :meth:`TracedStep.plan` counts it: 29-37 us a whole step measured on
#: the same machine for the fake Gaussian and kidiq (the kernel called past TorchInductor's wrappers,
#: :func:`_kernel_entry`), of which the loop, the noise and Adam's bias corrections take 5-10.
INDUCTOR_CALL_SECONDS = 25e-6
#: Calls of the step timed (on copies of its inputs) when :meth:`TracedStep.plan` estimates its cost; the first,
#: which warms caches, is not counted.
PLAN_TIMING_CALLS = 12


class NotTraceableError(RuntimeError):
    """The loss cannot be traced into one graph; the message says why (``ppvi.fit`` falls back to Pyro)."""


class AdamState(NamedTuple):
    """Adam's state for a tuple of parameters.

    Attributes
    ----------
    step : int
        Updates taken (the bias corrections use it).
    first_moment, second_moment : tuple of torch.Tensor
        Running averages of the gradients and of their squares, one per parameter.
    """

    step: int
    first_moment: tuple[torch.Tensor, ...]
    second_moment: tuple[torch.Tensor, ...]


def adam_init(parameters: Sequence[torch.Tensor]) -> AdamState:
    """Adam's state at step 0: zero moments shaped like ``parameters``."""
    zeros = tuple(torch.zeros_like(parameter, memory_format=torch.preserve_format) for parameter in parameters)
    return AdamState(0, zeros, tuple(torch.zeros_like(zero) for zero in zeros))


def bias_corrections(step: int) -> tuple[float, float]:
    """``(1 - beta1^t, sqrt(1 - beta2^t))`` after ``t = step`` updates, computed on the host as torch.optim.Adam
    does, so both paths round alike."""
    beta1, beta2 = ADAM_BETAS
    return 1 - beta1**step, math.sqrt(1 - beta2**step)


def adam_arithmetic(
    parameters: Sequence[torch.Tensor],
    gradients: Sequence[torch.Tensor],
    first_moment: Sequence[torch.Tensor],
    second_moment: Sequence[torch.Tensor],
    step_size: torch.Tensor | float,
    correction2_sqrt: torch.Tensor | float,
    epsilon: torch.Tensor | float,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Adam's update written out of place, in torch.optim.Adam's order of operations.

    ``step_size`` is ``learning_rate / (1 - beta1^t)``; ``step_size`` and ``epsilon`` may be tensors of shape
    ``(M,)``, one per replication along the parameters' leading dimension.
    """
    beta1, beta2 = ADAM_BETAS
    new_parameters, new_first, new_second = [], [], []
    for parameter, gradient, first, second in zip(parameters, gradients, first_moment, second_moment, strict=True):
        first = torch.lerp(first, gradient, 1 - beta1)
        second = second * beta2 + (1 - beta2) * gradient * gradient
        rate, floor = _per_replication(step_size, parameter), _per_replication(epsilon, parameter)
        denominator = second.sqrt() / correction2_sqrt + floor
        new_parameters.append(parameter - rate * first / denominator)
        new_first.append(first)
        new_second.append(second)
    return new_parameters, new_first, new_second


def _per_replication(value: torch.Tensor | float, parameter: torch.Tensor) -> torch.Tensor | float:
    """A per-replication ``(M,)`` tensor shaped to broadcast over a parameter ``(M, ...)``; scalars as they are."""
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        return value.reshape(-1, *(1,) * (parameter.dim() - 1))
    return value


def adam_update(
    parameters: Sequence[torch.Tensor],
    gradients: Sequence[torch.Tensor],
    state: AdamState,
    learning_rate: torch.Tensor | float,
    epsilon: torch.Tensor | float = 1e-8,
) -> tuple[tuple[torch.Tensor, ...], AdamState]:
    """One Adam step (Kingma & Ba 2015, Algorithm 1), pure: returns new parameters and a new state.

    Parameters
    ----------
    parameters, gradients : sequence of torch.Tensor
        Current values and their gradients.
    state : AdamState
        From :func:`adam_init` or the previous update.
    learning_rate, epsilon : float or torch.Tensor
        Scalars, or tensors of shape ``(M,)`` giving each replication (the parameters' leading dimension) its own
        rate and epsilon: the batched calibration engine trains ``M`` replications in different stages at once.
    """
    step = state.step + 1
    correction1, correction2_sqrt = bias_corrections(step)
    new_parameters, first, second = adam_arithmetic(
        parameters, gradients, state.first_moment, state.second_moment, learning_rate / correction1,
        correction2_sqrt, epsilon,
    )
    return tuple(new_parameters), AdamState(step, tuple(first), tuple(second))


def keep_replications(state: AdamState, keep: torch.Tensor) -> AdamState:
    """Adam's state for the replications (rows of the leading dimension) selected by the boolean mask ``keep``:
    a batched run drops replications, their moments with them, when they stop training."""
    return AdamState(
        state.step, tuple(moment[keep] for moment in state.first_moment),
        tuple(moment[keep] for moment in state.second_moment),
    )


# -- tracing a whole step ------------------------------------------------------------------------------------------
class _LossModule(nn.Module):
    """Holds the module whose parameters are trained, so that :func:`torch.func.functional_call` can swap them
    while the loss (a closure over that module) runs."""

    def __init__(self, module: nn.Module, loss_function: Callable[[], torch.Tensor]):
        super().__init__()
        self.trained = module
        self._loss_function = loss_function

    def forward(self) -> torch.Tensor:
        return self._loss_function()


class _RandomInput(NamedTuple):
    """A standard-normal draw lifted out of the graph: its shape, dtype and device."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


def _lift_normal_draws(graph: torch.fx.GraphModule) -> list[_RandomInput]:
    """Replace every ``empty(shape).normal_()`` in ``graph`` by a new input; refuse any other random operation.

    The new inputs come after the existing ones, in the order the draws are made.
    """
    nodes = list(graph.graph.nodes)
    last_placeholder = max(i for i, node in enumerate(nodes) if node.op == "placeholder")
    draws = []
    for node in nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if torch.Tag.nondeterministic_seeded not in node.target.tags:
            continue
        source = node.args[0] if node.args else None
        is_standard_normal = (
            node.target is torch.ops.aten.normal_.default
            and len(node.args) == 1 and not node.kwargs
            and isinstance(source, torch.fx.Node) and source.target is torch.ops.aten.empty.memory_format
            and len(source.users) == 1
        )
        if not is_standard_normal:
            raise NotTraceableError(
                f"the loss makes a random draw ({node.target}) other than the guide's standard normals, such as "
                "subsampling indices: each step must draw it afresh"
            )
        value = node.meta.get("val")
        with graph.graph.inserting_after(nodes[last_placeholder]):
            placeholder = graph.graph.placeholder(f"noise_{len(draws)}")
        nodes[last_placeholder] = placeholder
        placeholder.meta["val"] = value
        node.replace_all_uses_with(placeholder)
        graph.graph.erase_node(node)
        graph.graph.erase_node(source)
        draws.append(_RandomInput(tuple(value.shape), value.dtype, value.device))
    graph.graph.lint()
    graph.recompile()
    return draws


def _clip(gradients: Sequence[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """Rescale ``gradients`` to Euclidean norm at most ``max_norm``, as torch.nn.utils.clip_grad_norm_ does."""
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gradients]))
    factor = torch.clamp(max_norm / (total + CLIP_NORM_EPSILON), max=1.0)
    return [g * factor for g in gradients]


def _replay_function(graph: torch.fx.GraphModule) -> Callable[..., tuple[torch.Tensor, ...]]:
    """``graph``'s operations as one Python function that calls each ATen kernel directly.

    The code FX generates for a graph calls every operation as ``torch.ops.aten.<name>.<overload>(...)``: four
    attribute lookups and :class:`torch._ops.OpOverload`'s Python ``__call__`` around the kernel, about 1.5 us of
    a 3-5 us operation on a small tensor. Here each operation's kernel (``OpOverload._op``) is bound once, as a
    global of the generated function, and each intermediate is released after its last use, as FX does.
    """
    nodes = list(graph.graph.nodes)
    last_use = {}
    for position, node in enumerate(nodes):
        for used in node.all_input_nodes:
            last_use[used] = position
    names: dict[torch.fx.Node, str] = {}
    bound: dict[str, object] = {}
    parameters: list[str] = []
    lines: list[str] = []

    def expression(value: object) -> str:
        if isinstance(value, torch.fx.Node):
            return names[value]
        if isinstance(value, (list, tuple)):
            items = ", ".join(expression(item) for item in value)
            return f"[{items}]" if isinstance(value, list) else f"({items},)"
        name = f"constant_{len(bound)}"
        bound[name] = value
        return name

    for position, node in enumerate(nodes):
        if node.op == "placeholder":
            names[node] = f"input_{len(parameters)}"
            parameters.append(names[node])
        elif node.op == "get_attr":
            names[node] = expression(getattr(graph, node.target))
        elif node.op == "output":
            lines.append(f"return {expression(node.args[0])}")
        elif node.op == "call_function":
            target = node.target._op if isinstance(node.target, torch._ops.OpOverload) else node.target
            function = f"operation_{position}"
            bound[function] = target
            arguments = [expression(a) for a in node.args] + [f"{k}={expression(v)}" for k, v in node.kwargs.items()]
            names[node] = f"value_{position}"
            lines.append(f"{names[node]} = {function}({', '.join(arguments)})")
            released = [names[used] for used in node.all_input_nodes
                        if last_use.get(used) == position and used.op == "call_function"]
            if released:
                lines.append(" = ".join(released) + " = None")
        else:
            raise NotTraceableError(f"a graph node of kind {node.op}")
    source = f"def replay({', '.join(parameters)}):\n" + "\n".join(f"    {line}" for line in lines) + "\n"
    namespace = dict(bound)
    exec(compile(source, "<ppvi traced step>", "exec"), namespace)  # noqa: S102 - code generated above
    return namespace["replay"]


class TracedStep:
    """One training step (loss, gradient, Adam) as a traced graph, applied in place to the trained parameters.

    Built by :func:`trace_step`; call it with the current learning rate to take one step. The graph writes the new
    parameters and Adam's moments into the tensors it read them from, so a loop's checkpoints and averages of the
    parameters stay valid and nothing is copied back in Python. Everything a call passes to the graph is allocated
    once, here: the per-call cost is the graph's own and a few host-side assignments.

    A traced (not compiled) step runs as one C function where :mod:`ppvi.native` can write the graph out (built in
    a fraction of a second and cached on disk; 10-60 us a step on the problems of ``benchmarks/step_cost.py``),
    else it replays the graph operation by operation (about a millisecond). :meth:`plan` decides whether
    TorchInductor's compilation would pay back over the run.

    Attributes
    ----------
    parameters : tuple of torch.Tensor
        The trained leaf tensors (updated in place).
    state : AdamState
        Adam's moments after the steps taken (tensors updated in place by each later step).
    engine : {"traced", "compiled"}
        Whether the graph is run as traced (C kernel or replay) or compiled by TorchInductor.
    executor : {"C kernel", "ATen replay", "TorchInductor"}
        What runs the steps.
    native_reason : str
        Why a traced step is replayed rather than run as C ("" where it is not).
    build_seconds : float
        Time spent building the C kernel (generation, compilation or the cache, the check).
    note : str
        What :meth:`plan` found and decided, for the fit's message.
    """

    def __init__(
        self,
        function: Callable,
        parameters: tuple[torch.Tensor, ...],
        draws: list[_RandomInput],
        epsilon: float,
        engine: Literal["traced", "compiled"],
        graph: torch.fx.GraphModule | None = None,
        native_kernel: bool = True,
        may_compile: bool = False,
    ):
        self._function = function
        self.parameters = parameters
        self._draws = draws
        self._epsilon = epsilon
        self.engine = engine
        self._graph = graph if graph is not None else (function if isinstance(function, torch.fx.GraphModule) else None)
        self._step = 0
        initial = adam_init(parameters)
        self._first_moment, self._second_moment = initial.first_moment, initial.second_moment
        reference = parameters[0]
        # The step size and bias correction of each step, written on the host into one two-element tensor (through
        # a NumPy view on the CPU: two float assignments, where building a new tensor costs microseconds).
        self._scalars = torch.empty(2, dtype=reference.dtype, device=reference.device)
        self._scalar_view = None
        if reference.device.type == "cpu":
            try:
                self._scalar_view = self._scalars.numpy()
            except TypeError:  # a dtype NumPy lacks (bfloat16): build the values as a tensor each step
                pass
        # Each step's standard normals are drawn into these buffers, one per draw of the loss, in the loss's order:
        # the same generator calls on tensors of the same shapes as the Pyro path's, hence the same numbers.
        self._noise = tuple(torch.empty(d.shape, dtype=d.dtype, device=d.device) for d in draws)
        self._inputs = (
            *(parameter.detach() for parameter in parameters), *self._first_moment, *self._second_moment,
            self._scalars, *self._noise,
        )
        # The compiled kernel's own entry point and the whole argument list it takes (see :func:`_kernel_entry`),
        # found at the first compiled call; None while not (yet) found, and then the call goes through TorchInductor.
        self._entry: Callable[[list], list] | None = None
        self._arguments: tuple[torch.Tensor, ...] = ()
        self._looked_for_entry = engine != "compiled"
        #: How the steps run: "C kernel" (the graph written out as C, :mod:`ppvi.native`), "ATen replay" (the graph's
        #: operations called one by one) or "TorchInductor".
        self.executor = "TorchInductor" if engine == "compiled" else "ATen replay"
        #: Why the graph is replayed rather than written out as C ("" where it is not).
        self.native_reason = ""
        #: Seconds spent building the executor (generating, compiling and checking the C kernel).
        self.build_seconds = 0.0
        #: What :meth:`plan` decided, for the fit's message ("" before it is called).
        self.note = ""
        self._kernel: native.NativeKernel | None = None
        self._replay: Callable | None = None
        self._may_compile = may_compile and engine == "traced" and self._graph is not None
        if engine == "traced" and self._graph is not None:
            if native_kernel:
                self._build_kernel()
            else:
                self.native_reason = "the C kernel was not asked for"
            if self._kernel is None:
                self._replay = _replay_function(self._graph)

    def _example(self) -> list[torch.Tensor]:
        """Values of the step's inputs to check a kernel on: the parameters as they are, Adam's moments at zero,
        the first step's scalars at a learning rate of 0.01, standard normals from a private generator."""
        count = len(self.parameters)
        generator = torch.Generator().manual_seed(0)
        example = [tensor.detach().clone() for tensor in self._inputs]
        for moment in example[count : 3 * count]:
            moment.zero_()
        correction1, correction2_sqrt = bias_corrections(1)
        example[3 * count].copy_(torch.tensor([0.01 / correction1, correction2_sqrt], dtype=torch.float64))
        for noise in example[3 * count + 1 :]:
            noise.copy_(torch.randn(noise.shape, generator=generator, dtype=torch.float64))
        return example

    def _build_kernel(self) -> None:
        """Write the graph out as C (:func:`ppvi.native.build`); where it cannot be, keep replaying it."""
        started = time.perf_counter()
        try:
            self._kernel = native.build(self._graph, self._inputs, self._example())
        except native.Unsupported as error:
            self.native_reason = str(error)
        except Exception as error:  # a failure of the generator itself must not cost the fit: replay instead
            self.native_reason = f"the C kernel could not be built ({type(error).__name__}: {error})"
        else:
            self.executor = "C kernel"
        self.build_seconds = time.perf_counter() - started

    @property
    def state(self) -> AdamState:
        """Adam's state after the steps taken (its moment tensors are the ones later steps update in place)."""
        return AdamState(self._step, self._first_moment, self._second_moment)

    def __call__(self, learning_rate: float) -> torch.Tensor | float:
        """Take one step at ``learning_rate``; returns the loss before the step (detached): a float from the C kernel
        (no tensor to build), a 0-dimensional tensor otherwise."""
        self._step += 1
        correction1, correction2_sqrt = bias_corrections(self._step)
        if self._scalar_view is not None:
            self._scalar_view[0] = learning_rate / correction1
            self._scalar_view[1] = correction2_sqrt
        else:
            self._scalars.copy_(torch.tensor([learning_rate / correction1, correction2_sqrt], dtype=torch.float64))
        for buffer in self._noise:
            buffer.normal_()
        if self._kernel is not None:
            return self._kernel()
        if self._entry is not None:  # the kernel writes the new state into the inputs and returns the loss
            return self._entry([*self._arguments])[0]
        if not self._looked_for_entry:
            self._looked_for_entry = True
            loss, found = _kernel_entry(self._function, self._inputs)
            if found is not None:
                self._entry, self._arguments = found
            return loss
        if self.engine == "compiled":  # an inference kernel of tensors that do not require gradients
            return self._function(*self._inputs)[0]
        # Replayed in inference mode: nothing recorded (the graph's constants may require gradients) and the
        # cheapest dispatch PyTorch has (no version counters or views tracked for autograd's sake).
        with torch.inference_mode():
            return self._replay(*self._inputs)[0]

    def _seconds_per_call(self) -> float:
        """The median time of the step's graph as it runs now (C kernel or replay), on copies of its inputs: the
        run's own tensors and the global random stream are untouched."""
        example = self._example()
        if self._kernel is not None:
            trial = native.NativeKernel(self._kernel._library, self._kernel.generated, example)

            def call() -> object:
                return trial()
        else:
            device = self.parameters[0].device

            def call() -> object:
                with torch.inference_mode():
                    result = self._replay(*example)
                if device.type == "cuda":  # kernels launch asynchronously: time them to their end
                    torch.cuda.synchronize(device)
                return result
        times = []
        for _ in range(PLAN_TIMING_CALLS):
            started = time.perf_counter()
            call()
            times.append(time.perf_counter() - started)
        return statistics.median(times[1:])

    def plan(self, steps: int | None) -> str:
        """Decide, for a run of ``steps`` steps (None: as many as a stopping rule takes), whether TorchInductor
        should compile the step, compile it if so, and say what was decided (for the fit's message).

        Compiling pays back once the time it saves per step, this step's measured time less
        :data:`INDUCTOR_CALL_SECONDS`, adds up to :data:`INDUCTOR_COMPILE_SECONDS`: the break-even number of
        steps. Only a step traced with ``compile="auto"`` (``ppvi.fit``'s ``engine="auto"``) compiles, and only
        for a fixed number of steps above the break-even: a stopping rule ends most fits after a few hundred to a
        few thousand steps, which the number of steps cannot tell in advance.
        """
        if self.engine != "traced" or self._graph is None:
            self.note = ""
            return self.note
        try:
            per_call = self._seconds_per_call()
        except Exception as error:  # the step fails on the timing's values (not the run's): plan nothing
            self.note = f"{self.executor}; not timed ({type(error).__name__}), so not compiled"
            return self.note
        saving = per_call - INDUCTOR_CALL_SECONDS
        break_even = math.inf if saving <= 0 else INDUCTOR_COMPILE_SECONDS / saving
        how = (
            f"steps run as one C kernel ({per_call * 1e6:.0f} us a step, built in {self.build_seconds:.2g} s)"
            if self._kernel is not None else
            f"steps replay the traced graph operation by operation ({per_call * 1e6:.0f} us a step; no C kernel: "
            f"{self.native_reason})"
        )
        if not self._may_compile:
            self.note = how
            return self.note
        if math.isinf(break_even):
            decision = (
                f"TorchInductor not used: its compiled step (about {INDUCTOR_CALL_SECONDS * 1e6:.0f} us) would be no "
                "faster"
            )
        elif steps is not None and steps > break_even:
            started = time.perf_counter()
            self._compile()
            decision = (
                f"compiled by TorchInductor in {time.perf_counter() - started:.1f} s: {steps:,} steps pay its "
                f"compilation back (about {INDUCTOR_COMPILE_SECONDS:g} s cold) after about {break_even:,.0f}"
            )
        else:
            planned = f"the run asks for {steps:,}" if steps is not None else "a run stopped by its rule plans none"
            decision = (
                f"TorchInductor not used: its compilation (about {INDUCTOR_COMPILE_SECONDS:g} s cold) pays back "
                f"after about {break_even:,.0f} steps; {planned}"
            )
        self.note = f"{how}; {decision}"
        return self.note

    def _compile(self) -> None:
        """Replace the step's executor by the graph compiled with TorchInductor (same inputs, same arithmetic)."""
        count = len(self.parameters)
        example = tuple(tensor.detach().clone() for tensor in self._inputs[: 3 * count + 1])
        self._function = _inductor_compile(copy.deepcopy(self._graph), example, self._draws)
        self._kernel, self._replay = None, None
        self.engine, self.executor = "compiled", "TorchInductor"
        self._entry, self._looked_for_entry = None, False

    @property
    def calls_kernel_directly(self) -> bool:
        """Whether the compiled steps call the kernel's entry point past TorchInductor's wrappers (see
        :func:`_kernel_entry`)."""
        return self._entry is not None


def trace_step(
    loss_function: Callable[[], torch.Tensor],
    module: nn.Module,
    parameters: Sequence[torch.Tensor],
    *,
    epsilon: float = 1e-8,
    max_gradient_norm: float | None = None,
    compile: bool | Literal["auto"] = False,
    native_kernel: bool = True,
) -> TracedStep:
    """Trace one Adam step on ``loss_function`` over the parameters of ``module`` into a single graph.

    Parameters
    ----------
    loss_function : callable
        Returns the scalar loss; reads the trained parameters as attributes of ``module`` (a guide).
    module : torch.nn.Module
        Owns every tensor in ``parameters``.
    parameters : sequence of torch.Tensor
        The leaf tensors to train (each must be a parameter of ``module``).
    epsilon : float
        Adam's epsilon.
    max_gradient_norm : float, optional
        Clip the gradient to this norm before the update, as :func:`ppvi.training.update` does.
    compile : bool or "auto"
        Compile the graph with TorchInductor (cold compilation takes tens of seconds on a small CPU; it pays on
        long runs, not on a few hundred steps). ``"auto"``: not now; :meth:`TracedStep.plan` compiles it once the
        number of steps is known, where they pay the compilation back.
    native_kernel : bool
        Without ``compile``: run the graph as one C function (:mod:`ppvi.native`; a fraction of a second to build,
        cached on disk) where it can be written out, else replay it operation by operation. False: always replay.

    Raises
    ------
    NotTraceableError
        When the loss cannot be traced into one graph (see the module docstring).
    """
    parameters = tuple(parameters)
    names_by_id = {id(tensor): name for name, tensor in module.named_parameters()}
    missing = [tensor for tensor in parameters if id(tensor) not in names_by_id]
    if missing:
        raise NotTraceableError("some trained parameters are not the guide's (pyro.param values of the model)")
    names = ["trained." + names_by_id[id(tensor)] for tensor in parameters]
    wrapper = _LossModule(module, loss_function)
    count = len(parameters)

    def step(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        leaves, first, second = inputs[:count], inputs[count : 2 * count], inputs[2 * count : 3 * count]
        step_size, correction2_sqrt = inputs[3 * count][0], inputs[3 * count][1]
        with torch.enable_grad():
            loss = torch.func.functional_call(wrapper, dict(zip(names, leaves, strict=True)), ())
            gradients = torch.autograd.grad(loss, leaves, allow_unused=True)
        gradients = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, gradients, strict=True)]
        if max_gradient_norm is not None:
            gradients = _clip(gradients, max_gradient_norm)
        new_parameters, new_first, new_second = adam_arithmetic(
            [leaf.detach() for leaf in leaves], gradients, first, second, step_size, correction2_sqrt, epsilon
        )
        # The new state is written over the old one inside the graph (TorchInductor writes the mutated inputs
        # in its kernel): the step returns only the loss, and the caller copies nothing back.
        for target, value in zip(inputs[: 3 * count], [*new_parameters, *new_first, *new_second], strict=True):
            target.copy_(value)
        return (loss.detach(),)

    reference = parameters[0]
    example = (
        *(p.detach().clone().requires_grad_() for p in parameters),
        *(torch.zeros_like(p) for p in parameters),
        *(torch.zeros_like(p) for p in parameters),
        torch.ones(2, dtype=reference.dtype, device=reference.device),
    )
    from torch.fx.experimental.proxy_tensor import make_fx

    state = torch.random.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if reference.is_cuda else None
    try:
        with pyro.validation_enabled(False), torch.no_grad():
            graph = make_fx(step)(*example)
    except NotTraceableError:
        raise
    except Exception as error:  # the tracer's own refusals: data-dependent control flow, unsupported operations
        raise NotTraceableError(tracing_failure(error)) from error
    finally:  # tracing made draws of its own: put the stream back so that training starts where Pyro's would
        torch.random.set_rng_state(state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
    draws = _lift_normal_draws(graph)
    function: Callable = graph
    if compile is True:
        function = _inductor_compile(graph, example, draws)
    else:  # what TorchInductor does for its own graph: constants folded, repeated terms computed once
        native.simplify(graph)
    return TracedStep(
        function, parameters, draws, epsilon, "compiled" if compile is True else "traced", graph, native_kernel,
        may_compile=compile == "auto",
    )


def tracing_failure(error: Exception) -> str:
    """Why tracing failed, in one line."""
    text = str(error)
    if "_local_scalar_dense" in text or "data-dependent" in text or "DataDependent" in type(error).__name__:
        return (
            "the model reads a sampled value on the host (control flow such as `if x > 0`, `float(x)` or "
            "`x.item()`), which one traced graph cannot follow"
        )
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"the loss does not trace into one graph ({type(error).__name__}: {first})"


def _referents(value: object) -> list:
    """What a wrapper built by PyTorch's compilers holds: a closure's cells, a partial's function and arguments, the
    attributes of a torch object, the items of a tuple or list (tensors aside: they hold no callables)."""
    found: list = []
    if isinstance(value, torch.Tensor):
        return found
    if isinstance(value, functools.partial):
        found += [value.func, *value.args]
    closure = getattr(value, "__closure__", None)
    if closure:
        for cell in closure:
            try:
                found.append(cell.cell_contents)
            except ValueError:  # a cell not yet filled
                pass
    if isinstance(value, (list, tuple)):
        found += list(value)
    attributes = getattr(value, "__dict__", None)
    if isinstance(attributes, dict) and not isinstance(value, type) and type(value).__module__.startswith("torch"):
        found += list(attributes.values())
    return found


#: How far behind the function that ``compile_fx`` returns its compiled graph is looked for: four wrappers deep in
#: torch 2.13 (AOTAutograd's forward, its runtime wrapper, the inference wrapper, Dynamo's guard), with room to spare.
KERNEL_SEARCH_DEPTH = 8


def _kernel_entry(
    function: Callable, inputs: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, tuple[Callable[[list], list], tuple[torch.Tensor, ...]] | None]:
    """Take one step through ``function`` (what :func:`_inductor_compile` returns) and find, on the way, the
    compiled kernel's own entry point: the loss, and the entry point with its full argument list, or ``None``.

    ``compile_fx`` returns the kernel wrapped in AOTAutograd's runtime wrappers (input mutations, aliasing, grad
    mode, version counters) and Dynamo's guard: about 13 us of Python per call around a kernel of 15-20 us on a
    small step. :class:`TracedStep`'s graph needs none of it: it passes the same preallocated tensors at every call,
    none requiring gradients, and its kernel writes the new state into them and returns only the loss. So the
    entry point of the :class:`~torch._inductor.output_code.CompiledFxGraph` behind the wrappers is called
    directly, with the arguments the wrappers gave it: the graph's lifted constants (the data) and then the
    step's inputs. Measured on the fake Gaussian full-rank step: 44 -> 31 us per call.

    Nothing here is public PyTorch, so it is checked on the one call it observes: there must be exactly one compiled
    graph behind the wrappers; its arguments must end with the step's inputs themselves; it must return the loss
    alone, passed through unchanged (no output the wrappers post-process, no mutation they apply afterwards). When
    any of this does not hold (another PyTorch version, another backend), ``None``: the steps go through the
    wrappers as before.
    """
    try:
        from torch._inductor.output_code import CompiledFxGraph
    except ImportError:
        return function(*inputs)[0], None
    graphs, seen, frontier = [], set(), [function]
    for _ in range(KERNEL_SEARCH_DEPTH):
        following = []
        for value in frontier:
            if id(value) in seen:
                continue
            seen.add(id(value))
            if isinstance(value, CompiledFxGraph):
                graphs.append(value)
            else:
                following += _referents(value)
        frontier = following
    if len(graphs) != 1 or not callable(getattr(graphs[0], "current_callable", None)):
        return function(*inputs)[0], None
    graph, entry = graphs[0], graphs[0].current_callable
    observed: dict = {}

    def observe(arguments: list) -> list:
        observed["arguments"] = tuple(arguments)  # the entry point empties the list it is given
        observed["outputs"] = entry(arguments)
        return observed["outputs"]

    graph.current_callable = observe
    try:
        outputs = function(*inputs)
    finally:
        graph.current_callable = entry
    arguments, raw = observed.get("arguments"), observed.get("outputs")
    usable = (
        arguments is not None and len(arguments) >= len(inputs)
        and all(a is b for a, b in zip(arguments[len(arguments) - len(inputs) :], inputs, strict=True))
        and all(isinstance(a, torch.Tensor) and not a.requires_grad for a in arguments)
        and isinstance(raw, (list, tuple)) and len(raw) == 1 and len(outputs) == 1 and outputs[0] is raw[0]
    )
    return outputs[0], ((entry, arguments) if usable else None)


#: TorchInductor options for the step: the C++ wrapper (one compiled function launches the kernels and allocates
#: the buffers, where the default Python wrapper spends microseconds per buffer) without the per-call checks of
#: the inputs' sizes, strides and alignment: :class:`TracedStep` passes the same preallocated tensors at every call,
#: so the checks cannot fail. Measured on the fake Gaussian mean-field step: about 44 -> 26 us per call. And
#: memory planning: the step's intermediate buffers (a dozen to twenty) carved out of one allocation per call
#: instead of one allocation each. Measured on the kernel called directly: 21 -> 16 us (fake Gaussian, full-rank)
#: and 33 -> 22 us (kidiq, full-rank) per call.
INDUCTOR_OPTIONS = {
    "cpp_wrapper": True, "size_asserts": False, "scalar_asserts": False, "alignment_asserts": False,
    "memory_planning": True,
}


#: Vector width (bits) for TorchInductor's C++ kernels of the batched calibration step, where the CPU has it: on an
#: AVX-512 machine the default, 512 bits, loads 16 doubles at a time, and the step's innermost loops run over 8
#: particles, 8 schools or 10 coordinates, so most loads are masked halves. At 256 bits (AVX2) the compiled kernels of
#: an eight-schools VSBC run at M = 1000 took 4.0-4.8 s against 5.3-6.1 s (full-rank) and 1.2-1.5 against 2.0-2.4 s
#: (mean-field), three alternating runs each.
BATCHED_VECTOR_BITS = 256


def vector_width_options(bits: int) -> dict[str, int]:
    """TorchInductor options that set its C++ kernels' vector width to ``bits`` where this CPU has an instruction set
    of that width (TorchInductor's own list, ``torch._inductor.cpu_vec_isa``); none elsewhere, where forcing it would
    leave the kernels unvectorised."""
    try:
        from torch._inductor.cpu_vec_isa import valid_vec_isa_list

        widths = {isa.bit_width() for isa in valid_vec_isa_list()}
    except Exception:  # another torch's private module: keep TorchInductor's own choice
        return {}
    return {"cpp.simdlen": bits} if bits in widths else {}


def _inductor_compile(graph: torch.fx.GraphModule, example: tuple, draws: list[_RandomInput]) -> Callable:
    """Compile an ATen graph with TorchInductor (``torch._inductor.compile_fx`` and its ``config``, the private
    PyTorch entry points ppvi uses: ``torch.compile`` would re-trace the graph through Dynamo and add guard checks
    to every call, measured at 3x the per-call cost of the compiled graph itself on a small step).

    Small matrix products and triangular solves are first written out as elementwise arithmetic
    (:func:`_inline_small_linear_algebra`), so that they fuse into the step's kernels.
    """
    inputs = [*(t.detach() for t in example), *(torch.zeros(d.shape, dtype=d.dtype, device=d.device) for d in draws)]
    with warnings.catch_warnings():
        # TorchInductor (torch 2.13) calls parts of torch that torch itself has deprecated (`torch.jit.script_method`
        # on import, `torch._prims_common.check` while lowering): warnings about torch's own code, which no user
        # can act on, silenced while it compiles. Only torch's code runs here: the model was traced before.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        from torch._inductor import config
        from torch._inductor.compile_fx import compile_fx

        graph = _inline_small_linear_algebra(graph, [t.clone() for t in inputs])
        # The C++ wrapper takes the inputs' shapes from the placeholders' recorded values when they have any, and
        # the tracer recorded them under several fake-tensor modes, which it refuses: let it take the real inputs.
        for node in graph.graph.nodes:
            if node.op == "placeholder":
                node.meta.pop("val", None)
        from torch._guards import TracingContext, tracing
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        # A tracing context with a shape environment, as torch.compile's tracer provides: without one TorchInductor
        # bypasses its on-disk caches of compiled graphs ("No shape env") and lowers the graph again at every fit
        # (3-8 s on 2 busy cores for the fake Gaussian). The graph's tensor constants (the data) are inputs of the
        # cached kernel, not part of it: a fit on other data of the same shapes hits the cache and stays exact.
        with config.patch(INDUCTOR_OPTIONS), tracing(TracingContext(FakeTensorMode(shape_env=ShapeEnv()))):
            return compile_fx(graph, inputs)


#: Largest contraction length (the inner dimension of a product, the side of a triangular matrix) that the compiled
#: step writes out as elementwise arithmetic instead of calling BLAS/LAPACK. A library call on matrices of a
#: guide's size (a few latent dimensions) costs microseconds of dispatch and argument checks against nanoseconds of
#: arithmetic, and cuts the fused kernels in two; written out, the work grows as the side squared (cubed for a
#: solve) in terms the compiler fuses, which stays cheap up to a few dozen. Measured on the fake Gaussian
#: full-rank step (2 x 2 scale factor, 8 particles; 5 products and 2 solves become one fused kernel): 110 -> 48 us
#: per call.
SMALL_MATRIX_SIDE = 16


def small_matrix_product(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``left @ right`` for ``(..., m, k) @ (..., k, n)`` as a broadcast product summed over ``k``."""
    return (left.unsqueeze(-1) * right.unsqueeze(-3)).sum(-2)


def small_triangular_solve(
    matrix: torch.Tensor, right_side: torch.Tensor, upper: bool, unitriangular: bool
) -> torch.Tensor:
    """``matrix^-1 right_side`` for a triangular ``(..., n, n)`` matrix by substitution written out column by column.

    Each solved row is taken out of all the rows still to solve at once (``rest -= matrix[rest, i] * row``), so
    the substitution is about nine tensor operations a row, not three per matrix entry: what a tracer records (and
    a symbolic one spends milliseconds on, each) grows as ``n``, not ``n^2``. Every operation is elementwise or a
    slice, so a compiled step fuses the whole solve.
    """
    size = matrix.shape[-1]
    batch = torch.broadcast_shapes(matrix.shape[:-2], right_side.shape[:-2])
    rest = right_side.expand(*batch, *right_side.shape[-2:])  # the right side of the rows not yet solved
    if upper:  # solve from the last row up: the same substitution on the rows and columns reversed
        rest = rest.flip(-2)
    rows = []
    for step in range(size):
        i = size - 1 - step if upper else step
        row = rest[..., 0, :] if unitriangular else rest[..., 0, :] / matrix[..., i, i : i + 1]
        rows.append(row)
        if step < size - 1:
            column = matrix[..., :i, i].flip(-1) if upper else matrix[..., i + 1 :, i]  # the rows still to solve
            rest = rest[..., 1:, :] - column.unsqueeze(-1) * row.unsqueeze(-2)
    solved = torch.stack(rows, dim=-2)
    return solved.flip(-2) if upper else solved


def symbolic_triangular_solve(matrix: torch.Tensor, right_side: torch.Tensor, upper: bool) -> torch.Tensor:
    """``matrix^-1 right_side`` for triangular ``(..., n, n)`` matrices, in a form that traces with a symbolic batch
    size: written out (:func:`small_triangular_solve`, which fuses with the rest of a compiled step) up to
    :data:`SMALL_MATRIX_SIDE`, ``torch.linalg.solve`` above (``solve_triangular`` does not trace that way in torch
    2.13)."""
    if matrix.shape[-1] <= SMALL_MATRIX_SIDE:
        return small_triangular_solve(matrix, right_side, upper=upper, unitriangular=False)
    return torch.linalg.solve(matrix, right_side)


def multivariate_normal_log_density(difference: torch.Tensor, scale_tril: torch.Tensor) -> torch.Tensor:
    """``log N(difference; 0, L L^T)`` for differences ``(..., D)`` from the mean and lower-triangular factors ``L``
    ``(..., D, D)`` that broadcast against them; ``log|det L|`` from the diagonal's absolute values.

    One :func:`symbolic_triangular_solve`: unlike ``torch.distributions.MultivariateNormal.log_prob``, whose
    reshapes are computed in Python and whose ``solve_triangular`` fails on symbolic sizes (torch 2.13), it traces
    with a symbolic batch size, as the batched calibration step needs.
    """
    size = difference.shape[-1]
    whitened = symbolic_triangular_solve(scale_tril, difference.unsqueeze(-1), upper=False)
    log_determinant = torch.diagonal(scale_tril, dim1=-2, dim2=-1).abs().log().sum(-1)
    return -0.5 * whitened.squeeze(-1).pow(2).sum(-1) - log_determinant - 0.5 * size * math.log(2 * math.pi)


class _SmallLinearAlgebraInliner(torch.fx.Interpreter):
    """Replays a graph with its small ``mm``/``bmm``/``mv`` and triangular solves written out elementwise."""

    def call_function(self, target, args, kwargs):
        aten = torch.ops.aten
        if target in (aten.mm.default, aten.bmm.default) and args[0].shape[-1] <= SMALL_MATRIX_SIDE:
            return small_matrix_product(args[0], args[1])
        if target is aten.mv.default and args[0].shape[-1] <= SMALL_MATRIX_SIDE:
            return small_matrix_product(args[0], args[1].unsqueeze(-1)).squeeze(-1)
        if (
            target is aten.linalg_solve_triangular.default and kwargs.get("left", True)
            and args[0].shape[-1] <= SMALL_MATRIX_SIDE
        ):
            return small_triangular_solve(
                args[0], args[1], kwargs["upper"], kwargs.get("unitriangular", False)
            )
        return super().call_function(target, args, kwargs)


def _inline_small_linear_algebra(graph: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> torch.fx.GraphModule:
    """``graph`` retraced with the products and triangular solves of at most :data:`SMALL_MATRIX_SIDE` written out
    (see there); ``inputs`` are example inputs, which the retrace overwrites where the graph does."""
    from torch.fx.experimental.proxy_tensor import make_fx

    aten = torch.ops.aten
    targets = {aten.mm.default, aten.bmm.default, aten.mv.default, aten.linalg_solve_triangular.default}
    if not any(node.op == "call_function" and node.target in targets for node in graph.graph.nodes):
        return graph
    with torch.no_grad():
        return make_fx(_SmallLinearAlgebraInliner(graph).run)(*inputs)
