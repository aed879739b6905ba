"""Data-parallel training (ppvi.data_parallel) against a single process trained on the concatenated minibatches.

The reference below is independent of Pyro, of AmortizedELBO and of the training loop: the VAE's negative ELBO
written out by hand (summed cross-entropy plus the closed-form Gaussian KL, scaled by N over the batch size) on
the concatenation of the ranks' minibatches, with the concatenation of the ranks' noise, and plain (unfused)
Adam. What it shares with ppvi.data_parallel is the contract: which indices and which seeds each rank uses
(rank_indices, noise_seed), and ppvi.fit's rule for averaging the last iterates.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys

import pytest
import torch

from ppvi import data_parallel
from ppvi.amortized import AmortizedELBO
from ppvi.convergence import StoppingRule
from ppvi.models import vae as vae_module
from ppvi.models.vae import VAE
from ppvi.result import NonFiniteELBOError

NUM_IMAGES, IMAGE_SHAPE, LATENT_DIM, HIDDEN_DIM = 24, (4, 5), 2, 8
WORLD_SIZE, BATCH_SIZE, STEPS, LEARNING_RATE, SEED = 2, 3, 6, 0.01, 7


@pytest.fixture
def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.bernoulli(torch.full((NUM_IMAGES, *IMAGE_SHAPE), 0.3), generator=generator)


def small_vae(dtype: torch.dtype) -> VAE:
    torch.manual_seed(0)
    return VAE(IMAGE_SHAPE, latent_dim=LATENT_DIM, hidden_dim=HIDDEN_DIM).to(dtype)


def single_process_reference(vae: VAE, images: torch.Tensor, world_size: int, batch_size: int, steps: int,
                             learning_rate: float, seed: int):
    """One process, each step on the concatenation of the ranks' minibatches: (averaged parameters, ELBO trace)."""
    vae = copy.deepcopy(vae)
    images = images.to(next(vae.parameters()).dtype)
    num_images = images.shape[0]
    optimizer = torch.optim.Adam(vae.parameters(), lr=learning_rate)
    averaged_steps = min(StoppingRule.window, steps // 2)
    elbos, iterates = [], []
    for step in range(steps):
        indices = torch.cat([data_parallel.rank_indices(num_images, batch_size, world_size, rank, step, seed)
                             for rank in range(world_size)])
        noise = []
        for rank in range(world_size):
            torch.manual_seed(data_parallel.noise_seed(seed, rank, step))
            noise.append(torch.empty(batch_size, vae.latent_dim, dtype=images.dtype).normal_())
        batch = images[indices]
        loc, scale = vae.encode(batch)
        latent = loc + scale * torch.cat(noise)
        reconstruction = torch.nn.functional.binary_cross_entropy_with_logits(vae.decoder(latent), batch,
                                                                              reduction="sum")
        kl = 0.5 * (loc.square() + scale.square() - 1.0 - 2.0 * scale.log()).sum()
        loss = num_images / indices.shape[0] * (reconstruction + kl)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        elbos.append(-float(loss.detach()))
        if step >= steps - averaged_steps:
            iterates.append({name: value.detach().clone() for name, value in vae.state_dict().items()})
    average = {name: torch.stack([iterate[name] for iterate in iterates]).mean(0) for name in iterates[0]}
    return average, torch.tensor(elbos, dtype=torch.float64)


# -- the minibatch and noise contract (no processes) -----------------------------------------------------------
def test_rank_minibatches_are_disjoint_reproducible_slices_of_one_random_subset():
    for step in range(3):
        ranks = [data_parallel.rank_indices(NUM_IMAGES, BATCH_SIZE, 4, rank, step, SEED) for rank in range(4)]
        together = torch.cat(ranks)
        assert torch.equal(together, data_parallel.world_indices(NUM_IMAGES, BATCH_SIZE, 4, step, SEED))
        assert together.unique().numel() == 4 * BATCH_SIZE  # disjoint
        assert together.min() >= 0 and together.max() < NUM_IMAGES
        assert torch.equal(ranks[1], data_parallel.rank_indices(NUM_IMAGES, BATCH_SIZE, 4, 1, step, SEED))
    assert not torch.equal(data_parallel.world_indices(NUM_IMAGES, 6, 2, 0, SEED),
                           data_parallel.world_indices(NUM_IMAGES, 6, 2, 1, SEED))
    assert not torch.equal(data_parallel.world_indices(NUM_IMAGES, 6, 2, 0, SEED),
                           data_parallel.world_indices(NUM_IMAGES, 6, 2, 0, SEED + 1))
    seeds = {data_parallel.noise_seed(SEED, rank, step) for rank in range(3) for step in range(3)}
    assert len(seeds) == 9


# -- two gloo processes against one ----------------------------------------------------------------------------
def test_two_gloo_processes_equal_one_process_on_the_concatenated_minibatches(images):
    vae = small_vae(torch.float64)
    initial = copy.deepcopy(vae.state_dict())
    fit = data_parallel.launch(
        WORLD_SIZE, vae.model, vae, images, batch_size=BATCH_SIZE, steps=STEPS, learning_rate=LEARNING_RATE,
        seed=SEED, backend="gloo", dtype=torch.float64, threads_per_process=1,
        check_interval=2,  # several joint checks in a short run
    )
    reference_parameters, reference_elbo = single_process_reference(
        vae, images, WORLD_SIZE, BATCH_SIZE, STEPS, LEARNING_RATE, SEED
    )
    assert isinstance(fit, data_parallel.DataParallelFit)
    assert (fit.world_size, fit.backend, fit.batch_size, fit.steps, fit.engine) == (2, "gloo", 3, STEPS, "ddp")
    assert fit.nonfinite_step is None and [step for step, _ in fit.check_times] == [2, 4, 6]
    # float64 throughout: the two differ by summation order (DDP sums the ranks' gradients, the reference one
    # batch's) and by Adam's fused kernel against the reference's plain one: rounding, ~1e-15 relative.
    torch.testing.assert_close(torch.as_tensor(fit.elbo), reference_elbo, rtol=1e-10, atol=1e-10)
    trained = fit.guide.state_dict()
    for name, value in reference_parameters.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-9, atol=1e-12, msg=f"parameter {name}")
    # the guide handed in is left as it was; the trained one moved away from it
    for name, value in vae.state_dict().items():
        assert torch.equal(value, initial[name])
    assert any(not torch.allclose(trained[name], initial[name]) for name in initial)


