"""``ppvi.vectorize``: a model's log density over a batch of draws in one call, whatever way the model is written.

A fit evaluates the model at many points at once: the particles of every training step, the 4,000 draws behind a
summary, a diagnosis or an ArviZ conversion. Three ways to do it, chosen once per fit by :func:`choose_strategy`:

- ``"broadcast"``: the model runs once inside a plate of draws left of its own plates, Pyro's particle convention
  (``Trace_ELBO(vectorize_particles=True)``). Fastest, and the only way for a model that broadcasts correctly.
- ``"vmap"``: the model runs on one draw and :func:`torch.func.vmap` batches every tensor operation in it, as NumPyro
  batches with ``jax.vmap``. A model written for one draw (``logits = a + X @ beta``) needs no change and runs as
  fast as its broadcasting twin; so does a model that broadcasts *wrongly*: written numpy-style,
  ``a[..., None] + (X * beta[..., None, :]).sum(-1)`` adds a dimension left of its plates, which Pyro's plate of
  draws then expands, silently counting the likelihood once per draw.
- ``"sequential"``: one run per draw, for a model vmap cannot batch (Python control flow on sampled values,
  ``if z > 0:``), with a :class:`ppvi.result.FitWarning` that says what it costs and how to avoid it.

The choice is checked, not assumed: :func:`choose_strategy` evaluates :data:`PROBE_DRAWS` draws one at a time
(an unbatched run of the model, correct by construction) and accepts a batched strategy only if it returns the same
log densities, and it reports every site whose log-probability shape breaks the particle convention
(:func:`particle_shape_problems`). A model that over-counts is never trained on the broadcast.

Calibration (:mod:`ppvi.calibration`) makes the same choice over simulated replications, and simulates them from
the prior by :func:`vmapped_random_runs`: a model run written for one draw, batched by vmap, drawing the random
stream a plate of replications would.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal, NamedTuple, TypeVar

import pyro
import torch
from pyro import poutine
from torch.overrides import TorchFunctionMode

from ppvi.constrain import ConstrainMessenger, constrained_trace
from ppvi.enumeration import per_draw_log_prob
from ppvi.guides import PreconditionedGuide
from ppvi.inputs import random_state_kept
from ppvi.tracing import is_reported

__all__ = [
    "DRAWS_PER_CALL",
    "PROBE_DRAWS",
    "Strategy",
    "Vectorization",
    "batched_log_density",
    "choose_strategy",
    "first_line",
    "log_densities_agree",
    "particle_shape_problems",
    "single_draw_log_density",
    "vmapped_random_runs",
    "without_fallback_warnings",
]

Result = TypeVar("Result")

Strategy = Literal["broadcast", "vmap", "sequential"]

#: Draws in the probe that checks a batched strategy against one-at-a-time runs: three, so that no dimension of
#: size two or one in the model (a pair of coefficients, a singleton) can pass for the draws' dimension, while the
#: probe costs a few unbatched runs of the model.
PROBE_DRAWS = 3
#: Draws evaluated in one batched call: a bound on memory (a model with N data points holds about
#: ``DRAWS_PER_CALL * N`` numbers per intermediate) that still amortises the Python work of one run of the model
#: over a thousand draws.
DRAWS_PER_CALL = 1024


class Vectorization(NamedTuple):
    """How a fit evaluates its model over a batch of draws.

    Attributes
    ----------
    strategy : {"broadcast", "vmap", "sequential"}
        See the module docstring.
    reason : str
        Why the model does not run on the broadcast (empty when it does): the error the broadcast raised, or the
        sites whose log-probability shapes break the particle convention.
    """

    strategy: Strategy
    reason: str


def single_draw_log_density(
    model: Callable, guide: PreconditionedGuide, args: tuple, kwargs: dict
) -> Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """``z -> (log p(x, T(z)) + log|det J_T(z)|, reported values)`` for one unconstrained point ``z`` ``(D,)``.

    The model runs unbatched, each latent site constrained by its support in this run (:mod:`ppvi.constrain`). The
    reported values are the constrained value of every latent and ``pyro.deterministic`` site. Distribution
    argument validation is off inside, so that :func:`torch.func.vmap` can batch the function (validation asks
    Python questions about values); a value outside the support shows as a non-finite density instead.
    """

    def log_density(latent: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pieces = {site["name"]: value for site, value in guide._unpack_latent(latent)}
        constrain = ConstrainMessenger(pieces, ())
        with pyro.validation_enabled(False), constrain:
            trace = poutine.trace(model).get_trace(*args, **kwargs)
            total = trace.log_prob_sum()
        return total + constrain.log_abs_det_jacobian, _reported_values(trace, constrain)

    return log_density


def _reported_values(trace: poutine.Trace, constrain: ConstrainMessenger) -> dict[str, torch.Tensor]:
    """The constrained value of every latent site (which the messenger marked observed) and every deterministic
    site, in the model's order."""
    return {
        name: site["value"] for name, site in trace.nodes.items()
        if name in constrain.values or (is_reported(site) and site["infer"].get("_deterministic"))
    }


