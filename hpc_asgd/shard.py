"""Each rank's shard of a dataset, and the batch source a step draws from.

:class:`ShardSampler` gives every rank a disjoint, equally sized shard of ``range(n)``,
reshuffled each epoch, like torch's ``DistributedSampler`` without its padding: each epoch
every rank draws the same permutation from (seed, epoch), drops its tail so that all shards
have equal size, and takes every ``num_shards``-th index from position ``shard``. Equal shards
mean equal step counts: no rank waits in a collective for a batch that never comes.

It is also a ``batch_sampler`` for a ``torch.utils.data.DataLoader`` over any map-style
dataset (:meth:`ShardSampler.of`)::

    sampler = hpc_asgd.ShardSampler.of(dataset, comm, batch_size=32, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler)   # call sampler.set_epoch(e) per epoch

:class:`Split` is what the rank's own steps (``hpc_asgd.step``) draw whole batches from.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import torch

from hpc_asgd.errors import ConfigError

if TYPE_CHECKING:
    from hpc_asgd.comm.base import Comm


@runtime_checkable
class Split(Protocol):
    """One split (train or test) of a dataset, indexed by whole batches."""

    def __len__(self) -> int: ...

    def batch(
        self, idx: torch.Tensor, *, train: bool, gen: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the inputs x (B, ...) and the targets y (B, ...) of samples ``idx``.

        ``idx`` is an int64 (B,) tensor of sample indices. ``train=True`` applies the
        dataset's augmentation, drawing its randomness from ``gen``.
        """
        ...


class ShardSampler:
    """Disjoint, equally sized shards of ``range(n)``, reshuffled each epoch."""

    def __init__(
        self,
        n: int,
        shard: int,
        num_shards: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if num_shards < 1 or not 0 <= shard < num_shards:
            raise ConfigError(f"shard: {shard} is not in 0..{num_shards - 1}")
        if batch_size < 1:
            raise ConfigError(f"batch_size: must be at least 1, got {batch_size}")
        if n < num_shards:
            raise ConfigError(f"dataset: {n} samples cannot be split over {num_shards} shards")
        self.n, self.shard, self.num_shards = n, shard, num_shards
        self.batch_size, self.seed = batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.per_shard = n // num_shards  # the last n % num_shards samples sit out the epoch
        self.current_epoch = 0  # the epoch ``__iter__`` hands out (``set_epoch``)
        if drop_last:
            self.check_fits(n, num_shards, batch_size)

    @staticmethod
    def check_fits(n: int, num_shards: int, batch_size: int) -> None:
        """ConfigError unless a shard of ``n // num_shards`` samples holds one full batch (no
        step in an epoch otherwise: drop_last drops the only, partial, batch)."""
        if n // num_shards < batch_size:
            raise ConfigError(
                f"batch_size: {batch_size} exceeds the {n // num_shards} samples per shard "
                f"({n} samples over {num_shards} shards) with drop_last"
            )

    @classmethod
    def of(
        cls,
        dataset: Sized | int,
        comm: Comm,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> ShardSampler:
        """This rank's shard of ``dataset`` (a map-style dataset, or its length) among the
        ranks of ``comm``: ``DataLoader(dataset, batch_sampler=ShardSampler.of(...))``."""
        n = dataset if isinstance(dataset, int) else len(dataset)
        return cls(n, comm.rank, comm.size, batch_size, seed, shuffle, drop_last)

    @property
    def steps_per_epoch(self) -> int:
        if self.drop_last:
            return self.per_shard // self.batch_size
        return -(-self.per_shard // self.batch_size)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _order(self, e: int) -> torch.Tensor:
        """The epoch's global order (n,), identical on every rank."""
        if not self.shuffle:
            return torch.arange(self.n)
        # Mix (seed, epoch) through SeedSequence: seed + epoch would make (0, 1) == (1, 0).
        mask = (1 << 64) - 1
        state = np.random.SeedSequence([self.seed & mask, e & mask]).generate_state(1, np.uint64)
        g = torch.Generator().manual_seed(int(state[0]))
        return torch.randperm(self.n, generator=g)

    def indices(self, e: int) -> torch.Tensor:
        """This shard's sample indices in epoch ``e``, int64 ``(per_shard,)``."""
        used = self.per_shard * self.num_shards
        return self._order(e)[self.shard : used : self.num_shards]

    def epoch(self, e: int) -> list[torch.Tensor]:
        """The int64 index batches of this shard in epoch ``e``, each of ``batch_size``."""
        batches = list(self.indices(e).split(self.batch_size))
        return batches[: self.steps_per_epoch]

    # ---- as a DataLoader's batch_sampler ----------------------------------------------------
    def set_epoch(self, e: int) -> None:
        """The epoch the next iteration hands out (a new shuffle each epoch)."""
        self.current_epoch = e

    def __iter__(self) -> Iterator[list[int]]:
        for b in self.epoch(self.current_epoch):
            yield b.tolist()
