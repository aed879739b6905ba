"""ppvi.engine: the traced (and compiled) training step takes exactly the Pyro path's steps, and falls back when
a model cannot be traced; ppvi.native: the step written out as C computes what ATen computes, operation by
operation, and the step falls back to replaying its graph where it cannot be written out."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F

import ppvi
from ppvi import engine, native
from ppvi.models import fake_gaussian

needs_compiler = pytest.mark.skipif(native.compiler() is None, reason="no C compiler on the path")


@pytest.fixture
def y() -> torch.Tensor:
    return fake_gaussian.simulate(num_points=50, seed=3).double()


def _fit(model, *args, **options):
    options.setdefault("seed", 11)
    options.setdefault("progress", False)
    options.setdefault("dtype", "float64")
    return ppvi.fit(model, *args, **options)


@pytest.mark.parametrize("guide", ["meanfield", "fullrank", "lowrank"])
def test_traced_step_takes_the_pyro_steps(y, guide):
    """Same seed, same random numbers, same arithmetic: the ELBO traces and the answers agree to rounding."""
    pyro_fit = _fit(fake_gaussian.model, y, guide=guide, steps=300, engine="pyro")
    traced_fit = _fit(fake_gaussian.model, y, guide=guide, steps=300, engine="traced")
    assert pyro_fit.engine == "pyro" and traced_fit.engine == "traced"
    np.testing.assert_allclose(traced_fit.elbo, pyro_fit.elbo, rtol=1e-9, atol=1e-9)
    for (name, expected), (_, actual) in zip(pyro_fit.params.items(), traced_fit.params.items(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9, msg=name)
    pyro_summary, traced_summary = pyro_fit.summary(num_samples=500), traced_fit.summary(num_samples=500)
    np.testing.assert_allclose(traced_summary["mean"], pyro_summary["mean"], rtol=1e-8)


def test_traced_stopping_rule_run_equals_pyro(y):
    """With the stopping rule (stages, averaging), the two engines stop at the same step with the same answer."""
    pyro_fit = _fit(fake_gaussian.model, y, engine="pyro")
    traced_fit = _fit(fake_gaussian.model, y, engine="traced")
    assert traced_fit.steps == pyro_fit.steps and traced_fit.converged == pyro_fit.converged
    np.testing.assert_allclose(traced_fit.elbo, pyro_fit.elbo, rtol=1e-9, atol=1e-9)


def test_auto_engine_traces_a_traceable_model(y):
    assert _fit(fake_gaussian.model, y, steps=20).engine == "traced"


def _dependent_support_model(y):
    alpha = pyro.sample("alpha", dist.Uniform(0.0, 1.0))
    beta = pyro.sample("beta", dist.Uniform(0.0, 1.0 - alpha))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(alpha + beta, 0.5), obs=y)


def test_support_depending_on_a_parameter_is_rebuilt_per_draw_in_the_trace():
    """The trace keeps each site's transform a function of the values drawn before it: same steps as Pyro."""
    y = torch.tensor([0.6, 0.8, 0.7, 0.9], dtype=torch.float64)
    pyro_fit = _fit(_dependent_support_model, y, guide="fullrank", steps=200, engine="pyro")
    traced_fit = _fit(_dependent_support_model, y, guide="fullrank", steps=200, engine="traced")
    assert traced_fit.engine == "traced"
    np.testing.assert_allclose(traced_fit.elbo, pyro_fit.elbo, rtol=1e-9, atol=1e-9)
    draws = traced_fit.sample(2000, seed=0)
    assert bool((draws["beta"] < 1 - draws["alpha"]).all())


def _branching_model(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    scale = 1.0 if mu < 10 else 2.0  # control flow on a sampled value: one trace cannot stand for every draw
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, scale), obs=y)


def test_data_dependent_control_flow_falls_back_to_pyro(y):
    with pytest.warns(ppvi.FitWarning, match="one draw at a time"):
        fitted = _fit(_branching_model, y, num_particles=1, steps=20)
    assert fitted.engine == "pyro"
    assert "engine 'pyro'" in fitted.message and "control flow" in fitted.message


def test_asking_for_the_traced_engine_on_an_untraceable_model_says_why(y):
    with pytest.warns(ppvi.FitWarning, match="one draw at a time"), pytest.raises(
        ValueError, match="engine='traced'.*engine='pyro'"
    ):
        _fit(_branching_model, y, num_particles=1, steps=20, engine="traced")


