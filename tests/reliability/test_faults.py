"""Faults end in a clear error or a usable result, never in a bare exception or a lost fit: a fully improper
posterior, a corrupt data file, and Ctrl-C during training (which keeps the fit so far, as PyMC's ``pm.fit``)."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import ppvi
from ppvi import training
from ppvi.convergence import StoppingRule

from .normal_model import normal_normal


def _interrupt_at(monkeypatch, step: int) -> None:
    """Make ``training.update`` raise KeyboardInterrupt, as Ctrl-C would, when it is asked for step ``step``."""
    original = training.update

    def update(state, *args, **kwargs):
        if state.step == step:
            raise KeyboardInterrupt
        return original(state, *args, **kwargs)

    monkeypatch.setattr(training, "update", update)


def _no_escape(call):
    try:
        return call()
    except KeyboardInterrupt:  # pragma: no cover - the failure this test exists for; it must not end the session
        pytest.fail("KeyboardInterrupt escaped: the fit so far was lost")


def test_fully_improper_posterior_says_so_and_what_to_do():
    def flat():
        pyro.sample("a", dist.ImproperUniform(dist.constraints.real, (), ()))
        pyro.sample("b", dist.ImproperUniform(dist.constraints.real, (), ()))

    with pytest.raises(ValueError, match=r"does not change with any of its latent sites \['a', 'b'\].*improper.*"
                                         r"proper priors"):
        ppvi.fit(flat, steps=50)


def test_flat_loss_of_a_guide_of_your_own_says_what_is_wrong():
    def flat():
        pyro.sample("a", dist.ImproperUniform(dist.constraints.real, (), ()))

    def guide():
        location = pyro.param("location", torch.tensor(0.0))
        pyro.sample("a", dist.Delta(location.detach()))  # the parameter never reaches the sample site

    with pytest.raises(ValueError, match="does not depend on the parameters being trained.*flat everywhere"):
        ppvi.fit(flat, guide=guide, steps=50)


def test_corrupt_mnist_npz_names_the_file_and_says_to_download_again(tmp_path):
    path = tmp_path / "mnist.npz"
    good = tmp_path / "good.npz"
    np.savez(good, x_train=np.zeros((2, 28, 28), np.uint8), y_train=np.zeros(2, np.uint8),
             x_test=np.zeros((1, 28, 28), np.uint8), y_test=np.zeros(1, np.uint8))
    path.write_bytes(good.read_bytes()[:200])  # a download cut short: a zip without its directory
    with pytest.raises(ValueError, match=r"mnist\.npz is not a readable npz file \(BadZipFile.*download it again"):
        ppvi.data.mnist(path)
    with pytest.raises(ValueError, match=r"mnist\.npz is not a readable npz file.*download it again"):
        ppvi.data.mnist(tmp_path)  # found in a directory: the same words


def test_ctrl_c_during_fit_returns_the_fit_so_far(monkeypatch, y):
    _interrupt_at(monkeypatch, 30)
    fit = _no_escape(lambda: ppvi.fit(normal_normal, y, guide="meanfield", steps=200))
    assert fit.interrupted and not fit.converged
    assert fit.steps == 30 and fit.elbo.shape == (30,) and np.isfinite(fit.elbo).all()
    assert "interrupted (KeyboardInterrupt) at step 30" in fit.message
    assert "converged=False" in repr(fit)
    assert set(fit.sample(10, seed=0)) == {"mu"}  # usable as any fit


def test_ctrl_c_while_stopping_on_the_rule_with_guide_auto_stops_there(monkeypatch, y):
    _interrupt_at(monkeypatch, 20)
    fit = _no_escape(lambda: ppvi.fit(normal_normal, y, guide="auto"))
    assert fit.interrupted and not fit.converged and fit.steps == 20
    assert [attempt.guide for attempt in fit.history] == ["meanfield"]
    assert fit.history[0].verdict == "interrupted"


def test_ctrl_c_in_the_training_loop_keeps_the_completed_steps():
    target = torch.tensor([3.0, -1.0])
    parameter = torch.zeros(2, requires_grad=True)
    calls = {"count": 0}

    def loss():
        calls["count"] += 1
        if calls["count"] == 41:
            raise KeyboardInterrupt
        return ((parameter - target) ** 2).sum()

    result = _no_escape(lambda: training.run(
        loss, [parameter], learning_rate=0.1, rule=StoppingRule(window=20, max_steps=1000)
    ))
    assert result.interrupted_step == 40 and result.steps == 40 and not result.converged
    assert result.losses.shape == (40,) and "interrupted (KeyboardInterrupt) at step 40" in result.message
    assert float(((parameter.detach() - target) ** 2).sum()) < float(result.losses[0])  # it kept the progress