@pytest.mark.slow  # two more process start-ups (~20 s on two cores)
def test_vae_train_with_the_ddp_strategy_routes_to_two_processes(images):
    fit = vae_module.train(images, latent_dim=LATENT_DIM, hidden_dim=HIDDEN_DIM, batch_size=BATCH_SIZE,
                           steps=STEPS, learning_rate=LEARNING_RATE, seed=SEED, device="cpu", strategy="ddp",
                           world_size=WORLD_SIZE)
    # vae.train builds its network after torch.manual_seed(seed), in float32
    torch.manual_seed(SEED)
    start = VAE(IMAGE_SHAPE, latent_dim=LATENT_DIM, hidden_dim=HIDDEN_DIM)
    reference_parameters, reference_elbo = single_process_reference(
        start, images, WORLD_SIZE, BATCH_SIZE, STEPS, LEARNING_RATE, SEED
    )
    assert fit.world_size == WORLD_SIZE and fit.dtype == torch.float32
    torch.testing.assert_close(torch.as_tensor(fit.elbo), reference_elbo, rtol=1e-4, atol=1e-3)
    for name, value in reference_parameters.items():
        torch.testing.assert_close(fit.guide.state_dict()[name], value, rtol=1e-4, atol=1e-5)


TORCHRUN_SCRIPT = """
import os, sys, torch
from ppvi.models import vae as vae_module
images = torch.load(sys.argv[1])
fit = vae_module.train(images, latent_dim={latent_dim}, hidden_dim={hidden_dim}, batch_size={batch_size},
                       steps={steps}, learning_rate={learning_rate}, seed={seed}, device="cpu", strategy="ddp")
torch.save({{"elbo": torch.as_tensor(fit.elbo), "state": fit.guide.state_dict(), "world_size": fit.world_size,
            "group_left": torch.distributed.is_initialized()}}, f"rank{{os.environ['RANK']}}.pt")
"""


