"""``ppvi.enumeration``: log densities of many draws at once, with a model's enumerated discrete sites summed out.

:func:`marginal_log_density` contracts one enumerated trace of a batch of draws by tensor variable elimination;
:func:`batched_marginal_log_density` runs it in passes sized to a memory budget and checks that the model broadcasts
over the draws; :func:`per_draw_log_prob` sums an ordinary vectorized trace per draw.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import torch
from pyro import poutine

from ppvi.constrain import ConstrainMessenger
from ppvi.guides import PreconditionedGuide

__all__ = [
    "MARGINAL_FIRST_PASS_DRAWS",
    "MARGINAL_PASS_ENTRIES",
    "batched_marginal_log_density",
    "marginal_log_density",
    "per_draw_log_prob",
]


def per_draw_log_prob(trace: poutine.Trace, max_plate_nesting: int, num_samples: int) -> torch.Tensor:
    """Sum of every sample site's (scaled, masked) log density, per draw of the draws plate."""
    trace.compute_log_prob()
    total = torch.zeros(num_samples, dtype=torch.float64)
    for site in trace.nodes.values():
        if site["type"] != "sample":
            continue
        log_prob = site["log_prob"]
        if max_plate_nesting and log_prob.dim() >= max_plate_nesting:
            log_prob = log_prob.sum(dim=tuple(range(-max_plate_nesting, 0)))
        log_prob = log_prob.double().reshape(-1)  # one value per draw, or one shared by all
        total = total + (log_prob if log_prob.numel() == num_samples else log_prob.sum())
    return total


#: Numbers (log-probability entries, summed over the sites) that one pass of :func:`batched_marginal_log_density`
#: may hold: 2^22 float64 entries are 32 MiB, a few times that with the intermediates, whatever the data size.
MARGINAL_PASS_ENTRIES = 2**22
#: Draws in the first pass, which measures the entries per draw and sizes the later passes: small, in case one
#: draw already has many (an enumerated site over a large data plate).
MARGINAL_FIRST_PASS_DRAWS = 16


