"""The variational autoencoder (Kingma & Welling 2014; Rezende, Mohamed & Wierstra 2014) as a Pyro model with an
amortized guide, trained by :func:`ppvi.fit` through the fast ELBO of :mod:`ppvi.amortized`.

.. math::

    z_n \\sim \\mathcal{N}(0, I_K), \\quad x_n \\mid z_n \\sim p_\\theta(x_n \\mid z_n), \\qquad
    q_\\phi(z_n \\mid x_n) = \\mathcal{N}(\\mu_\\phi(x_n), \\operatorname{diag} \\sigma^2_\\phi(x_n)),

with ``p_theta`` a Bernoulli decoder (the cross-entropy of the lectures; pixels must be 0/1, or ``[0, 1]``
probabilities with ``dynamic_binarization=True``) or a Gaussian decoder (squared error; a fixed or learned
per-pixel variance). Encoder and decoder are MLPs (``architecture="mlp"``, e.g. 784-400-20 as in the paper) or a
small convolutional network (``"conv"``).

One :class:`VAE` module holds both networks: pass its :meth:`VAE.model` as the model and the module itself as the
guide, so that ``ppvi.fit`` finds, moves and saves all the weights::

    vae = VAE(images.shape[1:], latent_dim=20)
    fit = ppvi.fit(vae.model, images, guide=vae, subsample_size=128, steps=5000, dtype="float32",
                   elbo=ppvi.amortized.AmortizedELBO())

or simply :func:`train`, which does that and exposes beta (Higgins et al. 2017), KL annealing (Bowman et al. 2016)
and free bits (Kingma et al. 2016). Sites: the subsampled plate ``data``, the latent ``z`` (``(B, K)``) and the
observed ``x`` (``(B, *image_shape)``). Model and guide broadcast over a leading particle dimension, so
:func:`ppvi.amortized.log_likelihood` evaluates them vectorized.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import pyro
import pyro.distributions as dist
import torch
from torch import nn

Architecture = Literal["mlp", "conv"]
Likelihood = Literal["bernoulli", "gaussian"]
#: How :func:`train` trains: ``"single"``, one process through :func:`ppvi.fit`; ``"ddp"``, data-parallel over
#: several processes with PyTorch's DistributedDataParallel (:mod:`ppvi.data_parallel`).
Strategy = Literal["single", "ddp"]
STRATEGIES = ("single", "ddp")
#: The process-group backend of ``strategy="ddp"`` for each ``device``.
_DDP_BACKENDS = {"auto": "auto", "cpu": "gloo", "cuda": "nccl"}

#: Hidden units of the MLPs: Kingma & Welling (2014) used 500 and the PyTorch example 400 on MNIST.
DEFAULT_HIDDEN_DIM = 400
#: Channels of the two stride-2 convolutions of the convolutional option (a small network, fast on a CPU).
CONV_CHANNELS = (32, 64)
#: Lower bound of the encoder's standard deviations and the learned Gaussian decoder's: keeps ``log q`` finite
#: when the encoder is very confident (a scale of 1e-4 is far below any posterior width seen on [0, 1] images).
MINIMUM_SCALE = 1e-4


class MLPEncoder(nn.Module):
    """``x -> (loc, scale)`` of ``q(z | x)``: one hidden ReLU layer, a softplus for the scale."""

    def __init__(self, data_dim: int, latent_dim: int, hidden_dim: int = DEFAULT_HIDDEN_DIM):
        super().__init__()
        self.hidden = nn.Linear(data_dim, hidden_dim)
        self.loc = nn.Linear(hidden_dim, latent_dim)
        self.scale = nn.Linear(hidden_dim, latent_dim)

    def forward(self, images: torch.Tensor, image_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.relu(self.hidden(images.flatten(-image_dims)))
        return self.loc(hidden), nn.functional.softplus(self.scale(hidden)) + MINIMUM_SCALE


class MLPDecoder(nn.Module):
    """``z -> `` per-pixel logits (Bernoulli) or means (Gaussian): one hidden ReLU layer."""

    def __init__(self, latent_dim: int, image_shape: Sequence[int], hidden_dim: int = DEFAULT_HIDDEN_DIM):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.hidden = nn.Linear(latent_dim, hidden_dim)
        self.output = nn.Linear(hidden_dim, math.prod(self.image_shape))

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.output(torch.relu(self.hidden(latent))).unflatten(-1, self.image_shape)


class ConvEncoder(nn.Module):
    """Two stride-2 3x3 convolutions (``CONV_CHANNELS``), then linear maps to ``loc`` and ``scale``."""

    def __init__(self, image_shape: Sequence[int], latent_dim: int, hidden_dim: int = DEFAULT_HIDDEN_DIM):
        super().__init__()
        height, width = image_shape
        first, second = CONV_CHANNELS
        self.convolutions = nn.Sequential(
            nn.Conv2d(1, first, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(first, second, 3, stride=2, padding=1), nn.ReLU(),
        )
        features = second * math.ceil(math.ceil(height / 2) / 2) * math.ceil(math.ceil(width / 2) / 2)
        self.hidden = nn.Linear(features, hidden_dim)
        self.loc = nn.Linear(hidden_dim, latent_dim)
        self.scale = nn.Linear(hidden_dim, latent_dim)

    def forward(self, images: torch.Tensor, image_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch_shape = images.shape[:-2]
        features = self.convolutions(images.reshape(-1, 1, *images.shape[-2:])).flatten(1)
        hidden = torch.relu(self.hidden(features)).unflatten(0, batch_shape)
        return self.loc(hidden), nn.functional.softplus(self.scale(hidden)) + MINIMUM_SCALE


class ConvDecoder(nn.Module):
    """A linear map to a quarter-resolution feature map, two stride-2 transposed convolutions, cropped to size."""

    def __init__(self, latent_dim: int, image_shape: Sequence[int], hidden_dim: int = DEFAULT_HIDDEN_DIM):
        super().__init__()
        self.image_shape = tuple(image_shape)
        height, width = self.image_shape
        first, second = CONV_CHANNELS
        self.base = (second, math.ceil(height / 4), math.ceil(width / 4))
        self.hidden = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, math.prod(self.base))
        )
        self.deconvolutions = nn.Sequential(
            nn.ReLU(), nn.ConvTranspose2d(second, first, 4, stride=2, padding=1),
            nn.ReLU(), nn.ConvTranspose2d(first, 1, 4, stride=2, padding=1),
        )

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        batch_shape = latent.shape[:-1]
        features = self.hidden(latent.reshape(-1, latent.shape[-1])).reshape(-1, *self.base)
        height, width = self.image_shape
        output = self.deconvolutions(features)[:, 0, :height, :width]
        return output.unflatten(0, batch_shape)


class VAE(nn.Module):
    """A variational autoencoder for images of one shape: :meth:`model` is the Pyro model, calling the module is
    the amortized guide ``q(z | x)``.

    Parameters
    ----------
    image_shape : sequence of int
        ``(height, width)`` of the images.
    latent_dim : int
        ``K``: 2 for the manifold figure, 20-50 for likelihood.
    hidden_dim : int
        Width of the hidden layers.
    architecture : {"mlp", "conv"}
        Encoder and decoder networks.
    likelihood : {"bernoulli", "gaussian"}
        Decoder distribution per pixel: Bernoulli with logits (cross-entropy), or Normal around a mean in
        ``[0, 1]``-free units (squared error).
    observation_scale : float, optional
        Standard deviation of the Gaussian decoder; ``None`` learns one per pixel.
    dynamic_binarization : bool
        Bernoulli only: read the images as pixel probabilities and draw a fresh binary image every time a
        minibatch is used (the dynamically binarized MNIST of Burda et al. 2016). The guide draws it and the model
        observes the same draw (passed on, keyed by the minibatch's index tensor). Binary images are unchanged.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        latent_dim: int = 20,
        hidden_dim: int = DEFAULT_HIDDEN_DIM,
        architecture: Architecture = "mlp",
        likelihood: Likelihood = "bernoulli",
        observation_scale: float | None = None,
        dynamic_binarization: bool = False,
    ):
        super().__init__()
        image_shape = tuple(int(size) for size in image_shape)
        if len(image_shape) != 2 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (height, width), got {image_shape}")
        if not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim!r}")
        if likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"likelihood must be 'bernoulli' or 'gaussian', got {likelihood!r}")
        if dynamic_binarization and likelihood != "bernoulli":
            raise ValueError("dynamic_binarization applies to the Bernoulli likelihood only")
        if observation_scale is not None and not observation_scale > 0:
            raise ValueError(f"observation_scale must be positive (or None to learn it), got {observation_scale}")
        self.image_shape, self.latent_dim, self.likelihood = image_shape, latent_dim, likelihood
        self.observation_scale, self.dynamic_binarization = observation_scale, dynamic_binarization
        if architecture == "mlp":
            self.encoder: nn.Module = MLPEncoder(math.prod(image_shape), latent_dim, hidden_dim)
            self.decoder: nn.Module = MLPDecoder(latent_dim, image_shape, hidden_dim)
        elif architecture == "conv":
            self.encoder = ConvEncoder(image_shape, latent_dim, hidden_dim)
            self.decoder = ConvDecoder(latent_dim, image_shape, hidden_dim)
        else:
            raise ValueError(f"architecture must be 'mlp' or 'conv', got {architecture!r}")
        self.architecture = architecture
        if likelihood == "gaussian" and observation_scale is None:
            # softplus^-1 of 0.1: pixel noise of a tenth of the [0, 1] range to start with
            self.raw_observation_scale = nn.Parameter(torch.full(image_shape, math.log(math.expm1(0.1))))
        self.register_buffer("prior_loc", torch.zeros(latent_dim), persistent=False)
        self.register_buffer("prior_scale", torch.ones(latent_dim), persistent=False)
        self._minibatch_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # -- the networks ------------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of ``q(z | x)`` for images of shape ``(..., height, width)``."""
        return self.encoder(images, 2)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Mean image ``E[x | z]`` (pixel probabilities, or Gaussian means) for latents of shape ``(..., K)``."""
        output = self.decoder(latent)
        return torch.sigmoid(output) if self.likelihood == "bernoulli" else output

    def likelihood_distribution(self, latent: torch.Tensor) -> dist.TorchDistribution:
        """``p(x | z)`` with the image dimensions as event dimensions."""
        output = self.decoder(latent)
        if self.likelihood == "bernoulli":
            return dist.Bernoulli(logits=output).to_event(2)
        if self.observation_scale is None:
            scale = nn.functional.softplus(self.raw_observation_scale) + MINIMUM_SCALE
        else:
            scale = torch.full_like(output[..., :1, :1], self.observation_scale)
        return dist.Normal(output, scale).to_event(2)

    # -- Pyro ---------------------------------------------------------------------------------------------------
    def _check(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 3 or tuple(images.shape[1:]) != self.image_shape:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(
                f"images must be a tensor of shape (num_images, {self.image_shape[0]}, {self.image_shape[1]}), "
                f"got {shape}; reshape flat images with images.reshape(-1, height, width)"
            )

    def _minibatch(self, images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``images[index]`` (binarized with ``dynamic_binarization``), computed once per minibatch: the guide and
        then the model of one ELBO evaluation see the same index tensor, and the model reuses the guide's batch
        (the same draw of binary pixels, and no second gather of the minibatch)."""
        cached = self._minibatch_cache
        if cached is not None and cached[0] is index and cached[1] is images:
            return cached[2]
        batch = images[index]
        if self.dynamic_binarization:
            batch = torch.bernoulli(batch)
        self._minibatch_cache = (index, images, batch)
        return batch

    def model(self, images: torch.Tensor, subsample_size: int | None = None) -> None:
        """``z ~ N(0, I)``, ``x | z ~ p(x | z)``, inside the (optionally subsampled) plate ``data``."""
        self._check(images)
        with pyro.plate("data", images.shape[0], subsample_size=subsample_size) as index:
            batch = self._minibatch(images, index)
            prior = dist.Normal(self.prior_loc, self.prior_scale).expand([index.shape[0], self.latent_dim])
            latent = pyro.sample("z", prior.to_event(1))
            pyro.sample("x", self.likelihood_distribution(latent), obs=batch)

    def forward(self, images: torch.Tensor, subsample_size: int | None = None) -> None:
        """The guide: ``z ~ q(z | x) = N(encoder(x))`` for the same minibatch the model sees."""
        self._check(images)
        with pyro.plate("data", images.shape[0], subsample_size=subsample_size) as index:
            loc, scale = self.encode(self._minibatch(images, index))
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    guide = forward

    def extra_repr(self) -> str:
        return (f"image_shape={self.image_shape}, latent_dim={self.latent_dim}, likelihood={self.likelihood!r}, "
                f"architecture={self.architecture!r}")


