"""Per-rank shards of a split's indices, like torch's DistributedSampler without the padding.

Each epoch every rank draws the same permutation from (seed, epoch), drops its tail so that
all shards have equal size, and takes every ``num_shards``-th index from position ``shard``.
Equal shards mean equal step counts: no rank waits in a collective for a batch that never
comes.
"""

from __future__ import annotations

import numpy as np
import torch

from hpc_asgd.errors import ConfigError


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
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"batch_size: {batch_size} exceeds the {self.per_shard} samples per shard "
                f"({n} samples over {num_shards} shards) with drop_last"
            )

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

    def epoch(self, e: int) -> list[torch.Tensor]:
        """The int64 index batches of this shard in epoch ``e``, each of ``batch_size``."""
        used = self.per_shard * self.num_shards
        mine = self._order(e)[self.shard : used : self.num_shards]  # (per_shard,)
        batches = list(mine.split(self.batch_size))
        return batches[: self.steps_per_epoch]