@pytest.mark.slow  # torchrun and two process start-ups (~20 s on two cores)
def test_vae_train_under_torchrun_trains_every_rank_alike(images, tmp_path):
    script = tmp_path / "train_vae.py"
    script.write_text(TORCHRUN_SCRIPT.format(latent_dim=LATENT_DIM, hidden_dim=HIDDEN_DIM, batch_size=BATCH_SIZE,
                                             steps=STEPS, learning_rate=LEARNING_RATE, seed=SEED))
    torch.save(images, tmp_path / "images.pt")
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on the test machine's cores
    for name in data_parallel.TORCHRUN_VARIABLES:
        environment.pop(name, None)
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD_SIZE}",
         str(script), str(tmp_path / "images.pt")],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    torch.manual_seed(SEED)  # as vae.train builds its network, in float32
    start = VAE(IMAGE_SHAPE, latent_dim=LATENT_DIM, hidden_dim=HIDDEN_DIM)
    reference_parameters, reference_elbo = single_process_reference(
        start, images, WORLD_SIZE, BATCH_SIZE, STEPS, LEARNING_RATE, SEED
    )
    for outcome in ranks:
        assert outcome["world_size"] == WORLD_SIZE and not outcome["group_left"]
        torch.testing.assert_close(outcome["elbo"], reference_elbo, rtol=1e-4, atol=1e-3)
        for name, value in reference_parameters.items():
            torch.testing.assert_close(outcome["state"][name], value, rtol=1e-4, atol=1e-5)
    for name, value in ranks[0]["state"].items():  # the ranks agree exactly
        assert torch.equal(value, ranks[1]["state"][name])


# -- one rank in this process (a gloo group of one: no process start-up) ---------------------------------------
@pytest.fixture
def group_of_one(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=(tmp_path / "rendezvous").as_uri(), rank=0,
                                         world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def test_train_in_a_callers_group_equals_the_reference_and_leaves_the_group(images, group_of_one):
    vae = small_vae(torch.float64)
    start = copy.deepcopy(vae)
    fit = data_parallel.train(vae.model, vae, images, batch_size=4, steps=STEPS, learning_rate=LEARNING_RATE,
                              seed=SEED, dtype="float64")
    reference_parameters, reference_elbo = single_process_reference(start, images, 1, 4, STEPS, LEARNING_RATE, SEED)
    assert torch.distributed.is_initialized() and fit.world_size == 1 and fit.guide is vae
    torch.testing.assert_close(torch.as_tensor(fit.elbo), reference_elbo, rtol=1e-10, atol=1e-10)
    for name, value in reference_parameters.items():
        torch.testing.assert_close(vae.state_dict()[name], value, rtol=1e-9, atol=1e-12)


class PoisonedVAE(VAE):
    """A VAE whose encoder returns NaN from its ``poison_from``-th call on (the first call is the untrained check
    before training, the second step 0's)."""

    poison_from = 5

    def encode(self, images):
        self.calls = getattr(self, "calls", 0) + 1
        loc, scale = super().encode(images)
        return (loc * math.nan, scale) if self.calls >= self.poison_from else (loc, scale)


def test_a_nonfinite_elbo_stops_every_rank_and_restores_the_last_check(images, group_of_one):
    torch.manual_seed(0)
    vae = PoisonedVAE(IMAGE_SHAPE, latent_dim=LATENT_DIM, hidden_dim=HIDDEN_DIM)
    with pytest.raises(NonFiniteELBOError, match="not finite at step 3; parameters restored to step 2") as caught:
        data_parallel.train(vae.model, vae, images, batch_size=4, steps=STEPS, seed=SEED, check_interval=2)
    fit = caught.value.fit
    assert fit.nonfinite_step == 3 and fit.steps == 2 and fit.elbo.shape == (2,)
    assert all(torch.isfinite(parameter).all() for parameter in fit.guide.parameters())


# -- errors that name the problem and the fix (no processes start) ---------------------------------------------
def test_launch_rejects_more_points_per_step_than_images(images):
    vae = small_vae(torch.float32)
    with pytest.raises(ValueError, match=r"5 ranks x batch_size 5 = 25 .* only 24.* at most 4"):
        data_parallel.launch(5, vae.model, vae, images, batch_size=5, steps=2, backend="gloo")
    with pytest.raises(ValueError, match="25 ranks but only 24 data points.*at most 24 processes"):
        data_parallel.launch(NUM_IMAGES + 1, vae.model, vae, images, batch_size=1, steps=2, backend="gloo")


@pytest.mark.parametrize("batch_size", [0, -3, 2.5, True])
def test_launch_rejects_a_batch_size_that_is_not_a_positive_integer(images, batch_size):
    vae = small_vae(torch.float32)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        data_parallel.launch(2, vae.model, vae, images, batch_size=batch_size, steps=2, backend="gloo")


def test_launch_rejects_bad_options(images):
    vae = small_vae(torch.float32)
    common = dict(batch_size=2, steps=2)
    with pytest.raises(ValueError, match="world_size must be a positive integer"):
        data_parallel.launch(0, vae.model, vae, images, backend="gloo", **common)
    with pytest.raises(ValueError, match="backend must be one of"):
        data_parallel.launch(2, vae.model, vae, images, backend="mpi", **common)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        data_parallel.launch(2, vae.model, vae, images, backend="gloo", seed=None, **common)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        data_parallel.launch(2, vae.model, vae.forward, images, backend="gloo", **common)
    with pytest.raises(ValueError, match="CUDA graph"):
        data_parallel.launch(2, vae.model, vae, images, backend="gloo", elbo=AmortizedELBO(cuda_graph="on"), **common)
    with pytest.raises(ValueError, match="dtype must be"):
        data_parallel.launch(2, vae.model, vae, images, backend="gloo", dtype="float16", **common)


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="needs a machine with fewer than two GPUs")
def test_nccl_without_a_gpu_per_rank_says_to_use_gloo(images):
    vae = small_vae(torch.float32)
    with pytest.raises((ValueError, RuntimeError), match="gloo"):
        data_parallel.launch(2, vae.model, vae, images, batch_size=2, steps=2, backend="nccl")


