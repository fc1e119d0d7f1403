"""Two-layer CNN of Bäckström et al., IPDPS 2021, 'Consistent lock-free parallel SGD'.

The same network as the PyTorch MNIST example: conv(32, 3x3) - ReLU - conv(64, 3x3) - ReLU -
max-pool 2 - dropout 0.25 - fc 128 - ReLU - dropout 0.5 - fc classes. The flattened size is
computed from the input shape; inputs smaller than 16 pixels get padding 1 so they still fit.
"""

from __future__ import annotations

from torch import nn


class CNN(nn.Sequential):
    """The Leashed-SGD / PyTorch-MNIST-example CNN, sized for any (C, H, W) input."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        channels, height, width = input_shape
        pad = 1 if min(height, width) < 16 else 0
        # two 3x3 convs (each shrinks by 2 - 2 * pad), then a 2x2 max-pool
        out_h = (height + 4 * pad - 4) // 2
        out_w = (width + 4 * pad - 4) // 2
        super().__init__(
            nn.Conv2d(channels, 32, 3, padding=pad),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, padding=pad),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Dropout(0.25),
            nn.Flatten(),
            nn.Linear(64 * out_h * out_w, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(128, num_classes),
        )
