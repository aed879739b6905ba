"""Property-based tests (hypothesis) of the constraint transforms ppvi relies on.

Every ppvi guide works in unconstrained coordinates and maps them onto each latent site's support with
``torch.distributions.biject_to(site["fn"].support)``, adding its log-abs-det-Jacobian to the ELBO;
:func:`ppvi.initialization.init_to_feasible_point` starts a site at ``biject_to(support)(0)``. Wrong round trips,
Jacobians or supports would bias every fit silently, so, for the supports of the models here (real, positive,
unit interval, interval(a, b), simplex, ordered vector, Cholesky factor of a correlation matrix):

* the inverse of the forward map returns the input, and the forward map lands in the support
  (``constraint.check``);
* ``log_abs_det_jacobian`` is the log determinant of the Jacobian, by autograd (and central finite differences
  for the elementwise transforms), of the map onto the free coordinates of the support;
* ``init_to_feasible_point`` gives a value of the site's shape, in its support, that maps back to 0.

``lower_cholesky`` has no ``biject_to`` in torch (``NotImplementedError``): only ``transform_to``'s
``LowerCholeskyTransform``, which is not a bijection (it drops the strict upper triangle) and has no
``log_abs_det_jacobian``. So a site whose support is ``lower_cholesky`` (e.g. ``ImproperUniform``) cannot be fitted
by ppvi; the tests below hold ``transform_to``'s map to what it does promise.

Everything is float64; examples are derandomised, so the suite draws the same ones on every run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pyro.distributions as dist
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pyro.distributions import constraints
from torch.autograd.functional import jacobian
from torch.distributions import biject_to, transform_to

from ppvi.initialization import init_to_feasible_point

#: Settings of every property here: few examples, no deadline (the first call pays torch's warm-up), the same
#: examples on every run, and no example database written to the checkout.
PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None)
#: Unconstrained inputs are drawn from [-BOUND, BOUND]: far into the tails of a sigmoid (whose slope at 8 is
#: 3e-4), not so far that float64 rounds the constrained value onto the boundary.
BOUND = 8.0
#: Round trips through a sigmoid near the bound lose about eps / slope ~ 1e-12 (1e-10 with an interval's scale).
ROUND_TRIP = 1e-8
#: Autograd and the closed-form log-abs-det-Jacobian differ by rounding only.
AUTOGRAD = 1e-9
#: Central differences with step 1e-6: truncation ~1e-12, rounding ~eps / 1e-6 relative to the derivative.
FINITE_DIFFERENCE_STEP = 1e-6
FINITE_DIFFERENCE = 1e-5


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Make ``dtype`` torch's default inside the block (hypothesis examples cannot take a function fixture)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def unconstrained(shape: tuple[int, ...], bound: float = BOUND) -> st.SearchStrategy[torch.Tensor]:
    """float64 tensors of ``shape`` with entries in ``[-bound, bound]``."""
    elements = st.floats(-bound, bound, allow_nan=False, allow_infinity=False)
    return hnp.arrays(np.float64, shape, elements=elements).map(torch.from_numpy)


def intervals() -> st.SearchStrategy[constraints.Constraint]:
    """``interval(a, b)`` with ``|a| <= 100`` and width between 0.5 and 100."""

    def interval(low: float, width: float) -> constraints.Constraint:
        return constraints.interval(low, low + width)

    return st.builds(interval, st.floats(-100.0, 100.0), st.floats(0.5, 100.0))


#: The elementwise supports (event dimension 0), as strategies.
ELEMENTWISE = st.one_of(
    st.just(constraints.real), st.just(constraints.positive), st.just(constraints.unit_interval), intervals()
)


def strictly_lower(matrix: torch.Tensor) -> torch.Tensor:
    """The entries below the diagonal, row by row (the free coordinates of a correlation Cholesky factor)."""
    rows, columns = torch.tril_indices(matrix.shape[-1], matrix.shape[-1], -1)
    return matrix[..., rows, columns]


def all_but_last(vector: torch.Tensor) -> torch.Tensor:
    """The first ``K - 1`` coordinates (the free coordinates of a point of the ``K``-simplex)."""
    return vector[..., :-1]


#: Vector supports: name -> (constraint, event size of the unconstrained input from the drawn size, the free
#: coordinates of a constrained value, in which the Jacobian is square).
VECTOR_SUPPORTS: dict[str, tuple[constraints.Constraint, Callable[[int], int], Callable[[torch.Tensor], torch.Tensor]]]
VECTOR_SUPPORTS = {
    "simplex": (constraints.simplex, lambda size: size - 1, all_but_last),
    "ordered_vector": (constraints.ordered_vector, lambda size: size, lambda value: value),
    "corr_cholesky": (constraints.corr_cholesky, lambda size: size * (size - 1) // 2, strictly_lower),
}


@PROPERTY_SETTINGS
@given(constraint=ELEMENTWISE, x=st.integers(1, 6).flatmap(lambda size: unconstrained((size,))))
def test_elementwise_transforms_invert_land_in_the_support_and_have_the_right_jacobian(constraint, x):
    transform = biject_to(constraint)
    y = transform(x)

    assert y.dtype == torch.float64 and y.shape == x.shape
    assert constraint.check(y).all()
    np.testing.assert_allclose(transform.inv(y).numpy(), x.numpy(), rtol=0, atol=ROUND_TRIP)

    # Elementwise: the Jacobian is diagonal, its entries dy_i / dx_i.
    log_det = transform.log_abs_det_jacobian(x, y)
    assert log_det.shape == x.shape
    point = x.clone().requires_grad_(True)
    (derivative,) = torch.autograd.grad(transform(point).sum(), point)
    np.testing.assert_allclose(log_det.numpy(), derivative.abs().log().numpy(), rtol=0, atol=AUTOGRAD)
    step = FINITE_DIFFERENCE_STEP
    difference = (transform(x + step) - transform(x - step)) / (2 * step)
    np.testing.assert_allclose(log_det.numpy(), difference.abs().log().numpy(), rtol=0, atol=FINITE_DIFFERENCE)


@st.composite
def vector_cases(draw: st.DrawFn) -> tuple[str, torch.Tensor]:
    """A vector support's name and a batch of 1 to 3 unconstrained points for it."""
    name = draw(st.sampled_from(sorted(VECTOR_SUPPORTS)))
    _, input_size, _ = VECTOR_SUPPORTS[name]
    size = draw(st.integers(2, 4) if name == "corr_cholesky" else st.integers(2, 6))
    batch = draw(st.integers(1, 3))
    # Within +-3, tanh and the stick-breaking sigmoids keep the correlations and proportions off their boundary.
    return name, draw(unconstrained((batch, input_size(size)), bound=3.0))