def check_images(images: torch.Tensor, vae: VAE) -> None:
    """Reject images the likelihood cannot score: a Bernoulli decoder needs 0/1 pixels (or ``[0, 1]`` with
    dynamic binarization)."""
    vae._check(images)
    if vae.likelihood != "bernoulli":
        return
    if vae.dynamic_binarization:
        if images.min() < 0 or images.max() > 1:
            raise ValueError("dynamic binarization reads pixels as probabilities: scale the images into [0, 1]")
    elif not ((images == 0) | (images == 1)).all():
        raise ValueError(
            "the Bernoulli decoder scores binary pixels, and these images have grey levels: binarize them "
            "(ppvi.data.binarize), use VAE(..., dynamic_binarization=True), or likelihood='gaussian'"
        )


def _as_images(images) -> torch.Tensor:
    tensor = torch.as_tensor(images)
    if not tensor.is_floating_point():
        tensor = tensor.float()
    return tensor


def train(
    images,
    *,
    latent_dim: int = 20,
    hidden_dim: int = DEFAULT_HIDDEN_DIM,
    architecture: Architecture = "mlp",
    likelihood: Likelihood = "bernoulli",
    observation_scale: float | None = None,
    dynamic_binarization: bool = False,
    kl_weight: float = 1.0,
    kl_warmup_steps: int = 0,
    free_bits: float = 0.0,
    batch_size: int = 128,
    steps: int = 5000,
    learning_rate: float = 1e-3,
    device: str = "auto",
    seed: int | None = 0,
    progress: bool | None = None,
    strategy: Strategy = "single",
    world_size: int | None = None,
):
    """Train a :class:`VAE` on ``images`` with :func:`ppvi.fit` and :class:`ppvi.amortized.AmortizedELBO`, in one
    process or data-parallel over several.

    Parameters
    ----------
    images : array or tensor
        ``(num_images, height, width)``; 0/1 pixels for the Bernoulli decoder (or ``[0, 1]`` with
        ``dynamic_binarization``), any real values for the Gaussian one.
    latent_dim, hidden_dim, architecture, likelihood, observation_scale, dynamic_binarization
        The network and decoder (see :class:`VAE`).
    kl_weight, kl_warmup_steps, free_bits
        beta, linear KL annealing and free bits (see :class:`ppvi.amortized.AmortizedELBO`).
    batch_size : int
        Minibatch size (Pyro's subsampling plate); with ``strategy="ddp"`` each process's, so that a step sees
        ``world_size * batch_size`` images.
    steps : int
        Adam steps (``ppvi.fit`` averages the iterates of the last ``min(500, steps // 2)``).
    learning_rate : float
        Adam's learning rate (1e-3, as Kingma & Welling's and the PyTorch example's).
    device : {"auto", "cpu", "cuda"}
        Where to train; on a GPU the loss and gradient run as one CUDA graph. With ``strategy="ddp"``: ``"cpu"``
        runs CPU processes over ``gloo``, ``"cuda"`` one GPU per process over ``nccl``, ``"auto"`` the latter
        when there is a GPU for every process.
    seed : int, optional
        Seed of the initial weights and of training (``"ddp"`` needs one: every process derives its minibatches
        and noise from it).
    progress : bool, optional
        Show a progress bar (``"single"`` only).
    strategy : {"single", "ddp"}
        ``"single"``: one process, :func:`ppvi.fit`. ``"ddp"``: data-parallel training with PyTorch's
        DistributedDataParallel (:func:`ppvi.data_parallel.train`): each process draws its own minibatches of
        ``batch_size``, the gradients are averaged, and the result equals one process training on the
        concatenated minibatches. Inside a ``torchrun`` job (``torchrun --nproc-per-node=2 script.py``; every
        process runs this call) it trains as this process's rank; elsewhere it spawns ``world_size`` processes
        (:func:`ppvi.data_parallel.launch`; guard the script's entry point with ``if __name__ == "__main__":``).
    world_size : int, optional
        With ``strategy="ddp"`` outside ``torchrun``: how many processes to spawn.

    Returns
    -------
    ppvi.Fit
        ``fit.guide`` is the trained :class:`VAE`; ``fit.elbo`` the ELBO per step (of the objective trained, i.e.
        with the KL weight of that step). With ``"ddp"`` a :class:`ppvi.data_parallel.DataParallelFit`, whose
        ``elbo`` is the mean over the processes (the ELBO estimate of the concatenated minibatch), identical on
        every rank of a ``torchrun`` job.
    """
    import ppvi
    import ppvi.inputs
    from ppvi.amortized import AmortizedELBO

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES} (one process, or data-parallel), got {strategy!r}")
    if strategy == "single" and world_size is not None:
        raise ValueError("world_size applies to strategy='ddp' only: pass strategy='ddp' to train on several processes")
    images = _as_images(images)
    if seed is not None:
        torch.manual_seed(seed)
    vae = VAE(images.shape[1:], latent_dim, hidden_dim, architecture, likelihood, observation_scale,
              dynamic_binarization)
    check_images(images, vae)
    if not isinstance(batch_size, int) or not 1 <= batch_size:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    elbo = AmortizedELBO(kl_weight=kl_weight, kl_warmup_steps=kl_warmup_steps, free_bits=free_bits)
    if strategy == "ddp":
        return _train_data_parallel(vae, images, elbo, batch_size=batch_size, steps=steps,
                                    learning_rate=learning_rate, device=device, seed=seed, world_size=world_size)
    subsample_size = batch_size if batch_size < images.shape[0] else None
    # ppvi.fit picks the thread count from the minibatch size (ppvi.inputs.threads_for).
    return ppvi.fit(
        vae.model, images, guide=vae, subsample_size=subsample_size, steps=steps, learning_rate=learning_rate,
        dtype="float32", device=device, elbo=elbo, seed=seed, progress=progress,
    )