def _subsampled_model(y, subsample_size=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", y.shape[0], subsample_size=subsample_size) as index:
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y[index])


def test_minibatches_fall_back_to_pyro(y):
    """Subsampling draws fresh indices at every step: a random operation the trace cannot keep."""
    fitted = _fit(_subsampled_model, y, subsample_size=10, steps=20)
    assert fitted.engine == "pyro"


def test_unknown_engine_is_refused(y):
    with pytest.raises(ValueError, match="engine"):
        _fit(fake_gaussian.model, y, steps=5, engine="jit")


@pytest.mark.slow
def test_compiled_step_takes_the_pyro_steps(y):
    """TorchInductor's kernel computes the same step (fused arithmetic: agreement to float64 rounding)."""
    pyro_fit = _fit(fake_gaussian.model, y, guide="fullrank", steps=300, engine="pyro")
    compiled_fit = _fit(fake_gaussian.model, y, guide="fullrank", steps=300, engine="compiled")
    assert compiled_fit.engine == "compiled"
    np.testing.assert_allclose(compiled_fit.elbo, pyro_fit.elbo, rtol=1e-7, atol=1e-7)


# -- the functional Adam -----------------------------------------------------------------------------------------
def test_adam_update_matches_torch_adam():
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(3, generator=generator, dtype=torch.float64), torch.randn(2, 2, generator=generator,
                                                                                   dtype=torch.float64)]
    reference = [tensor.clone().requires_grad_() for tensor in start]
    optimizer = torch.optim.Adam(reference, lr=0.05, eps=1e-3)
    parameters, state = tuple(start), engine.adam_init(start)
    for _ in range(25):
        gradients = [torch.randn(t.shape, generator=generator, dtype=torch.float64) for t in start]
        for tensor, gradient in zip(reference, gradients, strict=True):
            tensor.grad = gradient.clone()
        optimizer.step()
        parameters, state = engine.adam_update(parameters, gradients, state, 0.05, 1e-3)
    for ours, theirs in zip(parameters, reference, strict=True):
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-12, atol=1e-12)


def test_adam_update_with_a_rate_per_replication_equals_separate_optimizers():
    """A batch of M replications with M learning rates and epsilons is M independent Adams."""
    generator = torch.Generator().manual_seed(1)
    rates, epsilons = torch.tensor([0.1, 0.02, 0.3], dtype=torch.float64), torch.tensor([1e-8, 0.1, 1e-3])
    start = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    singles = [start[m].clone().requires_grad_() for m in range(3)]
    optimizers = [torch.optim.Adam([singles[m]], lr=float(rates[m]), eps=float(epsilons[m])) for m in range(3)]
    parameters, state = (start.clone(),), engine.adam_init([start])
    for _ in range(10):
        gradient = torch.randn(3, 4, generator=generator, dtype=torch.float64)
        for m in range(3):
            singles[m].grad = gradient[m].clone()
            optimizers[m].step()
        parameters, state = engine.adam_update(parameters, [gradient], state, rates, epsilons.double())
    torch.testing.assert_close(parameters[0], torch.stack([s.detach() for s in singles]), rtol=1e-12, atol=1e-12)


def test_a_loss_with_another_random_draw_is_not_traceable():
    weight = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    module = torch.nn.Module()
    module.weight = weight

    def loss() -> torch.Tensor:  # a uniform draw: not one of the guide's standard normals
        return ((module.weight - torch.rand(3, dtype=torch.float64)) ** 2).sum()

    with pytest.raises(engine.NotTraceableError, match="random draw"):
        engine.trace_step(loss, module, [weight])


def test_parameters_outside_the_module_are_not_traceable():
    module = torch.nn.Linear(2, 1)
    outside = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(engine.NotTraceableError, match="not the guide's"):
        engine.trace_step(lambda: outside.sum(), module, [outside])


