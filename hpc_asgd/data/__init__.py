"""Datasets as batch-indexable splits (their shards: :class:`hpc_asgd.shard.ShardSampler`)."""

from hpc_asgd.shard import ShardSampler, Split

from .base import Dataset
from .registry import DATASETS, load_dataset

__all__ = ["DATASETS", "Dataset", "ShardSampler", "Split", "load_dataset"]
