"""PixelRNN with Row LSTM layers (van den Oord, Kalchbrenner & Kavukcuoglu 2016, "Pixel Recurrent Neural
Networks", section 3.1) for binary images.

A 7x7 convolution with mask A turns the image into features of the pixels strictly before each position; each
Row LSTM layer then processes the image one row at a time, top to bottom, computing a whole row of LSTM states
at once. Its gates at ``(r, c)`` add

- the *input-to-state* term: a 1 x k convolution of the layer's input with mask B (columns ``c - k//2 .. c``
  of row ``r``), computed for the whole image at once, and
- the *state-to-state* term: a 1-D convolution of width ``k`` over the previous row's states (columns
  ``c - k//2 .. c + k//2`` of row ``r - 1``; every pixel of row ``r - 1`` comes before ``(r, c)``).

Layers are joined by residual connections (a 1x1 convolution of the states added to the input), and two 1x1
convolutions give one sigmoid logit per pixel. The receptive field is the paper's triangle above the pixel (it
misses some earlier pixels to the far right of the rows above), but output ``i`` never depends on input
``j >= i``: the log-likelihood is exact and sampling takes ``H * W`` sequential passes (each itself ``H`` row
steps). The diagonal BiLSTM, which sees the whole context, is not implemented.

The paper reports 80.54 nats on binarized MNIST for the Row LSTM and 79.20 for a 7-layer diagonal BiLSTM
(Table 4, as recalled; see the benchmark).
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

#: Feature maps between layers.
DEFAULT_CHANNELS = 32
#: LSTM state size per pixel (the paper's h; its MNIST models used 16 to 32).
DEFAULT_HIDDEN = 32
#: Row LSTM layers (the paper's MNIST models used 1 to 7).
DEFAULT_LAYERS = 2
#: Width ``k`` of the input-to-state and state-to-state convolutions (the paper's k = 3).
ROW_KERNEL = 3
#: Size of the first (mask A) convolution, as in the paper.
FIRST_KERNEL = 7


class RowLSTM(nn.Module):
    """One Row LSTM layer: ``(N, C, H, W)`` features to ``(N, hidden, H, W)`` states, row by row."""

    def __init__(self, channels: int, hidden: int, kernel_size: int = ROW_KERNEL):
        super().__init__()
        self.hidden = hidden
        self.input_to_state = MaskedConv2d(channels, 4 * hidden, (1, kernel_size), "B")
        self.state_to_state = nn.Conv1d(hidden, 4 * hidden, kernel_size, padding=kernel_size // 2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = features.shape
        inputs = self.input_to_state(features)
        state = features.new_zeros(batch, self.hidden, width)
        cell = features.new_zeros(batch, self.hidden, width)
        rows = []
        for row in range(height):
            gates = inputs[:, :, row] + self.state_to_state(state)
            input_gate, forget_gate, output_gate, candidate = gates.chunk(4, 1)
            cell = torch.sigmoid(forget_gate) * cell + torch.sigmoid(input_gate) * torch.tanh(candidate)
            state = torch.sigmoid(output_gate) * torch.tanh(cell)
            rows.append(state)
        return torch.stack(rows, 2)


class PixelRNN(AutoregressiveImageModel):
    """PixelRNN (Row LSTM) over ``(H, W)`` binary images.

    Parameters
    ----------
    image_shape : (int, int)
        ``(H, W)``.
    channels : int
        Feature maps between layers.
    hidden : int
        LSTM state size.
    num_layers : int
        Row LSTM layers.
    seed : int, optional
        Seed of the initial weights (the global random state is left as it was).
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        channels: int = DEFAULT_CHANNELS,
        hidden: int = DEFAULT_HIDDEN,
        num_layers: int = DEFAULT_LAYERS,
        seed: int | None = 0,
    ):
        super().__init__(image_shape)
        for label, value in (("channels", channels), ("hidden", hidden), ("num_layers", num_layers)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive integer, got {value!r}")
        with seeded(seed):
            self.input = MaskedConv2d(2, channels, FIRST_KERNEL, "A")  # pixels and ones (with_ones)
            self.layers = nn.ModuleList(RowLSTM(channels, hidden) for _ in range(num_layers))
            self.projections = nn.ModuleList(nn.Conv2d(hidden, channels, 1) for _ in range(num_layers))
            self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(),
                                      nn.Conv2d(channels, 1, 1))

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        features = self.input(with_ones(images))
        for layer, projection in zip(self.layers, self.projections, strict=True):
            features = features + projection(layer(features))
        return self.head(features)[:, 0]

    def _pixel_logits(self, images: torch.Tensor, row: int, column: int) -> torch.Tensor:
        # rows are processed top to bottom: the rows below never reach this one's logits
        return self._logits(images[:, : row + 1])[:, row, column]


def fit(
    train_images,
    *,
    channels: int = DEFAULT_CHANNELS,
    hidden: int = DEFAULT_HIDDEN,
    num_layers: int = DEFAULT_LAYERS,
    epochs: int = 10,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    max_seconds: float | None = None,
    validation_images=None,
    seed: int = 0,
) -> tuple[PixelRNN, TrainingResult]:
    """Build a :class:`PixelRNN` for the images' shape and train it by maximum likelihood (Adam; arguments of
    :func:`models.autoregressive.train`, with early stopping on ``validation_images`` when given)."""
    images = check_images(train_images, name="train_images")
    model = PixelRNN(images.shape[1:], channels, hidden, num_layers, seed=seed)
    result = train(model, images, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                   max_seconds=max_seconds, validation_images=validation_images, seed=seed)
    return model, result
