"""Model zoo: ``build_model(name, input_shape, num_classes)`` for every name in ``MODELS``, and
your own model, named ``module:function`` (``hpc_asgd.plugins``).

Every zoo model adapts to its input shape (C, H, W), so any model runs on any image dataset
from 8x8 digits to 224x224 ImageNet.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hpc_asgd import plugins
from hpc_asgd.errors import ConfigError

from .cnn import CNN
from .lenet import LeNet5
from .mlp import MLP
from .resnet import resnet18, resnet50
from .resnet_cifar import resnet20, resnet32, resnet56
from .wrn import wrn16_8

__all__ = ["MODELS", "build_model", "check_model"]

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


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build model ``name`` for inputs of shape (C, H, W) and ``num_classes`` outputs (your
    own, ``module:function``: for one sample's shape, whatever it is).

    Parameters are drawn from torch's global generator, so ``torch.manual_seed`` before the
    call makes them reproducible.
    """
    if plugins.is_spec(name):
        shape, n = tuple(int(s) for s in input_shape), int(num_classes)
        model = plugins.call("model", name, plugins.resolve("model", name), shape, n)
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"model: {name} returned a {type(model).__name__}, not a torch.nn.Module"
            )
        return model
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


def check_model(model: str, dataset: str, data_dir: str | None, loss: str, seed: int) -> None:
    """Build ``model`` for ``dataset`` and pass two of its samples (zeros, for a built-in
    dataset, which is not read here) through it and the loss: the output must be
    ``(2, num_classes)`` for cross-entropy, and your own loss must give a scalar."""
    from hpc_asgd.data import load_dataset
    from hpc_asgd.data.registry import shape_of

    if plugins.is_spec(dataset):
        data = load_dataset(dataset, data_dir, seed=seed)
        shape, classes = data.input_shape, data.num_classes
        x, y = data.train.batch(torch.arange(min(2, len(data.train))), train=False)
    else:
        shape, classes = shape_of(dataset, data_dir)
        x, y = torch.zeros((2, *shape)), torch.zeros(2, dtype=torch.int64)
    torch.manual_seed(seed)
    net = build_model(model, shape, classes)
    fn = plugins.loss_function(loss)
    was = net.training
    net.eval()  # (BatchNorm statistics untouched; the model is thrown away anyway)
    with torch.no_grad():
        try:
            out = net(x)
        except Exception as e:
            raise ConfigError(
                f"model: {model}'s forward on a batch of shape {tuple(x.shape)} raised "
                f"{type(e).__name__}: {e}"
            ) from None
        if not torch.is_tensor(out):
            raise ConfigError(f"model: {model}'s forward gave a {type(out).__name__}, not a tensor")
        want = (x.shape[0], classes)
        if loss == "cross-entropy" and tuple(out.shape) != want:
            raise ConfigError(
                f"model: {model}'s output for a batch of {x.shape[0]} samples of shape "
                f"{tuple(shape)} has shape {tuple(out.shape)}, but {dataset} has {classes} "
                f"classes: expected {want}"
            )
        try:
            value = fn(out, y)
        except Exception as e:
            raise ConfigError(
                f"loss: {loss} on the model's output {tuple(out.shape)} and targets "
                f"{tuple(y.shape)} raised {type(e).__name__}: {e}"
            ) from None
        if not (torch.is_tensor(value) and value.numel() == 1):
            raise ConfigError(f"loss: {loss} must return a scalar tensor, got {value!r:.60}")
    net.train(was)