def _train_data_parallel(vae: VAE, images: torch.Tensor, elbo, *, batch_size: int, steps: int, learning_rate: float,
                         device: str, seed: int | None, world_size: int | None):
    """``train(..., strategy="ddp")``: this process's rank of a ``torchrun`` job, or ``world_size`` spawned ones."""
    from ppvi import data_parallel

    if device not in _DDP_BACKENDS:
        raise ValueError(f"device must be one of {tuple(_DDP_BACKENDS)} with strategy='ddp', got {device!r}")
    if seed is None:
        raise ValueError(
            "strategy='ddp' needs an integer seed: every process derives its minibatches and noise from it "
            "(and, under torchrun, builds the same initial network from it)"
        )
    options = dict(batch_size=batch_size, steps=steps, learning_rate=learning_rate, elbo=elbo, seed=seed,
                   backend=_DDP_BACKENDS[device], dtype=torch.float32)
    if data_parallel.is_distributed_rank():
        job_size = data_parallel.world_size_of_job()
        if world_size is not None and world_size != job_size:
            raise ValueError(
                f"world_size={world_size}, but this process is a rank of a job of {job_size} (torchrun's "
                "--nproc-per-node sets it): drop world_size= under torchrun"
            )
        return data_parallel.train(vae.model, vae, images, **options)
    if world_size is None:
        raise ValueError(
            "strategy='ddp' runs one process per rank: launch the script with `torchrun --nproc-per-node=2 "
            "script.py`, or pass world_size=2 to spawn the processes from here"
        )
    return data_parallel.launch(world_size, vae.model, vae, images, **options)


