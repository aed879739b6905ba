"""PixelCNN (van den Oord, Kalchbrenner & Kavukcuoglu 2016, "Pixel Recurrent Neural Networks", section 3.5) and
the Gated PixelCNN (van den Oord, Kalchbrenner, Vinyals, Espeholt, Graves & Kavukcuoglu 2016, "Conditional Image
Generation with PixelCNN Decoders") for binary images: autoregressive models whose conditionals
``p(x_i | x_<i)`` come from masked convolutions.

:class:`PixelCNN` (the first paper's Table 2, for one binary channel): a 7x7 convolution with mask A (the centre
pixel hidden), then ``num_layers`` residual blocks of a 3x3 convolution with mask B (the centre allowed: its
features already depend on earlier pixels only), then two 1x1 convolutions with ReLUs and a sigmoid output per
pixel (the paper's choice for binarized MNIST). Stacked masked convolutions leave a *blind spot*: pixels above
and to the right that an earlier pixel's conditional never sees.

:class:`GatedPixelCNN` (the second paper, section 2.2): two stacks, a *vertical* one whose features at row ``r``
see every pixel of rows ``<= r`` within its reach (fed to the other stack shifted down one row, so only rows
``< r`` reach row ``r``'s outputs) and a *horizontal* one over the pixels left of the current one in its row,
each layer with the gated unit ``tanh(W_f * x) * sigmoid(W_g * x)`` (eq. 2) and the horizontal stack with
residual connections: no blind spot.

In both, output ``i`` never depends on input ``j >= i`` (tested exactly by gradients): the log-likelihood is
exact, in one pass, and sampling takes ``H * W`` sequential passes. The first paper reports 81.30 nats on
binarized MNIST for the PixelCNN (Table 4, as recalled; see the benchmark).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ppvi.models.autoregressive import (
    AutoregressiveImageModel,
    MaskedConv2d,
    TrainingResult,
    check_images,
    seeded,
    train,
    with_ones,
)

#: Feature maps of the hidden layers (the paper used h = 128 on CIFAR; 32 keeps MNIST trainable on a CPU).
DEFAULT_CHANNELS = 32
#: Residual blocks of 3x3 mask-B convolutions after the 7x7 mask-A layer.
DEFAULT_LAYERS = 4
#: Size of the first (mask A) convolution, as in the paper.
FIRST_KERNEL = 7
#: Size of the mask-B convolutions of the blocks, as in the paper.
BLOCK_KERNEL = 3


class ResidualBlock(nn.Module):
    """``x + conv1x1(relu(masked_conv_B(relu(x))))``."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.convolution = MaskedConv2d(channels, channels, kernel_size, "B")
        self.output = nn.Conv2d(channels, channels, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features + self.output(torch.relu(self.convolution(torch.relu(features))))


def _gate(features: torch.Tensor) -> torch.Tensor:
    """The gated activation unit: ``tanh`` of the first half of the channels times ``sigmoid`` of the second."""
    value, gate = features.chunk(2, 1)
    return torch.tanh(value) * torch.sigmoid(gate)


class GatedLayer(nn.Module):
    """One layer of the Gated PixelCNN: ``(vertical, horizontal) -> (vertical, horizontal)``.

    Vertical: a ``(k//2 + 1) x k`` convolution over rows ``r - k//2 .. r`` (padding above, so row ``r``'s output
    sees rows ``<= r`` only). Horizontal: a ``1 x (k//2 + 1)`` convolution over columns ``c - k//2 .. c`` of the
    same row (``.. c - 1`` in the first layer, mask A), plus a 1x1 map of the vertical features *shifted down one
    row* (rows ``< r``), gated, mapped by a 1x1 convolution and added to the input (residual; not in the first
    layer, whose input is the image).
    """

    def __init__(self, in_channels: int, channels: int, kernel_size: int, first: bool):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.half, self.first = kernel_size // 2, first
        self.vertical = nn.Conv2d(in_channels, 2 * channels, (self.half + 1, kernel_size), padding=(0, self.half))
        self.horizontal = nn.Conv2d(in_channels, 2 * channels, (1, self.half if first else self.half + 1))
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.output = nn.Conv2d(channels, channels, 1)

    def forward(self, vertical: torch.Tensor, horizontal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = vertical.shape[-2:]
        vertical_features = self.vertical(nn.functional.pad(vertical, (0, 0, self.half, 0)))  # rows r - k//2 .. r
        # shifted down one row: row r of the horizontal stack gets the vertical features of rows < r only
        shifted = nn.functional.pad(vertical_features, (0, 0, 1, 0))[..., :height, :]
        # columns c - k//2 .. c (mask B), or .. c - 1 in the first layer (mask A): pad on the left, crop the right
        horizontal_features = self.horizontal(nn.functional.pad(horizontal, (self.half, 0)))[..., :width]
        gated = _gate(horizontal_features + self.vertical_to_horizontal(shifted))
        output = self.output(gated)
        return _gate(vertical_features), output if self.first else horizontal + output


class PixelCNN(AutoregressiveImageModel):
    """PixelCNN over ``(H, W)`` binary images.

    Parameters
    ----------
    image_shape : (int, int)
        ``(H, W)``.
    channels : int
        Hidden feature maps ``h``.
    num_layers : int
        Residual blocks of mask-B convolutions.
    first_kernel_size, kernel_size : int
        Odd sizes of the mask-A and mask-B convolutions.
    seed : int, optional
        Seed of the initial weights (the global random state is left as it was).
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        channels: int = DEFAULT_CHANNELS,
        num_layers: int = DEFAULT_LAYERS,
        first_kernel_size: int = FIRST_KERNEL,
        kernel_size: int = BLOCK_KERNEL,
        seed: int | None = 0,
    ):
        super().__init__(image_shape)
        _check_sizes(channels, num_layers)
        with seeded(seed):
            self.input = MaskedConv2d(2, channels, first_kernel_size, "A")  # pixels and ones (with_ones)
            self.blocks = nn.Sequential(*(ResidualBlock(channels, kernel_size) for _ in range(num_layers)))
            self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(),
                                      nn.Conv2d(channels, 1, 1))

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.input(with_ones(images))))[:, 0]

    def _pixel_logits(self, images: torch.Tensor, row: int, column: int) -> torch.Tensor:
        # the masks never look below the current row: the rows above and this one give the same logits
        return self._logits(images[:, : row + 1])[:, row, column]


class GatedPixelCNN(AutoregressiveImageModel):
    """Gated PixelCNN (vertical and horizontal stacks, no blind spot) over ``(H, W)`` binary images.

    Parameters
    ----------
    image_shape : (int, int)
        ``(H, W)``.
    channels : int
        Feature maps ``h`` of each stack.
    num_layers : int
        Gated layers (the first sees the image with mask A; each widens the field by ``kernel_size // 2``).
    kernel_size : int
        Odd width of the stacks' convolutions (the first paper's first layer is 7 wide: pass 7 for that reach).
    seed : int, optional
        Seed of the initial weights (the global random state is left as it was).
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        channels: int = DEFAULT_CHANNELS,
        num_layers: int = DEFAULT_LAYERS,
        kernel_size: int = BLOCK_KERNEL,
        seed: int | None = 0,
    ):
        super().__init__(image_shape)
        _check_sizes(channels, num_layers, minimum_layers=1)
        with seeded(seed):
            # the first layer reads the pixels and a channel of ones (with_ones)
            self.layers = nn.ModuleList(GatedLayer(2 if index == 0 else channels, channels, kernel_size, index == 0)
                                        for index in range(num_layers))
            self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(),
                                      nn.Conv2d(channels, 1, 1))

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        vertical = horizontal = with_ones(images)
        for layer in self.layers:
            vertical, horizontal = layer(vertical, horizontal)
        return self.head(horizontal)[:, 0]

    def _pixel_logits(self, images: torch.Tensor, row: int, column: int) -> torch.Tensor:
        # neither stack looks below the current row
        return self._logits(images[:, : row + 1])[:, row, column]


