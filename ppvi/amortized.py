"""Fast training and evaluation of amortized guides (variational autoencoders) written in Pyro.

:class:`AmortizedELBO` is a Pyro ``ELBO`` for models and guides with a static structure (the same sample sites
every step, every guide site reparameterised): pass it to :func:`ppvi.fit` as ``elbo=``. It computes the same
number as Pyro's ``TraceMeanField_ELBO`` (closed-form KL where one exists) or ``Trace_ELBO``
(``analytic_kl=False``) for the same random draws (checked in ``tests/test_amortized.py``), but

- runs model and guide under one small messenger that records each site's distribution and value, instead of
  Pyro's ``trace``/``replay`` pair, the trace graph, ``compute_log_prob`` and the ELBO's per-site bookkeeping
  (profiled: these, not the networks, were most of a VAE step at batch 128 on a CPU);
- validates distribution arguments on the first evaluation only (afterwards a NaN still shows up as a non-finite
  loss, which ``ppvi.fit`` catches): validation reads values back from the device every step;
- on a GPU (``cuda_graph="auto"``), captures the whole loss and its gradient (model, guide, minibatch draw,
  noise) in one CUDA graph and replays it each step: one launch instead of a few hundred (Nguyen et al., "CUDA
  graphs", NVIDIA 2019), and no host synchronisation.

It also carries the objectives of the VAE literature: a weight ``beta`` on the KL term (Higgins et al. 2017,
beta-VAE), a linear KL warm-up from 0 (Bowman et al. 2016; Sønderby et al. 2016) and free bits (Kingma et al.
2016, "Improved variational inference with inverse autoregressive flow", appendix C).

:func:`log_likelihood` is the importance-sampling estimate of the test log-likelihood with ``L`` samples from the
guide, ``log p(x) ~= log (1/L) sum_l p(x, z_l) / q(z_l | x)`` (the IWAE bound of Burda, Grosse & Salakhutdinov
2016), with the ELBO beside it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal, NamedTuple

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.distributions import Independent
from pyro.infer import ELBO
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from torch.distributions import kl_divergence

CudaGraph = Literal["auto", "on", "off"]

#: Eager warm-up evaluations before a CUDA graph is captured (on a side stream, as PyTorch's
#: ``make_graphed_callables`` does): lets cuBLAS/cuDNN pick and cache their kernels and workspaces first.
GRAPH_WARMUP_EVALUATIONS = 3


class _Site(NamedTuple):
    fn: Any
    value: torch.Tensor
    scale: Any
    mask: Any
    is_observed: bool


class _SiteRecorder(Messenger):
    """Records every sample site's distribution and value; replays latent values and minibatch indices.

    The guide runs under a recorder without ``values``; the model under one with the guide's latent values and
    subsample indices, which it substitutes for its own draws, as Pyro's ``replay`` does.
    """

    def __init__(
        self,
        values: dict[str, torch.Tensor] | None = None,
        subsamples: dict[str, torch.Tensor] | None = None,
        graph_safe_subsample: bool = False,
    ):
        super().__init__()
        self.sites: dict[str, _Site] = {}
        self.values = values
        self.subsamples: dict[str, torch.Tensor] = {} if subsamples is None else subsamples
        self.graph_safe_subsample = graph_safe_subsample

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample" or msg["value"] is not None:
            return
        fn = msg["fn"]
        if isinstance(fn, _Subsample):
            name = msg["name"]
            if name in self.subsamples:
                msg["value"] = self.subsamples[name]
            elif self.graph_safe_subsample and fn.subsample_size is not None and fn.subsample_size < fn.size:
                # a uniformly random subset, like Pyro's randperm, from ops a CUDA graph can capture
                noise = torch.rand(fn.size, device=fn.device)
                msg["value"] = noise.argsort()[: fn.subsample_size]
            return
        if self.values is not None and not msg["is_observed"]:
            if msg["name"] not in self.values:
                raise ValueError(
                    f"the model's latent site {msg['name']!r} has no counterpart in the guide: every latent site "
                    "of the model needs one in the guide (an amortized guide samples each of them)"
                )
            msg["value"] = self.values[msg["name"]]

    def _postprocess_message(self, msg) -> None:
        if msg["type"] != "sample":
            return
        if isinstance(msg["fn"], _Subsample):
            self.subsamples[msg["name"]] = msg["value"]
            return
        if msg["infer"].get("enumerate"):
            raise ValueError(
                f"site {msg['name']!r} is marked for enumeration, which AmortizedELBO does not do: use "
                "elbo='enumerate' (Pyro's TraceEnum_ELBO)"
            )
        self.sites[msg["name"]] = _Site(msg["fn"], msg["value"], msg["scale"], msg["mask"], msg["is_observed"])


def _scale_and_mask(value: torch.Tensor, scale, mask) -> torch.Tensor:
    if mask is not None and mask is not True:
        value = torch.where(mask, value, value.new_zeros(()))
    return value * scale if not (isinstance(scale, float) and scale == 1.0) else value


def _elementwise(distribution) -> tuple[Any, int]:
    """The base distribution of ``Independent`` wrappers and how many batch dimensions they reinterpreted."""
    dims = 0
    while isinstance(distribution, (Independent, torch.distributions.Independent)):
        dims += distribution.reinterpreted_batch_ndims
        distribution = distribution.base_dist
    return distribution, dims


def _run_pair(model: Callable, guide: Callable, args: tuple, kwargs: dict, graph_safe_subsample: bool = False):
    """Guide then model, recorded; the model sees the guide's latent values and minibatch indices."""
    with _SiteRecorder(graph_safe_subsample=graph_safe_subsample) as guide_recorder:
        guide(*args, **kwargs)
    values = {name: site.value for name, site in guide_recorder.sites.items() if not site.is_observed}
    with _SiteRecorder(values, guide_recorder.subsamples) as model_recorder:
        model(*args, **kwargs)
    return guide_recorder.sites, model_recorder.sites


