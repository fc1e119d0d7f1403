"""LeNet-5 of LeCun et al. 1998, 'Gradient-based learning applied to document recognition'.

conv(6, 5x5) - pool - conv(16, 5x5) - pool - fc 120 - fc 84 - fc classes, with the modern
ReLU and max-pooling. Inputs under 32 pixels pad the first conv by 2 (the usual MNIST
setting), inputs under 16 pixels also pad the second, so 8x8 digits still fit.
"""

from __future__ import annotations

from torch import nn


def _out(size: int, pad1: int, pad2: int) -> int:
    return ((size + 2 * pad1 - 4) // 2 + 2 * pad2 - 4) // 2


class LeNet5(nn.Sequential):
    """LeNet-5 sized for any (C, H, W) input of at least 8x8 pixels."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        channels, height, width = input_shape
        small = min(height, width)
        pad1 = 2 if small < 32 else 0
        pad2 = 2 if small < 16 else 0
        flat = 16 * _out(height, pad1, pad2) * _out(width, pad1, pad2)
        super().__init__(
            nn.Conv2d(channels, 6, 5, padding=pad1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=pad2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(flat, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )
