"""Model zoo: ``build_model(name, input_shape, num_classes)`` for every name in ``MODELS``.

Every model adapts to its input shape (C, H, W), so any model runs on any dataset from 8x8
digits to 224x224 ImageNet.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from hpc_asgd.errors import ConfigError

from .cnn import CNN
from .lenet import LeNet5
from .mlp import MLP
from .resnet import resnet18, resnet50
from .resnet_cifar import resnet20, resnet32, resnet56
from .wrn import wrn16_8

__all__ = ["MODELS", "build_model"]

_BUILDERS: dict[str, Callable[[tuple[int, int, int], int], nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "lenet": LeNet5,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "resnet18": resnet18,
    "wrn16_8": wrn16_8,
    "resnet50": resnet50,
}

MODELS = tuple(_BUILDERS)


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Build model ``name`` for inputs of shape (C, H, W) and ``num_classes`` outputs.

    Parameters are drawn from torch's global generator, so ``torch.manual_seed`` before the
    call makes them reproducible.
    """
    if name not in _BUILDERS:
        raise ConfigError(f"model: unknown model {name!r}; choose one of {', '.join(MODELS)}")
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"model: input_shape must be (C, H, W) of positive ints, got {shape}")
    if min(shape[1:]) < 8:
        raise ConfigError(f"model: inputs must be at least 8x8 pixels, got {shape}")
    if num_classes < 1:
        raise ConfigError(f"model: num_classes must be positive, got {num_classes}")
    return _BUILDERS[name](shape, num_classes)