class LossTerms(NamedTuple):
    """The two parts of the negative ELBO of one evaluation (scaled to the whole data set).

    Attributes
    ----------
    reconstruction : torch.Tensor
        ``-sum log p(x | z)`` over the observed sites.
    kl : torch.Tensor
        ``sum KL(q(z | x) || p(z))`` over the latent sites (closed form, or ``log q - log p`` at the draw), with
        free bits applied when asked; before the KL weight.
    """

    reconstruction: torch.Tensor
    kl: torch.Tensor


def loss_terms(
    guide_sites: dict[str, _Site], model_sites: dict[str, _Site], analytic_kl: bool = True, free_bits: float = 0.0
) -> LossTerms:
    """Reconstruction and KL terms of the negative ELBO from recorded sites (pure function of the records).

    With ``analytic_kl`` the KL of a latent site is the closed form ``KL(q || p)`` when torch has one (as Pyro's
    ``TraceMeanField_ELBO``), scaled by the guide site's plate scale; otherwise ``log q(z) - log p(z)`` at the draw
    (as ``Trace_ELBO``), each scaled by its own site's. With ``free_bits = lambda > 0`` (needs the closed form),
    each latent dimension ``j`` contributes ``N * max(lambda, mean over the minibatch of KL_j)`` (Kingma et al.
    2016, appendix C), ``N`` being the data size the plate scale stands for.
    """
    reconstruction: torch.Tensor | float = 0.0
    kl: torch.Tensor | float = 0.0
    for name, site in model_sites.items():
        if site.is_observed:
            reconstruction = reconstruction - _observed_log_prob_sum(site)
            continue
        guide_site = guide_sites[name]
        if free_bits > 0:
            kl = kl + _free_bits_kl(name, guide_site, site, free_bits)
            continue
        closed_form = None
        if analytic_kl:
            try:
                closed_form = kl_divergence(guide_site.fn, site.fn)
            except NotImplementedError:
                closed_form = None
        if closed_form is not None:
            kl = kl + _scale_and_mask(closed_form, guide_site.scale, guide_site.mask).sum()
        else:
            log_q = _scale_and_mask(guide_site.fn.log_prob(guide_site.value), guide_site.scale, guide_site.mask)
            log_p = _scale_and_mask(site.fn.log_prob(site.value), site.scale, site.mask)
            kl = kl + log_q.sum() - log_p.sum()
    for name, guide_site in guide_sites.items():
        if name not in model_sites and not guide_site.is_observed:  # auxiliary guide variables
            kl = kl + _scale_and_mask(guide_site.fn.log_prob(guide_site.value), guide_site.scale, guide_site.mask).sum()
    zero = next(iter(model_sites.values())).value.new_zeros(()) if model_sites else torch.zeros(())
    return LossTerms(zero + reconstruction, zero + kl)


