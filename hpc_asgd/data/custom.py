"""Your own dataset, ``--dataset my_pkg.data:load`` (the contract: ``hpc_asgd.plugins``).

Its splits become batch-indexed splits: a pair of tensors is indexed directly (one
``index_select`` per batch), a map-style dataset item by item and collated by torch's
``default_collate``. Both travel to the rank's worker processes (tensors as shared memory; a
map-style dataset must pickle, as for a ``DataLoader`` with workers).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from hpc_asgd import plugins
from hpc_asgd.errors import ConfigError

from .base import Dataset, as_index


class TensorPairSplit:
    """``(x (N, ...), y (N, ...))`` in memory; no augmentation."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        if x.shape[0] != y.shape[0]:
            raise ConfigError(f"dataset: x has {x.shape[0]} samples but y has {y.shape[0]}")
        # float64 inputs would meet float32 parameters: the model's own dtype wins
        self.x = (x.float() if x.dtype == torch.float64 else x).contiguous()
        self.y = y.contiguous()

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def batch(
        self, idx: torch.Tensor, *, train: bool, gen: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        idx = as_index(idx)
        return self.x.index_select(0, idx), self.y.index_select(0, idx)


class MapSplit:
    """A map-style dataset of ``(x, y)`` items, a batch collated item by item."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(
        self, idx: torch.Tensor, *, train: bool, gen: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from torch.utils.data import default_collate

        items = [self.dataset[i] for i in as_index(idx).tolist()]
        x, y = default_collate(items)
        return x, y


def _split(spec: str, which: str, obj: Any) -> TensorPairSplit | MapSplit:
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and all(map(torch.is_tensor, obj)):
        return TensorPairSplit(obj[0], obj[1])
    if hasattr(obj, "__getitem__") and hasattr(obj, "__len__"):
        if len(obj) == 0:
            raise ConfigError(f"dataset: {spec} returned an empty {which} split")
        item = obj[0]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ConfigError(
                f"dataset: the items of {spec}'s {which} split must be (x, y) pairs, got "
                f"{type(item).__name__}"
            )
        return MapSplit(obj)
    raise ConfigError(
        f"dataset: {spec}'s {which} split is a {type(obj).__name__}; expected (x, y) tensors "
        "or a map-style Dataset of (x, y) items"
    )


@functools.lru_cache(maxsize=2)  # the check before the engine starts, then the run: once
def load_custom(spec: str, data_dir: str | None, seed: int) -> Dataset:
    """Call ``load(data_dir, seed)`` and check what it returned (one-line errors)."""
    out = plugins.call("dataset", spec, plugins.resolve("dataset", spec), data_dir, seed)
    if not (isinstance(out, (tuple, list)) and len(out) in (2, 3)):
        raise ConfigError(
            f"dataset: {spec} returned a {type(out).__name__}; expected (train, test) or "
            "(train, test, num_classes)"
        )
    train, test = _split(spec, "train", out[0]), _split(spec, "test", out[1])
    x, y = train.batch(torch.tensor([0]), train=False)
    shape = tuple(int(n) for n in x.shape[1:])
    if len(out) == 3:
        classes = out[2]
    elif isinstance(train, TensorPairSplit) and not train.y.is_floating_point():
        classes = int(train.y.max()) + 1
    else:
        classes = getattr(out[0], "num_classes", None) or len(getattr(out[0], "classes", ()))
        if not classes and not y.is_floating_point():  # scan the labels once
            classes = 1 + max(int(torch.as_tensor(out[0][i][1]).max()) for i in range(len(train)))
    if not (isinstance(classes, int) and classes >= 1):
        raise ConfigError(
            f"dataset: {spec} gave no usable number of classes ({classes!r}); return "
            "(train, test, num_classes)"
        )
    return Dataset(spec, train, test, shape, classes)
