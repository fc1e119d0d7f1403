"""ResNet-18 and ResNet-50 of He et al. 2016, 'Deep Residual Learning for Image Recognition'.

resnet18 is the common CIFAR adaptation: a 3x3 stride-1 stem and no max-pool, then basic
blocks [2, 2, 2, 2]. resnet50 is the ImageNet network as in torchvision: a 7x7 stride-2 stem,
3x3 max-pool, bottleneck blocks [3, 4, 6, 3] (stride on the 3x3 conv) and 25.6M parameters at
1000 classes. Both end in adaptive average pooling, so any input of 8x8 pixels or more runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .resnet_cifar import kaiming_init


def _projection(in_planes: int, planes: int, stride: int) -> nn.Module:
    """1x1 conv + BN shortcut when the shape changes, identity otherwise."""
    if stride == 1 and in_planes == planes:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers; 1x1 projection shortcut when the shape changes."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4; 1x1 projection shortcut when needed."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _projection(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Four stages at 64, 128, 256, 512 base channels after a given stem."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        counts: tuple[int, int, int, int],
        stem: nn.Module,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.stem = stem
        stages: list[nn.Module] = []
        in_planes = 64
        for i, (planes, count) in enumerate(zip((64, 128, 256, 512), counts, strict=True)):
            blocks = []
            for j in range(count):
                blocks.append(block(in_planes, planes, 2 if i > 0 and j == 0 else 1))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(out), 1))


def resnet18(input_shape: tuple[int, int, int], num_classes: int) -> ResNet:
    """CIFAR ResNet-18: 3x3 stride-1 stem, no max-pool (11.2M parameters at 10 classes)."""
    stem = nn.Sequential(
        nn.Conv2d(input_shape[0], 64, 3, 1, 1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
    )
    return ResNet(BasicBlock, (2, 2, 2, 2), stem, num_classes)


def resnet50(input_shape: tuple[int, int, int], num_classes: int) -> ResNet:
    """ImageNet ResNet-50: 7x7 stride-2 stem and 3x3 stride-2 max-pool."""
    stem = nn.Sequential(
        nn.Conv2d(input_shape[0], 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    )
    return ResNet(Bottleneck, (3, 4, 6, 3), stem, num_classes)