def batched_marginal_log_density(
    model: Callable, guide: PreconditionedGuide, args: tuple, kwargs: dict, latent: torch.Tensor, max_plate_nesting: int
) -> torch.Tensor:
    """``log p(x, T(z_s)) + log|det J_T(z_s)|`` for every row ``z_s`` of ``latent`` (shape ``(S, D)``), the
    enumerated sites summed out, in a few vectorized passes of :func:`marginal_log_density`.

    Raises ``ValueError`` (or the model's own ``RuntimeError`` / ``IndexError``) when the model does not broadcast
    over a batch of draws: the draw-by-draw result of the first pass's last draw, an unbatched run of the model,
    must equal the batched one, so a model that mixes the draws up without an error is caught too.
    """
    num_samples = latent.shape[0]
    first = latent[:MARGINAL_FIRST_PASS_DRAWS]
    log_density, entries = marginal_log_density(model, guide, args, kwargs, first, max_plate_nesting)
    single, _ = marginal_log_density(model, guide, args, kwargs, first[-1], max_plate_nesting)
    # Round-off of summing the same terms in another order: a few ulps of the terms' magnitude, far below the
    # O(1) errors of a model that mixes up draws.
    tolerance = torch.finfo(latent.dtype).eps ** 0.5 * max(1.0, abs(float(single)))
    if not abs(float(log_density[-1]) - float(single)) <= tolerance:
        raise ValueError(
            f"the model does not broadcast over a batch of draws: the batched log density of a draw is "
            f"{float(log_density[-1])!r}, the unbatched one {float(single)!r}"
        )
    per_pass = max(1, MARGINAL_PASS_ENTRIES * first.shape[0] // max(entries, 1))
    parts = [log_density]
    for start in range(first.shape[0], num_samples, per_pass):
        chunk = latent[start : start + per_pass]
        parts.append(marginal_log_density(model, guide, args, kwargs, chunk, max_plate_nesting)[0])
    return torch.cat(parts)


def marginal_log_density(
    model: Callable, guide: PreconditionedGuide, args: tuple, kwargs: dict, latent: torch.Tensor, max_plate_nesting: int
) -> tuple[torch.Tensor, int]:
    """``log p(x, T(z)) + log|det J_T(z)|`` with the model's enumerated sites summed out, for a batch of points
    ``latent`` of shape ``(S, D)`` in one trace (or one point of shape ``(D,)``, the model run unbatched).

    The value TraceEnum_ELBO gives on a point-mass guide, draw by draw: the model is conditioned on the constrained
    values inside a plate of draws left of its own plates, enumerated in parallel left of that plate (Pyro's
    ``poutine.enum``), and its factors are contracted by tensor variable elimination (Obermeyer et al. 2019,
    "Tensor variable elimination for plated factor graphs", ICML) with ``pyro.ops.contract.contract_to_tensor``:
    log-sum-exp over the enumerated dimensions, sum over the plates, the draws plate kept. As in TraceEnum_ELBO,
    masks apply inside and the (common) subsampling scale of the enumerated factors outside the log-sum-exp; the
    other sites contribute their scaled, masked log densities.

    Returns
    -------
    log_density : torch.Tensor
        Shape ``(S,)``, or ``()`` for one unbatched point.
    entries : int
        Log-probability entries the trace held (the memory a pass needs grows with it).
    """
    from collections import OrderedDict

    from opt_einsum import shared_intermediates
    from pyro.ops import packed
    from pyro.ops.contract import contract_to_tensor
    from pyro.ops.rings import LogRing
    from pyro.poutine.util import prune_subsample_sites
    from pyro.util import check_site_shape

    batched = latent.dim() == 2
    num_draws = latent.shape[0] if batched else 1
    batch = (num_draws,) + (1,) * max_plate_nesting if batched else ()
    pieces = {site["name"]: value for site, value in guide._unpack_latent(latent.reshape(*batch, latent.shape[-1]))}
    # Each site constrained by the support of this run (ppvi.constrain); the enumerated sites are left to poutine.enum.
    messenger = ConstrainMessenger(pieces, batch[:1])
    conditioned = messenger(model)
    if batched:
        conditioned = pyro.plate("_ppvi_draws", num_draws, dim=-(max_plate_nesting + 1))(conditioned)
    nesting = max_plate_nesting + int(batched)
    enumerated = poutine.enum(conditioned, first_available_dim=-(nesting + 1))
    trace = prune_subsample_sites(poutine.trace(enumerated).get_trace(*args, **kwargs))
    trace.compute_log_prob()
    sites = [site for site in trace.nodes.values() if site["type"] == "sample"]
    for site in sites:
        check_site_shape(site, nesting)
    trace.pack_tensors()
    draws_symbol = trace.plate_to_symbol.get("_ppvi_draws")

    def ordinal(site) -> frozenset:
        return frozenset(trace.plate_to_symbol[frame.name] for frame in site["cond_indep_stack"] if frame.vectorized)

    enumerated_dims = set()
    for site in sites:
        if site["infer"].get("_enumerate_dim") is not None:
            enumerated_dims.update(site["packed"]["log_prob"]._pyro_dims)
    enumerated_dims -= {symbol for site in sites for symbol in ordinal(site)}

    costs, factors, scales = [], OrderedDict(), []
    for site in sites:
        log_prob = site["packed"]["log_prob"]
        if site["infer"].get("_enumerate_dim") is not None:
            factors.setdefault(ordinal(site), []).append(site["packed"]["unscaled_log_prob"])
            scales.append(site["scale"])
        elif enumerated_dims.isdisjoint(log_prob._pyro_dims):
            costs.append(log_prob)
        else:
            masked = packed.scale_and_mask(site["packed"]["unscaled_log_prob"], mask=site["packed"]["mask"])
            factors.setdefault(ordinal(site), []).append(masked)
            scales.append(site["scale"])

    if factors:
        if any(torch.is_tensor(scale) and scale.dim() for scale in scales):
            raise ValueError("enumeration supports only a scalar poutine.scale, as in TraceEnum_ELBO")
        scale_values = {float(scale) for scale in scales}
        if len(scale_values) != 1:
            raise ValueError("enumerated sites need one common poutine.scale, as in TraceEnum_ELBO")
        dim_to_size = {}
        for terms in factors.values():
            for term in terms:
                dim_to_size.update(zip(term._pyro_dims, term.shape, strict=True))
        target = frozenset({draws_symbol}) if batched else frozenset()
        with shared_intermediates() as cache:
            contracted = contract_to_tensor(
                factors, enumerated_dims, target_ordinal=target, ring=LogRing(cache, dim_to_size=dim_to_size)
            )
        costs.append(packed.scale_and_mask(contracted, scale=scale_values.pop()))

    total = messenger.log_abs_det_jacobian
    for cost in costs:
        # Sum every dimension but the draws' (an empty list would make torch.sum reduce them all).
        summed_dims = [dim for dim, symbol in enumerate(cost._pyro_dims) if not (batched and symbol == draws_symbol)]
        total = total + (cost.sum(summed_dims) if summed_dims else cost)
    entries = sum(site["log_prob"].numel() for site in sites)
    return total, entries
