"""Multilayer perceptron of Bäckström et al., IPDPS 2021, 'Consistent lock-free parallel SGD'.

Three hidden layers of 128 units with ReLU, as in the Leashed-SGD paper's MLP benchmark.
"""

from __future__ import annotations

import math

from torch import nn


class MLP(nn.Sequential):
    """Flatten -> 3 x (Linear(., 128) -> ReLU) -> Linear(128, num_classes)."""

    def __init__(
        self, input_shape: tuple[int, int, int], num_classes: int, hidden: int = 128
    ) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for _ in range(3):
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)