# -- figures (the lecture's) -------------------------------------------------------------------------------------
def _image_grid(images: torch.Tensor, columns: int):
    """Tile ``(n, h, w)`` images into one array with ``columns`` per row (one-pixel gaps of 0, white in gray_r)."""
    import numpy as np

    images = images.detach().float().cpu().numpy()
    count, height, width = images.shape
    rows = math.ceil(count / columns)
    grid = np.zeros((rows * (height + 1) - 1, columns * (width + 1) - 1), dtype=np.float32)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        top, left = row * (height + 1), column * (width + 1)
        grid[top : top + height, left : left + width] = image
    return grid


def _axes(ax, figsize=(5, 5)):
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax.figure, ax
    return plt.subplots(figsize=figsize)


@torch.no_grad()
def plot_samples(vae: VAE, num_samples: int = 64, seed: int = 0, ax=None):
    """Mean images ``E[x | z]`` of ``z`` drawn from the prior ``N(0, I)``; returns the figure."""
    generator = torch.Generator().manual_seed(seed)
    parameter = next(vae.parameters())
    latent = torch.randn(num_samples, vae.latent_dim, generator=generator).to(parameter)
    figure, ax = _axes(ax)
    ax.imshow(_image_grid(vae.decode(latent), math.ceil(math.sqrt(num_samples))), cmap="gray_r", vmin=0, vmax=1)
    ax.set_title("samples from the prior (decoder means)")
    ax.axis("off")
    return figure