def _observed_log_prob_sum(site: _Site) -> torch.Tensor:
    """``sum scale * mask * log p(x)`` of an observed site. A Bernoulli with logits of the data's shape, unmasked
    (the VAE's decoder), takes PyTorch's fused summed cross-entropy: the same number, with three fewer passes
    over the pixels (the elementwise log-density, its negation and the sum over event dimensions, forward and
    backward: about 10 % of a batch-1024 step on a CPU)."""
    base, _ = _elementwise(site.fn)
    if (site.mask is None and type(base) in (torch.distributions.Bernoulli, pyro.distributions.Bernoulli)
            and "logits" in base.__dict__ and base.logits.shape == site.value.shape):
        cross_entropy = torch.nn.functional.binary_cross_entropy_with_logits(base.logits, site.value, reduction="sum")
        return -cross_entropy * site.scale
    return _scale_and_mask(site.fn.log_prob(site.value), site.scale, site.mask).sum()


def _free_bits_kl(name: str, guide_site: _Site, model_site: _Site, free_bits: float) -> torch.Tensor:
    guide_base, guide_dims = _elementwise(guide_site.fn)
    model_base, model_dims = _elementwise(model_site.fn)
    try:
        elementwise = kl_divergence(guide_base, model_base)
    except NotImplementedError as error:
        raise ValueError(
            f"free bits need the closed-form KL of each latent dimension, and torch has none for site {name!r} "
            f"({type(guide_base).__name__} against {type(model_base).__name__})"
        ) from error
    if guide_site.mask is not None:
        raise ValueError(f"free bits do not support masked sites (site {name!r})")
    event_dims = max(guide_dims, model_dims)
    batch = elementwise.shape[: elementwise.dim() - event_dims]
    per_dimension = elementwise.reshape(-1, *elementwise.shape[len(batch) :]).mean(0)
    data_size = guide_site.scale * math.prod(batch)
    return per_dimension.clamp(min=free_bits).sum() * data_size


