"""``load_dataset``: the one entry point that maps a dataset name to its loader."""

from __future__ import annotations

import os
from pathlib import Path

from hpc_asgd import plugins
from hpc_asgd.errors import ConfigError

from .base import Dataset
from .fileio import require_data_dir

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagenet", "synthetic")
# (one sample's shape, classes) of each built-in dataset, known before any file is read
SHAPES: dict[str, tuple[tuple[int, ...], int]] = {
    "digits": ((1, 8, 8), 10),
    "mnist": ((1, 28, 28), 10),
    "fashion-mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
    "synthetic": ((3, 32, 32), 10),
}

# training samples of each built-in dataset whose size is fixed (synthetic: --synthetic-size;
# imagenet: its files), for the batch-size check before any engine starts
TRAIN_SIZES = {
    "digits": 1437,
    "mnist": 60_000,
    "fashion-mnist": 60_000,
    "cifar10": 50_000,
    "cifar100": 50_000,
}


def shape_of(name: str, data_dir: str | None) -> tuple[tuple[int, ...], int]:
    """(sample shape, classes) of built-in dataset ``name`` without loading it (ImageNet:
    its class folders, counted)."""
    if name == "imagenet":
        train = Path(data_dir or "") / "train"
        classes = sum(p.is_dir() for p in train.iterdir()) if train.is_dir() else 1000
        return (3, 224, 224), classes
    return SHAPES[name]


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    verify: bool = True,
    synthetic_shape: tuple[int, int, int] = (3, 32, 32),
    synthetic_classes: int = 10,
    synthetic_size: int = 50_000,
    seed: int = 0,
) -> Dataset:
    """Load ``name`` (one of ``DATASETS``) from ``data_dir``.

    ``download`` fetches missing MNIST / CIFAR files (never otherwise touching the network);
    ``verify`` checks MNIST and CIFAR files against the official MD5s (unpacked MNIST files:
    their sample count only). ``seed`` only shapes the synthetic data: the digits split is
    fixed so that test scores stay comparable.
    """
    if plugins.is_spec(str(name)):  # your own (``hpc_asgd.plugins``)
        from .custom import load_custom

        return load_custom(str(name), None if data_dir is None else str(data_dir), seed)
    key = str(name).strip().lower()
    if key == "digits":
        from .digits import load_digits_dataset

        return load_digits_dataset()
    if key in ("mnist", "fashion-mnist"):
        from .mnist import load_mnist

        root = require_data_dir(data_dir, key)
        return load_mnist(key, root, download=download, verify=verify)
    if key in ("cifar10", "cifar100"):
        from .cifar import load_cifar

        root = require_data_dir(data_dir, key)
        return load_cifar(key, root, download=download, verify=verify)
    if key == "imagenet":
        from .imagenet import load_imagenet

        return load_imagenet(require_data_dir(data_dir, key))
    if key == "synthetic":
        from .synthetic import load_synthetic

        return load_synthetic(synthetic_shape, synthetic_classes, synthetic_size, seed)
    raise ConfigError(f"dataset: unknown {name!r}; choose one of {', '.join(DATASETS)}")