def _check_sizes(channels: int, num_layers: int, minimum_layers: int = 0) -> None:
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive integer, got {channels!r}")
    if not isinstance(num_layers, int) or num_layers < minimum_layers:
        raise ValueError(f"num_layers must be an integer >= {minimum_layers}, got {num_layers!r}")


def fit(
    train_images,
    *,
    channels: int = DEFAULT_CHANNELS,
    num_layers: int = DEFAULT_LAYERS,
    gated: bool = False,
    epochs: int = 10,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    max_seconds: float | None = None,
    validation_images=None,
    seed: int = 0,
) -> tuple[PixelCNN | GatedPixelCNN, TrainingResult]:
    """Build a :class:`PixelCNN` (or, with ``gated=True``, a :class:`GatedPixelCNN`) for the images' shape and train
    it by maximum likelihood (Adam; arguments of :func:`models.autoregressive.train`, with early stopping on
    ``validation_images`` when given)."""
    images = check_images(train_images, name="train_images")
    if gated:
        model: PixelCNN | GatedPixelCNN = GatedPixelCNN(images.shape[1:], channels, num_layers, seed=seed)
    else:
        model = PixelCNN(images.shape[1:], channels, num_layers, seed=seed)
    result = train(model, images, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                   max_seconds=max_seconds, validation_images=validation_images, seed=seed)
    return model, result
