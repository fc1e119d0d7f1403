"""``load_dataset``: the one entry point that maps a dataset name to its loader."""

from __future__ import annotations

import os

from hpc_asgd.errors import ConfigError

from .base import Dataset
from .fileio import require_data_dir

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagenet", "synthetic")


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
