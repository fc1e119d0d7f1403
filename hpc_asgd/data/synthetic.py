"""Synthetic data for throughput runs: Gaussian inputs labelled by a fixed random linear teacher.

A small pool of samples is generated once from ``seed`` and indexed modulo its size, so
``batch()`` costs one gather whatever the nominal dataset size. The labels are the argmax of a
random linear map of the (average-pooled) input, so a model can actually learn them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hpc_asgd.errors import ConfigError

from .base import Dataset, as_index

MAX_POOL = 4096
MAX_POOL_BYTES = 64 << 20  # keeps a (3, 224, 224) pool at ~110 samples instead of 2.4 GiB
TEACHER_SIDE = 8  # the teacher sees an 8x8 average-pooled view: still linear in x, and small


class SyntheticSplit:
    """``size`` nominal samples backed by a pool of float32 (P, C, H, W) inputs."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, size: int) -> None:
        self.x, self.y, self.size = x, y, size  # x (P, C, H, W), y int64 (P,)

    def __len__(self) -> int:
        return self.size

    def batch(
        self, idx: torch.Tensor, *, train: bool, gen: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        j = as_index(idx) % self.x.shape[0]  # (B,) pool positions
        return self.x[j], self.y[j]


def _teacher_view(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C * h * w) with h, w <= TEACHER_SIDE, by average pooling."""
    side = (min(x.shape[2], TEACHER_SIDE), min(x.shape[3], TEACHER_SIDE))
    return F.adaptive_avg_pool2d(x, side).flatten(1)


def _pool(
    size: int, shape: tuple[int, int, int], teacher: torch.Tensor, g: torch.Generator
) -> SyntheticSplit:
    n = max(1, min(size, MAX_POOL, MAX_POOL_BYTES // (4 * math.prod(shape))))
    x = torch.randn((n, *shape), generator=g)  # already zero-mean, unit-variance per channel
    y = (_teacher_view(x) @ teacher).argmax(dim=1)  # (n,) int64
    return SyntheticSplit(x, y, size)


def load_synthetic(
    shape: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
    size: int = 50_000,
    seed: int = 0,
) -> Dataset:
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"synthetic_shape: expected three positive ints (C, H, W), got {shape}")
    if num_classes < 2:
        raise ConfigError(f"synthetic_classes: expected at least 2, got {num_classes}")
    if size < 1:
        raise ConfigError(f"synthetic_size: expected at least 1, got {size}")
    g = torch.Generator().manual_seed(seed)
    view_dim = _teacher_view(torch.zeros(1, *shape)).shape[1]
    teacher = torch.randn((view_dim, num_classes), generator=g)  # (D, K), D <= C * 64
    test_size = max(1, min(size // 5, 10_000))
    return Dataset(
        name="synthetic",
        train=_pool(size, shape, teacher, g),
        test=_pool(test_size, shape, teacher, g),
        input_shape=shape,
        num_classes=num_classes,
    )
