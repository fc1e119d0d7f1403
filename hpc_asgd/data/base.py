"""The ``Dataset`` record and the in-memory split of the small datasets.

A split (``hpc_asgd.shard.Split``) hands out whole batches from index tensors instead of single
samples: the trainer draws indices from a ``ShardSampler`` and calls ``batch()``, so augmentation
runs as batched tensor ops and no DataLoader worker processes are needed next to the MPI ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hpc_asgd.shard import Split

# augment(x, gen) -> x: x float32 (B, C, H, W) in [0, 1], before normalisation.
Augment = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]


@dataclass
class Dataset:
    """A loaded dataset: both splits plus what a model needs to know about them."""

    name: str
    train: Split
    test: Split
    input_shape: tuple[int, ...]  # one sample's: (C, H, W) for images; any shape for your own
    num_classes: int


def normaliser(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel constants shaped (1, C, 1, 1) so they broadcast over a batch."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return m, s


def as_index(idx: torch.Tensor) -> torch.Tensor:
    """Indices as a CPU int64 (B,) tensor: the data lives in host memory."""
    return torch.as_tensor(idx).to("cpu", torch.int64).reshape(-1)


class TensorSplit:
    """Images held in memory as uint8 (N, C, H, W); ``batch()`` scales, augments, normalises.

    uint8 keeps CIFAR-10's 50,000 training images at 150 MiB instead of 600 MiB of float32.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        scale: float,
        mean: Sequence[float],
        std: Sequence[float],
        augment: Augment | None = None,
    ) -> None:
        if images.dim() != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"images {tuple(images.shape)} do not match labels {labels.shape}")
        self.images = images.contiguous()  # uint8 (N, C, H, W)
        self.labels = labels.to(torch.int64).contiguous()  # int64 (N,)
        self.scale = scale  # maps the stored values onto [0, 1]
        self.mean, self.std = normaliser(mean, std)
        self.gain, self.shift = scale / self.std, -self.mean / self.std  # (1, C, 1, 1)
        self.augment = augment

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(
        self, idx: torch.Tensor, *, train: bool, gen: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # index_select, not images[idx]: 5 us against 22 for 16 MNIST rows (a worker's step
        # of a small model is ~1 ms)
        idx = as_index(idx)
        x = self.images.index_select(0, idx)  # (B, C, H, W), stored range (uint8)
        if train and self.augment is not None:
            # Augment in [0, 1] before normalising so that padding is black, as in torchvision.
            x = x.to(torch.float32).mul_(self.scale)
            x = (self.augment(x, gen) - self.mean) / self.std
        else:  # one fused pass, float32 out: x * (scale / std) - mean / std
            x = torch.addcmul(self.shift, x, self.gain)
        return x, self.labels.index_select(0, idx)