class AmortizedELBO(ELBO):
    """The ELBO of a Pyro model and amortized guide with a static structure, fast, with the VAE options.

    Pass it to :func:`ppvi.fit` (``elbo=AmortizedELBO(...)``) or call :meth:`differentiable_loss` /
    :meth:`loss` yourself. Each evaluation runs guide then model once (one particle), with the guide's draws
    reparameterised. The loss is ``reconstruction + w_t * kl`` (see :func:`loss_terms`), where the KL weight
    ``w_t = kl_weight * min(1, t / kl_warmup_steps)`` grows linearly from 0 over the first ``kl_warmup_steps``
    evaluations with gradients on (``t`` counts them: :attr:`step`; ``ppvi.fit`` makes one such evaluation before
    its first step, to find the parameters). With the defaults the value is exactly Pyro's
    ``TraceMeanField_ELBO().differentiable_loss`` for the same random draws.

    Parameters
    ----------
    kl_weight : float
        ``beta`` of the beta-VAE (Higgins et al. 2017): 1 is the ELBO; other values give a different objective
        (``beta > 1`` trades reconstruction for a more factorised, lower-KL code).
    kl_warmup_steps : int
        Length of the linear KL annealing of Bowman et al. (2016); 0 for none.
    free_bits : float
        ``lambda`` nats per latent dimension (Kingma et al. 2016): KL below it, averaged over the minibatch, is not
        penalised (the gradient pushes no dimension below ``lambda``); 0 for none.
    analytic_kl : bool
        Closed-form KL where torch has one (``TraceMeanField_ELBO``); ``False`` for the sampled
        ``log q - log p`` (``Trace_ELBO``).
    cuda_graph : {"auto", "on", "off"}
        Capture loss and gradient in a CUDA graph: ``"auto"`` does so when the data are on a GPU and the loss is
        differentiated (training). The graph is captured again when the model, guide or data change.

    Attributes
    ----------
    step : int
        Evaluations with gradients so far (the annealing clock).
    last_terms : LossTerms or None
        Detached reconstruction and KL (before weighting) of the last evaluation: tensors on the device, so
        reading them costs a synchronisation only when you do.
    """

    def __init__(
        self,
        kl_weight: float = 1.0,
        kl_warmup_steps: int = 0,
        free_bits: float = 0.0,
        analytic_kl: bool = True,
        cuda_graph: CudaGraph = "auto",
    ):
        super().__init__(num_particles=1, max_plate_nesting=float("inf"))
        if not (isinstance(kl_weight, (int, float)) and kl_weight >= 0 and math.isfinite(kl_weight)):
            raise ValueError(f"kl_weight must be a finite number >= 0, got {kl_weight!r}")
        if not isinstance(kl_warmup_steps, int) or kl_warmup_steps < 0:
            raise ValueError(f"kl_warmup_steps must be an integer >= 0 (0: no annealing), got {kl_warmup_steps!r}")
        if not (isinstance(free_bits, (int, float)) and free_bits >= 0):
            raise ValueError(f"free_bits must be a number of nats >= 0 (0: none), got {free_bits!r}")
        if free_bits > 0 and not analytic_kl:
            raise ValueError("free bits need the closed-form KL per latent dimension: use analytic_kl=True")
        if cuda_graph not in ("auto", "on", "off"):
            raise ValueError(f"cuda_graph must be 'auto', 'on' or 'off', got {cuda_graph!r}")
        self.kl_weight, self.kl_warmup_steps, self.free_bits = float(kl_weight), kl_warmup_steps, float(free_bits)
        self.analytic_kl, self.cuda_graph = analytic_kl, cuda_graph
        self.step = 0
        self.last_terms: LossTerms | None = None
        self._validated: set = set()
        self._graph: _GraphedLoss | None = None

    def current_kl_weight(self) -> float:
        """The KL weight ``w_t`` the next evaluation uses."""
        if self.kl_warmup_steps == 0:
            return self.kl_weight
        return self.kl_weight * min(1.0, self.step / self.kl_warmup_steps)

    def _terms(self, model, guide, args, kwargs, graph_safe_subsample: bool = False) -> LossTerms:
        guide_sites, model_sites = _run_pair(model, guide, args, kwargs, graph_safe_subsample)
        for name, site in guide_sites.items():
            if not site.is_observed and not site.fn.has_rsample:
                raise ValueError(
                    f"guide site {name!r} ({type(site.fn).__name__}) cannot be reparameterised: AmortizedELBO "
                    "needs every guide draw reparameterised; use elbo='trace' (Pyro's score-function estimator)"
                )
        return loss_terms(guide_sites, model_sites, self.analytic_kl, self.free_bits)

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        """The negative (weighted) ELBO as a differentiable scalar tensor."""
        weight = self.current_kl_weight()
        training = torch.is_grad_enabled()
        key = _structure_key(model, guide, args, kwargs)
        graphed = training and self._use_graph(args, kwargs)
        if key not in self._validated:  # first evaluation: Pyro's argument validation on, eager
            terms = self._terms(model, guide, args, kwargs)
            self._validated.add(key)
            loss = terms.reconstruction + weight * terms.kl
        elif graphed:
            if self._graph is None or self._graph.key != key:
                self._graph = _GraphedLoss(key, lambda: self._terms(model, guide, args, kwargs, True), guide, model)
            loss, terms = self._graph(weight)
        else:
            with pyro.validation_enabled(False):
                terms = self._terms(model, guide, args, kwargs)
            loss = terms.reconstruction + weight * terms.kl
        if training:
            self.step += 1
        self.last_terms = LossTerms(terms.reconstruction.detach(), terms.kl.detach())
        return loss

    def loss(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """The negative (weighted) ELBO as a float, without gradients."""
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """Pyro's SVI interface: the loss as a float, gradients accumulated into the parameters."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return float(loss.detach())

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("AmortizedELBO records sites without Pyro traces")

    def _use_graph(self, args: tuple, kwargs: dict) -> bool:
        if self.cuda_graph == "off":
            return False
        on_gpu = any(isinstance(value, torch.Tensor) and value.is_cuda for value in (*args, *kwargs.values()))
        if self.cuda_graph == "on" and not on_gpu:
            raise ValueError("cuda_graph='on' needs the data on a GPU: fit with device='cuda', or cuda_graph='auto'")
        return on_gpu


def _identity(function: Callable) -> tuple:
    """A callable's identity; a bound method (``vae.model``, a new object at every attribute access) is its object
    and function."""
    owner = getattr(function, "__self__", None)
    if owner is not None and hasattr(function, "__func__"):
        return (id(owner), id(function.__func__))
    return (id(function),)


def _structure_key(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> tuple:
    """Identity of what a captured graph depends on: the callables and the data tensors (storage and shape)."""
    def describe(value):
        if isinstance(value, torch.Tensor):
            return ("tensor", value.data_ptr(), tuple(value.shape), value.dtype, value.device)
        return ("value", repr(value))

    return (_identity(model), _identity(guide), tuple(describe(v) for v in args),
            tuple((k, describe(v)) for k, v in sorted(kwargs.items())))


def parameters_outside(trace: poutine.Trace, parameters: Iterable[torch.Tensor]) -> list[str]:
    """Names of the ``pyro.param`` sites in ``trace`` (a ``poutine.trace(param_only=True)`` trace) whose leaf
    tensor is none of ``parameters``: the parameters a CUDA graph or DistributedDataParallel, which see module
    parameters only, would miss."""
    known = {id(parameter) for parameter in parameters}
    outside = []
    for site in trace.nodes.values():
        value = site["value"]
        leaf = value.unconstrained() if hasattr(value, "unconstrained") else value
        if id(leaf) not in known:
            outside.append(site["name"])
    return outside


def _module_parameters(*objects: Callable) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for candidate in objects:
        owner = getattr(candidate, "__self__", candidate)  # a bound method's module
        if isinstance(owner, torch.nn.Module):
            for parameter in owner.parameters():
                if parameter.requires_grad:
                    seen[id(parameter)] = parameter
    return list(seen.values())


class _GraphedLoss:
    """Loss terms and their gradient with respect to the guide's (and model's) module parameters, captured once
    in a CUDA graph and replayed; exposed to autograd as a function of the parameters whose backward returns
    the captured gradient (the construction of ``torch.cuda.make_graphed_callables``).

    The KL weight lives in a device tensor filled before each replay, so annealing needs no new capture. Only
    parameters of ``torch.nn.Module`` guides and models are differentiated (the VAE case); a loss that reads
    ``pyro.param`` values outside modules cannot be graphed (use ``cuda_graph="off"``).
    """

    def __init__(self, key: tuple, compute_terms: Callable[[], LossTerms], guide: Callable, model: Callable):
        self.key = key
        self.parameters = _module_parameters(guide, model)
        if not self.parameters:
            raise ValueError("cuda_graph needs the parameters in torch.nn.Module guides/models; use cuda_graph='off'")
        device = self.parameters[0].device
        self.weight = torch.ones((), device=device, dtype=self.parameters[0].dtype)

        def compute():
            with pyro.validation_enabled(False):
                terms = compute_terms()
                loss = terms.reconstruction + self.weight * terms.kl
                gradients = torch.autograd.grad(loss, self.parameters, allow_unused=True)
            pairs = zip(self.parameters, gradients, strict=True)
            gradients = tuple(torch.zeros_like(p) if g is None else g for p, g in pairs)
            return loss.detach(), terms.reconstruction.detach(), terms.kl.detach(), gradients

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            with poutine.trace(param_only=True) as params:
                compute()
            outside = parameters_outside(params.trace, self.parameters)
            if outside:
                raise ValueError(
                    f"the loss reads pyro.param {outside[0]!r}, which is not a parameter of the guide or "
                    "model module, and a CUDA graph differentiates module parameters only: use cuda_graph='off'"
                )
            for _ in range(GRAPH_WARMUP_EVALUATIONS - 1):
                compute()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss, self.reconstruction, self.kl, self.gradients = compute()

    def __call__(self, weight: float) -> tuple[torch.Tensor, LossTerms]:
        self.weight.fill_(weight)
        loss = _ReplayGraph.apply(self, *self.parameters)
        return loss, LossTerms(self.reconstruction.clone(), self.kl.clone())


class _ReplayGraph(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graphed: _GraphedLoss, *parameters: torch.Tensor) -> torch.Tensor:
        graphed.graph.replay()
        ctx.graphed = graphed
        return graphed.loss.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return (None, *(gradient * grad_output for gradient in ctx.graphed.gradients))


# -- evaluation --------------------------------------------------------------------------------------------------
class LikelihoodEstimate(NamedTuple):
    """Test log-likelihood by importance sampling, and the ELBO, in nats per data point (higher is better).

    Attributes
    ----------
    log_likelihood : float
        Mean over data points of ``log (1/L) sum_l p(x, z_l) / q(z_l | x)`` (the IWAE bound with ``k = L``, a
        stochastic lower bound of ``log p(x)`` that tightens as ``L`` grows; Burda et al. 2016).
    elbo : float
        Mean over data points of ``(1/L) sum_l log p(x, z_l) / q(z_l | x)`` from the same draws.
    per_point_log_likelihood : torch.Tensor
        The estimate for each data point, float64, shape ``(N,)``.
    per_point_elbo : torch.Tensor
        The ELBO of each data point, float64.
    num_samples : int
        ``L``.
    """

    log_likelihood: float
    elbo: float
    per_point_log_likelihood: torch.Tensor
    per_point_elbo: torch.Tensor
    num_samples: int


def _per_point(sites: dict[str, _Site], num_points: int, particles: int) -> torch.Tensor:
    total = torch.zeros(particles, num_points, dtype=torch.float64, device=next(iter(sites.values())).value.device)
    for name, site in sites.items():
        log_prob = _scale_and_mask(site.fn.log_prob(site.value), 1.0, site.mask)
        if log_prob.dim() < 2 or log_prob.shape[-1] != num_points:
            raise ValueError(
                f"site {name!r} has log-density shape {tuple(log_prob.shape)}: log_likelihood needs every site "
                "inside one data plate (dim=-1) over the data points, i.e. only local latent variables"
            )
        total = total + log_prob.reshape(particles, num_points).double()
    return total


@torch.no_grad()
def log_likelihood(
    model: Callable,
    guide: Callable,
    data: torch.Tensor,
    *,
    num_samples: int = 1000,
    chunk_size: int = 100,
    batch_size: int = 500,
    seed: int | None = 0,
) -> LikelihoodEstimate:
    """Importance-sampling estimate of ``log p(x)`` per data point with ``num_samples`` draws from the guide.

    ``log p(x_n) ~= logsumexp_l [log p(x_n, z_l) - log q(z_l | x_n)] - log L``: the lecture's estimator, which is
    the IWAE bound ``L_k`` of Burda, Grosse & Salakhutdinov (2016) with ``k = L``. Data are taken ``batch_size``
    points at a time and the draws ``chunk_size`` at a time (vectorised in a particle plate left of the model's
    data plate, then combined with a running log-sum-exp), so memory stays at ``chunk_size * batch_size`` data
    points' worth of network activations. Accumulated in float64.

    Parameters
    ----------
    model, guide : callable
        Pyro model and guide called as ``model(batch)``, with one plate over the data points at ``dim=-1`` and
        only local latent variables (a VAE); they must broadcast over a leading particle dimension.
    data : torch.Tensor or numpy.ndarray
        Data points along the first dimension (e.g. binary test images ``(N, h, w)``); an array is converted to
        the guide's dtype and device.
    num_samples : int
        ``L``; 1000 or more for a likelihood table (IWAE's Table 1 used 5000).
    chunk_size : int
        Draws evaluated together.
    batch_size : int
        Data points evaluated together.
    seed : int, optional
        Seed of the draws (the global random state is restored afterwards); ``None`` uses it as it is.

    Returns
    -------
    LikelihoodEstimate
    """
    for label, value in (("num_samples", num_samples), ("chunk_size", chunk_size), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    if isinstance(data, np.ndarray):  # numpy arrays (ppvi.data's images) in the guide's dtype and device
        reference = next(iter(guide.parameters()), None) if isinstance(guide, torch.nn.Module) else None
        data = torch.as_tensor(
            data,
            dtype=reference.dtype if reference is not None else torch.get_default_dtype(),
            device=reference.device if reference is not None else None,
        )
    if not isinstance(data, torch.Tensor) or data.dim() < 1 or data.shape[0] == 0:
        raise ValueError("data must be a tensor or numpy array with the data points along its first dimension")
    state = pyro.util.get_rng_state() if seed is not None else None
    if seed is not None:
        pyro.set_rng_seed(seed)
    try:
        log_likelihoods, elbos = [], []
        for start in range(0, data.shape[0], batch_size):
            batch = data[start : start + batch_size]
            num_points = batch.shape[0]
            running = torch.full((num_points,), -math.inf, dtype=torch.float64, device=batch.device)
            elbo_sum = torch.zeros(num_points, dtype=torch.float64, device=batch.device)
            for first in range(0, num_samples, chunk_size):
                particles = min(chunk_size, num_samples - first)
                with pyro.validation_enabled(False), pyro.plate("_ppvi_particles", particles, dim=-2):
                    guide_sites, model_sites = _run_pair(model, guide, (batch,), {})
                log_weights = _per_point(model_sites, num_points, particles) - _per_point(
                    guide_sites, num_points, particles
                )
                running = torch.logaddexp(running, torch.logsumexp(log_weights, 0))
                elbo_sum = elbo_sum + log_weights.sum(0)
            log_likelihoods.append(running - math.log(num_samples))
            elbos.append(elbo_sum / num_samples)
    finally:
        if state is not None:
            pyro.util.set_rng_state(state)
    per_point = torch.cat(log_likelihoods).cpu()
    per_point_elbo = torch.cat(elbos).cpu()
    return LikelihoodEstimate(float(per_point.mean()), float(per_point_elbo.mean()), per_point, per_point_elbo,
                              num_samples)
