"""ppvi.engine: the traced (and compiled) training step takes exactly the Pyro path's steps, and falls back when
a model cannot be traced."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import ppvi
from ppvi import engine
from ppvi.models import fake_gaussian


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
    fitted = _fit(_branching_model, y, num_particles=1, steps=20)
    assert fitted.engine == "pyro"
    assert "engine 'pyro'" in fitted.message and "control flow" in fitted.message


def test_asking_for_the_traced_engine_on_an_untraceable_model_says_why(y):
    with pytest.raises(ValueError, match="engine='traced'.*engine='pyro'"):
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
