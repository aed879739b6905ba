"""What the explicit-density autoregressive image models share: the raster-order factorisation, masked
convolutions, image checks, exact log-likelihood, pixel-by-pixel sampling and a plain maximum-likelihood trainer.

Every model here is a product of conditionals in raster order (row by row, left to right),

.. math::

    p(x) = \\prod_{i=1}^{D} p(x_i \\mid x_1, \\dots, x_{i-1}), \\qquad
    p(x_i = 1 \\mid x_{<i}) = \\sigma(f_i(x_{<i})),

so ``log p(x)`` is exact (one network pass scores all ``D`` conditionals at once, because the network's output
``i`` is built never to look at inputs ``i, i+1, ...``) and sampling is ancestral, one pixel after the other, ``D``
sequential passes (Frey 1998; Larochelle & Murray 2011; van den Oord, Kalchbrenner & Kavukcuoglu 2016, "Pixel
Recurrent Neural Networks"). A model with no latent variables is fitted by plain maximum likelihood:
:func:`train` (Adam on minibatches).

Subclasses of :class:`AutoregressiveImageModel` implement ``_logits`` (``(N, H, W)`` float images to ``(N, H, W)``
logits, output ``(r, c)`` a function of the pixels before ``(r, c)`` only).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn

from ppvi.inputs import random_state_kept

#: Images scored together by :meth:`AutoregressiveImageModel.log_prob` (bounds the memory of the activations).
EVALUATION_BATCH = 500


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run a block (a network's weight initialisation) from ``torch.manual_seed(seed)``, leaving the global random
    state as it was; ``None`` runs it on the global random state as it is."""
    if seed is None:
        yield
        return
    with random_state_kept():
        torch.manual_seed(seed)
        yield