@torch.no_grad()
def plot_reconstructions(vae: VAE, images, num_images: int = 16, ax=None):
    """Originals (odd rows) above their reconstructions ``E[x | z = mean of q(z | x)]`` (even rows)."""
    parameter = next(vae.parameters())
    originals = _as_images(images)[:num_images].to(parameter)
    reconstructions = vae.decode(vae.encode(originals)[0])
    columns = min(8, num_images)
    pairs = []
    for start in range(0, originals.shape[0], columns):
        pairs += [originals[start : start + columns], reconstructions[start : start + columns]]
    figure, ax = _axes(ax, (5, 5 * len(pairs) / columns))
    stacked = torch.cat([torch.cat([p, p.new_zeros(columns - p.shape[0], *p.shape[1:])]) for p in pairs])
    ax.imshow(_image_grid(stacked, columns), cmap="gray_r", vmin=0, vmax=1)
    ax.set_title("data (odd rows) and reconstructions (even rows)")
    ax.axis("off")
    return figure


@torch.no_grad()
def plot_manifold(vae: VAE, points_per_side: int = 15, limit: float = 2.0, ax=None):
    """The learned 2-D manifold: decoder means over a grid of ``z`` in ``[-limit, limit]^2`` (Kingma & Welling
    2014, figure 4); needs ``latent_dim == 2``."""
    if vae.latent_dim != 2:
        raise ValueError(f"the manifold grid needs a 2-D latent space, this VAE has latent_dim={vae.latent_dim}")
    parameter = next(vae.parameters())
    axis = torch.linspace(-limit, limit, points_per_side)
    # rows from top (z2 = +limit) to bottom, columns left (z1 = -limit) to right
    z1, z2 = torch.meshgrid(axis, axis.flip(0), indexing="xy")
    latent = torch.stack([z1.reshape(-1), z2.reshape(-1)], -1).to(parameter)
    figure, ax = _axes(ax, (6, 6))
    ax.imshow(_image_grid(vae.decode(latent), points_per_side), cmap="gray_r", vmin=0, vmax=1)
    ax.set_title(f"decoder means over z in [-{limit:g}, {limit:g}]^2")
    ax.axis("off")
    return figure