def _broadcast(
    model: Callable, guide: PreconditionedGuide, args: tuple, kwargs: dict, max_plate_nesting: int
) -> Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor], poutine.Trace]]:
    def log_density(latent: torch.Tensor):
        num_draws = latent.shape[0]
        batch = (num_draws,) + (1,) * max_plate_nesting
        pieces = {site["name"]: value for site, value in guide._unpack_latent(latent.reshape(*batch, -1))}
        trace, messenger = constrained_trace(model, args, kwargs, pieces, num_draws, max_plate_nesting)
        total = per_draw_log_prob(trace, max_plate_nesting, num_draws).to(latent.dtype)
        jacobian = torch.as_tensor(messenger.log_abs_det_jacobian, dtype=total.dtype).expand(num_draws)
        return total + jacobian, _reported_values(trace, messenger), trace

    return log_density


def batched_log_density(
    model: Callable, guide: PreconditionedGuide, args: tuple, kwargs: dict, max_plate_nesting: int,
    strategy: Strategy, site_shapes: dict[str, tuple[int, ...]] | None = None,
) -> Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """``z -> (log p(x, T(z_s)) + log|det J_T(z_s)|`` per row, reported values ``(S, *site_shape)``)`` for draws
    ``z`` of shape ``(S, D)``, by ``strategy``, in calls of at most :data:`DRAWS_PER_CALL` draws.

    Parameters
    ----------
    site_shapes : dict of str to tuple of int, optional
        Shape of one draw of each reported site, to lay the broadcast's values out as ``(S, *shape)`` (the
        broadcast leaves the plates' singleton dimensions in them); needed for ``"broadcast"`` only.
    """
    single = single_draw_log_density(model, guide, args, kwargs)
    if strategy == "broadcast":
        broadcast = _broadcast(model, guide, args, kwargs, max_plate_nesting)

        def evaluate(latent: torch.Tensor):
            total, values, _ = broadcast(latent)
            shapes = site_shapes or {}
            return total, {
                name: value.reshape(latent.shape[0], *shapes[name]) if name in shapes else value
                for name, value in values.items()
            }
    elif strategy == "vmap":
        evaluate = torch.func.vmap(single, randomness="different")
    elif strategy == "sequential":

        def evaluate(latent: torch.Tensor):
            results = [single(point) for point in latent]
            names = results[0][1].keys() if results else ()
            return torch.stack([total for total, _ in results]), {
                name: torch.stack([values[name] for _, values in results]) for name in names
            }
    else:
        raise ValueError(f"unknown strategy {strategy!r}: use 'broadcast', 'vmap' or 'sequential'")

    def chunked(latent: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if latent.shape[0] <= DRAWS_PER_CALL:
            return evaluate(latent)
        parts = [evaluate(chunk) for chunk in latent.split(DRAWS_PER_CALL)]
        return torch.cat([total for total, _ in parts]), {
            name: torch.cat([values[name] for _, values in parts]) for name in parts[0][1]
        }

    return chunked


def particle_shape_problems(trace: poutine.Trace, num_draws: int, max_plate_nesting: int) -> list[str]:
    """The sample sites of a broadcast trace whose log-probability shape breaks Pyro's particle convention.

    Under a plate of ``num_draws`` draws at dimension ``-(max_plate_nesting + 1)``, a site's log probability may
    have at most ``max_plate_nesting + 1`` dimensions, the leftmost of size ``num_draws`` or 1; more dimensions are
    a batch the model added left of its plates, which the plate of draws expands and a sum over draws counts again.
    """
    trace.compute_log_prob()
    problems = []
    allowed = max_plate_nesting + 1
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or not isinstance(site.get("log_prob"), torch.Tensor):
            continue
        shape = tuple(site["log_prob"].shape)
        if len(shape) > allowed or (len(shape) == allowed and shape[0] not in (1, num_draws)):
            expected = ", ".join([str(num_draws), *(["N"] * max_plate_nesting)])
            problems.append(
                f"site {name!r} has a log-probability of shape {shape} over {num_draws} draws, where the particle "
                f"convention allows at most {allowed} dimensions, ({expected}), N a plate's size or 1 (a dimension "
                "added left of the plates, as a[..., None] does, is counted once per draw)"
            )
    return problems


def choose_strategy(
    model: Callable, guide: PreconditionedGuide, args: tuple, kwargs: dict, max_plate_nesting: int
) -> Vectorization:
    """The fastest way to evaluate ``model`` over a batch of draws that gives the same log densities as evaluating
    them one at a time (see the module docstring).

    The probe draws :data:`PROBE_DRAWS` points from the guide (the random state is restored afterwards, so the fit
    draws what it would have drawn without the probe) and compares each batched strategy's log densities with
    unbatched runs of the model.
    """
    with random_state_kept(), torch.no_grad():
        latent = guide.posterior().sample((PROBE_DRAWS,))
        single = single_draw_log_density(model, guide, args, kwargs)
        reference = torch.stack([single(point)[0] for point in latent])
        try:
            total, _, trace = _broadcast(model, guide, args, kwargs, max_plate_nesting)(latent)
        except (ValueError, RuntimeError, IndexError, TypeError) as error:
            reason = f"it does not broadcast over a batch of draws ({first_line(error)})"
        else:
            problems = particle_shape_problems(trace, PROBE_DRAWS, max_plate_nesting)
            if not problems and log_densities_agree(total, reference):
                return Vectorization("broadcast", "")
            reason = "; ".join(problems) or (
                "its log densities over a batch of draws differ from those of the same draws one at a time"
            )
        try:
            batched, _ = torch.func.vmap(single, randomness="different")(latent)
        except Exception as error:  # noqa: BLE001 - any failure of vmap means: one draw at a time
            return Vectorization("sequential", f"{reason}, and torch.func.vmap cannot batch it ({first_line(error)})")
        if not log_densities_agree(batched, reference):
            return Vectorization("sequential", f"{reason}, and torch.func.vmap changes its log densities")
        return Vectorization("vmap", reason)


def first_line(error: BaseException) -> str:
    """``"ErrorType: first line of its message"``: an error, short enough for a reason or a refusal."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def log_densities_agree(batched: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether batched log densities equal one-at-a-time ones up to the round-off of summing the same terms in
    another order: ``sqrt(eps)`` of their magnitude, far below the O(1)-nat errors of a model that mixes draws. The
    same infinity, or a NaN, in both at the same place counts as equal."""
    if batched.shape != reference.shape:
        return False
    tolerance = torch.finfo(reference.dtype).eps ** 0.5 * reference.abs().clamp(min=1.0)
    same_nonfinite = ~torch.isfinite(reference) & ((batched == reference) | (batched.isnan() & reference.isnan()))
    return bool(((batched - reference).abs() <= tolerance).logical_or(same_nonfinite).all())


#: torch's in-place random fills. torch's and Pyro's samplers draw their noise with them on a tensor they have just
#: made (``torch.empty(shape).normal_()``, ``rate.new(shape).exponential_()``), which inside
#: :func:`torch.func.vmap` is unbatched, and vmap refuses to fill an unbatched tensor with different values per run.
_IN_PLACE_RANDOM = frozenset({
    torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.exponential_, torch.Tensor.cauchy_,
    torch.Tensor.log_normal_, torch.Tensor.geometric_, torch.Tensor.bernoulli_, torch.Tensor.random_,
})


class _PerRunRandomness(TorchFunctionMode):
    """Inside :func:`torch.func.vmap`, fill a fresh unbatched tensor in place with random values by filling a
    batched copy instead (the unbatched tensor plus a batched zero, ``anchor``) and returning that copy.

    torch's and Pyro's samplers use what the fill returns (``return torch.empty(shape).normal_()``), never the
    tensor they filled, so they receive one independent draw per run. The batched copy holds the runs in its first
    dimension, and vmap fills it as one tensor of ``(runs, *shape)`` values: the same random stream a sampler of
    batch shape ``(runs, *shape)`` draws outside vmap.
    """

    def __init__(self, anchor: torch.Tensor):
        super().__init__()
        self.anchor = anchor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else None
        if (
            func in _IN_PLACE_RANDOM and isinstance(target, torch.Tensor)
            and not torch._C._functorch.is_batchedtensor(target)
        ):
            return func(target + self.anchor.to(target.dtype), *args[1:], **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def without_fallback_warnings() -> Iterator[None]:
    """Silence torch's warning that :func:`torch.func.vmap` runs an operation without a batching rule one batch
    element at a time (``aten::clamp_`` in torch's Gamma sampler): a note to torch's developers about torch's own
    code, which no model can act on (and which a test suite that turns warnings into errors would take for a
    failure of vmap)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="There is a performance drop because we have not yet implemented the batching rule",
            category=UserWarning,
        )
        yield


def vmapped_random_runs(function: Callable[[], Result], count: int, device: torch.device | str | None = None) -> Result:
    """``count`` independent runs of ``function`` (no arguments: a model run forward from its prior), batched by
    :func:`torch.func.vmap` with ``randomness="different"``; every tensor it returns gains a leading dimension of
    ``count``.

    The runs draw what a run under a plate of ``count`` left of the model's own plates would draw, from the same
    random stream (torch's samplers draw a batch of ``(count, *shape)`` in one call either way), though the function
    is written for one run. Distribution argument validation is off inside (it asks Python questions about values,
    which vmap cannot answer). Raises whatever vmap raises on a function it cannot batch: Python control flow on a
    sampled value, or a sampler written as an ``autograd.Function`` without vmap support (torch's Dirichlet, and the
    Beta and LKJ distributions built on it).
    """
    index = torch.arange(count, device=device)

    def run(position: torch.Tensor) -> Result:
        with pyro.validation_enabled(False), _PerRunRandomness(position * 0):  # a batched zero
            return function()

    with without_fallback_warnings():
        output: Any = torch.func.vmap(run, randomness="different")(index)
    return output
