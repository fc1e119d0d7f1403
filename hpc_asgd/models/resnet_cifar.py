"""CIFAR ResNets of He et al. 2016, 'Deep Residual Learning for Image Recognition', sec. 4.2.

Depth 6n + 2 with three stages of n basic blocks at 16, 32 and 64 channels. Shortcuts that
change shape use option A by default: subsample by 2 and zero-pad the new channels (no
parameters), so resnet20 has 269,722 parameters at 10 classes; option B (1x1 conv + BN
projection) gives 272,474.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def kaiming_init(model: nn.Module) -> None:
    """He (kaiming) normal init for convs, unit scale / zero shift for batch norms."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ShortcutA(nn.Module):
    """Option-A shortcut: stride-2 subsampling and zero padding of the extra channels."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = planes - in_planes
        self.pad = (0, 0, 0, 0, extra // 2, extra - extra // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, :: self.stride, :: self.stride], self.pad)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (option-A or -B shortcut)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, option: str = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = (
                ShortcutA(in_planes, planes, stride)
                if option == "A"
                else nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR; adaptive average pooling lets it take any input size."""

    def __init__(
        self,
        depth: int,
        input_shape: tuple[int, int, int],
        num_classes: int,
        shortcut: str = "A",
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 or shortcut not in ("A", "B"):
            raise ValueError(f"need depth 6n + 2 and shortcut A or B, got {depth}, {shortcut}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(input_shape[0], 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks: list[nn.Module] = []
        in_planes = 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1, shortcut))
                in_planes = planes
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(out), 1))


def resnet20(input_shape: tuple[int, int, int], num_classes: int) -> CifarResNet:
    return CifarResNet(20, input_shape, num_classes)


def resnet32(input_shape: tuple[int, int, int], num_classes: int) -> CifarResNet:
    return CifarResNet(32, input_shape, num_classes)


def resnet56(input_shape: tuple[int, int, int], num_classes: int) -> CifarResNet:
    return CifarResNet(56, input_shape, num_classes)