@PROPERTY_SETTINGS
@given(case=vector_cases())
def test_vector_transforms_invert_land_in_the_support_and_have_the_right_jacobian(case):
    name, x = case
    constraint, _, free_coordinates = VECTOR_SUPPORTS[name]
    transform = biject_to(constraint)
    y = transform(x)

    assert y.dtype == torch.float64
    assert constraint.check(y).all()
    np.testing.assert_allclose(transform.inv(y).numpy(), x.numpy(), rtol=0, atol=ROUND_TRIP)

    log_det = transform.log_abs_det_jacobian(x, y)
    assert log_det.shape == x.shape[:1]
    for row, point in enumerate(x):
        matrix = jacobian(lambda z: free_coordinates(transform(z)), point)
        assert matrix.shape == (len(point), len(point))  # the free coordinates: a square Jacobian
        _, expected = torch.linalg.slogdet(matrix)
        np.testing.assert_allclose(log_det[row].item(), expected.item(), rtol=0, atol=AUTOGRAD)


@PROPERTY_SETTINGS
@given(x=st.integers(1, 5).flatmap(lambda size: unconstrained((size, size))))
def test_lower_cholesky_transform_keeps_the_lower_triangle_and_lands_in_the_support(x):
    transform = transform_to(constraints.lower_cholesky)
    y = transform(x)

    assert constraints.lower_cholesky.check(y).all()
    # Not a bijection: the strict upper triangle of the input is dropped, the diagonal goes through exp.
    lower = x.tril(-1) + torch.diag_embed(x.diagonal())
    np.testing.assert_allclose(transform.inv(y).numpy(), lower.numpy(), rtol=0, atol=ROUND_TRIP)
    np.testing.assert_allclose(transform(transform.inv(y)).numpy(), y.numpy(), rtol=1e-12, atol=0)


#: Supports with a bijection, for init_to_feasible_point: strategies of (constraint, event shape).
FEASIBLE_SUPPORTS = st.one_of(
    ELEMENTWISE.map(lambda constraint: (constraint, ())),
    st.integers(1, 5).map(lambda size: (constraints.simplex, (size,))),
    st.integers(1, 5).map(lambda size: (constraints.ordered_vector, (size,))),
    st.integers(2, 4).map(lambda size: (constraints.corr_cholesky, (size, size))),
)


@PROPERTY_SETTINGS
@given(support=FEASIBLE_SUPPORTS, batch_shape=st.lists(st.integers(1, 3), max_size=2).map(tuple))
def test_init_to_feasible_point_is_the_image_of_zero_in_the_support(support, batch_shape):
    constraint, event_shape = support
    # A flat prior, which cannot be sampled: the case init_to_feasible_point exists for.
    site = {"fn": dist.ImproperUniform(constraint, batch_shape, event_shape)}
    with default_dtype(torch.float64):
        value = init_to_feasible_point(site)

    assert value.dtype == torch.float64 and value.shape == batch_shape + event_shape
    assert constraint.check(value).all()
    transform = biject_to(constraint)
    zero = transform.inv(value)
    assert zero.shape == transform.inverse_shape(value.shape)
    np.testing.assert_allclose(zero.numpy(), 0.0, rtol=0, atol=1e-12)
    assert init_to_feasible_point() is init_to_feasible_point  # the strategy, for a guide's init_loc_fn