def test_traced_step_writes_the_adam_step_into_the_parameters_in_place():
    """The graph overwrites the parameters and moments it reads: same storage, values of the functional Adam."""
    target = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))

    def loss() -> torch.Tensor:
        return ((module.weight - target) ** 2 * torch.arange(1.0, 4.0, dtype=torch.float64)).sum()

    step = engine.trace_step(loss, module, [module.weight], epsilon=1e-6)
    storage = module.weight.data_ptr()
    parameters, state = (module.weight.detach().clone(),), engine.adam_init([module.weight])
    for learning_rate in (0.1, 0.1, 0.05):
        parameter = parameters[0].clone().requires_grad_()
        gradient = torch.autograd.grad(((parameter - target) ** 2 * torch.arange(1.0, 4.0, dtype=torch.float64)).sum(),
                                       parameter)
        parameters, state = engine.adam_update(parameters, gradient, state, learning_rate, 1e-6)
        step(learning_rate)
    assert module.weight.data_ptr() == storage
    torch.testing.assert_close(module.weight.detach(), parameters[0], rtol=1e-12, atol=1e-12)
    assert step.state.step == 3
    torch.testing.assert_close(step.state.second_moment[0], state.second_moment[0], rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_compiled_step_calls_its_kernel_directly_and_takes_the_adam_steps():
    """After its first call the compiled step calls TorchInductor's kernel past AOTAutograd's wrappers, with the
    graph's lifted constants (here the data) before its inputs: every step, wrapped or direct, is the functional
    Adam's, written in place."""
    data = torch.linspace(-1.0, 2.0, 7, dtype=torch.float64)
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))

    def loss_of(weight: torch.Tensor) -> torch.Tensor:
        return ((data - weight[0]) ** 2).sum() + ((data * weight[1] - 1.0) ** 2).sum()

    step = engine.trace_step(lambda: loss_of(module.weight), module, [module.weight], compile=True)
    parameters, state = (module.weight.detach().clone(),), engine.adam_init([module.weight])
    for learning_rate in (0.1, 0.1, 0.05, 0.05):
        parameter = parameters[0].clone().requires_grad_()
        expected_loss = loss_of(parameter)
        gradient = torch.autograd.grad(expected_loss, parameter)
        parameters, state = engine.adam_update(parameters, gradient, state, learning_rate, 1e-8)
        loss = step(learning_rate)
        torch.testing.assert_close(loss, expected_loss.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(module.weight.detach(), parameters[0], rtol=1e-12, atol=1e-12)
        assert step.calls_kernel_directly  # found on the first call, used from the second
    torch.testing.assert_close(step.state.first_moment[0], state.first_moment[0], rtol=1e-12, atol=1e-12)


def test_a_function_without_a_compiled_kernel_keeps_its_own_call():
    """Where no compiled graph stands behind the function, the step goes through the function itself."""
    value = torch.tensor([1.0, 2.0])
    loss, entry = engine._kernel_entry(lambda x: (x.sum(),), (value,))
    assert entry is None
    assert loss.item() == 3.0


def test_small_linear_algebra_written_out_equals_the_library_calls():
    """The compiled step's elementwise products and substitutions compute what BLAS and LAPACK compute."""
    from torch.fx.experimental.proxy_tensor import make_fx

    generator = torch.Generator().manual_seed(2)

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    lower = torch.tril(draw(2, 4, 4)) + 4 * torch.eye(4, dtype=torch.float64)
    inputs = (draw(3, 4), draw(4, 5), draw(2, 3, 4), draw(4), lower, draw(1, 4, 6))

    def linear_algebra(a, b, batch, vector, triangular, right):
        return (
            a @ b, batch @ b, a @ vector,
            torch.linalg.solve_triangular(triangular, right, upper=False),
            torch.linalg.solve_triangular(triangular.mT, right, upper=True),
            torch.linalg.solve_triangular(triangular, right, upper=False, unitriangular=True),
        )

    graph = make_fx(linear_algebra)(*inputs)
    written_out = engine._inline_small_linear_algebra(graph, list(inputs))
    library_targets = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.mv.default,
                       torch.ops.aten.linalg_solve_triangular.default}
    assert not any(node.target in library_targets for node in written_out.graph.nodes)
    for actual, expected in zip(written_out(*inputs), linear_algebra(*inputs), strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_vector_width_is_set_only_where_the_cpu_has_it():
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    widths = {isa.bit_width() for isa in valid_vec_isa_list()}
    for bits in (128, 256, 512):
        assert engine.vector_width_options(bits) == ({"cpp.simdlen": bits} if bits in widths else {})
    assert engine.vector_width_options(384) == {}  # no instruction set is 384 bits wide


# -- the step written out as C (ppvi.native) -----------------------------------------------------------------------
def _spy_on_trace_step(monkeypatch) -> list:
    """The TracedSteps ``ppvi.fit`` builds, collected as it builds them."""
    built = []
    original = engine.trace_step

    def spy(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(engine, "trace_step", spy)
    return built


@needs_compiler
@pytest.mark.parametrize("guide", ["meanfield", "fullrank"])
def test_the_default_step_runs_as_a_c_kernel_and_says_so(y, guide, monkeypatch):
    built = _spy_on_trace_step(monkeypatch)
    fitted = _fit(fake_gaussian.model, y, guide=guide, steps=60)
    assert fitted.engine == "traced" and built[-1].executor == "C kernel" and built[-1].native_reason == ""
    assert "steps run as one C kernel" in fitted.message and "TorchInductor not used" in fitted.message


def _written_out(function, *inputs: torch.Tensor, differentiate: bool = False):
    """``function`` (tensors -> list of tensors) traced into a step that writes its results into output tensors,
    built as a C kernel (:func:`ppvi.native.build`, which also checks it against the replayed graph) and run:
    the kernel's results, and the results of ``function`` run eagerly. With ``differentiate``, floating inputs
    require gradients while it runs (for functions that call ``torch.autograd.grad``)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    inputs = [x.detach().clone() for x in inputs]

    def run(*arguments):
        with torch.enable_grad():
            if differentiate:
                arguments = [a.requires_grad_() if a.is_floating_point() else a for a in arguments]
            return [value.detach() for value in function(*arguments)]

    expected = run(*[x.clone() for x in inputs])
    outputs = [torch.full(e.shape, math.nan if e.is_floating_point() else 0, dtype=e.dtype) for e in expected]

    def step(*arguments):
        for target, value in zip(arguments[len(inputs) :], run(*arguments[: len(inputs)]), strict=True):
            target.copy_(value)
        return (torch.zeros((), dtype=torch.float64),)

    graph = make_fx(step)(*[x.clone() for x in inputs], *[o.clone() for o in outputs])
    live = [*inputs, *outputs]
    kernel = native.build(graph, live, [t.clone() for t in live])
    assert kernel() == 0.0
    return outputs, expected


_generator = torch.Generator().manual_seed(0)


def _normal(*shape, dtype=torch.float64, scale=1.0):
    return torch.randn(*shape, generator=_generator, dtype=dtype) * scale


def _positive(*shape):
    return _normal(*shape).abs() + 0.1


_EDGES = torch.tensor([0.0, -0.0, 1.5, -2.5, math.nan, math.inf, -math.inf, 25.0, -30.0, 1e-12], dtype=torch.float64)

#: Functions whose ATen operations the C kernel must compute as ATen does: every family of ``ppvi.native``'s table,
#: with the branches of their formulas (softplus's threshold, lerp's weight above 0.5, NaN in extrema and clamps,
#: infinite maxima in logsumexp, negative and integer arguments of digamma) and their backward operations.
WRITTEN_OUT = {
    "elementwise": (lambda x, y, e, w, special: [
        *(f(x) for f in (torch.exp, torch.expm1, torch.sin, torch.cos, torch.tanh, torch.sigmoid, torch.erf,
                         torch.erfc, torch.floor, torch.ceil, torch.trunc, torch.round, torch.sign, torch.relu,
                         torch.neg, torch.abs, torch.atan, torch.asinh)),
        *(f(x.abs() + 0.1) for f in (torch.log, torch.log1p, torch.sqrt, torch.rsqrt, torch.reciprocal, torch.lgamma,
                                     torch.digamma, torch.log2)),
        *(f(special) for f in (torch.exp, torch.sigmoid, torch.relu, torch.sign, torch.floor, F.softplus,
                               lambda v: F.softplus(v, beta=2, threshold=5), torch.digamma, torch.lgamma)),
        torch.add(x, y, alpha=2.5), torch.sub(x, y, alpha=0.5), x * y, x / y, torch.rsub(x, 3.0, alpha=2),
        torch.atan2(x, y), torch.remainder(x, y), torch.fmod(x, y), torch.div(x, y, rounding_mode="trunc"),
        torch.maximum(special, special.flip(0)), torch.minimum(special, special.flip(0)),
        torch.clamp(special, -1.0, 1.0), torch.clamp(special, min=0.5), torch.clamp(x, y, y + 1),
        torch.xlogy(special.clamp(min=0).nan_to_num(0.0), special), torch.special.xlog1py(x[0].abs(), special),
        x.abs() ** 2, x.abs() ** 3, x.abs() ** 0.5, x.abs() ** -0.5, x ** -1, x ** -2, x.abs() ** 1.7, x.abs() ** e,
        2.0 ** e, torch.lerp(x, y, 0.1), torch.lerp(x, y, 0.7), torch.lerp(x[0], y, w),
        x > y, x >= 0.5, x == y, x != 0.0, torch.logical_and(x > 0, y > 0), torch.logical_or(x > 0, y > 0),
        torch.logical_not(x > 0), torch.where(x > y, x, y), torch.where(x > 0, x, 0.0), x.masked_fill(x > 0, 7.0),
        torch.isnan(special), torch.nan_to_num(special), torch.nan_to_num(special, 1.0, 2.0, -3.0),
        x.to(torch.float32) * 2, (x > 0).long() * 3 + 1,
    ], (_normal(3, 5, scale=3), _normal(5), _normal(3, 5), torch.tensor([0.0, 0.3, 0.5, 0.9, -0.6],
                                                                      dtype=torch.float64),
        torch.cat([_EDGES[:5], torch.tensor([-1.0, -2.0, 0.3, 10.0, 1e18], dtype=torch.float64)]).reshape(2, 5))),
    "views and constructions": (lambda x: [
        x.t() * 1, x.reshape(-1)[2:9:3] * 1, x.view(2, 6).T.reshape(3, 4) * 1, x.unsqueeze(0).expand(2, 3, 4) + 0,
        x[1] * 1, x[:, -1] * 1, x[-2:, 1:3] * 1, x.diagonal() * 1, x.diagonal(1) * 1, x.diagonal(-1) * 1,
        x.flip(0, 1), x.permute(1, 0).contiguous(), *x.split(1, dim=0), *x.unbind(1), x.T.reshape(12),
        torch.cat([x, 2 * x], dim=1), torch.stack([x, x + 1], dim=1), torch.tril(x), torch.triu(x, 1),
        torch.diag_embed(x), torch.diag_embed(x[0], offset=1), torch.eye(3, dtype=x.dtype) + x[:, :3],
        torch.arange(4, dtype=x.dtype) * x, torch.arange(1, 9, 2) + 0, torch.full((2, 3), 2.5, dtype=x.dtype),
        torch.zeros_like(x) + 1, x.new_full((2,), -1.0), x.clone().masked_fill_(x > 0, 1.0),
        (lambda z: (z.diagonal().add_(1.0), z)[1])(x.clone()), x.clone().mul_(x).exp_(),
    ], (_normal(3, 4),)),
    "reductions": (lambda x, special: [
        x.sum(), x.sum(0), x.sum((0, 2), keepdim=True), x.mean(), x.mean(-1), x.prod(1), x.amax(0), x.amin((1, 2)),
        x.max(), torch.logsumexp(x, 1), torch.logsumexp(x, (0, 2), keepdim=True), torch.linalg.vector_norm(x),
        torch.linalg.vector_norm(x, dim=1), x.cumsum(1), (x > 0).any(), (x > 0).all(1), (x > 0).sum(),
        torch.log_softmax(x, 1), torch.softmax(x, 0), special.amax(1), special.amin(1), torch.logsumexp(special, 1),
    ], (_normal(2, 3, 4), torch.tensor([[1.0, math.nan, 2.0], [-math.inf, -math.inf, -math.inf], [math.inf, 1.0, 0.0]],
                                       dtype=torch.float64))),
    "linear algebra and indexing": (lambda a, b, v, c, lower, i, j: [
        a @ b, torch.bmm(c, c.mT), a @ v, v @ v, torch.addmm(v[:3], a, b[:, :3], beta=0.5, alpha=2.0),
        torch.linalg.solve_triangular(lower, b[:, :3].expand(2, 4, 3), upper=False),
        torch.linalg.solve_triangular(lower.mT, b[:, :3], upper=True),
        torch.linalg.solve_triangular(lower, b[:, :3], upper=False, unitriangular=True),
        torch.linalg.cholesky(lower @ lower.mT), torch.linalg.cholesky(lower @ lower.mT, upper=True),
        b.index_select(1, i), b.gather(1, j), b[:, i], b[i - 1], torch.zeros(5, 5, dtype=a.dtype).index_add(0, i, b[:3],
                                                                                                          alpha=2.0),
        torch.zeros(4, 5, dtype=a.dtype).index_put((i,), b[0], accumulate=True),
    ], (_normal(3, 4), _normal(4, 5), _normal(4), _normal(2, 3, 3), torch.tril(_normal(2, 4, 4)) + 3 * torch.eye(4,
        dtype=torch.float64), torch.tensor([2, 0, 2]), torch.tensor([[0, 4], [1, 1], [3, 2], [2, 2]]))),
    "losses and scatters": (lambda x, t, i, w, ties: [
        F.binary_cross_entropy_with_logits(x, t, reduction="none"), F.binary_cross_entropy_with_logits(x, t),
        F.binary_cross_entropy_with_logits(x, t, weight=w, pos_weight=w + 1, reduction="sum"), F.logsigmoid(x),
        (x > 0) & (t > 0.5), (x > 0) | (t > 0.5), torch.zeros(3, 4, dtype=x.dtype).scatter_add(0, i, x[:2]),
        torch.zeros(3, 4, dtype=x.dtype).scatter(0, i, x[:2]), torch.zeros(3, 4, dtype=x.dtype).scatter_(1, i, -1.0),
        x.cumprod(1), *x.max(1), *x.min(0), *ties.max(1), *ties.min(1),
    ], (_normal(3, 4), torch.rand(3, 4, generator=_generator, dtype=torch.float64), torch.tensor([[0, 2, 1, 0],
                                                                                                  [2, 2, 0, 1]]),
        _positive(4), torch.tensor([[1.0, 3.0, 3.0], [2.0, math.nan, 5.0], [math.nan, 1.0, math.nan]],
                                   dtype=torch.float64))),
    "float32": (lambda x, y: [
        torch.exp(x) * y[0], torch.log_softmax(x, 0), x.sum(), torch.lgamma(x.abs() + 1), F.softplus(x), x @ y.T,
        torch.digamma(x.abs() + 0.5),
    ], (_normal(4, 3, dtype=torch.float32), _normal(2, 3, dtype=torch.float32))),
}
#: Gradients through the operations above: their backward operations (softplus_backward, slice_backward, index_put
#: with accumulation, _log_softmax_backward_data...), as a traced step computes them.
DIFFERENTIATED = {
    "elementwise backward": (lambda x: [torch.autograd.grad(
        (F.softplus(x, beta=2, threshold=5) + torch.sigmoid(x) * torch.tanh(x) + torch.relu(x)).sum(), x)[0]],
        (torch.tensor([0.0, 1.5, -2.5, 25.0, -30.0, 2.4, 2.6], dtype=torch.float64),)),
    "reduction and view backward": (lambda x, i: [torch.autograd.grad(
        (torch.log_softmax(x, 1) * torch.arange(4.0, dtype=x.dtype)).sum() + torch.softmax(x, 0)[0].sum()
        + (x[1] * 2).sum() + (x[:, 1:3] ** 2).sum() + x[:4].diagonal().exp().sum() + torch.diag_embed(x[0]).sum()
        + (x[i] * torch.arange(12.0, dtype=x.dtype).reshape(3, 4)).sum() + x.index_select(0, i).pow(2).sum()
        + (torch.lgamma(x.abs() + 1) + x.cumsum(0) * x).sum() + torch.logsumexp(x, 0).sum(), x)[0]],
        (_normal(5, 4), torch.tensor([1, 3, 1]))),
    "loss backward": (lambda x, t: [torch.autograd.grad(
        F.binary_cross_entropy_with_logits(x, t) + F.logsigmoid(x).sum() + x.cumprod(1).sum()
        + x.gather(1, torch.tensor([[0], [2], [1]])).sum() + x.max(1)[0].sum(), x)[0]],
        (_normal(3, 4), torch.rand(3, 4, generator=_generator, dtype=torch.float64))),
    "linear algebra backward": (lambda a, b: [*torch.autograd.grad(
        torch.linalg.solve_triangular(torch.tril(a) + 3 * torch.eye(3, dtype=a.dtype), b, upper=False).pow(2).sum()
        + (a @ b).sum(), (a, b))], (_normal(3, 3), _normal(3, 2))),
}


@needs_compiler
@pytest.mark.parametrize("name", [*WRITTEN_OUT, *DIFFERENTIATED])
def test_the_c_kernel_computes_what_aten_computes(name):
    function, inputs = {**WRITTEN_OUT, **DIFFERENTIATED}[name]
    actual, expected = _written_out(function, *inputs, differentiate=name in DIFFERENTIATED)
    for position, (ours, aten) in enumerate(zip(actual, expected, strict=True)):
        if aten.is_floating_point():
            tolerance = 1e-5 if aten.dtype == torch.float32 else 1e-12
            torch.testing.assert_close(ours, aten, rtol=tolerance, atol=tolerance, equal_nan=True,
                                       msg=lambda text, k=position: f"result {k}: {text}")
        else:
            assert torch.equal(ours, aten), f"result {position}"


@needs_compiler
def test_a_failed_cholesky_in_the_kernel_raises_as_aten_does():
    """The kernel's check of a factorisation: a matrix that stops being positive-definite raises LinAlgError."""
    from torch.fx.experimental.proxy_tensor import make_fx

    matrix, factor = torch.eye(3, dtype=torch.float64) * 2, torch.zeros(3, 3, dtype=torch.float64)

    def step(matrix, factor):
        factor.copy_(torch.linalg.cholesky(matrix))
        return (factor.sum(),)

    kernel = native.build(make_fx(step)(matrix.clone(), factor.clone()), [matrix, factor],
                          [matrix.clone(), factor.clone()])
    assert kernel() == pytest.approx(3 * math.sqrt(2))
    matrix[2, 2] = -1.0
    with pytest.raises(torch.linalg.LinAlgError, match="order 3 is not positive-definite"):
        kernel()
    matrix[2, 2] = 4.0
    assert kernel() == pytest.approx(2 * math.sqrt(2) + 2)  # the failed check left nothing behind


@needs_compiler
def test_constants_are_folded_and_repeated_terms_computed_once():
    from torch.fx.experimental.proxy_tensor import make_fx

    data = torch.linspace(0.0, 1.0, 5, dtype=torch.float64)

    def step(x):
        first = (x.exp() * (data * 2 + torch.eye(5, dtype=x.dtype).sum(0))).sum()
        return ((first + x.exp().sum()) * 1.0,)

    graph = make_fx(step)(torch.zeros(5, dtype=torch.float64))
    expected = graph(torch.full((5,), 0.3, dtype=torch.float64))[0]
    assert native.simplify(graph) >= 4  # eye, sum, mul, add folded; the second exp merged with the first
    targets = [node.target for node in graph.graph.nodes if node.op == "call_function"]
    assert torch.ops.aten.eye.default not in targets and targets.count(torch.ops.aten.exp.default) == 1
    torch.testing.assert_close(graph(torch.full((5,), 0.3, dtype=torch.float64))[0], expected, rtol=1e-15, atol=0)


def _distribution_model(family: str):
    """A two-parameter model whose likelihood is ``family``'s: each brings its own operations into the step."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(30, generator=generator, dtype=torch.float64)
    counts = torch.poisson(torch.full((30,), 2.0, dtype=torch.float64), generator=generator)
    unit = torch.rand(30, generator=generator, dtype=torch.float64) * 0.9 + 0.05

    def model():
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        b = pyro.sample("b", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", 30):
            if family == "bernoulli":
                pyro.sample("y", dist.Bernoulli(logits=a + b * x), obs=(x > 0.3).double())
            elif family == "gamma":
                pyro.sample("y", dist.Gamma(b + 0.5, a.exp()), obs=unit)
            elif family == "negative binomial":
                pyro.sample("y", dist.NegativeBinomial(b + 1, logits=a), obs=counts)
            elif family == "categorical":
                pyro.sample("y", dist.Categorical(logits=torch.stack([a * x, b * x, 0 * x], -1)),
                            obs=counts.clamp(max=2).long())

    return model


@needs_compiler
@pytest.mark.parametrize("family", ["bernoulli", "gamma", "negative binomial", "categorical"])
def test_likelihoods_of_other_families_run_as_c_kernels_and_take_the_pyro_steps(family, monkeypatch):
    built = _spy_on_trace_step(monkeypatch)
    pyro_fit = _fit(_distribution_model(family), guide="fullrank", steps=200, engine="pyro")
    traced_fit = _fit(_distribution_model(family), guide="fullrank", steps=200, engine="traced")
    assert built[-1].executor == "C kernel", built[-1].native_reason
    np.testing.assert_allclose(traced_fit.elbo, pyro_fit.elbo, rtol=1e-9, atol=1e-9)


def _cumulative_product_loss(module: torch.nn.Module):
    data = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)

    def loss() -> torch.Tensor:  # a cumulative maximum: an operation the C kernel does not write out
        return ((torch.cummax(module.weight, 0).values * module.weight - data) ** 2).sum()

    return loss


def test_an_operation_outside_the_c_table_replays_the_graph_and_takes_the_adam_steps():
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.full((3,), 0.9, dtype=torch.float64))
    loss = _cumulative_product_loss(module)
    step = engine.trace_step(loss, module, [module.weight], epsilon=1e-6)
    assert step.executor == "ATen replay" and "cummax" in step.native_reason
    parameters, state = (module.weight.detach().clone(),), engine.adam_init([module.weight])
    for learning_rate in (0.1, 0.05, 0.05):
        parameter = parameters[0].clone().requires_grad_()
        data = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)
        gradient = torch.autograd.grad(((torch.cummax(parameter, 0).values * parameter - data) ** 2).sum(), parameter)
        parameters, state = engine.adam_update(parameters, gradient, state, learning_rate, 1e-6)
        step(learning_rate)
    torch.testing.assert_close(module.weight.detach(), parameters[0], rtol=1e-12, atol=1e-12)


def test_without_the_kernel_the_step_replays_its_graph(monkeypatch):
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    step = engine.trace_step(lambda: (module.weight - 1.0).pow(2).sum(), module, [module.weight],
                             native_kernel=False)
    assert step.executor == "ATen replay" and step.native_reason == "the C kernel was not asked for"
    assert isinstance(step(0.1), torch.Tensor)


def test_auto_compiles_only_where_the_planned_steps_pay_back_the_compilation(monkeypatch):
    """The break-even: a replayed step (about a millisecond) saves about that much per step once compiled, so
    ``compile="auto"`` compiles for more steps than ``INDUCTOR_COMPILE_SECONDS`` over the saving, never for a run
    stopped by its rule, and never where the step is already no slower than a compiled one."""
    compiled = []
    monkeypatch.setattr(engine.TracedStep, "_compile", lambda self: compiled.append(self))
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.full((3,), 0.9, dtype=torch.float64))
    step = engine.trace_step(_cumulative_product_loss(module), module, [module.weight], compile="auto")
    monkeypatch.setattr(step, "_seconds_per_call", lambda: 1e-3)
    break_even = engine.INDUCTOR_COMPILE_SECONDS / (1e-3 - engine.INDUCTOR_CALL_SECONDS)
    note = step.plan(int(break_even) - 1)
    assert not compiled and "TorchInductor not used" in note and f"{break_even:,.0f} steps" in note
    assert "TorchInductor not used" in step.plan(None) and "stopped by its rule plans none" in step.note
    assert not compiled
    note = step.plan(int(break_even) + 1)
    assert compiled == [step] and note.endswith(f"after about {break_even:,.0f}")
    monkeypatch.setattr(step, "_seconds_per_call", lambda: engine.INDUCTOR_CALL_SECONDS / 2)
    assert "would be no faster" in step.plan(10**9) and len(compiled) == 1
    explicit = engine.trace_step(_cumulative_product_loss(module), module, [module.weight])
    assert "TorchInductor" not in explicit.plan(10**9) and not compiled[1:]  # engine="traced": never compiled


@needs_compiler
def test_kernels_are_cached_on_disk_by_their_source(monkeypatch, tmp_path):
    monkeypatch.setenv("PPVI_CACHE_DIR", str(tmp_path))
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))

    def build(target: float) -> engine.TracedStep:
        data = torch.full((4,), target, dtype=torch.float64)
        return engine.trace_step(lambda: ((module.weight - data) ** 2).sum(), module, [module.weight])

    first, second = build(1.0), build(2.0)  # other data, same shapes: the same source
    assert first.executor == second.executor == "C kernel"
    assert not first._kernel.cached and second._kernel.cached
    assert len(list((tmp_path / "native").glob("step-*.so"))) == 1
    first(0.1), second(0.1)
    torch.testing.assert_close(module.weight.detach(), torch.full((4,), 0.2, dtype=torch.float64), rtol=0,
                               atol=1e-8)  # two Adam steps of 0.1 towards the data (less Adam's epsilon's share)


def test_a_failure_of_the_generator_itself_replays_the_graph_rather_than_failing_the_fit(y, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("an argument the generator did not expect")

    monkeypatch.setattr(native, "build", broken)
    built = _spy_on_trace_step(monkeypatch)
    pyro_fit = _fit(fake_gaussian.model, y, guide="fullrank", steps=100, engine="pyro")
    traced_fit = _fit(fake_gaussian.model, y, guide="fullrank", steps=100, engine="traced")
    assert built[-1].executor == "ATen replay" and "KeyError" in built[-1].native_reason
    assert "no C kernel: the C kernel could not be built (KeyError" in traced_fit.message
    np.testing.assert_allclose(traced_fit.elbo, pyro_fit.elbo, rtol=1e-9, atol=1e-9)