def check_image_shape(image_shape: Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` as ints, or a ``ValueError``."""
    shape = tuple(int(size) for size in image_shape)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"image_shape must be (height, width) with positive sizes, got {tuple(image_shape)}")
    return shape  # type: ignore[return-value]


def check_images(images, image_shape: Sequence[int] | None = None, name: str = "images") -> torch.Tensor:
    """Binary images as a float tensor of shape ``(N, H, W)``, or a ``ValueError`` naming the problem and the fix.

    Parameters
    ----------
    images : array or tensor
        ``(N, H, W)`` zeros and ones (bool and integer types are accepted).
    image_shape : (int, int), optional
        The ``(H, W)`` the model was built for.
    name : str
        What to call the images in the message.
    """
    tensor = torch.as_tensor(images)
    if tensor.dim() != 3:
        expected = f"(num_images, {image_shape[0]}, {image_shape[1]})" if image_shape else "(num_images, height, width)"
        raise ValueError(
            f"{name} must have shape {expected}, got {tuple(tensor.shape)}: reshape flat images with "
            f"images.reshape(-1, height, width), and give one image as images[None]"
        )
    if image_shape is not None and tuple(tensor.shape[1:]) != tuple(image_shape):
        raise ValueError(
            f"{name} are {tuple(tensor.shape[1:])} pixels, this model was built for {tuple(image_shape)}: "
            f"build the model with image_shape={tuple(tensor.shape[1:])}"
        )
    if tensor.dtype == torch.bool or not tensor.is_floating_point():
        tensor = tensor.to(torch.get_default_dtype())
    if not ((tensor == 0) | (tensor == 1)).all():
        example = float(tensor[(tensor != 0) & (tensor != 1)][0])
        raise ValueError(
            f"{name} must be binary (0/1 pixels), got other values (e.g. {example}):"
            " binarize them first, e.g. with ppvi.data.binarize (a Bernoulli draw per pixel) or (images > 0.5)"
        )
    return tensor


def with_ones(images: torch.Tensor) -> torch.Tensor:
    """``(N, H, W)`` images as ``(N, 2, H, W)``: the pixels and a constant channel of ones. Convolutions pad with
    zeros, so without it a pixel that is off cannot be told from the padding beyond the border (a network whose
    first layer sees only zeros cannot tell where it is); the ones mark the image's extent."""
    return torch.stack([images, torch.ones_like(images)], 1)


class MaskedConv2d(nn.Conv2d):
    """A 2-D convolution whose kernel sees only pixels before the centre in raster order (van den Oord et al.
    2016, section 3.4): mask ``"A"`` (first layer) also hides the centre, mask ``"B"`` (later layers, whose inputs
    at the centre already depend only on earlier pixels) lets it through. Kernel sizes must be odd; padding keeps
    the image size. One input channel of binary pixels needs no colour-channel masks."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], mask_type: str):
        height, width = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        if height % 2 == 0 or width % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {(height, width)}")
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
        super().__init__(in_channels, out_channels, (height, width), padding=(height // 2, width // 2))
        mask = torch.ones(height, width)
        row, column = height // 2, width // 2
        mask[row, column + (mask_type == "B"):] = 0
        mask[row + 1:] = 0
        self.register_buffer("mask", mask, persistent=False)
        self.mask_type = mask_type

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Conv2d's name)
        return self._conv_forward(input, self.weight * self.mask, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mask_type={self.mask_type!r}"


class AutoregressiveImageModel(nn.Module):
    """Base class: exact log-likelihood and ancestral sampling of a raster-order model of binary images.

    Parameters
    ----------
    image_shape : (int, int)
        ``(H, W)``.
    """

    def __init__(self, image_shape: Sequence[int]):
        super().__init__()
        self.image_shape = check_image_shape(image_shape)

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, images) -> torch.Tensor:
        """``logit p(x_i = 1 | x_<i)`` for every pixel, ``(N, H, W)``. Real-valued inputs are allowed (for checking
        the autoregressive property by gradients); only the shape is checked."""
        tensor = torch.as_tensor(images, dtype=self._dtype())
        if tensor.dim() != 3 or tuple(tensor.shape[1:]) != self.image_shape:
            raise ValueError(f"images must have shape (num_images, {self.image_shape[0]}, {self.image_shape[1]}), "
                             f"got {tuple(tensor.shape)}")
        return self._logits(tensor.to(self._device()))

    def _dtype(self) -> torch.dtype:
        parameter = next(self.parameters(), None)
        return parameter.dtype if parameter is not None else torch.get_default_dtype()

    def _device(self) -> torch.device:
        parameter = next(self.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    def _log_prob(self, images: torch.Tensor) -> torch.Tensor:
        logits = self._logits(images)
        return -nn.functional.binary_cross_entropy_with_logits(logits, images, reduction="none").flatten(1).sum(1)

    def log_prob(self, images, batch_size: int = EVALUATION_BATCH) -> torch.Tensor:
        """Exact ``log p(x_n)`` in nats of each binary image ``(N, H, W)``, float64 ``(N,)``, without gradients."""
        tensor = check_images(images, self.image_shape)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        training = self.training
        self.eval()
        try:
            with torch.no_grad():
                pieces = [self._log_prob(chunk.to(self._device(), self._dtype())).double().cpu()
                          for chunk in tensor.split(batch_size)]
        finally:
            self.train(training)
        return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.float64)

    def _pixel_logits(self, images: torch.Tensor, row: int, column: int) -> torch.Tensor:
        """Logits of pixel ``(row, column)`` given the pixels before it (the rest of ``images`` is ignored)."""
        return self._logits(images)[:, row, column]

    @torch.no_grad()
    def sample(self, num_samples: int = 64, seed: int | None = 0) -> torch.Tensor:
        """Ancestral sampling, pixel by pixel in raster order: ``H * W`` sequential passes.

        Parameters
        ----------
        num_samples : int
            Images to draw.
        seed : int, optional
            Seed of a private generator (the global random state is neither used nor changed); ``None`` draws from
            the global one.

        Returns
        -------
        torch.Tensor
            ``(num_samples, H, W)`` zeros and ones, on the CPU, in the model's dtype.
        """
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        height, width = self.image_shape
        uniforms = torch.rand(num_samples, height, width, generator=generator, dtype=torch.float64)
        training = self.training
        self.eval()
        try:
            images = torch.zeros(num_samples, height, width, dtype=self._dtype(), device=self._device())
            for row in range(height):
                for column in range(width):
                    probability = torch.sigmoid(self._pixel_logits(images, row, column).double()).cpu()
                    images[:, row, column] = (uniforms[:, row, column] < probability).to(images)
        finally:
            self.train(training)
        return images.cpu()


class TrainingResult(NamedTuple):
    """What :func:`train` did.

    Attributes
    ----------
    losses : list of float
        Mean training negative log-likelihood (nats per image) of each epoch's minibatches.
    epochs : int
        Passes over the training images.
    seconds : float
        Wall time of training.
    validation_losses : list of float
        Validation negative log-likelihood after each epoch (empty without validation images).
    best_epoch : int
        The epoch (1-based) whose weights the model holds: the lowest validation loss, else the last.
    """

    losses: list[float]
    epochs: int
    seconds: float
    validation_losses: list[float]
    best_epoch: int


def train(
    model: AutoregressiveImageModel,
    train_images,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.0,
    max_seconds: float | None = None,
    validation_images=None,
    seed: int = 0,
    progress: bool = False,
) -> TrainingResult:
    """Maximum likelihood: Adam on minibatches of the mean negative log-likelihood, in place.

    Parameters
    ----------
    model : AutoregressiveImageModel
        Trained in place (on its device and dtype).
    train_images : array or tensor
        Binary ``(N, H, W)``.
    epochs : int
        Passes over the data, each in a fresh order.
    batch_size : int
        Images per Adam step.
    learning_rate : float
        Adam's step size.
    weight_decay : float
        L2 penalty on every weight (Adam's ``weight_decay``).
    max_seconds : float, optional
        Stop after the epoch in which this much wall time has passed.
    validation_images : array or tensor, optional
        Binary ``(M, H, W)`` scored after every epoch: the model ends with the weights of the best epoch (early
        stopping, as Larochelle & Murray and van den Oord et al. selected models on validation likelihood).
    seed : int
        Seed of the minibatch order (a private generator: the global random state is untouched).
    progress : bool
        Print each epoch's loss.
    """
    images = check_images(train_images, model.image_shape, "train_images")
    for label, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate must be positive and finite, got {learning_rate!r}")
    images = images.to(model._device(), model._dtype())
    validation = None if validation_images is None else check_images(validation_images, model.image_shape,
                                                                     "validation_images")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    model.train()
    losses: list[float] = []
    validation_losses: list[float] = []
    best_state, best_epoch = None, 0
    started = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(images.shape[0], generator=generator).to(images.device)
        total, count = 0.0, 0
        for index in order.split(batch_size):
            batch = images[index]
            loss = -model._log_prob(batch).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * batch.shape[0]
            count += batch.shape[0]
        losses.append(total / count)
        best_epoch = epoch + 1 if validation is None else best_epoch
        if validation is not None:
            validation_losses.append(-float(model.log_prob(validation).mean()))
            model.train()
            if validation_losses[-1] <= min(validation_losses):
                best_state = {name: value.detach().clone() for name, value in model.state_dict().items()}
                best_epoch = epoch + 1
        if progress:
            checked = f", validation {validation_losses[-1]:.2f}" if validation_losses else ""
            elapsed = time.perf_counter() - started
            print(f"epoch {epoch + 1}: {losses[-1]:.2f} nats per image{checked} ({elapsed:.0f} s)")
        if max_seconds is not None and time.perf_counter() - started > max_seconds:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainingResult(losses, len(losses), time.perf_counter() - started, validation_losses, best_epoch)