@torch.no_grad()
def plot_latent_means(vae: VAE, images, labels, ax=None):
    """Encoder means of ``images`` (the first two latent coordinates), coloured by label."""
    parameter = next(vae.parameters())
    loc = vae.encode(_as_images(images).to(parameter))[0].cpu().numpy()
    figure, ax = _axes(ax, (6, 5))
    scatter = ax.scatter(loc[:, 0], loc[:, 1] if loc.shape[1] > 1 else 0 * loc[:, 0], c=labels, cmap="tab10", s=6)
    figure.colorbar(scatter, ax=ax, label="label")
    ax.set_xlabel("mean of z1 given x")
    ax.set_ylabel("mean of z2 given x")
    ax.set_title("latent means by label")
    return figure


def plot_elbo(fit, reference: dict[str, float] | None = None, window: int = 50, label: str = "", ax=None):
    """ELBO per step (nats per image, i.e. divided by the data size) with a ``window``-step running mean, and
    horizontal lines for ``reference`` values (e.g. baselines' test log-likelihoods) in the same units;
    ``label`` prefixes the legend entries (to draw several fits on one ``ax``)."""
    import numpy as np

    num_images = fit.args[0].shape[0]
    elbo = np.asarray(fit.elbo) / num_images
    figure, ax = _axes(ax, (7, 4))
    prefix = f"{label}: " if label else ""
    ax.plot(elbo, lw=0.5, alpha=0.4, label=f"{prefix}ELBO per step")
    if elbo.size >= window:
        smooth = np.convolve(elbo, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(window - 1, elbo.size), smooth, label=f"{prefix}running mean ({window} steps)")
    for label, value in (reference or {}).items():
        ax.axhline(value, ls="--", lw=1, color="gray")
        ax.annotate(label, (0, value), fontsize=8, va="bottom")
    finite = elbo[np.isfinite(elbo)]
    if finite.size:
        ax.set_ylim(np.percentile(finite, 2) - 5, finite.max() + 5)
    ax.set_xlabel("step")
    ax.set_ylabel("nats per image")
    ax.set_title("training ELBO")
    ax.legend(loc="lower right")
    return figure