def test_train_outside_torchrun_says_how_to_launch(images, monkeypatch):
    for name in data_parallel.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    vae = small_vae(torch.float32)
    assert not data_parallel.is_distributed_rank()
    with pytest.raises(RuntimeError, match=r"RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set.*torchrun"):
        data_parallel.train(vae.model, vae, images, batch_size=2, steps=2)


def test_vae_train_strategy_errors(images, monkeypatch):
    for name in data_parallel.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=r"strategy must be one of \('single', 'ddp'\)"):
        vae_module.train(images, strategy="horovod", steps=2)
    with pytest.raises(ValueError, match="torchrun --nproc-per-node=2.*world_size=2"):
        vae_module.train(images, strategy="ddp", steps=2)
    with pytest.raises(ValueError, match="integer seed"):
        vae_module.train(images, strategy="ddp", world_size=2, seed=None, steps=2)
    with pytest.raises(ValueError, match="world_size applies to strategy='ddp'"):
        vae_module.train(images, world_size=2, steps=2)
    with pytest.raises(ValueError, match="at most 12"):
        vae_module.train(images, strategy="ddp", world_size=2, batch_size=13, steps=2, device="cpu")


def test_vae_train_under_a_torchrun_job_of_another_size_says_so(images, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert data_parallel.is_distributed_rank() and data_parallel.world_size_of_job() == 3
    with pytest.raises(ValueError, match="job of 3"):
        vae_module.train(images, strategy="ddp", world_size=2, steps=2, device="cpu")


def test_a_model_without_the_named_plate_is_refused(images, group_of_one):
    vae = small_vae(torch.float32)
    with pytest.raises(ValueError, match="no subsampled plate named 'pixels'"):
        data_parallel.train(vae.model, vae, images, batch_size=2, steps=1, plate_name="pixels")


@pytest.mark.slow  # one process start-up (~10 s on two cores)
def test_an_error_in_a_spawned_rank_reaches_the_caller_as_itself(images):
    vae = small_vae(torch.float32)
    with pytest.raises(ValueError, match="no subsampled plate named 'pixels'") as caught:
        data_parallel.launch(1, vae.model, vae, images, batch_size=2, steps=1, backend="gloo", plate_name="pixels",
                             threads_per_process=1)
    assert "ProcessRaisedException" in type(caught.value.__cause__).__name__


def test_the_single_strategy_is_unchanged(images):
    """The default path is ppvi.fit's, untouched by the new options."""
    fit = vae_module.train(images, latent_dim=LATENT_DIM, hidden_dim=HIDDEN_DIM, batch_size=4, steps=3, seed=1)
    again = vae_module.train(images, latent_dim=LATENT_DIM, hidden_dim=HIDDEN_DIM, batch_size=4, steps=3, seed=1,
                             strategy="single")
    assert fit.engine != "ddp" and not isinstance(fit, data_parallel.DataParallelFit)
    torch.testing.assert_close(torch.as_tensor(fit.elbo), torch.as_tensor(again.elbo), rtol=0, atol=0)

